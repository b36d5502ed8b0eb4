"""DeepSpeed checkpoints of the training job: at each epoch's end and every N optimizer steps inside one.

A checkpoint is a DeepSpeed tag in ``--checkpoint-dir``: ``epoch<E>`` after E epochs, ``epoch<E>-step<S>``
after S optimizer steps of the next epoch (its ``latest`` file names the newest; the newest
:data:`KEEP_CHECKPOINTS` tags, in that order, are kept). Its client state says where in
the data the run stands, so ``--resume`` continues exactly where it stopped, mid-epoch included:

- ``epoch`` (0-based epoch in progress; after an epoch's end, the next one) and ``batch`` (micro-batches
  of that epoch already consumed; the loader starts there with ``start_batch``), ``step_in_epoch``;
- ``ranks``: per rank, the torch RNG states (dropout draws from them), the partial epoch loss sums
  (float64, as :class:`~twa_scale.train.steplog.StepLog` keeps them), so the epoch's ``train_loss`` row is the
  one an uninterrupted run writes, and the model's buffers (BatchNorm running statistics). Each rank
  updates its running statistics from its own batches and evaluates its part of the validation set with
  them, while DeepSpeed saves rank 0's module only; a resume with the same number of ranks gives every
  rank its own back (:func:`load`), so ``val_loss`` and ``val_accuracy`` are the uninterrupted run's too.

On SIGTERM every rank saves one at the same step (twa_scale/train/preemption.py), if it fits in the deadline.

Before a checkpoint is saved every snapshot queued so far is committed (the streamer is drained) and the
metrics rows it covers are written, so a resumed run never needs a snapshot or a row from before its
checkpoint: the committed sequence has no gap. Training waits for that at most
``TWA_SCALE_CHECKPOINT_WAIT_SECONDS``; in a store outage the checkpoint is skipped (a warning) and the
next one covers it, so the steps go on.

Checkpoints fail safe: a resume loads the newest *intact* tag. A tag whose commit marker is empty, truncated
or fails its seal, or one of whose files is missing or fails its recorded size or SHA-256
(:class:`~twa_scale.store.format.CheckpointCommit`), is skipped with a warning naming the object; when no
tag is intact the job ends with one line and exit 2 on every rank (:class:`CheckpointError`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import torch

from twa_scale import comm, knobs
from twa_scale.errors import ConfigError

__all__ = ["KEEP_CHECKPOINTS", "ResumePoint", "Uploader", "save", "load", "drain", "prune", "fetch", "newest",
           "committed_tags", "scan_tags", "maybe_fault", "CheckpointError"]

log = logging.getLogger("twa_scale.train.checkpoints")
KEEP_CHECKPOINTS = 2  # older DeepSpeed checkpoint tags are deleted (ResNet-50 ones are ~300 MB each)
_TAG = re.compile(r"^epoch(\d+)(?:-step(\d+))?$")


class CheckpointError(ConfigError):
    """Checkpoints exist but none is intact: a resume cannot continue (exit 2, on every rank)."""


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


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's module buffers (BatchNorm running statistics), on the CPU."""
    return {name: b.detach().cpu() for name, b in module.named_buffers()}


def _restore_buffers(module: torch.nn.Module, saved: dict, path) -> None:
    """Copy this rank's saved buffers back into ``module``; a checkpoint for another model is a one-line error."""
    own = dict(module.named_buffers())
    if not isinstance(saved, dict) or set(saved) != set(own) or any(
            not isinstance(saved[n], torch.Tensor) or saved[n].shape != b.shape for n, b in own.items()):
        raise CheckpointError(f"--resume: checkpoint {path}: its per-rank buffers do not match this model's "
                              f"({len(own)} buffers); it was saved by a different model")
    with torch.no_grad():
        for name, b in own.items():
            b.copy_(saved[name])


