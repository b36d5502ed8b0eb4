"""Everything DeepSpeed: config loading and validation, engine construction (the LR schedule is
:mod:`twa_scale.train.schedule`).

Model code stays plain torch; this module is the only one that imports deepspeed
for training.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from twa_scale.train.schedule import build_lr_scheduler

__all__ = ["default_ds_config_path", "find_ds_config", "load_ds_config", "resolve_batch", "build_optimizer",
           "UnsafeCheckpointError", "weights_only_checkpoint_engine",
           "build_engine"]

# ds_configs/ at the repository root, also shipped inside the package (twa_scale/ds_configs is a link to it
# in the source tree and a copy in an installed wheel), so the defaults are found from any directory.
SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"


def default_ds_config_path() -> Path:
    """CPU smoke config without a GPU, the single-GPU CIFAR config with one."""
    return SHIPPED_CONFIGS / ("cifar_1gpu.json" if torch.cuda.is_available() else "cpu_smoke.json")


def find_ds_config(path: str) -> Path:
    """``path`` if it is a file, else the shipped config of that name for ``ds_configs/NAME.json``."""
    p = Path(path)
    if p.is_file():
        return p
    if p.parent in (Path("."), Path("ds_configs")) and (SHIPPED_CONFIGS / p.name).is_file():
        return SHIPPED_CONFIGS / p.name
    raise ValueError(f"--deepspeed_config {path}: file not found")


# Sections twa_scale would have to ignore: the code builds its own optimizer and schedule from the flags.
_REFUSED_SECTIONS = {"optimizer": "--lr, --momentum and --weight-decay",
                     "scheduler": "--schedule and --warmup-epochs"}


def load_ds_config(path: str | None) -> dict:
    p = find_ds_config(path) if path else default_ds_config_path()
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed_config {p}: invalid JSON ({e})") from None
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}  # "_comment" keys document the file
    for section, flags in _REFUSED_SECTIONS.items():
        if section in cfg:
            raise ValueError(f"--deepspeed_config {p}: the {section!r} section is not supported (twa_scale builds "
                             f"its own from {flags}); remove it and set those flags")
    if "bf16" in cfg and cfg["bf16"].get("enabled"):
        raise ValueError(f"--deepspeed_config {p}: the bf16 section breaks BatchNorm in DeepSpeed 0.19; "
                         "use \"torch_autocast\": {\"enabled\": true, \"dtype\": \"bfloat16\"}")
    if not torch.cuda.is_available():
        cfg.pop("torch_autocast", None)  # CPU runs stay in fp32
    return cfg


def _nearest_multiples(value: int, unit: int, n: int = 3) -> list[int]:
    below = [value // unit * unit - i * unit for i in range(n)]
    above = [(value // unit + 1) * unit + i * unit for i in range(n)]
    cands = sorted((c for c in below + above if c >= unit), key=lambda c: (abs(c - value), c))
    return sorted(cands[:n])


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
        unit = world * (micro if micro_batch or micro >= 1 else (accum or 1))
        near = ", ".join(map(str, _nearest_multiples(total, unit)))
        raise ValueError(f"--batch-size {total} does not divide over {world} ranks × --micro-batch "
                         f"{micro if micro >= 1 else '(derived)'}; nearest valid: {near}")
    accum = total // (world * micro)
    ds.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    return total, micro, accum


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """SGD with weight decay on every parameter, as the TWA authors train (train_sgd_cifar.py:183 and
    train_sgd_imagenet.py:206 pass model.parameters() whole); ``cfg.decay_norm_bias`` False exempts the
    1-D tensors (BatchNorm weights, biases), the common "no decay on norm and bias" variant."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    if not cfg.decay_norm_bias:
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False)


def build_engine(model: torch.nn.Module, cfg, ds: dict, *, steps_per_epoch: int):
    """A DeepSpeed engine with the paper's SGD and the LR schedule of :func:`~twa_scale.train.schedule.lr_factor`,
    stepped per step."""
    import deepspeed

    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, schedule=cfg.schedule, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                               warmup_steps=int(cfg.warmup_epochs * steps_per_epoch),
                               lr_milestones=cfg.lr_milestones)
    if ds.get("zero_optimization", {}).get("stage", 0) > 0:
        ds.setdefault("zero_allow_untested_optimizer", True)  # torch SGD is fine under ZeRO 1-2
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    engine.checkpoint_engine = weights_only_checkpoint_engine(engine.checkpoint_engine, engine._config)
    return engine


class UnsafeCheckpointError(Exception):
    """A checkpoint file holds more than tensors and plain containers: torch.load(weights_only=True) refused it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def weights_only_checkpoint_engine(current, config):
    """The engine that loads DeepSpeed checkpoints: DeepSpeed's own TorchCheckpointEngine.load calls
    torch.load(weights_only=False), which runs whatever the file's pickle says; checkpoints come back from
    the object store on --resume, so ours loads tensors and plain containers only (weights_only=True) and
    raises :class:`UnsafeCheckpointError` naming the file otherwise. Saving is DeepSpeed's, unchanged."""
    import pickle

    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from twa_scale.errors import ConfigError

    if type(current) is not TorchCheckpointEngine:
        raise ConfigError(f"--deepspeed_config: checkpoint engine {type(current).__name__} is not supported; "
                          "twa_scale loads checkpoints through DeepSpeed's torch engine, with weights_only=True")

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                first = str(e).strip().splitlines()
                why = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line),
                           first[0] if first else "not plain data")
                raise UnsafeCheckpointError(str(path), f"refused: not only tensors and plain containers ({why})") \
                    from None

    return WeightsOnlyCheckpointEngine(config)
