"""The report of experiments/stop_validation.py: results.json, report.md and the proxy-against-delivered scatter."""
from __future__ import annotations

import datetime
import json
import shlex
import statistics
from pathlib import Path
from typing import Any, Sequence

import early_stop
from reproduce import _read_json, _write_json
from stop_validation import (FALSE_STOP_POINTS, SAVED_GOAL, Setup, live_pair, probes_of, replay, rule_of,
                             seed_outcome)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def _ms(xs: Sequence[float | None], fmt: str = ".2f") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):{fmt}} ± {sd:{fmt}}"


def _train_seconds(work: Path, run_id: str) -> float | None:
    m = _read_json(work / "store" / run_id / "train" / "metrics.json") or {}
    rows = m.get("epochs") or []
    return sum(r.get("seconds") or 0.0 for r in rows) if rows else None


def proxy_pairs(s: Setup, work: Path) -> list[dict]:
    """Every (seed, head): the probe's TWA accuracy on the hold-out there against the delivered TWA on val."""
    out = []
    for seed in s.seeds:
        by_epoch = {round(p["epoch"]): p for p in probes_of(work, seed)}
        for h in s.heads:
            r = _read_json(work / "twa" / f"deliver-s{seed}-h{h}" / "result.json") or {}
            p = by_epoch.get(h)
            if p and p.get("twa_accuracy") is not None and r.get("twa_accuracy") is not None:
                out.append({"seed": seed, "head": h, "probe": p["twa_accuracy"], "delivered": r["twa_accuracy"],
                            "gap_points": 100 * (p["twa_accuracy"] - r["twa_accuracy"])})
    return out


def live_results(s: Setup, work: Path, frozen: dict) -> list[dict]:
    rows = []
    for seed in s.test_seeds:
        run = early_stop.run_summary(live_pair(s, work, seed, frozen), work)
        if run is None:
            continue
        full = _train_seconds(work, f"full-s{seed}")
        probe_s = sum(p.get("seconds") or 0.0 for p in run["probes"])
        # the box is shared: E epochs at the live run's own epoch time is the full run it replaces, under the
        # same load (its completed epochs; a partial epoch's row has an epoch_fraction)
        rows_live = [r for r in run["epochs"] if r.get("seconds")]
        per_epoch = statistics.median(r["seconds"] for r in rows_live) if rows_live else None
        rows.append({"seed": seed, "stopped_epoch": run["stopped_epoch"], "stopped_by": run["stopped_by"],
                     "rule_fired": (run["rule_fired"] or {}).get("epoch"), "twa_accuracy": run["twa_accuracy"],
                     "twa_returned": run["twa_returned"], "train_wall_seconds": run["train_wall_seconds"],
                     "time_to_result_seconds": run["pair_wall_seconds"], "full_train_seconds": full,
                     "probe_seconds": probe_s, "probes": len(run["probes"]),
                     "wall_saved": None if not full else 1 - run["pair_wall_seconds"] / full,
                     "live_epoch_seconds": per_epoch,
                     "wall_saved_same_load": None if not per_epoch else
                     1 - run["pair_wall_seconds"] / (s.epochs * per_epoch),
                     "core_seconds_saved": None if not full else full - run["train_wall_seconds"] - probe_s
                     - (run["twa_seconds"] or 0.0)})
    return rows


