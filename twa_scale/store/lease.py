"""The writer lease: one session writes a run at a time.

``<run>/LEASE.json`` (a sealed :class:`~twa_scale.store.format.Lease`) is created with a
conditional put: ``If-None-Match: *`` on S3 (SeaweedFS and AWS honour it; s3fs exposes it as
``pipe_file(mode="create")``), ``os.link`` on a local filesystem. Whoever creates it holds the run
and rewrites its heartbeat every ``heartbeat_seconds``. A second job finds a fresh lease and fails
fast, naming the holder's session, host and heartbeat age. A lease whose heartbeat is older than
its timeout is stale: a ``--resume`` may take it over (delete, then conditional create, then read
back, so of two racing takers one wins); a launch without ``--resume`` never does. A lease that still
looks alive is taken over at once by a ``--resume`` of the same job (``TWA_SCALE_JOB_ID``, the JobSet's
uid in the manifests): a job is restarted only once its previous launch failed, and after a kill -9
that launch's lease would otherwise block the restart for the whole timeout. Another job never does. Each heartbeat
first reads the lease: if another session holds it now, this holder marks itself lost and its
writer stops committing, so a holder that was merely stalled never overwrites the new one's commits.

Clocks: ages compare the holder's wall clock with the reader's; keep the timeout well above any
clock skew between nodes (default 120 s, ``TWA_SCALE_LEASE_TIMEOUT_SECONDS``).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

from twa_scale.errors import TransientError
from twa_scale import knobs
from twa_scale.store.backend import ObjectStore
from twa_scale.store.format import FormatError, Lease, RunPaths
from twa_scale.store.retry import RetryPolicy

__all__ = ["RunLease", "LeaseHeldError", "LeaseLostError", "acquire_lease"]

log = logging.getLogger("twa_scale.store")


class LeaseHeldError(TransientError):
    """Another session holds the run's writer lease. Exit 75: the condition ends by itself (that job
    finishes, or its lease goes stale and a --resume takes it over), so a restart policy may retry.
    A relaunch of the same job (TWA_SCALE_JOB_ID) right after a kill -9 does not get here."""


class LeaseLostError(PermissionError):
    """This session's lease was taken over; it must stop writing (permanent: never retried)."""


def _read(store: ObjectStore, paths: RunPaths) -> Lease | None | str:
    """The lease; None when absent; the reason when present but invalid (e.g. a zero-byte object)."""
    try:
        raw = store.get(paths.lease)
    except FileNotFoundError:
        return None
    try:
        return Lease.from_json(raw, store.describe(paths.lease))
    except FormatError as e:
        return str(e)


class RunLease:
    """A held lease with its heartbeat thread."""

    def __init__(self, store: ObjectStore, paths: RunPaths, lease: Lease, *, heartbeat_seconds: float,
                 retry: RetryPolicy):
        self.store, self.paths, self.lease = store, paths, lease
        self.session = lease.session
        self.heartbeat_seconds = heartbeat_seconds
        self.retry = retry
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="twa-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self.heartbeat()
            except LeaseLostError:
                return
            except Exception as e:  # noqa: BLE001 - an outage: the next beat tries again
                log.warning("lease heartbeat of %s failed: %s: %s", self.store.describe(self.paths.lease),
                            type(e).__name__, e)

    def heartbeat(self) -> None:
        current = _read(self.store, self.paths)
        if not isinstance(current, Lease) or current.session != self.session:
            holder = current.session if isinstance(current, Lease) else current
            self.lost = (f"the writer lease {self.store.describe(self.paths.lease)} of session {self.session} "
                         f"was taken over (now: {holder})")
            log.error("%s; this job stops committing snapshots", self.lost)
            raise LeaseLostError(self.lost)
        self.lease = Lease(**{**_fields(self.lease), "heartbeat_at": time.time()})
        self.store.put_small(self.paths.lease, self.lease.to_json())

    def check(self) -> None:
        """Raise LeaseLostError when another session has taken the run over."""
        if self.lost:
            raise LeaseLostError(self.lost)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (best effort)."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self.lost:
            return
        try:
            current = _read(self.store, self.paths)
            if isinstance(current, Lease) and current.session == self.session:
                self.store.delete(self.paths.lease)
        except Exception as e:  # noqa: BLE001 - a stale lease expires by itself
            log.warning("could not release %s: %s", self.store.describe(self.paths.lease), e)


