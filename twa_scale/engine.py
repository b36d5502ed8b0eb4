"""Everything DeepSpeed: config loading and validation, engine construction, the LR schedule.

Model code stays plain torch; this module is the only one that imports deepspeed
for training.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

__all__ = ["default_ds_config_path", "load_ds_config", "resolve_batch", "build_optimizer", "lr_factor",
           "build_engine"]

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"


def default_ds_config_path() -> Path:
    """CPU smoke config without a GPU, the single-GPU CIFAR config with one."""
    return REPO_CONFIGS / ("cifar_1gpu.json" if torch.cuda.is_available() else "cpu_smoke.json")


def load_ds_config(path: str | None) -> dict:
    p = Path(path) if path else default_ds_config_path()
    if not p.is_file():
        raise ValueError(f"--deepspeed_config {p}: file not found")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed_config {p}: invalid JSON ({e})") from None
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}  # "_comment" keys document the file
    if "bf16" in cfg and cfg["bf16"].get("enabled"):
        raise ValueError(f"--deepspeed_config {p}: the bf16 section breaks BatchNorm in DeepSpeed 0.19; "
                         "use \"torch_autocast\": {\"enabled\": true, \"dtype\": \"bfloat16\"}")
    if not torch.cuda.is_available():
        cfg.pop("torch_autocast", None)  # CPU runs stay in fp32
    return cfg


def resolve_batch(ds: dict, *, batch_size: int | None, micro_batch: int | None, world: int) -> tuple[int, int, int]:
    """(global batch, micro-batch per rank, gradient accumulation steps), written back into ``ds``.

    The global batch must divide over ranks × micro-batch; otherwise a one-line error names both flags.
    """
    def num(key):
        v = ds.get(key)
        return None if v in (None, "auto") else int(v)

    micro = micro_batch or num("train_micro_batch_size_per_gpu")
    total = batch_size or num("train_batch_size")
    accum = num("gradient_accumulation_steps") if not batch_size else None
    if total is None and micro is None:
        raise ValueError("set --batch-size or train_batch_size in the DeepSpeed config")
    if micro is None:
        micro = total // (world * (accum or 1)) if total % (world * (accum or 1)) == 0 else 0
    if total is None:
        total = micro * world * (accum or 1)
    if micro < 1 or total % (world * micro):
        raise ValueError(f"--batch-size {total} does not divide over {world} ranks × --micro-batch {micro}")
    accum = total // (world * micro)
    ds.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    return total, micro, accum


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and biases, as in the reference CIFAR/ImageNet recipes.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum, nesterov=False)


def lr_factor(step: int, total_steps: int, *, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = step / max(total_steps, 1)
    if schedule == "step":  # TWA paper: ÷10 at 50% and again at 75% of training
        return 1.0 if progress < 0.5 else (0.1 if progress < 0.75 else 0.01)
    if schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span))
    return 1.0


def build_engine(model: torch.nn.Module, cfg, ds: dict, *, steps_per_epoch: int):
    """A DeepSpeed engine with the paper's SGD and a per-step LR schedule."""
    import deepspeed

    opt = build_optimizer(model, cfg)
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, schedule=cfg.schedule, warmup_steps=warmup))
    if ds.get("zero_optimization", {}).get("stage", 0) > 0:
        ds.setdefault("zero_allow_untested_optimizer", True)  # torch SGD is fine under ZeRO 1-2
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    return engine
