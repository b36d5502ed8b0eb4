"""Prometheus metric catalogue and the per-node exporter.

Usage (every rank)::

    from twa_scale import metrics
    metrics.setup(run_id="r1", role="train", port=9400)   # local rank 0 serves /metrics
    metrics.train_step(seconds=0.12, samples=256, loss=2.3, lr=0.1)

Every recording function is a cheap no-op until :func:`setup` ran, so library
code may call them unconditionally (tests, notebooks, the TWA maths).

One exporter per node
---------------------
All local ranks of a node write their values to memory-mapped files in one
directory (prometheus_client *multiprocess mode*); only local rank 0 serves
HTTP and merges the files with ``MultiProcessCollector``. Counters and
histograms are summed over processes; gauges use ``mostrecent`` so no ``pid``
label leaks into the exposition. Every series carries ``run_id``, ``role``,
``node`` and ``rank`` (global rank), so per-rank values never collide.

The directory is ``$TWA_SCALE_METRICS_DIR`` or ``$PROMETHEUS_MULTIPROC_DIR`` when
set, otherwise ``<tmp>/twa_scale_metrics-<uid>/<run_id>-<port>-<launcher pid>``:
all local ranks of one ``deepspeed`` launch are children of the same launcher
process, so they agree on the directory without talking, and two runs on one
machine never share it. Local rank 0 deletes only files (and old per-launch
directories) whose writer process is dead, so there is no race with other
local ranks that start first.

End of run: a short job can finish between two scrapes. When local rank 0
exits and Prometheus has scraped this exporter at least once, the exporter
stays up until one more scrape has read the final values, for at most
``$TWA_SCALE_METRICS_LINGER_SECONDS`` (default 30 s). With no scraper seen, it
exits at once.
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from types import SimpleNamespace

from twa_scale import knobs
from twa_scale.knobs import env_int

__all__ = [
    "MetricsPortInUseError", "setup", "shutdown",
    "train_step", "train_epoch", "snapshot_stall", "snapshot_upload",
    "snapshot_retry", "snapshot_failure", "snapshot_skipped", "snapshot_queue_depth",
    "snapshot_committed", "twa_load", "twa_projection", "twa_step", "twa_eval",
    "twa_effective_rank", "twa_coefficients", "twa_probe", "data_bad_images",
]

log = logging.getLogger(__name__)

PREFIX = "twa_scale_"
LABELS = ("run_id", "role", "node", "rank")
DEFAULT_MAX_SERIES = 256

# Bucket edges in seconds, chosen for the span each timer really covers.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STALL_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)
UPLOAD_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LOAD_BUCKETS = UPLOAD_BUCKETS
PROJECTION_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)


class MetricsPortInUseError(RuntimeError):
    """The exporter's port is taken by another process on this node."""


_lock = threading.Lock()
_m = None   # _Bound metric children of this process; None = disabled (every call a no-op)
_state = SimpleNamespace(server=None, port=None,
                         scrapes=0, is_rank0=False, max_series=DEFAULT_MAX_SERIES,
                         atexit_registered=False, families=None, coef_warned=False)


# --------------------------------------------------------------------------- setup
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:64] or "run"


def _choose_dir(run_id: str, port: int | None) -> tuple[str, bool]:
    """Directory shared by the local ranks of this launch; (path, per_launch)."""
    for path in (knobs.METRICS_DIR.get(), os.environ.get("PROMETHEUS_MULTIPROC_DIR")):
        if path:
            return path, False
    # All local ranks of one launcher share its pid; a lone process uses its own.
    launcher = os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()
    base = os.path.join(tempfile.gettempdir(), f"twa_scale_metrics-{os.getuid()}")   # per user: /tmp is shared
    return os.path.join(base, f"{_safe(run_id)}-{port or 0}-{launcher}"), True


def _prune_stale(path: str, per_launch: bool) -> None:
    """Delete value files (and old per-launch dirs) whose writer is dead. Race-free:
    a live process's files are never touched."""
    for name in os.listdir(path):
        m = re.fullmatch(r".*_(\d+)\.db", name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(path, name))
            except FileNotFoundError:
                pass
    if per_launch:
        base = os.path.dirname(path)
        for name in os.listdir(base):
            m = re.fullmatch(r".*-(\d+)", name)
            full = os.path.join(base, name)
            if full != path and m and not _pid_alive(int(m.group(1))):
                shutil.rmtree(full, ignore_errors=True)


