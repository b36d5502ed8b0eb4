"""SIGTERM (preemption): one exit deadline, and one step at which every rank stops and checkpoints.

Kubernetes sends SIGTERM, then SIGKILL after the pod's grace period. The job must be gone within
``TWA_SCALE_SIGTERM_FLUSH_SECONDS`` (25 s) of the signal: everything it does on the way out (the
SIGTERM checkpoint, its upload, the snapshot flush) shares that one deadline (:func:`seconds_left`).

Ranks learn of a preemption at different steps: DeepSpeed's per-node launcher forwards SIGTERM to
its ranks one after another (waiting up to 30 s for each to exit before the next), and a drained
node's ranks get it while the other nodes' do not. So inside the training step loop
(:func:`deferred`) the handler only notes the time, and :class:`StepAgreement` all-reduces the flag
after every optimizer step: all ranks see it at the same step, save the same mid-epoch checkpoint
there if it fits in the deadline, and exit 143. The all-reduce is started after step k and read after
step k+1 (``async_op``), on a gloo group of its own, so it never waits on the GPU stream or on the
gradient all-reduce: a SIGTERM is acted on one step after the first rank saw it. An epoch-end
checkpoint is deferred the same way: it finishes, then the job exits. Elsewhere outside the loop
(start-up, evaluation) SIGTERM raises :class:`Preempted` at once and the resume starts from the newest
checkpoint. The last step of an epoch is agreed on with one blocking
all-reduce (:meth:`StepAgreement.finish`), so only a SIGTERM in the instant between it and the end of
the loop is left to the rank that got it.

The same all-reduce carries the run's stop request (``control/STOP.json``, read by rank 0 in a
background thread, :class:`twa_scale.store.control.StopWatch`): :attr:`StepAgreement.stop_requested` turns
True on every rank at the same step, and training ends at the next snapshot. No rank ever waits for
the store to learn of a stop.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Callable

import torch

from twa_scale import comm, knobs
from twa_scale.errors import EXIT_PREEMPTED

__all__ = ["Preempted", "on_sigterm", "deferred", "received", "seconds_left", "raise_preempted", "StepAgreement"]

log = logging.getLogger("twa_scale.train.preemption")


class Preempted(SystemExit):
    """Raised in the main thread on SIGTERM, so the code unwinds and pending uploads flush (exit 143)."""


_received_at: float | None = None   # monotonic time of this process's first SIGTERM
_deferring = 0                      # > 0 inside deferred(): the step loop acts on the flag
_raised = False                     # Preempted raised: later SIGTERMs must not abort the flush


def _handler(signum, frame) -> None:
    global _received_at, _raised
    if _received_at is None:
        _received_at = time.monotonic()
        log.warning("SIGTERM: %s", "the ranks stop at the next agreed step" if _deferring else "exiting")
    if _deferring or _raised:
        return
    _raised = True
    raise Preempted(EXIT_PREEMPTED)


def raise_preempted() -> None:
    """End the job as preempted (exit 143); later SIGTERMs are ignored while it flushes."""
    global _raised
    _raised = True
    raise Preempted(EXIT_PREEMPTED)


@contextlib.contextmanager
def on_sigterm():
    """Install the SIGTERM handler for the block (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred():
    """Inside the block SIGTERM only sets the flag that :class:`StepAgreement` reads. A SIGTERM that
    arrived in the block but was not acted on (after the last agreement) raises when the block ends."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if _received_at is not None and not _raised:
        raise_preempted()


def received() -> bool:
    """This process got SIGTERM."""
    return _received_at is not None


def seconds_left() -> float | None:
    """Seconds until the exit deadline (TWA_SCALE_SIGTERM_FLUSH_SECONDS after this process's SIGTERM);
    None before any SIGTERM."""
    if _received_at is None:
        return None
    return max(0.0, _received_at + knobs.SIGTERM_FLUSH_SECONDS.get() - time.monotonic())


class StepAgreement:
    """Every rank calls :meth:`poll` after each optimizer step; it returns True on every rank at the
    same step once any rank has seen SIGTERM (one step later, see the module docstring). Construct
    it on every rank at the same point (it may create the gloo group).

    ``stop_seen`` (rank 0's view of the stop marker, set by the training job's StopCheck) rides along:
    once it returned True on any rank, :attr:`stop_requested` is True on every rank from the same step on."""

    def __init__(self):
        self.group = comm.host_group()
        self._flag = torch.zeros(2)  # [SIGTERM received, stop marker seen], max over the ranks
        self._pending: comm.Pending | None = None
        self.stop_seen: Callable[[], bool] | None = None
        self.stop_requested = False
        self.save_seconds = 0.0  # of this process's last checkpoint save (see timed)

    @contextlib.contextmanager
    def timed(self):
        """Time a checkpoint save: with the last upload's time, what the next one is expected to take."""
        t0 = time.monotonic()
        yield
        self.save_seconds = time.monotonic() - t0

    def poll(self) -> bool:
        stop = self._take()
        if not stop:
            self._fill()
            self._pending = comm.all_reduce_start(self._flag, op="max", group=self.group)
        return stop

    def finish(self) -> bool:
        """At the end of the step loop: whether the ranks stop at its last step. Besides the last poll's
        all-reduce, one blocking all-reduce of the flag now (once per epoch), so a SIGTERM that came
        during the last step is acted on here too, not left to one rank at the start of evaluation.
        Also where the ranks agree before any step (the initial snapshot's stop check)."""
        if self._take():
            return True
        self._fill()
        return self._agreed(comm.all_reduce(self._flag, op="max", group=self.group))

    def _fill(self) -> None:
        self._flag[0] = 1.0 if received() else 0.0
        self._flag[1] = 1.0 if self.stop_seen is not None and self.stop_seen() else 0.0

    def _take(self) -> bool:
        pending, self._pending = self._pending, None
        return pending is not None and self._agreed(pending.wait())

    def _agreed(self, flag: torch.Tensor) -> bool:
        global _received_at
        term, stop = (v > 0 for v in flag.tolist())
        self.stop_requested = self.stop_requested or stop
        if term and _received_at is None:  # another rank's SIGTERM: this rank's deadline starts now
            _received_at = time.monotonic()
        return term

    def checkpoint_fits(self, estimate_seconds: float) -> bool:
        """Whether a checkpoint that takes ``estimate_seconds`` (the last one's save and upload time on
        this rank; 0 when none was taken yet) ends before the deadline of the rank that got SIGTERM
        first. The same answer on every rank: one small all-reduce, only on this path."""
        budget = knobs.SIGTERM_FLUSH_SECONDS.get()
        used = budget - seconds_left()
        need = torch.tensor([used, estimate_seconds], dtype=torch.float64)
        comm.all_reduce(need, op="max", group=self.group)
        used, estimate = need.tolist()
        fits = used + estimate <= budget
        if comm.rank() == 0:
            log.warning("SIGTERM: %.1f s of the %.0f s deadline gone, a checkpoint takes ~%.1f s: %s", used, budget,
                        estimate, "saving one at this step" if fits else
                        "it does not fit, the resume starts from the newest checkpoint")
        return fits
