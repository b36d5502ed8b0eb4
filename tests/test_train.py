"""The training job as users run it: `deepspeed launch/train.py ...` (and plain python)."""
import json
import signal
import subprocess
import sys
import time

import pytest

from tests.support import REPO, free_port, require_cifar10
from tests.support.launch import deepspeed, env, python
from twa_scale.store import open_run


def _metrics(url_dir, run_id):
    return json.loads((url_dir / run_id / "train" / "metrics.json").read_text())


MLP_ARGS = ["--data", "digits", "--model", "mlp", "--epochs", "2", "--no-twa", "--seed", "0", "--lr", "0.05"]


@pytest.fixture(scope="module")
def single_rank_reference(tmp_path_factory):
    """The same job on one process: the reference every multi-rank run must reproduce.

    `mlp` has no BatchNorm, so 2 ranks × 64 images compute exactly the gradient of 1 rank × 128.
    """
    tmp = tmp_path_factory.mktemp("ref")
    python("launch/train.py", MLP_ARGS + ["--snapshot-url", f"file://{tmp}/snap", "--run-id", "ref",
                                          "--checkpoint-dir", str(tmp / "ckpt")])
    return _metrics(tmp / "snap", "ref")


def _same_run(ref, got):
    for a, b in zip(ref["epochs"], got["epochs"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
        assert abs(b["val_accuracy"] - a["val_accuracy"]) <= 1 / 360  # at most one image flips
    assert got["final"]["val_accuracy"] > 0.5  # and it really learned (chance is 0.1)


@pytest.mark.multirank
def test_two_gloo_ranks_match_single_process(tmp_path, single_rank_reference):
    deepspeed("launch/train.py", MLP_ARGS + ["--snapshot-url", f"file://{tmp_path}/snap", "--run-id", "r",
                                             "--checkpoint-dir", str(tmp_path / "ckpt")], ranks=2)
    m = _metrics(tmp_path / "snap", "r")
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    assert set(m["epochs"][0]) >= {"epoch", "train_loss", "val_loss", "val_accuracy", "seconds"}
    assert m["final"]["world_size"] == 2
    _same_run(single_rank_reference, m)
    reader = open_run(f"file://{tmp_path}/snap", "r")
    assert [s.seq for s in reader.snapshots()] == [0, 1, 2]
    assert reader.manifest.world_size == 2


@pytest.mark.multirank
def test_two_nodes_without_ssh(tmp_path, single_rank_reference):
    """Two `deepspeed --no_ssh --node_rank R` launches (one per "node") form one 2-rank job."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=1\nnode-1 slots=1\n")
    port = free_port()
    args = ["launch/train.py", *MLP_ARGS, "--snapshot-url", f"file://{tmp_path}/snap", "--run-id", "nodes",
            "--checkpoint-dir", str(tmp_path / "ckpt")]
    procs = [subprocess.Popen(["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), *args],
                              cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    m = _metrics(tmp_path / "snap", "nodes")
    assert m["final"]["world_size"] == 2
    _same_run(single_rank_reference, m)


@pytest.mark.e2e
def test_cifar10_subset_through_image_folder(tmp_path):
    data = require_cifar10()
    python("launch/train.py", ["--data", str(data), "--model", "resnet20", "--epochs", "2", "--no-twa",
                               "--limit-train", "4000", "--limit-val", "1000", "--batch-size", "64",
                               "--lr", "0.05", "--snapshot-url", f"file://{tmp_path}/snap", "--run-id", "c",
                               "--checkpoint-dir", str(tmp_path / "ckpt"), "--num-workers", "1"])
    acc = _metrics(tmp_path / "snap", "c")["final"]["val_accuracy"]
    assert acc > 0.25, f"CIFAR-10 val accuracy {acc} is not clearly above chance (0.10)"


def _train_args(tmp_path, run_id):
    return ["launch/train.py", "--data", "digits", "--model", "resnet20", "--epochs", "4", "--no-twa",
            "--snapshot-url", f"file://{tmp_path}/snap", "--run-id", run_id, "--seed", "3",
            "--checkpoint-dir", str(tmp_path / f"ckpt-{run_id}")]


@pytest.mark.e2e
def test_resume_after_preemption_matches_uninterrupted_run(tmp_path):
    python(_train_args(tmp_path, "full")[0], _train_args(tmp_path, "full")[1:])
    full = _metrics(tmp_path / "snap", "full")

    # Preempt a second run with SIGTERM once it has finished an epoch, then resume it.
    args = _train_args(tmp_path, "cut")
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics_file = tmp_path / "snap" / "cut" / "train" / "metrics.json"
    latest = tmp_path / "ckpt-cut" / "latest"  # the metrics row is written before the checkpoint
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists():
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, "the run finished before it could be preempted:\n" + out[-2000:]
    done = json.loads(metrics_file.read_text())["epochs"]
    assert 1 <= len(done) < 4

    resumed = python(args[0], args[1:] + ["--resume"])
    assert "resumed from" in resumed.stdout
    cut = _metrics(tmp_path / "snap", "cut")
    for a, b in zip(full["epochs"], cut["epochs"], strict=True):
        assert a["epoch"] == b["epoch"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6, abs=1e-7)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6, abs=1e-7)
        assert a["val_accuracy"] == b["val_accuracy"]
    assert cut["final"]["val_accuracy"] == full["final"]["val_accuracy"]
    # The snapshot sequence continues with no gap and no duplicate.
    seqs = [s.seq for s in open_run(f"file://{tmp_path}/snap", "cut").snapshots()]
    assert seqs == [0, 1, 2, 3, 4]


@pytest.mark.e2e
@pytest.mark.parametrize("extra, needle", [
    (["--model", "resnet21"], "--model"),
    (["--data", "{tmp}"], "expected subfolders train/ and val/"),
    (["--batch-size", "100", "--micro-batch", "48"], "--batch-size 100 does not divide"),
    (["--deepspeed_config", "{tmp}/missing.json"], "--deepspeed_config"),
    (["--snapshot-url", "file://{tmp}/a-file/sub"], "a-file"),
])
def test_bad_input_fails_before_training(tmp_path, extra, needle):
    (tmp_path / "a-file").write_text("not a directory")
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    proc = python("launch/train.py", ["--epochs", "1", "--no-twa", "--checkpoint-dir", str(tmp_path / "c"),
                                      "--snapshot-url", f"file://{tmp_path}/ok", *extra], check=False)
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0], proc.stderr[-2000:]
    assert "epoch 1/" not in proc.stdout


@pytest.mark.e2e
def test_init_from_snapshot_starts_at_those_weights(tmp_path):
    url = f"file://{tmp_path}/snap"
    common = ["--data", "digits", "--model", "mlp", "--no-twa", "--snapshot-url", url]
    python("launch/train.py", common + ["--epochs", "1", "--run-id", "a", "--checkpoint-dir", str(tmp_path / "a")])
    python("launch/train.py", common + ["--epochs", "0", "--run-id", "b", "--init-from", f"{url}/a@1",
                                        "--checkpoint-dir", str(tmp_path / "b")])
    a, b = open_run(url, "a"), open_run(url, "b")
    assert [s.seq for s in b.snapshots()] == [0]
    assert b.read(0).equal(a.read(1)) and not b.read(0).equal(a.read(0))
    bad = python("launch/train.py", common + ["--epochs", "0", "--run-id", "c", "--init-from", f"{url}/a@7",
                                              "--checkpoint-dir", str(tmp_path / "c")], check=False)
    assert bad.returncode != 0 and "snapshot 7 is not committed" in bad.stderr


def test_checkpoint_wait_follows_the_store_and_stays_under_its_cap():
    from twa_scale.train.loop import checkpoint_wait

    assert checkpoint_wait(10.0, False) == 10.0                       # nothing timed yet: the cap
    assert checkpoint_wait(10.0, False, 0.05, None) == 1.0            # a fast store: 1 s is plenty
    assert checkpoint_wait(10.0, False, 0.05, 1.5) == 6.0             # the slower of upload and write, 4x
    assert checkpoint_wait(10.0, False, 30.0) == 10.0                 # never over the cap
    assert checkpoint_wait(0.5, False, 0.05) == 0.5                   # a cap under 1 s is kept
    assert checkpoint_wait(10.0, True, 1.5) == 1.0                    # after a skipped checkpoint
