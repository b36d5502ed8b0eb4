"""Evaluation over this rank's shard, reduced over all ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from twa_scale import comm, logs

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, *, desc: str = "eval",
             channels_last: bool = False) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy over the whole (sharded) dataset."""
    was_training = model.training
    model.eval()
    # Summed on the device and read once at the end: no host sync per batch.
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in logs.progress(loader, desc):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        totals[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += y.numel()
    comm.all_reduce(totals)
    model.train(was_training)
    loss_sum, correct, count = totals.tolist()
    n = max(count, 1.0)
    return {"loss": loss_sum / n, "accuracy": correct / n, "count": int(count)}