def drain(streamer, below: int | None = None, poll_seconds: float = 0.01,
          timeout_seconds: float | None = None, stored=None) -> bool:
    """Wait until every snapshot this rank queued (with a seq < ``below``, if given) is uploaded, and on
    rank 0 committed, and ``stored()`` (if given: this rank's other background writes, e.g. metrics
    rows) is True; then meet the other ranks. A snapshot whose upload fails for good stops being
    pending. With ``timeout_seconds``, returns whether every rank finished in time (one all-reduce)."""
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    done = True

    def busy() -> bool:
        return (streamer is not None and any(below is None or s < below for s in streamer.pending())) \
            or (stored is not None and not stored())

    while busy():
        if deadline is not None and time.monotonic() > deadline:
            done = False
            break
        time.sleep(poll_seconds)
    if deadline is None:
        comm.barrier()
        return True
    flag = torch.tensor([1.0 if done else 0.0], device=comm.device())
    return bool(comm.all_reduce(flag, op="min").item())


def save(engine, checkpoint_dir: str, *, epoch: int, batch: int = 0, step_in_epoch: int = 0,
         loss_sum: float = 0.0, samples: int = 0, streamer=None, drain_below: int | None = None,
         uploader: Uploader | None = None, drain_seconds: float | None = None, stored=None) -> str | None:
    """Save the checkpoint of position (``epoch``, ``batch``) on every rank; returns its tag.

    ``batch`` 0 is an epoch boundary (``epoch`` is then the next epoch to run). First every snapshot
    of ``streamer`` (with a seq < ``drain_below``: the ones a resume would not re-take) is committed,
    and ``stored()`` is True (rank 0: the metrics rows a resume reads are written); if that takes more
    than ``drain_seconds`` on any rank (the SIGTERM deadline; in training, TWA_SCALE_CHECKPOINT_WAIT_SECONDS
    so that a store outage does not stop the steps), no checkpoint is saved (None): one would need
    snapshots or rows that may never reach the store. With ``uploader``, the checkpoint is then queued
    for upload (in the background).
    """
    if not drain(streamer, below=drain_below, timeout_seconds=drain_seconds, stored=stored):
        log.warning("checkpoint at epoch %d, batch %d not saved: the store has not caught up after %.0f s "
                    "(snapshots %s uncommitted%s); training goes on, the next checkpoint covers this one",
                    epoch, batch, drain_seconds, streamer.pending() if streamer is not None else [],
                    "" if stored is None or stored() else ", metrics rows not yet written")
        return None
    ranks = _all_gather_object({"rng": _rng_state(), "loss_sum": float(loss_sum), "samples": int(samples),
                                "buffers": _buffers(engine.module)})
    tag = f"epoch{epoch}" if batch == 0 else f"epoch{epoch}-step{step_in_epoch}"
    client = {"epoch": int(epoch), "batch": int(batch), "step_in_epoch": int(step_in_epoch),
              "global_steps": int(engine.global_steps), "world_size": comm.world_size(), "ranks": ranks}
    engine.save_checkpoint(checkpoint_dir, tag=tag, client_state=client)
    comm.barrier()  # every rank of the node has written its files
    if uploader is not None:
        uploader.submit(checkpoint_dir, tag)
    if comm.local_rank() == 0:
        prune(checkpoint_dir, keep=KEEP_CHECKPOINTS, busy=uploader.busy() if uploader else ())
    return tag


def _tags(checkpoint_dir: str) -> list[Path]:
    """Tag directories, oldest first."""
    found = [p for p in Path(checkpoint_dir).glob("epoch*") if _TAG.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: _tag_key(p.name))


def prune(checkpoint_dir: str, keep: int = KEEP_CHECKPOINTS, busy=()) -> list[str]:
    """Delete all but the newest ``keep`` tags, and never a tag in ``busy`` (being uploaded); returns
    the deleted tag names."""
    old = [p for p in (_tags(checkpoint_dir)[:-keep] if keep else _tags(checkpoint_dir)) if p.name not in busy]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in old]


