"""Column-sharded subspace maths for TWA, as pure tensor functions.

Rank r holds X[:, S_r], the slice S_r of every selected snapshot (n x d_r). Every
quantity that needs the full width D is a sum over ranks of a per-slice partial
product, so it costs one all-reduce of a few floats; the ``reduce`` argument is
that all-reduce (``comm.all_reduce`` in a job, the identity in one process).

Directions are always an explicit linear combination of the snapshots,
P = M X (per coefficient block), so the averaging weights alpha with
w = sum_i alpha_i w_i can be reported exactly whatever the basis.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Sequence

import torch

__all__ = [
    "Reduce", "Piece", "Basis", "QuantizedRows", "identity_reduce", "gram", "sequential_cholesky",
    "orthonormalize", "build_basis", "quantize_rows", "pack_bits", "unpack_bits", "local_pieces",
    "use_compiled_kernels", "GroupedQuant",
]

Reduce = Callable[..., torch.Tensor]  # (tensor, op="sum"|"min"|"max") -> tensor, in place
# Columns processed at once when building/applying the basis: bounds temporaries to
# n * CHUNK floats however wide a rank's slice is.
CHUNK_COLUMNS = 1 << 18


def identity_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The all-reduce of a single process."""
    return t


# --- Gram matrix and Gram-Schmidt in Gram form ---------------------------------------------
def gram(local: torch.Tensor, reduce: Reduce = identity_reduce) -> torch.Tensor:
    """G = X Xᵀ (float64) summed over ranks: one all-reduce of n*n floats.

    Accumulated in float64 because snapshots of one trajectory are nearly
    collinear; fp32 Gram entries would lose the small residuals that decide rank.
    """
    n, d = local.shape
    g = torch.zeros(n, n, dtype=torch.float64, device=local.device)
    for s in range(0, d, CHUNK_COLUMNS):
        x = local[:, s:s + CHUNK_COLUMNS].double()
        g += x @ x.T
    return reduce(g)


def sequential_cholesky(g: torch.Tensor, tol: float) -> tuple[torch.Tensor, list[int], list[float]]:
    """Gram-Schmidt, in Gram form, in the given order, dropping near-dependent vectors.

    Returns (R, kept, residuals): R (k x k) upper triangular with G[kept][:, kept] = RᵀR,
    the kept indices, and each vector's residual norm relative to its own norm
    (what survives after removing the earlier directions). A vector whose relative
    residual is <= tol is dropped instead of normalised, so no NaN/inf can appear.
    """
    n = g.shape[0]
    kept: list[int] = []
    rel: list[float] = []
    r = g.new_zeros(0, 0)
    for i in range(n):
        norm2 = float(g[i, i])
        # coordinates of vector i on the basis so far: solve Rᵀ c = G[kept, i]
        coord = (torch.linalg.solve_triangular(r.T, g[kept, i].unsqueeze(1), upper=False).squeeze(1)
                 if kept else g.new_zeros(0))
        resid2 = norm2 - float(coord @ coord)
        frac = math.sqrt(max(resid2, 0.0) / norm2) if norm2 > 0 else 0.0
        rel.append(frac)
        if frac <= tol:
            continue
        k = len(kept)
        grown = g.new_zeros(k + 1, k + 1)
        grown[:k, :k] = r
        grown[:k, k] = coord
        grown[k, k] = math.sqrt(resid2)
        r = grown
        kept.append(i)
    return r, kept, rel


