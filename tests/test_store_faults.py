"""The training job's store writes under faults, against a real SeaweedFS (mlp on digits, 1 process):
two launches into one run id, a relaunch without --resume, a zero-byte COMMIT.json repaired by
resume, a 60 s outage mid-run, and credentials that never reach a log or a stored object."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.support import REPO
from tests.support.launch import env
from tests.support.s3 import S3_ENV
from twa_scale import store
from twa_scale.train.checkpoints import committed_tags
from twa_scale.cli import main
from twa_scale.store import open_store

pytestmark = [pytest.mark.s3, pytest.mark.slow]

ARGS = ["--data", "digits", "--model", "mlp", "--no-twa", "--seed", "0", "--lr", "0.05"]


def _train(url, run, tmp_path, *extra, extra_env=None):
    cmd = [sys.executable, "launch/train.py", *ARGS, "--snapshot-url", url, "--run-id", run,
           "--checkpoint-dir", str(tmp_path / f"ckpt-{run}"), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env(**(extra_env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _objects(url, prefix):
    st = open_store(url)
    return {k: st.get(k) for k in st.find(prefix)}


def test_two_launches_one_run_relaunch_refused_empty_commit_repaired(s3_server, tmp_path, capsys):
    url, run = "s3://twa-test/faults", f"dup-{os.getpid()}"
    procs = [_train(url, run, tmp_path, "--epochs", "2") for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    loser = outs[[p.returncode for p in procs].index(codes[1])]
    assert codes[0] == 0 and codes[1] in (2, 75), outs
    err = [line for line in loser[1].splitlines() if "error" in line]
    assert len(err) == 1 and run in err[0] and ("another launch" in err[0] or "being written" in err[0]
                                                or "already exists" in err[0]), loser[1][-2000:]
    assert "epoch 1/" not in loser[0]
    r = store.open_run(url, run)
    assert [i.seq for i in r.snapshots()] == [0, 1, 2] and r.verify() == []

    # A relaunch without --resume is refused, and the stored run is byte-for-byte unchanged.
    before = _objects(url, run)
    p = _train(url, run, tmp_path, "--epochs", "2")
    out, errtext = p.communicate(timeout=600)
    assert p.returncode == 2 and "already exists" in errtext and "--resume" in errtext, errtext[-2000:]
    assert _objects(url, run) == before

    # A zero-byte COMMIT.json is not committed: never listed; resume re-commits it from its shards.
    open_store(url).put_small(f"{run}/snapshots/00000001/COMMIT.json", b"")
    assert [i.seq for i in store.open_run(url, run).snapshots()] == [0, 2]
    assert main(["snapshots", "ls", f"{url}/{run}"]) == 0
    assert "DAMAGED" in capsys.readouterr().out
    p = _train(url, run, tmp_path, "--epochs", "2", "--resume")
    out, errtext = p.communicate(timeout=600)
    assert p.returncode == 0, errtext[-3000:]
    assert "re-committed snapshot seq 1" in errtext
    r = store.open_run(url, run)
    assert [i.seq for i in r.snapshots()] == [0, 1, 2] and r.verify() == []
    metrics = store.read_json(f"{url}/{run}/train/metrics.json")
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]


def test_60s_outage_mid_run_and_credentials_never_logged(fresh_s3, tmp_path):
    url, run = "s3://twa-outage/x", "outage"
    # A restarted server enforces the key pair in its environment (S3_ENV), so the test uses that pair.
    key, secret = S3_ENV["AWS_ACCESS_KEY_ID"], S3_ENV["AWS_SECRET_ACCESS_KEY"]
    opts = json.dumps({"key": key, "secret": secret, "endpoint_url": fresh_s3.endpoint})
    # No credentials and no endpoint in the environment: only --storage-options can reach the store.
    clean = {k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
    p = _train(url, run, tmp_path, "--epochs", "4", "--storage-options", opts,
               extra_env={**clean, "TWA_SCALE_LEASE_HEARTBEAT_SECONDS": "2"})
    st = open_store(url)
    deadline = time.monotonic() + 300
    while not st.exists(f"{run}/snapshots/00000001/COMMIT.json"):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.2)
    fresh_s3.kill()
    time.sleep(60)
    assert p.poll() is None, "training died during the outage:\n" + p.communicate()[1][-3000:]
    fresh_s3.start()
    out, errtext = p.communicate(timeout=600)
    assert p.returncode == 0, errtext[-4000:]
    assert "retry" in errtext  # the outage was seen
    r = store.open_run(url, run)
    assert [i.seq for i in r.snapshots()] == [0, 1, 2, 3, 4] and r.verify() == []
    metrics = store.read_json(f"{url}/{run}/train/metrics.json")
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4]
    # Checkpoints upload in the background with the same retries: the outage delayed them (a newer tag
    # replaces one still waiting), and the newest is committed once the store is back; at most 2 are kept.
    tags = committed_tags(open_store(f"{url}/{run}/checkpoints"))
    assert tags[-1] == "epoch4" and len(tags) <= 2, tags
    assert secret not in out and secret not in errtext
    stored = _objects(url, run)
    assert not [k for k, v in stored.items() if secret.encode() in v]
    assert json.loads(stored[f"{run}/run.json"])["meta"]["config"]["storage_options"] == "<redacted>"
