"""TWA maths in one process: basis vs Gram-Schmidt, projection vs the authors' dense
formulation, dropping of dependent snapshots, quantisation bounds, coefficient form."""
from __future__ import annotations

import math
import platform

import pytest
import torch

from twa_scale.layout import FlatLayout
from twa_scale.models import build_model
from twa_scale.twa.config import TwaConfig, parse_select, parse_twa_args
from twa_scale.twa.solver import ShardedFlat, select_snapshots, SnapshotRef
from twa_scale.twa.quant import Kernels, pack_bits, pack_tiles, quantize_rows, unpack_bits, unpack_tiles
from twa_scale.twa.subspace import build_basis, gram, sequential_cholesky
from tests.support.twa import gram_schmidt


def _trajectory(n=6, d=2000, seed=0):
    """Correlated snapshots like an SGD trajectory: a common point plus a drifting walk."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g)
    steps = 0.05 * torch.randn(n, d, generator=g)
    return base + steps.cumsum(0)


BLOCKS = [(0, 700), (700, 701), (701, 1500), (1500, 2000)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_basis_equals_sequential_gram_schmidt():
    x = _trajectory()
    b = build_basis(x, 0, x.shape[1], BLOCKS)
    ref = gram_schmidt(x)
    assert b.k == ref.shape[0] == 6
    p = b.dequantized()
    assert _rel(p, ref) < 1e-5
    eye = torch.eye(b.k, dtype=torch.float64)
    assert (p.double() @ p.double().T - eye).abs().max() < 1e-5


def test_projection_and_reconstruction_match_authors_dense_formulation():
    x = _trajectory()
    b = build_basis(x, 0, x.shape[1], BLOCKS)
    ref = gram_schmidt(x)
    g = torch.randn(x.shape[1])
    c = b.project(g)
    assert _rel(c[:, 0], ref @ g.double()) < 1e-5
    pg = b.reconstruct(b.theta0 + c) - b.w_start
    assert _rel(pg, ref.T @ (ref @ g.double())) < 1e-5


def test_start_point_is_swa_mean_and_alpha_reconstructs_weights():
    x = _trajectory()
    b = build_basis(x, 0, x.shape[1], BLOCKS)
    assert torch.equal(b.reconstruct(b.theta0), x.double().mean(0).float())
    theta = b.theta0 + 0.3 * torch.randn_like(b.theta0)
    w = b.reconstruct(theta)
    alpha = b.alpha(theta)[:, 0]
    assert _rel(w, alpha @ x.double()) < 1e-5


def test_start_at_a_snapshot():
    x = _trajectory()
    a = torch.zeros(6, dtype=torch.float64)
    a[2] = 1
    for layerwise in (False, True):
        for directions in ("raw", "centered"):
            b = build_basis(x, 0, x.shape[1], BLOCKS, alpha_start=a, layerwise=layerwise, directions=directions)
            assert torch.equal(b.reconstruct(b.theta0), x[2])
            # theta0 really holds the start point's coordinates: base + sum theta0[i, l] P_il = x[2]
            base = torch.zeros(x.shape[1], dtype=torch.float64) if directions == "raw" else x.double().mean(0)
            w = base.clone()
            p = b.dequantized().double()
            for l, (s, e) in enumerate(BLOCKS):
                w[s:e] += p[:, s:e].T @ b.theta0[:, l if layerwise else 0].double()
            assert _rel(w, x[2]) < 1e-5


@pytest.mark.parametrize("directions", ["raw", "centered"])
def test_layerwise_alpha_is_exact(directions):
    x = _trajectory()
    b = build_basis(x, 0, x.shape[1], BLOCKS, layerwise=True, directions=directions)
    assert b.num_coef_blocks == len(BLOCKS) and b.k == 6
    theta = b.theta0 + torch.randn_like(b.theta0)
    w = b.reconstruct(theta)
    a = b.alpha(theta)
    ref = torch.cat([a[:, l] @ x[:, s:e].double() for l, (s, e) in enumerate(BLOCKS)])
    assert _rel(w, ref) < 1e-5
    # gradient in coefficient form: c[i, l] = <P_il, g>, each P_il of unit norm
    g = torch.randn(x.shape[1])
    c = b.project(g)
    for l, (s, e) in enumerate(BLOCKS):
        p = b.dequantized()[:, s:e]
        assert torch.allclose(p.norm(dim=1), torch.ones(6), atol=1e-5)
        assert torch.allclose(c[:, l], p @ g[s:e], atol=1e-4)


def test_centered_global_drops_the_mean_direction_and_reports_it():
    x = _trajectory()
    b = build_basis(x, 0, x.shape[1], BLOCKS, directions="centered")
    assert b.k == 5 and b.report["dropped"] == [5]
    assert torch.equal(b.reconstruct(b.theta0), x.double().mean(0).float())


def test_nearly_dependent_snapshots_are_dropped_never_nan():
    x = _trajectory(n=5)
    x = torch.cat([x[:3], (0.5 * x[0] + 0.5 * x[1] + 1e-9 * torch.randn_like(x[0]))[None], x[3:]])
    b = build_basis(x, 0, x.shape[1], BLOCKS)
    assert b.report["dropped"] == [3]
    assert b.k == 5
    assert torch.isfinite(b.dequantized()).all()
    g = torch.randn(x.shape[1])
    ref = gram_schmidt(x)
    assert _rel(b.reconstruct(b.theta0 + b.project(g)) - b.w_start, ref.T @ (ref @ g.double())) < 1e-5


def test_identical_snapshots_are_rejected():
    x = _trajectory(n=1).repeat(4, 1)
    with pytest.raises(ValueError, match="dimension 1"):
        build_basis(x, 0, x.shape[1], BLOCKS)


def test_sequential_cholesky_matches_qr_r():
    x = _trajectory().double()
    r, kept, _ = sequential_cholesky(gram(x), 1e-9)
    _, r_qr = torch.linalg.qr(x.T)
    assert kept == list(range(6))
    assert torch.allclose(r, r_qr * torch.sign(torch.diagonal(r_qr)).unsqueeze(1), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_roundtrip_and_size(bits):
    codes = torch.randint(0, 1 << bits, (3, 37), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, math.ceil(40 * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, 37), codes)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_tile_pack_roundtrip(bits):
    codes = torch.randint(0, 1 << bits, (5, 3, 64 * 8 // bits), dtype=torch.uint8)
    packed = pack_tiles(codes, bits)
    assert packed.shape == (5, 3, 64)
    assert torch.equal(unpack_tiles(packed, bits), codes.int())


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantised_p_dequantises_within_its_bound(bits, layerwise):
    x = _trajectory()
    dense = build_basis(x, 0, x.shape[1], BLOCKS, layerwise=layerwise)
    q = build_basis(x, 0, x.shape[1], BLOCKS, bits=bits, layerwise=layerwise)
    # packed: memory shrinks (plus ranges, a group table, and fp32 columns at block edges)
    assert q.nbytes < dense.nbytes
    dense_p = dense.dequantized()
    err = (q.dequantized() - dense_p).abs()
    assert (err <= q.max_error()).all()
    # min/max quantisation: each (direction, block) range is reproduced at both ends
    deq = q.dequantized()
    for b0, b1 in BLOCKS:
        assert torch.allclose(deq[:, b0:b1].amax(1), dense_p[:, b0:b1].amax(1), atol=1e-6)
        assert torch.allclose(deq[:, b0:b1].amin(1), dense_p[:, b0:b1].amin(1), atol=1e-6)
    # the quantised basis keeps the start point exact
    assert torch.equal(q.reconstruct(q.theta0), x.double().mean(0).float())


def test_quantize_rows_constant_row_is_exact():
    x = torch.full((2, 10), 0.25)
    rows = quantize_rows(x, 4)
    assert torch.equal(rows.dequantize(), x)


def test_select_and_config_validation():
    infos = [SnapshotRef(s) for s in range(0, 11)]
    assert [r.seq for r in select_snapshots(infos, None)] == list(range(0, 11))  # seq 0 included
    assert [r.seq for r in select_snapshots(infos, "2:8:3")] == [2, 5]
    assert [r.seq for r in select_snapshots(infos, ":3")] == [0, 1, 2]
    with pytest.raises(ValueError, match="--select"):
        parse_select("1-5")
    with pytest.raises(ValueError, match="--lr"):
        TwaConfig(snapshot_url="memory://x", run_id="r", lr=0)
    with pytest.raises(ValueError, match="--p-bits"):
        TwaConfig(snapshot_url="memory://x", run_id="r", p_bits=3)
    cfg = parse_twa_args(["--snapshot-url", "memory://x", "--run-id", "r", "--preset", "paper_imagenet"])
    assert (cfg.lr, cfg.epochs, cfg.mode) == (0.3, 2, "paper")
    cfg = parse_twa_args(["--snapshot-url", "memory://x", "--run-id", "r", "--preset", "journal", "--p-bits", "4"])
    assert (cfg.directions, cfg.coefficients, cfg.optimizer, cfg.p_bits, cfg.mode) == \
        ("centered", "layerwise", "adamw", 4, "journal")


def test_world_larger_than_d_is_rejected():
    layout = FlatLayout.from_model(build_model("mlp", 10))
    with pytest.raises(ValueError, match="larger than the number of parameters"):
        ShardedFlat(layout, layout.D + 1, 0, torch.device("cpu"))


def test_packed_p_at_4_bits_is_an_eighth_of_fp32():
    x = _trajectory(d=200_000)
    blocks = [(0, 100_000), (100_000, 100_050), (100_050, 200_000)]
    dense = build_basis(x, 0, x.shape[1], blocks)
    q = build_basis(x, 0, x.shape[1], blocks, bits=4)
    assert q.nbytes <= dense.nbytes / 8 * 1.1  # + the group table: 16 bytes per 128 columns, all rows


@pytest.mark.parametrize("granularity", ["row-block", "block"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("path", ["eager", "native"])
def test_quantised_products_equal_dequantised_dense(bits, layerwise, path, granularity):
    """project/reconstruct read packed codes directly; they equal the products of the dequantised P."""
    x = _trajectory()
    q = build_basis(x, 0, x.shape[1], BLOCKS, bits=bits, max_columns=300, layerwise=layerwise,
                    granularity=granularity, kernels=Kernels(path, 200))  # eager: several chunks per slice
    deq = q.dequantized()
    assert (q.dequantized() - build_basis(x, 0, x.shape[1], BLOCKS, layerwise=layerwise).dequantized()).abs().le(
        q.max_error()).all()
    g = torch.randn(x.shape[1])
    blocks = BLOCKS if layerwise else [(0, x.shape[1])]
    c = q.project(g)
    ref_c = torch.stack([deq[:, b0:b1] @ g[b0:b1] for b0, b1 in blocks], 1)
    # scale*(codes.g) + lo*sum(g) cancels a little more than the dense product: fp32 rounding (and, native,
    # g rounded to int16 per group)
    assert _rel(c, ref_c) < 1e-5
    theta = q.theta0 + torch.randn_like(q.theta0)
    delta = (theta - q.theta0).float()
    ref = torch.cat([deq[:, b0:b1].T @ delta[:, l] for l, (b0, b1) in enumerate(blocks)])
    assert _rel(q.reconstruct(theta) - q.w_start, ref) < 1e-5


def test_block_granularity_shares_one_range_per_block():
    """The journal's granularity: all directions of a block share its min/max; row-block is finer."""
    x = _trajectory()
    fine = build_basis(x, 0, x.shape[1], BLOCKS, bits=2)
    coarse = build_basis(x, 0, x.shape[1], BLOCKS, bits=2, granularity="block")
    assert coarse.report["quant_granularity"] == "block"
    st = coarse.storage
    assert torch.equal(st.lo, st.lo[:1].expand_as(st.lo)) and torch.equal(st.scale, st.scale[:1].expand_as(st.scale))
    exact = build_basis(x, 0, x.shape[1], BLOCKS).dequantized()
    assert (coarse.dequantized() - exact).abs().mean() > (fine.dequantized() - exact).abs().mean()


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("path", ["native", pytest.param("compile", marks=pytest.mark.slow)])
def test_fused_kernels_equal_eager(bits, path):
    """The fused kernels (C on CPU, torch.compile) give the eager path's results within 1e-5 relative."""
    x = _trajectory(d=20_000)
    blocks = [(0, 7000), (7000, 7003), (7003, 20_000)]
    eager = build_basis(x, 0, x.shape[1], blocks, bits=bits, kernels=Kernels("eager", 4096))
    fused = build_basis(x, 0, x.shape[1], blocks, bits=bits, kernels=Kernels(path, 4096))
    if path == "native":
        from twa_scale.twa.quant import _native
        if _native() is None:
            pytest.skip("no C compiler: the native path falls back to eager")
    g = torch.randn(x.shape[1])
    theta = eager.theta0 + torch.randn_like(eager.theta0)
    assert _rel(fused.project(g), eager.project(g)) < 1e-5
    assert _rel(fused.reconstruct(theta) - fused.w_start, eager.reconstruct(theta) - eager.w_start) < 1e-5


