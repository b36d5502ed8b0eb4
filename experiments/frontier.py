"""The equal-compute frontier of experiments/reproduce.py (issue 18, item 2): accuracy against epochs spent.

    python experiments/reproduce.py --experiments head,frontier --seeds 0 1 2 --out bench/results/cpu-frontier

Per seed, on top of the head experiment's full E-epoch SGD run (`head-sS`, step schedule, one snapshot per epoch):

  frontier-twa-hH-sS  paper-mode TWA over the full run's snapshots of epochs 0..H (`--select-epochs 0:H`), T TWA
                      epochs: what a run stopped after H epochs delivers. H = E/2 is the head experiment's own
                      `head-paper-sS` (the same snapshots and settings), so it is not run twice.
  budget-eN-sS        SGD from scratch on an N = H + T epoch schedule (the same step rule, ÷10 at int(0.5N) and
                      int(0.75N + 0.9)): what the same compute buys without TWA.

Epochs spent: SGD epochs + TWA epochs. A TWA epoch is one pass over the training split with forward and backward
through the model, as an SGD epoch is, plus the projection (cheap on CPU at these sizes); the BatchNorm
recalibrations add about one pass per run. So H + T is a slight under-count of TWA's compute, stated as such.

A claim (TWA beats, or misses, a baseline at a budget) is stated only where the paired per-seed differences
agree in sign on every seed; otherwise the row says "no claim".
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

__all__ = ["heads", "summarize", "table", "claims", "plot", "render"]


def heads(epochs: int, explicit: Sequence[int] | None = None) -> list[int]:
    """Head lengths H of the grid: ``explicit``, else 30%, 50% and 70% of E (the paper's head is E/2)."""
    if explicit:
        return sorted(set(int(h) for h in explicit))
    return sorted({max(1, round(epochs * f)) for f in (0.3, 0.5, 0.7)})


def _stats(xs: Sequence[float]) -> dict:
    xs = [float(x) for x in xs]
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize(seeds: dict, *, epochs: int, twa_epochs: int, grid: Sequence[int]) -> dict:
    """Per (method, epochs spent): per-seed accuracies and their stats, from the reproduction's per-seed dict
    (``frontier`` entries written by reproduce.summarize, ``head`` and ``head_paper`` from the head experiment)."""
    T = twa_epochs
    points: dict[str, dict[int, dict[str, Any]]] = {"twa": {}, "swa": {}, "sgd_budget": {}, "sgd_full": {}}
    for s, d in sorted(seeds.items()):
        fr = d.get("frontier", {})
        for h in grid:
            r = (fr.get("twa") or {}).get(str(h))
            if r is not None:
                points["twa"].setdefault(h + T, {})[s] = {
                    "accuracy": r["twa_accuracy"], "returned": r.get("returned"), "lr_final": r.get("lr_final"),
                    "guard_attempts": r.get("guard_attempts", []), "fallback": r.get("fallback"), "head": h}
                if r.get("swa_accuracy") is not None:
                    points["swa"].setdefault(h, {})[s] = {"accuracy": r["swa_accuracy"], "head": h}
            n = h + T
            m = (fr.get("sgd") or {}).get(str(n)) if n != epochs else d.get("head")
            if m is not None and m.get("final_accuracy") is not None:
                points["sgd_budget"].setdefault(n, {})[s] = {"accuracy": m["final_accuracy"]}
        if (d.get("head") or {}).get("final_accuracy") is not None:
            points["sgd_full"].setdefault(epochs, {})[s] = {"accuracy": d["head"]["final_accuracy"]}
    out: dict[str, list[dict]] = {}
    for method, by_x in points.items():
        out[method] = [{"epochs_spent": x, "per_seed": per, **_stats([v["accuracy"] for v in per.values()])}
                       for x, per in sorted(by_x.items())]
    return out


def _paired(a: dict, b: dict) -> dict | None:
    """Per-seed differences a - b over the seeds both have; None when none."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    diffs = {s: a[s]["accuracy"] - b[s]["accuracy"] for s in common}
    signs = {(d > 0) - (d < 0) for d in diffs.values()}
    verdict = ("beats" if signs == {1} else "misses" if signs == {-1} else "no claim")
    return {"per_seed": diffs, "mean": statistics.fmean(diffs.values()), "min": min(diffs.values()),
            "max": max(diffs.values()), "n": len(common), "verdict": verdict}


def claims(summary: dict, *, epochs: int, twa_epochs: int) -> list[dict]:
    """For each head H: TWA (H + T epochs) against budget-matched SGD (H + T epochs from scratch), against the
    full run (E epochs) and against SWA over the same snapshots. A verdict only where every seed agrees."""
    sgd = {r["epochs_spent"]: r["per_seed"] for r in summary["sgd_budget"]}
    swa = {r["epochs_spent"]: r["per_seed"] for r in summary["swa"]}
    full = next(iter(r["per_seed"] for r in summary["sgd_full"]), {})
    out = []
    for r in summary["twa"]:
        x, twa = r["epochs_spent"], r["per_seed"]
        h = x - twa_epochs
        fallbacks = sorted(s for s, v in twa.items() if v.get("returned") == "start")
        out.append({"head": h, "epochs_spent": x, "epochs_saved_fraction": (epochs - x) / epochs,
                    "vs_budget_sgd": _paired(twa, sgd.get(x, {})), "vs_full_sgd": _paired(twa, full),
                    "vs_swa": _paired(twa, swa.get(h, {})), "fallback_seeds": fallbacks})
    return out


def table(summary: dict, cl: Sequence[dict], *, epochs: int, twa_epochs: int) -> list[str]:
    """Markdown: one row per head H."""
    def acc(rows, x):
        r = next((r for r in rows if r["epochs_spent"] == x), None)
        return "—" if r is None else f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} (n={r['n']})"

    def diff(p):
        if p is None:
            return "—"
        per = ", ".join(f"{100 * v:+.2f}" for _, v in sorted(p["per_seed"].items()))
        return f"{100 * p['mean']:+.2f} [{per}] **{p['verdict']}**"

    T = twa_epochs
    lines = [f"| head H | epochs spent | TWA H+{T} (%) | SGD on an (H+{T})-epoch schedule (%) | SWA 0..H (%) | "
             f"TWA − budget SGD, pts [per seed] | TWA − full SGD ({epochs} ep), pts [per seed] | "
             "TWA − SWA, pts [per seed] | returned (per seed), final lr |",
             "|---:|---:|---:|---:|---:|---|---|---|---|"]
    for c in cl:
        x, h = c["epochs_spent"], c["head"]
        twa_row = next(r for r in summary["twa"] if r["epochs_spent"] == x)
        ret = ", ".join(f"s{s}: {v['returned']} @ {v['lr_final']:g}" for s, v in sorted(twa_row["per_seed"].items()))
        flag = " **fallback on seed(s) " + ", ".join(c["fallback_seeds"]) + "**" if c["fallback_seeds"] else ""
        lines.append(f"| {h} | {x} | {acc(summary['twa'], x)} | {acc(summary['sgd_budget'], x)} | "
                     f"{acc(summary['swa'], h)} | {diff(c['vs_budget_sgd'])} | {diff(c['vs_full_sgd'])} | "
                     f"{diff(c['vs_swa'])} | {ret}{flag} |")
    full = summary["sgd_full"]
    if full:
        lines.append(f"\nFull SGD, {epochs} epochs: {acc(full, epochs)}.")
    return lines


def plot(summary: dict, path: Path, *, epochs: int, title: str) -> None:
    """Accuracy against epochs spent, one curve per method, mean with the seeds' min-max as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    style = {"twa": ("TWA over epochs 0..H, then T TWA epochs", "tab:red", "o"),
             "sgd_budget": ("SGD on an (H+T)-epoch schedule", "tab:blue", "s"),
             "swa": ("SWA over epochs 0..H (at H)", "tab:green", "^"),
             "sgd_full": (f"SGD, full {epochs}-epoch run", "black", "*")}
    for method, (label, color, marker) in style.items():
        rows = summary.get(method) or []
        if not rows:
            continue
        xs = [r["epochs_spent"] for r in rows]
        ys = [100 * r["mean"] for r in rows]
        err = [[100 * (r["mean"] - r["min"]) for r in rows], [100 * (r["max"] - r["mean"]) for r in rows]]
        ax.errorbar(xs, ys, yerr=err, label=label, color=color, marker=marker, capsize=3,
                    linestyle="none" if method == "sgd_full" else "-")
    ax.set_xlabel("epochs spent (SGD + TWA)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(summary: dict, cl: Sequence[dict], *, epochs: int, twa_epochs: int, seeds: Sequence[str]) -> list[str]:
    """The report's frontier section."""
    lines = ["## Equal-compute frontier", "",
             f"Seeds {', '.join(seeds)}. Each TWA row averages the full {epochs}-epoch run's snapshots of epochs "
             f"0..H and trains {twa_epochs} TWA epochs; it is compared, seed by seed, with SGD trained from scratch "
             f"on an (H+{twa_epochs})-epoch step schedule (the same compute), with the full run, and with SWA over "
             "the same snapshots. A verdict (beats / misses) is given only where the per-seed differences agree in "
             "sign on every seed. `returned: start` would mean every guarded lr failed and the model is the SWA "
             "start point; such rows are flagged.", "",
             *table(summary, cl, epochs=epochs, twa_epochs=twa_epochs), "",
             "![accuracy against epochs spent](frontier.png)", ""]
    return lines
