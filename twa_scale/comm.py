"""The one facade over collectives.

Every function also works in a single process without any process group, so
all code paths run unchanged in unit tests and in `python launch/x.py`.
Collectives go through ``deepspeed.comm`` when DeepSpeed set up the group
(NCCL on GPU, gloo on CPU) and through ``torch.distributed`` otherwise.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = [
    "init", "is_distributed", "rank", "world_size", "local_rank", "local_world_size", "node_rank",
    "all_reduce", "reduce_scatter", "all_gather", "broadcast_object", "barrier", "device", "destroy",
]


def init(timeout_seconds: float = 1800.0) -> None:
    """Join the job's process group (NCCL on GPU, gloo on CPU, chosen by DeepSpeed).

    Reads the launcher's env (RANK, WORLD_SIZE, MASTER_ADDR...). Under plain
    ``python`` (no launcher) a one-process group is made on a free loopback port,
    because a DeepSpeed engine always needs one.
    """
    if dist.is_available() and dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_seconds))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Ranks on this node (torchrun: LOCAL_WORLD_SIZE; deepspeed's launcher: LOCAL_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))


def node_rank() -> int:
    """Index of this node (DeepSpeed's launcher exports GROUP_RANK / NODE_RANK)."""
    for key in ("NODE_RANK", "GROUP_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce; ``op`` is "sum", "max" or "min". Returns ``tensor``."""
    if is_distributed():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def reduce_scatter(out: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``out`` = this rank's equal chunk of the sum over ranks of ``full`` (W * out.numel()).

    Half the traffic of an all-reduce: used where each rank needs only its own
    slice of a reduced vector (the TWA stage's gradient slice, as in ZeRO-2).
    Falls back to all-reduce + slice on backends without reduce-scatter.
    """
    if not is_distributed():
        out.view(-1).copy_(full.view(-1)[: out.numel()])
        return out
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    try:
        fn(out.view(-1), full.view(-1).contiguous())
    except (RuntimeError, NotImplementedError, ValueError):
        dist.all_reduce(full)
        out.view(-1).copy_(full.view(-1).chunk(world_size())[rank()])
    return out


def all_gather(out: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Gather equal-sized ``local`` tensors from every rank into ``out`` (W * local.numel())."""
    if not is_distributed():
        out.view(-1)[: local.numel()].copy_(local.view(-1))
        return out
    if out.device.type == "cpu" and dist.get_backend() == "gloo":
        # gloo has no all_gather_into_tensor; the list form writes into views of `out`.
        chunks = list(out.view(-1).chunk(world_size()))
        dist.all_gather(chunks, local.view(-1).contiguous())
    else:
        dist.all_gather_into_tensor(out.view(-1), local.view(-1).contiguous())
    return out


def broadcast_object(obj, src: int = 0):
    """Broadcast a small picklable object from ``src`` (only in-process data, never storage bytes)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
