"""Asynchronous snapshot streamer: host buffers, background upload, retries, back-pressure.

The training thread calls ``snapshot()``, which only copies this rank's slice of the flat
weights into a preallocated host buffer and returns. On GPU the buffers are pinned and the
device-to-host copy runs on a side CUDA stream from a device staging buffer, so the training
stream only pays a device-to-device copy. Two buffers per rank by default (double buffering).

A background *thread* uploads each shard through fsspec (s3fs multipart, concurrent parts),
retrying transient errors with exponential backoff and jitter for a bounded time. On rank 0 a
second thread commits a snapshot once every rank's shard metadata is in storage: the workers
never issue torch.distributed collectives, so they never race the training thread's process
group. Thread, not process: zlib.crc32, hashing and socket I/O release the GIL, and
bench/streamer.py measures the training-step cost of the thread against a process doing the
same uploads (see its JSON: ``gil``).

Host memory is bounded by ``buffers`` slices plus ``concurrency × part_bytes`` in flight.
When uploads fall behind, ``snapshot()`` blocks (counted as stall seconds) unless
``backpressure="skip"``, which drops the snapshot, counts and logs it; all ranks drop it together (one
small all-reduce of "a buffer is free"), so no rank's shard waits for a commit that cannot happen.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
import uuid
from typing import Callable, Sequence

import torch

from twa_scale import comm, knobs, metrics
from twa_scale import store as _store
from twa_scale.layout import FlatLayout
from twa_scale.store.retry import PERMANENT_ERRORS, RetryDeadlineExceeded, RetryPolicy
from twa_scale.train import preemption
from twa_scale.train.preemption import Preempted

__all__ = ["StreamerConfig", "SnapshotStreamer", "Preempted", "flush_on_sigterm"]

log = logging.getLogger("twa_scale.train.streamer")

_MIN_PART_BYTES = 5 << 20  # S3's smallest multipart part


@dataclasses.dataclass(kw_only=True)
class StreamerConfig:
    """Streamer tunables; the ones a deployment tunes also read ``TWA_SCALE_*`` env variables."""

    dtype: str = "float32"
    """Stored dtype; must match the run's (``create_run(dtype=...)``)."""
    storage_options: dict | None = None
    """fsspec filesystem arguments for the store (``--storage-options``); never logged."""
    part_bytes: int = dataclasses.field(default_factory=knobs.UPLOAD_PART_BYTES.get)
    """Multipart part size for S3 uploads (>= 5 MiB). Env: TWA_SCALE_UPLOAD_PART_BYTES."""
    concurrency: int = dataclasses.field(default_factory=knobs.UPLOAD_CONCURRENCY.get)
    """Parts uploaded at once. Env: TWA_SCALE_UPLOAD_CONCURRENCY."""
    chunk_bytes: int = dataclasses.field(
        default_factory=knobs.CHECKSUM_CHUNK_BYTES.get)
    """Checksum chunk size (CRC-32 per chunk). Env: TWA_SCALE_CHECKSUM_CHUNK_BYTES."""
    buffers: int = 2
    """Host buffers per rank (2 = double buffering)."""
    backpressure: str = dataclasses.field(
        default_factory=knobs.SNAPSHOT_BACKPRESSURE.get)
    """"block" (default; waiting counts as stall) or "skip" (drop, count and log)."""
    upload_timeout_seconds: float = dataclasses.field(
        default_factory=knobs.UPLOAD_TIMEOUT_SECONDS.get)
    """Total time one shard upload may spend retrying before the snapshot is reported failed
    (the deadline of the store's RetryPolicy for shard uploads and commits)."""
    retry_initial_seconds: float = 0.5
    """First backoff delay; doubles per attempt, with ±50% jitter."""
    retry_max_seconds: float = 20.0
    """Largest backoff delay."""
    commit_timeout_seconds: float = dataclasses.field(
        default_factory=knobs.COMMIT_TIMEOUT_SECONDS.get)
    """How long rank 0 waits for every rank's shard of a snapshot before reporting it failed."""
    open_timeout_seconds: float = 120.0
    """How long ranks > 0 wait for rank 0's run.json."""
    session: str | None = None
    """Token naming this launch's objects: unique per launch, equal on all ranks. None: made by
    rank 0 and broadcast when a process group exists, or made locally when world_size is 1."""

    def __post_init__(self):
        _store.check_dtype(self.dtype)
        if self.part_bytes < _MIN_PART_BYTES:
            raise ValueError(f"part_bytes (TWA_SCALE_UPLOAD_PART_BYTES) = {self.part_bytes} is below "
                             f"S3's minimum part size {_MIN_PART_BYTES}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency (TWA_SCALE_UPLOAD_CONCURRENCY) = {self.concurrency} must be >= 1")
        if self.chunk_bytes < 1024 or self.chunk_bytes % 4:
            raise ValueError(f"chunk_bytes (TWA_SCALE_CHECKSUM_CHUNK_BYTES) = {self.chunk_bytes} must be a "
                             "multiple of 4 and >= 1024")
        if self.buffers < 1:
            raise ValueError(f"buffers = {self.buffers} must be >= 1")
        if self.backpressure not in ("block", "skip"):
            raise ValueError(f"backpressure (TWA_SCALE_SNAPSHOT_BACKPRESSURE) = {self.backpressure!r} "
                             "must be 'block' or 'skip'")
        for name in ("upload_timeout_seconds", "commit_timeout_seconds", "open_timeout_seconds",
                     "retry_initial_seconds", "retry_max_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be > 0")
        if self.session is not None and (not self.session.isalnum() or len(self.session) > 64):
            raise ValueError(f"session {self.session!r} must be 1-64 letters or digits")


