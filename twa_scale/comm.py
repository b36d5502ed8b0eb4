"""The one facade over collectives.

Every function also works in a single process without any process group, so
all code paths run unchanged in unit tests and in `python launch/x.py`.
Collectives go through ``deepspeed.comm`` when DeepSpeed set up the group
(NCCL on GPU, gloo on CPU) and through ``torch.distributed`` otherwise.
"""
from __future__ import annotations

import datetime
import errno
import logging
import os
import socket
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "init", "is_distributed", "rank", "world_size", "local_rank", "local_world_size", "node_rank",
    "all_reduce", "all_reduce_start", "Pending", "host_group", "reduce_scatter", "all_gather", "broadcast_object",
    "barrier", "device", "destroy", "agree",
]

T = TypeVar("T")
# error kinds re-raised by name on the ranks that did not fail, so launchers report them alike
_AGREED_ERRORS = {"ValueError": ValueError, "KeyError": KeyError, "OSError": OSError}


_OWN_PORTS: set[str] = set()  # ports the single-process fallback below chose


def init(timeout_seconds: float = 1800.0) -> None:
    """Join the job's process group (NCCL on GPU, gloo on CPU, chosen by DeepSpeed).

    Reads the launcher's env (RANK, WORLD_SIZE, MASTER_ADDR...). Under plain
    ``python`` (no launcher) a one-process group is made on a free loopback port,
    because a DeepSpeed engine always needs one.
    """
    if dist.is_available() and dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        _OWN_PORTS.add(str(port))
    else:
        _check_master_port()
    _announce_shm_op_build()
    import deepspeed

    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_seconds))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    _unlink_shm_allreduce_buffer()


def _unlink_shm_allreduce_buffer() -> None:
    """Remove the name of DeepSpeed's CPU shared-memory all-reduce buffer, keeping the mapping.

    On the CPU accelerator, when every rank is on one host, DeepSpeed's shm op creates a 69 MB
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` per rank and never unlinks
    it, so each job leaks it into RAM-backed tmpfs for good (a test suite of many 2-rank jobs
    filled /dev/shm and the OOM killer ended it). Every rank has mapped every peer's buffer once
    ``init_distributed`` returns on all ranks, so after a barrier each rank unlinks its own name:
    the memory stays mapped until the process exits, even by SIGKILL, and is then freed.
    """
    if not (dist.is_available() and dist.is_initialized()):  # a 1-rank DeepSpeed job has a buffer too
        return
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank()}")
    barrier()  # on every rank, whether or not it has a buffer (GPU, several hosts: none)
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _check_master_port() -> None:
    """Global rank 0 hosts the rendezvous store on MASTER_PORT. When another process already listens there,
    torch waits out its connect timeout (~4.5 min) and fails with a transient-looking error: say it now.
    Exit 2, not 75: a restart on this host meets the same process on that port; the fix is a flag.
    (torchrun's agent binds the port itself: nothing to check there.)"""
    from twa_scale.errors import ConfigError

    port = os.environ.get("MASTER_PORT", "")
    if (os.environ.get("RANK") != "0" or not port.isdigit() or "TORCHELASTIC_RUN_ID" in os.environ
            or port in _OWN_PORTS):  # this process's earlier group (a stage run again in-process) had it
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is no conflict
        try:
            s.bind(("", int(port)))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return
            raise ConfigError(f"--master_port {port}: the rendezvous port is already in use on this host (another "
                              f"job?); pass the launcher a free one, e.g. deepspeed --master_port "
                              f"{20000 + int(port) % 10000} ...") from None


