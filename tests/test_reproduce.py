"""experiments/reproduce.py: the smoke preset end to end on real CIFAR-10, its resumability, and its report logic."""
from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.support import REPO, require_cifar10
from tests.support.launch import env, python

sys.path.insert(0, str(REPO / "experiments"))
import reproduce  # noqa: E402

SMOKE_METHODS = [  # (method prefix, SGD epochs, TWA epochs) for E=2, T=1, K=1
    ("SGD, full run", 2, 0), ("SGD at half-way", 1, 0), ("SWA of snapshots to epoch 1", 1, 0),
    ("TWA paper mode", 1, 1), ("TWA-v journal mode", 1, 1),
    ("tail SGD, last point (lr 0.05)", 3, 0), ("SWA, tail lr 0.05", 3, 0), ("TWA, tail lr 0.05", 3, 1),
]


def _numbers(obj, path="$"):
    """Every number in a JSON tree, with its path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def _stop_after_first_epoch(out, data) -> int:
    """Start the smoke run, SIGTERM it once the head run has finished epoch 1 (of 2); return its exit code."""
    metrics = out / "work" / "store" / "head-s0" / "train" / "metrics.json"
    proc = subprocess.Popen([sys.executable, "experiments/reproduce.py", "--smoke", "--out", str(out),
                             "--data", str(data)], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(metrics.read_text())["epochs"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, output[-3000:]
    return proc.returncode


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke preset, stopped midway through its first training run and then rerun to completion."""
    data = require_cifar10()
    out = tmp_path_factory.mktemp("reproduce") / "out"
    _stop_after_first_epoch(out, data)
    stopped_done = sorted(p.name for p in (out / "work" / "done").glob("*.json"))
    proc = python("experiments/reproduce.py", ["--smoke", "--out", str(out), "--data", str(data)], timeout=400)
    return out, proc, stopped_done


@pytest.mark.experiments
@pytest.mark.slow
def test_smoke_writes_report_json_and_plots(smoke):
    out, proc, _ = smoke
    for name in ("report.md", "results.json", "accuracy_vs_epoch.png", "coefficients.png"):
        assert (out / name).is_file(), f"{name} missing; stdout:\n{proc.stdout[-3000:]}"
    for png in ("accuracy_vs_epoch.png", "coefficients.png"):
        blob = (out / png).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5_000
    report = (out / "report.md").read_text()
    assert "| method | SGD epochs | TWA epochs | accuracy (%) |" in report
    for method, _, _ in SMOKE_METHODS:
        assert method in report
    assert "## Where it matches the paper and where it misses" in report
    assert "--init-from" in report and "--select 0:2" in report and "--fit-on holdout" in report
    assert (out / "work" / ".gitignore").read_text() == "*\n"  # bulky state stays out of git


@pytest.mark.experiments
@pytest.mark.slow
def test_smoke_numbers_are_sane(smoke):
    out, _, _ = smoke
    res = json.loads((out / "results.json").read_text())
    for path, v in _numbers(res):
        assert math.isfinite(v), f"{path} = {v}"
    table = {r["method"]: r for r in res["table"]}
    assert len(table) == len(SMOKE_METHODS)
    for prefix, sgd, twa in SMOKE_METHODS:
        row = next(r for m, r in table.items() if m.startswith(prefix))
        assert (row["sgd_epochs"], row["twa_epochs"], row["n_seeds"]) == (sgd, twa, 1)
        assert 0.0 <= row["accuracy_mean"] <= 1.0 and row["accuracy_std"] == 0.0
        assert list(row["accuracy_per_seed"]) == ["0"]
    seed = res["seeds"]["0"]
    assert [r["epoch"] for r in seed["head"]["epochs"]] == [1, 2]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and r["train_loss"] > 0 for r in seed["head"]["epochs"])
    for key in ("head_paper", "head_twav"):
        assert seed[key]["seqs"] == [0, 1] and len(seed[key]["alpha"]) == 2
    assert seed["head_paper"]["mode"] == "paper" and seed["head_twav"]["mode"] == "journal"
    assert seed["head_twav"]["hyperparameters"]["fit_on"] == "holdout"
    tail = seed["tail"]["0.05"]
    assert [r["epoch"] for r in tail["train"]["epochs"]] == [1] and tail["twa"]["seqs"] == [0, 1]
    assert res["epochs_saved"]["fraction"] == 0.0  # (2 - (1 + 1)) / 2
    assert {f["claim"] for f in res["findings"]} >= {"head", "head-swa", "twa-v", "tail"}
    assert not res["missing_steps"] and set(res["steps"]) == {
        "head-s0", "head-paper-s0", "head-twav-s0", "tail-lr0.05-s0", "tail-twa-lr0.05-s0", "tail-swa-lr0.05-s0"}
    # tail TWA starts at the tail's last snapshot (the authors'); SWA of the same snapshots is its own step
    assert tail["twa"]["hyperparameters"]["start"] == 1 and tail["swa"]["history"] == []