# the C kernels as built for this CPU, and for older x86-64 levels: v3 runs the AVX2 code and v2 the scalar
# fallback on any x86-64 host (native is AVX-512 where the CPU has it, else AVX2)
ISAS = ["native", "x86-64-v3", "x86-64-v2"]
SIMD_BITS = {"x86-64-v3": 256, "x86-64-v2": 0}


@pytest.fixture
def native_isa(request, monkeypatch):
    """Point the native path at the kernels built for ``request.param`` (an -march value); the library."""
    from twa_scale.twa import quant

    march = request.param
    if march != "native" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"-march={march} is an x86-64 level")
    lib = quant._native() if march == "native" else quant.build_native(march)
    if lib is None:
        pytest.skip(f"no C compiler builds the kernels for -march={march}")
    assert lib.twa_simd_bits() == SIMD_BITS.get(march, lib.twa_simd_bits()), "the build runs another code path"
    monkeypatch.setattr(quant, "_NATIVE_LIB", [lib])
    return lib


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("native_isa", ISAS, indirect=True)
def test_native_kernels_equal_integer_arithmetic_on_integer_inputs(bits, layerwise, native_isa):
    """With lo = 0 and scale = 1 (P is its codes), integer g with 32767 the largest of every group (the int16
    project then rounds nothing) and integer coefficients, the native kernels equal exact integer arithmetic
    to fp32 rounding. A code read from the wrong lane or position, or a side column given the wrong
    coefficient, changes whole integers. For every instruction set the kernels have code for."""
    import dataclasses

    from twa_scale.twa.quant import GroupedP

    x = _trajectory(n=5, d=3000)
    blocks = [(0, 1100), (1100, 1103), (1103, 3000)]
    q = build_basis(x, 0, x.shape[1], blocks, bits=bits, layerwise=layerwise, kernels=Kernels("native", 4096))
    st = q.storage
    assert isinstance(st, GroupedP) and st.gstart.numel() and st.side_idx.numel()
    # lo = 0, scale = 1: P is its integer codes
    st = dataclasses.replace(st, lo=torch.zeros_like(st.lo), scale=torch.ones_like(st.scale),
                             side=st.side.sub(st.lo[:, st.side_blk]).div(st.scale[:, st.side_blk]).round())
    codes = st.dequantize().double()                   # k x d integers
    L = st.num_coef
    delta = torch.randint(-32767, 32768, (st.k, L)).float()
    w = torch.randn(st.d)
    out = st.reconstruct(w, delta.double(), torch.zeros(st.k, L, dtype=torch.float64), torch.empty(st.d))
    coef_of_col = torch.empty(st.d, dtype=torch.int64)
    for l, (b0, b1) in enumerate(blocks):
        coef_of_col[b0:b1] = l if layerwise else 0
    exact = (codes * delta.double()[:, coef_of_col]).sum(0)
    assert _rel(out.double() - w.double(), exact) < 1e-6
    g = torch.randint(-32767, 32768, (st.d,)).float()
    g[st.gstart] = 32767.                              # the largest of every group
    ref = torch.zeros(st.k, L, dtype=torch.float64)
    ref.index_add_(1, coef_of_col, codes * g.double())
    assert _rel(st.project(g), ref) < 1e-6


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("layerwise", [False, True])
def test_avx512_kernels_equal_the_avx2_kernels_bit_for_bit(bits, layerwise, monkeypatch):
    """The AVX-512 code holds a whole tile per register but keeps the AVX2 code's lanes and order of
    additions (the project's integer sums are exact): both products are the same bits."""
    from twa_scale.twa import quant

    native, avx2 = quant._native(), quant.build_native("x86-64-v3")
    if native is None or avx2 is None:
        pytest.skip("no C compiler: the native path falls back to eager")
    if native.twa_simd_bits() != 512:
        pytest.skip("this CPU (or compiler) has no AVX-512 F/BW/DQ: the native build is the AVX2 code")
    assert avx2.twa_simd_bits() == 256
    x = _trajectory(n=37, d=20_000)                   # an odd row count; groups, edges and tails in 3 blocks
    q = build_basis(x, 0, x.shape[1], [(0, 7000), (7000, 7003), (7003, 20_000)], bits=bits, layerwise=layerwise,
                    kernels=Kernels("native", 4096))
    g = torch.randn(x.shape[1])
    theta = q.theta0 + torch.randn_like(q.theta0)
    results = []
    for lib in (native, avx2):
        monkeypatch.setattr(quant, "_NATIVE_LIB", [lib])
        results.append((q.project(g), q.reconstruct(theta)))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("layerwise", [False, True])
