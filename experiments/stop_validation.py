"""Does the follower's stop rule deserve trust? Issue 18's protocol, with the rule's parameters frozen before the
test seeds are looked at.

    python experiments/stop_validation.py --out bench/results/cpu-stop            # every phase, resumable
    python experiments/stop_validation.py --out DIR --dry-run                      # the plan, and what is done
    python experiments/stop_validation.py --out DIR --report-only                  # rebuild the report

Phases (a finished step leaves work/done/<name>.json and is skipped on a rerun):

1. **train**: a full run per seed (dev and test): E epochs, K snapshots per epoch, the authors' recipe, the
   marker ignored (``--no-obey-stop``).
2. **record**: ``launch/twa.py --follow --replay`` on each full run: the follower's probes wherever a follower that
   kept up would have run them, each with its per-example hold-out correctness, up to the first lr phase's end
   (no gain rule fires past it). The decisions recorded there are the default rule's; phase 5 replays others.
3. **deliver**: the final TWA protocol (T epochs at lr 2, step schedule, full BatchNorm passes), evaluated on
   val, over epochs 0..h of each full run, for every probe epoch h in the first lr phase: the delivered
   accuracy at any stop, the hindsight best head, and the probe (a cheaper proxy) against what it stands for.
4. **budget**: SGD from scratch on an (h+T)-epoch schedule, the same seed: dev seeds at every probe epoch h,
   test seeds at the frozen rule's stop.
5. **choose**, on the dev seeds only: each rule of :data:`GRID` is replayed on the recorded probes through the
   project's own ``StopRule.decide``; :func:`choose` keeps the rules whose every dev-seed stop delivered TWA at
   least budget-matched SGD, and of those the one that saves the most epochs. The choice goes to
   ``frozen.json`` (with the time and the commit), which is never rewritten.
6. **test**: the frozen rule replayed on the test seeds: stop epoch, epochs saved, regret against the best head
   in hindsight, gaps to full and budget-matched SGD, false stops (TWA more than 1 point under budget SGD).
7. **live**: per test seed, the trainer obeying the stop beside a live follower with the frozen rule: what a
   user would see, in wall clock, net of the probes' cost.

The rule reads hold-out numbers only; val (2,000 CIFAR-10 test images) scores what was delivered, in the report.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # experiments/ is not a package

import early_stop  # noqa: E402
import reproduce  # noqa: E402
from reproduce import Step, _read_json, _write_json, step_output  # noqa: E402

from twa_scale.twa.stoprule import StopRule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FALSE_STOP_POINTS = 1.0  # a stop whose TWA ends more than this under budget-matched SGD is a false stop
SAVED_GOAL = 0.30        # issue 18: the rule must save at least this fraction of the epochs


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    epochs: int = 12
    snapshots_per_epoch: int = 5
    limit_train: int | None = 5000
    limit_val: int | None = 2000
    holdout_fraction: float = 0.04
    """2,000 images of the 50k training split, never trained on: what the rule reads."""
    lr: float = 0.1
    weight_decay: float = 1e-4
    batch_size: int = 128
    twa_epochs: int = 2
    twa_lr: float = 2.0
    probe_every: int = 10
    """Snapshots between probes: every 2 epochs at K = 5, so the gain rule pairs successive probes."""
    probe_steps: int = 35
    """One pass over the 4.5k training images (the follower's default, 100, is ~3 SGD epochs here)."""
    probe_bn_batches: int = 10
    dev_seeds: tuple[int, ...] = (0, 1)
    test_seeds: tuple[int, ...] = (2, 3, 4, 5, 6)
    num_workers: int = 1
    bn_batches: int | None = None
    follow_extra: tuple[str, ...] = ()
    data: str = reproduce.DEFAULT_DATA

    @property
    def seeds(self) -> tuple[int, ...]:
        return (*self.dev_seeds, *self.test_seeds)

    @property
    def phase_end(self) -> int:
        from twa_scale.train.schedule import milestones
        return milestones(self.epochs, None)[0]

    @property
    def heads(self) -> list[int]:
        """Probe epochs in the first lr phase where the gain rule can stop: from the second probe on (it pairs a
        probe with one at least 2 epochs back)."""
        per = self.probe_every / self.snapshots_per_epoch
        return [e for e in (round(per * i) for i in range(1, self.epochs + 1)) if e <= self.phase_end][1:]


SETUPS = {
    "cpu": Setup("cpu"),
    # tests: a few seconds per run
    "smoke": Setup("smoke", epochs=4, snapshots_per_epoch=2, limit_train=128, limit_val=128, holdout_fraction=0.004,
                   batch_size=32, twa_epochs=1, probe_every=2, probe_steps=2, probe_bn_batches=1, dev_seeds=(0,),
                   test_seeds=(1,),
                   num_workers=0, bn_batches=1, follow_extra=("--poll-seconds", "0.2", "--follow-timeout", "300")),
}

# The rules the dev seeds choose from: the gain rule's price (points of TWA accuracy one more epoch must be likely
# to buy), with and without the hand-over at the first lr phase's last probe.
GRID: tuple[tuple[float, bool], ...] = tuple((price, end) for end in (False, True) for price in (0.5, 1.0, 2.0, 4.0))


def rule_flags(price: float, at_phase_end: bool) -> list[str]:
    return ["--stop-rule", "gain", "--stop-price", f"{price:g}", *(["--stop-at-phase-end"] if at_phase_end else [])]


def rule_of(price: float, at_phase_end: bool) -> StopRule:
    """The rule a follower given :func:`rule_flags` applies."""
    return early_stop.rule_of(rule_flags(price, at_phase_end))


def rule_name(price: float, at_phase_end: bool) -> str:
    return f"gain price={price:g}" + (" +phase-end" if at_phase_end else "")


# --- the plan ------------------------------------------------------------------------------------------------
def _store(work: Path) -> str:
    return "file://" + str((work / "store").resolve())


def _train_args(s: Setup, work: Path, run_id: str, seed: int, epochs: int, *, snapshots: bool) -> list[str]:
    args = ["--preset", "none", "--model", "resnet20", "--data", s.data, "--weight-decay", f"{s.weight_decay:g}",
            "--batch-size", str(s.batch_size), "--holdout-fraction", f"{s.holdout_fraction:g}",
            "--snapshot-url", _store(work),
            *(["--snapshots-per-epoch", str(s.snapshots_per_epoch)] if snapshots else ["--snapshot-every", "1"]),
            "--resume"]
    for flag, v in (("--limit-train", s.limit_train), ("--limit-val", s.limit_val), ("--num-workers", s.num_workers)):
        if v is not None:
            args += [flag, str(v)]
    return args + ["--seed", str(seed), "--run-id", run_id,
                   "--checkpoint-dir", str((work / "checkpoints" / run_id).resolve()), "--checkpoint-url", "none",
                   "--epochs", str(epochs), "--lr", f"{s.lr:g}", "--schedule", "step", "--no-obey-stop"]


def _twa(s: Setup, work: Path, name: str, seed: int, role: str, run_id: str, extra: list[str]) -> Step:
    out = "file://" + str((work / "twa" / name).resolve())
    args = ["--snapshot-url", _store(work), "--run-id", run_id, "--seed", str(seed), "--output", out, "--no-plot",
            "--num-workers", str(s.num_workers), *(["--bn-batches", str(s.bn_batches)] if s.bn_batches else []),
            *extra]
    return Step(name, "twa", "launch/twa.py", args, seed, role, run_id=run_id, output=out, needs=(run_id,))


def _probe_flags(s: Setup) -> list[str]:
    return ["--probe-every", str(s.probe_every), "--probe-steps", str(s.probe_steps), "--probe-bn-batches",
            str(s.probe_bn_batches), *s.follow_extra]


def budget_step(s: Setup, work: Path, seed: int, n: int) -> Step:
    name = f"budget-e{n}-s{seed}"
    return Step(name, "train", "launch/train.py", _train_args(s, work, name, seed, n, snapshots=False), seed,
                "budget", head=n, run_id=name)


def plan_recorded(s: Setup, work: Path) -> list[Step]:
    """Phases 1-4 for the dev seeds, 1-3 for the test seeds: everything that decides nothing."""
    steps = []
    for seed in s.seeds:
        full = f"full-s{seed}"
        steps.append(Step(full, "train", "launch/train.py", _train_args(s, work, full, seed, s.epochs, snapshots=True),
                          seed, "full", run_id=full))
        steps.append(_twa(s, work, f"record-s{seed}", seed, "record", full,
                          # the gain rule's decisions are replayed later; with it, the follower stops probing
                          # past the first lr phase, where no gain rule can fire
                          ["--follow", "--replay", "--stop-rule", "gain", "--epochs", "0", *_probe_flags(s)]))
        for h in s.heads:
            st = _twa(s, work, f"deliver-s{seed}-h{h}", seed, "deliver", full,
                      ["--select-epochs", f"0:{h}", "--epochs", str(s.twa_epochs), "--lr", f"{s.twa_lr:g}",
                       "--schedule", "step"])
            st.head = h
            steps.append(st)
        if seed in s.dev_seeds:
            steps += [budget_step(s, work, seed, h + s.twa_epochs) for h in s.heads]
    return steps


def live_pair(s: Setup, work: Path, seed: int, frozen: dict) -> early_stop.Pair:
    name = f"live-s{seed}"
    ckpt = (work / "checkpoints" / name).resolve()
    train = [a for a in _train_args(s, work, name, seed, s.epochs, snapshots=True)
             if a not in ("--resume", "--no-obey-stop")]  # a pair starts over; it obeys the stop
    follow = ["--follow", "--snapshot-url", _store(work), "--run-id", name, "--seed", str(seed),
              "--epochs", str(s.twa_epochs), "--lr", f"{s.twa_lr:g}", "--schedule", "step",
              "--num-workers", str(s.num_workers), "--no-plot", *_probe_flags(s), *frozen["flags"]]
    if s.bn_batches:
        follow += ["--bn-batches", str(s.bn_batches)]
    return early_stop.Pair(name, seed, True, name, train, follow, ckpt)


# --- replaying rules on recorded probes -----------------------------------------------------------------
def probes_of(work: Path, seed: int) -> list[dict]:
    return (_read_json(work / "store" / f"full-s{seed}" / "twa" / "probes.json") or {}).get("probes", [])


def replay(rule: StopRule, probes: Sequence[dict]) -> dict:
    """Where ``rule`` stops on these probes (early_stop.replay: the project's own decide()), or never."""
    hit = early_stop.replay(rule, list(probes))
    return {"epoch": None, "decision": "never fired"} if hit is None else {**hit, "epoch": round(hit["epoch"])}


def seed_outcome(s: Setup, work: Path, seed: int, stop: dict) -> dict:
    """What a stop delivers on one seed: TWA there (val), the best head in hindsight, full and budget SGD."""
    full = (_read_json(work / "store" / f"full-s{seed}" / "train" / "metrics.json") or {}).get("final") or {}
    delivered = {h: (_read_json(work / "twa" / f"deliver-s{seed}-h{h}" / "result.json") or {}) for h in s.heads}
    twa_at = {h: r.get("twa_accuracy") for h, r in delivered.items()}
    e = stop["epoch"]
    out = {"seed": seed, "stop_epoch": e, "decision": stop["decision"], "full_sgd": full.get("val_accuracy"),
           "twa_by_head": twa_at, "returned_by_head": {h: r.get("returned") for h, r in delivered.items()}}
    known = {h: a for h, a in twa_at.items() if a is not None}
    best_h = max(known, key=known.get) if known else None
    out["hindsight_head"], out["hindsight_twa"] = best_h, known.get(best_h)
    if e is None:  # never fired: the run trains to its end and its result is SGD's
        out.update(epochs_spent=s.epochs, saved=0.0, delivered=full.get("val_accuracy"), budget_sgd=None,
                   gap_budget=None, gap_full=0.0, false_stop=False, regret=None)
        return out
    budget = (_read_json(work / "store" / f"budget-e{e + s.twa_epochs}-s{seed}" / "train" / "metrics.json")
              or {}).get("final") or {}
    twa, b = twa_at.get(e), budget.get("val_accuracy")
    out.update(epochs_spent=e + s.twa_epochs, saved=1 - (e + s.twa_epochs) / s.epochs, delivered=twa, budget_sgd=b,
               gap_budget=None if twa is None or b is None else 100 * (twa - b),
               gap_full=None if twa is None or full.get("val_accuracy") is None else 100 * (twa - full["val_accuracy"]),
               regret=None if twa is None or best_h is None else 100 * (known[best_h] - twa))
    out["false_stop"] = out["gap_budget"] is not None and out["gap_budget"] < -FALSE_STOP_POINTS
    return out


def choose(s: Setup, work: Path) -> dict:
    """The dev seeds' choice. A rule is *safe* when, on every dev seed where it fires, the TWA it delivers is at
    least budget-matched SGD (where it never fires the run trains to its end: nothing lost). Of the safe rules,
    the most epochs saved (mean), then the higher mean delivered accuracy, then the follower's default in force
    (no default changes without evidence), then the grid's order (the lowest price first). When no rule is safe,
    the one whose worst dev seed comes closest to budget SGD (said so)."""
    rows = []
    for price, end in GRID:
        outs = [seed_outcome(s, work, seed, replay(rule_of(price, end), probes_of(work, seed))) for seed in s.dev_seeds]
        gaps = [o["gap_budget"] for o in outs if o["stop_epoch"] is not None]
        rows.append({"rule": rule_name(price, end), "price": price, "at_phase_end": end,
                     "safe": all(g is not None and g >= 0 for g in gaps),
                     "fires_on_every_dev_seed": all(o["stop_epoch"] is not None for o in outs),
                     "saved": statistics.mean(o["saved"] for o in outs),
                     "delivered": statistics.mean(o["delivered"] or 0 for o in outs),
                     "worst_gap_budget": min((g for g in gaps if g is not None), default=None), "dev": outs})
    safe = [r for r in rows if r["safe"]]
    if safe:
        best = max(safe, key=lambda r: (r["saved"], r["delivered"], _is_default(r), -rows.index(r)))
        why = ("it saves the most epochs among the rules whose every dev-seed stop delivered TWA at least "
               "budget-matched SGD" + ("" if best["saved"] > 0 else
                                       " (no such rule stops on the dev seeds: it never fires there)"))
    else:
        best = max(rows, key=lambda r: (r["worst_gap_budget"], r["saved"]))
        why = "no rule was safe on the dev seeds, and its worst dev-seed stop comes closest to budget-matched SGD"
    return {"rule": best["rule"], "price": best["price"], "at_phase_end": best["at_phase_end"],
            "flags": rule_flags(best["price"], best["at_phase_end"]), "why": why, "grid": rows}


def _is_default(row: dict) -> bool:
    from twa_scale.twa.config import TwaConfig

    d = {f.name: f.default for f in dataclasses.fields(TwaConfig)}
    return d["stop_rule"] == "gain" and (row["price"], row["at_phase_end"]) == (d["stop_price"], d["stop_at_phase_end"])


def freeze(s: Setup, work: Path) -> dict:
    """frozen.json: written once, from the dev seeds alone, before anything of the test seeds is replayed."""
    path = work.parent / "frozen.json"
    if path.is_file():
        return json.loads(path.read_text())
    chosen = choose(s, work)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    frozen = {"frozen_at": datetime.datetime.now(datetime.timezone.utc).isoformat(), "commit": commit,
              "dev_seeds": list(s.dev_seeds), "test_seeds": list(s.test_seeds), **chosen}
    _write_json(path, frozen)
    return frozen


# --- running ---------------------------------------------------------------------------------------------
def adopt(steps: Sequence[Step], work: Path) -> None:
    """A training step whose run finished outside this script (same arguments, started by hand) gets its marker."""
    for st in steps:
        marker = work / "done" / f"{st.name}.json"
        m = step_output(st, work) if st.kind == "train" and not marker.is_file() else None
        if m:
            _write_json(marker, {"step": st.name, "args": st.args, "command": "adopted: finished before this script",
                                 "seconds": m["final"].get("train_seconds") or 0.0, "adopted": True})


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--setup", choices=sorted(SETUPS), default="cpu")
    ap.add_argument("--data", help="CIFAR-10 ImageFolder root (default: the shared copy)")
    ap.add_argument("--jobs", type=int, default=2, help="independent steps at once (each gets cores / jobs threads)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-live", action="store_true", help="stop before the live obeyed runs")
    ap.add_argument("--live-only", action="store_true",
                    help="only the live obeyed runs (the rule must be frozen), e.g. beside a --no-live process")
    ap.add_argument("--freeze-only", action="store_true",
                    help="choose and freeze the rule from the finished dev seeds, then exit")
    a = ap.parse_args(argv)
    s = SETUPS[a.setup]
    if a.data:
        s = dataclasses.replace(s, data=a.data)
    out = Path(a.out).resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    (work / ".gitignore").write_text("*\n")
    env = reproduce.child_env(1, a.jobs)
    # SIGTERM unwinds through run_steps / run_pair, which stop the running steps first (no orphans)
    signal.signal(signal.SIGTERM, reproduce._exit_on_sigterm)
    steps = plan_recorded(s, work)
    adopt(steps, work)
    if a.dry_run:
        for st in steps:
            print(f"{'done' if (work / 'done' / f'{st.name}.json').is_file() else 'todo'}  {st.name}: "
                  f"{reproduce._shown(reproduce.command(st, 1))}")
        return 0
    if a.freeze_only:
        dev = [st for st in steps if st.seed in s.dev_seeds]
        missing = [st.name for st in dev if not (work / "done" / f"{st.name}.json").is_file()]
        if missing:
            raise SystemExit(f"--freeze-only: the dev seeds' steps are not all done: {', '.join(missing)}")
        frozen = freeze(s, work)
        print(f"frozen: {frozen['rule']} ({frozen['why']})")
        return 0
    if not a.report_only and not a.live_only:
        reproduce.run_steps(steps, work, ranks=1, env=env, jobs=a.jobs)
        frozen = freeze(s, work)
        print(f"frozen: {frozen['rule']} ({frozen['why']})")
        tests = [seed_outcome(s, work, seed, replay(rule_of(frozen["price"], frozen["at_phase_end"]),
                                                   probes_of(work, seed))) for seed in s.test_seeds]
        budgets = [budget_step(s, work, o["seed"], o["stop_epoch"] + s.twa_epochs) for o in tests
                   if o["stop_epoch"] is not None]
        reproduce.run_steps(budgets, work, ranks=1, env=env, jobs=a.jobs)
    if a.live_only or not (a.report_only or a.no_live):
        frozen = _read_json(out / "frozen.json")
        if frozen is None:
            raise SystemExit(f"no {out / 'frozen.json'}: the dev seeds have not chosen a rule yet")
        for seed in s.test_seeds:  # one at a time; the report also measures them at their own load
            pair = live_pair(s, work, seed, frozen)
            early_stop.run_pair(pair, work, cmds=early_stop.commands(pair, 1, reproduce.script_command),
                                shown=reproduce._shown, env=early_stop.pair_env(env, 1))
    from stop_report import write_report  # noqa: E402 - the report is its own module
    write_report(s, out, work, argv=sys.argv if argv is None else ["experiments/stop_validation.py", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
