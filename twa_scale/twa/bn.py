"""BatchNorm recalibration: running statistics are not part of w, so every new
weight point (SWA mean, TWA result) needs them recomputed from data."""
from __future__ import annotations

import torch
from torch import nn

from twa_scale import comm

__all__ = ["has_batchnorm", "recalibrate_bn"]


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(_bn_modules(model))


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, device: torch.device, *, max_batches: int | None = None) -> int:
    """Recompute every BatchNorm's running mean/var with one pass over ``loader``.

    Each rank averages over its own shard (momentum None = cumulative mean over
    batches), then ranks combine: mean of means, and the variance of the union
    E[var] + E[mean^2] - E[mean]^2, weighted by samples. Returns samples seen on
    this rank. A model without BatchNorm is left untouched.
    """
    bns = _bn_modules(model)
    if not bns:
        return 0
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    seen = 0
    for b, (x, _) in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        model(x.to(device, non_blocking=True))
        seen += x.shape[0]
    model.train(was_training)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    if comm.world_size() > 1:
        w = torch.tensor([float(seen)], dtype=torch.float64, device=device)
        comm.all_reduce(w)
        share = seen / max(w.item(), 1.0)
        for m in bns:
            mean, var = m.running_mean.double(), m.running_var.double()
            stats = torch.cat([mean * share, (var + mean * mean) * share])
            comm.all_reduce(stats)
            c = mean.numel()
            g_mean, g_sq = stats[:c], stats[c:]
            m.running_mean.copy_(g_mean)
            m.running_var.copy_((g_sq - g_mean * g_mean).clamp_min(0))
    return seen