def _build_families(max_series: int) -> SimpleNamespace:
    """Create the metric objects. Done lazily, after PROMETHEUS_MULTIPROC_DIR is set,
    because prometheus_client binds a metric's storage when the object is made."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    # Private registry: the node exporter serves the merged files, never these objects.
    reg = CollectorRegistry()

    def counter(name, doc):
        return Counter(PREFIX + name, doc, LABELS, registry=reg)

    def gauge(name, doc, extra=()):
        return Gauge(PREFIX + name, doc, LABELS + tuple(extra), registry=reg,
                     multiprocess_mode="mostrecent")

    def hist(name, doc, buckets):
        return Histogram(PREFIX + name, doc, LABELS, buckets=buckets, registry=reg)

    return SimpleNamespace(
        # training
        train_step_seconds=hist("train_step_seconds", "Wall time of one optimizer step (s).", STEP_BUCKETS),
        train_samples=counter("train_samples", "Training samples processed by this rank."),
        train_loss=gauge("train_loss", "Training loss of the last step."),
        train_lr=gauge("train_learning_rate", "Learning rate of the last step."),
        train_last_step_ts=gauge("train_last_step_timestamp_seconds",
                                 "Unix time of the last finished training step (s)."),
        train_epoch=gauge("train_epoch", "Last finished training epoch."),
        train_val_accuracy=gauge("train_val_accuracy_ratio", "Validation accuracy after the last epoch (0..1)."),
        train_val_loss=gauge("train_val_loss", "Validation loss after the last epoch."),
        data_bad_images=counter("data_bad_images", "Undecodable images skipped by the data loader (logged by path)."),
        # streamer
        snap_stall=hist("snapshot_stall_seconds",
                        "Time training was blocked handing one snapshot to the streamer (s).", STALL_BUCKETS),
        snap_upload=hist("snapshot_upload_seconds", "Time to upload one snapshot shard (s).", UPLOAD_BUCKETS),
        snap_bytes=counter("snapshot_bytes", "Snapshot bytes uploaded."),
        snap_retries=counter("snapshot_retries", "Snapshot upload attempts that were retried."),
        snap_failures=counter("snapshot_failures", "Snapshots that failed after all retries."),
        snap_skipped=counter("snapshot_skipped", "Snapshots dropped by back-pressure instead of stalling."),
        snap_queue=gauge("snapshot_queue_depth", "Snapshots waiting or uploading on this rank."),
        snap_committed=counter("snapshot_committed", "Snapshots committed (visible to readers)."),
        snap_last_seq=gauge("snapshot_last_committed_seq", "Sequence number of the last committed snapshot."),
        snap_last_commit_ts=gauge("snapshot_last_commit_timestamp_seconds",
                                  "Unix time of the last snapshot commit (s)."),
        # TWA stage
        twa_load_bytes=counter("twa_load_bytes", "Snapshot bytes read by the TWA stage."),
        twa_load_seconds=hist("twa_load_seconds", "Time to read one snapshot slice (s).", LOAD_BUCKETS),
        twa_projection_seconds=hist("twa_projection_seconds",
                                    "Time of one gradient projection incl. its all-reduce (s).", PROJECTION_BUCKETS),
        twa_steps=counter("twa_steps", "TWA optimizer steps."),
        twa_loss=gauge("twa_loss", "TWA training loss of the last step."),
        twa_accuracy=gauge("twa_accuracy_ratio", "TWA model accuracy at the last evaluation (0..1)."),
        twa_effective_rank=gauge("twa_effective_rank", "Directions kept in the TWA subspace."),
        twa_guard_retries=counter("twa_guard_retries", "TWA attempts the guard rejected (diverged or worse than "
                                  "the start) and restarted at a lower learning rate."),
        twa_coefficient=gauge("twa_coefficient", f"Averaging coefficient per snapshot index "
                              f"(first {max_series} only).", extra=("index",)),
        twa_coefficients_count=gauge("twa_coefficients", "Number of averaging coefficients in the solution."),
        # live TWA follower (--follow): one probe per --probe-every snapshots, on the hold-out split
        twa_probes=counter("twa_probes", "Probes the live TWA follower ran."),
        twa_probe_accuracy=gauge("twa_probe_accuracy_ratio",
                                 "TWA accuracy of the last probe on the hold-out split (0..1; NaN: guard failed)."),
        twa_probe_swa_accuracy=gauge("twa_probe_swa_accuracy_ratio",
                                     "SWA accuracy over the last probe's snapshots on the hold-out split (0..1)."),
        twa_probe_epoch=gauge("twa_probe_epoch", "Training epoch (fractional) of the last probe's newest snapshot."),
        twa_probe_seconds=gauge("twa_probe_seconds", "Wall time of the last probe (s)."),
        twa_probe_lr=gauge("twa_probe_learning_rate", "Learning rate the last probe's fit used (after the guard)."),
        twa_probe_would_stop=gauge("twa_probe_would_stop", "1 when the stop rule fired at the last probe, else 0."),
    )


# Counters each role pre-creates at 0, so rate()/increase() see the first event.
_ROLE_COUNTERS = {
    "train": ("train_samples", "train_step_seconds", "data_bad_images", "snap_stall", "snap_upload", "snap_bytes",
              "snap_retries", "snap_failures", "snap_skipped", "snap_committed"),
    "twa": ("data_bad_images", "twa_load_bytes", "twa_load_seconds", "twa_projection_seconds", "twa_steps",
            "twa_guard_retries"),
}


class _Bound:
    """Metric children with this process's label values, bound on first use (so a
    role never exports empty series of another role); later lookups are plain
    attribute reads."""

    def __init__(self, families: SimpleNamespace, labels: dict[str, str], is_rank0_global: bool):
        self._families, self._labels, self.is_rank0_global = families, labels, is_rank0_global
        self.twa_coefficient = families.twa_coefficient   # bound per index at call time

    def __getattr__(self, name):
        child = getattr(self._families, name).labels(**self._labels)
        setattr(self, name, child)
        return child


def _bind(families: SimpleNamespace, labels: dict[str, str], is_rank0_global: bool) -> _Bound:
    bound = _Bound(families, labels, is_rank0_global)
    for name in _ROLE_COUNTERS.get(labels["role"], ()):
        getattr(bound, name)
    return bound


class _ScrapeCounter:
    """Registered after the merged collector: counts scrapes that have read the values."""

    def collect(self):
        _state.scrapes += 1
        return []


def _start_server(path: str, port: int, addr: str) -> None:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    registry.register(_ScrapeCounter())
    try:
        server, _ = start_http_server(port, addr=addr, registry=registry)
    except OSError as e:
        if e.errno in (98, 48, 10048):   # EADDRINUSE on Linux / macOS / Windows
            raise MetricsPortInUseError(
                f"metrics port {port} on {addr} is already in use (another run's exporter on this "
                f"node?); choose another --metrics-port, or --metrics-port 0 to disable the exporter"
            ) from e
        raise RuntimeError(f"cannot serve metrics on {addr}:{port}: {e}") from e
    _state.server = server
    _state.port = server.server_address[1]
    log.info("metrics: serving http://%s:%d/metrics from %s", addr, _state.port, path)


def setup(*, run_id: str, role: str, port: int | None, addr: str = "0.0.0.0",
          max_series: int = DEFAULT_MAX_SERIES) -> None:
    """Enable metrics for this process; call on every rank.

    ``port`` 0 or None records nothing and serves nothing. Otherwise local rank 0
    (env ``LOCAL_RANK``, default 0) serves ``/metrics`` on ``addr:port`` for all
    local ranks. Calling it again once enabled (``train.py --twa``: the TWA stage
    switches ``role`` to ``twa``) rebinds the labels and keeps the running exporter,
    whatever port the second call names, 0 included.

    Raises :class:`MetricsPortInUseError` naming the port if it is taken.
    """
    global _m
    if not run_id:
        raise ValueError("metrics.setup: run_id must be a non-empty string")
    if not role or not re.fullmatch(r"[a-z][a-z0-9_]*", role):
        raise ValueError(f"metrics.setup: role {role!r} must be a lowercase word such as 'train' or 'twa'")
    if port is not None and not (0 <= int(port) < 65536):
        raise ValueError(f"metrics.setup: --metrics-port {port} is outside 0..65535")
    if max_series < 1:
        raise ValueError(f"metrics.setup: max_series {max_series} must be >= 1")
    with _lock:
        if not port and _state.families is None:
            log.info("metrics: disabled (--metrics-port 0)")
            return
        # Already enabled in this process (train.py --twa: the TWA stage calls setup again): keep
        # the running exporter and only rebind the labels, whatever port the second call names.
        if port and _state.families is not None and _state.port not in (None, int(port)):
            log.warning("metrics: exporter already serves port %s; ignoring port %s", _state.port, port)
        rank = env_int("RANK", 0)
        local_rank = env_int("LOCAL_RANK", 0)
        node = knobs.NODE_NAME.get() or socket.gethostname()
        labels = {"run_id": str(run_id), "role": role, "node": node, "rank": str(rank)}
        if _state.families is None:
            path, per_launch = _choose_dir(str(run_id), port)
            os.makedirs(path, exist_ok=True)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
            # prometheus_client picks its value storage at import time; switch it to
            # the mmap-backed one now that the directory is known.
            from prometheus_client import values
            if not getattr(values.ValueClass, "_multiprocess", False):
                values.ValueClass = values.MultiProcessValue()
            _state.is_rank0, _state.max_series = local_rank == 0, max_series
            if _state.is_rank0:
                _prune_stale(path, per_launch)
                _start_server(path, int(port), addr)
                if not _state.atexit_registered:
                    atexit.register(_linger_then_stop)
                    _state.atexit_registered = True
            _state.families = _build_families(max_series)
        _m = _bind(_state.families, labels, rank == 0)


def _linger_then_stop() -> None:
    """atexit: let a scraper that has been watching read the final values once."""
    if _state.server is None:
        return
    linger = knobs.METRICS_LINGER_SECONDS.get()
    if _state.scrapes > 0 and linger > 0:
        seen, deadline = _state.scrapes, time.monotonic() + linger
        while _state.scrapes <= seen and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)   # the response body is written after collect() returns
    shutdown()


def shutdown() -> None:
    """Stop the exporter (if this process serves one) and disable recording."""
    global _m
    with _lock:
        _m = None
        if _state.server is not None:
            _state.server.shutdown()
            _state.server.server_close()
            _state.server = None


def _when_enabled(record):
    """Decorate ``record(m, ...)``: it runs with this process's bound metrics ``m``, and the call is a
    no-op while metrics are disabled, so instrumented code never checks."""
    @functools.wraps(record)
    def call(*args, **kwargs) -> None:
        m = _m
        if m is not None:
            record(m, *args, **kwargs)
    return call


# ------------------------------------------------------------------------ training
@_when_enabled
def train_step(m, seconds: float, samples: int, loss: float, lr: float) -> None:
    """One optimizer step finished on this rank."""
    m.train_step_seconds.observe(seconds)
    m.train_samples.inc(samples)
    m.train_loss.set(loss)
    m.train_lr.set(lr)
    m.train_last_step_ts.set(time.time())


@_when_enabled
def train_epoch(m, epoch: int, val_accuracy: float, val_loss: float) -> None:
    """An epoch finished and was evaluated; ``val_accuracy`` is a ratio in 0..1."""
    m.train_epoch.set(epoch)
    m.train_val_accuracy.set(val_accuracy)
    m.train_val_loss.set(val_loss)


@_when_enabled
def data_bad_images(m, n: int = 1) -> None:
    """``n`` undecodable images were skipped by this rank's data loader."""
    m.data_bad_images.inc(n)