def _apply(m: torch.Tensor, local: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = M @ X computed in float64 chunks, stored fp32 (M small, X wide)."""
    k, d = m.shape[0], local.shape[1]
    if out is None:
        out = torch.empty(k, d, dtype=torch.float32, device=local.device)
    for s in range(0, d, CHUNK_COLUMNS):
        out[:, s:s + CHUNK_COLUMNS] = (m @ local[:, s:s + CHUNK_COLUMNS].double()).float()
    return out


def orthonormalize(local: torch.Tensor, combo: torch.Tensor, *, reduce: Reduce = identity_reduce,
                   tol: float = 1e-5, g: torch.Tensor | None = None) -> dict:
    """Orthonormal basis of span{combo @ X} by Cholesky-QR twice, in Gram-Schmidt order.

    ``combo`` (m x n, float64) names the vectors to orthonormalise as combinations
    of the snapshots (identity: raw snapshots; I - 11ᵀ/n: centred ones).
    Pass 1 works on the Gram matrix (one n x n all-reduce) and drops vectors whose
    relative residual is <= tol. Pass 2 re-orthogonalises the fp32 result against
    its own Gram matrix (one k x k all-reduce), which removes the rounding left by
    pass 1. Returns {"Q": k x d_r fp32, "M": k x n float64 with Q = M X, "kept",
    "residuals", "dropped"}.
    """
    if g is None:
        g = gram(local, reduce)
    gv = combo @ g @ combo.T
    r1, kept, rel = sequential_cholesky(gv, tol)
    if not kept:
        return {"Q": local.new_zeros(0, local.shape[1]), "M": combo.new_zeros(0, combo.shape[1]),
                "kept": [], "residuals": rel, "dropped": list(range(combo.shape[0]))}
    eye = torch.eye(len(kept), dtype=torch.float64, device=g.device)
    m = torch.linalg.solve_triangular(r1.T, eye, upper=False) @ combo[kept]  # R⁻ᵀ V
    q = _apply(m, local)
    g2 = gram(q, reduce)
    r2 = torch.linalg.cholesky(g2, upper=True)
    t2 = torch.linalg.solve_triangular(r2.T, eye, upper=False)
    m = t2 @ m
    q = _apply_small(t2, q)
    dropped = [i for i in range(combo.shape[0]) if i not in kept]
    return {"Q": q, "M": m, "kept": kept, "residuals": rel, "dropped": dropped}


def _apply_small(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q <- t @ q in place, chunk by chunk (t is k x k, float64)."""
    for s in range(0, q.shape[1], CHUNK_COLUMNS):
        q[:, s:s + CHUNK_COLUMNS] = (t @ q[:, s:s + CHUNK_COLUMNS].double()).float()
    return q


# --- bit packing and quantisation --------------------------------------------------------
def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) along the last dim; 8 codes -> ``bits`` bytes.

    The last dimension is zero-padded to a multiple of 8 first.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    *lead, d = values.shape
    pad = (-d) % 8
    v = values.to(torch.uint8)
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    if bits == 8:
        return v.contiguous()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        per = 8 // bits
        v = v.reshape(*lead, -1, per).to(torch.int32)
        shifts = torch.arange(per, device=v.device, dtype=torch.int32) * bits
        return (v << shifts).sum(-1).to(torch.uint8)
    # 3, 5, 6, 7 bits: 8 codes make a 64-bit word of which `bits` bytes are used
    v = v.reshape(*lead, -1, 8).to(torch.int64)
    word = (v << (torch.arange(8, device=v.device, dtype=torch.int64) * bits)).sum(-1)
    byte_shifts = torch.arange(bits, device=v.device, dtype=torch.int64) * 8
    return ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, -1)


