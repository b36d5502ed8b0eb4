"""Issue 20's promise, measured: on short `digits` runs trained by the real training entry point, default
TWA is never more than 0.3 points under SWA on val, over several seeds and world sizes 1 and 2, unless it
returns the start point (the SWA mean) and says so."""
from __future__ import annotations

import logging

import pytest

from tests.support import REPO
from tests.support.launch import python
from tests.support.twa import run_ranks, twa_worker

pytestmark = [pytest.mark.e2e, pytest.mark.multirank, pytest.mark.slow]

SEEDS = (0, 1, 2)
SLACK = 0.003  # 0.3 points: one image of digits' 360 validation images


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Short runs with the training defaults (6 epochs, a snapshot per epoch: seq 0..6, no hold-out) on the
    small `mlp`, one per seed, through launch/train.py."""
    root = tmp_path_factory.mktemp("guard-seeds")
    url = (root / "runs").as_uri()
    for seed in SEEDS:
        python(str(REPO / "launch" / "train.py"),
               ["--data", "digits", "--model", "mlp", "--epochs", "6", "--seed", str(seed), "--no-twa",
                "--snapshot-url", url, "--run-id", f"s{seed}", "--checkpoint-dir", str(root / f"ckpt{seed}")],
               cwd=root)
    return url, root


def _check(res: dict, where: str, warned: bool) -> None:
    gap = res["twa_accuracy"] - res["swa_accuracy"]
    if res["returned"] == "start":  # allowed, when said: result.json and a warning
        assert res["fallback"] == "start" and warned, where
        assert res["twa_accuracy"] == res["swa_accuracy"], where
    else:
        assert gap >= -SLACK, (f"{where}: default TWA {res['twa_accuracy']:.4f} is {-100 * gap:.2f} points under "
                               f"SWA {res['swa_accuracy']:.4f} (attempts {res['outcomes']}, basis {res['basis']})")


def test_default_twa_is_never_worse_than_swa_unless_it_says_so(runs, tmp_path, caplog):
    from twa_scale.twa import TwaConfig, run_twa

    url, _ = runs
    returned = []
    for seed in SEEDS:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="twa_scale"):
            r = run_twa(TwaConfig(snapshot_url=url, run_id=f"s{seed}", output=(tmp_path / f"w1-{seed}").as_uri(),
                                  plot=False))
        res = {"twa_accuracy": r.twa_accuracy, "swa_accuracy": r.swa_accuracy, "returned": r.returned,
               "fallback": r.guard.fallback, "outcomes": [a.outcome for a in r.guard.attempts],
               "basis": r.basis.to_dict()}
        _check(res, f"seed {seed}, 1 rank", "returning the start point" in caplog.text)
        returned.append(r.returned)
    for seed in SEEDS[:2]:
        cfg = {"snapshot_url": url, "run_id": f"s{seed}", "plot": False, "output": (tmp_path / f"w2-{seed}").as_uri()}
        out = run_ranks(2, twa_worker, cfg, out_dir=str(tmp_path / f"r{seed}"))
        assert all(o["ok"] for o in out), [o.get("error") for o in out]
        res = out[0]["result"]
        # the fallback's warning is rank 0's log line in the worker; result.json's fields say it here
        _check(res, f"seed {seed}, 2 ranks", res["fallback"] == "start")
        returned.append(res["returned"])
    # the promise is about fitted models: a guard that always fell back would pass the checks above
    assert "twa" in returned, returned
