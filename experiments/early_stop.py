"""The early-stop experiment of experiments/reproduce.py (issue 11, item 4): does the live TWA follower save compute?

    python experiments/reproduce.py --experiments early-stop --out bench/results/cpu-early-stop

Per seed, the same SGD job twice (E epochs, the head run's step schedule, one snapshot per epoch), each with
a 1-rank follower (`launch/twa.py --follow`, the follower's default stop rule unless the preset says
otherwise) started beside it on the same machine:

  early-full-sS  training ignores the marker (`--no-obey-stop`); the follower still applies its rule, writes
                 STOP.json and keeps probing to the end (it only stops probing when training ends), so one
                 run gives where the rule fired, the TWA probe there, the full run's SGD accuracy and the
                 final TWA over every snapshot;
  early-obey-sS  training obeys the marker (its default): it ends at the first snapshot after the rule
                 fired, and the follower's final TWA over the snapshots so far is the run's result.

A pair (trainer + follower) is the unit of resumption: a finished one leaves work/done/<name>.json and is
skipped on a rerun; an interrupted one starts over from scratch (its store, checkpoints and probes
deleted), because a resumed run's wall clock would not compare with an uninterrupted one.

Other stop rules are replayed offline on the full runs' probes.json through the project's own
:meth:`StopRule.decide` (no retraining): the probe list and the SGD accuracy each probe saw are recorded.
Where a replayed rule would have stopped a run at epoch e < E, a TWA stage over the full run's snapshots
0..e (`early-replay-sS-eE`, the follower's final TWA settings) gives the validation accuracy the stopped run
would have delivered: the same seed trains the same snapshots, stopped or not.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from twa_scale.twa.config import TwaConfig
from twa_scale.twa.stoprule import ProbeView, StopRule, parse_stop_rule

__all__ = ["Pair", "plan_pairs", "follower_args", "run_pair", "run_summary", "render_probes", "summarize", "replay",
           "replay_grid", "plot", "render"]

REPO = Path(__file__).resolve().parents[1]
STOP_GRACE_SECONDS = 60.0  # a stopped process gets this long to flush before it is killed
# A replayed rule "holds" the accuracy when its probe is within this of the full run's last probe (the
# reproduction's tie band; the 2,000-image hold-out's own noise is about 1 point).
TIE_POINTS = 0.5
REPLAY_EPSILONS = (0.2, 0.5, 1.0, 2.0)
REPLAY_PATIENCES = (1, 2, 3, 4)


@dataclasses.dataclass
class Pair:
    name: str        # early-full-sS | early-obey-sS
    seed: int
    obey: bool
    run_id: str
    train: list[str]
    """Trainer arguments (launch/train.py)."""
    follow: list[str]
    """Follower arguments (launch/twa.py)."""
    checkpoint_dir: Path

    @property
    def args(self) -> dict[str, list[str]]:
        return {"train": self.train, "follow": self.follow}


def epochs_of(p) -> int:
    return p.early_stop_epochs or p.epochs


def plan_pairs(p, work: Path, *, common: list[str], store: str, twa_workers: int) -> list[Pair]:
    """Both runs of every seed. ``common``: the reproduction's training flags (data, model, store, hold-out)."""
    E = epochs_of(p)
    pairs = []
    for s in p.seeds:
        for obey in (False, True):
            name = f"early-{'obey' if obey else 'full'}-s{s}"
            ckpt = (work / "checkpoints" / name).resolve()
            # A pair starts over when interrupted, so no --resume; checkpoints stay local (same in both runs).
            train = [a for a in common if a != "--resume"]
            train += ["--seed", str(s), "--run-id", name, "--checkpoint-dir", str(ckpt), "--checkpoint-url", "none",
                      "--epochs", str(E), "--lr", f"{p.lr:g}", "--schedule", "step"]
            if not obey:
                train.append("--no-obey-stop")
            follow = follower_args(p, store=store, run_id=name, seed=s, twa_workers=twa_workers)
            pairs.append(Pair(name, s, obey, name, train, follow, ckpt))
    return pairs


def follower_args(p, *, store: str, run_id: str, seed: int, twa_workers: int) -> list[str]:
    """A follower of ``run_id`` (launch/twa.py --follow): the reproduction's final-TWA settings, then the preset's
    follower flags (``p.follow_args``; none: the follower's own defaults, its default stop rule included)."""
    follow = ["--follow", "--snapshot-url", store, "--run-id", run_id, "--seed", str(seed),
              "--epochs", str(p.twa_epochs), "--lr", f"{p.twa_lr:g}", "--schedule", "step",
              "--num-workers", str(twa_workers), "--no-plot"]
    if p.bn_batches is not None:
        follow += ["--bn-batches", str(p.bn_batches)]
    return follow + list(p.follow_args)