# ------------------------------------------------------------------------ streamer
@_when_enabled
def snapshot_stall(m, seconds: float) -> None:
    """Training was blocked for ``seconds`` handing one snapshot to the streamer."""
    m.snap_stall.observe(seconds)


@_when_enabled
def snapshot_upload(m, seconds: float, nbytes: int) -> None:
    """One snapshot shard was uploaded."""
    m.snap_upload.observe(seconds)
    m.snap_bytes.inc(nbytes)


@_when_enabled
def snapshot_retry(m) -> None:
    """An upload attempt failed and will be retried."""
    m.snap_retries.inc()


@_when_enabled
def snapshot_failure(m) -> None:
    """A snapshot failed for good (retries exhausted)."""
    m.snap_failures.inc()


@_when_enabled
def snapshot_skipped(m) -> None:
    """A snapshot was dropped by back-pressure policy."""
    m.snap_skipped.inc()


@_when_enabled
def snapshot_queue_depth(m, n: int) -> None:
    """Snapshots currently queued or uploading on this rank."""
    m.snap_queue.set(n)


@_when_enabled
def snapshot_committed(m, seq: int) -> None:
    """Snapshot ``seq`` became visible to readers."""
    m.snap_committed.inc()
    m.snap_last_seq.set(seq)
    m.snap_last_commit_ts.set(time.time())


