"""The TWA stage driver: load a stored run, fit the coefficients under a guard, summarise.

    from twa_scale.twa.stage import run_twa
    result = run_twa(TwaConfig(snapshot_url="file:///runs", run_id="resnet20-digits-s0"))
    print(result.twa_accuracy, result.lr_final, result.returned)

The guard: TWA never returns a model worse than its start without saying so. The start
point (the SWA mean of the selection, BatchNorm recalibrated) is evaluated on the reported
val split and on a *guard split* that the report never uses: the run's hold-out split when
the coefficients are fitted on the training data, else a fixed subset of the training data
(``guard_samples``) that the fit then leaves out. An attempt fails when any epoch diverges
(non-finite loss, or that epoch's running mean loss above ``guard_loss_factor`` x the start's)
or when the fitted point ends below the start's guard accuracy by more than ``guard_tolerance``,
whatever its loss. A failed attempt restarts from the start point at lr x ``guard_lr_factor``, at
most ``guard_retries`` times, each logged and counted in ``twa_guard_retries_total``. When every
attempt fails, the stage returns the start point with a warning (``guard_fallback="start"``, the
default), or raises a one-line error naming the learning rates and writes nothing
(``guard_fallback="error"``).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from twa_scale import comm
from twa_scale.data.config import DataConfig
from twa_scale.errors import ConfigError
from twa_scale.layout import FlatLayout
from twa_scale.twa.bn import has_batchnorm, recalibrate_bn
from twa_scale.twa.config import TwaConfig
from twa_scale.twa.quant import resolve_kernels
from twa_scale.twa.solver import (Attempt, CoefficientLoop, ShardedFlat, SnapshotRef, load_slices,
                                  select_snapshots)
from twa_scale.twa.subspace import Basis, build_basis

__all__ = ["TwaInputs", "TwaStage", "Splits", "TwaResult", "GuardReport", "BasisReport", "Timings", "TwaGuardError",
           "load_inputs", "effective_batch", "guard_split", "fit_split", "run_twa"]

log = logging.getLogger(__name__)


class TwaGuardError(ConfigError):
    """Every attempt diverged or ended worse than the start point (exit 2: rerunning cannot help)."""


def _metrics():
    from twa_scale import metrics
    return metrics


def _warn(msg: str) -> None:
    """A warning about a decision every rank took together: logged once, by rank 0."""
    if comm.rank() == 0:
        log.warning(msg)


def _model_metadata(inp: TwaInputs, out: dict) -> dict[str, str]:
    from twa_scale.data.datasets import input_normalization
    from twa_scale.report import model_metadata

    meta = inp.reader.manifest.meta
    return model_metadata(model=meta["model"], num_classes=int(meta["num_classes"]), classes=meta.get("classes"),
                          normalization=input_normalization(inp.data_cfg.data, inp.data.image_size),
                          snapshots=[s["seq"] for s in out["snapshots"]],
                          run=f"{out.get('snapshot_url', '').rstrip('/')}/{out.get('run_id')}")


def track_result(out: dict) -> None:
    """The final TWA result to the experiment tracker: accuracies, one coefficient per snapshot (step = its
    seq; the mean over layers when they are layer-wise), and result.json as text."""
    from twa_scale import tracking

    if not tracking.active():
        return
    tracking.log_metrics({f"twa/{k}": out[k] for k in ("twa_accuracy", "twa_loss", "swa_accuracy", "start_accuracy",
                                                       "lr_final", "effective_rank") if out.get(k) is not None},
                         step=len(out["epochs"]))
    for snap, a in zip(out["snapshots"], out["alpha"]):
        tracking.log_metrics({"twa/coefficient": sum(a) / len(a) if isinstance(a, list) else a}, step=snap["seq"])
    tracking.log_text("twa/result", json.dumps(out, indent=1, default=str))


# --- load ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class TwaInputs:
    """A stored run, checked: its reader, a model of its layout, the selection and its data."""
    reader: Any
    model: nn.Module
    layout: FlatLayout
    refs: list[SnapshotRef]
    data_cfg: DataConfig
    """The run's data section, with --data and --limit-* of the TWA stage over it."""
    run_config: dict
    """The training job's config as the run's manifest stores it (``TrainConfig.to_dict()``)."""
    data: Any