def load(engine, checkpoint_dir: str, url: str | None = None, storage_options=None) -> ResumePoint | None:
    """Load the newest intact checkpoint into ``engine`` (every rank); None when there is none. With ``url``,
    a checkpoint missing or damaged locally is first downloaded from there (:func:`fetch`: a damaged tag is
    skipped for the one before it)."""
    from twa_scale.train.engine import UnsafeCheckpointError

    if url:
        fetch(checkpoint_dir, url, storage_options)
    try:
        path, client = engine.load_checkpoint(checkpoint_dir)
    except UnsafeCheckpointError as e:  # a file from the store that would run code when unpickled
        where = Path(e.path)
        name = f"{url.rstrip('/')}/{where.parent.name}/{where.name}" if url else str(where)
        raise CheckpointError(f"--resume: checkpoint {name}: {e.reason}; delete that checkpoint tag") from None
    if path is None:
        return None
    client = client or {}
    point = ResumePoint(path=str(path), epoch=int(client["epoch"]), batch=int(client.get("batch", 0)),
                        step_in_epoch=int(client.get("step_in_epoch", 0)))
    ranks = client.get("ranks")
    if ranks and len(ranks) == comm.world_size() and "buffers" in ranks[comm.rank()]:
        _restore_buffers(engine.module, ranks[comm.rank()]["buffers"], path)
    # (With another number of ranks, every rank keeps rank 0's buffers, which DeepSpeed loaded: the data
    # is split differently then, so no resume could reproduce the old run's evaluation anyway.)
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


_fault: tuple[int, int, str] | None = None


def maybe_fault(global_step: int) -> None:
    """Test fault injection (``TWA_SCALE_FAULT_KILL_AT_STEP=RANK:STEP[:TERM]``): rank RANK sends itself
    SIGKILL (or SIGTERM, with ``:TERM``) after that step.

    Before a SIGKILL every rank lets its checkpoint uploads in flight finish and meets the others at a
    barrier, so what a test can assert (the newest checkpoint is on the store) does not depend on thread
    timing; a real crash can lose an upload in flight, and the resume then starts from the tag before it.
    A SIGTERM is sent as it comes: only that rank sees it, and the others learn of it from the agreement
    (twa_scale/train/preemption.py).
    """
    global _fault
    if _fault is None:
        spec = knobs.FAULT_KILL_AT_STEP.get() or "-1:-1"
        try:
            rank, step, *sig = spec.split(":")
            if sig not in ([], ["TERM"]):
                raise ValueError
            _fault = (int(rank), int(step), sig[0] if sig else "KILL")
        except ValueError:
            raise ValueError(f"TWA_SCALE_FAULT_KILL_AT_STEP={spec!r}: expected RANK:STEP or RANK:STEP:TERM, "
                             "e.g. 1:18") from None
    rank, step, sig = _fault
    if global_step != step:
        return
    if sig == "TERM":
        if comm.rank() == rank:
            log.warning("TWA_SCALE_FAULT_KILL_AT_STEP=%d:%d:TERM: rank %d sends itself SIGTERM after step %d",
                        rank, step, rank, global_step)
            os.kill(os.getpid(), signal.SIGTERM)
        return
    for uploader in list(_UPLOADERS):
        uploader.wait()
    comm.barrier()
    if comm.rank() == rank:
        log.warning("TWA_SCALE_FAULT_KILL_AT_STEP=%d:%d: rank %d kills itself after step %d", rank, step, rank,
                    global_step)
        os.kill(os.getpid(), signal.SIGKILL)


# --- checkpoints on object storage (--checkpoint-url) -------------------------------------------
# DeepSpeed's checkpoint engines (deepspeed.runtime.checkpoint_engine: torch, Nebula, decoupled, fast)
# all torch.save to local paths, and save_checkpoint/load_checkpoint themselves use os.makedirs and
# open() on the `latest` file, so none of them writes to an fsspec URL. A checkpoint is therefore saved
# to --checkpoint-dir (the local staging directory) and then uploaded through the store's backend, in
# the background (:class:`Uploader`): `<url>/<tag>/<file>` for each file, a marker per node, then
# `<url>/<tag>/COMMIT.json` last, so a tag is visible (to a resume, to pruning) only when complete.
# The newest KEEP_CHECKPOINTS committed tags are kept there too.
COMMIT = "COMMIT.json"
_UPLOADERS: list["Uploader"] = []  # open uploaders of this process (maybe_fault lets them finish)