def commands(pair: Pair, ranks: int, command: Callable[[str, list[str], int], list[str]]) -> tuple[list, list]:
    """(trainer, follower) command lines: the trainer on ``ranks`` ranks, the follower on 1 (its own)."""
    return command("launch/train.py", pair.train, ranks), command("launch/twa.py", pair.follow, 1)


def rule_of(follow_args: Sequence[str]) -> StopRule:
    """The stop rule a follower with these flags applies (the follower's own defaults for flags not given)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TwaConfig)}

    def flag(name: str, key: str) -> Any:
        return follow_args[follow_args.index(name) + 1] if name in follow_args else defaults[key]

    return parse_stop_rule(str(flag("--stop-rule", "stop_rule")),
                           epsilon_points=float(flag("--stop-epsilon", "stop_epsilon")),
                           patience=int(flag("--stop-patience", "stop_patience")),
                           price_points=float(flag("--stop-price", "stop_price")),
                           at_phase_end="--stop-at-phase-end" in follow_args or (
                               defaults["stop_at_phase_end"] and "--no-stop-at-phase-end" not in follow_args))


# --- running a pair -----------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _paths(pair: Pair, work: Path) -> dict[str, Path]:
    run = work / "store" / pair.run_id
    return {"run": run, "metrics": run / "train" / "metrics.json", "probes": run / "twa" / "probes.json",
            "result": run / "twa" / "result.json", "stop": run / "control" / "STOP.json"}


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # the trainer flushes its snapshots on SIGTERM
        try:
            proc.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pair_env(env: dict[str, str], ranks: int) -> dict[str, str]:
    """The pair's environment: the trainer's ranks and the follower share the cores, so each process gets
    cores / (ranks + 1) OpenMP threads unless OMP_NUM_THREADS is set. Measured on 2 cores: two processes of
    2 threads each slowed an SGD epoch from 14 s to 80-110 s while a probe ran (threads spinning at barriers
    for a core the other process holds)."""
    return {**env, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // (ranks + 1)))}


def run_pair(pair: Pair, work: Path, *, cmds: tuple[list[str], list[str]], shown: Callable[[list[str]], str],
             env: dict[str, str], log=print, live: set | None = None,
             on_trained: Callable[[], None] | None = None) -> dict:
    """Run the trainer and its follower concurrently unless the pair's done-marker says it already finished.
    ``env``: see :func:`pair_env`. ``live``: the caller's set of running processes, which holds both while they
    run (a caller running pairs in threads stops them through it). ``on_trained``: called once the trainer has
    finished well, while the follower runs its final TWA (what reads only the run need not wait for that)."""
    marker = work / "done" / f"{pair.name}.json"
    done = _read_json(marker)
    if done is not None:
        if done.get("args") != pair.args:
            raise SystemExit(f"pair {pair.name} finished earlier with other arguments ({marker}); use another "
                             "--out, or delete that marker to redo the pair")
        log(f"[skip] {pair.name} (done in {done['seconds']:.0f}s)")
        return done
    paths = _paths(pair, work)
    # Interrupted earlier: start over (a leftover STOP.json would also stop the new run at snapshot 0).
    for stale in (paths["run"], pair.checkpoint_dir):
        shutil.rmtree(stale, ignore_errors=True)
    train_cmd, follow_cmd = cmds
    logs = {k: work / "logs" / f"{pair.name}-{k}.log" for k in ("train", "follow")}
    logs["train"].parent.mkdir(parents=True, exist_ok=True)
    log(f"[run ] {pair.name}: {shown(train_cmd)} & {shown(follow_cmd)}")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat()
    with open(logs["train"], "w") as ft, open(logs["follow"], "w") as ff:
        for f, cmd in ((ft, train_cmd), (ff, follow_cmd)):
            f.write(f"=== {stamp} {shown(cmd)}\n")
            f.flush()
        t0 = time.perf_counter()
        # The follower first: it waits for the run to appear, so it follows it from its first snapshot.
        follower = subprocess.Popen(follow_cmd, cwd=REPO, env=env, stdout=ff, stderr=subprocess.STDOUT)
        t_train = time.perf_counter()
        trainer = subprocess.Popen(train_cmd, cwd=REPO, env=env, stdout=ft, stderr=subprocess.STDOUT)
        live = set() if live is None else live
        live |= {follower, trainer}
        try:
            train_rc = trainer.wait()
            train_seconds = time.perf_counter() - t_train
            if train_rc != 0:  # the follower would wait out its --follow-timeout for a run that never ends
                _stop(follower)
            elif on_trained is not None and (_read_json(paths["metrics"]) or {}).get("final"):
                on_trained()
            follow_rc = follower.wait()
        except BaseException:  # SIGTERM (see reproduce.main) or Ctrl-C: stop both
            for proc in (trainer, follower):
                _stop(proc)
            raise
        finally:
            live -= {follower, trainer}
    seconds = time.perf_counter() - t0
    # The follower's final TWA always writes result.json (when every lr fails its guard, the stage returns
    # the start point and says so), so a missing result or a non-zero exit is a failure of the pair.
    missing = [k for k in ("metrics", "result") if _read_json(paths[k]) is None]
    if train_rc != 0 or follow_rc != 0 or missing \
            or not (_read_json(paths["metrics"]) or {}).get("final"):
        tails = "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").replace("\r", "\n")
                                                      .splitlines()[-20:]) for p in logs.values())
        raise SystemExit(f"pair {pair.name} failed (trainer exit {train_rc}, follower exit {follow_rc}"
                         f"{', missing ' + ', '.join(missing) if missing else ''}):\n{tails}")
    done = {"step": pair.name, "args": pair.args, "command": f"{shown(train_cmd)} & {shown(follow_cmd)}",
            "seconds": seconds, "train_seconds": train_seconds, "omp_num_threads": env.get("OMP_NUM_THREADS"),
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(done, indent=1))
    log(f"[done] {pair.name} in {seconds:.0f}s (trainer {train_seconds:.0f}s)")
    return done


# --- summary ------------------------------------------------------------------------------------------------
def _fired(probes: list[dict]) -> dict | None:
    """The first probe at which the run's rule said stop."""
    return next((q for q in probes if q.get("would_stop")), None)