def summarize(s: Setup, work: Path) -> dict:
    frozen = _read_json(work.parent / "frozen.json")
    res: dict[str, Any] = {"setup": {k: v for k, v in vars(s).items()}, "heads": s.heads, "phase_end": s.phase_end,
                           "frozen": frozen, "proxy": proxy_pairs(s, work),
                           "probes": {str(seed): [{k: p.get(k) for k in ("epoch", "twa_accuracy", "swa_accuracy",
                                                                          "sgd_holdout_accuracy", "first_phase",
                                                                          "seconds", "outcome")}
                                                  for p in probes_of(work, seed)] for seed in s.seeds}}
    if frozen:
        rule = rule_of(frozen["price"], frozen["at_phase_end"])
        res["test"] = [seed_outcome(s, work, seed, replay(rule, probes_of(work, seed))) for seed in s.test_seeds]
        res["live"] = live_results(s, work, frozen)
        t = res["test"]
        res["verdict"] = {
            "fires_on_every_seed": all(o["stop_epoch"] is not None for o in t),
            "saves_at_least_30pct_on_every_seed": all(o["saved"] >= SAVED_GOAL for o in t),
            "twa_at_least_budget_sgd_on_every_seed": all(o["gap_budget"] is not None and o["gap_budget"] >= 0
                                                         for o in t),
            "no_false_stop": not any(o["false_stop"] for o in t),
            "live_runs": len(res["live"]), "live_wall_saved_on_every_seed": bool(res["live"]) and all(
                (r["wall_saved"] or 0) > 0 for r in res["live"]) and len(res["live"]) == len(s.test_seeds)}
    return res


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = res["proxy"]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for h in sorted({p["head"] for p in pts}):
        sel = [p for p in pts if p["head"] == h]
        ax.scatter([100 * p["probe"] for p in sel], [100 * p["delivered"] for p in sel], label=f"head {h} epochs")
    lo = min(min(100 * p["probe"], 100 * p["delivered"]) for p in pts) - 1
    hi = max(max(100 * p["probe"], 100 * p["delivered"]) for p in pts) + 1
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="probe = delivered")
    ax.set_xlabel("probe: short TWA fit, hold-out accuracy (%)")
    ax.set_ylabel("delivered: final TWA protocol, val accuracy (%)")
    ax.set_title("The probe against what a stop there delivers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(s: Setup, res: dict, argv: Sequence[str]) -> str:
    E, T = s.epochs, s.twa_epochs
    lines = [f"# Does the stop rule deserve trust? (`{s.name}` setup)", "",
             f"Command: `{shlex.join(['python', *[a for a in argv if a != '--report-only']])}`", "",
             f"Generated {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}. ResNet-20, "
             f"{s.limit_train} CIFAR-10 training images, E = {E} epochs (lr {s.lr:g}, ÷10 after epochs "
             f"{s.phase_end} and {int(0.75 * E + 0.9)}, weight decay {s.weight_decay:g} on every parameter, "
             f"batch {s.batch_size}), K = {s.snapshots_per_epoch} snapshots per epoch. Probes every "
             f"{s.probe_every} snapshots (every {s.probe_every / s.snapshots_per_epoch:g} epochs): "
             f"{s.probe_steps} TWA steps, BatchNorm on {s.probe_bn_batches} batches, scored on a "
             f"{s.holdout_fraction:g} hold-out of the training split ({round(s.holdout_fraction * 50_000):,} "
             f"images never trained on). Delivered TWA: {T} epochs at lr {s.twa_lr:g}, step schedule, full "
             f"BatchNorm passes, scored on val ({s.limit_val or 10_000:,} CIFAR-10 test images). Budget-matched "
             f"SGD: the same seed trained from scratch on an (h+{T})-epoch schedule. Epochs spent by a stop at h: "
             f"h + {T} (a TWA epoch counted as an SGD epoch). Dev seeds {list(s.dev_seeds)}; test seeds "
             f"{list(s.test_seeds)}.", ""]
    fr = res.get("frozen")
    lines += ["## 1. The choice on the dev seeds", ""]
    if not fr:
        return "\n".join(lines + ["Not frozen yet: the dev seeds' runs are not finished.", ""])
    lines += [f"Frozen {fr['frozen_at']} at commit `{fr['commit'][:10]}`, before any test seed was replayed: "
              f"**{fr['rule']}** (`{' '.join(fr['flags'])}`), because {fr['why']}.", "",
              "| rule | " + " | ".join(f"dev seed {d}: stop, TWA, budget SGD (Δ)" for d in fr["dev_seeds"])
              + " | epochs saved (mean) | safe |", "|---|" + "---:|" * len(fr["dev_seeds"]) + "---:|---|"]
    for r in fr["grid"]:
        cells = []
        for o in r["dev"]:
            if o["stop_epoch"] is None:
                cells.append("never")
            else:
                cells.append(f"{o['stop_epoch']}, {_pct(o['delivered'])}, {_pct(o['budget_sgd'])} "
                             f"({_pts(o['gap_budget'])})")
        lines.append(f"| {r['rule']} | " + " | ".join(cells) + f" | {100 * r['saved']:.0f}% | "
                     f"{'yes' if r['safe'] else 'no'} |")
    lines += ["", "## 2. The frozen rule on the test seeds (replayed on their recorded probes)", "",
              "| seed | stop epoch | epochs spent (saved) | delivered (val %: TWA at the stop; SGD when never) | "
              "budget SGD (val %) | Δ budget | "
              "full SGD (val %) | Δ full | best head in hindsight | regret (pts) | false stop |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for o in res["test"]:
        lines.append(f"| {o['seed']} | {o['stop_epoch'] if o['stop_epoch'] is not None else 'never'} | "
                     f"{o['epochs_spent']} ({100 * o['saved']:.0f}%) | {_pct(o['delivered'])} | "
                     f"{_pct(o['budget_sgd'])} | {_pts(o['gap_budget'])} | {_pct(o['full_sgd'])} | "
                     f"{_pts(o['gap_full'])} | {o['hindsight_head']} ({_pct(o['hindsight_twa'])}) | "
                     f"{_pts(o['regret'])} | {'**yes**' if o['false_stop'] else 'no'} |")
    t = res["test"]
    lines += [f"| mean ± sd | | {_ms([o['epochs_spent'] for o in t], '.1f')} | "
              f"{_ms([100 * o['delivered'] for o in t if o['delivered'] is not None])} | "
              f"{_ms([100 * o['budget_sgd'] for o in t if o['budget_sgd'] is not None])} | "
              f"{_ms([o['gap_budget'] for o in t])} | "
              f"{_ms([100 * o['full_sgd'] for o in t if o['full_sgd'] is not None])} | "
              f"{_ms([o['gap_full'] for o in t])} | | {_ms([o['regret'] for o in t])} | |", ""]
    for o in t:
        lines.append(f"- Seed {o['seed']}: {o['decision']}")
    v = res["verdict"]
    lines += ["", "**Against issue 18's bar** (false stop: TWA more than "
              f"{FALSE_STOP_POINTS:g} point under budget-matched SGD; saving goal {100 * SAVED_GOAL:.0f}%):", ""]
    for key, text in (("fires_on_every_seed", "fires on every test seed"),
                      ("saves_at_least_30pct_on_every_seed", "saves at least 30% of the epochs on every test seed"),
                      ("twa_at_least_budget_sgd_on_every_seed", "its TWA is at least budget-matched SGD on every "
                                                                "test seed"),
                      ("no_false_stop", "no false stop")):
        fired = any(o["stop_epoch"] is not None for o in t)
        verdict = "n/a (no stop to compare)" if key == "twa_at_least_budget_sgd_on_every_seed" and not fired else \
            "met" if v[key] else "**missed**"
        lines.append(f"- {verdict}: {text}")
    lines += ["", "## 3. Live obeyed runs (test seeds)", "",
              "The trainer obeys STOP.json beside a live follower with the frozen rule, the two processes on the "
              "box's 2 cores (one OpenMP thread each). *Full training* is the full run's own epoch times (it trained "
              "beside one other job, also one thread each). *Time to a result* runs from the follower's start to its "
              "final TWA's end. *Core-seconds saved* = full training − the obeyed training − the probes − the final "
              "TWA. *Same load*: the full run's cost taken as E epochs at the live run's own median epoch time, so "
              "that the box's load, which differs between the two runs, cancels.", "",
              "| seed | rule fired at (epoch) | training stopped at (epoch) | obeyed training (s) | probes (n, s) | "
              "time to a result (s) | full training (s) | wall saved | wall saved, same load | core-seconds saved | "
              "delivered TWA (val %) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["live"]:
        stopped = (r["stopped_epoch"] if r["stopped_by"] else
                   "not stopped" if r["rule_fired"] is None else "ended first")
        fired = r["rule_fired"] if r["rule_fired"] is not None else "never"
        lines.append(f"| {r['seed']} | {fired} | {stopped} | {r['train_wall_seconds']:.0f} | "
                     f"{r['probes']}, {r['probe_seconds']:.0f} | {r['time_to_result_seconds']:.0f} | "
                     f"{r['full_train_seconds']:.0f} | {100 * r['wall_saved']:.0f}% | "
                     f"{_pct(r['wall_saved_same_load'])[:-3]}% | {r['core_seconds_saved']:.0f} | "
                     f"{_pct(r['twa_accuracy'])} ({r['twa_returned']}) |")
    if not res["live"]:
        lines.append("| (not run) | | | | | | | | | | |")
    px = res["proxy"]
    lines += ["", "## 4. The probe is a proxy: against what it stands for", ""]
    if px:
        worst = max(px, key=lambda p: abs(p["gap_points"]))
        lines += [f"Over {len(px)} (seed, head) points the probe (hold-out) minus the delivered TWA (val) is "
                  f"{_ms([p['gap_points'] for p in px])} points; the largest gap is {worst['gap_points']:+.2f} "
                  f"(seed {worst['seed']}, head {worst['head']}). The rule compares probes with probes, on the same "
                  "hold-out images, so a constant offset does not move a decision; a gap that changes with the head "
                  "would.", "", "![probe against delivered](proxy_vs_delivered.png)", ""]
    return "\n".join(lines)


def write_report(s: Setup, out: Path, work: Path, *, argv: Sequence[str]) -> None:
    res = summarize(s, work)
    _write_json(out / "results.json", res)
    plot(res, out / "proxy_vs_delivered.png")
    text = render(s, res, list(argv))
    disc = out / "discussion.md"
    if disc.is_file():
        text += "\n## Discussion\n\n" + disc.read_text()
    (out / "report.md").write_text(text + "\n")
    print(f"wrote {out / 'report.md'}")
    print(json.dumps(res.get("verdict"), indent=1))
