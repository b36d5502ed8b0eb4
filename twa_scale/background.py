"""One daemon thread that makes a training job's small store calls off the training thread.

The step loop must never wait on the store: a stalled server accepts connections and then says
nothing, so any call to it lasts until a timeout. :class:`Background` runs ``work`` in its own
thread; the training thread only hands work over:

    poll = Background("twa-stop", lambda _: watch.refresh(), every=5.0)    # periodic: the stop marker
    out = Background("twa-metrics", lambda state: writer.write_metrics(*state))
    out.submit((rows, None))      # returns at once; a state still waiting is replaced (latest wins)
    out.close(timeout=600)        # at the end: the last state reaches the store, or an error

A submitted item that fails (``work`` raised, e.g. its retry deadline passed) is kept as :attr:`error`
and raised on the caller's thread by the next :meth:`submit` or by :meth:`close`: an outage longer
than the store's deadline still ends the job, only not in the middle of a step.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

__all__ = ["Background"]

log = logging.getLogger("twa_scale.background")
_EMPTY = object()


class Background:
    """Runs ``work(item)`` for the latest :meth:`submit`-ted item, and ``work(None)`` every ``every``
    seconds while nothing is submitted (None: only on submit)."""

    def __init__(self, name: str, work: Callable[[Any], None], *, every: float | None = None):
        self.name, self._work, self._every = name, work, every
        self._cond = threading.Condition()
        self._item: Any = _EMPTY
        self._busy = False
        self._closed = False
        self.error: BaseException | None = None
        self.last_seconds: float | None = None  # of the latest ``work`` call that succeeded
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> None:
        """Queue ``item`` (replacing one not started yet) and return at once; raises an earlier
        item's error."""
        self._raise()
        with self._cond:
            self._item = item
            self._cond.notify_all()

    def idle(self) -> bool:
        """Nothing waiting and nothing running: every submitted item is done."""
        with self._cond:
            return self._item is _EMPTY and not self._busy

    def close(self, timeout: float | None = None, *, check: bool = True) -> bool:
        """Wait up to ``timeout`` seconds (None: no limit) for the submitted items, then stop the
        thread. Returns whether they finished; with ``check``, raises a failed item's error."""
        with self._cond:
            done = self._cond.wait_for(lambda: self._item is _EMPTY and not self._busy, timeout)
            self._closed = True
            self._cond.notify_all()
        if done:
            self._thread.join()
        if check:
            self._raise()
        return done

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._item is not _EMPTY or self._closed, self._every)
                if self._closed and self._item is _EMPTY:
                    return
                item, self._item = (None if self._item is _EMPTY else self._item), _EMPTY
                self._busy = True
            t0 = time.monotonic()
            try:
                self._work(item)
                self.last_seconds = time.monotonic() - t0
            except Exception as e:  # noqa: BLE001 - kept for the caller's thread (see the module docstring)
                log.error("%s: %s: %s", self.name, type(e).__name__, e)
                if item is not None:
                    self.error = e
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