@pytest.mark.experiments
@pytest.mark.slow
def test_rerun_skips_done_steps_and_resumes_the_rest(smoke):
    out, _, _ = smoke
    data = str(require_cifar10())
    before = json.loads((out / "results.json").read_text())["table"]
    done = out / "work" / "done"
    (done / "tail-lr0.05-s0.json").unlink()  # as if killed after its last checkpoint
    (done / "tail-twa-lr0.05-s0.json").unlink()
    shutil.rmtree(out / "work" / "twa" / "tail-twa-lr0.05-s0")
    proc = python("experiments/reproduce.py", ["--smoke", "--out", str(out), "--data", data], timeout=300)
    for name in ("head-s0", "head-paper-s0", "head-twav-s0"):
        assert f"[skip] {name}" in proc.stdout
    assert "[run ] tail-lr0.05-s0" in proc.stdout and "[run ] tail-twa-lr0.05-s0" in proc.stdout
    assert "resumed from" in (out / "work" / "logs" / "tail-lr0.05-s0.log").read_text()
    after = {r["method"]: r for r in json.loads((out / "results.json").read_text())["table"]}
    for r in before:  # the training run was not redone; the TWA rerun is deterministic
        assert after[r["method"]]["accuracy_mean"] == pytest.approx(r["accuracy_mean"], abs=1e-9), r["method"]

    # A finished step rerun with other arguments is refused, not silently mixed in: nothing runs, and the
    # report still describes the runs it was written from.
    written = {name: (out / name).read_bytes() for name in ("results.json", "report.md")}
    proc = python("experiments/reproduce.py", ["--smoke", "--out", str(out), "--data", data, "--tail-epochs", "2"],
                  check=False, timeout=300)
    assert proc.returncode == 2 and "finished earlier with other arguments" in proc.stderr
    assert "[run ]" not in proc.stdout
    assert {name: (out / name).read_bytes() for name in written} == written


@pytest.mark.experiments
@pytest.mark.slow
def test_stopped_training_step_resumes_from_its_checkpoint(smoke):
    out, proc, stopped_done = smoke
    assert stopped_done == []  # stopped inside head-s0: nothing was marked done
    log = (out / "work" / "logs" / "head-s0.log").read_text()
    assert log.count("=== ") == 2 and "resumed from" in log and "at epoch 1" in log
    m = json.loads((out / "work" / "store" / "head-s0" / "train" / "metrics.json").read_text())
    assert [r["epoch"] for r in m["epochs"]] == [1, 2]