def _store(url: str, storage_options):
    from twa_scale.store import open_store

    return open_store(url, storage_options)


def _tag_key(tag: str) -> tuple[int, int]:
    m = _TAG.match(tag)
    return int(m.group(1)), int(m.group(2) or 0)


def _read_commit(store, tag: str, raw: bytes | None = None):
    """The commit record of ``tag`` (FileNotFoundError when there is none, FormatError when it is damaged)."""
    from twa_scale.store.format import CheckpointCommit, FormatError

    key = f"{tag}/{COMMIT}"
    commit = CheckpointCommit.from_json(store.get(key) if raw is None else raw, store.describe(key))
    if commit.tag != tag:
        raise FormatError(f"{store.describe(key)} records tag {commit.tag!r}")
    return commit


def scan_tags(store) -> tuple[list[str], dict[str, str], dict[str, int]]:
    """(intact tags oldest first, {tag: problem} of damaged ones, {key: size} of every object), from one
    listing and one read of each marker. Intact here: the marker is a valid record and every file it lists
    is present with its recorded size; each file's SHA-256 is checked when a resume downloads it."""
    from twa_scale.store.format import FormatError

    sizes = store.sizes("")
    tags = sorted({t for t, _, name in (k.partition("/") for k in sizes) if name == COMMIT and _TAG.match(t)},
                  key=_tag_key)
    intact, damaged = [], {}
    for tag, raw in zip(tags, store.get_many([f"{t}/{COMMIT}" for t in tags]) if tags else []):
        if isinstance(raw, FileNotFoundError):
            continue  # deleted since the listing (pruned)
        if isinstance(raw, BaseException):
            raise raw
        try:
            commit = _read_commit(store, tag, raw)
        except FormatError as e:
            damaged[tag] = str(e)
            continue
        for f in commit.files:
            key = f"{tag}/{f.name}"
            if key not in sizes:
                damaged[tag] = f"{store.describe(key)} is missing"
            elif f.bytes is not None and sizes[key] != f.bytes:
                damaged[tag] = (f"{store.describe(key)} has {sizes[key]} bytes, the commit records {f.bytes} "
                                f"(truncated or overwritten)")
            else:
                continue
            break
        else:
            intact.append(tag)
    return intact, damaged, sizes


def committed_tags(store) -> list[str]:
    """Intact committed tags in ``store``, oldest first (see :func:`scan_tags`)."""
    return scan_tags(store)[0]