def run_summary(pair: Pair, work: Path) -> dict | None:
    """One finished pair: its training, its follower's probes (each with its decision) and final TWA."""
    done = _read_json(work / "done" / f"{pair.name}.json")
    if done is None:
        return None
    paths = _paths(pair, work)
    m, result = _read_json(paths["metrics"]), _read_json(paths["result"]) or {}
    probes = (_read_json(paths["probes"]) or {}).get("probes", [])  # a ProbeLog record (twa_scale/store/format.py)
    final = m["final"]
    fired = _fired(probes)
    keep = ("probe", "epoch", "last_seq", "twa_accuracy", "swa_accuracy", "sgd_holdout_accuracy", "first_phase",
            "twa_correct", "would_stop", "stop_written", "decision", "statistic", "bound", "seconds")
    return {
        "sgd_accuracy": final["val_accuracy"],
        "epochs": [{k: r.get(k) for k in ("epoch", "val_accuracy", "seconds")} for r in m.get("epochs", [])],
        "epochs_trained": final.get("stopped_epoch", len(m.get("epochs", []))),
        "stopped_by": final.get("stopped_by"), "stop_reason": final.get("stop_reason"),
        "stopped_epoch": final.get("stopped_epoch"),
        "train_epoch_seconds": final.get("train_seconds"),
        "train_wall_seconds": done["train_seconds"], "pair_wall_seconds": done["seconds"],
        "omp_num_threads": done.get("omp_num_threads"),
        "probes": [{k: q.get(k) for k in keep} for q in probes],
        "rule": probes[0].get("rule") if probes else None,
        "rule_fired": None if fired is None else {k: fired.get(k) for k in keep},
        "stop_marker_written": paths["stop"].is_file(),
        "twa_accuracy": result.get("twa_accuracy"), "swa_accuracy": result.get("swa_accuracy"),
        "twa_returned": result.get("returned"),
        "twa_snapshots": len(result.get("snapshots", [])), "twa_seconds": (result.get("timings") or {}).get(
            "total_seconds"),
    }