# --- pure logic: no dataset needed -------------------------------------------------------------
def test_cpu_preset_plan_uses_the_documented_commands(tmp_path):
    p = reproduce.preset_from_args(reproduce.build_parser().parse_args(["--out", str(tmp_path)]))
    assert (p.model, p.epochs, p.limit_train, p.limit_val, p.twa_epochs, p.tail_epochs, p.seeds, p.swa_lrs) == (
        "resnet20", 20, 10_000, 2_000, 2, 5, (0, 1), (0.05, 0.1))
    steps = {s.name: s for s in reproduce.plan_steps(p, tmp_path / "work")}
    assert len(steps) == 2 * (3 + 2 * 3)
    head = steps["head-s0"].args
    assert head[head.index("--schedule") + 1] == "step" and head[head.index("--epochs") + 1] == "20"
    assert "--resume" in head and head[head.index("--holdout-fraction") + 1] == "0.04"
    assert steps["head-paper-s1"].args[steps["head-paper-s1"].args.index("--select") + 1] == "0:11"
    paper = steps["head-paper-s0"].args
    assert "--bn-batches" not in paper and paper[paper.index("--lr") + 1] == "2"  # full BatchNorm passes
    twav = steps["head-twav-s0"].args
    assert twav[twav.index("--preset") + 1] == "journal" and twav[twav.index("--fit-on") + 1] == "holdout"
    tail = steps["tail-lr0.1-s1"].args
    assert tail[tail.index("--init-from") + 1].endswith("/work/store/head-s1@20")
    assert tail[tail.index("--schedule") + 1] == "constant" and tail[tail.index("--lr") + 1] == "0.1"
    tail_twa = steps["tail-twa-lr0.1-s1"].args
    assert tail_twa[tail_twa.index("--select") + 1] == "0:6"
    assert tail_twa[tail_twa.index("--start") + 1] == "5"  # the tail's last snapshot, as the authors start
    tail_swa = steps["tail-swa-lr0.1-s1"].args  # SWA of the same snapshots: the start point alone
    assert tail_swa[tail_swa.index("--select") + 1] == "0:6" and tail_swa[tail_swa.index("--epochs") + 1] == "0"
    cmd = reproduce.command(steps["head-s0"], ranks=2)
    assert cmd[:2] == ["deepspeed", "--num_gpus"] and cmd[2] == "2"
    multi = reproduce.plan_steps(p, tmp_path / "work", ranks=2)[0].args
    assert multi[multi.index("--micro-batch") + 1] == "64"


def test_frontier_plan_pairs_each_head_with_a_budget_matched_sgd_run(tmp_path):
    p = reproduce.preset_from_args(reproduce.build_parser().parse_args(
        ["--out", str(tmp_path), "--experiments", "head,frontier", "--seeds", "0", "1", "2"]))
    steps = {s.name: s for s in reproduce.plan_steps(p, tmp_path / "work")}
    assert reproduce.frontier.heads(20) == [6, 10, 14]
    assert sorted(steps) == sorted(f"{n}-s{s}" for s in (0, 1, 2) for n in (
        "head", "head-paper", "frontier-twa-h6", "frontier-twa-h14", "budget-e8", "budget-e12", "budget-e16"))
    twa = steps["frontier-twa-h6-s1"].args
    assert twa[twa.index("--select") + 1] == "0:7" and twa[twa.index("--run-id") + 1] == "head-s1"
    budget = steps["budget-e12-s2"].args
    assert budget[budget.index("--epochs") + 1] == "12" and budget[budget.index("--schedule") + 1] == "step"
    assert budget[budget.index("--run-id") + 1] == "budget-e12-s2" and budget[budget.index("--seed") + 1] == "2"


def test_frontier_claims_only_where_every_seed_agrees():
    def twa(acc, returned="twa"):
        return {"twa_accuracy": acc, "swa_accuracy": acc - 0.05, "returned": returned, "lr_final": 2.0,
                "guard_attempts": [{"lr": 2.0, "outcome": "ok"}], "fallback": None}

    def sgd(acc):
        return {"final_accuracy": acc}

    seeds = {s: {"head": sgd(0.70 + d), "frontier": {
        "twa": {"4": twa(0.64 + d), "10": twa(0.67 + d2, returned="start" if s == "1" else "twa")},
        "sgd": {"6": sgd(0.60 + d), "12": sgd(0.66 + d3)}}}
        for s, d, d2, d3 in (("0", 0.0, 0.0, 0.0), ("1", 0.01, 0.0, 0.02), ("2", -0.01, 0.0, -0.02))}
    fs = reproduce.frontier.summarize(seeds, epochs=20, twa_epochs=2, grid=[4, 10])
    cl = {c["head"]: c for c in reproduce.frontier.claims(fs, epochs=20, twa_epochs=2)}
    assert cl[4]["vs_budget_sgd"]["verdict"] == "beats" and cl[4]["vs_budget_sgd"]["mean"] == pytest.approx(0.04)
    assert cl[4]["vs_full_sgd"]["verdict"] == "misses" and cl[4]["epochs_saved_fraction"] == pytest.approx(0.7)
    assert cl[4]["vs_swa"]["verdict"] == "beats"
    # +0.01, -0.01, +0.03 against the 12-epoch SGD: the signs disagree, so no claim is made
    assert cl[10]["vs_budget_sgd"]["verdict"] == "no claim" and cl[10]["fallback_seeds"] == ["1"]
    table = "\n".join(reproduce.frontier.table(fs, list(cl.values()), epochs=20, twa_epochs=2))
    assert "**fallback on seed(s) 1**" in table and "s1: start @ 2" in table
    assert reproduce._fallbacks(seeds) == ["1/frontier/twa/10"]


