"""experiments/stop_validation.py: the stop rule's validation protocol, end to end at its smoke setup on real CIFAR-10,
and its choice logic."""
from __future__ import annotations

import datetime
import json
import sys

import pytest

from tests.support import REPO, require_cifar10
from tests.support.launch import python

sys.path.insert(0, str(REPO / "experiments"))
import stop_validation as sv  # noqa: E402
from twa_scale.twa.stoprule import pack_correct  # noqa: E402


def _probe(i, epoch, twa, sgd=0.1, n=200):
    right = int(twa * n)
    return {"probe": i, "epoch": epoch, "twa_accuracy": right / n, "sgd_holdout_accuracy": sgd,
            "twa_correct": pack_correct([1] * right + [0] * (n - right)), "first_phase": epoch <= 6, "phase_end": 6.0}


def test_replay_finds_the_first_probe_the_rule_stops_at():
    rising = [_probe(0, 2, 0.30), _probe(1, 4, 0.50), _probe(2, 6, 0.70)]  # +5 points/epoch throughout
    assert sv.replay(sv.rule_of(1.0, False), rising)["epoch"] is None
    hand_over = sv.replay(sv.rule_of(1.0, True), rising)
    assert hand_over["epoch"] == 6 and "first lr phase" in hand_over["decision"]
    flat = [_probe(0, 2, 0.30), _probe(1, 4, 0.30), _probe(2, 6, 0.30)]
    assert sv.replay(sv.rule_of(1.0, False), flat)["epoch"] == 4
    assert sv.replay(sv.rule_of(1.0, True), [_probe(0, 2, 0.3, sgd=0.9), _probe(1, 4, 0.3, sgd=0.9),
                                             _probe(2, 6, 0.3, sgd=0.9)])["epoch"] is None  # TWA under SGD


def test_cpu_setup_probes_every_two_epochs_and_stops_inside_the_first_phase():
    s = sv.SETUPS["cpu"]
    assert s.phase_end == 6 and s.heads == [4, 6] and set(s.dev_seeds).isdisjoint(s.test_seeds)
    assert len(s.test_seeds) >= 5 and len(s.dev_seeds) == 2


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    data = require_cifar10()
    out = tmp_path_factory.mktemp("stop") / "smoke"
    python("experiments/stop_validation.py",
           ["--out", str(out), "--setup", "smoke", "--data", str(data), "--jobs", "1"], timeout=900)
    return out


@pytest.mark.experiments
@pytest.mark.slow
@pytest.mark.e2e
def test_smoke_protocol_freezes_on_dev_then_replays_and_runs_live_on_test(validated):
    out, work = validated, validated / "work"
    frozen = json.loads((out / "frozen.json").read_text())
    assert frozen["dev_seeds"] == [0] and frozen["test_seeds"] == [1] and frozen["flags"][:2] == ["--stop-rule", "gain"]
    assert len(frozen["grid"]) == len(sv.GRID) and all(len(r["dev"]) == 1 for r in frozen["grid"])
    # frozen before anything of the test seed's that depends on the choice ran
    frozen_at = datetime.datetime.fromisoformat(frozen["frozen_at"])
    for marker in (work / "done").glob("live-s1.json"):
        assert datetime.datetime.fromisoformat(json.loads(marker.read_text())["finished_at"]) > frozen_at
    res = json.loads((out / "results.json").read_text())
    (test,) = res["test"]
    assert set(res["verdict"]) >= {"fires_on_every_seed", "no_false_stop", "twa_at_least_budget_sgd_on_every_seed"}
    (live,) = res["live"]
    # The live follower, same seed and same frozen rule, decides on the same probes as the replay of the
    # recorded full run: where the replay stops, the live run was told to stop.
    assert live["rule_fired"] == test["stop_epoch"]
    if live["stopped_by"] is not None:  # a smoke run may end before it reads the marker (4 steps an epoch)
        assert live["stopped_by"] == "twa" and live["stopped_epoch"] < sv.SETUPS["smoke"].epochs
    report = (out / "report.md").read_text()
    for heading in ("## 1. The choice on the dev seeds", "## 2. The frozen rule on the test seeds",
                    "## 3. Live obeyed runs", "## 4. The probe is a proxy"):
        assert heading in report
    assert (out / "proxy_vs_delivered.png").stat().st_size > 0
    # rerun: everything is done, the choice is not made again
    before = (out / "frozen.json").read_text()
    python("experiments/stop_validation.py", ["--out", str(out), "--setup", "smoke", "--data", str(require_cifar10()),
                                              "--jobs", "1"], timeout=300)
    assert (out / "frozen.json").read_text() == before
