"""The live TWA follower (`launch/twa.py --follow`) on a run whose snapshots arrive while it watches.

The run is written through the store's writer API by this test (as the training job's streamer would),
so the test decides exactly when each snapshot is committed and when training "finishes". The follower
is the real entry point in its own process.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch

from tests.support import REPO
from tests.support.launch import env, python
from tests.support.twa import digits_config, make_trajectory
from twa_scale.store.format import ProbeLog
from twa_scale.twa.stoprule import ProbeView, first_phase_end, pack_correct, parse_stop_rule, unpack_correct

FOLLOW = ["--follow", "--probe-every", "2", "--probe-steps", "4", "--probe-bn-batches", "2", "--poll-seconds",
          "0.2", "--batch-size", "32", "--epochs", "1", "--stop-rule", "target:0.01", "--plot", "false"]


# --- the stop rules ------------------------------------------------------------------------------------
def _views(twa, sgd, epochs=None):
    return [ProbeView(epoch=e, twa_accuracy=a, sgd_accuracy=sgd)
            for e, a in zip(epochs or range(2, 2 * len(twa) + 1, 2), twa)]


def test_plateau_rule():
    rule = parse_stop_rule("plateau", epsilon_points=0.5, patience=2)
    assert rule.decide(_views([0.80, 0.90], 0.85)).reason == "2 probe(s), the plateau rule needs 3"
    assert not rule.decide(_views([0.80, 0.90, 0.95], 0.85)).stop           # +5 points: still improving
    d = rule.decide(_views([0.90, 0.902, 0.903], 0.85))                      # +0.3 < 0.5 points, >= SGD
    assert d.stop and "plateaued" in d.reason and d.statistic == pytest.approx(0.3)
    assert not rule.decide(_views([0.90, 0.902, 0.903], 0.95)).stop         # plateau, but below SGD (hold-out)
    assert not rule.decide(_views([0.90, 0.902, 0.903], None)).stop         # no SGD hold-out accuracy
    assert not rule.decide(_views([0.90, None, 0.903], 0.85)).stop          # a failed probe in the window


def _correct(n: int, right: int, seed: int = 0) -> np.ndarray:
    out = np.zeros(n, dtype=np.uint8)
    out[np.random.default_rng(seed).permutation(n)[:right]] = 1
    return out


def _gain_probe(epoch, c, sgd=0.5, first_phase=True):
    return ProbeView(epoch=epoch, twa_accuracy=float(c.mean()), sgd_accuracy=sgd, twa_correct=pack_correct(c),
                     first_phase=first_phase)


def test_gain_rule_pairs_the_same_images_and_bounds_the_gain_per_epoch():
    rule = parse_stop_rule("gain", epsilon_points=0.2, patience=3, price_points=1.0)
    assert unpack_correct(pack_correct(_correct(2000, 1300))).sum() == 1300
    a = _correct(2000, 1200)
    # 100 more right of 2,000 in 2 epochs: +2.5 points/epoch, far above the price
    b = a.copy()
    b[np.flatnonzero(a == 0)[:100]] = 1
    d = rule.decide([_gain_probe(2, a), _gain_probe(4, b)])
    assert not d.stop and d.statistic == pytest.approx(2.5) and d.bound > 2.5 and "may still pay" in d.reason
    # 4 images flip each way: a gain of 0 whose paired bound is tight (0.1 points/epoch): stop
    c = b.copy()
    c[np.flatnonzero(b == 0)[:4]] = 1
    c[np.flatnonzero(b == 1)[:4]] = 0
    d = rule.decide([_gain_probe(2, a), _gain_probe(4, b), _gain_probe(6, c)])
    assert d.stop and d.statistic == pytest.approx(0.0) and 0 < d.bound < 1.0
    # the same accuracies with 400 images flipping each way: the bound is wide (1.16), no stop on noise
    e = b.copy()
    e[np.flatnonzero(b == 0)[:400]] = 1
    e[np.flatnonzero(b == 1)[:400]] = 0
    d = rule.decide([_gain_probe(2, a), _gain_probe(4, b), _gain_probe(6, e)])
    assert not d.stop and d.statistic == pytest.approx(0.0) and d.bound > 1.0
    # TWA under the SGD snapshot on the hold-out: no stop; past the first lr phase: no stop, said so
    assert not rule.decide([_gain_probe(2, a), _gain_probe(4, b), _gain_probe(6, c, sgd=0.99)]).stop
    late = rule.decide([_gain_probe(2, a), _gain_probe(4, b), _gain_probe(6, c, first_phase=False)])
    assert not late.stop and "first lr phase" in late.reason
    # nothing at least 2 epochs back yet
    assert "no earlier probe" in rule.decide([_gain_probe(2, a), _gain_probe(3, b)]).reason


def test_gain_rule_hands_over_at_the_last_probe_of_the_first_phase():
    a = _correct(2000, 1200)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:200]] = 1  # +5 points/epoch at each probe: the price alone would go on
    c = b.copy()
    c[np.flatnonzero(b == 0)[:200]] = 1

    def probes(sgd=0.5, phase_end=6.0):
        return [dataclasses.replace(_gain_probe(e, x, sgd), phase_end=phase_end) for e, x in ((2, a), (4, b), (6, c))]

    on = parse_stop_rule("gain", epsilon_points=0.2, patience=3, price_points=1.0, at_phase_end=True)
    off = parse_stop_rule("gain", epsilon_points=0.2, patience=3, price_points=1.0)
    d = on.decide(probes())
    assert d.stop and "last probe of the first lr phase (it ends at epoch 6)" in d.reason and d.bound > 1.0
    assert not off.decide(probes()).stop                       # the option is what hands over
    assert not on.decide(probes()[:2]).stop                    # epoch 4: the next probe (6) is still in the phase
    assert not on.decide(probes(sgd=0.99)).stop                # TWA under SGD on the hold-out: no hand-over
    assert not on.decide(probes(phase_end=None)).stop          # no phase end (cosine, an old record)
    # probes at 5 and 7 around a phase end at 6: the one at 5 is the phase's last
    late = [dataclasses.replace(_gain_probe(e, x), phase_end=6.0) for e, x in ((3, a), (5, b))]
    assert on.decide(late).stop


def test_target_and_none_rules_and_bad_specs():
    assert parse_stop_rule("target:0.9", epsilon_points=0.2, patience=3).decide(_views([0.5, 0.91], None)).stop
    assert not parse_stop_rule("target:0.9", epsilon_points=0.2, patience=3).decide(_views([0.89], 1.0)).stop
    assert not parse_stop_rule("none", epsilon_points=0.2, patience=3).decide(_views([1.0], 0.0)).stop
    for spec, msg in (("target:90", "--stop-rule target:90: target:ACC needs an accuracy in (0, 1]"),
                      ("sometimes", "--stop-rule sometimes: must be gain, plateau, target:ACC or none")):
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
            parse_stop_rule(spec, epsilon_points=0.2, patience=3)
    with pytest.raises(ValueError, match="--stop-patience"):
        parse_stop_rule("plateau", epsilon_points=0.2, patience=0)
    with pytest.raises(ValueError, match="--stop-price"):
        parse_stop_rule("gain", epsilon_points=0.2, patience=3, price_points=0)


def test_first_lr_phase_of_each_schedule():
    assert first_phase_end("step", 20) == 10 and first_phase_end("step", 90, [30, 60]) == 30
    assert first_phase_end("step-per-iter", 20) == 10 and first_phase_end("cosine", 20) == float("inf")


# --- the follower against a run written snapshot by snapshot --------------------------------------------
class LiveRun:
    """A run being written: snapshots committed on demand, then the training metrics' ``final``."""

    def __init__(self, url: str, cfg, model, snaps):
        from twa_scale import store
        from twa_scale.layout import FlatLayout

        self.url, self.snaps, self.cfg = url, snaps, cfg
        self.layout = FlatLayout.from_model(model)
        meta = {"model": cfg.model, "num_classes": 10, "data": cfg.data, "config": cfg.to_dict()}
        self.writer = store.create_run(url, "live", self.layout, meta=meta, world_size=1)
        self.session, self.next = uuid.uuid4().hex[:8], 0

    def commit(self, upto: int) -> None:
        for seq in range(self.next, upto + 1):
            view = memoryview(self.snaps[seq].contiguous().numpy()).cast("B")
            meta = self.writer.shard_meta(seq, rank=0, world_size=1, session=self.session, view=view, step=seq * 4,
                                          epoch=seq // 2, epoch_fraction=seq / 2)
            self.writer.put_shard(meta, view)
            self.writer.commit(seq, [meta])
        self.next = upto + 1

    def finish(self) -> None:
        rows = [{"epoch": e, "val_accuracy": 0.5, "val_loss": 1.0, "train_loss": 1.0, "lr": 0.1, "seconds": 1.0}
                for e in (1, 2)]
        self.writer.write_metrics(rows, final={"val_accuracy": 0.5})


@pytest.fixture(scope="module")
def trajectory():
    cfg = digits_config(holdout_fraction=0.25, limit_train=320)
    model, snaps = make_trajectory(cfg, 12)
    return cfg, model, snaps


def _probes(root) -> list[dict]:
    path = root / "live" / "twa" / "probes.json"
    return list(ProbeLog.from_json(path.read_bytes(), str(path)).probes)  # sealed, versioned


def _follow(url: str, *extra: str, timeout: float = 3.0, check: bool = False) -> subprocess.CompletedProcess:
    return python("launch/twa.py", ["--snapshot-url", url, "--run-id", "live", *FOLLOW, "--follow-timeout",
                                    str(timeout), *extra], check=check, timeout=300)


@pytest.mark.slow
def test_follower_probes_falls_behind_resumes_and_finishes_like_launch_twa(tmp_path, trajectory):
    cfg, model, snaps = trajectory
    url = f"file://{tmp_path}"
    run = LiveRun(url, cfg, model, snaps)
    run.commit(2)
    # 1. seqs 0..2: one probe at seq 2 (2 new after seq 0); the target rule fires -> STOP.json by "twa";
    #    no new snapshot within --follow-timeout while training is unfinished -> exit 75, one line
    first = _follow(url)
    assert first.returncode == 75, first.stderr[-3000:]
    assert first.stderr.strip().splitlines()[-1].startswith("transient error (exit 75")
    assert "--follow-timeout" in first.stderr.strip().splitlines()[-1]
    probes = _probes(tmp_path)
    assert [(p["first_seq"], p["last_seq"]) for p in probes] == [(0, 2)]
    p = probes[0]
    assert p["split"] == "holdout" and 0 < p["twa_accuracy"] <= 1 and 0 < p["swa_accuracy"] <= 1
    assert p["epoch"] == 1.0 and p["step"] == 8 and p["lr"] > 0 and p["seconds"] > 0
    assert p["would_stop"] and p["stop_written"] and p["rule"] == "target:0.01"
    stop = json.loads((tmp_path / "live" / "control" / "STOP.json").read_text())
    assert stop["by"] == "twa" and stop["rule"] == "target:0.01" and stop["probes"][0]["last_seq"] == 2

    # 2. six new snapshots while it was away: it appends all six, probes once at the newest, says it skipped 2
    run.commit(8)
    behind = _follow(url)
    assert behind.returncode == 75
    assert "fell behind: 6 snapshots since the last probe; skipping 2 probe(s), probing at the newest (seq 8)" \
        in behind.stderr
    assert [p["last_seq"] for p in _probes(tmp_path)] == [2, 8]
    assert not _probes(tmp_path)[1]["stop_written"], "the marker is written once"

    # 3. killed mid-probe (a long probe), restarted: the probe is recorded once
    run.commit(10)
    proc = subprocess.Popen([sys.executable, "launch/twa.py", "--snapshot-url", url, "--run-id", "live", *FOLLOW,
                             "--follow-timeout", "60", "--probe-steps", "100000"], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "resuming after 2 recorded probe(s)" in line:
            break
    time.sleep(2.0)  # the follower is in the probe's fit (100000 steps), never finishing it
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p["last_seq"] for p in _probes(tmp_path)] == [2, 8]
    again = _follow(url)
    assert again.returncode == 75 and "resuming after 2 recorded probe(s) (the last at seq 8)" in again.stderr
    assert [p["last_seq"] for p in _probes(tmp_path)] == [2, 8, 10]

    # 4. training finished: the follower runs the final TWA as launch/twa.py does, on every snapshot
    run.commit(12)
    run.finish()
    _follow(url, "--output", f"{url}/follow-out", check=True)
    assert [p["last_seq"] for p in _probes(tmp_path)] == [2, 8, 10], "a finished run is not probed"
    python("launch/twa.py", ["--snapshot-url", url, "--run-id", "live", "--batch-size", "32", "--epochs", "1",
                             "--plot", "false", "--output", f"{url}/twa-out"])
    followed = json.loads((tmp_path / "follow-out" / "result.json").read_text())
    plain = json.loads((tmp_path / "twa-out" / "result.json").read_text())
    assert [s["seq"] for s in followed["snapshots"]] == list(range(13))
    for key in ("snapshots", "coefficients", "twa_accuracy", "swa_accuracy", "lr_final"):
        assert followed[key] == plain[key], key


@pytest.mark.e2e
def test_gain_follower_probes_the_first_phase_end_then_stops_probing(tmp_path, trajectory):
    """Eight snapshots arrive at once, the first lr phase ending at seq 4 (epoch 2 of 4): the gain rule's follower
    probes at seq 4 before seq 5 joins its basis, even though --probe-every 6 is not due there, then no more."""
    cfg, model, snaps = trajectory
    run = LiveRun(f"file://{tmp_path}", dataclasses.replace(cfg, epochs=4), model, snaps)
    run.commit(11)
    out = _follow(run.url, "--stop-rule", "gain", "--probe-every", "6", "--no-stop-marker")
    assert out.returncode == 75, out.stderr[-3000:]
    probes = _probes(tmp_path)
    assert [(p["last_seq"], p["epoch"], p["first_phase"], p["phase_end"]) for p in probes] == [(4, 2.0, True, 2.0)]
    assert "past the run's first lr phase (it ended at epoch 2)" in out.stderr


@pytest.mark.e2e
def test_follower_waits_for_the_run_then_gives_up(tmp_path):
    proc = _follow(f"file://{tmp_path}", timeout=1.0)
    assert proc.returncode == 75
    assert f"waiting for the training run: file://{tmp_path}/live/run.json does not exist yet" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"transient error (exit 75, a restart may succeed): --follow: no run 'live' under file://{tmp_path} "
        "after 1s (--follow-timeout); is the training job running?")