def test_table_and_findings_over_two_seeds():
    p = reproduce.Preset(name="t", model="resnet20", epochs=20, twa_epochs=2, tail_epochs=5, swa_lrs=(0.05, 0.1))

    def seed(full, half, swa, twa, twav, tails):
        return {"head": {"final_accuracy": full, "half_accuracy": half},
                "head_paper": {"swa_accuracy": swa, "twa_accuracy": twa},
                "head_twav": {"twa_accuracy": twav},
                "tail": {k: {"train": {"final_accuracy": v[0]}, "twa": {"swa_accuracy": v[1], "twa_accuracy": v[2]}}
                         for k, v in tails.items()}}

    seeds = {"0": seed(0.80, 0.60, 0.30, 0.81, 0.82, {"0.05": (0.78, 0.80, 0.81), "0.1": (0.70, 0.76, 0.80)}),
             "1": seed(0.82, 0.62, 0.32, 0.83, 0.84, {"0.05": (0.78, 0.80, 0.81), "0.1": (0.70, 0.76, 0.80)})}
    table = reproduce.build_table(p, seeds)
    full = table[0]
    assert full["method"].startswith("SGD, full run") and (full["sgd_epochs"], full["twa_epochs"]) == (20, 0)
    assert full["accuracy_mean"] == pytest.approx(0.81) and full["accuracy_std"] == pytest.approx(0.0141421, rel=1e-4)
    assert [r["sgd_epochs"] for r in table] == [20, 10, 10, 10, 10] + [25] * 6
    found = {(f["claim"], f.get("method"), f.get("swa_lr")): f for f in reproduce.findings(p, table, seeds)}
    head = found[("head", "TWA (paper mode)", None)]
    assert head["verdict"] == "matches" and head["holds"] is True
    assert head["epochs_saved_fraction"] == pytest.approx(0.4)
    assert found[("head", "TWA-v (journal mode)", None)]["verdict"] == "beats"  # +1 pt > 0.5 pt band
    assert found[("head-swa", None, None)]["holds"] is True
    assert found[("twa-v", None, None)]["holds"] is True
    assert found[("tail", None, 0.05)]["holds"] is True  # +1 pt > 0.5 pt band
    assert found[("tail-lr", None, None)]["holds"] is True  # gap 4 pts at 0.1 vs 1 pt at 0.05
    assert found[("tail-sensitivity", None, None)]["holds"] is True  # TWA moves 1 pt, SWA 4 pts
    # a tail difference inside the tie band is neither a win nor a loss
    seeds["0"]["tail"]["0.05"]["twa"]["twa_accuracy"] = seeds["1"]["tail"]["0.05"]["twa"]["twa_accuracy"] = 0.802
    tie = next(f for f in reproduce.findings(p, reproduce.build_table(p, seeds), seeds)
               if f["claim"] == "tail" and f["swa_lr"] == 0.05)
    assert tie["holds"] is None
    # one missing seed for one method: that row is averaged over the seeds that have it
    del seeds["1"]["head_twav"]
    row = next(r for r in reproduce.build_table(p, seeds) if r["method"].startswith("TWA-v"))
    assert row["n_seeds"] == 1 and row["accuracy_std"] == 0.0