def _announce_shm_op_build() -> None:
    """On a CPU host DeepSpeed JIT-compiles its shared-memory communication op the first time, silently,
    for 1-2 minutes (then it is cached): say so before it starts."""
    if torch.cuda.is_available() or local_rank() != 0:
        return
    try:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import _get_build_directory

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None or installed_ops.get(builder.NAME, False):
            return  # no such op here, or built at install time (DS_BUILD_SHM_COMM=1 pip install deepspeed)
        where = _get_build_directory(builder.NAME, verbose=False)
    except Exception:  # noqa: BLE001 - only a notice: DeepSpeed's internals may move
        return
    if not os.path.exists(os.path.join(where, f"{builder.NAME}.so")):
        logging.getLogger("twa_scale.comm").info(
            "compiling DeepSpeed's CPU communication op once (1-2 min; cached in %s)", where)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Ranks on this node: deepspeed's launcher exports LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE.

    LOCAL_SIZE is read first: DeepSpeed's launcher sets it but leaves LOCAL_WORLD_SIZE alone, so one
    inherited from the parent (e.g. set by :func:`init`'s single-process fallback in the process that
    ran ``deepspeed``) would otherwise count a 2-rank node as 1 and every rank as its own node.
    """
    return int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))


def node_rank() -> int:
    """Index of this node: torchrun exports GROUP_RANK, DeepSpeed's launcher CROSS_RANK (not NODE_RANK:
    without it every node of a `deepspeed --no_ssh` job called itself node 0)."""
    for key in ("NODE_RANK", "GROUP_RANK", "CROSS_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def _op(op: str):
    return {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce; ``op`` is "sum", "max" or "min". Returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor, op=_op(op), group=group)
    return tensor


class Pending:
    """An all-reduce in flight (:func:`all_reduce_start`); :meth:`wait` returns the reduced tensor."""

    def __init__(self, tensor: torch.Tensor, work=None):
        self.tensor, self._work = tensor, work

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self.tensor


def all_reduce_start(tensor: torch.Tensor, op: str = "sum", group=None) -> Pending:
    """Start an in-place all-reduce and return at once (``async_op``); leave ``tensor`` alone until
    ``wait()``. Every rank must start the same all-reduces on ``group`` in the same order."""
    if not is_distributed():
        return Pending(tensor)
    return Pending(tensor, dist.all_reduce(tensor, op=_op(op), group=group, async_op=True))


_host_group = None


def host_group():
    """A gloo group over every rank, for tiny host-side collectives (the SIGTERM agreement): on GPU
    they never wait on the CUDA stream, and on any backend never queue behind gradient all-reduces.
    Made the first time it is asked for, which is a collective: every rank asks at the same point.
    None (the default group) when not distributed."""
    global _host_group
    if _host_group is None and is_distributed():
        _host_group = dist.new_group(backend="gloo")
    return _host_group


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
    global _host_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


def agree(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on every rank; if it raises on any rank, it raises on every rank.

    Without this a rank that hits a corrupt shard (or any bad input) would raise while
    the others block forever in the next collective. The failing rank re-raises its own
    error; the others raise the same kind (TransientError, ValueError, KeyError, OSError,
    else RuntimeError) naming that rank and ``what`` it was doing. Costs one all-reduce of
    one float, plus a small broadcast on failure.
    """
    err: BaseException | None = None
    out: Any = None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below on every rank
        err = e
    if not is_distributed():
        if err is not None:
            raise err
        return out
    flag = torch.tensor([float(rank() + 1) if err is not None else 0.0], device=device())
    all_reduce(flag, op="max")
    bad = int(flag.item())
    if not bad:
        return out
    from twa_scale.errors import is_transient

    kind = ("TransientError" if err is not None and is_transient(err)
            else next((name for name, k in _AGREED_ERRORS.items() if isinstance(err, k)), "RuntimeError"))
    info = broadcast_object((kind, f"{type(err).__name__}: {err}") if err is not None else None, src=bad - 1)
    if err is not None:
        raise err
    if info[0] == "TransientError":  # the exit status (75: restart) must not depend on the rank
        from twa_scale.errors import TransientError
        kind_cls: type[Exception] = TransientError
    else:
        kind_cls = _AGREED_ERRORS.get(info[0], RuntimeError)
    raise kind_cls(f"rank {bad - 1} failed while {what}: {info[1]}")
