"""Experiment tracking read back with the trackers' own readers, and the log a cluster sees.

One real 2-rank run on real S3 (SeaweedFS) feeds both checks: TensorBoard's ``EventAccumulator`` reads
the event files from the store (staged locally, copied up per epoch), and the job's captured output
(not a TTY, as under ``kubectl logs``) is checked line by line. MLflow runs against a local file store.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import fsspec
import pytest

from tests.support import REPO, free_port
from tests.support.launch import python, run

ARGS = ["--data", "digits", "--model", "mlp", "--epochs", "2", "--seed", "0", "--lr", "0.05", "--twa",
        "--twa-epochs", "1", "--log-every-steps", "2"]


def _scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _download(url: str, dest) -> str:
    fs, path = fsspec.core.url_to_fs(url)
    fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
    return str(dest)


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory):
    """Two gloo ranks, --logger tensorboard, the snapshots on S3; its output captured through pipes."""
    import uuid

    url = f"s3://twa-test/{uuid.uuid4().hex[:10]}"
    cmd = ["deepspeed", "--log_level", "warning", "--num_gpus", "2", "--master_port", str(free_port()),
           "launch/train.py", *ARGS, "--snapshot-url", url, "--run-id", "r", "--logger", "tensorboard",
           "--checkpoint-dir", str(tmp_path_factory.mktemp("ckpt"))]
    proc = run(cmd, extra_env=dict(s3_server.env), timeout=1200)  # 2 ranks, 2 epochs and TWA on a busy 2-core box
    return url, proc, tmp_path_factory.mktemp("tb")


@pytest.mark.multirank
@pytest.mark.s3
def test_tensorboard_event_files_on_the_store_hold_the_run_and_the_twa_result(s3_run):
    url, _, tmp = s3_run
    fs_open = lambda p: json.loads(fsspec.open(f"{url}/r/{p}").open().read())  # noqa: E731
    metrics, result = fs_open("train/metrics.json"), fs_open("twa/result.json")
    train = _scalars(_download(f"{url}/r/tensorboard/train", tmp / "train"))
    twa = _scalars(_download(f"{url}/r/tensorboard/twa", tmp / "twa"))

    # per step, at every optimizer step (the host reads them every 2 steps)
    steps = [s for s, _ in train["train/loss"]]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4
    assert {"train/lr", "train/samples_per_second"} <= set(train)
    assert all(v > 0 for _, v in train["train/samples_per_second"])
    # per epoch: the same numbers as metrics.json
    for tag, key in (("val/accuracy", "val_accuracy"), ("val/loss", "val_loss"), ("train/epoch_loss", "train_loss")):
        assert [s for s, _ in train[tag]] == [1, 2]
        assert [v for _, v in train[tag]] == pytest.approx([r[key] for r in metrics["epochs"]], rel=1e-5)
    assert train["snapshot/committed"][-1][1] >= 2
    # the TWA result and its coefficients, one per snapshot at its seq
    assert twa["twa/twa_accuracy"][-1][1] == pytest.approx(result["twa_accuracy"], rel=1e-6)
    assert twa["twa/swa_accuracy"][-1][1] == pytest.approx(result["swa_accuracy"], rel=1e-6)
    coef = dict(twa["twa/coefficient"])
    assert sorted(coef) == [s["seq"] for s in result["snapshots"]]
    assert [coef[s["seq"]] for s in result["snapshots"]] == pytest.approx(result["alpha"], abs=1e-6)
    assert "twa/epoch_train_loss" in twa


@pytest.mark.multirank
@pytest.mark.s3
def test_the_log_of_a_two_rank_job_fits_a_cluster(s3_run):
    """Not a TTY: no carriage returns, no line over 300 characters, no third-party INFO (botocore's
    credential lines), rank 0's INFO only and each message once."""
    _, proc, _ = s3_run
    text = proc.stdout + proc.stderr
    assert "\r" not in text
    lines = text.splitlines()
    assert max(len(line) for line in lines) < 300
    info = [line for line in lines if re.search(r"\bINFO\b", line)]
    assert info and all(re.match(r"\S+ \S+ INFO twa_scale[.:]", line) for line in info), info
    assert not [line for line in lines if "[rank 1]" in line and "INFO" in line]
    for message in ("checkpoint epoch1 committed", "epoch 1/2", "tensorboard: event files"):
        assert sum(message in line for line in lines) == (2 if message.startswith("tensorboard") else 1), message


@pytest.mark.e2e
def test_mlflow_run_in_a_local_file_store_reads_back(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    store = f"file://{tmp_path}/mlruns"
    python("launch/train.py", ARGS + ["--snapshot-url", f"file://{tmp_path}/snap", "--run-id", "m",
                                      "--checkpoint-dir", str(tmp_path / "ckpt"), "--logger", "mlflow"],
           extra_env={"MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true"})
    metrics = json.loads((tmp_path / "snap/m/train/metrics.json").read_text())
    result = json.loads((tmp_path / "snap/m/twa/result.json").read_text())
    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("twa_scale").experiment_id])}
    assert set(runs) == {"m/train", "m/twa"}
    train, twa = runs["m/train"], runs["m/twa"]
    val = client.get_metric_history(train.info.run_id, "val.accuracy")
    assert [m.step for m in val] == [1, 2]
    assert [m.value for m in val] == pytest.approx([r["val_accuracy"] for r in metrics["epochs"]], rel=1e-6)
    assert client.get_metric_history(train.info.run_id, "train.loss")
    assert train.data.params["model"] == "mlp" and train.data.params["epochs"] == "2"
    assert twa.data.metrics["twa.twa_accuracy"] == pytest.approx(result["twa_accuracy"], rel=1e-6)
    assert len(client.get_metric_history(twa.info.run_id, "twa.coefficient")) == len(result["snapshots"])


@pytest.mark.e2e
def test_unknown_logger_names_the_flag():
    proc = subprocess.run([sys.executable, "launch/train.py", "--logger", "wandb"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --logger: must be one of none, tensorboard")