def test_density_plan_and_table_compare_k5_with_its_epoch_ends(tmp_path):
    """--snapshots-per-epoch 5: one SGD run per seed, TWA over all 51 snapshots to epoch 10 and over the
    11 epoch ends of the same run (the K=1 selection), no tail/TWA-v steps with --experiments head."""
    args = ["--out", str(tmp_path), "--snapshots-per-epoch", "5", "--experiments", "head"]
    p = reproduce.preset_from_args(reproduce.build_parser().parse_args(args))
    steps = {s.name: s for s in reproduce.plan_steps(p, tmp_path / "work")}
    assert sorted(steps) == sorted(f"{n}-s{s}" for s in (0, 1) for n in ("head", "head-paper", "head-paper-k1",
                                                                                   "head-paper-periter"))
    head = steps["head-s0"].args
    assert head[head.index("--snapshots-per-epoch") + 1] == "5" and head.count("--snapshot-every") == 1
    paper, k1 = steps["head-paper-s0"].args, steps["head-paper-k1-s0"].args
    assert paper[paper.index("--select-epochs") + 1] == "0:10" and k1[k1.index("--select") + 1] == "0:51:5"
    seeds = {s: {"head": {"final_accuracy": 0.7, "half_accuracy": 0.6}, "tail": {},
                 "head_paper": {"swa_accuracy": 0.5, "twa_accuracy": 0.70 + d},
                 "head_paper_k1": {"swa_accuracy": 0.55, "twa_accuracy": 0.66 + d}} for s, d in (("0", 0), ("1", .01))}
    table = reproduce.build_table(p, seeds)
    assert [r["method"] for r in table][2:] == [
        "SWA of snapshots to epoch 10 (K=5: 51 snapshots)", "TWA paper mode, snapshots to epoch 10 (K=5: 51 snapshots)",
        "SWA of snapshots to epoch 10 (K=1: the 11 epoch ends)", "TWA at K=1, snapshots to epoch 10 (11 epoch ends)"]
    density = next(f for f in reproduce.findings(p, table, seeds) if f["claim"] == "density")
    assert density["difference"] == pytest.approx(0.04) and density["holds"] is True
    with pytest.raises(ValueError, match="--experiments"):
        reproduce.preset_from_args(reproduce.build_parser().parse_args([*args[:4], "--experiments", "tail"]))


# --- the early-stop experiment (issue 11, item 4) ----------------------------------------------------------
@pytest.fixture(scope="module")
def early(tmp_path_factory):
    """`--smoke --experiments early-stop`: per pair a 12-epoch trainer and a follower whose target rule fires at
    its first probe; run twice (the second run skips both finished pairs)."""
    data = str(require_cifar10())
    out = tmp_path_factory.mktemp("early") / "out"
    args = ["--smoke", "--experiments", "early-stop", "--out", str(out), "--data", data]
    first = python("experiments/reproduce.py", args, timeout=400)
    again = python("experiments/reproduce.py", args, timeout=120)
    return out, first, again


def _run_files(out, run_id):
    run = out / "work" / "store" / run_id
    def read(path):
        return json.loads(path.read_text())

    return (read(run / "train" / "metrics.json"), read(run / "twa" / "probes.json")["probes"],
            read(run / "twa" / "result.json"), (run / "control" / "STOP.json").is_file(),
            read(out / "work" / "done" / f"{run_id}.json"))