def unpack_bits(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 codes with last dimension ``d``."""
    *lead, nb = packed.shape
    if bits == 8:
        return packed[..., :d]
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
        v = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return v.reshape(*lead, nb * per)[..., :d]
    b = packed.reshape(*lead, -1, bits).to(torch.int64)
    word = (b << (torch.arange(bits, device=packed.device, dtype=torch.int64) * 8)).sum(-1)
    v = (word.unsqueeze(-1) >> (torch.arange(8, device=packed.device, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return v.to(torch.uint8).reshape(*lead, -1)[..., :d]


def _codes_dot(packed: torch.Tensor, g: torch.Tensor, bits: int) -> torch.Tensor:
    """codes @ g straight from packed bytes (bits in 1, 2, 4, 8); g padded to the packed width.

    Written as one elementwise-and-reduce expression so torch.compile fuses the unpack
    into the product: only the packed bytes travel from memory.
    """
    per = 8 // bits
    gv = g.view(-1, per)
    mask = (1 << bits) - 1
    acc = ((packed & mask).float() * gv[:, 0]).sum(1)
    for t in range(1, per):
        acc = acc + (((packed >> (t * bits)) & mask).float() * gv[:, t]).sum(1)
    return acc


def _codes_t_dot(packed: torch.Tensor, a: torch.Tensor, bits: int) -> torch.Tensor:
    """codesᵀ a from packed bytes: the padded-width vector (see :func:`_codes_dot`)."""
    per = 8 // bits
    mask = (1 << bits) - 1
    cols = [(((packed >> (t * bits)) & mask).float() * a[:, None]).sum(0) for t in range(per)]
    return torch.stack(cols, 1).reshape(-1)


EAGER_CHUNK_BYTES = 1 << 14  # per row: k x 16K float temporaries stay in cache


def _codes_dot_eager(packed: torch.Tensor, g: torch.Tensor, bits: int) -> torch.Tensor:
    """Eager form of :func:`_codes_dot`: unpack one code plane of a column chunk at a time
    and hand it to a BLAS matrix-vector product (no fused kernel without torch.compile)."""
    per, mask = 8 // bits, (1 << bits) - 1
    gv = g.view(-1, per)
    acc = torch.zeros(packed.shape[0], dtype=torch.float32, device=packed.device)
    for b0 in range(0, packed.shape[1], EAGER_CHUNK_BYTES):
        pk = packed[:, b0:b0 + EAGER_CHUNK_BYTES]
        for t in range(per):
            plane = pk if bits == 8 else (pk >> (t * bits)) & mask
            acc.addmv_(plane.float(), gv[b0:b0 + EAGER_CHUNK_BYTES, t])
    return acc


def _codes_t_dot_eager(packed: torch.Tensor, a: torch.Tensor, bits: int) -> torch.Tensor:
    per, mask = 8 // bits, (1 << bits) - 1
    out = torch.empty(packed.shape[1], per, dtype=torch.float32, device=packed.device)
    for b0 in range(0, packed.shape[1], EAGER_CHUNK_BYTES):
        pk = packed[:, b0:b0 + EAGER_CHUNK_BYTES]
        for t in range(per):
            plane = pk if bits == 8 else (pk >> (t * bits)) & mask
            torch.mv(plane.float().T, a, out=out[b0:b0 + EAGER_CHUNK_BYTES, t])
    return out.reshape(-1)


_KERNELS: dict[str, Callable] = {"dot": _codes_dot_eager, "t_dot": _codes_t_dot_eager}


def use_compiled_kernels(enabled: bool = True) -> None:
    """Fuse unpack + product with torch.compile (Triton on GPU, C++ on CPU); costs a
    one-off compile of ~10-30 s, worth it for runs longer than a few hundred steps."""
    fusable = {"dot": _codes_dot, "t_dot": _codes_t_dot, "gdot": _grouped_dot, "gt_dot": _grouped_t_dot}
    eager = {"dot": _codes_dot_eager, "t_dot": _codes_t_dot_eager, "gdot": _grouped_dot, "gt_dot": _grouped_t_dot}
    for name, fn in fusable.items():
        _KERNELS[name] = torch.compile(fn, dynamic=True) if enabled else eager[name]


@dataclasses.dataclass
class QuantizedRows:
    """k rows of one column piece, per-row min/max uniform codes of ``bits`` bits."""
    packed: torch.Tensor   # k x ceil(d*bits/8) uint8
    lo: torch.Tensor       # k fp32
    scale: torch.Tensor    # k fp32; value = lo + scale * code
    bits: int
    d: int

    def dequantize(self) -> torch.Tensor:
        codes = unpack_bits(self.packed, self.bits, self.d).to(self.lo.dtype)
        return torch.addcmul(self.lo.unsqueeze(1), codes, self.scale.unsqueeze(1))

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 8 * self.lo.numel()

    @property
    def padded(self) -> int:
        return self.packed.shape[1] * 8 // self.bits

    def dot(self, g: torch.Tensor) -> torch.Tensor:
        """P_piece @ g = scale * (codes @ g) + lo * sum(g), without materialising P."""
        if 8 % self.bits:
            return self.dequantize() @ g
        pad = self.padded - g.numel()
        gp = torch.nn.functional.pad(g, (0, pad)) if pad else g
        return self.scale * _KERNELS["dot"](self.packed, gp, self.bits) + self.lo * g.sum()

    def t_dot(self, a: torch.Tensor) -> torch.Tensor:
        """P_pieceᵀ a = codesᵀ (scale * a) + sum(lo * a)."""
        if 8 % self.bits:
            return self.dequantize().T @ a
        return _KERNELS["t_dot"](self.packed, self.scale * a, self.bits)[: self.d] + (self.lo * a).sum()

    def max_error(self) -> torch.Tensor:
        """Per-row bound: half a quantisation step (plus fp32 rounding of the affine map)."""
        return self.scale / 2 + 1e-6 * (self.lo.abs() + self.scale * ((1 << self.bits) - 1))


def quantize_rows(x: torch.Tensor, bits: int, lo: torch.Tensor | None = None,
                  hi: torch.Tensor | None = None) -> QuantizedRows:
    """Min/max uniform quantisation of each row of ``x`` (k x d) to ``bits`` bits.

    ``lo``/``hi`` default to this piece's row min/max; the caller passes the
    per-(snapshot, block) range when a block is split over several pieces.
    """
    if lo is None:
        lo = x.amin(1)
    if hi is None:
        hi = x.amax(1)
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x - lo.unsqueeze(1)) / safe.unsqueeze(1)).clamp_(0, levels)
    return QuantizedRows(pack_bits(codes, bits), lo.float().clone(), scale.float().clone(), bits, x.shape[1])


# --- whole-slice packed P for global coefficients ---------------------------------------------
def _grouped_dot(pk: torch.Tensor, g8: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, pid: torch.Tensor,
                 bits: int) -> torch.Tensor:
    """sum over groups m of (scale[:, pid_m] * codes_m + lo[:, pid_m]) . g_m  ->  k partial sums.

    ``pk`` (k x M x bits bytes) holds 8 codes per group of 8 columns; written as one
    elementwise-and-reduce expression so torch.compile fuses unpack, dequantisation
    and product into one pass over the packed bytes.
    """
    per, mask = 8 // bits, (1 << bits) - 1
    acc = None
    for t in range(8):
        code = ((pk[:, :, t // per] >> ((t % per) * bits)) & mask).float()
        term = code * g8[:, t]
        acc = term if acc is None else acc + term
    return (acc * scale[:, pid] + lo[:, pid] * g8.sum(1)).sum(1)


def _grouped_t_dot(pk: torch.Tensor, a: torch.Tensor, b: torch.Tensor, pid: torch.Tensor, w8: torch.Tensor,
                   out8: torch.Tensor, bits: int) -> None:
    """out8 = w8 + codesᵀ a[:, pid] + b[pid], group by group (a = scale*delta, b = sum_i lo*delta)."""
    per, mask = 8 // bits, (1 << bits) - 1
    coef = a[:, pid]
    cols = [(((pk[:, :, t // per] >> ((t % per) * bits)) & mask).float() * coef).sum(0) for t in range(8)]
    out8.copy_(w8 + torch.stack(cols, 1) + b[pid].unsqueeze(1))


_KERNELS["gdot"] = _grouped_dot
_KERNELS["gt_dot"] = _grouped_t_dot


def chunk_groups(device: torch.device) -> int:
    """Groups of 8 columns per kernel call: small enough that a chunk of g stays in cache
    while all k rows use it, large enough that launches do not dominate."""
    env = os.environ.get("TWA_CHUNK_COLUMNS")
    if env:
        return max(1, int(env) // 8)
    return (1 << 19) if device.type == "cuda" else (1 << 15)


@dataclasses.dataclass
class GroupedQuant:
    """P[:, S_r] packed as one matrix: groups of 8 columns, each group inside one layer block,
    with that (direction, block)'s min/max range. Groups that straddle a block boundary
    (at most one per boundary) and the <8-column tail are quantised the same way but kept
    dequantised in a small fp32 side matrix ("mixed" columns), so the kernels see one range
    per group."""
    packed: torch.Tensor      # k x (M * bits) uint8
    pid: torch.Tensor         # M int32: local block id of each group; nb = dummy (mixed group)
    lo: torch.Tensor          # k x (nb + 1) fp32 (dummy column 0)
    scale: torch.Tensor       # k x (nb + 1) fp32 (dummy column 0)
    mixed_idx: torch.Tensor   # int64 columns kept in fp32
    mixed: torch.Tensor       # k x len(mixed_idx) fp32
    bits: int
    d: int
    runs: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (g0, g1, block) pure runs
    mixed_block: torch.Tensor | None = None  # local block id of each edge column (for the error bound)

    @property
    def groups(self) -> int:
        return self.pid.numel()

    @property
    def nbytes(self) -> int:
        return (self.packed.numel() + self.pid.numel() * self.pid.element_size()
                + 4 * (self.lo.numel() + self.scale.numel() + self.mixed.numel()) + 8 * self.mixed_idx.numel())

    @classmethod
    def build(cls, q: torch.Tensor, pieces: Sequence["Piece"], lo_blk: torch.Tensor, hi_blk: torch.Tensor,
              bits: int) -> "GroupedQuant":
        k, d = q.shape
        dev = q.device
        m_groups = d // 8
        used = sorted({p.block for p in pieces})
        local = {b: i for i, b in enumerate(used)}
        nb, levels = len(used), (1 << bits) - 1
        lo = torch.zeros(k, nb + 1, dtype=torch.float32, device=dev)
        scale = torch.zeros_like(lo)
        if nb:
            lo[:, :nb] = lo_blk[:, used]
            scale[:, :nb] = (hi_blk[:, used] - lo_blk[:, used]) / levels
        col_id = torch.empty(d, dtype=torch.int64, device=dev)
        for p in pieces:
            col_id[p.lo:p.hi] = local[p.block]
        first, last = col_id[: 8 * m_groups: 8], col_id[7: 8 * m_groups: 8]
        pure = first == last
        pid = torch.where(pure, first, torch.full_like(first, nb)).to(torch.int32)  # 0.5 byte per column
        packed = torch.empty(k, m_groups * bits, dtype=torch.uint8, device=dev)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        step = chunk_groups(dev)
        for g0 in range(0, m_groups, step):
            g1 = min(g0 + step, m_groups)
            cols = col_id[8 * g0: 8 * g1]
            x = q[:, 8 * g0: 8 * g1]
            codes = torch.round((x - lo[:, cols]) / safe[:, cols]).clamp_(0, levels)
            codes.view(k, g1 - g0, 8)[:, ~pure[g0:g1]] = 0
            packed[:, g0 * bits: g1 * bits] = pack_bits(codes, bits)
        mixed_groups = torch.nonzero(~pure).squeeze(1)
        mixed_idx = torch.cat([(8 * mixed_groups.unsqueeze(1) + torch.arange(8, device=dev)).reshape(-1),
                               torch.arange(8 * m_groups, d, device=dev)])
        runs = cls.block_runs(pid, nb, step)
        # edge columns are quantised like all others (a code depends only on its block's range),
        # only stored dequantised: the effective P is the same for every world size and grouping
        cid = col_id[mixed_idx]
        codes = torch.round((q[:, mixed_idx] - lo[:, cid]) / safe[:, cid]).clamp_(0, levels)
        mixed = lo[:, cid] + scale[:, cid] * codes
        return cls(packed, pid, lo, scale, mixed_idx, mixed, bits, d, runs, cid)

    @staticmethod
    def block_runs(pid: torch.Tensor, dummy: int, step: int) -> list[tuple[int, int, int]]:
        """Maximal runs of groups of one block, cut to ``step`` groups: the per-run kernels need no gather."""
        m = pid.numel()
        if m == 0:
            return []
        edges = (torch.nonzero(pid[1:] != pid[:-1]).squeeze(1) + 1).tolist()
        starts, stops = [0] + edges, edges + [m]
        values = pid[torch.tensor(starts, dtype=torch.long, device=pid.device)].tolist()
        runs = []
        for a, b, v in zip(starts, stops, values):
            if v != dummy:
                runs += [(g0, min(g0 + step, b), v) for g0 in range(a, b, step)]
        return runs

    @staticmethod
    def _use_gather_kernel(device: torch.device) -> bool:
        """One gather kernel per chunk suits GPUs (few launches, the range table sits in cache);
        per-run kernels suit CPUs (no gathers). TWA_GROUPED_KERNEL=gather|runs overrides."""
        choice = os.environ.get("TWA_GROUPED_KERNEL")
        return choice == "gather" if choice else device.type == "cuda"

    def dequantize(self) -> torch.Tensor:
        """The effective P (k x d fp32), for checks."""
        m8 = 8 * self.groups
        codes = unpack_bits(self.packed, self.bits, m8).float()
        cols = self.pid.repeat_interleave(8)
        out = torch.empty(self.packed.shape[0], self.d, dtype=torch.float32, device=self.packed.device)
        out[:, :m8] = self.lo[:, cols] + self.scale[:, cols] * codes
        out[:, self.mixed_idx] = self.mixed
        return out

    def max_error(self) -> torch.Tensor:
        """Per-entry bound (k x d): half a quantisation step of its (direction, block)."""
        m8 = 8 * self.groups
        cols = self.pid.repeat_interleave(8)
        out = torch.zeros(self.packed.shape[0], self.d, dtype=torch.float32, device=self.packed.device)
        levels = (1 << self.bits) - 1
        out[:, :m8] = self.scale[:, cols] / 2 + 1e-6 * (self.lo[:, cols].abs() + self.scale[:, cols] * levels)
        if self.mixed_block is None:
            out[:, self.mixed_idx] = 0
        else:
            mb = self.mixed_block
            out[:, self.mixed_idx] = self.scale[:, mb] / 2 + 1e-6 * (self.lo[:, mb].abs() + self.scale[:, mb] * levels)
        return out

    def dot(self, g: torch.Tensor) -> torch.Tensor:
        """P g (k,) in chunks of groups; only packed bytes and g are read."""
        k = self.packed.shape[0]
        pk = self.packed.view(k, self.groups, self.bits)
        g8 = g[: 8 * self.groups].view(self.groups, 8)
        out = self.mixed @ g[self.mixed_idx]
        if not self._use_gather_kernel(g.device):
            pk2 = self.packed
            for g0, g1, b in self.runs:
                gr = g[8 * g0: 8 * g1]
                out += (self.scale[:, b] * _KERNELS["dot"](pk2[:, g0 * self.bits: g1 * self.bits], gr, self.bits)
                        + self.lo[:, b] * gr.sum())
            return out
        step = chunk_groups(g.device)
        for g0 in range(0, self.groups, step):
            g1 = min(g0 + step, self.groups)
            out += _KERNELS["gdot"](pk[:, g0:g1], g8[g0:g1], self.scale, self.lo, self.pid[g0:g1], self.bits)
        return out

    def reconstruct(self, w_start: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = w_start + Pᵀ delta."""
        k = self.packed.shape[0]
        pk = self.packed.view(k, self.groups, self.bits)
        a = self.scale * delta.unsqueeze(1)
        b = (self.lo * delta.unsqueeze(1)).sum(0)
        m8 = 8 * self.groups
        if not self._use_gather_kernel(out.device):
            out.copy_(w_start)  # mixed groups (codes 0) keep w_start until the fp32 fix-up below
            for g0, g1, blk in self.runs:
                out[8 * g0: 8 * g1] += (_KERNELS["t_dot"](self.packed[:, g0 * self.bits: g1 * self.bits],
                                                          a[:, blk], self.bits) + b[blk])
            out[self.mixed_idx] = w_start[self.mixed_idx] + self.mixed.T @ delta
            return out
        w8, o8 = w_start[:m8].view(self.groups, 8), out[:m8].view(self.groups, 8)
        step = chunk_groups(out.device)
        for g0 in range(0, self.groups, step):
            g1 = min(g0 + step, self.groups)
            _KERNELS["gt_dot"](pk[:, g0:g1], a, b, self.pid[g0:g1], w8[g0:g1], o8[g0:g1], self.bits)
        out[self.mixed_idx] = w_start[self.mixed_idx] + self.mixed.T @ delta
        return out


# --- the basis a rank holds -------------------------------------------------------------------
@dataclasses.dataclass
class Piece:
    """A run of local columns [lo, hi) inside one layer block."""
    lo: int
    hi: int
    block: int        # index into the layer blocks (quantisation range)
    coef: int         # coefficient column (0 in global mode, == block in layer-wise mode)


def local_pieces(blocks: Sequence[tuple[int, int]], start: int, stop: int, layerwise: bool,
                 max_columns: int = CHUNK_COLUMNS) -> list[Piece]:
    """Cut [start, stop) along layer-block boundaries, then into runs of <= max_columns."""
    out = []
    for b, (bs, be) in enumerate(blocks):
        lo, hi = max(bs, start), min(be, stop)
        for s in range(lo, hi, max_columns):
            out.append(Piece(s - start, min(s + max_columns, hi) - start, b, b if layerwise else 0))
    return out


@dataclasses.dataclass
class Basis:
    """P[:, S_r] in the chosen precision, and how it relates to the snapshots.

    Weights are w = w_start + sum_{i,l} (theta - theta0)[i, l] * P_{i,l}: at theta = theta0
    the model is exactly at the start point in every precision.
    """
    pieces: list[Piece]
    num_coef_blocks: int            # L (1 in global mode)
    k: int                          # number of directions
    M: torch.Tensor                 # L x k x n float64: P_l = M_l X_l
    theta0: torch.Tensor            # k x L float64: coordinates of the start point
    alpha_start: torch.Tensor       # n float64: w_start = sum alpha_start_i w_i
    w_start: torch.Tensor           # d_r fp32
    dense: torch.Tensor | None      # k x d_r (fp32 or fp16) when not quantised
    quant: list[QuantizedRows] | None
    bits: int
    report: dict
    grouped: GroupedQuant | None = None   # global coefficients, packed P (1/2/4/8 bits)

    # -- per-step operations ---------------------------------------------------------------
    def _rows(self, piece_index: int, dtype: torch.dtype) -> torch.Tensor:
        if self.quant is not None:
            return self.quant[piece_index].dequantize()
        p = self.pieces[piece_index]
        return self.dense[:, p.lo:p.hi].to(dtype)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """c[i, l] = sum over this slice's columns of block l of P[i, j] g[j]  (k x L)."""
        if self.grouped is not None:
            return self.grouped.dot(g).unsqueeze(1)
        if self.quant is None and self.num_coef_blocks == 1 and self.dense.dtype == torch.float32:
            return torch.mv(self.dense, g).unsqueeze(1)
        out = torch.zeros(self.k, self.num_coef_blocks, dtype=torch.float32, device=g.device)
        for j, p in enumerate(self.pieces):
            if self.quant is not None:
                out[:, p.coef] += self.quant[j].dot(g[p.lo:p.hi])
            else:
                out[:, p.coef] += torch.mv(self._rows(j, g.dtype), g[p.lo:p.hi])
        return out

    def reconstruct(self, theta: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """w[S_r] = w_start + Pᵀ (theta - theta0) per block, written into ``out``."""
        # coefficients stay float64 (they are few); the wide product runs in fp32
        delta = (theta.detach().double() - self.theta0).to(torch.float32)
        if out is None:
            out = torch.empty_like(self.w_start)
        if self.grouped is not None:
            return self.grouped.reconstruct(self.w_start, delta[:, 0], out)
        if self.quant is None and self.num_coef_blocks == 1 and self.dense.dtype == torch.float32:
            return torch.addmv(self.w_start, self.dense.T, delta[:, 0], out=out)
        out.copy_(self.w_start)
        for j, p in enumerate(self.pieces):
            if self.quant is not None:
                out[p.lo:p.hi] += self.quant[j].t_dot(delta[:, p.coef])
            else:
                out[p.lo:p.hi].addmv_(self._rows(j, out.dtype).T, delta[:, p.coef])
        return out

    def alpha(self, theta: torch.Tensor) -> torch.Tensor:
        """Averaging weights A (n x L): block l of w is sum_i A[i, l] w_{i,l}.

        Exact for fp32 P; for quantised P it is the weighting of the unquantised directions.
        """
        delta = (theta.detach().double() - self.theta0.double())
        return self.alpha_start.unsqueeze(1) + torch.einsum("lkn,kl->nl", self.M, delta)

    def dequantized(self) -> torch.Tensor:
        """The effective P[:, S_r] (k x d fp32) whatever the storage, for checks."""
        if self.grouped is not None:
            return self.grouped.dequantize()
        if self.quant is not None:
            return torch.cat([q.dequantize() for q in self.quant], 1)
        return self.dense.float()

    def max_error(self) -> torch.Tensor:
        """Per-entry quantisation bound (k x d): |P_stored - P| <= bound."""
        if self.grouped is not None:
            return self.grouped.max_error()
        if self.quant is not None:
            return torch.cat([q.max_error().unsqueeze(1).expand(-1, q.d) for q in self.quant], 1)
        return torch.zeros(self.k, self.w_start.numel(), device=self.w_start.device)

    @property
    def nbytes(self) -> int:
        if self.grouped is not None:
            return self.grouped.nbytes
        if self.quant is not None:
            return sum(q.nbytes for q in self.quant)
        return self.dense.numel() * self.dense.element_size()


def build_basis(local: torch.Tensor, start: int, stop: int, blocks: Sequence[tuple[int, int]], *,
                directions: str = "raw", layerwise: bool = False, bits: int = 32,
                alpha_start: torch.Tensor | None = None, reduce: Reduce = identity_reduce,
                tol: float = 1e-5, max_columns: int = CHUNK_COLUMNS) -> Basis:
    """Build this rank's P[:, S_r] from its snapshot slice ``local`` (n x d_r fp32).

    - global coefficients: an orthonormal basis (Cholesky-QR twice) of the raw or
      centred snapshots (the paper's Gram-Schmidt basis, in its order);
    - layer-wise: each (direction, block) normalised to unit norm (the journal's
      per-layer coefficients); zero blocks get a zero direction, never NaN.
    ``blocks`` are the layer blocks over [0, D); ``alpha_start`` the start point as
    snapshot weights (default: uniform, the SWA mean).
    Collective calls: one n x n all-reduce (+ k x k, or n x L for layer-wise).
    Raises ValueError when the snapshots span fewer than 2 dimensions.
    """
    if directions not in ("raw", "centered"):
        raise ValueError(f"--directions must be raw or centered, got {directions!r}")
    if bits not in (32, 16) and not 1 <= bits <= 8:
        raise ValueError(f"--p-bits must be 32, 16 or 1..8, got {bits}")
    n, d = local.shape
    dev = local.device
    if alpha_start is None:
        alpha_start = torch.full((n,), 1.0 / n, dtype=torch.float64)
    alpha_start = alpha_start.double().to(dev)
    pieces = local_pieces(blocks, start, stop, layerwise, max_columns)
    g = gram(local, reduce)
    eye = torch.eye(n, dtype=torch.float64, device=dev)
    raw = sequential_cholesky(g, tol)
    rank_raw = len(raw[1])
    report = {"n": n, "rank_raw": rank_raw, "residuals_raw": [round(x, 9) for x in raw[2]], "tol": tol}
    if rank_raw <= 1:
        raise ValueError(f"the {n} selected snapshots span a space of dimension {rank_raw} "
                         f"(relative residuals {report['residuals_raw']}); TWA needs at least 2 "
                         "independent snapshots - are they identical?")
    combo = eye if directions == "raw" else eye - 1.0 / n
    # the start point in float64, rounded once: --epochs 0 then returns the SWA mean exactly
    w_start = torch.empty(d, dtype=torch.float32, device=dev)
    uniform = bool((alpha_start == alpha_start[0]).all())
    for c0 in range(0, d, max_columns):
        chunk = local[:, c0:c0 + max_columns].double()
        # uniform weights as sum / n: the same rounding as the natural SWA reference mean(0)
        w_start[c0:c0 + max_columns] = (chunk.sum(0) / n if uniform else alpha_start @ chunk).float()
    a_dir = alpha_start if directions == "raw" else alpha_start - 1.0 / n

    if not layerwise:
        res = orthonormalize(local, combo, reduce=reduce, tol=tol, g=g)
        q, m = res["Q"], res["M"]
        k = q.shape[0]
        if k == 0:
            raise ValueError("no independent direction left after centring: the snapshots are identical")
        theta0 = (m @ g @ a_dir).unsqueeze(1)  # coordinates of (w_start - base) on Q
        report.update(kept=res["kept"], dropped=res["dropped"], residuals=[round(x, 9) for x in res["residuals"]])
        num_l, m_all = 1, m.unsqueeze(0)
    else:
        num_l = len(blocks)
        k = n
        v = _apply(combo, local) if directions == "centered" else local.clone()
        norms2 = torch.zeros(n, num_l, dtype=torch.float64, device=dev)
        for p in pieces:
            norms2[:, p.block] += v[:, p.lo:p.hi].double().pow(2).sum(1)
        norms2 = reduce(norms2)
        norms = norms2.sqrt()
        inv = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
        for p in pieces:
            v[:, p.lo:p.hi] *= inv[:, p.block].float().unsqueeze(1)
        q = v
        theta0 = a_dir.unsqueeze(1) * norms                   # exact: w_start - base = sum a_i w_i per block
        m_all = inv.T.unsqueeze(2) * combo.unsqueeze(0)         # M_l = diag(1/norm_l) combo
        zero_blocks = int((norms == 0).sum())
        report.update(kept=list(range(n)), dropped=[], zero_blocks=zero_blocks)
    report.update(k=k, num_coef_blocks=num_l, directions=directions, bits=bits)

    dense, quant, grouped = None, None, None
    if bits == 32:
        dense = q
    elif bits == 16:
        dense = q.half()
    else:
        # per-(direction, block) ranges: min/max over the whole block, all ranks
        lo = torch.full((k, len(blocks)), math.inf, dtype=torch.float32, device=dev)
        hi = torch.full((k, len(blocks)), -math.inf, dtype=torch.float32, device=dev)
        for p in pieces:
            lo[:, p.block] = torch.minimum(lo[:, p.block], q[:, p.lo:p.hi].amin(1))
            hi[:, p.block] = torch.maximum(hi[:, p.block], q[:, p.lo:p.hi].amax(1))
        # every rank must quantise a block with the same range, so min/max are all-reduced
        lo, hi = reduce(lo, op="min"), reduce(hi, op="max")
        if not layerwise and 8 % bits == 0:
            # one packed matrix for the whole slice: a few kernel calls per step, not one per layer
            grouped = GroupedQuant.build(q, pieces, lo, hi, bits)
        else:
            quant = [quantize_rows(q[:, p.lo:p.hi], bits, lo[:, p.block], hi[:, p.block]) for p in pieces]
        del q
    return Basis(pieces=pieces, num_coef_blocks=num_l, k=k, M=m_all, theta0=theta0,
                 alpha_start=alpha_start, w_start=w_start, dense=dense, quant=quant, bits=bits, report=report,
                 grouped=grouped)

