"""Typed configuration of the TWA stage: ``TwaConfig``, with the guard and live-follow sections.

Paper mode (ICLR 2023) is the default: Gram-Schmidt basis of the raw snapshots (seq 0 included,
as in the authors' head-stage scripts), start at the SWA mean, projected SGD (batch 128, lr 2,
momentum 0.9, wd 1e-5, 10 epochs, the authors' epoch-wise MultiStepLR), BatchNorm recalibrated at
start and end. Named presets are shipped YAML files in ``twa_scale/presets/twa/``: `paper_cifar`,
`paper_imagenet` (batch 256, lr 0.3, 2 epochs) and `journal` (arXiv 2205.13104).

The flags stay flat; ``GuardSection`` (the divergence guard) and ``FollowSection`` (live TWA beside a
training job) are dataclasses ``TwaConfig`` inherits, each checking its own fields, as does the
``MetricsSection`` both stages share. The command line comes from :mod:`twa_scale.cli_parse`.

The lr belongs to a batch: unless ``--lr`` is given, lr = base_lr × batch_size / base_batch_size
(linear scaling from the preset's batch), and the scaled value is logged and kept in the config.
A printed config (``--print-config``) leaves the lr null when it was not set, so it rescales with
``--batch-size``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal, Sequence

from twa_scale import knobs
from twa_scale.checks import bad, check_at_least_one, check_choice, check_run_id, check_store
from twa_scale.cli_parse import parse_config
from twa_scale.train.config import DEFAULT_SNAPSHOT_URL, MetricsSection, Schedule
from twa_scale.twa.selection import parse_select, parse_select_epochs
from twa_scale.twa.stoprule import StopRule, parse_stop_rule

__all__ = ["TwaConfig", "GuardSection", "FollowSection", "parse_twa_args", "parse_select"]

log = logging.getLogger(__name__)

Optimizer = Literal["sgd", "adamw"]
Directions = Literal["raw", "centered"]
Coefficients = Literal["global", "layerwise"]
PBits = Literal[32, 16, 8, 4, 2, 1]
QuantGranularity = Literal["row-block", "block"]
FitOn = Literal["train", "holdout"]
GuardFallback = Literal["start", "error"]


@dataclasses.dataclass(kw_only=True)
class GuardSection:
    """guard: never return a model worse than the start silently"""
    guard: bool = True
    """Never return a model worse than the start silently: on divergence in any epoch, or a result below
    the start on the guard split (by more than --guard-tolerance), restart at a lower lr (see
    --guard-fallback when every lr fails). The guard split is not the reported val split."""
    guard_fallback: GuardFallback = "start"
    """When every lr fails the guard: `start` returns the start point (the uniform average of the
    selection, i.e. SWA; with --start, that snapshot) with a warning, and result.json says `returned:
    start` and why; `error` exits 2 and writes no model."""
    guard_retries: int = 3
    """Restarts the guard may make (each at lr x guard-lr-factor)."""
    guard_lr_factor: float = 0.25
    """Learning-rate factor of each restart."""
    guard_loss_factor: float = 4.0
    """Divergence: an epoch's running mean loss exceeds this many times the start point's loss."""
    guard_tolerance: float = 0.003
    """Accuracy (0..1) the fitted point may lose against the start on the guard split; beyond it the attempt
    fails, whatever its loss."""
    guard_samples: int = 1024
    """Size of the guard split carved from the training data when the run has no hold-out split (at most half
    of it); the fit leaves those images out (with --no-guard it keeps them: they are only scored)."""

    def __post_init__(self) -> None:
        check_choice("guard-fallback", self.guard_fallback, GuardFallback)
        if self.guard_retries < 0:
            bad("guard-retries", f"must be >= 0, got {self.guard_retries}")
        for flag, v, ok, want in (
                ("guard-lr-factor", self.guard_lr_factor, 0 < self.guard_lr_factor < 1, "in (0, 1)"),
                ("guard-loss-factor", self.guard_loss_factor, self.guard_loss_factor > 1, "> 1"),
                ("guard-tolerance", self.guard_tolerance, 0 <= self.guard_tolerance < 1, "in [0, 1)"),
                ("guard-samples", self.guard_samples, self.guard_samples >= 1, ">= 1")):
            if not ok:
                bad(flag, f"must be {want}, got {v}")


@dataclasses.dataclass(kw_only=True)
class FollowSection:
    """follow: live TWA beside a running training job (--follow)"""
    follow: bool = False
    """Live TWA: follow a running training job's snapshots, probe TWA every --probe-every snapshots, write
    <run>/control/STOP.json when --stop-rule fires, and run the final TWA when training ends."""
    probe_every: int = 2
    """--follow: run a probe every K newly committed snapshots (at one snapshot per epoch: every 2 epochs)."""
    probe_steps: int = 100
    """--follow: TWA steps of a probe's short fit (a seeded sample of the training data, new per probe)."""
    probe_bn_batches: int = 20
    """--follow: batches per rank a probe recalibrates BatchNorm on."""
    stop_rule: str = "gain"
    """--follow: `gain` (the upper 95% bound of the TWA probe's gain per epoch, paired per hold-out image,
    fell below --stop-price, the TWA probe is >= the SGD snapshot on the hold-out, and the run's lr is still
    in its first phase), `plateau` (the last --stop-patience probes gained < --stop-epsilon points, TWA >=
    SGD on the hold-out), `target:ACC` (a TWA probe reached ACC on the hold-out), or `none` (never stop).
    No rule reads the validation split."""
    stop_price: float = 1.0
    """--follow: the gain rule's price, in accuracy points per epoch: stop once another epoch is unlikely
    (95% upper bound) to buy this much TWA accuracy."""
    stop_at_phase_end: bool = False
    """--follow: the gain rule also hands over at the last probe of the run's first lr phase (when the TWA
    probe is >= the SGD snapshot on the hold-out): the high-lr trajectory ends there, so TWA gets it then or
    never."""
    stop_epsilon: float = 0.2
    """--follow: the plateau rule's least gain, in accuracy points (0.2 = 0.002)."""
    stop_patience: int = 3
    """--follow: probes the plateau rule looks back over."""
    stop_marker: bool = True
    """--follow: write STOP.json when the rule fires; --no-stop-marker only records the decision (`would_stop`
    in probes.json), for runs that measure where the rule would have stopped."""
    replay: bool = False
    """--follow on a finished run: probe it snapshot by snapshot, as a follower that kept up would have, and
    record every decision in probes.json (no STOP.json), then run the final TWA. For choosing a stop rule on
    runs already trained."""
    follow_timeout: float = 1800.0
    """--follow: seconds to wait for the run to appear, and then for each next snapshot, before exiting 75."""
    poll_seconds: float = 5.0
    """--follow: seconds between two looks at the run for new snapshots."""

    def __post_init__(self) -> None:
        check_at_least_one(probe_every=self.probe_every, probe_steps=self.probe_steps,
                           probe_bn_batches=self.probe_bn_batches)
        for flag, v in (("follow-timeout", self.follow_timeout), ("poll-seconds", self.poll_seconds)):
            if not v > 0:
                bad(flag, f"must be > 0 seconds, got {v}")
        if self.replay and not self.follow:
            bad("replay", "replays a follower: give --follow too")
        _ = self.rule  # one-line errors for --stop-rule and its parameters, before any work

    @property
    def rule(self) -> StopRule:
        """The --follow stop rule."""
        return parse_stop_rule(self.stop_rule, epsilon_points=self.stop_epsilon, patience=self.stop_patience,
                               price_points=self.stop_price, at_phase_end=self.stop_at_phase_end)


