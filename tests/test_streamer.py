"""SnapshotStreamer in one process: copy semantics, commit, idempotent resume, back-pressure,
bounded retries, and the S3 server killed mid-stream."""
from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from torch import nn

from twa_scale import store
from twa_scale.layout import FlatLayout
from twa_scale.train.streamer import SnapshotStreamer, StreamerConfig


def _setup(url: str, width: int = 64, run_id: str = "run1"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, width), nn.BatchNorm1d(width), nn.Linear(width, 10))
    layout = FlatLayout.from_model(model)
    store.create_run(url, run_id, layout, meta={"model": "tiny"}, world_size=1)
    return model, layout, layout.trainable(model)


def _bump(params, k: float) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(k)


def test_snapshots_are_copies_and_all_commit_on_close(store_url):
    model, layout, params = _setup(store_url)
    cfg = StreamerConfig(chunk_bytes=4096)
    s = SnapshotStreamer(store_url, "run1", layout, rank=0, world_size=1, config=cfg)
    expected = []
    for seq in range(4):
        expected.append(layout.gather(params, 0, layout.D).clone())
        assert s.snapshot(seq, step=seq * 10, epoch=seq, params=params)
        _bump(params, 1.0)  # the next training step must not leak into the queued snapshot
    summary = s.close()
    assert summary["committed"] == [0, 1, 2, 3] and summary["failed"] == 0 and summary["pending"] == []
    assert summary["snapshots"] == 4 and summary["stall_seconds"] > 0
    r = store.open_run(store_url, "run1")
    assert [i.seq for i in r.snapshots()] == [0, 1, 2, 3]
    assert [i.step for i in r.snapshots()] == [0, 10, 20, 30]
    for seq, vec in enumerate(expected):
        assert torch.equal(r.read(seq), vec)
    assert r.verify() == []
    with pytest.raises(RuntimeError, match="closed"):
        s.snapshot(9, 0, 0, params)


def test_rewriting_a_committed_seq_keeps_the_committed_data(store_url):
    model, layout, params = _setup(store_url)
    with SnapshotStreamer(store_url, "run1", layout, rank=0, world_size=1) as s:
        s.snapshot(0, 0, 0, params)
    before = store.open_run(store_url, "run1").read(0)
    _bump(params, 5.0)
    s2 = SnapshotStreamer(store_url, "run1", layout, rank=0, world_size=1)  # a resumed launch
    s2.snapshot(0, 0, 0, params)
    s2.snapshot(1, 7, 1, params)
    summary = s2.close()
    assert summary["already_committed"] == 1 and summary["committed"] == [1]
    r = store.open_run(store_url, "run1")
    assert [i.seq for i in r.snapshots()] == [0, 1]
    assert torch.equal(r.read(0), before)
    assert torch.equal(r.read(1), layout.gather(params, 0, layout.D))


def test_streamer_rejects_bad_setup(tmp_path):
    url = tmp_path.as_uri()
    model, layout, params = _setup(url)
    with pytest.raises(ValueError, match="bfloat16"):
        SnapshotStreamer(url, "run1", layout, rank=0, world_size=1, config=StreamerConfig(dtype="bfloat16"))
    with pytest.raises(ValueError, match="larger than the number of parameters"):
        SnapshotStreamer(url, "run1", layout, rank=0, world_size=layout.D + 1)
    with pytest.raises(ValueError, match="session"):
        SnapshotStreamer(url, "run1", layout, rank=0, world_size=2)
    with pytest.raises(FileNotFoundError, match="run.json did not appear"):
        SnapshotStreamer(url, "other", layout, rank=0, world_size=1, config=StreamerConfig(open_timeout_seconds=0.5))
    with pytest.raises(ValueError, match="TWA_SCALE_UPLOAD_PART_BYTES"):
        StreamerConfig(part_bytes=1 << 20)


def test_tunables_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("TWA_SCALE_UPLOAD_PART_BYTES", str(32 << 20))
    monkeypatch.setenv("TWA_SCALE_UPLOAD_CONCURRENCY", "3")
    monkeypatch.setenv("TWA_SCALE_SNAPSHOT_BACKPRESSURE", "skip")
    cfg = StreamerConfig()
    assert (cfg.part_bytes, cfg.concurrency, cfg.backpressure) == (32 << 20, 3, "skip")
    monkeypatch.setenv("TWA_SCALE_UPLOAD_CONCURRENCY", "many")
    with pytest.raises(ValueError, match="TWA_SCALE_UPLOAD_CONCURRENCY='many'"):
        StreamerConfig()


