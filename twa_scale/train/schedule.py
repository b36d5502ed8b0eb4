"""The learning-rate schedule: one schedule for both stages (training's LambdaLR, the TWA stage's lr and
the live follower's first lr phase all read it).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["milestones", "lr_factor", "build_lr_scheduler"]


def milestones(epochs: int, explicit: Sequence[int] | None = None) -> tuple[int, ...]:
    """Epochs at which the `step` schedule divides the lr by 10.

    ``explicit`` (--lr-milestones) wins. Otherwise the TWA authors' MultiStepLR (train_twa.py:
    milestones=[int(0.5E), int(0.75E + 0.9)], stepped once per epoch), never before epoch 1: the
    authors' rule puts a milestone at epoch 0 when E = 1, which would run a one-epoch job at lr/10
    throughout. For E >= 2 this is exactly their rule (and train_sgd_cifar.py's [100, 150] at E = 200)."""
    if explicit:
        return tuple(explicit)
    return max(1, int(epochs * 0.5)), max(1, int(epochs * 0.75 + 0.9))


def lr_factor(step: int, *, schedule: str, epochs: int, steps_per_epoch: int, warmup_steps: int = 0,
              lr_milestones: Sequence[int] | None = None) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): the one schedule of both stages.

    A linear warm-up of ``warmup_steps`` ((t+1)/W, as the journal's cosine_lr) comes first. Then
    `step` holds 1, 0.1, 0.01 by epoch, switching at :func:`milestones` (absolute epochs, as torch's
    MultiStepLR); `step-per-iter` switches at 50% and 75% of the post-warm-up steps; `cosine` and
    `linear` decay over the post-warm-up steps; `constant` stays at 1.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        return 0.1 ** sum(epoch >= m for m in milestones(epochs, lr_milestones))
    p = (step - warmup_steps) / max(epochs * steps_per_epoch - warmup_steps, 1)
    if schedule == "step-per-iter":
        return 1.0 if p < 0.5 else (0.1 if p < 0.75 else 0.01)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))
    if schedule == "linear":
        return max(1.0 - p, 0.0)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"--schedule: unknown schedule {schedule!r}")


def build_lr_scheduler(opt: torch.optim.Optimizer, *, schedule: str, epochs: int, steps_per_epoch: int,
                       warmup_steps: int = 0,
                       lr_milestones: Sequence[int] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_factor` as a torch LambdaLR, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, schedule=schedule, epochs=epochs, steps_per_epoch=steps_per_epoch, warmup_steps=warmup_steps,
        lr_milestones=lr_milestones))
