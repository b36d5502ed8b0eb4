"""Writer ranks as real processes: 2 ranks write, 1 and 3 reader slices read back the model's
weights; a writer rank killed with SIGKILL mid-upload never leaves a partial snapshot listed,
and the resumed launch continues the sequence with no gap and no duplicate."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

from tests.support import REPO
from twa_scale import store
from twa_scale.layout import FlatLayout
from twa_scale.models import build_model

pytestmark = [pytest.mark.multirank, pytest.mark.s3]

# One training rank: the model "after step seq" is build_model(resnet20) seeded with seq, so
# every rank and the test agree on the weights without a process group. Commands on stdin:
# "snap SEQ" -> snapshot() and print "queued SEQ"; "close" -> close() and print the summary.
WRITER = r"""
import json, sys, torch
from twa_scale import store
from twa_scale.layout import FlatLayout
from twa_scale.models import build_model
from twa_scale.train.streamer import SnapshotStreamer, StreamerConfig, flush_on_sigterm
url, run, rank, world, session = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def model_at(seq):
    torch.manual_seed(1000 + seq)
    return build_model("resnet20", 10)
layout = FlatLayout.from_model(model_at(0))
if rank == 0:
    store.create_run(url, run, layout, meta={"model": "resnet20", "num_classes": 10}, world_size=world)
cfg = StreamerConfig(session=session, commit_timeout_seconds=float(sys.argv[6]), chunk_bytes=64 << 10)
s = SnapshotStreamer(url, run, layout, rank=rank, world_size=world, config=cfg)
with flush_on_sigterm(s, deadline_seconds=30):  # what the trainer wraps its epochs in
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd == "snap":
            seq = int(arg[0])
            s.snapshot(seq, step=100 * seq, epoch=seq, params=layout.trainable(model_at(seq)))
            print("queued", seq, flush=True)
        elif cmd == "close":
            break
print("summary", json.dumps(s.close()), flush=True)
"""


def model_at(seq: int):
    torch.manual_seed(1000 + seq)
    return build_model("resnet20", 10)


class Writer:
    def __init__(self, url, run, rank, world, session, commit_timeout=60.0):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, url, run, str(rank), str(world), session,
                                      str(commit_timeout)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)

    def expect(self, prefix: str) -> str:
        line = self.proc.stdout.readline()
        assert line.startswith(prefix), f"writer said {line!r}, expected {prefix!r} (exit {self.proc.poll()})"
        return line

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def snap(self, seq: int) -> None:
        self.send(f"snap {seq}")
        self.expect(f"queued {seq}")

    def close(self) -> dict:
        self.send("close")
        summary = json.loads(self.expect("summary").split(" ", 1)[1])
        assert self.proc.wait(timeout=60) == 0
        return summary

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def _launch(url, run, world, commit_timeout=60.0):
    session = uuid.uuid4().hex[:12]  # unique per launch, equal on every rank
    ws = [Writer(url, run, r, world, session, commit_timeout) for r in range(world)]
    for w in ws:
        w.expect("ready")
    return ws


def _committed(url, run):
    return [i.seq for i in store.open_run(url, run).snapshots()]


def _wait_committed(url, run, seqs, timeout=60.0):
    deadline = time.monotonic() + timeout
    while _committed(url, run) != seqs:
        assert time.monotonic() < deadline, f"committed {_committed(url, run)}, waiting for {seqs}"
        time.sleep(0.2)


def test_two_writer_ranks_read_back_by_one_and_three_readers(s3_url):
    ws = _launch(s3_url, "mr", 2)
    for seq in range(3):
        for w in ws:
            w.snap(seq)
    summaries = [w.close() for w in ws]
    assert summaries[0]["committed"] == [0, 1, 2] and all(s["failed"] == 0 for s in summaries)
    r = store.open_run(s3_url, "mr")
    assert [i.seq for i in r.snapshots()] == [0, 1, 2] and r.verify() == []
    for seq in range(3):
        model = model_at(seq)
        layout = FlatLayout.from_model(model)
        truth = layout.gather(layout.trainable(model), 0, layout.D)
        one = r.read(seq)
        three = torch.cat([r.read(seq, a, b) for a, b in layout.slices(3)])
        assert torch.equal(one, three) and torch.equal(one, truth)
        fresh = build_model("resnet20", 10)
        fresh.load_state_dict(r.state_dict(seq, fresh))
        assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


@pytest.mark.slow
def test_writer_rank_killed_mid_upload_leaves_no_partial_snapshot(fresh_s3):
    url, run = "s3://twa-kill/x", "killed"
    ws = _launch(url, run, 2, commit_timeout=5.0)
    for seq in range(3):
        for w in ws:
            w.snap(seq)
    _wait_committed(url, run, [0, 1, 2])
    fresh_s3.pause()  # seq 3's uploads hang in flight ...
    for w in ws:
        w.snap(3)
    time.sleep(0.5)
    ws[1].kill9()  # ... and rank 1 dies mid-upload
    fresh_s3.resume()
    summary = ws[0].close()  # rank 0 uploads its shard, waits for rank 1's, gives up
    assert summary["committed"] == [0, 1, 2] and summary["failed"] == 1  # seq 3: never
    assert _committed(url, run) == [0, 1, 2]
    assert store.open_run(url, run).verify() == []

    # The resumed launch re-snapshots from its checkpoint (seq 2, already committed) onwards.
    ws = _launch(url, run, 2)
    for seq in range(2, 6):
        for w in ws:
            w.snap(seq)
    summaries = [w.close() for w in ws]
    assert summaries[0]["committed"] == [3, 4, 5] and summaries[0]["already_committed"] == 1
    r = store.open_run(url, run)
    assert [i.seq for i in r.snapshots()] == [0, 1, 2, 3, 4, 5] and r.verify() == []
    for seq in range(6):
        model = model_at(seq)
        layout = FlatLayout.from_model(model)
        assert torch.equal(r.read(seq), layout.gather(layout.trainable(model), 0, layout.D))


def test_sigterm_flushes_pending_snapshots_within_the_deadline(s3_url):
    w = Writer(s3_url, "term", 0, 1, uuid.uuid4().hex[:12], 60.0)
    w.expect("ready")
    for seq in range(3):
        w.snap(seq)
    w.proc.send_signal(signal.SIGTERM)  # Kubernetes preemption, uploads possibly in flight
    assert w.proc.wait(timeout=60) == 128 + signal.SIGTERM
    r = store.open_run(s3_url, "term")
    assert [i.seq for i in r.snapshots()] == [0, 1, 2] and r.verify() == []
