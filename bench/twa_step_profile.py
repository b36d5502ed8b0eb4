"""Where a packed-P step's time goes, robust to a shared host: interleaved min-of-N timings of the
4-bit kernels (project, reconstruct) against a copy of P's packed bytes and against fp32 P.

    python bench/twa_step_profile.py --out bench/results/twa_step-profile-cpu.json

ResNet-50's slice on rank 0 of 4 (d = D/4), n = 25 directions, one thread
each operation runs once
per round, rounds interleave them, and the minimum over rounds is kept, so a neighbour's burst on a
shared machine slows no operation more than another.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twa_scale.twa.quant import DenseP, GroupedP, resolve_kernels  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--n", type=int, default=25)
ap.add_argument("--rounds", type=int, default=12)
ap.add_argument("--out", default="bench/out/twa_step-profile.json")
args = ap.parse_args()
torch.set_num_threads(1)
kernels = resolve_kernels(torch.device("cpu"))
k, d = args.n, 6_389_258 // 128 * 128
res = {}
q = torch.randn(k, d)
spans = [(0, d, 0, 0)]
lo = q.amin(1, keepdim=True).contiguous()
hi = q.amax(1, keepdim=True).contiguous()
g = torch.randn(d)
w = torch.randn(d)
out = torch.empty(d)
theta, theta0 = torch.randn(k, 1, dtype=torch.float64), torch.zeros(k, 1, dtype=torch.float64)
st = GroupedP.build(q, spans, lo, hi, 4, 1, kernels)
dense = DenseP(q)
src = torch.empty(st.packed.numel(), dtype=torch.uint8).fill_(3)
dst = torch.empty_like(src)
srcf = torch.ones(k * d)
dstf = torch.empty_like(srcf)
fns = {"copy_P4_bytes": lambda: dst.copy_(src), "read_P4_sum": lambda: torch.sum(src.view(torch.int64)),
       "p4_project": lambda: st.project(g), "p4_reconstruct": lambda: st.reconstruct(w, theta, theta0, out),
       "fp32_project": lambda: dense.project(g), "fp32_reconstruct": lambda: dense.reconstruct(w, theta, theta0, out),
       "copy_P32_bytes": lambda: dstf.copy_(srcf)}
best = {n: float("inf") for n in fns}
for _ in range(args.rounds):
    for n, f in fns.items():
        t0 = time.perf_counter()
        f()
        best[n] = min(best[n], time.perf_counter() - t0)
best = {n: round(v * 1e3, 2) for n, v in best.items()}
p4 = best["p4_project"] + best["p4_reconstruct"]
p32 = best["fp32_project"] + best["fp32_reconstruct"]
floor4 = 2 * best["copy_P4_bytes"]  # the bench's floor: 2 passes over P's bytes, copy bandwidth (read + write)
best.update(p_kernels=kernels.path, n=k, d=d, rounds=args.rounds, P4_MB=st.packed.numel() / 1e6,
            step_4bit_ms=p4, step_fp32_ms=p32, floor_4bit_ms=floor4,
            q4_over_floor=round(p4 / floor4, 2), q4_speedup_vs_fp32=round(p32 / p4, 2),
            codes_per_ns_project=round(k * d / (best["p4_project"] * 1e6), 2))
print(json.dumps(best, indent=1))
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps(best, indent=1))
