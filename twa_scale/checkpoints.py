"""DeepSpeed checkpoints of the training job: at each epoch's end and every N optimizer steps inside one.

A checkpoint is a DeepSpeed tag in ``--checkpoint-dir``: ``epoch<E>`` after E epochs, ``epoch<E>-step<S>``
after S optimizer steps of the next epoch (its ``latest`` file names the newest; the newest
:data:`KEEP_CHECKPOINTS` tags, in that order, are kept). Its client state says where in
the data the run stands, so ``--resume`` continues exactly where it stopped, mid-epoch included:

- ``epoch`` (0-based epoch in progress; after an epoch's end, the next one) and ``batch`` (micro-batches
  of that epoch already consumed; the loader starts there with ``start_batch``), ``step_in_epoch``;
- ``ranks``: per rank, the torch RNG states (dropout draws from them) and the partial epoch loss sums
  (float64, as :class:`~twa_scale.steplog.StepLog` keeps them), so the epoch's ``train_loss`` row is the
  one an uninterrupted run writes.

Before a checkpoint is saved every snapshot queued so far is committed (the streamer is drained), so a
resumed run never needs a snapshot from before its checkpoint: the committed sequence has no gap.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path

import torch

from twa_scale import comm, knobs

__all__ = ["KEEP_CHECKPOINTS", "ResumePoint", "save", "load", "drain", "prune", "upload", "fetch", "committed_tags",
           "maybe_fault"]

log = logging.getLogger("twa_scale.checkpoints")
KEEP_CHECKPOINTS = 2  # older DeepSpeed checkpoint tags are deleted (ResNet-50 ones are ~300 MB each)
_TAG = re.compile(r"^epoch(\d+)(?:-step(\d+))?$")


@dataclasses.dataclass
class ResumePoint:
    """Where a resumed run continues: epoch ``epoch`` (0-based), from micro-batch ``batch``."""

    path: str
    epoch: int
    batch: int = 0
    step_in_epoch: int = 0
    rng: dict | None = None
    loss_sum: float = 0.0
    samples: int = 0

    @property
    def mid_epoch(self) -> bool:
        return self.batch > 0


def _all_gather_object(obj) -> list:
    if not comm.is_distributed():
        return [obj]
    import torch.distributed as dist

    out = [None] * comm.world_size()
    dist.all_gather_object(out, obj)
    return out


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def drain(streamer, below: int | None = None, poll_seconds: float = 0.01) -> None:
    """Wait until every snapshot this rank queued (with a seq < ``below``, if given) is uploaded, and on
    rank 0 committed; then a barrier. A snapshot whose upload fails for good stops being pending."""
    if streamer is not None:
        while any(below is None or s < below for s in streamer.pending()):
            time.sleep(poll_seconds)
    comm.barrier()


def save(engine, checkpoint_dir: str, *, epoch: int, batch: int = 0, step_in_epoch: int = 0,
         loss_sum: float = 0.0, samples: int = 0, streamer=None, drain_below: int | None = None,
         url: str | None = None, storage_options=None) -> str:
    """Save the checkpoint of position (``epoch``, ``batch``) on every rank; returns its tag.

    ``batch`` 0 is an epoch boundary (``epoch`` is then the next epoch to run). First every snapshot
    of ``streamer`` (with a seq < ``drain_below``: the ones a resume would not re-take) is committed.
    With ``url``, the checkpoint is then uploaded there (:func:`upload`).
    """
    drain(streamer, below=drain_below)
    ranks = _all_gather_object({"rng": _rng_state(), "loss_sum": float(loss_sum), "samples": int(samples)})
    tag = f"epoch{epoch}" if batch == 0 else f"epoch{epoch}-step{step_in_epoch}"
    client = {"epoch": int(epoch), "batch": int(batch), "step_in_epoch": int(step_in_epoch),
              "global_steps": int(engine.global_steps), "world_size": comm.world_size(), "ranks": ranks}
    engine.save_checkpoint(checkpoint_dir, tag=tag, client_state=client)
    comm.barrier()
    if url:
        upload(checkpoint_dir, tag, url, storage_options)
    if comm.rank() == 0:
        prune(checkpoint_dir, keep=KEEP_CHECKPOINTS)
    return tag


def _tags(checkpoint_dir: str) -> list[Path]:
    """Tag directories, oldest first."""
    found = []
    for p in Path(checkpoint_dir).glob("epoch*"):
        m = _TAG.match(p.name)
        if m and p.is_dir():
            found.append(((int(m.group(1)), int(m.group(2) or 0)), p))
    return [p for _, p in sorted(found)]


def prune(checkpoint_dir: str, keep: int = KEEP_CHECKPOINTS) -> list[str]:
    """Delete all but the newest ``keep`` tags; returns the deleted tag names."""
    old = _tags(checkpoint_dir)[:-keep] if keep else _tags(checkpoint_dir)
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in old]


def load(engine, checkpoint_dir: str, url: str | None = None, storage_options=None) -> ResumePoint | None:
    """Load the newest checkpoint into ``engine`` (every rank); None when there is none. With ``url``,
    a checkpoint missing locally is first downloaded from there (:func:`fetch`)."""
    if url:
        fetch(checkpoint_dir, url, storage_options)
    path, client = engine.load_checkpoint(checkpoint_dir)
    if path is None:
        return None
    client = client or {}
    point = ResumePoint(path=str(path), epoch=int(client["epoch"]), batch=int(client.get("batch", 0)),
                        step_in_epoch=int(client.get("step_in_epoch", 0)))
    ranks = client.get("ranks")
    if point.mid_epoch:
        if not ranks or len(ranks) != comm.world_size():
            from twa_scale.errors import ConfigError

            raise ConfigError(f"--resume: checkpoint {path} was taken mid-epoch by {client.get('world_size')} "
                              f"ranks; a mid-epoch checkpoint resumes only with the same number of ranks "
                              f"(this job has {comm.world_size()})")
        mine = ranks[comm.rank()]
        point.rng, point.loss_sum, point.samples = mine["rng"], mine["loss_sum"], mine["samples"]
    return point


def restore_rng(point: ResumePoint) -> None:
    if point.rng:
        torch.set_rng_state(point.rng["cpu"])
        if "cuda" in point.rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(point.rng["cuda"])


_fault: tuple[int, int] | None = None


def maybe_fault(global_step: int) -> None:
    """Test fault injection (``TWA_SCALE_FAULT_KILL_AT_STEP=RANK:STEP``): SIGKILL this rank after that step."""
    global _fault
    if _fault is None:
        spec = knobs.FAULT_KILL_AT_STEP.get()
        rank, _, step = (spec or "-1:-1").partition(":")
        _fault = (int(rank), int(step))
    if _fault == (comm.rank(), global_step):
        spec = f"{_fault[0]}:{_fault[1]}"
        rank = _fault[0]
        log.warning("TWA_SCALE_FAULT_KILL_AT_STEP=%s: rank %s kills itself after step %d", spec, rank, global_step)
        os.kill(os.getpid(), signal.SIGKILL)


# --- checkpoints on object storage (--checkpoint-url) -------------------------------------------
# DeepSpeed's checkpoint engines (deepspeed.runtime.checkpoint_engine: torch, Nebula, decoupled, fast)
# all torch.save to local paths, and save_checkpoint/load_checkpoint themselves use os.makedirs and
# open() on the `latest` file, so none of them writes to an fsspec URL. A checkpoint is therefore saved
# to --checkpoint-dir (the local staging directory) and then uploaded through the store's backend:
# `<url>/<tag>/<file>` for each file, then `<url>/<tag>/COMMIT.json` last, so a tag is visible (to a
# resume, to pruning) only when complete. The newest KEEP_CHECKPOINTS committed tags are kept there too.
COMMIT = "COMMIT.json"


def _store(url: str, storage_options):
    from twa_scale.store import open_store

    return open_store(url, storage_options)


def committed_tags(store) -> list[str]:
    """Tags with a commit marker in ``store``, oldest first."""
    tags = []
    for key in store.find(""):
        tag, _, name = key.partition("/")
        m = _TAG.match(tag)
        if m and name == COMMIT:
            tags.append(((int(m.group(1)), int(m.group(2) or 0)), tag))
    return [t for _, t in sorted(tags)]


def upload(checkpoint_dir: str, tag: str, url: str, storage_options=None, keep: int = KEEP_CHECKPOINTS) -> None:
    """Upload tag ``tag`` of ``checkpoint_dir`` to ``url`` (every rank calls this after the save).

    Local rank 0 of each node uploads the files its node holds (on a shared volume every node sees
    all; the puts are idempotent); rank 0 writes the commit marker once every node is done, then
    prunes the store to the newest ``keep`` committed tags.
    """
    import json

    local = Path(checkpoint_dir) / tag
    mine = sorted(p.name for p in local.iterdir() if p.is_file()) if comm.local_rank() == 0 else []
    listed = _all_gather_object(mine)
    if comm.local_rank() == 0:
        store = _store(url, storage_options)
        for name in mine:
            data = (local / name).read_bytes()
            store.put_large(f"{tag}/{name}", memoryview(data))
    comm.barrier()
    if comm.rank() == 0:
        store = _store(url, storage_options)
        files = sorted(set().union(*map(set, listed)))
        store.put_small(f"{tag}/{COMMIT}", json.dumps({"tag": tag, "files": files}).encode())
        for old in committed_tags(store)[:-keep]:
            store.delete(f"{old}/{COMMIT}")  # invisible first, then the files
            for key in store.find(old):
                store.delete(key)
        log.info("checkpoint %s committed to %s", tag, url)


def fetch(checkpoint_dir: str, url: str, storage_options=None) -> str | None:
    """Make the checkpoint a resume loads present in ``checkpoint_dir`` on every node; returns its tag.

    The local ``latest`` of rank 0 wins (a shared volume, or a node that kept its disk); else the newest
    committed tag on ``url``, downloaded by local rank 0 of each node where files are missing.
    """
    import json

    tag = None
    if comm.rank() == 0:
        latest = Path(checkpoint_dir) / "latest"
        if latest.is_file() and (Path(checkpoint_dir) / latest.read_text().strip()).is_dir():
            tag = latest.read_text().strip()
        else:
            tags = committed_tags(_store(url, storage_options))
            tag = tags[-1] if tags else None
    tag = comm.broadcast_object(tag)
    if tag is not None and comm.local_rank() == 0:
        store = _store(url, storage_options)
        local = Path(checkpoint_dir) / tag
        if store.exists(f"{tag}/{COMMIT}"):
            files = json.loads(store.get(f"{tag}/{COMMIT}"))["files"]
            missing = [f for f in files if not (local / f).is_file()]
            if missing:
                local.mkdir(parents=True, exist_ok=True)
                for name in missing:
                    tmp = local / f".{name}.part"
                    tmp.write_bytes(store.get(f"{tag}/{name}"))
                    os.replace(tmp, local / name)
                log.warning("--resume: downloaded checkpoint %s (%d files) from %s", tag, len(missing), url)
        if local.is_dir():
            (Path(checkpoint_dir) / "latest").write_text(tag)
    comm.barrier()
    return tag
