"""Sub-epoch snapshot cadence (--snapshots-per-epoch) and selection by epochs (--select-epochs)."""
import json
import shutil
from types import SimpleNamespace

import pytest

from tests.support import require_cifar10
from tests.support.launch import deepspeed, python
from twa_scale.train.config import TrainConfig
from twa_scale.errors import ConfigError
from twa_scale.store import open_run
from twa_scale.train.loop import SnapshotPlan
from twa_scale.twa.selection import check_select_seqs, select_by_epochs


def _infos(k: int, epochs: int, steps: int = 10):
    """Records as the trainer writes them: seq 0 at 0.0, then k per epoch."""
    out = [SimpleNamespace(seq=0, step=0, epoch=0, epoch_fraction=0.0)]
    for e in range(epochs):
        for j in range(1, k + 1):
            out.append(SimpleNamespace(seq=e * k + j, step=e * steps + j * steps // k, epoch=e + (j == k),
                                       epoch_fraction=e + j / k))
    return out


def _seqs(infos):
    return [i.seq for i in infos]


def test_plan_spaces_snapshots_evenly_by_steps_and_ends_each_epoch():
    plan = SnapshotPlan.from_config(TrainConfig(snapshots_per_epoch=5), steps_per_epoch=11)
    assert plan.mid_epoch() == [(2, 1), (4, 2), (6, 3), (8, 4)]  # the 5th is the epoch's end, step 11
    assert [plan.seq(1, j) for j in range(1, 6)] == [6, 7, 8, 9, 10]
    assert [plan.seq_at_boundary(e) for e in (0, 1, 2)] == [0, 5, 10]
    one = SnapshotPlan.from_config(TrainConfig(snapshots_per_epoch=7), steps_per_epoch=7)
    assert one.mid_epoch() == [(j, j) for j in range(1, 7)]
    per_epoch = SnapshotPlan.from_config(TrainConfig(snapshot_every=2), steps_per_epoch=11)
    assert per_epoch.mid_epoch() == [] and [per_epoch.seq_at_boundary(e) for e in range(5)] == [0, None, 1, None, 2]
    with pytest.raises(ConfigError, match=r"^--snapshots-per-epoch 12: larger than the 11 optimizer steps"):
        SnapshotPlan.from_config(TrainConfig(snapshots_per_epoch=12), steps_per_epoch=11)
    with pytest.raises(ValueError, match="--snapshots-per-epoch: cannot be combined with --snapshot-every 2"):
        TrainConfig(snapshots_per_epoch=5, snapshot_every=2)


def test_select_epochs_resolves_through_the_records():
    k5 = _infos(5, epochs=60)
    assert _seqs(select_by_epochs(k5, "0:60")) == list(range(301))  # the authors' "60+2": 301 snapshots
    assert _seqs(select_by_epochs(_infos(1, epochs=60), "0:60")) == list(range(61))  # same epochs at K=1
    assert _seqs(select_by_epochs(k5, "1:2")) == [5, 6, 7, 8, 9, 10]  # both ends included
    assert _seqs(select_by_epochs(k5, "1:2:2")) == [5, 7, 9]  # STRIDE counts snapshots
    assert _seqs(select_by_epochs(k5, "59.5:")) == [298, 299, 300]
    assert _seqs(select_by_epochs(k5, ":0.4")) == [0, 1, 2]
    old = [SimpleNamespace(seq=s, step=10 * s, epoch=s, epoch_fraction=None) for s in range(4)]  # older records
    assert _seqs(select_by_epochs(old, "1:3")) == [1, 2, 3]


@pytest.mark.parametrize("spec, needle", [
    ("0:61", "epoch 61 (B) is not committed: the last committed snapshot is seq 300 at epoch 60"),
    ("70:", "epoch 70 (A) is not committed"),
    ("60:60", "TWA needs at least 2 snapshots, the selection holds 1 (seq 300 at epoch 60)"),
    ("0.1:0.15", "holds 0"),
    ("0:10:400", "holds 1"),
    ("a:b", "A and B must be numbers"),
    ("3:1", "expected 0 <= A <= B"),
])
def test_select_epochs_bad_input_is_one_line(spec, needle):
    with pytest.raises(ConfigError) as err:
        select_by_epochs(_infos(5, epochs=60), spec)
    assert needle in str(err.value) and "\n" not in str(err.value) and f"--select-epochs {spec}" in str(err.value)


def test_select_seqs_must_name_committed_snapshots():
    infos = _infos(1, epochs=10)
    check_select_seqs(infos, "1:11")
    check_select_seqs(infos, "0::2")
    with pytest.raises(ConfigError, match=r"--select 1:21: seq 20 \(B - 1\) is not committed \(committed: seq 0..10\)"):
        check_select_seqs(infos, "1:21")
    with pytest.raises(ConfigError, match=r"seq 12 \(A\) is not committed"):
        check_select_seqs(infos, "12:")