@pytest.mark.s3
def test_backpressure_blocks_by_default_and_skips_when_asked(fresh_s3, caplog):
    url = "s3://twa-bp/x"
    model, layout, params = _setup(url)
    # Paused server: uploads hang, so both buffers stay busy deterministically.
    skip = SnapshotStreamer(url, "run1", layout, rank=0, world_size=1, config=StreamerConfig(backpressure="skip"))
    block = SnapshotStreamer(url, "run1", layout, rank=0, world_size=1, config=StreamerConfig(buffers=1))
    fresh_s3.pause()
    try:
        with caplog.at_level(logging.WARNING, logger="twa_scale.train.streamer"):
            assert skip.snapshot(0, 0, 0, params) and skip.snapshot(1, 1, 1, params)
            assert not skip.snapshot(2, 2, 2, params)
        assert "snapshot seq 2 skipped" in caplog.text
        block.snapshot(3, 3, 3, params)
        threading.Timer(1.5, fresh_s3.resume).start()
        block.snapshot(4, 4, 4, params)  # waits for seq 3's buffer: counted as stall
    finally:
        fresh_s3.resume()
    b, s = block.close(), skip.close()
    assert s["skipped"] == 1 and s["committed"] == [0, 1]
    assert b["committed"] == [3, 4] and b["wait_seconds"] >= 1.0 and b["max_stall_seconds"] >= 1.0
    assert [i.seq for i in store.open_run(url, "run1").snapshots()] == [0, 1, 3, 4]


@pytest.mark.s3
def test_upload_gives_up_after_bounded_retries_and_training_continues(fresh_s3, caplog):
    url = "s3://twa-retry/x"
    model, layout, params = _setup(url)
    cfg = StreamerConfig(upload_timeout_seconds=3.0, retry_initial_seconds=0.2)
    s = SnapshotStreamer(url, "run1", layout, rank=0, world_size=1, config=cfg)
    fresh_s3.kill()
    with caplog.at_level(logging.WARNING, logger="twa_scale.train.streamer"):
        s.snapshot(0, 0, 0, params)
        deadline = time.monotonic() + 60
        while s.stats["failed"] == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
    assert s.stats["failed"] == 1 and s.stats["retries"] >= 1
    assert "snapshot seq 0 FAILED" in caplog.text
    assert "s3://twa-retry/x/run1/snapshots/00000000/shard-00000-of-00001." in caplog.text
    fresh_s3.start()
    s.snapshot(1, 1, 1, params)
    summary = s.close()
    assert summary["committed"] == [1] and summary["failed"] == 1
    assert [i.seq for i in store.open_run(url, "run1").snapshots()] == [1]


@pytest.mark.s3
@pytest.mark.slow
def test_s3_killed_mid_stream_then_restarted_every_snapshot_commits(fresh_s3):
    url = "s3://twa-chaos/x"
    model, layout, params = _setup(url, width=4096)  # ~2 MB per snapshot
    cfg = StreamerConfig(upload_timeout_seconds=120.0, retry_initial_seconds=0.2, retry_max_seconds=2.0)
    s = SnapshotStreamer(url, "run1", layout, rank=0, world_size=1, config=cfg)
    expected = []
    for seq in range(8):
        if seq == 3:
            fresh_s3.kill()
            threading.Timer(2.0, fresh_s3.start).start()
        expected.append(layout.gather(params, 0, layout.D).clone())
        s.snapshot(seq, seq, seq, params)
        _bump(params, 0.5)
        time.sleep(0.3)
    summary = s.close()
    assert summary["committed"] == list(range(8)) and summary["failed"] == 0
    assert summary["retries"] >= 1  # the outage was seen
    r = store.open_run(url, "run1")
    assert [i.seq for i in r.snapshots()] == list(range(8))
    assert r.verify() == []
    for seq, vec in enumerate(expected):
        assert torch.equal(r.read(seq), vec)