@dataclasses.dataclass
class _Job:
    seq: int
    step: int
    epoch: int
    epoch_fraction: float | None
    buffer: int
    ready: object  # torch.cuda.Event or None


class SnapshotStreamer:
    """Streams this rank's slice of every snapshot to ``<url>/<run_id>`` in the background.

    Rank 0 must have called ``store.create_run`` first; every rank constructs the streamer at
    the same point (with a process group it broadcasts the session token once, here, on the
    training thread).
    """

    def __init__(self, url: str, run_id: str, layout: FlatLayout, *, rank: int, world_size: int,
                 config: StreamerConfig | None = None, writer: "_store.RunWriter | None" = None):
        self.config = cfg = config or StreamerConfig()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.layout, self.rank, self.world_size = layout, rank, world_size
        self.start, self.stop = layout.slice_for(rank, world_size)  # W > D -> ValueError
        self.session = self._session(cfg.session, world_size)
        # Rank 0 of a training job passes the writer that holds the run's lease (create_run).
        self._writer = writer or _store.open_writer(url, run_id, layout, timeout_seconds=cfg.open_timeout_seconds,
                                                    storage_options=cfg.storage_options, session=self.session)
        self._policy = RetryPolicy(deadline_seconds=cfg.upload_timeout_seconds,
                                   initial_seconds=cfg.retry_initial_seconds, max_seconds=cfg.retry_max_seconds)
        if self._writer.dtype != cfg.dtype:
            raise ValueError(f"run {url}/{run_id} stores {self._writer.dtype} snapshots but "
                             f"StreamerConfig.dtype is {cfg.dtype}")
        dtype = _store.DTYPES[cfg.dtype]
        pin = torch.cuda.is_available()
        # Touch every page now, so the first snapshot does not pay for page faults.
        self._buffers = [torch.zeros(self.stop - self.start, dtype=dtype, pin_memory=pin)
                         for _ in range(cfg.buffers)]
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(cfg.buffers):
            self._free.put(i)
        self._staging: torch.Tensor | None = None
        self._views_key: tuple | None = None
        self._views: list[torch.Tensor] | None = None
        self._staging_done = None
        self._side_stream = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._commits: queue.Queue[int | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._abort_at = float("inf")  # set by close(timeout): retries stop there
        self._pending: set[int] = set()
        self.last_upload_seconds: float | None = None  # of the latest finished upload: how slow the store is now
        self.stats = {"snapshots": 0, "uploaded": 0, "failed": 0, "skipped": 0, "already_committed": 0,
                      "committed": [], "stall_seconds": 0.0, "max_stall_seconds": 0.0, "wait_seconds": 0.0,
                      "upload_seconds": 0.0, "checksum_seconds": 0.0, "bytes": 0, "retries": 0}
        self._uploader = threading.Thread(target=self._upload_loop, name=f"twa-upload-r{rank}", daemon=True)
        self._uploader.start()
        self._committer = None
        if rank == 0:
            self._committer = threading.Thread(target=self._commit_loop, name="twa-commit", daemon=True)
            self._committer.start()

    @staticmethod
    def _session(given: str | None, world_size: int) -> str:
        if given is not None:
            return given
        token = uuid.uuid4().hex[:12]
        if comm.is_distributed():
            return comm.broadcast_object(token, src=0)
        if world_size > 1:
            raise ValueError("world_size > 1 without a torch.distributed process group: pass the same "
                             "StreamerConfig(session=...) to every rank (unique per launch)")
        return token

    # ------------------------------------------------------------------ hot path
    def snapshot(self, seq: int, step: int, epoch: int, params: Sequence[torch.Tensor], *,
                 epoch_fraction: float | None = None) -> bool:
        """Copy this rank's slice of ``params`` (``layout.trainable(model)``) and queue its upload.

        ``step`` (optimizer steps), ``epoch`` (completed epochs) and ``epoch_fraction`` (epochs of
        training done, e.g. 2.5 for a mid-epoch snapshot; None: not recorded) go into the
        snapshot's commit marker.

        Returns True when queued, False when dropped by ``backpressure="skip"``. Blocks while
        both buffers are busy (default); that wait is part of the reported stall.
        """
        t0 = time.perf_counter()
        if self._closed:
            raise RuntimeError(f"snapshot seq {seq}: the streamer is closed")
        if seq < 0:
            raise ValueError(f"snapshot seq must be >= 0, got {seq}")
        if self.config.backpressure == "skip":
            try:
                idx = self._free.get_nowait()
            except queue.Empty:
                idx = None
            if not self._all_ranks_have_a_buffer(idx is not None):
                if idx is not None:
                    self._free.put(idx)
                with self._lock:
                    self.stats["skipped"] += 1
                log.warning("snapshot seq %d skipped on rank %d: %s (backpressure=skip)", seq, self.rank,
                            f"{self.config.buffers} uploads still in flight" if idx is None
                            else "another rank has no free buffer")
                metrics.snapshot_skipped()
                return False
        else:
            idx = self._free.get()
        t_wait = time.perf_counter() - t0
        buf = self._buffers[idx]
        ready = None
        if params and params[0].is_cuda:
            ready = self._copy_from_device(params, buf)
        else:
            self._copy_on_cpu(params, buf)
        with self._lock:
            self._pending.add(seq)
            depth = len(self._pending)
        self._jobs.put(_Job(seq, int(step), int(epoch), None if epoch_fraction is None else float(epoch_fraction),
                            idx, ready))
        stall = time.perf_counter() - t0
        with self._lock:
            s = self.stats
            s["snapshots"] += 1
            s["stall_seconds"] += stall
            s["wait_seconds"] += t_wait
            s["max_stall_seconds"] = max(s["max_stall_seconds"], stall)
        metrics.snapshot_stall(stall)
        metrics.snapshot_queue_depth(depth)
        return True

    def _all_ranks_have_a_buffer(self, mine: bool) -> bool:
        """backpressure=skip: the ranks skip a snapshot together (a shard that one rank skipped would leave
        the others' waiting for a commit that never comes). One tiny all-reduce on the training thread,
        where every rank calls snapshot() at the same step; no store involved."""
        if self.world_size == 1 or not comm.is_distributed():
            return mine
        flag = torch.tensor([1.0 if mine else 0.0])
        return comm.all_reduce(flag, op="min", group=comm.host_group()).item() > 0

    def _copy_on_cpu(self, params: Sequence[torch.Tensor], buf: torch.Tensor) -> None:
        # One copy per parameter tensor opens one OpenMP parallel region each; on busy CPUs
        # that cost ~10x a memcpy (bench, ResNet-50 on 2 shared cores: 307 ms vs 28 ms with one
        # thread, which streams memory as fast as two).
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            self._gather(params, buf)
        finally:
            if threads > 1:
                torch.set_num_threads(threads)

    def _gather(self, params: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        """This rank's slice of the flat weights into ``out``, as ONE ``torch.cat`` over cached views.

        Profiled (bench/streamer.py, thread CPU time): ``layout.gather`` issues ~5 tensor ops per
        parameter (views, slice, copy), ~18 us each on CPU, a third of ResNet-50's stall and 15x the
        memcpy for ResNet-20; one cat over views built once costs a single dispatch (one kernel on GPU).
        The views are rebuilt when a parameter's storage moves; non-contiguous parameters (whose
        ``reshape`` would be a copy, not a view) take the per-tensor path.
        """
        key = tuple((id(p), p.data_ptr()) for p in params)
        if key != self._views_key:
            self._views = self.layout.slice_views(params, self.start, self.stop)
            self._views_key = key
        if self._views is None:
            self.layout.gather(params, self.start, self.stop, out=out)
        else:
            torch.cat(self._views, out=out)

    def _copy_from_device(self, params: Sequence[torch.Tensor], buf: torch.Tensor):
        device = params[0].device
        if self._staging is None:
            self._staging = torch.empty(buf.numel(), dtype=buf.dtype, device=device)
            self._side_stream = torch.cuda.Stream(device=device)
        current = torch.cuda.current_stream(device)
        if self._staging_done is not None:  # the previous device-to-host copy still reads staging
            current.wait_event(self._staging_done)
        # Device-to-device on the training stream (ordered with the optimizer step) ...
        self._gather(params, self._staging)
        gathered = torch.cuda.Event()
        gathered.record(current)
        # ... and device-to-host on the side stream, overlapping the next steps.
        self._side_stream.wait_event(gathered)
        with torch.cuda.stream(self._side_stream):
            buf.copy_(self._staging, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._side_stream)
        self._staging_done = done
        return done

    # ------------------------------------------------------------------ background
    def _retry(self, what: str, fn: Callable, deadline: float):
        def counted(attempt: int, e: BaseException, wait: float) -> None:
            with self._lock:
                self.stats["retries"] += 1
            metrics.snapshot_retry()
            log.warning("rank %d: %s failed (%s: %s); retry %d in %.1fs", self.rank, what,
                        type(e).__name__, e, attempt, wait)

        return self._policy.call(what, fn, deadline=min(deadline, self._abort_at), on_retry=counted)

    def _fail(self, seq: int, why: str) -> None:
        # logged and exported before it is counted: whoever sees stats["failed"] rise also finds the reason
        log.error("snapshot seq %d FAILED on rank %d (not committed; training continues): %s", seq, self.rank, why)
        metrics.snapshot_failure()
        with self._lock:
            self.stats["failed"] += 1

    def _done(self, seq: int) -> None:
        with self._lock:
            self._pending.discard(seq)
            depth = len(self._pending)
        metrics.snapshot_queue_depth(depth)

    def _upload_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            try:
                self._upload(job)
            except Exception as e:  # noqa: BLE001 - the worker must survive anything
                self._fail(job.seq, f"unexpected {type(e).__name__}: {e}")
                if self.rank == 0:
                    self._done(job.seq)
            finally:
                self._free.put(job.buffer)
                if self.rank != 0:
                    self._done(job.seq)
        if self._committer is not None:
            self._commits.put(None)

    def _upload(self, job: _Job) -> None:
        cfg, w = self.config, self._writer
        if job.ready is not None:
            job.ready.synchronize()
        obj = w.shard_object(job.seq, self.rank, self.world_size, self.session)
        deadline = time.monotonic() + cfg.upload_timeout_seconds
        try:
            if self._retry(f"checking commit of seq {job.seq}", lambda: w.is_committed(job.seq), deadline):
                log.info("snapshot seq %d is already committed; keeping it (resume)", job.seq)
                with self._lock:
                    self.stats["already_committed"] += 1
                if self.rank == 0:
                    self._done(job.seq)
                return
            view = memoryview(self._buffers[job.buffer].view(torch.uint8).numpy())
            t_crc = time.perf_counter()
            meta = w.shard_meta(job.seq, rank=self.rank, world_size=self.world_size, session=self.session,
                                view=view, step=job.step, epoch=job.epoch, epoch_fraction=job.epoch_fraction,
                                chunk_bytes=cfg.chunk_bytes)
            t0 = time.perf_counter()
            t_crc = t0 - t_crc
            self._retry(f"uploading {obj}", lambda: w.put_shard(meta, view, part_bytes=cfg.part_bytes,
                                                                 concurrency=cfg.concurrency), deadline)
        except (RetryDeadlineExceeded, *PERMANENT_ERRORS) as e:
            self._fail(job.seq, f"{obj}: {e}")
            if self.rank == 0:
                self._done(job.seq)
            return
        dt = time.perf_counter() - t0
        with self._lock:
            self.stats["uploaded"] += 1
            self.stats["upload_seconds"] += dt
            self.stats["checksum_seconds"] += t_crc
            self.stats["bytes"] += len(view)
        self.last_upload_seconds = dt
        metrics.snapshot_upload(dt, len(view))
        if self.rank == 0:
            self._commits.put(job.seq)

    def _commit_loop(self) -> None:
        waiting: dict[int, float] = {}  # seq -> deadline
        closing = False
        delay = 0.05
        while not (closing and not waiting):
            try:
                item = self._commits.get(timeout=delay if waiting else None)
                if item is None:
                    closing = True
                else:
                    waiting[item] = time.monotonic() + self.config.commit_timeout_seconds
                    delay = 0.05
                continue
            except queue.Empty:
                pass
            for seq in sorted(waiting):
                try:
                    self._try_commit(seq, waiting)
                except Exception as e:  # noqa: BLE001
                    waiting.pop(seq, None)
                    self._fail(seq, f"commit: unexpected {type(e).__name__}: {e}")
                    self._done(seq)
            delay = min(delay * 1.5, 1.0)

    def _try_commit(self, seq: int, waiting: dict[int, float]) -> None:
        w = self._writer
        deadline = waiting[seq]
        now = time.monotonic()
        try:
            metas = w.shard_metas(seq, self.world_size, self.session)
        except PERMANENT_ERRORS:
            raise
        except Exception as e:  # noqa: BLE001 - storage hiccup: look again later
            metas = None
            log.debug("seq %d: reading shard metadata failed: %s", seq, e)
        if metas is not None and all(m is not None for m in metas):
            waiting.pop(seq)
            marker = w.commit_url(seq)
            try:
                self._retry(f"writing {marker}", lambda: w.commit(seq, metas), deadline)
            except (RetryDeadlineExceeded, *PERMANENT_ERRORS) as e:
                self._fail(seq, f"{marker}: {e}")
                self._done(seq)
                return
            with self._lock:
                self.stats["committed"].append(seq)
            metrics.snapshot_committed(seq)
            self._done(seq)
            w.remove_uncommitted(seq)
            return
        if now > min(deadline, self._abort_at):
            waiting.pop(seq)
            absent = [w.shard_object(seq, r, self.world_size, self.session)[: -len(".bin")] + ".json"
                      for r, m in enumerate(metas or [None] * self.world_size) if m is None]
            self._fail(seq, f"shards never appeared: {', '.join(absent)}")
            self._done(seq)

    # ------------------------------------------------------------------ exit
    def pending(self) -> list[int]:
        """Seqs queued, uploading or (rank 0) waiting to commit."""
        with self._lock:
            return sorted(self._pending)

    def close(self, timeout_seconds: float | None = None) -> dict:
        """Upload and commit everything pending, then stop the workers; returns ``stats`` plus
        ``pending`` (seqs not finished when ``timeout_seconds`` ran out; never committed later
        by this process). Without a timeout, waits for the bounded retries to finish."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
        deadline = float("inf") if timeout_seconds is None else time.monotonic() + timeout_seconds
        self._abort_at = deadline
        for t in (self._uploader, self._committer):
            if t is not None:
                t.join(None if deadline == float("inf") else max(0.0, deadline - time.monotonic()))
        left = self.pending()
        if left:
            log.error("rank %d: streamer closed with snapshots %s not finished after %.0fs; they are "
                      "not committed", self.rank, left, timeout_seconds or 0)
        with self._lock:
            out = {k: (list(v) if isinstance(v, list) else v) for k, v in self.stats.items()}
        out["pending"] = left
        out["rank"], out["session"] = self.rank, self.session
        return out

    def __enter__(self) -> "SnapshotStreamer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def flush_on_sigterm(streamer: SnapshotStreamer, deadline_seconds: float | None = None):
    """Close ``streamer`` when the block exits; on SIGTERM (Kubernetes preemption) within a deadline.

    Inside the block SIGTERM raises :class:`Preempted` (exit status 143) in the main thread, at once or,
    inside :func:`twa_scale.train.preemption.deferred`, at the step the ranks agree on; the exit path then
    gives pending snapshots ``deadline_seconds``, by default what is left of the preemption deadline
    (``TWA_SCALE_SIGTERM_FLUSH_SECONDS``, 25 s after the signal: inside Kubernetes' default 30 s grace
    period). Any other exit waits for the bounded upload retries. ``close()`` afterwards returns the summary.
    """
    timeout = None
    with preemption.on_sigterm():  # also during the flush: a second SIGTERM must not kill it
        try:
            yield streamer
        except Preempted:
            timeout = deadline_seconds if deadline_seconds is not None else preemption.seconds_left()
            timeout = knobs.SIGTERM_FLUSH_SECONDS.get() if timeout is None else timeout
            raise
        finally:
            summary = streamer.close(timeout_seconds=timeout)
            if timeout is not None:
                log.warning("SIGTERM: snapshot streamer flushed: committed %s, pending %s",
                            summary["committed"], summary["pending"])