def summarize(p, pairs: list[Pair], work: Path, replay_twa: dict[str, dict[int, float]] | None = None) -> dict:
    """Per seed: the full and the obeyed run, and what the obeyed run saved. ``replay_twa``: seed -> stop epoch
    -> validation accuracy of the TWA over the full run's snapshots to that epoch (the early-replay steps)."""
    E = epochs_of(p)
    seeds: dict[str, dict] = {}
    for pair in pairs:
        r = run_summary(pair, work)
        if r is not None:
            seeds.setdefault(str(pair.seed), {})["obey" if pair.obey else "full"] = r
    for d in seeds.values():
        full, obey = d.get("full"), d.get("obey")
        if full:
            f = full["rule_fired"]
            d["rule_epoch"] = f and f["epoch"]
            d["rule_probe_twa"] = f and f["twa_accuracy"]
        if full and obey:
            d["epochs_saved"] = E - obey["epochs_trained"]
            d["wall_saving"] = 1.0 - obey["train_wall_seconds"] / full["train_wall_seconds"]
            # time to a result: the obeyed run's training and its follower's final TWA, against full training
            d["result_wall_saving"] = 1.0 - obey["pair_wall_seconds"] / full["train_wall_seconds"]
            d["gap"] = (obey["twa_accuracy"] - full["sgd_accuracy"]) if obey["twa_accuracy"] is not None else None
    return {"epochs": E, "rule": _rule_name(rule_of(list(p.follow_args)), True), "seeds": seeds,
            "mean": _means(seeds), "replay": replay_grid(p, seeds, replay_twa or {})}


def _means(seeds: dict) -> dict:
    keys = {"rule_epoch": None, "rule_probe_twa": None, "epochs_saved": None, "wall_saving": None,
            "result_wall_saving": None, "gap": None, "full.sgd_accuracy": None, "full.twa_accuracy": None,
            "obey.twa_accuracy": None, "obey.epochs_trained": None, "full.train_wall_seconds": None,
            "obey.train_wall_seconds": None, "obey.pair_wall_seconds": None}
    for k in keys:
        head, _, tail = k.partition(".")
        vals = [(d.get(head) or {}).get(tail) if tail else d.get(head) for d in seeds.values()]
        vals = [v for v in vals if v is not None]
        keys[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                   "n": len(vals)} if vals else None
    return keys


# --- replay -------------------------------------------------------------------------------------------------
def replay(rule: StopRule, probes: list[dict], *, sgd_condition: bool = True) -> dict | None:
    """The first probe at which ``rule`` would have said stop, given the probes recorded so far (the project's
    own decide(), on the same hold-out views the follower gives it; ``sgd_condition`` False sets the SGD
    hold-out accuracy to 0, i.e. drops the TWA >= SGD check)."""
    views = [ProbeView.of(x) for x in probes]
    if not sgd_condition:
        views = [dataclasses.replace(v, sgd_accuracy=0.0) for v in views]
    for i, q in enumerate(probes):
        d = rule.decide(views[:i + 1])
        if d.stop:
            return {"probe": q["probe"], "epoch": q["epoch"], "twa_accuracy": q["twa_accuracy"], "decision": d.reason}
    return None


def replay_grid(p, seeds: dict, replay_twa: dict[str, dict[int, float]] | None = None) -> dict:
    """Every plateau rule of a small grid (and without its SGD condition), replayed on each full run's probes.

    A rule *holds* when on every seed it fires and the TWA over the snapshots to its stop (validation split:
    ``replay_twa``, or the full run's final TWA for a stop at the last epoch) is within TIE_POINTS of the full
    run's SGD accuracy: the paper's criterion. The best rule holds and saves the most epochs.
    """
    replay_twa = replay_twa or {}
    E = epochs_of(p)
    fulls = {s: d["full"] for s, d in seeds.items() if d.get("full") and d["full"]["probes"]}
    rows = []
    default = rule_of(list(p.follow_args))
    specs = [(default, True)] + [(StopRule("plateau", epsilon_points=e, patience=k), c)
                                 for c in (True, False) for k in REPLAY_PATIENCES for e in REPLAY_EPSILONS]
    seen = set()
    for rule, cond in specs:
        name = _rule_name(rule, cond)
        if name in seen:
            continue
        seen.add(name)
        per = {}
        for s, full in fulls.items():
            hit = replay(rule, full["probes"], sgd_condition=cond)
            last = full["probes"][-1]["twa_accuracy"]
            if hit:
                twa = full["twa_accuracy"] if hit["epoch"] >= E else replay_twa.get(s, {}).get(int(hit["epoch"]))
                final = full["twa_accuracy"]
                hit.update(epochs_saved=E - hit["epoch"],
                           gap_to_last_probe=None if last is None else hit["twa_accuracy"] - last, twa_val=twa,
                           gap_to_full_sgd=None if twa is None else twa - full["sgd_accuracy"],
                           gap_to_full_twa=None if twa is None or final is None else twa - final)
            per[s] = hit
        def within(key: str) -> bool:
            return bool(per) and all(h and h[key] is not None and h[key] >= -TIE_POINTS / 100 for h in per.values())

        holds, holds_twa = within("gap_to_full_sgd"), within("gap_to_full_twa")
        saved = [h["epochs_saved"] for h in per.values() if h]
        rows.append({"rule": name, "default": rule == default and cond, "per_seed": per, "holds": holds,
                     "holds_twa": holds_twa,
                     "fires_on": len(saved), "epochs_saved_mean": statistics.fmean(saved) if saved else 0.0,
                     "epsilon_points": rule.epsilon_points, "patience": rule.patience, "sgd_condition": cond})
    # Among rules that save as much, the run's own, then the most conservative (small epsilon, long patience).
    def pick(flag: str) -> str | None:
        best = max((r for r in rows if r[flag] and r["epochs_saved_mean"] > 0), default=None, key=lambda r: (
            r["epochs_saved_mean"], r["default"], r["sgd_condition"], -r["epsilon_points"], r["patience"]))
        return best and best["rule"]

    # best: stops early and matches full SGD (the paper's claim); best_vs_twa: stops early and costs the
    # follower's own final TWA nothing (what a stop rule alone can be asked for)
    return {"rows": rows, "best": pick("holds"), "best_vs_twa": pick("holds_twa"), "tie_points": TIE_POINTS,
            "recorded_matches_replay": all(
                (seeds[s]["full"]["rule_fired"] or {}).get("probe") == (rows[0]["per_seed"][s] or {}).get("probe")
                for s in fulls)}