# ----------------------------------------------------------------------- TWA stage
@_when_enabled
def twa_load(m, seconds: float, nbytes: int) -> None:
    """One snapshot slice of ``nbytes`` was read in ``seconds``."""
    m.twa_load_seconds.observe(seconds)
    m.twa_load_bytes.inc(nbytes)


@_when_enabled
def twa_projection(m, seconds: float) -> None:
    """One gradient projection (incl. its small all-reduce) took ``seconds``."""
    m.twa_projection_seconds.observe(seconds)


@_when_enabled
def twa_step(m, loss: float) -> None:
    """One TWA optimizer step finished with training loss ``loss``."""
    m.twa_steps.inc()
    m.twa_loss.set(loss)


@_when_enabled
def twa_eval(m, accuracy: float) -> None:
    """The TWA model was evaluated; ``accuracy`` is a ratio in 0..1."""
    m.twa_accuracy.set(accuracy)


@_when_enabled
def twa_guard_retry(m, outcome: str) -> None:
    """The guard rejected one TWA attempt (``outcome``: diverged | worse_than_start)."""
    m.twa_guard_retries.inc()


@_when_enabled
def twa_probe(m, *, epoch: float, twa_accuracy: float | None, swa_accuracy: float | None, seconds: float,
              lr: float | None, would_stop: bool) -> None:
    """The live follower finished a probe (accuracies are ratios in 0..1; None, a failed probe, is NaN)."""
    nan = float("nan")
    m.twa_probes.inc()
    m.twa_probe_epoch.set(epoch)
    m.twa_probe_accuracy.set(nan if twa_accuracy is None else twa_accuracy)
    m.twa_probe_swa_accuracy.set(nan if swa_accuracy is None else swa_accuracy)
    m.twa_probe_seconds.set(seconds)
    m.twa_probe_lr.set(nan if lr is None else lr)
    m.twa_probe_would_stop.set(1.0 if would_stop else 0.0)


@_when_enabled
def twa_effective_rank(m, k: int) -> None:
    """Directions kept after dropping near-dependent snapshots."""
    m.twa_effective_rank.set(k)


def twa_coefficients(alpha) -> None:
    """Current averaging coefficients (one per snapshot, or flattened n*L).

    Identical on every rank, so only global rank 0 exports them, and only the
    first ``max_series`` entries, to keep the series count bounded.
    """
    m = _m
    if m is None or not m.is_rank0_global:
        return
    if hasattr(alpha, "flatten"):   # torch tensor / numpy array, possibly n x L
        alpha = alpha.flatten().tolist()
    values = [float(a) for a in alpha]
    fam, labels = m.twa_coefficient, m._labels
    limit = _state.max_series
    for i, a in enumerate(values[:limit]):
        fam.labels(index=str(i), **labels).set(a)
    m.twa_coefficients_count.set(len(values))
    if len(values) > limit and not _state.coef_warned:
        log.warning("metrics: exporting the first %d of %d TWA coefficients (max_series)", limit, len(values))
        _state.coef_warned = True