def test_native_side_columns_beyond_one_chunk_of_rows_equal_eager(layerwise):
    """The C loops over the side columns take the rows 64 at a time: with k > 64 they still equal eager."""
    from twa_scale.twa.quant import _native

    if _native() is None:
        pytest.skip("no C compiler: the native path falls back to eager")
    x = _trajectory(n=70, d=3000)
    blocks = [(0, 1100), (1100, 1103), (1103, 3000)]
    eager, native = (build_basis(x, 0, x.shape[1], blocks, bits=4, layerwise=layerwise, kernels=Kernels(p, 4096))
                     for p in ("eager", "native"))
    assert native.storage.k > 64 and native.storage.side_idx.numel()
    g = torch.randn(x.shape[1])
    theta = eager.theta0 + torch.randn_like(eager.theta0)
    assert _rel(native.project(g), eager.project(g)) < 1e-5
    assert _rel(native.reconstruct(theta) - native.w_start, eager.reconstruct(theta) - eager.w_start) < 1e-5


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_native_fixed_point_keeps_a_non_finite_input_visible(bad):
    """Rounding g to int16 must not turn a NaN or inf gradient into a finite product (nor, in the side
    columns' C loop, a coefficient)."""
    from twa_scale.twa.quant import _native

    if _native() is None:
        pytest.skip("no C compiler: the native path falls back to eager")
    x = _trajectory(n=4, d=3000)
    q = build_basis(x, 0, x.shape[1], BLOCKS, bits=4, layerwise=True, kernels=Kernels("native", 4096))
    g = torch.randn(x.shape[1])
    g[1000] = bad                                      # inside a packed group of block 2
    assert q.storage.gstart.le(1000).any() and not q.project(g)[:, 2].isfinite().any()
    theta = q.theta0 + torch.randn_like(q.theta0)
    theta[1, 2] = bad
    w = q.reconstruct(theta)
    assert not w[701:1500].isfinite().any() and w[:701].isfinite().all()