@pytest.mark.experiments
@pytest.mark.slow
def test_early_stop_smoke_report_agrees_with_the_run_files(early):
    out, first, again = early
    res = json.loads((out / "results.json").read_text())
    es, report = res["early_stop"], (out / "report.md").read_text()
    blob = (out / "early_stop.png").read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5_000
    assert not (out / "accuracy_vs_epoch.png").exists(), "head was not selected"
    d, E = es["seeds"]["0"], 12
    assert es["epochs"] == E and es["rule"] == "target:0.01" and list(es["seeds"]) == ["0"]
    m_full, probes, r_full, stop_full, done_full = _run_files(out, "early-full-s0")
    m_obey, probes_obey, r_obey, _, done_obey = _run_files(out, "early-obey-s0")

    # the full run: all epochs though the rule fired (recorded, not obeyed), probes to the end
    assert [r["epoch"] for r in m_full["epochs"]] == list(range(1, E + 1)) and "stopped_by" not in m_full["final"]
    assert [q["probe"] for q in probes] == list(range(len(probes))) and probes[-1]["epoch"] == E
    fired = next(q for q in probes if q["would_stop"])
    assert stop_full and fired["stop_written"] and fired["split"] == "holdout"
    assert d["rule_epoch"] == fired["epoch"] <= es["epochs"] and d["rule_probe_twa"] == fired["twa_accuracy"]
    assert d["full"]["sgd_accuracy"] == m_full["final"]["val_accuracy"]
    assert d["full"]["twa_accuracy"] == r_full["twa_accuracy"] and d["full"]["twa_snapshots"] == E + 1
    assert [q["twa_accuracy"] for q in d["full"]["probes"]] == [q["twa_accuracy"] for q in probes]

    # the obeyed run: stopped by TWA after the rule fired, or (a race on a tiny run) finished first, and said so
    obey = d["obey"]
    assert obey["twa_accuracy"] == r_obey["twa_accuracy"] and obey["sgd_accuracy"] == m_obey["final"]["val_accuracy"]
    if m_obey["final"].get("stopped_by") == "twa":
        stopped = m_obey["final"]["stopped_epoch"]
        assert 1 <= stopped <= E and obey["stopped_epoch"] == stopped and d["epochs_saved"] == E - stopped
        assert [s["seq"] for s in r_obey["snapshots"]] == list(range(m_obey["final"]["stopped_seq"] + 1))
        assert f"The obeyed run stopped at epoch {stopped:g}" in report
    else:
        assert d["epochs_saved"] == 0 and "not stopped" in report
        assert ("training had ended before it read the marker" in report) == any(q["would_stop"] for q in probes_obey)
    assert obey["train_wall_seconds"] == done_obey["train_seconds"] < done_obey["seconds"]
    assert d["wall_saving"] == pytest.approx(1 - done_obey["train_seconds"] / done_full["train_seconds"])
    assert d["gap"] == pytest.approx(r_obey["twa_accuracy"] - m_full["final"]["val_accuracy"])
    assert es["mean"]["gap"]["mean"] == pytest.approx(d["gap"]) and es["mean"]["gap"]["n"] == 1

    # replay through StopRule.decide: the run's rule fires where the run's did; a rule that cannot fire never does
    rows = {r["rule"]: r for r in es["replay"]["rows"]}
    assert es["replay"]["recorded_matches_replay"] and rows["target:0.01"]["default"]
    assert rows["target:0.01"]["per_seed"]["0"]["probe"] == fired["probe"]
    # where it fired, the TWA over the full run's snapshots to that epoch (its own step) says what it delivers
    e = int(fired["epoch"])
    replay = json.loads((out / "work" / "twa" / f"early-replay-s0-e{e}" / "result.json").read_text())
    assert [x["seq"] for x in replay["snapshots"]] == list(range(e + 1))
    assert rows["target:0.01"]["per_seed"]["0"]["twa_val"] == replay["twa_accuracy"]
    assert f"early-replay-s0-e{e}" in res["steps"] and not res["missing_steps"]
    assert "## Early stop: does the live TWA follower save compute?" in report and "| 0 | " in report
    assert "![probe accuracy against epoch](early_stop.png)" in report and "competes with it" in report
    assert "[skip] early-full-s0" in again.stdout and "[skip] early-obey-s0" in again.stdout
    assert json.loads((out / "results.json").read_text())["early_stop"]["seeds"] == es["seeds"]


