"""Per-step cost of the SIGTERM agreement (twa_scale/train/preemption.py) on 2 gloo ranks on this machine.

    python bench/preemption_agreement.py [--steps 2000] [--step-ms 5] [--out FILE.json]

Each rank runs ``--steps`` fake optimizer steps (a busy matmul loop of about ``--step-ms``) three ways:
no agreement (baseline); ``StepAgreement.poll()`` after every step (what training does: the all-reduce
of step k is read after step k+1, on its own gloo group); a blocking all-reduce of the flag after every
step (the simple design it replaces). Reported: microseconds per step over the baseline, and the time
``poll()`` itself holds the training thread, as medians over ``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _busy(ms: float, a: torch.Tensor) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        a @ a


def _worker(rank: int, world: int, port: int, args, out) -> None:
    from twa_scale import comm
    from twa_scale.train.preemption import StepAgreement

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    a = torch.randn(64, 64)
    agreement = StepAgreement()
    flag = torch.zeros(1)
    results = {"none": [], "poll": [], "blocking": [], "poll_call_us": []}
    for _ in range(args.repeats):
        for mode in ("none", "poll", "blocking"):
            comm.barrier()
            held = 0.0
            t0 = time.perf_counter()
            for _ in range(args.steps):
                _busy(args.step_ms, a)
                if mode == "poll":
                    t = time.perf_counter()
                    agreement.poll()
                    held += time.perf_counter() - t
                elif mode == "blocking":
                    comm.all_reduce(flag, op="max", group=agreement.group)
            if mode == "poll":
                agreement.finish()
                results["poll_call_us"].append(held / args.steps * 1e6)
            results[mode].append((time.perf_counter() - t0) / args.steps * 1e6)
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--step-ms", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, args, q)) for r in range(2)]
    for proc in procs:
        proc.start()
    res = q.get(timeout=3600)
    for proc in procs:
        proc.join()
    med = {k: statistics.median(v) for k, v in res.items()}
    report = {"ranks": 2, "backend": "gloo", "cpu_count": os.cpu_count(), "steps": args.steps,
              "step_ms": args.step_ms, "repeats": args.repeats,
              "step_us": {k: round(med[k], 1) for k in ("none", "poll", "blocking")},
              "poll_overhead_us_per_step": round(med["poll"] - med["none"], 1),
              "blocking_overhead_us_per_step": round(med["blocking"] - med["none"], 1),
              "poll_call_us": round(med["poll_call_us"], 1)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
