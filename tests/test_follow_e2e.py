"""Issue 11's done check: a 2-rank training run with a 1-rank live TWA follower attached stops early by the rule.

    deepspeed --num_gpus 2 launch/train.py --data digits --model mlp --epochs 300 --snapshots-per-epoch 2 \
        --holdout-fraction 0.2 ... &
    deepspeed --num_gpus 1 launch/twa.py --follow --stop-rule target:0.6 --probe-every 2 ...

Both are real `deepspeed` launches (gloo on CPU) on one file:// store, started together. The target rule
makes the stop certain (the mlp passes 60% hold-out accuracy within a few epochs); 300 epochs make "before
the configured last epoch" a real claim: unstopped, the run would take minutes.
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.support import REPO, free_port, require_binary
from tests.support.launch import env

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

EPOCHS = 300


def test_two_rank_training_with_a_follower_stops_early_by_the_rule(tmp_path):
    require_binary("deepspeed")
    url, run = f"file://{tmp_path}/snap", "live"
    common = ["--snapshot-url", url, "--run-id", run]
    train = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py", *common,
             "--data", "digits", "--model", "mlp", "--epochs", str(EPOCHS), "--snapshots-per-epoch", "2",
             "--holdout-fraction", "0.2", "--limit-train", "320", "--limit-val", "128", "--batch-size", "32",
             "--no-twa", "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-url", "none"]
    follow = ["deepspeed", "--num_gpus", "1", "--master_port", str(free_port()), "launch/twa.py", *common,
              "--follow", "--stop-rule", "target:0.6", "--probe-every", "2", "--probe-steps", "8",
              "--probe-bn-batches", "2", "--poll-seconds", "0.5", "--follow-timeout", "120", "--batch-size", "32",
              "--epochs", "1", "--plot", "false"]
    t0 = time.monotonic()
    # the follower first: it waits for the run to appear
    follower = subprocess.Popen(follow, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    trainer = subprocess.Popen(train, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        train_out, _ = trainer.communicate(timeout=600)
        follow_out, _ = follower.communicate(timeout=300)
    finally:
        for p in (trainer, follower):
            if p.poll() is None:
                p.kill()
    assert trainer.returncode == 0, train_out[-4000:]
    assert follower.returncode == 0, follow_out[-4000:]
    assert "waiting for the training run" in follow_out or "probe 0" in follow_out

    final = json.loads((tmp_path / "snap" / run / "train" / "metrics.json").read_text())["final"]
    assert final["stopped_by"] == "twa" and final["stop_rule"] == "target:0.6"
    assert final["stopped_epoch"] < EPOCHS, "stopped before the configured last epoch"
    probes = json.loads((tmp_path / "snap" / run / "twa" / "probes.json").read_text())["probes"]
    assert [p["probe"] for p in probes] == list(range(len(probes))) and probes, "one record per probe"
    last_seqs = [p["last_seq"] for p in probes]
    assert last_seqs == sorted(set(last_seqs)), "no probe recorded twice"
    assert sum(p["stop_written"] for p in probes) == 1
    fired = next(p for p in probes if p["stop_written"])
    assert fired["would_stop"] and fired["twa_accuracy"] >= 0.6 and fired["split"] == "holdout"
    # training ended at the first snapshot at which it saw the marker: after the probe that wrote it
    assert final["stopped_seq"] > fired["last_seq"]
    stop = json.loads((tmp_path / "snap" / run / "control" / "STOP.json").read_text())
    assert stop["by"] == "twa" and stop["probes"][-1]["last_seq"] == fired["last_seq"]
    result = json.loads((tmp_path / "snap" / run / "twa" / "result.json").read_text())
    assert [s["seq"] for s in result["snapshots"]] == list(range(final["stopped_seq"] + 1))
    assert 0 < result["twa_accuracy"] <= 1
    print(f"stopped at epoch {final['stopped_epoch']} of {EPOCHS} after {len(probes)} probe(s), "
          f"{time.monotonic() - t0:.0f}s in all")