def test_early_stop_replay_calls_the_projects_rule_on_recorded_probes():
    def probes(twa, sgd):
        return [{"probe": i, "epoch": 2 * (i + 1), "twa_accuracy": a, "sgd_holdout_accuracy": sgd}
                for i, a in enumerate(twa)]

    plateau = reproduce.early_stop.StopRule("plateau", epsilon_points=0.5, patience=2)
    hit = reproduce.early_stop.replay(plateau, probes([0.50, 0.60, 0.70, 0.701, 0.702, 0.75], 0.65))
    assert (hit["probe"], hit["epoch"], hit["twa_accuracy"]) == (4, 10, 0.702)  # +0.2 < 0.5 pts over 2 probes
    assert reproduce.early_stop.replay(plateau, probes([0.50, 0.60, 0.70, 0.701, 0.702], 0.71)) is None  # < SGD
    assert reproduce.early_stop.replay(plateau, probes([0.50, 0.60, 0.70, 0.701, 0.702], 0.71),
                                       sgd_condition=False)["probe"] == 4
    p = reproduce.Preset(name="t", model="resnet20", epochs=14, experiments=("early-stop",))
    curve = probes([0.50, 0.60, 0.70, 0.745, 0.746, 0.747, 0.748], 0.65)  # epochs 2, 4, ..., 14
    seeds = {"0": {"full": {"probes": curve, "rule_fired": None, "sgd_accuracy": 0.74, "twa_accuracy": 0.75}}}
    grid = reproduce.early_stop.replay_grid(p, seeds)
    default = grid["rows"][0]
    assert default["default"] and default["rule"] == "gain price=1"  # the follower's own defaults
    assert default["per_seed"]["0"] is None and not default["holds"]  # no per-example results: it cannot fire
    old = {r["rule"]: r for r in grid["rows"]}["plateau eps=0.2 P=3"]
    assert old["per_seed"]["0"] is None and not old["holds"]  # +0.3 pts over the last 3: never fires
    assert grid["recorded_matches_replay"] is True  # the run's record (never fired) agrees
    # P=1 stops at epoch 10, P=2 (eps 0.5, 1) at 12, P=3 (eps 0.5, 1) at 14 = E (the full run's final TWA)
    assert reproduce.early_stop.replay_epochs({"epochs": 14, "replay": grid}, limit=4) == {"0": [10, 12]}
    assert reproduce.early_stop.replay_epochs({"epochs": 14, "replay": grid}, limit=1) == {"0": [10]}
    assert grid["best"] is None  # no TWA at the stops yet: nothing can be said to hold
    grid = reproduce.early_stop.replay_grid(p, seeds, {"0": {10: 0.70, 12: 0.7451}})
    rows = {r["rule"]: r for r in grid["rows"]}
    assert not rows["plateau eps=0.2 P=1"]["holds"]  # 4 pts under full SGD at epoch 10
    assert rows["plateau eps=0.5 P=2"]["per_seed"]["0"]["gap_to_full_sgd"] == pytest.approx(0.0051)
    assert rows["plateau eps=0.5 P=3"]["holds"] and rows["plateau eps=0.5 P=3"]["epochs_saved_mean"] == 0
    # holds and saves 2 epochs; ties with eps 1 and the variants without the SGD check: the most conservative
    assert grid["best"] == "plateau eps=0.5 P=2"


def test_early_stop_is_opt_in_and_needs_no_head(tmp_path):
    parse = reproduce.build_parser().parse_args
    p = reproduce.preset_from_args(parse(["--out", str(tmp_path)]))
    assert reproduce.plan_pairs(p, tmp_path / "work") == []
    p = reproduce.preset_from_args(parse(["--out", str(tmp_path), "--experiments", "early-stop"]))
    assert reproduce.plan_steps(p, tmp_path / "work") == []
    pairs = {x.name: x for x in reproduce.plan_pairs(p, tmp_path / "work")}
    assert sorted(pairs) == ["early-full-s0", "early-full-s1", "early-obey-s0", "early-obey-s1"]
    full, obey = pairs["early-full-s1"], pairs["early-obey-s1"]
    assert "--no-obey-stop" in full.train and "--no-obey-stop" not in obey.train and "--resume" not in full.train
    assert full.train[full.train.index("--epochs") + 1] == "20" and "--holdout-fraction" in full.train
    assert full.follow[:1] == ["--follow"] and "--stop-rule" not in full.follow  # the default rule is measured
    assert full.follow[full.follow.index("--snapshot-url") + 1].startswith("file://")
    with pytest.raises(ValueError, match="twav, tail and frontier need head"):
        reproduce.preset_from_args(parse(["--out", str(tmp_path), "--experiments", "tail,early-stop"]))


