"""Evaluation over this rank's shard, reduced over all ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from twa_scale import comm, logs

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, *, desc: str = "eval",
             channels_last: bool = False, per_example: bool = False) -> dict:
    """Mean cross-entropy and top-1 accuracy over the whole (sharded) dataset.

    ``per_example``: also ``correct``, a uint8 CPU tensor of every sample's top-1 correctness, on every rank,
    in the order rank 0's samples, then rank 1's, ... (the same order at every call with the same loader
    and world size: what a paired comparison of two models on the same images needs)."""
    was_training = model.training
    model.eval()
    # Summed on the device and read once at the end: no host sync per batch.
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    hits: list[torch.Tensor] = []
    for x, y in logs.progress(loader, desc):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        totals[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        hit = logits.argmax(1) == y
        totals[1] += hit.sum()
        totals[2] += y.numel()
        if per_example:
            hits.append(hit)
    comm.all_reduce(totals)
    model.train(was_training)
    loss_sum, correct, count = totals.tolist()
    n = max(count, 1.0)
    out = {"loss": loss_sum / n, "accuracy": correct / n, "count": int(count)}
    if per_example:
        out["correct"] = _gather_ragged(torch.cat(hits).to(torch.uint8) if hits else
                                        torch.zeros(0, dtype=torch.uint8, device=device))
    return out


def _gather_ragged(local: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D ``local`` (lengths may differ), concatenated in rank order, on every rank (CPU)."""
    world = comm.world_size()
    sizes = torch.zeros(world, dtype=torch.int64, device=local.device)
    sizes[comm.rank()] = local.numel()
    comm.all_reduce(sizes)
    m = int(sizes.max())
    padded = torch.zeros(m, dtype=torch.uint8, device=local.device)
    padded[: local.numel()] = local
    full = torch.zeros(world * m, dtype=torch.uint8, device=local.device)
    comm.all_gather(full, padded)
    return torch.cat([full[r * m: r * m + int(sizes[r])] for r in range(world)]).cpu()