def _select(infos, damaged: dict[int, str], cfg: TwaConfig, run_epochs: int | None) -> list[SnapshotRef]:
    """--select-epochs through the records' epoch positions, else --select by seq (ends checked; a damaged
    snapshot in the range refused, naming it; gaps refused unless --allow-gaps)."""
    from twa_scale.twa.selection import check_select_seqs, check_selection, position, select_by_epochs

    if cfg.select_epochs is not None:
        return [SnapshotRef(i.seq, i.step, position(i))
                for i in select_by_epochs(infos, cfg.select_epochs, run_epochs)]
    check_selection(cfg.select, [i.seq for i in infos], damaged, allow_gaps=cfg.allow_gaps)
    check_select_seqs(infos, cfg.select)
    return select_snapshots(infos, cfg.select)


def load_inputs(cfg: TwaConfig, *, select: bool = True) -> TwaInputs:
    """Open the run and validate it before any TWA work (same checks on every rank). ``select`` False: no
    selection yet (``refs`` empty; the live follower takes snapshots as they are committed)."""
    from twa_scale import store
    from twa_scale.data.datasets import build_data
    from twa_scale.models import build_model

    reader = store.open_run(cfg.snapshot_url, cfg.run_id, storage_options=cfg.storage_options)
    meta = reader.manifest.meta
    for key in ("model", "num_classes"):
        if key not in meta:
            raise ValueError(f"run {cfg.snapshot_url.rstrip('/')}/{cfg.run_id}: manifest meta has no {key!r}; "
                             "it was not written by launch/train.py")
    torch.manual_seed(cfg.seed)
    model = build_model(meta["model"], int(meta["num_classes"])).to(comm.device())
    layout = FlatLayout.from_model(model)
    reader.layout.check_matches(layout, what=f"model {meta['model']!r} with {meta['num_classes']} classes")
    run_config = meta.get("config") or {}
    data_cfg = DataConfig.from_dict(run_config)
    refs = _select(*reader.scan(), cfg, run_config.get("epochs")) if select else []  # --select-epochs' % is of E
    for name in ("data", "limit_train", "limit_val"):
        if getattr(cfg, name) is not None:
            setattr(data_cfg, name, getattr(cfg, name))
    # the run stores --storage-options redacted; --data s3://... needs the stage's own
    data = build_data(data_cfg, storage_options=cfg.storage_options)
    if data.num_classes != int(meta["num_classes"]) or (meta.get("classes") and data.classes
                                                        and list(meta["classes"]) != list(data.classes)):
        raise ConfigError(f"--data {data_cfg.data}: its {data.num_classes} classes do not match the "
                          f"{meta['num_classes']} classes the run's model {meta['model']!r} was trained on")
    return TwaInputs(reader, model, layout, refs, data_cfg, run_config, data)