@dataclasses.dataclass(kw_only=True)
class TwaConfig(GuardSection, FollowSection, MetricsSection):
    """twa: the snapshots, the start point and the fit"""
    snapshot_url: str = DEFAULT_SNAPSHOT_URL
    """fsspec URL of the snapshot store (s3://bucket/prefix, file:///abs/path, memory://x); the default is
    the training job's, ./twa_runs."""
    run_id: str
    """Run name under the snapshot URL."""
    storage_options: str | None = None
    """JSON object of fsspec filesystem arguments for the snapshot and output URLs; never logged."""
    select: str | None = None
    """Snapshots A:B[:STRIDE] by sequence number (A <= seq < B); None: every committed snapshot, seq 0
    (the initial weights) included, as in the authors' head-stage scripts."""
    select_epochs: str | None = None
    """Snapshots A:B[:STRIDE] by training epoch, both ends included, through each snapshot's recorded
    epoch position: 0:60 takes every snapshot taken up to the end of epoch 60, whatever the snapshot
    cadence was (seq 0, the initial weights, is at epoch 0); an end may be a percentage of the run's
    configured epochs (0:50%, the paper's head); STRIDE keeps every STRIDE-th of them. Exclusive with
    --select: either one on the command line replaces a preset's."""
    allow_gaps: bool = False
    """Accept a --select range in which some seqs are not committed (otherwise refused, naming them)."""
    start: int | None = None
    """Start from snapshot SEQ instead of the SWA mean of the selected snapshots."""
    epochs: int = 10
    """TWA epochs (paper: 10 on CIFAR, 2 on ImageNet). 0 evaluates the start point only."""
    lr: float | None = None
    """Learning rate on the coefficients; None: base_lr × batch_size / base_batch_size (logged)."""
    base_lr: float = 2.0
    """The preset's lr at its batch base_batch_size (paper: 2 at 128 on CIFAR, 0.3 at 256 on ImageNet)."""
    base_batch_size: int = 128
    """The global batch that base_lr was tuned at."""
    momentum: float = 0.9
    """SGD momentum on the coefficients."""
    weight_decay: float = 1e-5
    """Weight decay on the coefficients (paper 1e-5; journal mode uses 0)."""
    schedule: Schedule = "step"
    """`step`: the authors' epoch-wise MultiStepLR, ÷10 at epochs int(0.5E) and int(0.75E+0.9);
    `step-per-iter` (÷10 at 50% and 75% of the steps), `linear` (to 0), `constant`, or `cosine`."""
    warmup: float = 0.0
    """Linear warm-up as a fraction of all TWA steps, int(fraction × steps) steps as in the journal's code."""
    optimizer: Optimizer = "sgd"
    """`sgd` (paper) or `adamw` (journal)."""
    directions: Directions = "raw"
    """`raw` snapshots (paper) or `centered` on the SWA mean (journal)."""
    coefficients: Coefficients = "global"
    """`global` (one per direction) or `layerwise` (one per direction and block, journal)."""
    block_size: int | None = None
    """Block size in parameters for layer-wise coefficients and quantisation; None = one block per tensor."""
    p_bits: PBits = 32
    """Storage precision of P: 32, 16, or 8/4/2/1-bit min/max quantisation (see --quant-granularity)."""
    quant_granularity: QuantGranularity = "row-block"
    """Quantisation ranges of P: `row-block`, one min/max per (snapshot, block) (finer, this project's);
    `block`, one min/max per block shared by all snapshots (the journal's code)."""
    fit_on: FitOn = "train"
    """Fit the coefficients on `train` (TWA-t) or on the `holdout` split the training excluded (TWA-v)."""
    compile: bool | None = None
    """Packed-P kernels (p-bits <= 8): True = torch.compile, False = eager; None = auto (a C kernel on CPU,
    torch.compile on CUDA). The knob TWA_SCALE_P_KERNEL overrides both."""
    rank_tol: float = 1e-5
    """Drop a snapshot whose residual after the earlier ones is below this fraction of its norm."""
    rank_spread_tol: float = 0.01
    """Drop a near-duplicate snapshot: one whose residual after the earlier ones is below this fraction of
    the trajectory's spread (the largest singular value of the centred snapshots); the fit would otherwise
    move along a direction SGD barely explored, with huge coefficients. 0 keeps every independent one."""
    batch_size: int = 128
    """Global batch size of the TWA steps (its own, not the training run's); see --lr. When it does not
    divide over the ranks, the largest per-rank batch that fits is used and the effective batch reported."""
    bn_batches: int | None = None
    """Batches per rank for BatchNorm recalibration; None = one full pass over the training data."""
    eval_every: int = 1
    """Evaluate on the validation set every K TWA epochs (0: only at the start and the end)."""
    seed: int = 0
    """Seeds the TWA data order."""
    output: str | None = None
    """Output URL; default <snapshot-url>/<run-id>/twa/."""
    data: str | None = None
    """Override the training run's --data (e.g. the dataset lives at another path here)."""
    limit_train: int | None = None
    """Override the training run's --limit-train."""
    limit_val: int | None = None
    """Override the training run's --limit-val."""
    num_workers: int = 0
    """DataLoader workers per rank."""
    plot: bool = True
    """Write coefficients.png next to result.json."""

    def __post_init__(self) -> None:
        if not self.snapshot_url:
            bad("snapshot-url", "is required")
        if not self.run_id:
            bad("run-id", "is required")
        check_run_id(self.run_id)
        parse_select(self.select)
        if self.select_epochs is not None:
            parse_select_epochs(self.select_epochs)
            if self.select is not None:
                bad("select-epochs", f"cannot be combined with --select {self.select} (pick one)")
        if self.epochs < 0:
            bad("epochs", f"must be >= 0, got {self.epochs}")
        check_at_least_one(batch_size=self.batch_size, base_batch_size=self.base_batch_size)
        if self.base_lr <= 0:
            bad("base-lr", f"must be > 0, got {self.base_lr}")
        if self.lr is None:  # derived unless set
            self.lr = self.base_lr * self.batch_size / self.base_batch_size
            if self.batch_size != self.base_batch_size:
                log.info("--lr %g: scaled linearly from lr %g at batch %d to --batch-size %d (set --lr to override)",
                         self.lr, self.base_lr, self.base_batch_size, self.batch_size)
        if self.lr <= 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            bad("momentum", f"must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            bad("weight-decay", f"must be >= 0, got {self.weight_decay}")
        for flag, v, allowed in (("schedule", self.schedule, Schedule), ("optimizer", self.optimizer, Optimizer),
                                 ("directions", self.directions, Directions),
                                 ("coefficients", self.coefficients, Coefficients), ("p-bits", self.p_bits, PBits),
                                 ("quant-granularity", self.quant_granularity, QuantGranularity),
                                 ("fit-on", self.fit_on, FitOn)):
            check_choice(flag, v, allowed)
        if not 0 <= self.warmup < 1:
            bad("warmup", f"is a fraction of the TWA steps in [0, 1), got {self.warmup}")
        if not 0 < self.rank_tol < 1:
            bad("rank-tol", f"must be in (0, 1), got {self.rank_tol}")
        if not 0 <= self.rank_spread_tol < 1:
            bad("rank-spread-tol", f"must be in [0, 1), got {self.rank_spread_tol}")
        check_at_least_one(block_size=self.block_size, bn_batches=self.bn_batches, limit_train=self.limit_train,
                           limit_val=self.limit_val)
        if self.eval_every < 0:
            bad("eval-every", f"must be >= 0, got {self.eval_every}")
        for section in (GuardSection, FollowSection, MetricsSection):
            section.__post_init__(self)
        check_store(self.snapshot_url, self.storage_options)

    @property
    def output_url(self) -> str:
        return self.output or f"{self.snapshot_url.rstrip('/')}/{self.run_id}/twa"

    @property
    def mode(self) -> str:
        paper = (self.directions, self.coefficients, self.optimizer, self.p_bits) == ("raw", "global", "sgd", 32)
        return "paper" if paper else "journal"

    def to_dict(self) -> dict[str, Any]:
        """The fields, with storage_options redacted (this dict is stored and logged)."""
        d = dataclasses.asdict(self)
        if d.get("storage_options"):
            d["storage_options"] = "<redacted>"
        return d


def join_negative_select(argv: Sequence[str]) -> list[str]:
    """``--select -5:`` -> ``--select=-5:``: argparse would read ``-5:`` as a flag."""
    import re

    out, args = [], list(argv)
    for i, a in enumerate(args):
        if i and args[i - 1] == "--select" and re.fullmatch(r"-\d*:-?\d*(:\d*)?", a):
            out[-1] = f"--select={a}"
        else:
            out.append(a)
    return out


def parse_twa_args(argv: Sequence[str] | None = None, prog: str = "launch/twa.py") -> TwaConfig:
    """Parse argv into a TwaConfig (flags, --config, --preset, environment TWA_SCALE_TWA_*).
    ``--select -5:`` is accepted as ``--select=-5:``. A selection on the command line replaces the
    preset's (the paper presets select by epoch; ``--preset paper_cifar --select 0:11`` takes seq 0..10)."""
    import sys

    argv = join_negative_select(sys.argv[1:] if argv is None else argv)
    flags = {a.split("=", 1)[0].replace("_", "-") for a in argv}
    if "--select" in flags and "--select-epochs" not in flags:
        argv = ["--select-epochs=null", *argv]
    elif "--select-epochs" in flags and "--select" not in flags:
        argv = ["--select=null", *argv]
    return parse_config(TwaConfig, argv, stage="twa", prog=prog, env_prefix=knobs.TWA_CONFIG_ENV_PREFIX[:-1],
                        description="Trainable Weight Averaging over streamed snapshots.")
