"""The control marker of a run, ``<run>/control/STOP.json``: a request to end training after its next snapshot.

    from twa_scale.store import control
    control.write_stop("file:///runs", "r1", reason="TWA plateaued", rule="plateau", by="twa", probes=[...])
    watch = control.StopWatch("file:///runs", "r1")   # the training job, rank 0
    marker = watch.check()                             # None: keep training

The live TWA follower writes it when its stop rule fires; a user writes it with ``twa-scale stop URL/RUN``.
It goes through the store's atomic put (whole or nothing). Reading it must never hurt training: an absent
marker is None, and so is an unreadable, empty, partial or otherwise malformed one, with a warning naming
the object (the run keeps going).
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Sequence

from twa_scale.store import FormatError, RetryPolicy, RunPaths, StopMarker, open_store

__all__ = ["write_stop", "clear_stop", "finished", "StopWatch", "STOP_WRITE_RETRY_SECONDS"]

log = logging.getLogger("twa_scale.store.control")

# A follower or a user waits this long at most for a flaky store: the marker is worth a retry, not a hang.
STOP_WRITE_RETRY_SECONDS = 60.0


def write_stop(url: str, run_id: str, *, reason: str, rule: str = "manual", by: str = "user",
               probes: Sequence[dict] = (), storage_options: dict | str | None = None,
               require_run: bool = True) -> StopMarker:
    """Write the run's STOP.json (replacing any earlier one) and return it.

    ``require_run``: refuse, naming run.json, when the run does not exist (a typo in URL/RUN must not
    silently create a marker no job will read).
    """
    paths = RunPaths(run_id)
    store = open_store(url, storage_options)
    if require_run and not store.exists(paths.manifest):
        raise FileNotFoundError(f"no run {run_id!r} under {url}: {store.describe(paths.manifest)} does not exist")
    marker = StopMarker(reason=reason, rule=rule, by=by, host=socket.gethostname(), written_at=time.time(),
                        probes=tuple(probes))
    RetryPolicy(deadline_seconds=STOP_WRITE_RETRY_SECONDS).call(
        f"writing {store.describe(paths.stop)}", lambda: store.put_small(paths.stop, marker.to_json()))
    log.info("wrote %s: %s", store.describe(paths.stop), reason)
    return marker


def clear_stop(url: str, run_id: str, *, storage_options: dict | str | None = None) -> bool:
    """Remove the run's STOP.json; False when there was none."""
    paths = RunPaths(run_id)
    store = open_store(url, storage_options)
    if not store.exists(paths.stop):
        return False
    store.delete(paths.stop)
    log.info("removed %s", store.describe(paths.stop))
    return True


def finished(url: str, run_id: str, *, storage_options: dict | str | None = None) -> dict | None:
    """The ``final`` record of train/metrics.json when the run has ended, else None (running, or no metrics
    yet). A missing run is an error naming run.json, as for :func:`write_stop`."""
    import json

    paths = RunPaths(run_id)
    store = open_store(url, storage_options)
    if not store.exists(paths.manifest):
        raise FileNotFoundError(f"no run {run_id!r} under {url}: {store.describe(paths.manifest)} does not exist")
    try:
        final = json.loads(store.get(paths.metrics)).get("final")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return final if isinstance(final, dict) else None


class StopWatch:
    """The training job's view of STOP.json: one small GET per :meth:`check`, no retries.

    The store is opened in quick mode with a short connect and read timeout (``timeout_seconds``), so one
    check against an unreachable or stalled store ends within that, with a warning. A training job never
    calls :meth:`check` on its step path: :meth:`start` polls in a background thread (rank 0), and the
    ranks agree on :attr:`marker` through the step agreement (twa_scale/train/preemption.py).
    """

    def __init__(self, url: str, run_id: str, *, storage_options: dict | str | None = None,
                 timeout_seconds: float | None = None):
        self.paths = RunPaths(run_id)
        self.store = open_store(url, storage_options, quick=True, timeout_seconds=timeout_seconds)
        self.where = self.store.describe(self.paths.stop)
        self._last_problem: str | None = None
        self.marker: StopMarker | None = None  # the first marker the poll found (kept: the stop is taken once)
        self._poll = None

    def check(self) -> StopMarker | None:
        """The marker, or None when there is none or it cannot be used (warned once per distinct problem)."""
        try:
            raw = self.store.get(self.paths.stop)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - any store failure: training goes on, and checks again next time
            return self._ignore(f"cannot read {self.where} ({type(e).__name__}: {e}); training continues")
        try:
            return StopMarker.from_json(raw, self.where)
        except FormatError as e:
            return self._ignore(f"ignoring a malformed stop marker: {e}")

    def start(self, every_seconds: float) -> "StopWatch":
        """Check once now (a marker written before the launch holds at the first snapshot), then every
        ``every_seconds`` in a background thread until :meth:`close`; :attr:`marker` is the result."""
        from twa_scale.background import Background

        self._refresh()
        self._poll = Background("twa-stop-poll", lambda _: self._refresh(), every=every_seconds)
        return self

    def _refresh(self) -> None:
        if self.marker is None:
            self.marker = self.check()

    def close(self) -> None:
        if self._poll is not None:
            self._poll.close(timeout=0, check=False)

    def _ignore(self, problem: str) -> None:
        if problem != self._last_problem:
            log.warning("%s", problem)
            self._last_problem = problem
        return None