@pytest.mark.e2e
def test_follower_refuses_a_run_without_holdout(tmp_path):
    cfg = digits_config(limit_train=64)
    model, snaps = make_trajectory(cfg, 2, steps_between=1)
    LiveRun(f"file://{tmp_path}", cfg, model, snaps).commit(2)
    proc = _follow(f"file://{tmp_path}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --follow: run ") and "has no hold-out split" in last and "--holdout-fraction" in last


@pytest.mark.multirank
def test_growing_basis_on_two_ranks_equals_the_single_process_build(tmp_path):
    """The follower's incremental basis, column-sharded over 2 gloo ranks (one all-reduce of n + 1 floats per
    snapshot), gives the single-process from-scratch build_basis P and start point to 1e-6."""
    from tests.support.twa import growing_basis_worker, run_ranks
    from twa_scale.twa.subspace import build_basis

    _, snaps = make_trajectory(digits_config(), 7)
    x = torch.stack(snaps)
    ref = build_basis(x, 0, x.shape[1], [(0, x.shape[1])])
    out = run_ranks(2, growing_basis_worker, x, out_dir=str(tmp_path))
    assert all(o["ok"] for o in out), [o.get("error") for o in out]
    q = torch.cat([o["result"]["q"] for o in out], dim=1)
    w = torch.cat([o["result"]["w_start"] for o in out])
    assert ((q - ref.dequantized()).norm() / ref.dequantized().norm()).item() < 1e-6
    assert ((w - ref.w_start).norm() / ref.w_start.norm()).item() < 1e-6
    assert torch.allclose(out[0]["result"]["theta0"], ref.theta0, rtol=1e-6, atol=1e-9)