def _fields(lease: Lease) -> dict:
    return {k: getattr(lease, k) for k in ("session", "host", "pid", "acquired_at", "heartbeat_at",
                                           "timeout_seconds", "job")}


def acquire_lease(store: ObjectStore, paths: RunPaths, session: str, *, resume: bool,
                  timeout_seconds: float | None = None, heartbeat_seconds: float | None = None,
                  retry: RetryPolicy | None = None) -> RunLease:
    """Take the writer lease of a run, or raise LeaseHeldError naming the holder and its age. The lease
    records this job's identity (TWA_SCALE_JOB_ID) for the same-job takeover."""
    timeout = timeout_seconds or knobs.LEASE_TIMEOUT_SECONDS.get()
    beat = heartbeat_seconds or knobs.LEASE_HEARTBEAT_SECONDS.get() or min(10.0, timeout / 4)
    if beat >= timeout:
        raise ValueError(f"lease heartbeat {beat}s must be shorter than its timeout {timeout}s "
                         "(TWA_SCALE_LEASE_HEARTBEAT_SECONDS, TWA_SCALE_LEASE_TIMEOUT_SECONDS)")
    retry = retry or RetryPolicy()
    where = store.describe(paths.lease)
    now = time.time()
    job = knobs.JOB_ID.get()
    mine = Lease(session=session, host=socket.gethostname(), pid=os.getpid(), acquired_at=now, heartbeat_at=now,
                 timeout_seconds=timeout, job=job)
    for _ in range(3):
        if retry.call(f"creating {where}", lambda: store.create(paths.lease, mine.to_json())):
            break
        current = retry.call(f"reading {where}", lambda: _read(store, paths))
        if current is None:
            continue  # released in between: try again
        if isinstance(current, Lease):
            age = current.age_seconds(time.time())
            if current.session == session:
                break
            same_job = job is not None and current.job == job
            holder = (f"session {current.session} (host {current.host}, pid {current.pid}"
                      + (f", job {current.job})" if current.job else ")"))
            if age < current.timeout_seconds and not (same_job and resume):
                raise LeaseHeldError(
                    f"run {store.describe(paths.root)} is being written by {holder}, last heartbeat {age:.0f}s "
                    f"ago; a lease goes stale after {current.timeout_seconds:.0f}s without one. Wait for that job, "
                    f"stop it, or use another --run-id (only a --resume of the same job, TWA_SCALE_JOB_ID, takes "
                    f"a live-looking lease over)")
            state = "stale" if age >= current.timeout_seconds else "live-looking (this job's earlier launch)"
            what = f"{state} writer lease of {holder}, last heartbeat {age:.0f}s ago,"
        else:
            what = f"invalid writer lease ({current})"
        if not resume:
            raise LeaseHeldError(f"run {store.describe(paths.root)} has a {what} {where}; "
                                 f"relaunch with --resume to take it over")
        log.warning("taking over the %s %s (--resume)", what, where)
        retry.call(f"deleting {where}", lambda: store.delete(paths.lease))
    else:
        raise LeaseHeldError(f"could not take the writer lease {where}: other sessions keep taking it")
    # Read back: of two racing takers of a stale lease only one finds its own session here.
    time.sleep(0.2)
    current = retry.call(f"reading {where}", lambda: _read(store, paths))
    if not isinstance(current, Lease) or current.session != session:
        holder = current.session if isinstance(current, Lease) else current
        raise LeaseHeldError(f"run {store.describe(paths.root)}: another session ({holder}) took the writer lease "
                             f"{where} at the same time")
    return RunLease(store, paths, current, heartbeat_seconds=beat, retry=retry)