def _train(tmp_path, run_id, *extra, snap="snap", ckpt=None):
    return ["--data", "digits", "--model", "mlp", "--epochs", "2", "--no-twa", "--seed", "1", "--lr", "0.05",
            "--snapshots-per-epoch", "5", "--snapshot-url", f"file://{tmp_path}/{snap}", "--run-id", run_id,
            "--checkpoint-dir", str(tmp_path / (ckpt or f"ckpt-{run_id}")), *extra]


@pytest.mark.e2e
def test_resume_retakes_sub_epoch_snapshots_idempotently(tmp_path):
    """Preempted in epoch 2 after its snapshots 6 and 7 committed: the resumed run keeps 5-7 and
    writes 8-10 with exactly the weights of an uninterrupted run."""
    python("launch/train.py", _train(tmp_path, "r"))
    full = open_run(f"file://{tmp_path}/snap", "r")
    assert [(s.seq, s.epoch_fraction) for s in full.snapshots()] == [(s, s / 5) for s in range(11)]
    # The state a preemption after seq 7 leaves: checkpoint of epoch 1, commits 0..7.
    shutil.copytree(tmp_path / "snap", tmp_path / "cut")
    shutil.copytree(tmp_path / "ckpt-r", tmp_path / "ckpt-cut")
    for seq in (8, 9, 10):
        shutil.rmtree(tmp_path / "cut" / "r" / "snapshots" / f"{seq:08d}")
    shutil.rmtree(tmp_path / "ckpt-cut" / "epoch2")
    (tmp_path / "ckpt-cut" / "latest").write_text("epoch1")
    out = python("launch/train.py", _train(tmp_path, "r", "--resume", snap="cut", ckpt="ckpt-cut"))
    assert "resumed from" in out.stdout and "at epoch 1" in out.stdout
    cut = open_run(f"file://{tmp_path}/cut", "r")
    assert [(s.seq, s.step, s.epoch, s.epoch_fraction) for s in cut.snapshots()] == \
           [(s.seq, s.step, s.epoch, s.epoch_fraction) for s in full.snapshots()]
    for seq in range(11):
        assert cut.read(seq).equal(full.read(seq)), f"seq {seq} differs after resume"
    summary = json.loads((tmp_path / "cut" / "r" / "train" / "metrics.json").read_text())["final"]["snapshots"]
    assert summary["already_committed"] == 3 and summary["uploaded"] == 3  # 5, 6, 7 kept; 8, 9, 10 written


@pytest.mark.e2e
def test_too_many_snapshots_per_epoch_is_a_one_line_error(tmp_path):
    proc = python("launch/train.py", _train(tmp_path, "bad")[:-2] + ["--snapshots-per-epoch", "50",
                  "--batch-size", "128", "--checkpoint-dir", str(tmp_path / "c")], check=False)
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1, proc.stderr[-2000:]
    assert "--snapshots-per-epoch 50: larger than the 11 optimizer steps" in err[0], proc.stderr[-2000:]


@pytest.mark.multirank
def test_five_snapshots_per_epoch_on_two_ranks_cifar10(tmp_path):
    data = require_cifar10()
    url = f"file://{tmp_path}/snap"
    deepspeed("launch/train.py", ["--data", str(data), "--model", "resnet20", "--epochs", "2", "--no-twa",
                                  "--limit-train", "640", "--limit-val", "64", "--batch-size", "64",
                                  "--snapshots-per-epoch", "5", "--num-workers", "0", "--snapshot-url", url,
                                  "--run-id", "k5", "--checkpoint-dir", str(tmp_path / "ckpt")], ranks=2)
    reader = open_run(url, "k5")
    snaps = reader.snapshots()
    # 640 images / 2 ranks / 32 per rank = 10 optimizer steps per epoch: snapshots after steps 2, 4, 6, 8, 10.
    assert [(s.seq, s.step, s.epoch_fraction) for s in snaps] == [(s, 2 * s, s / 5) for s in range(11)]
    for e in (0, 1):
        assert len([s for s in snaps if e < s.epoch_fraction <= e + 1]) == 5
    assert reader.manifest.world_size == 2
    assert _seqs(select_by_epochs(snaps, "0:1")) == [0, 1, 2, 3, 4, 5]
    assert _seqs(select_by_epochs(snaps, "1:2:2")) == [5, 7, 9]
    assert _seqs(select_by_epochs(snaps, "0.5:1.5")) == [3, 4, 5, 6, 7]
    # The TWA stage resolves --select-epochs the same way (epochs 0: start point only, quick).
    twa = ["launch/twa.py", "--snapshot-url", url, "--run-id", "k5", "--epochs", "0", "--batch-size", "64",
           "--output", f"file://{tmp_path}/twa"]
    python(twa[0], twa[1:] + ["--select-epochs", "1:2:2"])
    result = json.loads((tmp_path / "twa" / "result.json").read_text())
    assert [(s["seq"], s["epoch"]) for s in result["snapshots"]] == [(5, 1.0), (7, 1.4), (9, 1.8)]
    bad = python(twa[0], twa[1:] + ["--select-epochs", "0:3"], check=False)
    err = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode != 0 and len(err) == 1 and "epoch 3 (B) is not committed" in err[0], bad.stderr[-2000:]
