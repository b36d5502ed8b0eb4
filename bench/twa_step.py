"""Per-step cost of the TWA projection: our column-sharded code against the authors' style.

    python bench/twa_step.py                  # ResNet-50's D, n in {25,50,100}, W in {1,2,4}, fp32 and 4-bit P
    python bench/twa_step.py --quick          # small D, a minute on a laptop CPU
    python bench/twa_step.py --out bench/out/twa_step.json
    python bench/twa_step.py --bits 32 4 2 1 8 --n 25 50 --world 4   # every packed width

One process simulates rank 0 of W ranks (rank 0's share of the work; all ranks do the
same amount). Timed per step, on the device this runs on (CUDA when available):
  ours:    c = P[:, S_r] g[S_r]  and  w[S_r] = w_start + P[:, S_r]ᵀ (theta - theta0), through
           twa_scale.twa.subspace.Basis (the code the solver runs), fp32 or packed 1/2/4/8-bit P
           through the kernel path the stage would pick (`--kernel`, recorded as `p_kernels`);
  authors: the released code's pattern: concatenate the full gradient, c = P_r g, Pᵀ_r c,
           clone the result back into every parameter's .grad (P_r: n/W rows of P, full D).
Reported: ms per step, the memory floor 2·n·d·bytes ÷ measured copy bandwidth (d = D/W),
the ratio to the floor (also against a floor that counts the d-length vectors g, w_start and
out, which every step must move too), the speed-up over the authors' style and over fp32 P
at the same n and W (also timed interleaved: one fp32 step, one packed step, per round; the median
of the per-round ratios is the figure the goal reads), peak memory, the machine's load average, and the bytes
each scheme communicates per step on top of the data-parallel gradient reduction
(ours: an all-reduce of n floats; authors': an all-reduce of D floats).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twa_scale.twa.quant import (TILE_BYTES, DenseP, GroupedP, Kernels, native_simd_bits,  # noqa: E402
                                  resolve_kernels)
from twa_scale.twa.subspace import Basis  # noqa: E402

RESNET50_D = 25_557_032


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev: torch.device, reps: int, warmup: int = 2) -> float:
    """Seconds per call: the median of ``reps`` (or the minimum, with --stat min)."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        t0 = _CLOCK()
        fn()
        _sync(dev)
        times.append(_CLOCK() - t0)
    times.sort()
    return times[0] if _STAT == "min" else times[len(times) // 2]


_STAT = "median"  # --stat: min suits a shared host (it drops the reps a neighbour's burst slowed down)
# --clock thread: this thread's CPU time (one CPU thread: time slices lost to neighbours don't count)
_CLOCK = time.perf_counter


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def copy_bandwidth(dev: torch.device, nbytes: int, reps: int) -> float:
    """Bytes moved per second by a device copy (read + write counted, like the floor's 2·n·d·bytes)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * nbytes / _time(lambda: dst.copy_(src), dev, reps)


class _Peak:
    """Peak memory of one measured section: CUDA allocator peak, or the process high-water mark on Linux."""

    def __init__(self, dev: torch.device):
        self.dev = dev

    def __enter__(self):
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.base = torch.cuda.memory_allocated(self.dev)
        else:
            try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        return self

    def bytes(self) -> int:
        if self.dev.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.dev))
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return -1

    def __exit__(self, *exc):
        return False


def _param_shapes(D: int) -> list[tuple[int, ...]]:
    """ResNet-50's parameter shapes (scaled down to about D parameters for --quick)."""
    import torchvision

    shapes = [tuple(p.shape) for p in torchvision.models.resnet50().parameters()]
    if D == RESNET50_D:
        return shapes
    total, out = 0, []
    for s in shapes:  # keep the tensor count, shrink the largest dim
        n = math.prod(s)
        keep = max(1, round(n * D / RESNET50_D))
        out.append((keep,))
        total += keep
    out[-1] = (out[-1][0] + D - total,) if out[-1][0] + D - total > 0 else out[-1]
    return out


def _blocks(shapes) -> list[tuple[int, int]]:
    blocks, off = [], 0
    for s in shapes:
        n = math.prod(s)
        blocks.append((off, off + n))
        off += n
    return blocks


def _basis(buf: torch.Tensor, n: int, d: int, blocks, bits: int, dev: torch.device, kernels: Kernels) -> Basis:
    """A Basis over rank 0's slice [0, d) with synthetic P (values do not change the cost)."""
    storage = (DenseP(buf[: n * d].view(n, d)) if bits == 32
               else _grouped(buf, n, d, blocks, bits, dev, kernels))
    return Basis(num_coef_blocks=1, k=n, M=torch.zeros(1, n, n, dtype=torch.float64),
                 theta0=torch.zeros(n, 1, dtype=torch.float64, device=dev),
                 alpha_start=torch.zeros(n, dtype=torch.float64), w_start=torch.randn(d, device=dev),
                 storage=storage, bits=bits, report={})


def _grouped(buf: torch.Tensor, n: int, d: int, blocks, bits: int, dev: torch.device, kernels: Kernels) -> GroupedP:
    """The solver's packed-P layout (GroupedP) with synthetic codes: full groups of 64*8/bits
    columns inside each block are packed, the rest of a block stays fp32, as GroupedP.build does."""
    gsize = TILE_BYTES * 8 // bits
    starts, pids, side = [], [], []
    local = [(max(b0, 0), min(b1, d)) for b0, b1 in blocks if b0 < d]
    for i, (b0, b1) in enumerate(local):
        full = (b1 - b0) // gsize
        starts.append(torch.arange(full, device=dev) * gsize + b0)
        pids.append(torch.full((full,), i, dtype=torch.int64, device=dev))
        side.append(torch.arange(b0 + full * gsize, b1, device=dev))
    gstart, pid, side_idx = torch.cat(starts), torch.cat(pids), torch.cat(side)
    nb, ng = len(local), gstart.numel()
    side_blk = torch.bucketize(side_idx, torch.tensor([b1 for _, b1 in local], device=dev), right=True)
    packed = buf.view(torch.uint8)[: ng * n * TILE_BYTES].view(ng, n, TILE_BYTES)
    lo = torch.rand(n, nb, device=dev) - 0.5
    scale = torch.rand(n, nb, device=dev) * 1e-3
    return GroupedP(packed, gstart, pid, torch.zeros(nb, dtype=torch.int64, device=dev), lo, scale, side_idx,
                    side_blk, torch.randn(n, side_idx.numel(), device=dev), bits, d, 1, kernels)


def _run_ours(n: int, d: int, bits: int, blocks, dev: torch.device, reps: int,
              kernels: Kernels) -> tuple[float, int, int]:
    """Seconds per step of our projection + reconstruction, peak bytes, bytes of P."""
    with _Peak(dev) as peak:
        basis = _basis(_p_buffer(n, d, bits, dev), n, d, blocks, bits, dev, kernels)
        t = _time(_step(basis, n, d, dev), dev, reps)
        return t, peak.bytes(), basis.nbytes


def _p_buffer(n: int, d: int, bits: int, dev: torch.device) -> torch.Tensor:
    nbytes = n * d * bits // 8 + n * TILE_BYTES if bits < 32 else n * d * 4
    buf = torch.empty(max(nbytes // 4 + 1, 1), dtype=torch.float32, device=dev)
    # constant fills: fast at GB sizes, and no denormals/NaN to distort CPU timings
    if bits == 32:
        buf.fill_(0.01)
    else:
        buf.view(torch.uint8).fill_(0x5A)
    return buf


def _step(basis: Basis, n: int, d: int, dev: torch.device):
    """One TWA step on this rank's slice: project, (all-reduce of n floats), reconstruct."""
    g = torch.randn(d, device=dev)
    w = torch.empty(d, device=dev)
    theta = torch.randn(n, 1, dtype=torch.float64, device=dev)

    def ours():
        c = basis.project(g)
        # (all-reduce of the n floats of c happens here in a job)
        basis.reconstruct(theta + c.double() * 1e-3, out=w)
    return ours


def paired_speedup(n: int, d: int, bits: int, blocks, dev: torch.device, reps: int, kernels: Kernels) -> dict:
    """fp32 P against ``bits`` P at the same n and W, timed in alternation (one step of each per round,
    2 warm-up rounds): the median and the min of the per-round ratios, so a neighbour's burst on a shared
    host slows both sides of a pair alike."""
    steps = [_step(_basis(_p_buffer(n, d, b, dev), n, d, blocks, b, dev, kernels), n, d, dev) for b in (32, bits)]
    ratios = []
    for r in range(reps + 2):
        t = []
        for fn in steps:
            _sync(dev)
            t0 = _CLOCK()
            fn()
            _sync(dev)
            t.append(_CLOCK() - t0)
        if r >= 2:
            ratios.append(t[0] / t[1])
    ratios.sort()
    return {"speedup_vs_fp32_interleaved_median": ratios[len(ratios) // 2],
            "speedup_vs_fp32_interleaved_min": ratios[0], "interleaved_rounds": len(ratios)}


def _run_authors(rows: int, D: int, shapes, dev: torch.device, reps: int) -> tuple[float, int]:
    """The released code's pattern (fp32 P only; they have no quantised P)."""
    with _Peak(dev) as peak:
        p_rows = torch.full((rows, D), 0.01, device=dev)
        grads = [torch.randn(s, device=dev) for s in shapes]
        holders = [torch.zeros(s, device=dev) for s in shapes]

        def authors():
            gf = torch.cat([x.reshape(-1) for x in grads])
            c = p_rows @ gf
            pg = p_rows.T @ c
            # (all-reduce of the D floats of pg happens here in a job)
            off = 0
            for h, s in zip(holders, shapes):
                k = math.prod(s)
                h.grad = pg[off: off + k].view(s).clone()
                off += k

        return _time(authors, dev, reps), peak.bytes()


def bench_config(n: int, world: int, bits: int, D: int, shapes, dev: torch.device, reps: int,
                 kernels: Kernels) -> dict:
    d = -(-D // world)
    rows = max(1, n // world)          # authors: n/W rows of P per rank, full width D
    blocks = _blocks(shapes)
    elem_bytes = 4 if bits == 32 else bits / 8
    row = {"n": n, "world": world, "p_bits": bits, "D": D, "d_per_rank": d}

    # the host may be shared: the floor uses a copy bandwidth measured next to this config, at P's size
    bw = copy_bandwidth(dev, int(min(1 << 30, max(n * d * elem_bytes, 64 << 20))), reps)
    row["copy_bandwidth_GBps"] = bw / 1e9
    # each side runs in its own function so its buffers are freed before the other allocates
    t_ours, row["ours_peak_bytes"], row["ours_p_bytes"] = _run_ours(n, d, bits, blocks, dev, reps, kernels)
    t_auth, row["authors_peak_bytes"] = _run_authors(rows, D, shapes, dev, reps)
    floor = 2 * n * d * elem_bytes / bw
    floor_vectors = (2 * n * d * elem_bytes + 12 * d) / bw   # + read g, read w_start, write out
    row.update(
        ours_ms=1e3 * t_ours, authors_ms=1e3 * t_auth, floor_ms=1e3 * floor,
        ours_over_floor=t_ours / floor, speedup_vs_authors=t_auth / t_ours,
        floor_with_vectors_ms=1e3 * floor_vectors, ours_over_floor_with_vectors=t_ours / floor_vectors,
        ours_comm_bytes_per_step=4 * n, authors_comm_bytes_per_step=4 * D,
    )
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small D (2M), n in {25, 50}, W in {1, 2}")
    ap.add_argument("--D", type=int, default=None, help=f"parameters (default ResNet-50's {RESNET50_D})")
    ap.add_argument("--n", type=int, nargs="+", default=None)
    ap.add_argument("--world", type=int, nargs="+", default=None)
    ap.add_argument("--bits", type=int, nargs="+", default=[32, 4])
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--max-p-gb", type=float, default=None,
                    help="skip configs whose fp32 P share exceeds this (default: 3 on CPU, none on GPU)")
    ap.add_argument("--kernel", choices=["auto", "native", "compile", "eager"], default="auto",
                    help="packed-P kernel path (auto: what the TWA stage picks: C on CPU, torch.compile on CUDA)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default 1 on CPU: on a shared 2-core host, OpenMP barriers stall for "
                         "whole time slices when a sibling process holds a core)")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="statistic over the reps (min: for a shared host; the copy bandwidth uses it too)")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: time.thread_time, for a time-shared CPU host (needs --threads 1, the CPU default)")
    ap.add_argument("--pair-rounds", type=int, default=15,
                    help="rounds of the interleaved fp32-vs-packed pairs (the speed-up's median is over these)")
    ap.add_argument("--out", default="bench/out/twa_step.json")
    args = ap.parse_args(argv)
    global _STAT, _CLOCK
    _STAT = args.stat
    if args.clock == "thread":
        if torch.cuda.is_available() or (args.threads or 1) != 1:
            ap.error("--clock thread: needs one CPU thread (no CUDA, --threads 1)")
        _CLOCK = time.thread_time

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if args.threads or dev.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    D = args.D or (2_000_000 if args.quick else RESNET50_D)
    ns = args.n or ([25, 50] if args.quick else [25, 50, 100])
    worlds = args.world or ([1, 2] if args.quick else [1, 2, 4])
    reps = args.reps or (3 if dev.type == "cpu" else 20)
    max_p = args.max_p_gb if args.max_p_gb is not None else (3.0 if dev.type == "cpu" else float("inf"))
    shapes = _param_shapes(D)
    if args.kernel != "auto":
        os.environ["TWA_SCALE_P_KERNEL"] = args.kernel
    kernels = resolve_kernels(dev)   # compiled (if so) on first use: the warm-up calls of the first config
    load_before = os.getloadavg()
    bw = copy_bandwidth(dev, min(1 << 30, max(4 * D, 256 << 20)), reps)
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else cpu_name()}),"
          f" D={D}, copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)

    rows, skipped = [], []
    for bits in args.bits:
        for n in ns:
            for world in worlds:
                p_gb = n * D / world * 4 / 1e9
                if p_gb > max_p:
                    skipped.append({"n": n, "world": world, "p_bits": bits, "reason": f"fp32 P share {p_gb:.1f} GB"})
                    continue
                r = bench_config(n, world, bits, D, shapes, dev, reps, kernels)
                rows.append(r)
                print(f"bits {bits:>2} n {n:>3} W {world}: ours {r['ours_ms']:8.2f} ms (floor {r['floor_ms']:7.2f},"
                      f" x{r['ours_over_floor']:.2f})  authors {r['authors_ms']:8.2f} ms  speed-up "
                      f"{r['speedup_vs_authors']:.2f}  comm {r['ours_comm_bytes_per_step']} B vs "
                      f"{r['authors_comm_bytes_per_step'] / 1e6:.0f} MB", flush=True)

    # per-rank time against W (ours): should fall as 1/W
    scaling = []
    for bits in args.bits:
        for n in ns:
            base = next((r for r in rows if r["n"] == n and r["p_bits"] == bits and r["world"] == min(worlds)), None)
            for r in rows:
                if base and r["n"] == n and r["p_bits"] == bits and r["world"] != base["world"]:
                    scaling.append({"n": n, "p_bits": bits, "world": r["world"], "vs_world": base["world"],
                                    "time_ratio": base["ours_ms"] / r["ours_ms"],
                                    "ideal": r["world"] / base["world"]})
    fp32 = [r for r in rows if r["p_bits"] == 32]
    q4 = [r for r in rows if r["p_bits"] == 4]
    for r in rows:
        same = next((f for f in fp32 if (f["n"], f["world"]) == (r["n"], r["world"])), None)
        if same and r["p_bits"] != 32:
            r["speedup_vs_fp32_same_n"] = same["ours_ms"] / r["ours_ms"]
            r.update(paired_speedup(r["n"], r["d_per_rank"], r["p_bits"], _blocks(shapes), dev,
                                    max(args.pair_rounds, reps), kernels))
            print(f"bits {r['p_bits']:>2} n {r['n']:>3} W {r['world']}: speed-up over fp32, interleaved: "
                  f"median {r['speedup_vs_fp32_interleaved_median']:.2f}", flush=True)
    goals = {
        "fp32_over_floor_max": max((r["ours_over_floor"] for r in fp32), default=None),
        "fp32_over_floor_goal": 1.15,
        "fp32_at_n50_over_floor": next((r["ours_over_floor"] for r in fp32 if r["n"] == 50), None),
        "q4_speedup_vs_authors_min": min((r["speedup_vs_authors"] for r in q4), default=None),
        "q4_speedup_goal": 9.0,
        "q4_over_floor_max": max((r["ours_over_floor"] for r in q4), default=None),
        "q4_over_floor_goal": 2.0,
        "q4_over_floor_with_vectors_max": max((r["ours_over_floor_with_vectors"] for r in q4), default=None),
        "q4_speedup_vs_fp32_same_n_min": min((r["speedup_vs_fp32_same_n"] for r in q4
                                              if "speedup_vs_fp32_same_n" in r), default=None),
        "q4_speedup_vs_fp32_interleaved_min": min((r["speedup_vs_fp32_interleaved_median"] for r in q4
                                                   if "speedup_vs_fp32_interleaved_median" in r), default=None),
        "q4_speedup_vs_fp32_goal": 4.0,
        "comm_bytes_max_n256": 4 * 256,
        "comm_bytes_goal": 64 * 1024,
    }
    out = {
        "bench": "twa_step",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "D": D,
        "quick": args.quick,
        "reps": reps,
        "stat": args.stat,
        "clock": args.clock,
        "p_kernels": kernels.path,
        # the vector width of the C kernels (512: AVX-512, 256: AVX2, 0: scalar)
        "p_kernel_simd_bits": native_simd_bits() if kernels.path == "native" else None,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "copy_bandwidth_GBps": bw / 1e9,
        "configs": rows,
        "skipped": skipped,
        "scaling": scaling,
        "goals": goals,
        "note": "one process simulates rank 0 of W; authors' style at 4 bits is their fp32 code (they have no "
                "quantised P). Communication excludes the data-parallel gradient reduction both schemes share.",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(goals, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