def test_native_kernels_refuse_inputs_of_the_wrong_size():
    """The C kernels read and write by the slice's sizes: a g, w or theta of another size is a ValueError that
    names it, before any memory outside the tensor is touched."""
    from twa_scale.twa import quant

    if quant._native() is None:
        pytest.skip("no C compiler: the native path falls back to eager")
    x = _trajectory(n=4, d=3000)
    q = build_basis(x, 0, x.shape[1], BLOCKS, bits=4, layerwise=True, kernels=Kernels("native", 4096))
    with pytest.raises(ValueError, match="g has 2999 entries"):
        q.project(torch.randn(2999))
    with pytest.raises(ValueError, match="theta is"):
        q.reconstruct(q.theta0[:, :1].clone())
    with pytest.raises(ValueError, match="out has 10 entries"):
        q.reconstruct(q.theta0, out=torch.empty(10))
    assert q.reconstruct(q.theta0).shape == (3000,)


@pytest.mark.parametrize("bits", [4, 8])
def test_native_kernels_on_torchs_threads_equal_one_thread(bits):
    """The C kernels split the groups over torch's OpenMP pool (torch.set_num_threads): reconstruct is the
    same bit for bit (threads write disjoint columns), project the same to fp32 rounding."""
    from twa_scale.twa.quant import _native

    lib = _native()
    if lib is None:
        pytest.skip("no C compiler: the native path falls back to eager")
    x = _trajectory(n=4, d=400_000)   # >= 3 x 1024 groups of 128 (4 bits) or 64 columns: three threads' worth
    blocks = [(0, 150_000), (150_000, 150_003), (150_003, 400_000)]
    q = build_basis(x, 0, x.shape[1], blocks, bits=bits, layerwise=True, kernels=Kernels("native", 4096))
    g = torch.randn(x.shape[1])
    theta = q.theta0 + torch.randn_like(q.theta0)
    ng = q.storage.gstart.numel()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert lib.twa_kernel_threads(ng) == 1
        c1, w1 = q.project(g), q.reconstruct(theta)
        torch.set_num_threads(3)
        assert lib.twa_kernel_threads(ng) == 3, "the kernel was built without OpenMP, or ignores torch's threads"
        c3, w3 = q.project(g), q.reconstruct(theta)
    finally:
        torch.set_num_threads(threads)
    assert _rel(c3, c1) < 1e-6
    assert torch.equal(w3, w1)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_packed_kernels_on_cuda_equal_eager(bits):
    """On a GPU the stage picks torch.compile (Triton) for packed P: same products as the eager path."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from twa_scale.twa.quant import resolve_kernels

    dev = torch.device("cuda")
    assert resolve_kernels(dev).path == "compile"
    x = _trajectory(d=300_000).to(dev)
    blocks = [(0, 100_000), (100_000, 100_003), (100_003, 300_000)]
    eager = build_basis(x, 0, x.shape[1], blocks, bits=bits, kernels=Kernels("eager", 1 << 15))
    fused = build_basis(x, 0, x.shape[1], blocks, bits=bits, kernels=resolve_kernels(dev))
    g = torch.randn(x.shape[1], device=dev)
    theta = eager.theta0 + torch.randn_like(eager.theta0)
    assert _rel(fused.project(g), eager.project(g)) < 1e-5
    assert _rel(fused.reconstruct(theta) - fused.w_start, eager.reconstruct(theta) - eager.w_start) < 1e-5


def test_growing_basis_equals_the_from_scratch_build():
    """Issue 11's incremental basis: appending snapshots one by one gives build_basis's P, start point
    and products to 1e-6, and drops a nearly dependent snapshot exactly as the full build does."""
    from twa_scale.twa.subspace import GrowingBasis

    x = _trajectory(n=8)
    x = torch.cat([x[:5], (0.5 * x[1] + 0.5 * x[3] + 1e-9 * torch.randn_like(x[0]))[None], x[5:]])
    grow = GrowingBasis(0, x.shape[1])
    added = [grow.append(row) for row in x]
    for n in (4, x.shape[0]):
        ref = build_basis(x[:n], 0, x.shape[1], BLOCKS)
        if n == 4:
            part = GrowingBasis(0, x.shape[1])
            for row in x[:4]:
                part.append(row)
            b = part.basis()
        else:
            b = grow.basis()
        assert b.k == ref.k and b.report["dropped"] == ref.report["dropped"]
        assert _rel(b.dequantized(), ref.dequantized()) < 1e-6
        assert _rel(b.theta0, ref.theta0) < 1e-6 and _rel(b.w_start, ref.w_start) < 1e-6
        g = torch.randn(x.shape[1])
        assert _rel(b.project(g), ref.project(g)) < 1e-6
        theta = ref.theta0 + torch.randn_like(ref.theta0)
        assert _rel(b.reconstruct(theta), ref.reconstruct(theta)) < 1e-6
        assert _rel(b.alpha(theta), ref.alpha(theta)) < 1e-6
    assert added == [True] * 5 + [False] + [True] * 3


def _with_near_duplicates(offset: float):
    """A trajectory of 5 distinct snapshots, then two that moved ``offset`` x its spread (converged SGD)."""
    from twa_scale.twa.subspace import trajectory_spread

    x = _trajectory(n=5)
    spread = trajectory_spread(gram(x))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, x.shape[1], generator=g)
    noise = offset * spread * noise / noise.norm(dim=1, keepdim=True)
    return torch.cat([x, (x[4] + noise[0])[None], (x[4] + noise[0] + noise[1])[None]]), spread


def test_near_duplicate_snapshots_are_dropped_at_the_source():
    """Issue 20: two snapshots 1e-3 x the spread from the last distinct one. With the default spread
    tolerance they leave the basis, the averaging weights a unit move in the span can ask for stay bounded,
    the rank equals numpy's SVD rank at the same tolerance, and the span still holds every distinct snapshot."""
    import numpy as np

    x, spread = _with_near_duplicates(1e-3)
    spread_tol = TwaConfig(snapshot_url="memory://x", run_id="r").rank_spread_tol
    b = build_basis(x, 0, x.shape[1], BLOCKS, spread_tol=spread_tol)
    assert b.report["near_duplicates"] == [5, 6] and b.report["dropped"] == [5, 6] and b.k == 5
    assert b.report["spread_tol"] == spread_tol
    assert b.report["spread"] == pytest.approx(torch.linalg.svdvals(x.double() - x.double().mean(0))[0].item())
    spread = b.report["spread"]  # of all 7 snapshots, the scale the tolerance is measured against
    # reference: numpy's SVD rank of the snapshots, singular values below spread_tol x the spread counted out
    s = np.linalg.svd(x.double().numpy(), compute_uv=False)
    assert np.linalg.matrix_rank(x.double().numpy(), tol=spread_tol * spread) == b.k
    assert s[b.k - 1] > 10 * spread_tol * spread > 10 * s[b.k]  # a clear gap: the near-duplicates' values
    # the span still holds every distinct snapshot; the model's affine subspace through the SWA start holds
    # every snapshot to within the near-duplicates' offset (the start averages them in)
    q = b.dequantized().double()
    for i in range(x.shape[0]):
        w = x[i].double()
        if i < 5:
            assert (w - q.T @ (q @ w)).norm() < 1e-5 * w.norm(), i
        d = w - b.w_start.double()
        assert (d - q.T @ (q @ d)).norm() < 3e-3 * spread, i
    # bounded coefficients: a move of one spread anywhere in the span changes the snapshot weights by at
    # most 1 / spread_tol; without the tolerance the near-duplicates' direction asks for ~1e3
    def worst_alpha(basis):
        return torch.linalg.matrix_norm(basis.M[0], ord=2).item() * spread

    assert worst_alpha(b) < 1 / spread_tol
    loose = build_basis(x, 0, x.shape[1], BLOCKS, spread_tol=0.0)
    assert loose.k == 7 and loose.report["near_duplicates"] == [] and worst_alpha(loose) > 3 / spread_tol
    assert torch.isfinite(b.M).all() and torch.isfinite(b.dequantized()).all()


def test_spread_tolerance_keeps_snapshots_that_moved():
    """Snapshots 5% of the spread apart are a real part of the trajectory: kept."""
    x, _ = _with_near_duplicates(0.05)
    b = build_basis(x, 0, x.shape[1], BLOCKS, spread_tol=0.01)
    assert b.k == 7 and b.report["dropped"] == [] and b.report["near_duplicates"] == []


def test_growing_basis_drops_near_duplicates_as_they_arrive():
    from twa_scale.twa.subspace import GrowingBasis

    x, _ = _with_near_duplicates(1e-3)
    grow = GrowingBasis(0, x.shape[1], spread_tol=0.01)
    assert [grow.append(row) for row in x] == [True] * 5 + [False] * 2
    b = grow.basis()
    ref = build_basis(x, 0, x.shape[1], BLOCKS, spread_tol=0.01)
    assert b.report["near_duplicates"] == [5, 6] and b.k == ref.k
    assert _rel(b.dequantized(), ref.dequantized()) < 1e-6
