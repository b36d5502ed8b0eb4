"""Does TWA deliver? Reproduce the paper's head-stage and tail-stage claims on real CIFAR-10.

    python experiments/reproduce.py --out bench/results/cpu             # CPU preset: ResNet-20, 10k images, 2 seeds
    python experiments/reproduce.py --gpu --out bench/results/gpu       # the paper's recipe: VGG16-BN, 200 epochs
    python experiments/reproduce.py --smoke --out /tmp/twa-smoke        # the test suite's tiny run
    python experiments/reproduce.py --out bench/results/cpu --report-only   # rebuild report.md from finished steps
    python experiments/reproduce.py --out DIR --dry-run                 # print the commands, run nothing
    python experiments/reproduce.py --out bench/results/cpu-k5 --snapshots-per-epoch 5 --experiments head
                                                                  # the paper's density: K=5 against K=1
    python experiments/reproduce.py --out bench/results/cpu-early-stop --experiments early-stop
                                                                  # live TWA: does its stop save compute?
    python experiments/reproduce.py --out bench/results/cpu-frontier --experiments head,frontier --seeds 0 1 2
                                                                  # accuracy against epochs spent
    python experiments/reproduce.py --gpu --model resnet20 --epochs 40 --snapshots-per-epoch 5 --seeds 0 \
        --twa-epochs 2 --experiments head,frontier --frontier-heads 16 20 24 --follow-head --jobs 4 --out DIR
                                    # the GPU science run (bash bench/gpu_acceptance.sh --science OUT_DIR)

Every step is one of the project's own commands, run as a subprocess:
`python launch/train.py ...` / `python launch/twa.py ...` (or `deepspeed --num_gpus N ...` with --ranks N).
Per seed:
  head        E epochs, step schedule (the authors' epoch-wise MultiStepLR: ÷10 after epochs int(0.5E) and
              int(0.75E + 0.9)), K snapshots per epoch (--snapshots-per-epoch, default 1);
  head-paper  TWA (paper mode) over every snapshot up to epoch E/2 (`--select 0:E/2+1`; with K > 1
              `--select-epochs 0:E/2`), T TWA epochs;
  head-paper-k1  with K > 1: the same over the epoch-end snapshots only (`--select 0:K*E/2+1:K`), i.e. what
              a K = 1 run gives, from the same SGD trajectory (snapshots do not change training);
  head-paper-periter  with K > 1: head-paper with the per-iteration cut (`--schedule step-per-iter`,
              ÷10 at 50% and 75% of the steps) instead of the authors' epoch-wise one: at T = 2 TWA
              epochs, the second epoch runs at lr/10 (epoch-wise) or lr/10 then lr/100 (per step);
  head-twav   TWA-v (journal mode: centred, layer-wise, AdamW + cosine, fitted on the hold-out);
  tail-lrX    K more epochs from the head run's final snapshot at a constant learning rate X
              (`--init-from ... --schedule constant`), for each X in --swa-lrs;
  tail-twa-lrX TWA over the tail's K+1 snapshots, from the tail's last snapshot as the authors do
              (`--tail-start swa`: from their uniform mean);
  tail-swa-lrX with the default `--tail-start last`: SWA of the same snapshots (`--epochs 0`, BatchNorm recomputed);
  frontier    (opt-in) per head length H, TWA over epochs 0..H + T TWA epochs against SGD trained on an
              (H+T)-epoch schedule: accuracy against epochs spent (experiments/frontier.py);
  early-stop  (opt-in) per seed, an E-epoch run with a live TWA follower beside it that records where its stop
              rule fires without being obeyed, and the same run obeying it (experiments/early_stop.py).
All runs train with the same --holdout-fraction, so they are comparable and TWA-v has a split to fit on.
With --follow-head each head run trains beside a record-only live follower (`launch/twa.py --follow`, its
default stop rule; the trainer runs --no-obey-stop), and the report lists every probe with its decision.
--jobs N runs up to N steps at once (one GPU is mostly idle under a small model): a TWA step starts once the
run it reads has finished training, and a failed step stops only the steps that need it.

Resumable: a finished step leaves work/done/<step>.json and is skipped on a rerun (a rerun with a
different command for that step stops with an error); a training step killed midway continues
through `--resume` from its DeepSpeed checkpoint. Outputs in --out: results.json (all numbers),
report.md, accuracy_vs_epoch.png, coefficients.png (early_stop.png with early-stop). Bulky state
(snapshot store, checkpoints, logs) goes to --out/work, which carries its own .gitignore. A hand-written
discussion.md in --out is appended to report.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import fnmatch
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import early_stop  # experiments/early_stop.py: the early-stop experiment
import frontier  # experiments/frontier.py: accuracy against epochs spent, TWA against budget-matched SGD

REPO = Path(__file__).resolve().parents[1]
STOP_GRACE_SECONDS = 60.0  # a stopped step gets this long to flush before it is killed
DEFAULT_DATA = str((REPO.parent / "shared" / "datasets" / "cifar10").resolve())

__all__ = ["Preset", "cpu_preset", "gpu_preset", "smoke_preset", "PRESETS", "plan_steps", "summarize",
           "build_table", "main"]


# --- presets ------------------------------------------------------------------------------------
@dataclasses.dataclass(kw_only=True)
class Preset:
    name: str
    model: str
    """Model name (twa_scale.models)."""
    epochs: int
    """E: epochs of the full (head) run."""
    lr: float = 0.1
    """Peak SGD learning rate of the head run (paper: 0.1)."""
    weight_decay: float = 1e-4
    """SGD weight decay (the paper code's default, 1e-4)."""
    batch_size: int = 128
    limit_train: int | None = None
    limit_val: int | None = None
    holdout_fraction: float = 0.1
    """Fraction of the full training split held out (before --limit-train) for TWA-v; used by every run."""
    twa_epochs: int = 10
    """T: TWA epochs for every TWA run (paper: 10 on CIFAR)."""
    twa_lr: float = 2.0
    """Paper-mode TWA learning rate (paper: 2 on CIFAR)."""
    tail_twa_weight_decay: float = 5e-5
    tail_start: str = "last"
    """Where tail TWA starts: `last`, the tail's final snapshot, as the authors' swa/run_twa.sh
    (--train_start 225 of --params_start 126 --params_end 226); `swa`, the uniform mean of the tail."""
    """Paper-mode TWA weight decay in the tail stage (the authors' tail script uses 5e-5)."""
    tail_epochs: int = 100
    """K: tail epochs at a constant learning rate, from the head run's final snapshot."""
    swa_lrs: tuple[float, ...] = (0.05, 0.1)
    """Constant tail learning rates (the SWA paper's CIFAR swa_lr 0.05, and 0.1)."""
    seeds: tuple[int, ...] = (0, 1)
    snapshots_per_epoch: int = 1
    """K: snapshots per epoch of the head run (the authors' ImageNet script: 5)."""
    experiments: tuple[str, ...] = ("head", "twav", "tail")
    """Which parts run: head (SGD + paper-mode TWA), twav (journal TWA-v on the head), tail (SWA vs TWA),
    early-stop (live TWA follower beside training, its stop recorded and then obeyed; opt-in)."""
    frontier_heads: tuple[int, ...] | None = None
    """Frontier: head lengths H (None: 30%, 50% and 70% of E); each gets a TWA over epochs 0..H and SGD on an
    (H+T)-epoch schedule."""
    early_stop_epochs: int | None = None
    """Epochs of the early-stop runs (None: `epochs`; a smaller E is a documented shortcut, in the report)."""
    follow_args: tuple[str, ...] = ()
    """Extra flags of every follower (early-stop, --follow-head); empty: its defaults, so the default stop rule is
    measured."""
    follow_head: bool = False
    """The head run trains beside a live follower (`launch/twa.py --follow`, record-only: the trainer runs
    `--no-obey-stop` to the end), whose probes and stop decisions go into the report."""
    replay_twa_max: int = 4
    """Early-stop: per seed, at most this many epochs where a replayed rule stops get a TWA run (earliest first)."""
    num_workers: int | None = None
    """DataLoader workers per rank (None: the trainer's default, and min(4, CPUs per rank - 1) for TWA)."""
    bn_batches: int | None = None
    """Batches for each BatchNorm recalibration in the TWA stage (None: a full pass, as in the paper)."""
    data: str = DEFAULT_DATA

    def __post_init__(self) -> None:
        if self.epochs < 2:
            raise ValueError(f"--epochs: need >= 2 for a half-way point, got {self.epochs}")
        if self.tail_epochs < 1:
            raise ValueError(f"--tail-epochs: must be >= 1, got {self.tail_epochs}")
        if self.twa_epochs < 1:
            raise ValueError(f"--twa-epochs: must be >= 1, got {self.twa_epochs}")
        if not self.seeds:
            raise ValueError("--seeds: give at least one seed")
        if self.tail_start not in ("last", "swa"):
            raise ValueError(f"--tail-start: must be last or swa, got {self.tail_start!r}")
        if self.snapshots_per_epoch < 1:
            raise ValueError(f"--snapshots-per-epoch: must be >= 1, got {self.snapshots_per_epoch}")
        unknown = set(self.experiments) - {"head", "twav", "tail", "frontier", "early-stop"}
        if unknown or not self.experiments or ({"twav", "tail", "frontier"} & set(self.experiments)
                                                and "head" not in self.experiments):
            raise ValueError(f"--experiments {','.join(self.experiments)}: choose from head,twav,tail,frontier,"
                             "early-stop (twav, tail and frontier need head)")
        if self.frontier_heads is not None and not all(1 <= h < self.epochs for h in self.frontier_heads):
            raise ValueError(f"--frontier-heads: each H must be in [1, {self.epochs}), got {list(self.frontier_heads)}")
        if self.early_stop_epochs is not None and self.early_stop_epochs < 2:
            raise ValueError(f"--early-stop-epochs: need >= 2, got {self.early_stop_epochs}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"--holdout-fraction: TWA-v needs a hold-out in (0, 1), got {self.holdout_fraction}")

    @property
    def half(self) -> int:
        return self.epochs // 2


def cpu_preset() -> Preset:
    """≤ 60 min on 2 CPU cores: ResNet-20 on a fixed 10k-image CIFAR-10 subset, E=20, T=2, K=5, 2 seeds.

    Measured on the 2-core dev box: one SGD epoch (train + eval on 2k images) 20.3 s for 8k images at load
    ~1.7 and 31.5 s for 10k at load ~4; one paper-mode TWA run (2 epochs on 8k, 2 BatchNorm passes of
    20 batches) 47 s. Scaled to 10k images and full BatchNorm passes: ≈ 17 min per seed (60 s of it
    process start-up), ≈ 35 min for 2 seeds on an idle machine, ≈ 45 min at load ~4.
    Hold-out 0.04 = 2,000 images of the 50k split, excluded from every run's training.
    """
    return Preset(name="cpu", model="resnet20", epochs=20, limit_train=10_000, limit_val=2_000,
                  holdout_fraction=0.04, twa_epochs=2, tail_epochs=5, swa_lrs=(0.05, 0.1), seeds=(0, 1))


def gpu_preset() -> Preset:
    """The paper's CIFAR-10 recipe: VGG16-BN, 200 epochs, full data, TWA 10 epochs at lr 2, 100-epoch tails."""
    return Preset(name="gpu", model="cifar_vgg16_bn", epochs=200, holdout_fraction=0.1, twa_epochs=10,
                  tail_epochs=100, swa_lrs=(0.05, 0.1), seeds=(0, 1))


def smoke_preset() -> Preset:
    """Tests only: 2 epochs on 256 images, one seed, one tail learning rate.

    Its early-stop runs train 12 epochs (0.5 s each) beside a follower that probes at every snapshot, briefly, with a
    target rule every probe meets: the stop path runs end to end in seconds.
    """
    return Preset(name="smoke", model="resnet20", epochs=2, limit_train=256, limit_val=256,
                  holdout_fraction=0.005, twa_epochs=1, tail_epochs=1, swa_lrs=(0.05,), seeds=(0,), num_workers=0,
                  early_stop_epochs=12, replay_twa_max=1,
                  follow_args=("--probe-every", "1", "--probe-steps", "2", "--probe-bn-batches", "1", "--bn-batches",
                               "1", "--poll-seconds", "0.2", "--follow-timeout", "300", "--stop-rule", "target:0.01"))


PRESETS = {"cpu": cpu_preset, "gpu": gpu_preset, "smoke": smoke_preset}


# --- steps --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Step:
    name: str
    kind: str  # "train" | "twa"
    script: str
    args: list[str]
    seed: int
    role: str  # head | head-paper | head-twav | tail | tail-twa | tail-swa | frontier-twa | budget
    swa_lr: float | None = None
    head: int | None = None
    """Frontier: H of a frontier-twa step, H + T of a budget step."""
    run_id: str | None = None
    output: str | None = None
    """TWA output URL."""
    needs: tuple[str, ...] = ()
    """Steps whose output this one reads (with --jobs it starts once they have finished)."""
    follow: list[str] | None = None
    """A training step's follower arguments (launch/twa.py --follow), run beside it as an early_stop.Pair."""


def _lr_tag(lr: float) -> str:
    return f"{lr:g}"


def train_common(p: Preset, work: Path, *, ranks: int = 1) -> tuple[str, list[str]]:
    """The snapshot store's URL and the training flags every run shares (data, model, hold-out, store)."""
    store = "file://" + str((work / "store").resolve())
    # --preset none: this experiment's own recipe over the dataclass defaults, not the quickstart's
    common = ["--preset", "none", "--model", p.model, "--data", p.data, "--weight-decay", f"{p.weight_decay:g}",
              "--batch-size", str(p.batch_size), "--holdout-fraction", f"{p.holdout_fraction:g}",
              "--snapshot-url", store, "--snapshot-every", "1", "--resume"]
    if ranks > 1:
        if p.batch_size % ranks:
            raise ValueError(f"--ranks {ranks}: batch {p.batch_size} does not divide over the ranks")
        common += ["--micro-batch", str(p.batch_size // ranks)]
    for flag, v in (("--limit-train", p.limit_train), ("--limit-val", p.limit_val), ("--num-workers", p.num_workers)):
        if v is not None:
            common += [flag, str(v)]
    return store, common


def twa_workers(p: Preset, ranks: int) -> int:
    # The TWA stage loads in the main process by default; a worker overlaps JPEG decoding with compute.
    return p.num_workers if p.num_workers is not None else max(0, min(4, (os.cpu_count() or 1) // ranks - 1))


def plan_pairs(p: Preset, work: Path, *, ranks: int = 1) -> list[early_stop.Pair]:
    """The early-stop experiment's trainer + follower pairs (none unless it is selected)."""
    if "early-stop" not in p.experiments:
        return []
    store, common = train_common(p, work, ranks=ranks)
    return early_stop.plan_pairs(p, work, common=common, store=store, twa_workers=twa_workers(p, 1))


def twa_step(p: Preset, work: Path, name: str, seed: int, role: str, run_id: str, extra: list[str], *,
             ranks: int, swa_lr: float | None = None) -> Step:
    """A TWA stage step over run_id's snapshots, with the reproduction's TWA settings plus ``extra``."""
    store, _ = train_common(p, work, ranks=ranks)
    out = "file://" + str((work / "twa" / name).resolve())
    args = ["--snapshot-url", store, "--run-id", run_id,
            *([] if "--epochs" in extra else ["--epochs", str(p.twa_epochs)]), "--seed", str(seed),
            "--output", out, "--no-plot", "--num-workers", str(twa_workers(p, ranks))]
    if p.bn_batches is not None:
        args += ["--bn-batches", str(p.bn_batches)]
    args += extra
    # every training step's name is its run id, so a TWA step needs the step named after the run it reads
    return Step(name, "twa", "launch/twa.py", args, seed, role, swa_lr, run_id=run_id, output=out, needs=(run_id,))


def plan_replay_steps(p: Preset, work: Path, pairs: Sequence[early_stop.Pair], *, ranks: int = 1) -> list[Step]:
    """TWA over a full early-stop run's snapshots up to each epoch where a replayed stop rule fires (the
    follower's final-TWA settings): planned from the finished full runs' probes."""
    if not pairs:
        return []
    es = early_stop.summarize(p, list(pairs), work)
    return [twa_step(p, work, f"early-replay-s{s}-e{e}", int(s), "early-replay", f"early-full-s{s}",
                     ["--select-epochs", f"0:{e}", "--lr", f"{p.twa_lr:g}", "--schedule", "step"], ranks=ranks)
            for s, epochs in early_stop.replay_epochs(es, limit=p.replay_twa_max).items() for e in epochs]


def replay_results(steps: Sequence[Step], work: Path) -> dict[str, dict[int, float]]:
    """seed -> stop epoch -> validation accuracy of the finished early-replay steps."""
    out: dict[str, dict[int, float]] = {}
    for st in steps:
        r = step_output(st, work) if (work / "done" / f"{st.name}.json").is_file() else None
        if r and r.get("twa_accuracy") is not None:
            out.setdefault(str(st.seed), {})[int(st.name.rsplit("-e", 1)[1])] = r["twa_accuracy"]
    return out


def plan_steps(p: Preset, work: Path, *, ranks: int = 1) -> list[Step]:
    """Every step of the reproduction, in dependency order."""
    store, common = train_common(p, work, ranks=ranks)

    def train(name, seed, role, run_id, extra, swa_lr=None, head=None, needs=()):
        args = [*common, "--seed", str(seed), "--run-id", run_id,
                "--checkpoint-dir", str((work / "checkpoints" / run_id).resolve()), *extra]
        return Step(name, "train", "launch/train.py", args, seed, role, swa_lr, head=head, run_id=run_id, needs=needs)

    def twa(name, seed, role, run_id, extra, swa_lr=None):
        return twa_step(p, work, name, seed, role, run_id, extra, ranks=ranks, swa_lr=swa_lr)

    k = p.snapshots_per_epoch
    steps = []
    for s in (p.seeds if "head" in p.experiments else ()):
        head = f"head-s{s}"
        # K = 1 keeps the seq form of earlier reports (the same snapshots as --select-epochs 0:H).
        sel = ["--select", f"0:{p.half + 1}"] if k == 1 else ["--select-epochs", f"0:{p.half}"]
        cadence = ["--snapshots-per-epoch", str(k)] if k > 1 else []
        steps.append(train(head, s, "head", head, ["--epochs", str(p.epochs), "--lr", f"{p.lr:g}",
                                                   "--schedule", "step", *cadence]))
        if p.follow_head:  # record-only: the run goes to its end, the follower records where its rule fires
            steps[-1].args.append("--no-obey-stop")
            steps[-1].follow = early_stop.follower_args(p, store=store, run_id=head, seed=s,
                                                        twa_workers=twa_workers(p, 1))
        steps.append(twa(f"head-paper-s{s}", s, "head-paper", head,
                         [*sel, "--lr", f"{p.twa_lr:g}", "--schedule", "step"]))
        if k > 1:
            steps.append(twa(f"head-paper-k1-s{s}", s, "head-paper-k1", head,
                             ["--select", f"0:{k * p.half + 1}:{k}", "--lr", f"{p.twa_lr:g}", "--schedule", "step"]))
            steps.append(twa(f"head-paper-periter-s{s}", s, "head-paper-periter", head,
                             [*sel, "--lr", f"{p.twa_lr:g}", "--schedule", "step-per-iter"]))
        for h in (frontier.heads(p.epochs, p.frontier_heads) if "frontier" in p.experiments else ()):
            if h != p.half:  # H = E/2 is head-paper itself
                fsel = ["--select", f"0:{h + 1}"] if k == 1 else ["--select-epochs", f"0:{h}"]
                st = twa(f"frontier-twa-h{h}-s{s}", s, "frontier-twa", head,
                         [*fsel, "--lr", f"{p.twa_lr:g}", "--schedule", "step"])
                st.head = h
                steps.append(st)
            n = h + p.twa_epochs
            if n != p.epochs:  # an (H+T)-epoch budget equal to E is the full run
                steps.append(train(f"budget-e{n}-s{s}", s, "budget", f"budget-e{n}-s{s}",
                                   ["--epochs", str(n), "--lr", f"{p.lr:g}", "--schedule", "step"], head=n))
        if "twav" in p.experiments:
            steps.append(twa(f"head-twav-s{s}", s, "head-twav", head,
                             ["--preset", "journal", *sel, "--fit-on", "holdout"]))
        for lr in (p.swa_lrs if "tail" in p.experiments else ()):
            tail = f"tail-lr{_lr_tag(lr)}-s{s}"
            steps.append(train(tail, s, "tail", tail,
                               ["--epochs", str(p.tail_epochs), "--lr", f"{lr:g}", "--schedule", "constant",
                                "--init-from", f"{store}/{head}@{p.epochs * k}"], swa_lr=lr, needs=(head,)))
            steps.append(twa(f"tail-twa-lr{_lr_tag(lr)}-s{s}", s, "tail-twa", tail,
                             ["--select", f"0:{p.tail_epochs + 1}", "--lr", f"{p.twa_lr:g}", "--schedule", "step",
                              "--weight-decay", f"{p.tail_twa_weight_decay:g}",
                              *(["--start", str(p.tail_epochs)] if p.tail_start == "last" else [])], swa_lr=lr))
            if p.tail_start == "last":  # SWA, the uniform mean of the same snapshots: the start point alone
                steps.append(twa(f"tail-swa-lr{_lr_tag(lr)}-s{s}", s, "tail-swa", tail,
                                 ["--select", f"0:{p.tail_epochs + 1}", "--epochs", "0"], swa_lr=lr))
    return steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(step: Step, ranks: int) -> list[str]:
    return script_command(step.script, step.args, ranks)


def script_command(script: str, args: list[str], ranks: int) -> list[str]:
    if ranks > 1:
        return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(_free_port()), script, *args]
    return [sys.executable, script, *args]


def _shown(cmd: list[str]) -> str:
    """The command as a person would type it (`python`, not the interpreter's absolute path)."""
    return shlex.join(["python" if c == sys.executable else c for c in cmd])


def _url_path(url: str) -> Path:
    return Path(url[len("file://"):] if url.startswith("file://") else url)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def step_output(step: Step, work: Path) -> dict | None:
    """The step's finished output (metrics.json or result.json), or None when it is incomplete."""
    if step.kind == "train":
        m = _read_json(work / "store" / step.run_id / "train" / "metrics.json")
        return m if m and m.get("final") else None
    return _read_json(_url_path(step.output) / "result.json")


def head_pair(step: Step) -> early_stop.Pair:
    """A training step run beside its follower (``step.follow``): the trainer runs the step's own arguments."""
    ckpt = Path(step.args[step.args.index("--checkpoint-dir") + 1])
    return early_stop.Pair(step.name, step.seed, False, step.run_id, step.args, step.follow, ckpt)


def run_task(step: Step, work: Path, *, ranks: int, env: dict[str, str], log=print, on_trained=None) -> dict:
    """Run one step, or a training step and its follower side by side (an early_stop.Pair; ``on_trained`` is
    called when its training has finished, before the follower's final TWA)."""
    if step.follow is None:
        return run_step(step, work, ranks=ranks, env=env, log=log)
    pair = head_pair(step)
    return early_stop.run_pair(pair, work, cmds=early_stop.commands(pair, ranks, script_command), shown=_shown,
                               env=early_stop.pair_env(env, ranks), log=log, live=_LIVE, on_trained=on_trained)


def run_steps(steps: Sequence[Step], work: Path, *, ranks: int, env: dict[str, str], jobs: int = 1,
              log=print) -> None:
    """Run ``steps`` in plan order, up to ``jobs`` at once (processes sharing the machine and its GPU); a step
    starts once the steps it needs (among ``steps``) have finished, or for a training step run beside its
    follower, once its training has. A failed step does not stop the others, only the steps that need it; the
    call then exits with every failure."""
    names = {st.name for st in steps}
    pending, running, done, failed = list(steps), {}, set(), {}
    trained: set[str] = set()  # pairs whose trainer has finished (set from their threads)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            while pending or running:
                for st in [st for st in pending if any(n in failed for n in st.needs)]:
                    pending.remove(st)
                    failed[st.name] = f"not run: it needs {', '.join(n for n in st.needs if n in failed)}"
                    log(f"[fail] {st.name}: {failed[st.name]}")
                while len(running) < jobs:
                    st = next((st for st in pending if all(n in done or n in trained or n not in names
                                                           for n in st.needs)), None)
                    if st is None:
                        break
                    pending.remove(st)
                    running[pool.submit(run_task, st, work, ranks=ranks, env=env, log=log,
                                        on_trained=lambda n=st.name: trained.add(n))] = st
                # a timeout, so that SIGTERM's handler (main) runs promptly in this thread
                finished, _ = concurrent.futures.wait(running, timeout=1.0,
                                                      return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in finished:
                    st = running.pop(fut)
                    try:
                        fut.result()
                        done.add(st.name)
                    except SystemExit as e:  # run_step / run_pair: the step failed, with its log's tail
                        failed[st.name] = str(e.code)
                        log(f"[fail] {st.name}")
        except BaseException:  # SIGTERM or Ctrl-C: stop every running step the way a preemption would
            _stop_live()
            raise
    if failed:
        raise SystemExit(f"{len(failed)} of {len(steps)} steps failed:\n" + "\n".join(
            f"- {name}: {why}" for name, why in failed.items()))


_LIVE: set[subprocess.Popen] = set()  # the running steps' processes (run_steps stops them on SIGTERM)


def _stop_live() -> None:
    procs = list(_LIVE)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()  # a trainer flushes its snapshots on SIGTERM; --resume continues it later
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def changed_args(step: Step, work: Path) -> str | None:
    """Why ``step`` cannot run here: its done-marker holds other arguments (None: it may run or be skipped)."""
    marker = work / "done" / f"{step.name}.json"
    done = _read_json(marker)
    if done is None or done.get("args") == step.args:
        return None
    return (f"step {step.name} finished earlier with other arguments ({marker});\n"
            f"  then: {shlex.join(done.get('args', []))}\n  now:  {shlex.join(step.args)}\n"
            "use another --out, or delete that marker to redo the step")


def run_step(step: Step, work: Path, *, ranks: int, env: dict[str, str], log=print) -> dict:
    """Run one step unless its done-marker says it already finished with the same arguments."""
    why = changed_args(step, work)
    if why:
        raise SystemExit(why)
    marker = work / "done" / f"{step.name}.json"
    done = _read_json(marker)
    if done is not None:
        log(f"[skip] {step.name} (done in {done['seconds']:.0f}s)")
        return done
    cmd = command(step, ranks)
    log_path = work / "logs" / f"{step.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"[run ] {step.name}: {_shown(cmd)}")
    t0 = time.perf_counter()
    with open(log_path, "a") as f:
        f.write(f"\n=== {datetime.datetime.now(datetime.timezone.utc).isoformat()} {_shown(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        _LIVE.add(proc)
        try:
            rc = proc.wait()
        except BaseException:  # SIGTERM (see main) or Ctrl-C: stop the step the way a preemption would
            proc.terminate()  # the trainer flushes its snapshots on SIGTERM; --resume continues it later
            try:
                proc.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            _LIVE.discard(proc)
    seconds = time.perf_counter() - t0
    if rc != 0 or step_output(step, work) is None:
        tail = log_path.read_text(errors="replace").replace("\r", "\n").splitlines()[-30:]
        raise SystemExit(f"step {step.name} failed (exit {rc}); log {log_path}:\n" + "\n".join(tail))
    done = {"step": step.name, "args": step.args, "command": _shown(cmd), "seconds": seconds,
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    _write_json(marker, done)
    log(f"[done] {step.name} in {seconds:.0f}s")
    return done


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run_steps / run_pair, which stop the running steps first


def child_env(ranks: int, jobs: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if ranks * jobs > 1:  # several CPU ranks or parallel steps must not oversubscribe the cores
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (ranks * jobs))))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# --- summary ------------------------------------------------------------------------------------
def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _alpha_per_snapshot(alpha: Any) -> list[float]:
    """Averaging weight per snapshot; layer-wise (n x L) weights are averaged over the blocks."""
    return [float(statistics.fmean(a)) if isinstance(a, list) else float(a) for a in alpha]


def _twa_summary(r: dict) -> dict:
    alpha = r.get("alpha") or []
    layerwise = bool(alpha) and isinstance(alpha[0], list)
    out = {"swa_accuracy": r.get("swa_accuracy"), "twa_accuracy": r.get("twa_accuracy"),
           "start_accuracy": r.get("start_accuracy"), "mode": r.get("mode"),
           "seqs": [s["seq"] for s in r.get("snapshots", [])], "alpha": _alpha_per_snapshot(alpha),
           "effective_rank": r.get("effective_rank"), "dropped": (r.get("basis") or {}).get("dropped", []),
           "history": r.get("epochs", []), "hyperparameters": r.get("hyperparameters", {}),
           "seconds": (r.get("timings") or {}).get("total_seconds"),
           # what was delivered: `start` means every guarded lr failed and the model is the start point
           # (SWA), so its accuracy must never be read as TWA's
           "returned": r.get("returned"), "lr_final": r.get("lr_final"),
           "guard_attempts": [{k: a.get(k) for k in ("lr", "outcome")}
                              for a in (r.get("guard") or {}).get("attempts", [])],
           "fallback": (r.get("guard") or {}).get("fallback")}
    if layerwise:
        out["alpha_block_min"] = [float(min(a)) for a in alpha]
        out["alpha_block_max"] = [float(max(a)) for a in alpha]
    return out


def _train_summary(m: dict) -> dict:
    rows = m.get("epochs", [])
    return {"epochs": [{k: r.get(k) for k in ("epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds")}
                       for r in rows],
            "final_accuracy": (m.get("final") or {}).get("val_accuracy"),
            "seconds": sum(r.get("seconds", 0.0) for r in rows)}


def _tail_swa(tail: dict) -> float | None:
    """SWA of a tail: its own `--epochs 0` step when tail TWA starts at the last snapshot, else TWA's start."""
    return (tail.get("swa") or {}).get("start_accuracy") or (tail.get("twa") or {}).get("swa_accuracy")


def summarize(p: Preset, steps: list[Step], work: Path) -> dict:
    """Per-seed results from whatever steps have finished."""
    seeds: dict[str, dict] = {}
    for st in steps:
        out = step_output(st, work) if (work / "done" / f"{st.name}.json").is_file() else None
        if out is None:
            continue
        d = seeds.setdefault(str(st.seed), {"tail": {}})
        if st.role == "head":
            d["head"] = _train_summary(out)
            if st.follow is not None:
                d["follower"] = early_stop.run_summary(head_pair(st), work)
            rows = {r["epoch"]: r for r in d["head"]["epochs"]}
            d["head"]["half_accuracy"] = (rows.get(p.half) or {}).get("val_accuracy")
            d["head"]["half_seconds"] = sum(r.get("seconds", 0.0) for r in d["head"]["epochs"] if r["epoch"] <= p.half)
        elif st.role == "head-paper":
            d["head_paper"] = _twa_summary(out)
            d.setdefault("frontier", {}).setdefault("twa", {})[str(p.half)] = d["head_paper"]
        elif st.role == "frontier-twa":
            d.setdefault("frontier", {}).setdefault("twa", {})[str(st.head)] = _twa_summary(out)
        elif st.role == "budget":
            d.setdefault("frontier", {}).setdefault("sgd", {})[str(st.head)] = _train_summary(out)
        elif st.role in ("head-paper-k1", "head-paper-periter"):
            d[st.role.replace("-", "_")] = _twa_summary(out)
        elif st.role == "head-twav":
            d["head_twav"] = _twa_summary(out)
        elif st.role == "tail":
            d["tail"].setdefault(_lr_tag(st.swa_lr), {})["train"] = _train_summary(out)
        elif st.role == "tail-twa":
            d["tail"].setdefault(_lr_tag(st.swa_lr), {})["twa"] = _twa_summary(out)
        elif st.role == "tail-swa":
            d["tail"].setdefault(_lr_tag(st.swa_lr), {})["swa"] = _twa_summary(out)
    return seeds


def build_table(p: Preset, seeds: dict) -> list[dict]:
    """Rows: method, stage, SGD epochs, TWA epochs, accuracy mean ± std over the seeds that have it."""
    E, H, T, K, S = p.epochs, p.half, p.twa_epochs, p.tail_epochs, p.snapshots_per_epoch
    n = f" (K={S}: {S * H + 1} snapshots)" if S > 1 else ""
    spec = [
        (f"SGD, full run ({E} epochs)", "head", E, 0, lambda d: d.get("head", {}).get("final_accuracy")),
        (f"SGD at half-way (epoch {H})", "head", H, 0, lambda d: d.get("head", {}).get("half_accuracy")),
        (f"SWA of snapshots to epoch {H}{n}", "head", H, 0, lambda d: d.get("head_paper", {}).get("swa_accuracy")),
        (f"TWA paper mode, snapshots to epoch {H}{n}", "head", H, T,
         lambda d: d.get("head_paper", {}).get("twa_accuracy")),
    ]
    if S > 1:
        spec += [
            (f"SWA of snapshots to epoch {H} (K=1: the {H + 1} epoch ends)", "head", H, 0,
             lambda d: d.get("head_paper_k1", {}).get("swa_accuracy")),
            (f"TWA at K=1, snapshots to epoch {H} ({H + 1} epoch ends)", "head", H, T,
             lambda d: d.get("head_paper_k1", {}).get("twa_accuracy")),
            (f"TWA with the per-iteration lr cut, snapshots to epoch {H}{n}", "head", H, T,
             lambda d: d.get("head_paper_periter", {}).get("twa_accuracy")),
        ]
    spec += [
        (f"TWA-v journal mode, snapshots to epoch {H}{n}", "head", H, T,
         lambda d: d.get("head_twav", {}).get("twa_accuracy")),
    ]
    for lr in p.swa_lrs:
        tag = _lr_tag(lr)
        spec += [
            (f"tail SGD, last point (lr {tag})", f"tail lr {tag}", E + K, 0,
             lambda d, t=tag: d["tail"].get(t, {}).get("train", {}).get("final_accuracy")),
            (f"SWA, tail lr {tag} ({K + 1} snapshots)", f"tail lr {tag}", E + K, 0,
             lambda d, t=tag: _tail_swa(d["tail"].get(t, {}))),
            (f"TWA, tail lr {tag} ({K + 1} snapshots)", f"tail lr {tag}", E + K, T,
             lambda d, t=tag: d["tail"].get(t, {}).get("twa", {}).get("twa_accuracy")),
        ]
    rows = []
    for method, stage, sgd, twa, get in spec:
        per_seed = {s: get(d) for s, d in sorted(seeds.items())}
        accs = [v for v in per_seed.values() if v is not None]
        if not accs:
            continue
        mean, std = _mean_std(accs)
        rows.append({"method": method, "stage": stage, "sgd_epochs": sgd, "twa_epochs": twa,
                     "accuracy_mean": mean, "accuracy_std": std, "n_seeds": len(accs),
                     "accuracy_per_seed": {s: v for s, v in per_seed.items() if v is not None}})
    return rows


def _row(table: list[dict], prefix: str) -> dict | None:
    return next((r for r in table if r["method"].startswith(prefix)), None)


def _pts(x: float) -> str:
    return f"{100 * x:+.2f} pts"


def _acc(r: dict) -> str:
    return f"{100 * r['accuracy_mean']:.2f}% ± {100 * r['accuracy_std']:.2f}"


def findings(p: Preset, table: list[dict], seeds: dict) -> list[dict]:
    """Factual sentences, each with whether the paper's claim holds here (True, False, None = a tie).

    A difference counts as a tie when it is within max(0.5 pts, the larger seed std) of zero.
    """
    out = []

    def tol(*rows):
        return max(0.005, *(r["accuracy_std"] for r in rows))

    full, swa_h = _row(table, "SGD, full run"), _row(table, "SWA of snapshots")
    E, H, T = p.epochs, p.half, p.twa_epochs
    saved = (E - (H + T)) / E
    for name, prefix in (("TWA (paper mode)", "TWA paper mode"), ("TWA-v (journal mode)", "TWA-v journal mode")):
        twa = _row(table, prefix)
        if not (full and twa):
            continue
        d, t = twa["accuracy_mean"] - full["accuracy_mean"], tol(twa, full)
        verdict = "matches" if abs(d) <= t else ("beats" if d > 0 else "misses")
        out.append({"claim": "head", "method": name, "verdict": verdict, "holds": verdict != "misses",
                    "difference": d, "tolerance": t,
                    "epochs_saved_fraction": saved,
                    "text": f"Head stage, {name}: {H} SGD epochs + {T} TWA epochs reach {_acc(twa)}, against "
                            f"{_acc(full)} for the full {E}-epoch run ({_pts(d)}); it {verdict} the full run "
                            f"(tie band ±{100 * t:.2f} pts) while spending {H + T} of {E} epochs "
                            f"({100 * saved:.0f}% saved; the paper: 100+10 of 200, 45%)."})
    twa_p = _row(table, "TWA paper mode")
    twa_k1 = _row(table, "TWA at K=1")
    if twa_p and twa_k1:
        d, t = twa_p["accuracy_mean"] - twa_k1["accuracy_mean"], tol(twa_p, twa_k1)
        S = p.snapshots_per_epoch
        out.append({"claim": "density", "holds": True if d > t else (None if d >= -t else False), "difference": d,
                    "tolerance": t,
                    "text": f"Snapshot density: TWA over K={S} snapshots per epoch ({S * H + 1} snapshots) reaches "
                            f"{_acc(twa_p)}, against {_acc(twa_k1)} over the {H + 1} epoch ends of the same runs "
                            f"({_pts(d)}, tie band ±{100 * t:.2f} pts; the authors use K=5 on ImageNet)."})
    twa_it = _row(table, "TWA with the per-iteration")
    if twa_p and twa_it:
        d, t = twa_p["accuracy_mean"] - twa_it["accuracy_mean"], tol(twa_p, twa_it)
        out.append({"claim": "schedule", "holds": True if d > t else (None if d >= -t else False), "difference": d,
                    "tolerance": t,
                    "text": f"Schedule: TWA with the authors' epoch-wise lr cut reaches {_acc(twa_p)}, against "
                            f"{_acc(twa_it)} with the cut per iteration at 50%/75% of the steps ({_pts(d)}, tie "
                            f"band ±{100 * t:.2f} pts; at T={T} TWA epochs the two differ in the last epoch only)."})
    if swa_h and twa_p:
        d = twa_p["accuracy_mean"] - swa_h["accuracy_mean"]
        out.append({"claim": "head-swa", "holds": d > tol(twa_p, swa_h),
                    "difference": d,
                    "text": f"Head stage, SWA of the same snapshots (to epoch {H}): {_acc(swa_h)}; TWA improves on it "
                            f"by {_pts(d)} (the paper: uniform averaging fails in the head stage, TWA does not)."})
    twa_v = _row(table, "TWA-v journal mode")
    if twa_p and twa_v:
        d = twa_v["accuracy_mean"] - twa_p["accuracy_mean"]
        t = tol(twa_p, twa_v)
        out.append({"claim": "twa-v", "holds": d > -t, "difference": d,
                    "text": f"TWA-v (fitted on the {100 * p.holdout_fraction:g}% hold-out) against paper-mode TWA: "
                            f"{_pts(d)} (the journal version reports TWA-v generalises at least as well)."})
    gaps = {}
    for lr in p.swa_lrs:
        tag = _lr_tag(lr)
        swa, twa = _row(table, f"SWA, tail lr {tag} "), _row(table, f"TWA, tail lr {tag} ")
        if not (swa and twa):
            continue
        d, t = twa["accuracy_mean"] - swa["accuracy_mean"], tol(swa, twa)
        gaps[lr] = (swa, twa, d)
        holds = True if d > t else (None if d >= -t else False)
        verdict = {True: "holds", None: "is a tie", False: "misses"}[holds]
        out.append({"claim": "tail", "swa_lr": lr, "holds": holds, "difference": d, "tolerance": t,
                    "text": f"Tail stage, lr {tag}: TWA {_acc(twa)} against SWA {_acc(swa)} on the same "
                            f"{p.tail_epochs + 1} snapshots ({_pts(d)}); the claim TWA > SWA {verdict} "
                            f"(tie band ±{100 * t:.2f} pts)."})
    if len(gaps) >= 2:
        lo, hi = min(gaps), max(gaps)
        (swa_lo, twa_lo, d_lo), (swa_hi, twa_hi, d_hi) = gaps[lo], gaps[hi]
        spread_swa = abs(swa_hi["accuracy_mean"] - swa_lo["accuracy_mean"])
        spread_twa = abs(twa_hi["accuracy_mean"] - twa_lo["accuracy_mean"])
        out.append({"claim": "tail-lr", "holds": d_hi > d_lo,
                    "difference": d_hi - d_lo,
                    "text": f"Tail stage, larger learning rate: the TWA-SWA gap is {_pts(d_lo)} at lr {lo:g} and "
                            f"{_pts(d_hi)} at lr {hi:g} (the paper: a larger gap at the larger lr)."})
        out.append({"claim": "tail-sensitivity", "holds": spread_twa < spread_swa,
                    "difference": spread_twa - spread_swa,
                    "text": f"Tail stage, sensitivity to the tail lr: SWA moves by {100 * spread_swa:.2f} pts "
                            f"between lr {lo:g} and {hi:g}, TWA by {100 * spread_twa:.2f} pts (the paper: TWA "
                            f"is less sensitive)."})
    return out


# --- plots --------------------------------------------------------------------------------------
def plot_accuracy(p: Preset, seeds: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    E, H, T, K = p.epochs, p.half, p.twa_epochs, p.tail_epochs
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def curve(rows_per_seed, offset, label, color, lw=2.0):
        by_epoch: dict[int, list[float]] = {}
        for rows in rows_per_seed:
            for r in rows:
                if r.get("val_accuracy") is not None:
                    by_epoch.setdefault(r["epoch"] + offset, []).append(r["val_accuracy"])
        if not by_epoch:
            return
        xs = sorted(by_epoch)
        ms = [statistics.fmean(by_epoch[x]) for x in xs]
        ax.plot(xs, ms, color=color, lw=lw, marker=".", ms=4, label=label)
        if any(len(by_epoch[x]) > 1 for x in xs):
            lo = [min(by_epoch[x]) for x in xs]
            hi = [max(by_epoch[x]) for x in xs]
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)

    def point(x, values, label, color, marker):
        values = [v for v in values if v is not None]
        if values:
            m, s = _mean_std(values)
            ax.errorbar([x], [m], yerr=[s], fmt=marker, color=color, ms=9, capsize=4, label=f"{label}: {100 * m:.2f}%")

    ds = list(seeds.values())
    curve([d["head"]["epochs"] for d in ds if "head" in d], 0, f"SGD, step schedule ({E} epochs)", "k")
    point(H, [d.get("head_paper", {}).get("swa_accuracy") for d in ds], f"SWA 0..{H}", colors[1], "s")
    point(H + T, [d.get("head_paper", {}).get("twa_accuracy") for d in ds], f"TWA 0..{H} (+{T})", colors[0], "*")
    point(H + T, [d.get("head_twav", {}).get("twa_accuracy") for d in ds], f"TWA-v 0..{H} (+{T})", colors[2], "P")
    point(H + T + 0.3, [d.get("head_paper_k1", {}).get("twa_accuracy") for d in ds], f"TWA K=1 0..{H} (+{T})",
          colors[5 % len(colors)], "X")
    for i, lr in enumerate(p.swa_lrs):
        tag, c, dx = _lr_tag(lr), colors[(3 + i) % len(colors)], 0.25 * i  # dx: markers of each lr side by side
        tails = [(d["head"], d["tail"][tag]) for d in ds if tag in d["tail"] and "head" in d]
        # each tail curve starts at its head run's final point (the weights it starts from)
        curve([[{"epoch": 0, "val_accuracy": h["final_accuracy"]}, *t["train"]["epochs"]]
               for h, t in tails if "train" in t], E, f"tail SGD, lr {tag}", c, lw=1.2)
        point(E + K + dx, [_tail_swa(t) for _, t in tails], f"SWA tail lr {tag}", c, "s")
        point(E + K + T + dx, [t.get("twa", {}).get("twa_accuracy") for _, t in tails], f"TWA tail lr {tag}", c, "*")
    finals = [d["head"]["final_accuracy"] for d in ds if d.get("head", {}).get("final_accuracy") is not None]
    if finals:
        ax.axhline(statistics.fmean(finals), color="k", ls="--", lw=0.8, label="full run, final accuracy")
    ax.axvline(H, color="gray", ls=":", lw=1)
    ax.set_xlabel("epoch (SGD epochs; TWA results drawn at SGD epochs + TWA epochs)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{p.model}, CIFAR-10 ({p.limit_train or 'all'} train images), mean over {len(ds)} seed(s); "
                 "band = min..max")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_coefficients(p: Preset, seeds: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("head_paper", f"head, paper mode (snapshots 0..{p.half})"),
              ("head_twav", f"head, TWA-v (mean over layer blocks; band: seed {min(seeds, default='-')} min..max)")]
    panels += [(f"tail:{_lr_tag(lr)}", f"tail lr {_lr_tag(lr)} (seq 0 = head's final weights)") for lr in p.swa_lrs]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        first = True
        for s, d in sorted(seeds.items()):
            r = d["tail"].get(key.split(":", 1)[1], {}).get("twa") if key.startswith("tail:") else d.get(key)
            if not r or not r.get("alpha"):
                continue
            if first and "alpha_block_min" in r:
                ax.fill_between(r["seqs"], r["alpha_block_min"], r["alpha_block_max"], alpha=0.2, color="gray",
                                lw=0, label="min..max over blocks")
            ax.plot(r["seqs"], r["alpha"], marker="o", ms=3, label=f"TWA, seed {s}")
            if first:
                ax.axhline(1.0 / len(r["seqs"]), color="k", ls="--", lw=1, label="SWA 1/n")
            first = False
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("snapshot seq (epoch)")
        ax.set_ylabel("alpha (w = sum alpha_i w_i)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- report -------------------------------------------------------------------------------------
def _fmt_num(x: Any) -> str:
    return "n/a" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))


def _fallbacks(tree: Any, path: str = "") -> list[str]:
    """Where in the per-seed results a TWA summary says it returned its start point."""
    if not isinstance(tree, dict):
        return []
    if tree.get("returned") == "start":
        return [path.strip("/")]
    return [hit for k, v in tree.items() for hit in _fallbacks(v, f"{path}/{k}")]


def render_report(res: dict, discussion: str | None) -> str:
    p = res["preset"]
    lines = [f"# TWA reproduction on CIFAR-10: `{p['name']}` preset", "",
             f"Command: `{res['command']}`", "",
             f"Host: {res['host']['platform']}, {res['host']['cpus']} CPUs, torch {res['host']['torch']}"
             f"{', ' + res['host']['gpu'] if res['host'].get('gpu') else ''}; ranks per step: {res['ranks']}. "
             f"Wall time of all steps: {res['wall_seconds'] / 60:.1f} min"
             + (f" summed, {res['wall_span_seconds'] / 60:.1f} min from the first start to the last end"
                if res.get("wall_span_seconds") and res["wall_span_seconds"] < 0.95 * res["wall_seconds"] else "")
             + f" (generated {res['generated_at']}).", ""]
    if res["missing_steps"]:
        lines += [f"**Incomplete:** {len(res['missing_steps'])} step(s) have not finished: "
                  + ", ".join(res["missing_steps"]), ""]
    fallbacks = _fallbacks(res["seeds"])
    if fallbacks:
        lines += ["**Guard fallback:** every learning rate failed the guard in " + ", ".join(fallbacks)
                  + "; those runs returned their start point (SWA or --start), and the TWA numbers they carry "
                    "are the start point's.", ""]
    if "head" in p["experiments"]:
        lines += _head_report(res)
    lines += res.get("frontier_report", [])
    for s, d in sorted(res["seeds"].items()):
        if d.get("follower"):
            lines += early_stop.render_probes(
                d["follower"], title=f"Live follower on the head run (seed {s})",
                intro=f"The head run trained beside a live follower (`launch/twa.py --follow`, 1 rank; its command is "
                      f"in the steps below), record-only: the trainer ran `--no-obey-stop` to its end, so every probe "
                      f"of the {p['epochs']} epochs is here. Each probe fits TWA over the snapshots so far and "
                      "scores it and the newest SGD snapshot on the hold-out split (never on val); the rule decides "
                      "from those alone. *Statistic*: the rule's gain per epoch against the probe at least 2 epochs "
                      "back (paired per hold-out image); *bound*: its one-sided 95% upper bound.")
    lines += res.get("early_stop_report", [])
    lines += ["", "## Steps", "", "| step | seconds | command |", "|---|---:|---|"]
    for name, st in res["steps"].items():
        lines.append(f"| {name} | {_fmt_num(st.get('seconds'))} | `{st.get('command', '(not run)')}` |")
    if discussion:
        lines += ["", "## Discussion", "", discussion.strip()]
    return "\n".join(lines) + "\n"


def _head_report(res: dict) -> list[str]:
    """The head/TWA-v/tail sections."""
    p, table, lines = res["preset"], res["table"], []
    E, H, T, K = p["epochs"], p["epochs"] // 2, p["twa_epochs"], p["tail_epochs"]
    S = p.get("snapshots_per_epoch", 1)
    twav = next((d["head_twav"]["hyperparameters"] for d in res["seeds"].values() if "head_twav" in d), None)
    twav_text = ("" if not twav else " TWA-v resolved to: " + ", ".join(
        f"{k} {twav.get(k)}" for k in ("optimizer", "lr", "schedule", "warmup", "weight_decay", "directions",
                                       "coefficients", "block_size", "p_bits", "fit_on")) + ".")
    lines += ["## What it runs", "",
              f"- Model `{p['model']}`, data `{p['data']}` (ImageFolder), "
              f"train subset {p['limit_train'] or 'all'} images, validation subset {p['limit_val'] or 'all'} images, "
              f"hold-out {p['holdout_fraction']:g} of the full training split (carved out before the subset; "
              f"excluded from every run's training), seeds {', '.join(map(str, p['seeds']))}.",
              f"- Head: SGD lr {p['lr']:g} (momentum 0.9, weight decay {p['weight_decay']:g}, batch "
              f"{p['batch_size']}), step schedule ÷10 after epochs {int(0.5 * E)} and {int(0.75 * E + 0.9)} "
              f"(the authors' epoch-wise MultiStepLR), {E} epochs in all, {S} snapshot(s) per epoch "
              "(seq 0 = initial weights).",
              f"- Head TWA: every snapshot up to the end of epoch {H} ({S * H + 1} snapshots), {T} TWA epochs, "
              "in paper mode "
              f"(lr {p['twa_lr']:g}, step schedule, fitted on the training split) and in journal TWA-v mode "
              f"(`--preset journal --fit-on holdout`).{twav_text}"
              + (f" With K={S}, the same TWA also runs over the {H + 1} epoch-end snapshots only "
                 f"(`--select 0:{S * H + 1}:{S}`): the K=1 result on the same SGD runs." if S > 1 else "")
              + " All resolved settings are in results.json.",
              f"- Tail: from the head run's final snapshot (seq {E}), {K} more epochs at a constant lr "
              f"{' and '.join(f'{lr:g}' for lr in p['swa_lrs'])} (`--init-from ... --schedule constant`); "
              f"then paper-mode TWA over the tail's {K + 1} snapshots (seq 0 = the head's final weights), "
              f"weight decay {p['tail_twa_weight_decay']:g}, starting "
              + ("at the tail's last snapshot, as the authors' swa/run_twa.sh does (`--start`); SWA, the uniform "
                 "mean of the same snapshots with BatchNorm recomputed, is its own `--epochs 0` step."
                 if p.get("tail_start", "last") == "last" else
                 "at the uniform mean (`--tail-start swa`), so its start accuracy (BatchNorm recomputed) is the "
                 "SWA result on the same snapshots."),
              "- BatchNorm statistics are recomputed at the start and end of every TWA run on "
              + (f"{p['bn_batches']} training batches of {p['batch_size']} (the paper: a full pass)."
                 if p.get("bn_batches") else "one full pass over the training split (as in the paper)."),
              "- The tail starts from the finished run, as SWA does when applied to a pretrained model, so the "
              "tail snapshots are the same ones SWA would average and the head run is reused; the paper's "
              "SWA runs instead decay from lr 0.1 to swa_lr inside one longer schedule.", "",
              "## Results", "",
              f"Accuracy on the validation split ({p['limit_val'] or 'all'} images of CIFAR-10's test set), "
              "mean ± std over seeds (a TWA epoch costs about one SGD epoch: one forward/backward pass over "
              "its fitting split).", "",
              "| method | SGD epochs | TWA epochs | accuracy (%) | seeds | per seed (%) |",
              "|---|---:|---:|---:|---:|---|"]
    for r in table:
        per = ", ".join(f"s{s}: {100 * v:.2f}" for s, v in r["accuracy_per_seed"].items())
        lines.append(f"| {r['method']} | {r['sgd_epochs']} | {r['twa_epochs']} | "
                     f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} | {r['n_seeds']} | {per} |")
    sv = res["epochs_saved"]
    lines += ["", f"Epochs saved by head-stage TWA: ({E} − ({H} + {T})) / {E} = {100 * sv['fraction']:.0f}% "
              f"(the paper: (200 − (100 + 10)) / 200 = 45% on CIFAR)."]
    if sv.get("wall_fraction") is not None:
        lines.append(f"Measured wall time: SGD to epoch {H} + TWA = {sv['head_twa_seconds']:.0f} s against "
                     f"{sv['full_seconds']:.0f} s for the full run ({100 * sv['wall_fraction']:.0f}% saved; "
                     "TWA time includes snapshot loading, the basis and two BatchNorm passes).")
    lines += ["", "## Where it matches the paper and where it misses", ""]
    mark = {True: "holds", False: "misses", None: "tie"}
    lines += [f"- **{mark[f['holds']]}**: {f['text']}" for f in res["findings"]] or ["- (no finished comparisons yet)"]
    lines += ["", "![accuracy against epoch](accuracy_vs_epoch.png)", "",
              "![TWA coefficients per snapshot](coefficients.png)", ""]
    return lines


def _host() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": f"{platform.system()} {platform.machine()}", "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "gpu": gpu}


def _span(markers) -> float | None:
    """Seconds from the first finished step's start to the last one's end (less than their sum with --jobs)."""
    ends = [(datetime.datetime.fromisoformat(m["finished_at"]).timestamp(), m["seconds"])
            for m in markers if m and m.get("finished_at")]
    return max(e for e, _ in ends) - min(e - s for e, s in ends) if ends else None


def write_report(p: Preset, steps: list[Step], out: Path, work: Path, *, ranks: int, argv: Sequence[str],
                 pairs: Sequence[early_stop.Pair] = ()) -> dict:
    seeds = summarize(p, steps, work)
    table = build_table(p, seeds)
    replays = plan_replay_steps(p, work, pairs, ranks=ranks)
    markers = {st.name: _read_json(work / "done" / f"{st.name}.json") for st in [*steps, *pairs, *replays]}
    E, H, T = p.epochs, p.half, p.twa_epochs
    saved = {"fraction": (E - (H + T)) / E, "wall_fraction": None}
    heads = [d for d in seeds.values() if "head" in d and d.get("head_paper", {}).get("seconds") is not None]
    if heads:
        full = statistics.fmean(d["head"]["seconds"] for d in heads)
        ht = statistics.fmean(d["head"]["half_seconds"] + d["head_paper"]["seconds"] for d in heads)
        saved.update(full_seconds=full, head_twa_seconds=ht, wall_fraction=(full - ht) / full if full else None)
    res = {
        "preset": dataclasses.asdict(p),
        "command": shlex.join(["python", "experiments/reproduce.py", *(x for x in argv if x != "--report-only")]),
        "ranks": ranks,
        "host": _host(),
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": sum(m["seconds"] for m in markers.values() if m),
        "wall_span_seconds": _span(markers.values()),
        "missing_steps": [n for n, m in markers.items() if m is None],
        "steps": {n: ({"seconds": m["seconds"], "command": m["command"]} if m else {}) for n, m in markers.items()},
        "table": table,
        "epochs_saved": saved,
        "findings": findings(p, table, seeds),
        "seeds": seeds,
    }
    es = early_stop.summarize(p, list(pairs), work, replay_results(replays, work)) if pairs else None
    if es is not None:
        res["early_stop"] = es
    if "frontier" in p.experiments:
        grid = frontier.heads(p.epochs, p.frontier_heads)
        fs = frontier.summarize(seeds, epochs=E, twa_epochs=T, grid=grid)
        res["frontier"] = {"heads": grid, "points": fs, "claims": frontier.claims(fs, epochs=E, twa_epochs=T)}
    _write_json(out / "results.json", res)
    if "head" in p.experiments:
        plot_accuracy(p, seeds, out / "accuracy_vs_epoch.png")
        plot_coefficients(p, seeds, out / "coefficients.png")
    if es is not None:
        early_stop.plot(p, es, out / "early_stop.png")
        res = {**res, "early_stop_report": early_stop.render(p, es, ranks)}
    if "frontier" in res:
        fr = res["frontier"]
        frontier.plot(fr["points"], out / "frontier.png", epochs=E,
                      title=f"{p.model}, {p.limit_train or 'all'} CIFAR-10 images, E={E}, T={T}")
        res = {**res, "frontier_report": frontier.render(fr["points"], fr["claims"], epochs=E, twa_epochs=T,
                                                         seeds=sorted(seeds))}
    discussion = (out / "discussion.md").read_text() if (out / "discussion.md").is_file() else None
    (out / "report.md").write_text(render_report(res, discussion))
    return res


# --- CLI ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="experiments/reproduce.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (results.json, report.md, PNGs; work/ inside)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--gpu", action="store_true", help="the paper's full recipe (VGG16-BN, 200 epochs, full data)")
    g.add_argument("--smoke", action="store_true", help="tiny run for the test suite (2 epochs, 256 images)")
    ap.add_argument("--ranks", type=int, default=1,
                    help="ranks per step: 1 runs `python launch/...`, N > 1 runs `deepspeed --num_gpus N`")
    ap.add_argument("--data", help=f"CIFAR-10 ImageFolder root (default {DEFAULT_DATA})")
    ap.add_argument("--model")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--epochs", type=int, help="E, epochs of the full run")
    ap.add_argument("--twa-epochs", type=int, help="T, epochs of every TWA run")
    ap.add_argument("--tail-epochs", type=int, help="K, epochs of each tail run")
    ap.add_argument("--twa-lr", type=float, help="paper-mode TWA learning rate (preset: the paper's 2)")
    ap.add_argument("--swa-lrs", type=float, nargs="+", help="constant tail learning rates")
    ap.add_argument("--tail-start", choices=("last", "swa"),
                    help="tail TWA starts at the tail's last snapshot (default, as the authors) or its SWA mean")
    ap.add_argument("--limit-train", type=int)
    ap.add_argument("--limit-val", type=int)
    ap.add_argument("--holdout-fraction", type=float)
    ap.add_argument("--num-workers", type=int)
    ap.add_argument("--snapshots-per-epoch", type=int, help="K, snapshots per epoch of the head run (default 1)")
    ap.add_argument("--experiments",
                    help="comma-separated parts to run: head,twav,tail,frontier,early-stop (default head,twav,tail)")
    ap.add_argument("--early-stop-epochs", type=int, help="epochs of the early-stop runs (default: --epochs)")
    ap.add_argument("--frontier-heads", type=int, nargs="+",
                    help="frontier head lengths H (default: 30%%, 50%% and 70%% of --epochs)")
    ap.add_argument("--follow-head", action="store_true",
                    help="train each head run beside a record-only live follower (its default stop rule); its "
                         "probes and decisions go into the report")
    ap.add_argument("--follow-args",
                    help="extra follower flags, one shell-quoted string (e.g. '--probe-every 5'); default: the "
                         "follower's own defaults")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run up to N independent steps at once (e.g. on one GPU); a step waits for the runs it reads")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from finished steps; run nothing")
    ap.add_argument("--only", help="comma-separated step-name patterns to run (e.g. 'budget-*-s2'): processes "
                                   "sharing one --out run disjoint steps side by side; the report covers every step")
    ap.add_argument("--dry-run", action="store_true", help="print each step's command and whether it is done")
    return ap


def preset_from_args(a: argparse.Namespace) -> Preset:
    base = dataclasses.asdict(PRESETS["gpu" if a.gpu else "smoke" if a.smoke else "cpu"]())
    over = {"data": a.data, "model": a.model, "epochs": a.epochs, "twa_epochs": a.twa_epochs,
            "tail_epochs": a.tail_epochs, "tail_start": a.tail_start, "twa_lr": a.twa_lr,
            "limit_train": a.limit_train, "limit_val": a.limit_val,
            "holdout_fraction": a.holdout_fraction, "num_workers": a.num_workers,
            "snapshots_per_epoch": a.snapshots_per_epoch, "early_stop_epochs": a.early_stop_epochs,
            "frontier_heads": tuple(a.frontier_heads) if a.frontier_heads else None,
            "follow_head": a.follow_head or None,
            "follow_args": tuple(shlex.split(a.follow_args)) if a.follow_args is not None else None,
            "experiments": tuple(a.experiments.split(",")) if a.experiments else None,
            "seeds": tuple(a.seeds) if a.seeds else None, "swa_lrs": tuple(a.swa_lrs) if a.swa_lrs else None}
    base.update({k: v for k, v in over.items() if v is not None})
    base["data"] = str(Path(base["data"]).resolve())
    return Preset(**base)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    try:
        p = preset_from_args(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.ranks < 1:
        print(f"error: --ranks must be >= 1, got {a.ranks}", file=sys.stderr)
        return 2
    if a.jobs < 1:
        print(f"error: --jobs must be >= 1, got {a.jobs}", file=sys.stderr)
        return 2
    out = Path(a.out).resolve()
    work = out / "work"
    steps = plan_steps(p, work, ranks=a.ranks)
    pairs = plan_pairs(p, work, ranks=a.ranks)
    if a.dry_run:
        for st in steps:
            state = "done" if (work / "done" / f"{st.name}.json").is_file() else "todo"
            follow = "" if st.follow is None else f" & {_shown(script_command('launch/twa.py', st.follow, 1))}"
            print(f"[{state}] {st.name}: {_shown(command(st, a.ranks))}{follow}")
        for pair in pairs:
            state = "done" if (work / "done" / f"{pair.name}.json").is_file() else "todo"
            train, follow = early_stop.commands(pair, a.ranks, script_command)
            print(f"[{state}] {pair.name}: {_shown(train)} & {_shown(follow)}")
        for st in plan_replay_steps(p, work, pairs, ranks=a.ranks):  # known once the full runs have finished
            state = "done" if (work / "done" / f"{st.name}.json").is_file() else "todo"
            print(f"[{state}] {st.name}: {_shown(command(st, a.ranks))}")
        return 0
    if not a.report_only:
        if not (Path(p.data) / "train").is_dir():
            print(f"error: --data {p.data}: no train/ folder (CIFAR-10 in ImageFolder layout expected)",
                  file=sys.stderr)
            return 2
        work.mkdir(parents=True, exist_ok=True)
        (work / ".gitignore").write_text("*\n")  # snapshots, checkpoints and logs stay out of git
        env = child_env(a.ranks, a.jobs)
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        t0 = time.perf_counter()
        chosen = [st for st in steps if not a.only or any(fnmatch.fnmatch(st.name, pat) for pat in a.only.split(","))]
        # before anything runs: a report written now would label the earlier results with these arguments
        refused = [why for why in (changed_args(st, work) for st in chosen) if why]
        if refused:
            print("error: " + "\n".join(refused), file=sys.stderr)
            return 2
        try:
            run_steps(chosen, work, ranks=a.ranks, env=env, jobs=a.jobs, log=lambda m: print(m, flush=True))
        except SystemExit as e:
            if isinstance(e.code, str):  # failed steps (not a stop): the report still shows what finished
                out.mkdir(parents=True, exist_ok=True)
                write_report(p, steps, out, work, ranks=a.ranks, argv=argv, pairs=pairs)
            raise
        for pair in pairs:
            early_stop.run_pair(pair, work, cmds=early_stop.commands(pair, a.ranks, script_command), shown=_shown,
                                env=early_stop.pair_env(env, a.ranks), log=lambda m: print(m, flush=True))
        replays = plan_replay_steps(p, work, pairs, ranks=a.ranks)
        for st in replays:
            run_step(st, work, ranks=a.ranks, env=env, log=lambda m: print(m, flush=True))
        n = len(steps) + len(pairs) + len(replays)
        print(f"all {n} steps done ({(time.perf_counter() - t0) / 60:.1f} min this call)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    res = write_report(p, steps, out, work, ranks=a.ranks, argv=argv, pairs=pairs)
    for r in res["table"]:
        print(f"{r['method']:<44} {r['sgd_epochs']:>4} + {r['twa_epochs']:>2}  "
              f"{100 * r['accuracy_mean']:6.2f} ± {100 * r['accuracy_std']:.2f}  (n={r['n_seeds']})")
    for f in res["findings"]:
        print(f"- {({True: 'holds', False: 'misses', None: 'tie'})[f['holds']]}: {f['text']}")
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