class Uploader:
    """Uploads checkpoint tags to ``url`` in a background thread, so training never waits for the store.

    One per process; only local rank 0 of each node uploads (the files its node's ranks wrote), then
    writes ``<tag>/nodes/<node>.json``; rank 0 commits the tag once every node's marker is there and
    prunes the store. Every store call retries transient errors up to ``TWA_SCALE_STORE_RETRY_SECONDS``,
    so an outage delays uploads and costs training nothing. While one tag uploads, a newer one replaces
    any tag still waiting (only the newest matters to a resume); :meth:`busy` names the tags local
    pruning must keep. A tag whose upload fails for good is logged and skipped: the local copy stays,
    and the next tag is tried.
    """

    def __init__(self, url: str, storage_options=None, *, keep: int = KEEP_CHECKPOINTS):
        from twa_scale.store import RetryPolicy

        self.url, self.keep = url, keep
        self.uploads = comm.local_rank() == 0
        self.leader = comm.rank() == 0
        self.node, self.nodes = comm.node_rank(), max(1, comm.world_size() // comm.local_world_size())
        self._store = _store(url, storage_options) if self.uploads else None
        self._retry = RetryPolicy()
        self._cond = threading.Condition()
        self._waiting: tuple[str, Path] | None = None
        self._current: str | None = None
        self._closed = False
        self.committed: list[str] = []
        self.failed: list[str] = []
        self.upload_seconds = 0.0  # of the last finished upload: what a SIGTERM checkpoint must budget for
        self._thread = None
        if self.uploads:
            self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
            self._thread.start()
        _UPLOADERS.append(self)

    @classmethod
    @contextlib.contextmanager
    def closing(cls, url: str | None, storage_options=None):
        """``with Uploader.closing(url) as up:`` (None when ``url`` is None). On a normal exit the uploads
        finish, each bounded by the retry deadline; when an exception (SIGTERM) ends the block they get
        what is left of the preemption deadline (``TWA_SCALE_SIGTERM_FLUSH_SECONDS`` after the SIGTERM;
        that long after any other exception)."""
        if not url:
            yield None
            return
        up = cls(url, storage_options)
        try:
            yield up
        except BaseException:
            from twa_scale.train import preemption

            left = preemption.seconds_left()
            up.close(timeout=knobs.SIGTERM_FLUSH_SECONDS.get() if left is None else left)
            raise
        up.close()

    def submit(self, checkpoint_dir: str, tag: str) -> None:
        """Queue tag ``tag`` of ``checkpoint_dir`` (saved and complete on this node); returns at once."""
        if not self.uploads:
            return
        with self._cond:
            if self._waiting is not None:
                log.info("checkpoint %s superseded by %s before its upload started", self._waiting[0], tag)
            self._waiting = (tag, Path(checkpoint_dir) / tag)
            self._cond.notify_all()

    def busy(self) -> set[str]:
        """Tags being uploaded or waiting: local pruning keeps them."""
        with self._cond:
            return {t for t in (self._current, self._waiting and self._waiting[0]) if t}

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is uploading or waiting (True), or ``timeout`` seconds pass (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._current is None and self._waiting is None, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish the uploads (at most ``timeout`` seconds; None: each bounded by the retry deadline)."""
        done = self.wait(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if not done:
            log.error("checkpoint upload to %s still unfinished after %.0f s; the local checkpoint in "
                      "--checkpoint-dir is kept", self.url, timeout)
        if self in _UPLOADERS:
            _UPLOADERS.remove(self)
        return done

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting is not None or self._closed)
                if self._waiting is None:
                    return
                (tag, local), self._waiting = self._waiting, None
                self._current = tag
            try:
                t0 = time.monotonic()
                self._upload(tag, local)
                self.upload_seconds = time.monotonic() - t0
            except Exception as e:  # noqa: BLE001 - a lost upload must not end training: the next tag retries
                self.failed.append(tag)
                log.error("checkpoint %s: upload to %s failed (%s: %s); the local copy is kept",
                          tag, self.url, type(e).__name__, e)
            finally:
                with self._cond:
                    self._current = None
                    self._cond.notify_all()

    def _upload(self, tag: str, local: Path) -> None:
        from twa_scale.store.format import CheckpointFile, CheckpointNode

        st, call = self._store, self._retry.call
        files = []
        for name in sorted(p.name for p in local.iterdir() if p.is_file()):
            data = (local / name).read_bytes()
            call(f"uploading {st.describe(f'{tag}/{name}')}", lambda n=name, d=data: st.put_large(f"{tag}/{n}",
                                                                                                  memoryview(d)))
            files.append(CheckpointFile(name=name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
        key = f"{tag}/nodes/{self.node}.json"
        marker = CheckpointNode(tag=tag, node=self.node, files=tuple(files), written_at=time.time()).to_json()
        call(f"writing {st.describe(key)}", lambda: st.put_small(key, marker))
        if self.leader:
            self._commit(tag)

    def _commit(self, tag: str) -> None:
        """Rank 0: once every node's marker is in, write COMMIT.json, then prune older tags."""
        from twa_scale.store.format import CheckpointCommit, CheckpointNode, FormatError

        st, call = self._store, self._retry.call
        deadline = time.monotonic() + self._retry.deadline_seconds
        listed: dict[str, CheckpointNode] = {}
        while len(listed) < self.nodes:
            # Each node's marker by name, not a listing: an object store's listing can lag its writes.
            for key in (f"{tag}/nodes/{n}.json" for n in range(self.nodes)):
                if key in listed:
                    continue
                try:
                    listed[key] = CheckpointNode.from_json(st.get(key), st.describe(key))
                except FileNotFoundError:
                    pass  # that node is still uploading
                except FormatError:
                    pass  # partial or empty: read again on the next round
                except Exception as e:  # noqa: BLE001 - transient: next round, bounded by the deadline
                    log.warning("checkpoint %s: reading %s failed (%s: %s); retrying", tag, st.describe(key),
                                type(e).__name__, e)
            if len(listed) >= self.nodes:
                break
            with self._cond:
                if self._waiting is not None or time.monotonic() > deadline:  # a newer tag wins; theirs too
                    log.warning("checkpoint %s: %d of %d nodes uploaded; not committed", tag, len(listed),
                                self.nodes)
                    return
            time.sleep(0.2)
        files = {f.name: f for node in listed.values() for f in node.files}
        commit = CheckpointCommit(tag=tag, files=tuple(files[n] for n in sorted(files)), committed_at=time.time())
        call(f"writing {st.describe(f'{tag}/{COMMIT}')}", lambda: st.put_small(f"{tag}/{COMMIT}", commit.to_json()))
        self.committed.append(tag)
        log.info("checkpoint %s committed to %s", tag, self.url)
        self._prune(tag)

    def _prune(self, newest: str) -> None:
        """Delete every tag older than the newest ``keep`` intact ones, committed or not (an upload
        superseded or abandoned leaves files without a marker): the marker first, then the files."""
        st, call = self._store, self._retry.call
        intact, _, sizes = call(f"listing {self.url}", lambda: scan_tags(st))
        oldest = min((_tag_key(t) for t in intact[-self.keep:]), default=_tag_key(newest))
        by_tag: dict[str, list[str]] = {}
        for key in sizes:
            tag = key.partition("/")[0]
            if _TAG.match(tag):
                by_tag.setdefault(tag, []).append(key)
        for tag in sorted((t for t in by_tag if _tag_key(t) < oldest), key=_tag_key):
            for key in sorted(by_tag[tag], key=lambda k: not k.endswith(f"/{COMMIT}")):  # invisible first
                call(f"deleting {st.describe(key)}", lambda k=key: st.delete(k))


def _local_latest(checkpoint_dir: str) -> str | None:
    """The tag the local ``latest`` file names, when that tag's directory exists."""
    latest = Path(checkpoint_dir) / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag and (Path(checkpoint_dir) / tag).is_dir():
            return tag
    return None


def _intact_on_store(store, url: str, local: str | None = None) -> list[str]:
    """Intact tags on the store, newest first, each damaged tag newer than the newest intact one named in
    a warning; CheckpointError when there are tags but none is intact (and no local ``latest``)."""
    intact, damaged, _ = scan_tags(store)
    newest_ok = _tag_key(intact[-1]) if intact else (-1, -1)
    for tag, problem in damaged.items():
        if _tag_key(tag) > newest_ok:
            log.warning("--resume: skipping damaged checkpoint %s: %s", tag, problem)
    if damaged and not intact and local is None:
        raise CheckpointError(_none_intact(url, damaged))
    return intact[::-1]


def _none_intact(where: str, damaged: dict[str, str]) -> str:
    """One line naming every damaged tag's problem, newest first."""
    tags = sorted(damaged, key=_tag_key, reverse=True)
    return f"--resume: no intact checkpoint in {where} ({len(tags)} damaged: " + \
        "; ".join(f"{t}: {damaged[t]}" for t in tags) + ")"


def newest(checkpoint_dir: str, url: str | None, storage_options=None) -> tuple[str, str] | None:
    """(tag, where it is) of the checkpoint a resume on this node would try first: the local ``latest``,
    else the newest intact tag on ``url`` (if given); None when there is none. CheckpointError when the
    store holds checkpoints but none is intact."""
    local = _local_latest(checkpoint_dir)
    if local:
        return local, checkpoint_dir
    tags = _intact_on_store(_store(url, storage_options), url) if url else []
    return (tags[0], url) if tags else None


def _materialise(checkpoint_dir: str, store, tag: str) -> str | None:
    """Local rank 0: make every file of ``tag`` present and intact in ``checkpoint_dir``, downloading what is
    missing or fails its size or SHA-256; None when done, else the first problem (naming the object)."""
    from twa_scale.store.format import FormatError

    local = Path(checkpoint_dir) / tag
    try:
        commit = _read_commit(store, tag) if store is not None else None
    except (FileNotFoundError, FormatError) as e:
        if local.is_dir():
            return None  # this node's own copy, never uploaded: nothing to check it against
        return str(e)
    if commit is None:
        return None if local.is_dir() else f"{local} does not exist"
    fetched, created = 0, not local.exists()
    for f in commit.files:
        path = local / f.name
        if path.is_file() and f.problem(path.read_bytes(), str(path)) is None:
            continue
        key = f"{tag}/{f.name}"
        try:
            data = store.get(key)
            problem = f.problem(data, store.describe(key))
        except FileNotFoundError:
            problem = f"{store.describe(key)} is missing"
        if problem:
            if created:  # no partial tag directory left for local pruning to count
                shutil.rmtree(local, ignore_errors=True)
            return problem
        local.mkdir(parents=True, exist_ok=True)
        tmp = local / f".{f.name}.part"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        fetched += 1
    if fetched:
        log.warning("--resume: downloaded checkpoint %s (%d files) from %s", tag, fetched, store.url)
    return None


def fetch(checkpoint_dir: str, url: str | None, storage_options=None) -> str | None:
    """Make the checkpoint a resume loads present and intact in ``checkpoint_dir`` on every node, and name it in
    ``latest``; returns its tag (None when there is no checkpoint at all).

    Candidates, in order: rank 0's local ``latest`` (a shared volume, or a node that kept its disk), then the
    intact tags on ``url``, newest first. Local rank 0 of each node checks every file of a candidate against
    its commit record and downloads what is missing or damaged; a candidate that fails on any node is skipped
    with a warning naming the object. None intact: :class:`CheckpointError` on every rank.
    """
    store = _store(url, storage_options) if url and comm.local_rank() == 0 else None

    def plan() -> tuple[list[str], str | None]:
        if comm.rank() != 0:
            return [], None
        local = _local_latest(checkpoint_dir)
        try:
            remote = _intact_on_store(store, url, local) if store is not None else []
        except CheckpointError as e:
            return [], str(e)
        return ([local] if local else []) + [t for t in remote if t != local], None

    candidates, fatal = comm.broadcast_object(comm.agree(plan, "listing checkpoints (--resume)"))
    if fatal:
        raise CheckpointError(fatal)
    problems: dict[str, str] = {}
    for tag in candidates:
        problem = comm.agree(lambda t=tag: _materialise(checkpoint_dir, store, t) if comm.local_rank() == 0 else None,
                             f"downloading checkpoint {tag}")
        bad = [p for p in _all_gather_object(problem) if p]
        if not bad:
            if comm.local_rank() == 0:
                Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
                (Path(checkpoint_dir) / "latest").write_text(tag)
            comm.barrier()
            return tag
        problems[tag] = bad[0]
        if comm.rank() == 0:
            log.warning("--resume: checkpoint %s is damaged (%s); falling back to the previous one", tag, bad[0])
    if problems:
        raise CheckpointError(_none_intact(url or checkpoint_dir, problems))
    comm.barrier()
    return None
