"""twa_scale.background: the one thread that makes a training job's small store calls off its step path."""
from __future__ import annotations

import threading

import pytest

from twa_scale.background import Background


def test_latest_state_wins_and_close_flushes_it():
    started, release, seen = threading.Event(), threading.Event(), []

    def work(item):
        seen.append(item)
        started.set()
        release.wait(10)

    out = Background("t", work)
    out.submit(1)
    assert started.wait(10)
    out.submit(2)  # waiting behind 1 ...
    out.submit(3)  # ... and replaced by 3: only the latest state is written
    assert not out.idle()
    assert out.close(timeout=0.05) is False  # still running: not flushed
    release.set()
    assert out.close(timeout=10)  # the state waiting when close began is still written
    assert seen == [1, 3]
    assert out.last_seconds is not None and out.last_seconds > 0  # how long the store took: the checkpoint wait


def test_a_failed_item_leaves_the_last_duration_unset():
    out = Background("t", lambda item: 1 / 0)
    out.submit("rows")
    out.close(timeout=10, check=False)
    assert out.last_seconds is None


def test_a_failed_item_is_raised_on_the_callers_thread():
    def work(item):
        raise TimeoutError(f"writing {item}: gave up")

    out = Background("t", work)
    out.submit("rows")
    with pytest.raises(TimeoutError, match="writing rows"):
        out.close(timeout=10)
    out = Background("t", work)
    out.submit("rows")
    while not out.idle():
        pass
    with pytest.raises(TimeoutError, match="writing rows"):
        out.submit("more")  # the next hand-over reports it
    out.close(timeout=10, check=False)


def test_periodic_work_runs_until_closed():
    ticks = threading.Semaphore(0)
    poll = Background("t", lambda item: ticks.release() if item is None else None, every=0.01)
    for _ in range(3):
        assert ticks.acquire(timeout=10)
    assert poll.close(timeout=10)