def replay_epochs(es: dict, *, limit: int) -> dict[str, list[int]]:
    """Per seed, the epochs < E at which some replayed rule stops the full run (earliest first, at most
    ``limit``): the early-replay TWA steps to run."""
    out: dict[str, list[int]] = {}
    for row in es["replay"]["rows"]:
        for s, h in row["per_seed"].items():
            if h and h["epoch"] < es["epochs"]:
                out.setdefault(s, [])
                if int(h["epoch"]) not in out[s]:
                    out[s].append(int(h["epoch"]))
    return {s: sorted(v)[:limit] for s, v in sorted(out.items())}


def _rule_name(rule: StopRule, sgd_condition: bool) -> str:
    if rule.kind == "gain":
        return f"gain price={rule.price_points:g}" + ("" if sgd_condition else ", no TWA>=SGD check")
    if rule.kind != "plateau":
        return rule.name
    return (f"plateau eps={rule.epsilon_points:g} P={rule.patience}"
            + ("" if sgd_condition else ", no TWA>=SGD check"))


# --- plot ---------------------------------------------------------------------------------------------------
def plot(p, es: dict, path: Path) -> None:
    """Per seed: TWA and SWA probes (hold-out) against epoch beside SGD val accuracy, the rule's epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(es["seeds"].items())
    fig, axes = plt.subplots(1, max(1, len(seeds)), figsize=(6.2 * max(1, len(seeds)), 4.4), squeeze=False)
    for ax, (s, d) in zip(axes[0], seeds):
        full, obey = d.get("full"), d.get("obey")
        for run, style, tag in ((full, "-", "full run"), (obey, ":", "obeyed run")):
            if not run:
                continue
            ep = [r for r in run["epochs"] if r["val_accuracy"] is not None]
            ax.plot([r["epoch"] for r in ep], [r["val_accuracy"] for r in ep], color="k" if run is full else "0.5",
                    ls=style, marker=".", ms=4, label=f"SGD val, {tag}")
            for key, color, label in (("twa_accuracy", "C0", "TWA probe"), ("swa_accuracy", "C1", "SWA probe")):
                pts = [(q["epoch"], q[key]) for q in run["probes"] if q[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), color=color, ls=style, marker="o" if run is full else "x", ms=4,
                            label=f"{label} (hold-out), {tag}")
        if d.get("rule_epoch") is not None:
            ax.axvline(d["rule_epoch"], color="C3", ls="--", lw=1.2,
                       label=f"rule fired (full run): epoch {d['rule_epoch']:g}")
        elif full:
            ax.plot([], [], " ", label=f"{es['rule']}: never fired")
        shown = es["replay"]["best"] or es["replay"]["best_vs_twa"]
        best = next((r for r in es["replay"]["rows"] if r["rule"] == shown), None)
        hit = best and best["per_seed"].get(s)
        if hit:
            ax.axvline(hit["epoch"], color="C4", ls="-.", lw=1.2,
                       label=f"replayed {best['rule']}: epoch {hit['epoch']:g}")
            if hit.get("twa_val") is not None:
                ax.plot([hit["epoch"]], [hit["twa_val"]], marker="D", color="C4", ms=8, ls="none",
                        label=f"TWA (val) to epoch {hit['epoch']:g}: {100 * hit['twa_val']:.2f}%")
        if obey and obey.get("stopped_epoch") is not None:
            ax.axvline(obey["stopped_epoch"], color="C3", ls=":", lw=1.2,
                       label=f"obeyed run stopped: epoch {obey['stopped_epoch']:g}")
        for run, marker, tag in ((full, "*", "final TWA (val), full"), (obey, "P", "final TWA (val), obeyed")):
            if run and run.get("twa_accuracy") is not None:
                x = run["stopped_epoch"] if run.get("stopped_epoch") is not None else es["epochs"]
                ax.plot([x], [run["twa_accuracy"]], marker=marker, color="C2", ms=11, ls="none",
                        label=f"{tag}: {100 * run['twa_accuracy']:.2f}%")
        ax.set_title(f"seed {s}: {es['rule']} rule, {p.model}, {p.limit_train or 'all'} images", fontsize=9)
        ax.set_xlabel("training epoch")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- report -------------------------------------------------------------------------------------------------
def _pct(x: float | None, unit: str = "") -> str:
    return "n/a" if x is None else f"{100 * x:.2f}{unit}"


def _ms(m: dict | None, scale: float = 100.0, fmt: str = ".2f") -> str:
    return "n/a" if not m else f"{scale * m['mean']:{fmt}} ± {scale * m['std']:{fmt.lstrip('+')}}"


def render(p, es: dict, ranks: int) -> list[str]:
    """The report's early-stop section (markdown lines)."""
    E, seeds, mean = es["epochs"], es["seeds"], es["mean"]
    follow_extra = f" (preset follower flags: `{shlex.join(p.follow_args)}`)" if p.follow_args else \
        " (the follower's defaults: probe every 2 snapshots, 100 probe steps, BatchNorm on 20 batches)"
    lines = ["## Early stop: does the live TWA follower save compute?", "",
             f"Per seed, the same SGD run ({p.model}, {E} epochs"
             f"{' (--early-stop-epochs)' if p.early_stop_epochs else ''}, lr {p.lr:g}, step schedule ÷10 after "
             f"epochs {int(0.5 * E)} and {int(0.75 * E + 0.9)}, one snapshot per epoch, hold-out "
             f"{p.holdout_fraction:g}) twice, each with a 1-rank follower (`launch/twa.py --follow`) started beside "
             f"it, with stop rule `{es['rule']}`{follow_extra}; the follower's final TWA is paper mode over every "
             f"snapshot so far ({p.twa_epochs} TWA epochs, lr {p.twa_lr:g}). The **full** run ignores the marker "
             "(`--no-obey-stop`): the follower still writes STOP.json and keeps probing to the end, which gives "
             "where the rule fired and the probe curve over all epochs. The **obeyed** run ends at the snapshot "
             "after the marker. Probes are evaluated on the hold-out split, the SGD and final TWA numbers on the "
             f"validation split ({p.limit_val or 'all'} images).", "",
             f"Wall clock: the trainer process's wall time ({ranks} rank(s), start-up included). In both runs the "
             f"follower runs beside the trainer on the same {os.cpu_count()} cores and competes with it, so the two "
             "are measured under equal conditions but absolute times are inflated against training alone "
             f"(OpenMP threads per process: {_threads(seeds)}, so that the two do not oversubscribe the cores). "
             "*Time to a result* adds the obeyed run's final TWA (the follower ends after it).", "",
             "| seed | rule fired (full run): epoch | TWA probe there (hold-out, %) | full SGD (val, %) | "
             "full-run final TWA (val, %) | obeyed: stopped at epoch | obeyed final TWA (val, %) | epochs saved | "
             "trainer wall full → obeyed (s) | wall saved | time to a result saved | gap: obeyed TWA − full SGD "
             "(pts) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s, d in sorted(seeds.items()):
        full, obey = d.get("full") or {}, d.get("obey") or {}
        stopped = obey.get("stopped_epoch")
        lines.append(
            f"| {s} | {'never' if full and d.get('rule_epoch') is None else _num(d.get('rule_epoch'))} | "
            f"{_pct(d.get('rule_probe_twa'))} | {_pct(full.get('sgd_accuracy'))} | {_pct(full.get('twa_accuracy'))} | "
            f"{_num(stopped) if stopped is not None else ('not stopped' if obey else 'n/a')} | "
            f"{_pct(obey.get('twa_accuracy'))} | {_num(d.get('epochs_saved'))} | "
            f"{_num(full.get('train_wall_seconds'), '.0f')} → {_num(obey.get('train_wall_seconds'), '.0f')} | "
            f"{_pct(d.get('wall_saving'), '%')} | {_pct(d.get('result_wall_saving'), '%')} | "
            f"{_signed(d.get('gap'))} |")
    if seeds:
        lines.append(
            f"| mean ± std | {_ms(mean['rule_epoch'], 1, '.1f')} | {_ms(mean['rule_probe_twa'])} | "
            f"{_ms(mean['full.sgd_accuracy'])} | {_ms(mean['full.twa_accuracy'])} | "
            f"{_ms(mean['obey.epochs_trained'], 1, '.1f')} | {_ms(mean['obey.twa_accuracy'])} | "
            f"{_ms(mean['epochs_saved'], 1, '.1f')} | {_ms(mean['full.train_wall_seconds'], 1, '.0f')} → "
            f"{_ms(mean['obey.train_wall_seconds'], 1, '.0f')} | {_ms(mean['wall_saving'], 100, '.1f')}% | "
            f"{_ms(mean['result_wall_saving'], 100, '.1f')}% | {_ms(mean['gap'], 100, '+.2f')} |")
    lines += ["", *_verdicts(es), "", "![probe accuracy against epoch](early_stop.png)", ""]
    lines += _replay_lines(es)
    return lines


def render_probes(run: dict, *, title: str, intro: str) -> list[str]:
    """A section on one follower (a :func:`run_summary`): where its rule fired, and every probe with its decision."""
    fired = run.get("rule_fired")
    lines = [f"## {title}", "", intro, "",
             f"Rule `{run.get('rule') or 'n/a'}`: "
             + (f"**fired at epoch {fired['epoch']:g}** (probe {fired['probe']}, snapshot seq {fired['last_seq']}, "
                f"TWA probe {_pct(fired['twa_accuracy'])}% on the hold-out): {fired['decision']}." if fired else
                f"**never fired** in {len(run['probes'])} probe(s).")
             + f" The follower's final TWA over all {run.get('twa_snapshots')} snapshots: "
               f"{_pct(run.get('twa_accuracy'))}% on val (returned: {run.get('twa_returned')}), against "
               f"{_pct(run.get('sgd_accuracy'))}% for the run's last SGD point.", "",
             "| probe | epoch | seq | TWA probe (hold-out, %) | SGD snapshot (hold-out, %) | first lr phase | "
             "statistic (pts/epoch) | 95% bound | stop | decision |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---|---|"]
    for q in run["probes"]:
        lines.append(f"| {q['probe']} | {_num(q['epoch'])} | {_num(q['last_seq'])} | {_pct(q['twa_accuracy'])} | "
                     f"{_pct(q['sgd_holdout_accuracy'])} | {'yes' if q.get('first_phase') else 'no'} | "
                     f"{_num(q.get('statistic'), '+.2f')} | {_num(q.get('bound'), '+.2f')} | "
                     f"{'**yes**' if q.get('would_stop') else 'no'} | {q.get('decision') or ''} |")
    return lines


def _verdicts(es: dict) -> list[str]:
    """Factual sentences on the default rule, from the numbers."""
    out = []
    for s, d in sorted(es["seeds"].items()):
        full, obey = d.get("full"), d.get("obey")
        for tag, run in (("full", full), ("obeyed", obey)):
            if run and run.get("twa_returned") == "start":
                out.append(f"- Seed {s}, {tag} run: every lr of the follower's final TWA failed its guard; it "
                           "returned the start point (SWA).")
        if not full:
            continue
        if d.get("rule_epoch") is None:
            then = "" if not obey else (
                f"; the obeyed run trained all {es['epochs']} epochs" if obey.get("stopped_by") is None else
                f"; the obeyed run was stopped at epoch {obey['stopped_epoch']:g} by {obey['stopped_by']}")
            out.append(f"- Seed {s}: the rule `{es['rule']}` never fired in the full run "
                       f"({len(full['probes'])} probes){then}.")
            continue
        last = full["probes"][-1]["twa_accuracy"]
        gap_probe = None if last is None else d["rule_probe_twa"] - last
        text = (f"- Seed {s}: the rule fired at epoch {d['rule_epoch']:g} of {es['epochs']} with a TWA probe of "
                f"{_pct(d['rule_probe_twa'])}% (the full run's last probe: {_pct(last)}%, "
                f"{_signed(gap_probe)} pts).")
        if obey:
            if obey.get("stopped_by") == "twa":
                text += (f" The obeyed run stopped at epoch {obey['stopped_epoch']:g} ({d['epochs_saved']:g} epochs "
                         f"saved, {100 * d['wall_saving']:.1f}% of the trainer's wall time) and its final TWA "
                         f"reached {_pct(obey['twa_accuracy'])}% against {_pct(full['sgd_accuracy'])}% for full SGD "
                         f"({_signed(d['gap'])} pts).")
            elif obey.get("rule_fired"):
                text += " In the obeyed run the rule fired too late: training had ended before it read the marker."
            else:
                text += " In the obeyed run the rule did not fire (its probes differ in timing and SGD accuracy)."
        out.append(text)
    return out


def _replay_lines(es: dict) -> list[str]:
    rp = es["replay"]
    if not rp["rows"]:
        return []
    seeds = sorted({s for r in rp["rows"] for s in r["per_seed"]})
    lines = ["### Other stop rules, replayed on the full runs' probes", "",
             "The project's `StopRule.decide` on each full run's probes.json (the TWA probes and the SGD accuracy "
             "each probe saw), no retraining. At each stop, *TWA val* is the TWA stage over the full run's snapshots "
             "up to that epoch (step `early-replay-sS-eE`, the follower's final-TWA settings; at the last epoch, "
             "the full run's final TWA): what the follower would have delivered. *Holds*: fires on every seed with "
             f"TWA val within {rp['tie_points']:g} pts of that seed's full SGD accuracy (or above it); *holds vs "
             "TWA*: the same against the full run's final TWA (the stop costs TWA nothing). Epochs saved "
             "count from the probe's epoch; an obeyed run stops a snapshot or two later (the probe's latency). "
             + ("The replay of the run's rule fires at the same probe as the run did."
                if rp["recorded_matches_replay"] else
                "**The replay of the run's rule does not fire where the run did** (check the records)."), "",
             "| rule | " + " | ".join(f"seed {s}: epoch, probe %, TWA val % (Δ full SGD)" for s in seeds)
             + " | epochs saved (mean) | holds | holds vs TWA |",
             "|---|" + "---:|" * len(seeds) + "---:|---|---|"]
    never = [r["rule"] for r in rp["rows"] if not r["fires_on"] and not r["default"]]
    for r in rp["rows"]:
        if r["rule"] in never:
            continue
        cells = []
        for s in seeds:
            h = r["per_seed"].get(s)
            cells.append("never" if not h else f"{h['epoch']:g}, {_pct(h['twa_accuracy'])}, "
                                               f"{_pct(h.get('twa_val'))} ({_signed(h.get('gap_to_full_sgd'))})")
        name = f"**{r['rule']}** (the run's)" if r["default"] else r["rule"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['epochs_saved_mean']:.1f} | "
                     f"{'yes' if r['holds'] else 'no'} | {'yes' if r['holds_twa'] else 'no'} |")
    if never:
        lines += ["", f"Never fired on any seed: {', '.join(f'`{n}`' for n in never)}."]
    default = next((r for r in rp["rows"] if r["default"]), None)
    best = next((r for r in rp["rows"] if r["rule"] == rp["best"]), None)
    lines.append("")
    best_twa = next((r for r in rp["rows"] if r["rule"] == rp["best_vs_twa"]), None)
    if best_twa is not None:
        lines.append(f"Best replayed rule against the follower's own final TWA: `{best_twa['rule']}`, "
                     f"{best_twa['epochs_saved_mean']:.1f} epochs saved on average with no TWA accuracy lost "
                     f"(the run's rule: {default['epochs_saved_mean']:.1f} epochs saved).")
    if best is None:
        lines.append("No replayed rule stops early and holds the full SGD accuracy on every seed.")
    elif default is not None and best["rule"] == default["rule"]:
        lines.append(f"The run's rule is also the best replayed one: `{best['rule']}`.")
    else:
        lines.append(f"Best replayed rule: `{best['rule']}`, {best['epochs_saved_mean']:.1f} epochs saved on average "
                     f"(the run's rule: {default['epochs_saved_mean']:.1f}, "
                     f"{'holds' if default['holds'] else 'does not hold'}). Chosen on "
                     f"{len(seeds)} seed(s): a hint, not a tuned default.")
    return lines


def _num(x: Any, fmt: str = "g") -> str:
    return "n/a" if x is None else format(x, fmt)


def _threads(seeds: dict) -> str:
    got = {r.get("omp_num_threads") for d in seeds.values() for r in (d.get("full"), d.get("obey")) if r}
    return ", ".join(sorted(str(t) for t in got)) or "n/a"


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}"


if __name__ == "__main__":  # a module of experiments/reproduce.py
    sys.exit("run `python experiments/reproduce.py --experiments early-stop --out DIR`")