# --- --follow-head and --jobs (the GPU science run, issue 18 item 4) -----------------------------------------
def test_follow_head_plan_runs_the_head_beside_a_record_only_follower(tmp_path):
    args = ["--out", str(tmp_path), "--experiments", "head,frontier", "--seeds", "0", "--epochs", "40",
            "--snapshots-per-epoch", "5", "--frontier-heads", "16", "20", "24", "--follow-head",
            "--follow-args", "--probe-every 5"]
    p = reproduce.preset_from_args(reproduce.build_parser().parse_args(args))
    steps = {s.name: s for s in reproduce.plan_steps(p, tmp_path / "work")}
    assert sorted(steps) == sorted(f"{n}-s0" for n in (
        "head", "head-paper", "head-paper-k1", "head-paper-periter", "frontier-twa-h16", "frontier-twa-h24",
        "budget-e18", "budget-e22", "budget-e26"))
    head = steps["head-s0"]
    assert "--no-obey-stop" in head.args and head.follow[:1] == ["--follow"] and head.follow[-2:] == [
        "--probe-every", "5"] and "--stop-rule" not in head.follow  # the follower's default rule
    assert head.follow[head.follow.index("--run-id") + 1] == "head-s0" and head.needs == ()
    pair = reproduce.head_pair(head)
    assert (pair.name, pair.run_id, pair.obey, pair.train) == ("head-s0", "head-s0", False, head.args)
    assert pair.checkpoint_dir == (tmp_path / "work" / "checkpoints" / "head-s0").resolve()
    # TWA steps read the head run; the budget runs read nothing, so --jobs runs them beside it
    assert all(s.needs == ("head-s0",) for n, s in steps.items() if s.kind == "twa")
    assert all(s.needs == () and s.follow is None for n, s in steps.items() if n.startswith("budget-"))
    without = reproduce.preset_from_args(reproduce.build_parser().parse_args(args[:-3]))
    plain = reproduce.plan_steps(without, tmp_path / "work")[0]
    assert plain.follow is None and "--no-obey-stop" not in plain.args


def _fake_step(tmp_path, name, code, needs=()):
    """A step whose process is ``python -c code`` and whose output is result.json in its own folder."""
    out = tmp_path / "twa" / name
    code = (f"import pathlib, sys, time; out = pathlib.Path({str(out)!r}); d = pathlib.Path({str(tmp_path)!r})\n"
            + code)
    code += "\nout.mkdir(parents=True, exist_ok=True); (out / 'result.json').write_text('{}')"
    return reproduce.Step(name, "twa", "-c", [code], 0, "fake", output=f"file://{out}", needs=needs)


def _waits_for_b(tmp_path, seconds):
    """Step a: it finishes only once step b has started, so only when the two run at once."""
    return _fake_step(tmp_path, "a", "(d / 'a.started').touch()\n"
                                     "t = time.monotonic()\n"
                                     "while not (d / 'b.started').exists():\n"
                                     "    time.sleep(0.05)\n"
                                     f"    if time.monotonic() - t > {seconds}: sys.exit('b never started beside a')")


@pytest.mark.slow  # a dozen short Python processes
def test_run_steps_runs_independent_steps_side_by_side_and_waits_for_needs(tmp_path):
    work = tmp_path / "work"
    a = _waits_for_b(tmp_path, 60)
    b = _fake_step(tmp_path, "b", "(d / 'b.started').touch()")
    c = _fake_step(tmp_path, "c", "assert (d / 'twa' / 'a' / 'result.json').exists(), 'c started before a ended'",
                   needs=("a",))
    bad = _fake_step(tmp_path, "bad", "sys.exit(3)")
    after_bad = _fake_step(tmp_path, "after-bad", "(d / 'after-bad.ran').touch()", needs=("bad",))
    log = []
    with pytest.raises(SystemExit) as e:
        reproduce.run_steps([a, bad, after_bad, b, c], work, ranks=1, env=env(), jobs=2, log=log.append)
    # the failure is reported with its log; the step that needs it never ran; the others all finished
    assert "2 of 5 steps failed" in e.value.code and "step bad failed (exit 3)" in e.value.code
    assert "after-bad: not run: it needs bad" in e.value.code and not (tmp_path / "after-bad.ran").exists()
    assert sorted(p.stem for p in (work / "done").glob("*.json")) == ["a", "b", "c"]
    # a rerun skips the finished steps
    log.clear()
    reproduce.run_steps([b, c], work, ranks=1, env=env(), jobs=1, log=log.append)
    assert [m.split(" (")[0] for m in log] == ["[skip] b", "[skip] c"]
    # one at a time, a (which waits for b) cannot finish: the side-by-side run above was real
    for p in (work / "done" / "a.json", work / "done" / "b.json", tmp_path / "b.started"):
        p.unlink()
    with pytest.raises(SystemExit, match="b never started beside a"):
        reproduce.run_steps([_waits_for_b(tmp_path, 2), b], work, ranks=1, env=env(), jobs=1, log=log.append)