@pytest.mark.slow
def test_stop_decisions_never_read_val_accuracy(tmp_path, trajectory):
    """The same run twice, its training metrics' val_accuracy poisoned to 0 in one and 1 in the other: every
    probe record the follower writes (accuracies, per-example results, the rule's statistic, bound and
    decision) is identical, so no stop decision reads val. The SGD point of the rule is the newest snapshot
    scored on the hold-out. ``--replay`` of the finished run records the same probes, and writes no STOP.json."""
    cfg, model, snaps = trajectory
    cfg = dataclasses.replace(cfg, epochs=20)  # the run's lr stays in its first phase for the whole test
    runs = {poison: LiveRun(f"file://{tmp_path}/val-{poison:g}", cfg, model, snaps) for poison in (0.0, 1.0)}
    for upto in (2, 4, 6):  # a probe at epochs 1, 2 and 3: the third is paired with the first
        procs = {}
        for poison, run in runs.items():
            run.commit(upto)
            rows = [{"epoch": e, "val_accuracy": poison, "val_loss": 1.0, "train_loss": 1.0, "lr": 0.1,
                     "seconds": 1.0} for e in range(1, upto // 2 + 1)]
            run.writer.write_metrics(rows, final=None)
            procs[poison] = subprocess.Popen(  # both followers at once: the test's time is one follower's
                [sys.executable, "launch/twa.py", "--snapshot-url", run.url, "--run-id", "live", *FOLLOW,
                 "--follow-timeout", "3", "--stop-rule", "gain", "--no-stop-marker"], cwd=REPO, env=env(),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for proc in procs.values():
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 75, out[-3000:]
    # --replay on the same run, finished: the probes a follower that kept up wrote, and no STOP.json
    replayed = LiveRun(f"file://{tmp_path}/replay", cfg, model, snaps)
    replayed.commit(6)
    replayed.finish()
    python("launch/twa.py", ["--snapshot-url", replayed.url, "--run-id", "live", *FOLLOW, "--follow-timeout", "3",
                             "--stop-rule", "gain", "--replay"])
    dirs = {0.0: "val-0", 1.0: "val-1", "replay": "replay"}
    records = {name: [{k: v for k, v in p.items() if k != "seconds"} for p in _probes(tmp_path / d)]
               for name, d in dirs.items()}
    assert [p["last_seq"] for p in records[0.0]] == [2, 4, 6]
    assert records[0.0] == records[1.0] == records["replay"]
    assert not (tmp_path / "replay" / "live" / "control" / "STOP.json").exists()
    last = records[0.0][-1]
    assert last["rule"] == "gain" and last["first_phase"] and last["statistic"] is not None
    assert "since epoch 1" in last["decision"] and last["bound"] >= last["statistic"]
    assert 0 <= last["sgd_holdout_accuracy"] <= 1 and unpack_correct(last["sgd_correct"]).size == \
        unpack_correct(last["twa_correct"]).size > 0
