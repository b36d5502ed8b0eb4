"""Step-level (mid-epoch) DeepSpeed checkpoints and exact mid-epoch resume (issue 13 §1): after a kill -9,
and after a SIGTERM that every rank answers with a checkpoint at one agreed step. The resumed runs train
resnet20 (BatchNorm: every rank's running statistics must come back, issue 20 §2) and must end with every
metrics field and every snapshot of the uninterrupted run, bit for bit."""
import json
import re
import sys
import time
import uuid

import pytest

from tests.support.launch import deepspeed, run
from twa_scale.train.checkpoints import committed_tags
from twa_scale.store import TrainMetrics, open_run, open_store

EVERY = 4  # --checkpoint-every-steps
# digits, 2 gloo ranks: 11 optimizer steps per epoch; 3 snapshots per epoch (after steps 3, 7, 11);
# checkpoints after global steps 4, 8, 11 (epoch end), 12, 16, 20, 22 (end).
CADENCE = ["--data", "digits", "--epochs", "2", "--no-twa", "--seed", "1", "--lr", "0.05",
           "--snapshots-per-epoch", "3", "--checkpoint-every-steps", str(EVERY), "--log-every-steps", "3"]
ARGS = CADENCE + ["--model", "mlp"]  # 2 ranks × 64 images a step (the S3 cases)
# resnet20 kept cheap on 2 cores: 2 ranks × 8 images a step over 176 training images, 64 validation images.
BN_ARGS = CADENCE + ["--model", "resnet20", "--batch-size", "16", "--limit-train", "176", "--limit-val", "64"]


def _args(tmp_path, run_id):
    return BN_ARGS + ["--snapshot-url", f"file://{tmp_path}/snap", "--run-id", run_id,
                   "--checkpoint-dir", str(tmp_path / f"ckpt-{run_id}")]