def effective_batch(requested: int, world: int) -> tuple[int, int]:
    """(per-rank batch, effective global batch): the largest per-rank batch whose total fits
    in ``requested`` (at least 1 per rank). Any world size works; the caller reports the total."""
    per_rank = max(1, requested // world)
    return per_rank, per_rank * world


def guard_split(data, cfg: TwaConfig) -> tuple[Any, str, list[int] | None]:
    """The split the guard evaluates on, never the reported val split: (data, name, the training indices it
    took, which the fit must then leave out, or None). The run's hold-out when the fit is on train; otherwise
    ``--guard-samples`` training images, carved out so that the guard never judges on images TWA trains on.
    With ``--no-guard`` the same images are only scored for the report, and the fit keeps them: no images
    leave the fit for a judge that does not run."""
    if data.holdout is not None and len(data.holdout) and cfg.fit_on == "train":
        return data.holdout, f"holdout ({len(data.holdout)} samples)", None
    base = getattr(data, "train_eval", None) or data.train
    n = min(cfg.guard_samples, len(base) // 2)  # at least half of the training split stays for the fit
    idx = torch.randperm(len(base), generator=torch.Generator().manual_seed(cfg.seed + 7919))[:n].sort().values
    kept = idx.tolist()
    if not cfg.guard:
        return torch.utils.data.Subset(base, kept), f"train subset ({n} samples, fitted on: --no-guard)", None
    return torch.utils.data.Subset(base, kept), f"train subset ({n} samples, not fitted on)", kept


def fit_split(data, cfg: TwaConfig, guard_indices: list[int] | None):
    """What TWA fits on: the training split (less the guard's images) or the hold-out (--fit-on holdout)."""
    if cfg.fit_on == "holdout":
        return data.holdout
    if not guard_indices:
        return data.train
    taken = set(guard_indices)
    return torch.utils.data.Subset(data.train, [i for i in range(len(data.train)) if i not in taken])


# --- result -------------------------------------------------------------------------------------
@dataclasses.dataclass
class GuardReport:
    """The guard's split, the start's guard accuracy/loss, and every attempt (lr, outcome, reason)."""
    enabled: bool
    split: str
    start_accuracy: float
    start_loss: float
    attempts: list[Attempt]
    fallback: str | None
    """`start` when every lr failed the guard and the start point was returned, else None."""

    @property
    def retries(self) -> int:
        return max(len(self.attempts) - 1, 0)

    def to_dict(self) -> dict:
        return {"enabled": self.enabled, "split": self.split, "start_accuracy": self.start_accuracy,
                "start_loss": self.start_loss, "retries": self.retries,
                "attempts": [a.to_dict() for a in self.attempts], "fallback": self.fallback}


@dataclasses.dataclass
class BasisReport:
    """What the basis kept of the selection, by seq, and the builder's own report (rank, residuals, tolerances)."""
    kept: list[int]
    dropped: list[int]
    near_duplicates: list[int]
    built: dict
    """``Basis.report`` as build_basis or GrowingBasis wrote it (indices into the selection, not seqs)."""

    @classmethod
    def of(cls, basis: Basis, seqs: Sequence[int], *, layerwise: bool) -> BasisReport:
        rep = basis.report
        return cls(kept=[seqs[i] for i in rep.get("kept", [])] if not layerwise else list(seqs),
                   dropped=[seqs[i] for i in rep.get("dropped", [])],
                   near_duplicates=[seqs[i] for i in rep.get("near_duplicates", [])], built=dict(rep))

    def to_dict(self) -> dict:
        # the builder's keys in its order, the three index lists replaced by seqs (near_duplicates last when
        # the builder has none: the layer-wise basis)
        return {**self.built, "kept": self.kept, "dropped": self.dropped, "near_duplicates": self.near_duplicates}


@dataclasses.dataclass
class Timings:
    """Wall seconds of one fit's phases on this rank. A phase that did not run stays None and is left out of
    result.json: no load or basis on a probe (its basis grew already), no BatchNorm pass on a model without
    BatchNorm, no train_seconds when every attempt diverged."""
    load_seconds: float | None = None
    basis_seconds: float | None = None
    bn_seconds: float | None = None
    eval_seconds: float | None = None
    train_seconds: float | None = None
    projection_ms_per_step: float | None = None
    total_seconds: float | None = None

    def add(self, phase: str, seconds: float) -> None:
        setattr(self, phase, (getattr(self, phase) or 0.0) + seconds)

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(kw_only=True)
class TwaResult:
    """What a TWA stage returns and writes as result.json (identical on every rank)."""
    mode: str
    world_size: int
    snapshots: list[dict]
    start: Any
    hyperparameters: dict
    global_batch: int
    """The requested global batch."""
    effective_global_batch: int
    """per_rank_batch x world_size: the largest that fits in global_batch."""
    per_rank_batch: int
    steps: int
    basis: BasisReport
    effective_rank: int
    coefficients: list
    alpha: list
    alpha_exact: bool
    alpha_sum: list
    epochs: list[dict]
    start_accuracy: float
    start_loss: float
    swa_accuracy: float | None
    twa_accuracy: float
    twa_loss: float
    returned: str
    """Which point the model file holds: `twa` (the fitted point) or `start` (--epochs 0, or every lr
    failed the guard and --guard-fallback is `start`: guard.fallback says so)."""
    lr_final: float
    guard: GuardReport
    p_kernels: str
    timings: Timings
    bytes_read_per_rank: list[int]
    p_bytes_per_rank: list[int]
    reduced_floats_per_step: int
    run_id: str | None = None
    snapshot_url: str | None = None
    model: str | None = None
    output: str | None = None
    outputs: dict | None = None

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(basis=self.basis.to_dict(), guard=self.guard.to_dict(), timings=self.timings.to_dict())
        return copy.deepcopy(out)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


# --- fit --------------------------------------------------------------------------------------
def _fit(cfg: TwaConfig, loop: CoefficientLoop, start_guard: dict,
         eval_point: Callable[[str], tuple[dict, dict]]) -> tuple[Attempt | None, nn.Parameter, dict, list[Attempt]]:
    """Attempts at lr, lr*f, lr*f^2 ... until one passes the guard; returns (attempt, theta, val eval, all).

    When every attempt fails: with --guard-fallback start, the model goes back to the start point and
    the attempt is None; with `error`, TwaGuardError."""
    ref = start_guard["loss"] if cfg.guard else None
    if ref is not None and not math.isfinite(ref):
        raise ValueError(f"the start point's loss on the guard split is {ref}: the selected snapshots are broken")
    attempts: list[Attempt] = []
    lr = cfg.lr
    for i in range(cfg.guard_retries + 1 if cfg.guard else 1):
        att, theta = loop.run(lr, ref_loss=ref)
        attempts.append(att)
        if att.outcome != "diverged":
            val, gev = eval_point("twa")
            att.guard_accuracy, att.guard_loss = gev["accuracy"], gev["loss"]
            if not cfg.guard:
                att.outcome = "unchecked"
                return att, theta, val, attempts
            floor = start_guard["accuracy"] - cfg.guard_tolerance
            # worse = less accurate than the start beyond the tolerance, whatever the loss says: a fit that
            # lowers the loss while losing accuracy is still a worse model (the fallback returns the start)
            if math.isfinite(gev["loss"]) and gev["accuracy"] >= floor:
                return att, theta, val, attempts
            att.outcome = "worse_than_start"
            att.reason = (f"guard accuracy {gev['accuracy']:.4f} < start {start_guard['accuracy']:.4f} - "
                          f"{cfg.guard_tolerance:g}" if math.isfinite(gev["loss"]) else "non-finite guard loss")
        _metrics().twa_guard_retry(att.outcome)
        last = i == cfg.guard_retries
        msg = (f"TWA guard: lr {lr:g} {att.outcome.replace('_', ' ')} ({att.reason}); "
               + ("no retries left" if last else f"restarting from the start point at lr {lr * cfg.guard_lr_factor:g}"))
        _warn(msg)
        lr *= cfg.guard_lr_factor
    tried = ", ".join(f"{a.lr:g} ({a.outcome.replace('_', ' ')})" for a in attempts)
    if cfg.guard_fallback == "error":
        raise TwaGuardError(f"TWA failed at every learning rate tried: {tried}; the last was lr "
                            f"{attempts[-1].lr:g}. No result model written. Try a smaller --lr, or --select "
                            "fewer early snapshots")
    # The start point is a model the guard has already measured, and one no worse than itself: after a
    # whole training run, returning it (said loudly) serves the user better than no model at all. Near
    # convergence this is common: one guard sample can separate the start from a fit that barely moved.
    _warn(f"TWA guard: every learning rate failed ({tried}); returning the start point "
          "(--guard-fallback start; result.json: returned start)")
    theta = loop.restart()
    val, _ = eval_point("start")  # again: BatchNorm was last recalibrated at the failed attempt's weights
    return None, theta, val, attempts



# --- the stage --------------------------------------------------------------------------------
@dataclasses.dataclass
class Splits:
    """What one fit trains on, reports on (val), recalibrates BatchNorm on, and guards on (None: the fit split)."""
    fit: Any
    val: Any
    bn: Any
    guard: Any = None
    guard_name: str = ""


class TwaStage:
    """The TWA stage on a loaded run, in named phases: :meth:`prepare` (the slices, the basis, the start point
    evaluated), :meth:`fit` (the guard loop), :meth:`summarise` (the :class:`TwaResult`); :meth:`run` is all
    of it as launch/twa.py runs it, written out by rank 0.

    One stage serves several fits over the same run, model and data: the live follower prepares each probe on
    it with its own config, splits and growing basis, then ends with :meth:`run` on the configured selection.
    The model ends each fit at the returned weights with recalibrated BatchNorm.
    """

    def __init__(self, cfg: TwaConfig, inputs: TwaInputs):
        self.cfg, self.inputs = cfg, inputs
        self.device = comm.device()
        self.per_rank_batch, self.effective_global_batch = effective_batch(cfg.batch_size, comm.world_size())

    @functools.cached_property
    def flat(self) -> ShardedFlat:
        # built at the first use: a world larger than D fails there, identically on every rank
        return ShardedFlat(self.inputs.layout, comm.world_size(), comm.rank(), self.device)

    def select(self) -> None:
        """The configured selection of the run as it is now (the live follower's stage once training has ended)."""
        inp = self.inputs
        inp.refs = _select(*inp.reader.scan(), self.cfg, inp.run_config.get("epochs"))

    def run_splits(self) -> Splits:
        """The configured splits: fit on train (less the guard's images) or the hold-out, report on val."""
        data, cfg = self.inputs.data, self.cfg
        if cfg.fit_on == "holdout" and not data.holdout:
            raise ValueError("--fit-on holdout: the run has no held-out split; train it with --holdout-fraction > 0")
        guard_data, guard_name, guard_indices = guard_split(data, cfg)
        return Splits(fit=fit_split(data, cfg, guard_indices), val=data.val, bn=data.train, guard=guard_data,
                      guard_name=guard_name)

    # --- prepare ------------------------------------------------------------------------------------
    def prepare(self, refs: Sequence[SnapshotRef] | None = None, *, cfg: TwaConfig | None = None,
                splits: Splits | None = None, basis: Basis | None = None) -> None:
        """Load the slices, build the basis, evaluate the start point. Defaults: the run's selection, the
        stage's config and splits. ``basis``: one built already over ``refs`` in their order (the live
        follower's GrowingBasis); nothing is loaded then."""
        from twa_scale.data.datasets import make_loader

        self.fit_cfg = cfg = cfg or self.cfg
        self.splits = splits = splits or self.run_splits()
        self.refs = refs = list(self.inputs.refs if refs is None else refs)
        self.timings = Timings()
        self._t_total = time.perf_counter()
        world, per_rank = comm.world_size(), self.per_rank_batch
        n = len(refs)
        if n < 2:
            raise ValueError(f"--select {cfg.select or '1:'}: TWA needs at least 2 snapshots, selected {n} "
                             f"({[r.seq for r in refs]})")
        seqs = [r.seq for r in refs]
        alpha_start = torch.full((n,), 1.0 / n, dtype=torch.float64)
        if cfg.start is not None:
            if cfg.start not in seqs:
                raise ValueError(f"--start {cfg.start}: not among the selected snapshots {seqs}")
            alpha_start = torch.zeros(n, dtype=torch.float64)
            alpha_start[seqs.index(cfg.start)] = 1.0
        model, layout, flat = self.inputs.model, self.inputs.layout, self.flat

        # --- load: only columns S_r of each snapshot, then the basis --------------------------------
        self.kernels = kernels = resolve_kernels(self.device, cfg.compile)
        self.bytes_read = 0
        if basis is None:
            x, self.bytes_read, self.timings.load_seconds = comm.agree(
                lambda: load_slices(refs, self.inputs.reader.read, flat.start, flat.stop, self.device),
                "reading snapshot slices")
            t0 = time.perf_counter()
            basis = build_basis(x, flat.start, flat.stop, layout.blocks(cfg.block_size), directions=cfg.directions,
                                layerwise=cfg.coefficients == "layerwise", bits=cfg.p_bits, alpha_start=alpha_start,
                                reduce=comm.all_reduce, tol=cfg.rank_tol, spread_tol=cfg.rank_spread_tol,
                                granularity=cfg.quant_granularity,
                                kernels=kernels)
            del x
            self.timings.basis_seconds = time.perf_counter() - t0
        self.basis = basis
        _metrics().twa_effective_rank(basis.k)
        if basis.report.get("dropped"):
            near = basis.report.get("near_duplicates") or []
            _warn(f"TWA basis: dropped {len(basis.report['dropped'])} direction(s) (seq "
                  f"{[seqs[i] for i in basis.report['dropped']]}; {len(near)} near-duplicate(s) within "
                  f"{basis.report.get('spread_tol', 0):g} x the snapshots' spread); effective rank {basis.k} of {n}")

        workers = cfg.num_workers
        self._val_loader = make_loader(splits.val, batch_size=per_rank, train=False, num_workers=workers)
        guard_data = splits.fit if splits.guard is None else splits.guard
        self._guard_loader = make_loader(guard_data, batch_size=per_rank, train=False, num_workers=workers)
        fit_data = splits.fit
        steps_per_epoch = len(make_loader(fit_data, batch_size=per_rank, train=True, seed=cfg.seed, epoch=0))
        if cfg.epochs and steps_per_epoch == 0:
            raise ValueError(f"--batch-size: the {cfg.fit_on} split has {len(fit_data)} samples, fewer than one "
                             f"global batch of {per_rank * world}")
        self.loop = CoefficientLoop(cfg=cfg, basis=basis, flat=flat, model=model, params=layout.trainable(model),
                                    loader=lambda epoch: make_loader(fit_data, batch_size=per_rank, train=True,
                                                                     seed=cfg.seed, epoch=epoch, num_workers=workers),
                                    steps_per_epoch=steps_per_epoch, device=self.device, evaluate_val=self._eval_val,
                                    timings=self.timings)

        # --- the start point is evaluated in every case ----------------------------------------------
        self.theta = self.loop.restart()
        self.start_eval, self.start_guard = self._eval_point("start")
        _metrics().twa_coefficients(basis.alpha(self.theta).flatten().tolist())

    def _evaluate(self, loader, desc: str) -> dict:
        from twa_scale.evaluation import evaluate

        t = time.perf_counter()
        ev = evaluate(self.inputs.model, loader, self.device, desc=desc)
        self.timings.add("eval_seconds", time.perf_counter() - t)
        return ev

    def _eval_val(self, tag: str) -> dict:
        return self._evaluate(self._val_loader, tag)

    def _eval_point(self, tag: str) -> tuple[dict, dict]:
        """BatchNorm recalibrated at the current weights, then the val and guard splits."""
        from twa_scale.data.datasets import make_loader

        cfg, model = self.fit_cfg, self.inputs.model
        if has_batchnorm(model):
            bn_loader = make_loader(self.splits.bn, batch_size=self.per_rank_batch, train=True, seed=cfg.seed,
                                    epoch=10_000, num_workers=cfg.num_workers)
            t = time.perf_counter()
            recalibrate_bn(model, bn_loader, self.device, max_batches=cfg.bn_batches)
            self.timings.add("bn_seconds", time.perf_counter() - t)
        ev = self._eval_val(tag)
        _metrics().twa_eval(ev["accuracy"])
        gev = self._evaluate(self._guard_loader, f"{tag} (guard)")
        return ev, gev

    # --- fit ------------------------------------------------------------------------------------------
    def fit(self) -> None:
        """The guard loop (--epochs 0: the start point, unfitted)."""
        cfg = self.fit_cfg
        self.attempts: list[Attempt] = []
        if cfg.epochs:
            chosen, self.theta, self.final_eval, self.attempts = _fit(cfg, self.loop, self.start_guard,
                                                                      self._eval_point)
            if chosen is None:  # every lr failed the guard: the start point, as with --epochs 0
                self.history, self.lr_final, self.returned = [], cfg.lr, "start"
            else:
                self.history, self.lr_final, self.returned = chosen.epochs, chosen.lr, "twa"
            if self.history:
                self.history[-1].update(val_loss=self.final_eval["loss"], val_accuracy=self.final_eval["accuracy"])
        else:
            self.final_eval, self.history, self.lr_final, self.returned = self.start_eval, [], cfg.lr, "start"

    # --- summarise --------------------------------------------------------------------------------
    def summarise(self) -> TwaResult:
        cfg, basis, theta, timings = self.fit_cfg, self.basis, self.theta, self.timings
        world, per_rank = comm.world_size(), self.per_rank_batch
        steps = self.loop.steps
        timings.projection_ms_per_step = 1e3 * self.loop.projection_seconds / max(steps, 1)
        timings.total_seconds = time.perf_counter() - self._t_total
        gathered = torch.zeros(world * 2, dtype=torch.float64, device=self.device)
        comm.all_gather(gathered, torch.tensor([float(self.bytes_read), float(basis.nbytes)], dtype=torch.float64,
                                               device=self.device))
        alpha = basis.alpha(theta)
        layerwise = basis.num_coef_blocks > 1 or cfg.coefficients == "layerwise"
        coef = theta.detach().double()
        start_guard = self.start_guard
        return TwaResult(
            mode=cfg.mode, world_size=world, snapshots=[dataclasses.asdict(r) for r in self.refs],
            start="swa" if cfg.start is None else cfg.start,
            hyperparameters={k: v for k, v in cfg.to_dict().items()
                             if k not in ("snapshot_url", "run_id", "output", "metrics_port", "metrics_addr")},
            global_batch=cfg.batch_size, effective_global_batch=per_rank * world,
            per_rank_batch=per_rank, steps=steps,
            basis=BasisReport.of(basis, [r.seq for r in self.refs], layerwise=layerwise), effective_rank=basis.k,
            coefficients=coef.squeeze(1).tolist() if not layerwise else coef.tolist(),
            alpha=alpha.squeeze(1).tolist() if not layerwise else alpha.tolist(),
            alpha_exact=cfg.p_bits == 32, alpha_sum=alpha.sum(0).tolist(), epochs=self.history,
            start_accuracy=self.start_eval["accuracy"], start_loss=self.start_eval["loss"],
            swa_accuracy=self.start_eval["accuracy"] if cfg.start is None else None,
            twa_accuracy=self.final_eval["accuracy"], twa_loss=self.final_eval["loss"], returned=self.returned,
            lr_final=self.lr_final,
            guard=GuardReport(enabled=cfg.guard, split=self.splits.guard_name or "fit split",
                              start_accuracy=start_guard["accuracy"], start_loss=start_guard["loss"],
                              attempts=self.attempts,
                              fallback="start" if self.attempts and self.returned == "start" else None),
            p_kernels=self.kernels.path if cfg.p_bits <= 8 else "dense", timings=timings,
            bytes_read_per_rank=[int(v) for v in gathered[0::2].tolist()],
            p_bytes_per_rank=[int(v) for v in gathered[1::2].tolist()],
            reduced_floats_per_step=basis.k * basis.num_coef_blocks + 1,
            run_id=self.cfg.run_id, snapshot_url=self.cfg.snapshot_url, model=self.inputs.reader.manifest.meta["model"],
            output=self.cfg.output_url,
        )

    # --- the whole stage --------------------------------------------------------------------------
    def run(self) -> TwaResult:
        """prepare, fit and summarise on the configured selection, tracked; rank 0 writes the outputs."""
        from twa_scale import tracking

        cfg = self.cfg
        try:
            tracking.setup(cfg.logger, run_url=f"{cfg.snapshot_url.rstrip('/')}/{cfg.run_id}", run_id=cfg.run_id,
                           stage="twa", storage_options=cfg.storage_options)
            tracking.log_params(cfg.to_dict())
            world, requested = comm.world_size(), cfg.batch_size
            if self.effective_global_batch != requested and comm.rank() == 0:
                print(f"TWA batch: {requested} does not divide over {world} ranks; using {self.per_rank_batch} per "
                      f"rank (effective global batch {self.effective_global_batch})", flush=True)
            self.prepare()
            self.fit()
            result = self.summarise()
            comm.agree(lambda: self._write(result), f"writing the TWA result to {cfg.output_url}")
            return result
        finally:
            tracking.close()

    def _write(self, result: TwaResult) -> None:
        from twa_scale import report

        if comm.rank() != 0:
            return
        cfg = self.cfg
        out = result.to_dict()
        result.outputs = report.write_outputs(out, self.inputs.model.state_dict(), cfg.output_url, plot=cfg.plot,
                                              storage_options=cfg.storage_options,
                                              metadata=_model_metadata(self.inputs, out))
        print(report.format_table(out), flush=True)
        track_result(out)


def run_twa(cfg: TwaConfig) -> TwaResult:
    """Run the TWA stage on every rank of the job; returns the result (same on every rank).

    Rank 0 writes model.safetensors, coefficients.png and, last, result.json under
    ``cfg.output_url``; nothing is written when an input check or the guard fails.
    """
    from twa_scale import metrics

    comm.init()
    metrics.setup(run_id=cfg.run_id, role="twa", port=cfg.metrics_port, addr=cfg.metrics_addr)
    return TwaStage(cfg, load_inputs(cfg)).run()
