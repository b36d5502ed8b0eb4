"""DeepSpeed engine step vs a plain PyTorch step, same model and batch, one run.

    python bench/train_throughput.py                       # CPU: resnet20, batch 64, 32 px
    python bench/train_throughput.py --model resnet50 --batch 256 --image-size 224   # GPU host

Both sides use SGD(momentum 0.9), bf16 autocast on GPU (the engine through its
`torch_autocast` section) and channels_last activations on GPU. Steps are timed
in alternating blocks (plain, engine, plain, ...) so machine noise hits both
sides alike; the result is the ratio of medians, engine throughput / plain
throughput (>= 1.0 means the engine is at least as fast). JSON goes to --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from twa_scale import comm
from twa_scale.config import TrainConfig
from twa_scale.engine import build_engine, build_optimizer, load_ds_config, resolve_batch
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"plain {med['plain'] * 1e3:.1f} ms/step, deepspeed {med['deepspeed'] * 1e3:.1f} ms/step, "
          f"engine/plain throughput {result['engine_vs_plain_throughput']:.3f}  -> {out}")


if __name__ == "__main__":
    main()
