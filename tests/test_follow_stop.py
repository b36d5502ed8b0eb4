"""The stop marker (`<run>/control/STOP.json`) and the training job that obeys it (issue 11, step 2).

    twa-scale stop file:///runs/RUN --reason "enough"      # training ends after its next snapshot, exit 0
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest

from tests.support import REPO, free_port
from tests.support.launch import env
from twa_scale.cli import main
from twa_scale.store.control import StopWatch, write_stop
from twa_scale.store import RunPaths, StopMarker, open_run


def _make_run(url: str, run_id: str = "r") -> None:
    from tests.test_store import _model
    from twa_scale import store
    from twa_scale.layout import FlatLayout

    store.create_run(url, run_id, FlatLayout.from_model(_model()), meta={"model": "tiny"}, world_size=1)


def test_marker_round_trip_and_absent(store_url):
    _make_run(store_url)
    watch = StopWatch(store_url, "r")
    assert watch.check() is None
    write_stop(store_url, "r", reason="plateau: +0.1 points over 3 probes", rule="plateau", by="twa",
               probes=[{"first_seq": 0, "last_seq": 4, "twa_accuracy": 0.9}])
    got = watch.check()
    assert isinstance(got, StopMarker)
    assert (got.by, got.rule, got.reason) == ("twa", "plateau", "plateau: +0.1 points over 3 probes")
    assert got.probes[0]["last_seq"] == 4 and got.written_at > 0


@pytest.mark.parametrize("content", [b"", b'{"format": "twa_scale.stop/2", "reason": "x"', b"{}",
                                     b'{"format": "twa_scale.stop/2", "reason": "hand-edited", "rule": "manual", '
                                     b'"by": "user", "host": "h", "written_at": 1.0, "json_sha256": "00"}'],
                         ids=["empty", "partial", "not-a-marker", "bad-seal"])
def test_malformed_marker_is_ignored_with_a_warning(tmp_path, caplog, content):
    url = tmp_path.as_uri()
    _make_run(url)
    path = tmp_path / RunPaths("r").stop
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    watch = StopWatch(url, "r")
    with caplog.at_level(logging.WARNING, logger="twa_scale.store.control"):
        assert watch.check() is None
        assert watch.check() is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, "one warning per distinct problem, not one per snapshot"
    assert str(path) in warnings[0] and "malformed" in warnings[0]


def test_unreadable_marker_is_a_warning_not_an_error(tmp_path, caplog):
    url = tmp_path.as_uri()
    _make_run(url)
    (tmp_path / RunPaths("r").stop).mkdir(parents=True)  # a directory where the object should be: a read error
    with caplog.at_level(logging.WARNING, logger="twa_scale.store.control"):
        assert StopWatch(url, "r").check() is None
    assert "cannot read" in caplog.text and "training continues" in caplog.text


def test_cli_stop_writes_the_marker_and_refuses_an_unknown_run(tmp_path, capsys):
    url = tmp_path.as_uri()
    _make_run(url)
    assert main(["stop", f"{url}/r", "--reason", "enough"]) == 0
    assert "stop requested" in capsys.readouterr().out
    marker = StopWatch(url, "r").check()
    assert (marker.by, marker.rule, marker.reason) == ("user", "manual", "enough")
    assert main(["stop", f"{url}/typo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "typo/run.json does not exist" in err[0]


@pytest.mark.multirank
@pytest.mark.slow
def test_two_rank_training_ignores_a_malformed_marker_then_obeys_twa_scale_stop(tmp_path):
    """A real 2-rank digits run: a malformed STOP.json present from the start is ignored (warning naming it,
    training goes on); `twa-scale stop` while it runs ends it after the next snapshot, exit 0."""
    # far more epochs than the stop needs: on a loaded host `twa-scale stop` takes seconds to start, and the
    # run must still be going when its marker lands
    url, run, epochs = f"file://{tmp_path}/snap", "stopme", 1000
    stop_path = tmp_path / "snap" / RunPaths(run).stop
    stop_path.parent.mkdir(parents=True)
    stop_path.write_text('{"reason": "half a marker')
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py", "--data", "digits",
           "--model", "mlp", "--epochs", str(epochs), "--snapshots-per-epoch", "2", "--limit-train", "256",
           "--limit-val", "128", "--batch-size", "32", "--no-twa", "--snapshot-url", url, "--run-id", run,
           "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-url", "none"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        commits = tmp_path / "snap" / run / "snapshots"
        deadline = time.monotonic() + 300
        while not (commits / "00000004" / "COMMIT.json").exists():  # training went past 2 epochs' snapshots
            assert proc.poll() is None, f"training ended early:\n{proc.communicate()[1][-4000:]}"
            assert time.monotonic() < deadline, "no snapshot 4 after 300 s"
            time.sleep(0.2)
        asked = time.monotonic()
        stop = subprocess.run([sys.executable, "-m", "twa_scale", "stop", f"{url}/{run}", "--reason", "test"],
                              cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    assert f"ignoring a malformed stop marker: file://{stop_path}" in out + err, err[-3000:]
    final = json.loads((tmp_path / "snap" / run / "train" / "metrics.json").read_text())["final"]
    assert final["stopped_by"] == "user" and final["stop_reason"] == "test" and final["stop_rule"] == "manual"
    assert 4 <= final["stopped_seq"] < 2 * epochs and final["stopped_epoch"] == final["stopped_seq"] / 2
    assert final["stopped_step"] > 0
    # ended after the snapshot that saw the marker: it is the last one, and it and those before it are committed
    seqs = [s.seq for s in open_run(url, run).snapshots()]
    assert seqs == list(range(final["stopped_seq"] + 1))
    print(f"stopped at seq {final['stopped_seq']} {time.monotonic() - asked:.1f}s after the request")


@pytest.mark.e2e
def test_a_marker_present_at_launch_stops_after_the_initial_snapshot(tmp_path):
    """Written before the job starts (e.g. before a --resume of a stopped run): the stop holds at snapshot 0."""
    from tests.support.launch import python

    url = f"file://{tmp_path}/snap"
    write_stop(url, "early", reason="before launch", require_run=False)
    python("launch/train.py", ["--data", "digits", "--model", "mlp", "--epochs", "3", "--limit-train", "64",
                               "--limit-val", "32", "--batch-size", "32", "--no-twa", "--snapshot-url", url,
                               "--run-id", "early", "--checkpoint-dir", str(tmp_path / "ckpt")])
    m = json.loads((tmp_path / "snap" / "early" / "train" / "metrics.json").read_text())
    assert m["epochs"] == [] and m["final"]["stopped_seq"] == 0 and m["final"]["stopped_epoch"] == 0.0
    assert [s.seq for s in open_run(url, "early").snapshots()] == [0]


def test_cli_stop_on_a_finished_run_writes_nothing_and_clear_removes_a_marker(tmp_path, capsys):
    """A finished run gets no marker (nothing would read it, and a later --resume would stop at once);
    `--clear` removes one; --json says what was done."""
    from tests.test_store import _model
    from twa_scale import store
    from twa_scale.layout import FlatLayout

    url = tmp_path.as_uri()
    _make_run(url)
    assert main(["stop", f"{url}/r", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"run": f"{url}/r", "action": "requested",
                                                   "reason": "stopped by hand (twa-scale stop)"}
    assert main(["stop", f"{url}/r", "--clear"]) == 0
    assert "stop marker removed" in capsys.readouterr().out and StopWatch(url, "r").check() is None
    assert main(["stop", f"{url}/r", "--clear", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "no_marker"

    w = store.create_run(url, "done", FlatLayout.from_model(_model()), meta={"model": "tiny"}, world_size=1)
    row = {"epoch": 1, "train_loss": 0.3, "val_loss": 0.3, "val_accuracy": 0.9, "lr": 0.1, "seconds": 1.0}
    w.write_metrics([row], final={"epochs": 1, "val_accuracy": 0.9})
    w.close()
    assert main(["stop", f"{url}/done"]) == 0
    assert "has already finished (1 epochs, val accuracy 0.9); no stop marker written" in capsys.readouterr().out
    assert StopWatch(url, "done").check() is None
    assert main(["stop", f"{url}/done", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "already_finished"


def test_the_stop_is_polled_in_the_background_and_agreed_on_one_step_later(tmp_path, monkeypatch):
    """The training job's StopCheck never reads the store when called at a snapshot: rank 0's background poll
    finds the marker, the step agreement's all-reduce carries it, and the first snapshot after that ends
    training with the fields metrics.json records (one process; the 2-rank run above does it for real)."""
    from types import SimpleNamespace

    from twa_scale.train.preemption import StepAgreement
    from twa_scale.train.loop import StopCheck

    monkeypatch.setenv("TWA_SCALE_STOP_POLL_SECONDS", "0.05")
    url = tmp_path.as_uri()
    _make_run(url)
    agreement = StepAgreement()
    stop = StopCheck(SimpleNamespace(obey_stop=True, snapshot_url=url, run_id="r", storage_options=None), agreement)
    try:
        assert stop(0, 0, 0.0, agree_now=True) is False and stop.fields is None
        write_stop(url, "r", reason="enough")
        deadline = time.monotonic() + 30
        while not stop.seen():
            assert time.monotonic() < deadline, "the background poll never saw the marker"
            time.sleep(0.05)
        stop.watch.check = lambda: pytest.fail("a snapshot's stop check read the store")
        assert stop(1, 5, 0.5) is False  # seen, not yet agreed: no step since
        agreement.poll()  # step k: starts the all-reduce that carries it
        assert stop(1, 5, 0.5) is False
        agreement.poll()  # step k+1: every rank reads it here
        assert stop(2, 10, 1.0) is True
        assert stop.fields == {"stopped_by": "user", "stop_reason": "enough", "stop_rule": "manual",
                               "stopped_epoch": 1.0, "stopped_step": 10, "stopped_seq": 2}
    finally:
        stop.close()
