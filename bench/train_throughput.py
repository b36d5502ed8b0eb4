"""DeepSpeed engine step vs a plain PyTorch step, same model and batch, one run; and the cost of
snapshots at the paper's cadence (K per epoch) against none, on the engine step.

    python bench/train_throughput.py                       # CPU: resnet20, batch 64, 32 px
    python bench/train_throughput.py --model resnet50 --batch 256 --image-size 224   # GPU host
    python bench/train_throughput.py --batch 128 --snapshots-per-epoch 5 --steps-per-epoch 390 \
        --out bench/results/train_throughput-k5-cpu.json   # CIFAR-10's epoch at batch 128, K = 5

Both sides use SGD(momentum 0.9), bf16 autocast on GPU (the engine through its
`torch_autocast` section) and channels_last activations on GPU. Steps are timed
in alternating blocks (plain, engine, plain, ...) so machine noise hits both
sides alike; the result is the ratio of medians, engine throughput / plain
throughput (>= 1.0 means the engine is at least as fast). JSON goes to --out.

With ``--snapshots-per-epoch K``: blocks of one snapshot interval (steps-per-epoch / K engine
steps) alternate between "none" and "with" (one ``SnapshotStreamer.snapshot()`` after the block's
first step, uploads to ``--snapshot-url``, a temporary file:// store by default, finished inside the
block: a block waits for its upload before it ends). Each block also times a memcpy of the slice
(D floats, source just written, as the optimizer writes the weights) at the same point; that is the
stall's baseline. Reported: the median over pairs of the "with"/"none" block times (the throughput
cost of K snapshots per epoch) and the median stall against the median memcpy.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from twa_scale import comm
from twa_scale.train.config import TrainConfig
from twa_scale.train.engine import build_engine, build_optimizer, load_ds_config, resolve_batch
from twa_scale.models import build_model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50" if cuda else "resnet20")
    p.add_argument("--batch", type=int, default=256 if cuda else 64)
    p.add_argument("--image-size", type=int, default=224 if cuda else 32)
    p.add_argument("--blocks", type=int, default=8, help="alternating timing blocks per side")
    p.add_argument("--steps", type=int, default=5, help="steps per block")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=cuda)
    p.add_argument("--deepspeed_config", default=None)
    p.add_argument("--snapshots-per-epoch", type=int, default=0,
                   help="K > 0: also time the engine with K snapshots per epoch against none (the paper: 5)")
    p.add_argument("--steps-per-epoch", type=int, default=390, help="epoch length for K (CIFAR-10 at batch 128)")
    p.add_argument("--snapshot-pairs", type=int, default=3, help="(none, with) block pairs")
    p.add_argument("--snapshot-url", default=None, help="snapshot store (default: a temporary file:// dir)")
    p.add_argument("--out", default="bench/out/train_throughput.json")
    args = p.parse_args()

    comm.init()
    device = comm.device()
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, lr=0.1)  # only its optimizer settings are used, for both sides
    base = build_model(args.model, 1000 if args.image_size > 64 else 10).to(device)
    plain_model, ds_model = base, copy.deepcopy(base)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        # Plain PyTorch may keep channels_last parameters; the engine keeps them contiguous,
        # because DeepSpeed 0.19 cannot flatten channels_last parameters (ds_configs/README.md).
        plain_model = plain_model.to(memory_format=torch.channels_last)

    plain_opt = build_optimizer(plain_model, cfg)

    def plain_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(plain_model(x), y)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    ds = load_ds_config(args.deepspeed_config)
    resolve_batch(ds, batch_size=args.batch, micro_batch=args.batch, world=comm.world_size())
    engine = build_engine(ds_model, cfg, ds, steps_per_epoch=10_000)

    def engine_step():
        loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()

    times = {"plain": [], "deepspeed": []}
    for fn in (plain_step, engine_step):
        for _ in range(args.warmup):
            fn()
    _sync(device)
    for _ in range(args.blocks):
        for name, fn in (("plain", plain_step), ("deepspeed", engine_step)):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / args.steps)

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "train_throughput",
        "model": args.model, "batch": args.batch, "image_size": args.image_size,
        "channels_last": args.channels_last, "autocast_bf16": cuda,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}, "
                                                           f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "median_step_seconds": med,
        "step_seconds": times,
        "engine_vs_plain_throughput": med["plain"] / med["deepspeed"],
        "goal": ">= 1.0 on GPU, >= 0.95 on CPU",
    }
    if args.snapshots_per_epoch > 0:
        result["snapshots"] = _snapshot_cost(engine_step, engine.module, args, device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"plain {med['plain'] * 1e3:.1f} ms/step, deepspeed {med['deepspeed'] * 1e3:.1f} ms/step, "
          f"engine/plain throughput {result['engine_vs_plain_throughput']:.3f}  -> {out}")
    if "snapshots" in result:
        r = result["snapshots"]
        print(f"K={r['snapshots_per_epoch']}: cost {100 * r['throughput_cost']:.2f}% of steps/s (goal <= 3% on CPU); "
              f"stall {r['stall_median_seconds'] * 1e3:.2f} ms = {r['stall_vs_memcpy']:.2f}x memcpy (goal <= 1.5); "
              f"CPU time: cost {100 * r['throughput_cost_cpu']:.2f}%, stall {r['stall_vs_memcpy_cpu']:.2f}x memcpy")


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _snapshot_cost(step, model: torch.nn.Module, args, device) -> dict:
    """Blocks of one snapshot interval, alternating none / with one snapshot; see the module docstring."""
    from twa_scale import store
    from twa_scale.layout import FlatLayout
    from twa_scale.train.streamer import SnapshotStreamer

    interval = max(1, args.steps_per_epoch // args.snapshots_per_epoch)
    layout = FlatLayout.from_model(model)
    params = layout.trainable(model)
    src = layout.gather(params, 0, layout.D).clone()
    dst = torch.zeros(layout.D, dtype=torch.float32, pin_memory=device.type == "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        url = args.snapshot_url or f"file://{tmp}/runs"
        run_id = f"bench-k{args.snapshots_per_epoch}-{int(time.time())}"
        writer = store.create_run(url, run_id, layout, meta={"model": args.model}, world_size=1)
        streamer = SnapshotStreamer(url, run_id, layout, rank=0, world_size=1, writer=writer)
        times = {"none": [], "with": []}
        cpu = {"none": [], "with": []}  # process CPU seconds (all threads: training, uploader)
        memcpy, memcpy_cpu, stalls, stalls_cpu, waits, seq = [], [], [], [], [], 0

        def block(with_snapshot: bool) -> None:
            nonlocal seq
            _sync(device)
            t0, c0 = time.perf_counter(), _cpu_seconds()
            for i in range(interval):
                step()
                if i == 0:
                    src.mul_(1.0)  # written just before, like the weights the optimizer step wrote
                    _sync(device)
                    t1, c1 = time.perf_counter(), time.thread_time()
                    dst.copy_(src)
                    _sync(device)
                    memcpy.append(time.perf_counter() - t1)
                    memcpy_cpu.append(time.thread_time() - c1)
                    if with_snapshot:
                        before, c1 = streamer.stats["stall_seconds"], time.thread_time()
                        streamer.snapshot(seq, seq, 0, params)
                        stalls_cpu.append(time.thread_time() - c1)
                        stalls.append(streamer.stats["stall_seconds"] - before)
                        seq += 1
            t1 = time.perf_counter()
            while streamer.pending():  # its upload belongs to this block
                time.sleep(0.001)
            waits.append(time.perf_counter() - t1)
            _sync(device)
            times["with" if with_snapshot else "none"].append(time.perf_counter() - t0)
            cpu["with" if with_snapshot else "none"].append(_cpu_seconds() - c0)

        block(True)  # warm-up: buffers, store connection, views
        for x in (times["with"], cpu["with"], stalls, stalls_cpu, memcpy, memcpy_cpu):
            x.clear()
        for _ in range(args.snapshot_pairs):
            block(False)
            block(True)
        summary = streamer.close()
    ratios = [w / n for n, w in zip(times["none"], times["with"])]
    ratios_cpu = [w / n for n, w in zip(cpu["none"], cpu["with"])]
    stall, copy = statistics.median(stalls), statistics.median(memcpy)
    stall_cpu, copy_cpu = statistics.median(stalls_cpu), statistics.median(memcpy_cpu)
    return {"snapshots_per_epoch": args.snapshots_per_epoch, "steps_per_epoch": args.steps_per_epoch,
            "steps_per_block": interval, "pairs": args.snapshot_pairs, "D": layout.D, "bytes": 4 * layout.D,
            "store": "file:// (temporary dir)" if args.snapshot_url is None else args.snapshot_url,
            "steps_per_second_none": interval / statistics.median(times["none"]),
            "steps_per_second_with": interval / statistics.median(times["with"]),
            "block_seconds": times, "pair_ratios_with_over_none": ratios,
            "throughput_cost": 1 - 1 / statistics.median(ratios),
            "stall_seconds": stalls, "stall_median_seconds": stall, "memcpy_median_seconds": copy,
            "stall_vs_memcpy": stall / copy,
            # CPU time: what holds on a time-shared host, where neighbours' load moves wall clock by more
            # than the effect measured (process CPU for blocks, this thread's CPU for stall and memcpy)
            "block_cpu_seconds": cpu, "pair_ratios_cpu": ratios_cpu,
            "throughput_cost_cpu": 1 - 1 / statistics.median(ratios_cpu),
            "stall_cpu_seconds": stalls_cpu, "memcpy_cpu_seconds": memcpy_cpu,
            "stall_vs_memcpy_cpu": stall_cpu / copy_cpu, "load_average": os.getloadavg(),
            "upload_wait_seconds_at_block_end": waits,
            "committed": len(summary["committed"]), "failed": summary["failed"],
            "goal": "throughput_cost <= 0.03 on CPU (<= 0.01 on GPU); stall_vs_memcpy <= 1.5"}


if __name__ == "__main__":
    main()
