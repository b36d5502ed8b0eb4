"""One bounded retry policy for every store write a training job makes.

Snapshot shards, shard metadata, commit markers, run.json, metrics and the lease heartbeat all go
through :meth:`RetryPolicy.call`: transient errors (connection refused or reset, 5xx, timeouts, a
bucket briefly missing while the server restarts) are retried with exponential backoff and
jitter until a deadline, by default ``TWA_SCALE_STORE_RETRY_SECONDS`` = 600 s, so a store outage
of minutes stalls at most the write that meets it. Errors retrying cannot fix (permission,
bad input, a corrupt record) are raised at once.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Callable, TypeVar

from twa_scale.errors import StoreUnreachableError
from twa_scale import knobs

__all__ = ["RetryPolicy", "RetryDeadlineExceeded", "PERMANENT_ERRORS"]

log = logging.getLogger("twa_scale.store")
T = TypeVar("T")

# Errors that retrying cannot fix; everything else is retried until the deadline.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (PermissionError, ValueError, TypeError, NotImplementedError,
                                                     KeyError)


class RetryDeadlineExceeded(StoreUnreachableError):
    """A store write kept failing until its deadline: transient (exit 75); the message names it."""


@dataclasses.dataclass(kw_only=True)
class RetryPolicy:
    deadline_seconds: float = dataclasses.field(default_factory=knobs.STORE_RETRY_SECONDS.get)
    """Total time one write may spend retrying. Env: TWA_SCALE_STORE_RETRY_SECONDS (default 600)."""
    initial_seconds: float = 0.5
    """First backoff delay; doubles per attempt, with ±50% jitter."""
    max_seconds: float = 20.0
    """Largest backoff delay."""

    def __post_init__(self):
        for name in ("deadline_seconds", "initial_seconds", "max_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RetryPolicy.{name} = {getattr(self, name)} must be > 0 "
                                 "(TWA_SCALE_STORE_RETRY_SECONDS for the deadline)")

    def call(self, what: str, fn: Callable[[], T], *, deadline: float | None = None,
             on_retry: Callable[[int, BaseException, float], None] | None = None) -> T:
        """``fn()``, retried on transient errors until ``deadline`` (time.monotonic(); default now +
        ``deadline_seconds``); then RetryDeadlineExceeded naming ``what`` and the last error."""
        deadline = time.monotonic() + self.deadline_seconds if deadline is None else deadline
        delay, attempts = self.initial_seconds, 0
        while True:
            attempts += 1
            try:
                return fn()
            except PERMANENT_ERRORS:
                raise
            except Exception as e:  # noqa: BLE001 - transient by default, bounded by the deadline
                wait = delay * random.uniform(0.5, 1.5)
                if time.monotonic() + wait > deadline:
                    raise RetryDeadlineExceeded(f"{what}: gave up after {attempts} attempt(s): "
                                                f"{type(e).__name__}: {e}") from e
                if on_retry is not None:
                    on_retry(attempts, e, wait)
                else:
                    log.warning("%s failed (%s: %s); retry %d in %.1fs", what, type(e).__name__, e, attempts, wait)
                time.sleep(wait)
                delay = min(delay * 2, self.max_seconds)