def _metrics(tmp_path, run_id):
    return json.loads((tmp_path / "snap" / run_id / "train" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (its store URL, its metrics.json)."""
    tmp = tmp_path_factory.mktemp("reference")
    deepspeed("launch/train.py", _args(tmp, "full"), ranks=2)
    return f"file://{tmp}/snap", _metrics(tmp, "full")


def _same_as_reference(reference, tmp_path, run_id):
    """Metrics and every committed snapshot equal the uninterrupted run's; the sequence has no gap."""
    ref_url, full = reference
    got = _metrics(tmp_path, run_id)
    assert [e["epoch"] for e in got["epochs"]] == [1, 2]
    for a, b in zip(full["epochs"], got["epochs"], strict=True):
        assert set(a) == set(b) and "val_loss" in a
        for field in set(a) - {"seconds"}:  # every field but the wall clock, bit for bit
            assert b[field] == a[field], (field, b["epoch"], b[field], a[field])
    # The summary too, but its wall clock and the snapshot counters (of the resumed process's uploads only).
    assert set(got["final"]) == set(full["final"])
    for field in set(full["final"]) - {"train_seconds", "snapshots", "run_url"}:
        assert got["final"][field] == full["final"][field], field
    url = f"file://{tmp_path}/snap"
    ref, cont = open_run(ref_url, "full"), open_run(url, run_id)
    seqs = [s.seq for s in cont.snapshots()]
    assert seqs == list(range(7)), seqs  # contiguous, no duplicate
    for s in seqs:
        assert cont.read(s).equal(ref.read(s)), f"snapshot {s} differs from the uninterrupted run's"
    verify = run([sys.executable, "-m", "twa_scale", "snapshots", "verify", f"{url}/{run_id}"])
    assert "7 committed snapshot(s), all checksums OK" in verify.stdout


@pytest.mark.multirank
def test_kill_one_rank_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, reference):
    # kill -9 of rank 1 right after global step 18 (epoch 2, step 7 of 11): the newest checkpoint is global step 16.
    # A short writer lease: the killed job may leave it held, and the relaunch takes it over once stale.
    lease = {"TWA_SCALE_LEASE_TIMEOUT_SECONDS": "4"}
    kill_at = 18
    cut = deepspeed("launch/train.py", _args(tmp_path, "cut"), ranks=2, check=False,
                    extra_env={"TWA_SCALE_FAULT_KILL_AT_STEP": f"1:{kill_at}", **lease})
    assert cut.returncode != 0, cut.stdout[-2000:]
    ckpt = tmp_path / "ckpt-cut"
    assert (ckpt / "latest").read_text() == "epoch1-step5"  # global step 16
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["epoch1-step1", "epoch1-step5"]  # newest 2

    # Every checkpoint was also uploaded to the default --checkpoint-url (the run's prefix), newest 2 kept.
    store = open_store(f"file://{tmp_path}/snap/cut/checkpoints")
    assert committed_tags(store) == ["epoch1-step1", "epoch1-step5"]

    # The relaunch is a fresh pod: an empty --checkpoint-dir, so it downloads the newest committed checkpoint.
    time.sleep(4)
    resumed = deepspeed("launch/train.py", _args(tmp_path, "cut") + ["--resume", "--checkpoint-dir",
                                                                     str(tmp_path / "fresh")],
                        ranks=2, extra_env=lease)
    assert "downloaded checkpoint epoch1-step5" in resumed.stderr + resumed.stdout
    m = re.search(r"resumed from \S+ at epoch 1, step 5 of 11 \(global step (\d+)\)", resumed.stdout)
    assert m, resumed.stdout[-3000:]
    assert kill_at - int(m.group(1)) <= EVERY  # at most --checkpoint-every-steps steps redone

    _same_as_reference(reference, tmp_path, "cut")
    assert committed_tags(store) == ["epoch1-step9", "epoch2"]  # pruned on the store too


@pytest.mark.multirank
@pytest.mark.parametrize("term_at,tag,older,where", [
    # epoch 2, step 2 of 11; the newest periodic checkpoint is global step 12 (epoch1-step1)
    (13, "epoch1-step3", "epoch1-step1", "at epoch 1, step 3 of 11 (global step 14)"),
    # the last step of epoch 1: agreed at the loop's end (StepAgreement.finish), before evaluation
    (11, "epoch0-step11", "epoch0-step8", "at epoch 0, step 11 of 11 (global step 11)"),
])
def test_sigterm_on_one_rank_checkpoints_every_rank_at_one_step_then_resume_matches(tmp_path, reference, term_at,
                                                                                     tag, older, where):
    """SIGTERM reaches rank 1 only, after global step ``term_at``. The ranks agree on the next step (or, at an
    epoch's last step, on that one): both save ``tag``, upload it, and exit 143. A fresh pod resumes there,
    not at the older periodic checkpoint, and ends exactly like the uninterrupted run."""
    cut = deepspeed("launch/train.py", _args(tmp_path, "term"), ranks=2, check=False,
                    extra_env={"TWA_SCALE_FAULT_KILL_AT_STEP": f"1:{term_at}:TERM"})
    log = cut.stdout + cut.stderr
    assert cut.returncode == 143, log[-3000:]
    assert "saving one at this step" in log, log[-3000:]
    ckpt = tmp_path / "ckpt-term"
    assert (ckpt / "latest").read_text() == tag
    # (rank 0 never got the signal: had it not joined the save, its collectives would hang the job)
    assert {p.name for p in ckpt.iterdir() if p.is_dir()} == {older, tag}
    store = open_store(f"file://{tmp_path}/snap/term/checkpoints")
    assert committed_tags(store)[-1] == tag  # uploaded within the SIGTERM deadline

    resumed = deepspeed("launch/train.py", _args(tmp_path, "term") + ["--resume", "--checkpoint-dir",
                                                                      str(tmp_path / "fresh")], ranks=2)
    assert f"downloaded checkpoint {tag}" in resumed.stderr + resumed.stdout
    assert "resumed from" in resumed.stdout and where in resumed.stdout, resumed.stdout[-3000:]
    _same_as_reference(reference, tmp_path, "term")



def test_buffers_saved_by_another_model_are_a_one_line_error():
    """A checkpoint's per-rank buffers go back into the model only when they fit it (names and shapes)."""
    import torch

    from twa_scale.train.checkpoints import CheckpointError, _buffers, _restore_buffers
    from twa_scale.models import build_model

    torch.manual_seed(0)
    saved, model = build_model("resnet20", 10), build_model("resnet20", 10)
    saved.train()(torch.randn(4, 3, 32, 32))  # running statistics away from their initial values
    _restore_buffers(model, _buffers(saved), "ckpt/epoch1")
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), saved.buffers(), strict=True))
    with pytest.raises(CheckpointError, match=r"^--resume: checkpoint ckpt/epoch1: its per-rank buffers do not "
                                              r"match this model's \(57 buffers\)"):
        _restore_buffers(model, _buffers(build_model("resnet56", 10)), "ckpt/epoch1")


# --- fail-safe resume on S3 (issue 19): a damaged newest tag leaves the resume on the previous intact one ---------
@pytest.fixture(scope="module")
def s3_finished(s3_server, tmp_path_factory):
    """A finished 2-rank run on the real S3 server, snapshots and checkpoints (tags epoch1-step9 and epoch2 kept):
    (its URL, its metrics)."""
    url = f"s3://twa-test/{uuid.uuid4().hex[:10]}"
    tmp = tmp_path_factory.mktemp("s3run")
    deepspeed("launch/train.py", ARGS + ["--snapshot-url", url, "--run-id", "r", "--checkpoint-dir", str(tmp)], ranks=2)
    st = open_store(f"{url}/r/checkpoints")
    assert committed_tags(st) == ["epoch1-step9", "epoch2"]
    return url, TrainMetrics.from_json(open_store(url).get("r/train/metrics.json"), "metrics")


def _copy_run(url: str) -> str:
    """The finished run under a fresh prefix: every case resumes (and so rewrites) its own copy."""
    src, dst_url = open_store(f"{url}/r"), f"s3://twa-test/{uuid.uuid4().hex[:10]}"
    dst = open_store(f"{dst_url}/r")
    for key in src.find(""):
        dst.put_large(key, memoryview(src.get(key)))
    return dst_url


def _damage(st, key: str, how: str) -> None:
    data = st.get(key)
    st.put_small(key, {"empty": b"", "truncated": data[:len(data) // 2],
                       "altered": data[:-100] + bytes([data[-100] ^ 1]) + data[-99:]}[how])


@pytest.mark.s3
@pytest.mark.multirank
@pytest.mark.parametrize("flag,damaged,how", [
    ("--resume", "COMMIT.json", "empty"),  # what SeaweedFS leaves when a client dies mid-PUT
    ("--auto-resume", "mp_rank_00_model_states.pt", "altered"),  # same size: only its sha256 tells
])  # (every damage of every object, on S3 too, in one process: tests/test_checkpoint_store.py)
def test_a_damaged_newest_checkpoint_on_s3_resumes_from_the_previous_intact_tag(s3_finished, tmp_path, flag, damaged,
                                                                                 how):
    url, full = s3_finished
    copy = _copy_run(url)
    _damage(open_store(f"{copy}/r/checkpoints"), f"epoch2/{damaged}", how)
    resumed = deepspeed("launch/train.py", ARGS + ["--snapshot-url", copy, "--run-id", "r", flag,
                                                   "--checkpoint-dir", str(tmp_path / "fresh")], ranks=2)
    log = resumed.stdout + resumed.stderr
    assert f"{copy}/r/checkpoints/epoch2/{damaged}" in log, log[-3000:]  # the warning names the object
    assert "downloaded checkpoint epoch1-step9" in log and "Traceback" not in log
    assert re.search(r"resumed from \S+/epoch1-step9/\S+ at epoch 1, step 9 of 11", resumed.stdout), log[-3000:]
    got = TrainMetrics.from_json(open_store(copy).get("r/train/metrics.json"), "metrics")
    def curve(m):
        return [(r.epoch, r.train_loss, r.val_loss, r.val_accuracy, r.lr) for r in m.epochs]

    assert curve(got) == curve(full)  # the last 2 steps redone exactly as the uninterrupted run did them


@pytest.mark.s3
@pytest.mark.multirank
def test_no_intact_checkpoint_on_s3_is_one_line_and_exit_2_on_every_rank(s3_finished, tmp_path):
    url, _ = s3_finished
    copy = _copy_run(url)
    st = open_store(f"{copy}/r/checkpoints")
    _damage(st, "epoch2/COMMIT.json", "truncated")
    _damage(st, "epoch1-step9/mp_rank_00_model_states.pt", "truncated")
    cut = deepspeed("launch/train.py", ARGS + ["--snapshot-url", copy, "--run-id", "r", "--resume",
                                               "--checkpoint-dir", str(tmp_path / "fresh")], ranks=2, check=False)
    log = cut.stdout + cut.stderr
    assert cut.returncode == 2, log[-3000:]
    lines = [ln for ln in log.splitlines() if ln.startswith("error: --resume: no intact checkpoint in")]
    assert len(lines) == 2, log[-3000:]  # one line per rank
    assert "epoch1-step9" in lines[0] and "bytes, the commit records" in lines[0] and "Traceback" not in log
