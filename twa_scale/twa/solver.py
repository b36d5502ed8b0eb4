"""The TWA coefficient loop, column-sharded.

Rank r holds P[:, S_r]. Per step:
  forward/backward on the full model over this rank's batch;
  reduce-scatter of the flat gradient (the data-parallel reduction; each rank
  only needs g[S_r], so this is half an all-reduce);
  c_r = P[:, S_r] g[S_r]; one all-reduce of k*L floats;
  the same optimizer step on the coefficients on every rank;
  w[S_r] rebuilt locally; one all-gather assembles the model weights.
The D-length traffic is one reduce-scatter + one all-gather, i.e. exactly the
data-parallel all-reduce (ZeRO-2 pattern); the authors' row-sharded scheme adds a
D-length all-reduce on top.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from twa_scale import comm, tracking
from twa_scale.train.schedule import lr_factor
from twa_scale.layout import FlatLayout
from twa_scale.train.steplog import StepLog
from twa_scale.twa.config import TwaConfig, parse_select
from twa_scale.twa.subspace import Basis

__all__ = ["SliceLoader", "SnapshotRef", "select_snapshots", "ShardedFlat", "build_optimizer",
           "load_slices", "Attempt", "CoefficientLoop"]

log = logging.getLogger(__name__)

SliceLoader = Callable[[int, int, int], torch.Tensor]
"""(seq, start, stop) -> fp32 flat tensor w_seq[start:stop]; the store reader's ``read``."""


@dataclasses.dataclass(frozen=True)
class SnapshotRef:
    seq: int
    step: int | None = None
    epoch: float | None = None


def _metrics():
    from twa_scale import metrics
    return metrics


def select_snapshots(infos: Sequence[Any], spec: str | None) -> list[SnapshotRef]:
    """Snapshots whose seq is in range(A, B, STRIDE) (A defaults to the first committed seq)."""
    a, b, stride = parse_select(spec)
    refs = [SnapshotRef(int(i.seq), getattr(i, "step", None), getattr(i, "epoch", None)) for i in infos]
    if not refs:
        return []
    end = refs[-1].seq + 1  # negative A or B count back from here: -5: is the last five seqs
    a = a + end if a is not None and a < 0 else a
    b = b + end if b is not None and b < 0 else b
    lo = refs[0].seq if a is None else a
    return [r for r in refs if r.seq >= lo and (b is None or r.seq < b) and (r.seq - lo) % stride == 0]


class ShardedFlat:
    """Padded flat buffers for the two D-length collectives.

    Slice r of [0, D) sits at [r*m, r*m + |S_r|) so reduce-scatter and all-gather
    work on equal chunks (slices differ in size by at most one).
    """

    def __init__(self, layout: FlatLayout, world: int, rank: int, device: torch.device):
        self.layout, self.world, self.rank = layout, world, rank
        self.slices = layout.slices(world)  # raises when world > D
        self.start, self.stop = self.slices[rank]
        self.m = max(e - s for s, e in self.slices)
        self.full = torch.zeros(world * self.m, dtype=torch.float32, device=device)
        self.local = torch.zeros(self.m, dtype=torch.float32, device=device)

    @property
    def d(self) -> int:
        return self.stop - self.start

    def grad_slice(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """g[S_r] averaged over ranks (the data-parallel reduction, as a reduce-scatter)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for r, (s, e) in enumerate(self.slices):
            self.layout.gather(grads, s, e, out=self.full[r * self.m: r * self.m + e - s])
        comm.reduce_scatter(self.local, self.full)
        return self.local[: self.d].div_(self.world)

    def assemble(self, w_local: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        """All-gather every rank's w[S_r] and write the full w into ``params``."""
        self.local[: self.d].copy_(w_local)
        comm.all_gather(self.full, self.local)
        for r, (s, e) in enumerate(self.slices):
            self.layout.scatter(self.full[r * self.m: r * self.m + e - s], params, s, e)


def build_optimizer(cfg: TwaConfig, theta: nn.Parameter, lr: float) -> torch.optim.Optimizer:
    """The optimizer on the k (or k*L) coefficients: projected SGD on w with momentum and
    weight decay follows the same path as SGD on beta (w = Pᵀ beta)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW([theta], lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD([theta], lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def load_slices(refs: Sequence[SnapshotRef], load: SliceLoader, start: int, stop: int,
                device: torch.device) -> tuple[torch.Tensor, int, float]:
    """X[:, start:stop] of the selected snapshots (n x d fp32), bytes read, seconds."""
    d = stop - start
    x = torch.empty(len(refs), d, dtype=torch.float32, device=device)
    nbytes, t_all = 0, time.perf_counter()
    for i, ref in enumerate(refs):
        t0 = time.perf_counter()
        part = load(ref.seq, start, stop)
        if part.numel() != d:
            raise ValueError(f"snapshot seq {ref.seq}: read {part.numel()} values for slice [{start}, {stop}), "
                             f"expected {d} (snapshot of a different layout?)")
        x[i].copy_(part.reshape(-1))
        nb = part.numel() * part.element_size()
        nbytes += nb
        _metrics().twa_load(time.perf_counter() - t0, nb)
    return x, nbytes, time.perf_counter() - t_all


@dataclasses.dataclass
class Attempt:
    """One pass of the coefficient loop at one learning rate."""
    lr: float
    outcome: str = "ok"
    """ok | diverged (any epoch's loss) | worse_than_start (guard split) | unchecked (guard off)."""
    reason: str = ""
    steps: int = 0
    epochs: list[dict] = dataclasses.field(default_factory=list)
    guard_accuracy: float | None = None
    guard_loss: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CoefficientLoop:
    """Projected SGD (or AdamW) on the coefficients, column-sharded: everything one attempt needs.

    Per step: forward/backward on this rank's batch, reduce-scatter of g, c_r = P[:, S_r] g[S_r],
    one all-reduce of k*L floats (+1: the batch loss rides along for the divergence check),
    the optimizer step on theta, w[S_r] rebuilt, one all-gather.
    """
    cfg: TwaConfig
    basis: Basis
    flat: ShardedFlat
    model: nn.Module
    params: list
    loader: Callable[[int], Any]       # epoch -> this rank's batches of the fit split
    steps_per_epoch: int
    device: torch.device
    evaluate_val: Callable[[str], dict]
    timings: Any
    """The stage's :class:`~twa_scale.twa.stage.Timings`: train_seconds accumulates over attempts."""
    steps: int = 0
    """Steps of the attempts that ran to the end (a diverged attempt's are not counted)."""
    projection_seconds: float = 0.0

    def restart(self) -> nn.Parameter:
        """Back to the start point: theta = theta0 and the model at w_start."""
        theta = nn.Parameter(self.basis.theta0.clone())
        self.w_local = self.basis.reconstruct(theta.detach())
        self.flat.assemble(self.w_local, self.params)
        return theta

    def run(self, lr: float, *, ref_loss: float | None) -> tuple[Attempt, nn.Parameter]:
        """Fit at ``lr``. With ``ref_loss`` (the start point's loss), stop early as ``diverged`` when a loss
        is non-finite or an epoch's running mean is above guard_loss_factor x the reference (the larger of
        ``ref_loss`` and the first batch's loss, which is still at the start point), in every epoch: a fit can
        blow up late, when its lr is still high, and recover as the lr falls to a worse point."""
        cfg, world = self.cfg, comm.world_size()
        att = Attempt(lr=lr)
        theta = self.restart()
        opt = build_optimizer(cfg, theta, lr)
        spe = self.steps_per_epoch

        def factor(t: int) -> float:  # the training job's schedule function
            return lr_factor(t, schedule=cfg.schedule, epochs=cfg.epochs, steps_per_epoch=spe,
                             warmup_steps=int(cfg.warmup * cfg.epochs * spe))
        proj_seconds, step = 0.0, 0
        t_train = time.perf_counter()
        self.model.train()
        guard = {"ref": ref_loss, "sum": 0.0, "n": 0, "first": True}

        def diverged(rows, epoch: int) -> str | None:
            """The guard over the steps just read (the loss of all ranks, extra[1]): this epoch's running mean."""
            for row in rows:
                step_loss = row.extra[1]
                if guard["first"] and math.isfinite(step_loss):
                    # the first batch is still at the start point, in train mode (batch statistics)
                    guard["ref"], guard["first"] = max(guard["ref"], step_loss), False
                guard["sum"], guard["n"] = guard["sum"] + step_loss, guard["n"] + 1
                mean = guard["sum"] / guard["n"]
                if not math.isfinite(step_loss):
                    return f"epoch {epoch + 1} step {guard['n']}: non-finite loss"
                if guard["n"] >= min(3, self.steps_per_epoch) and mean > cfg.guard_loss_factor * guard["ref"]:
                    return (f"epoch {epoch + 1} step {guard['n']}: mean loss {mean:.4g} > {cfg.guard_loss_factor:g} "
                            f"x start loss {guard['ref']:.4g}")
            return None

        for epoch in range(cfg.epochs):
            # Losses stay on the device; the host reads them every log_every_steps steps (one sync),
            # so the guard sees a diverging epoch at that cadence (a restart resets theta anyway).
            steps = StepLog(cfg.log_every_steps, self.device, extra=2,
                            on_rows=lambda rows: [_metrics().twa_step(r.extra[1]) for r in rows])
            check = ref_loss is not None
            guard["sum"], guard["n"] = 0.0, 0  # each epoch's running mean is judged on its own
            for xb, yb in self.loader(epoch):
                for group in opt.param_groups:
                    group["lr"] = lr * factor(step)
                xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
                for p in self.params:
                    p.grad = None
                logits = self.model(xb)
                loss = F.cross_entropy(logits, yb)
                loss.backward()
                g_local = self.flat.grad_slice(self.params)
                tp = time.perf_counter()
                c = self.basis.project(g_local)
                buf = torch.cat([c.reshape(-1), loss.detach().float().reshape(1)])
                comm.all_reduce(buf)  # the only per-step reduction the TWA method adds: k*L floats (+ the loss)
                dt = time.perf_counter() - tp
                proj_seconds += dt
                _metrics().twa_projection(dt)
                theta.grad = buf[:-1].view_as(c).to(theta.dtype)
                opt.step()
                self.basis.reconstruct(theta.detach(), out=self.w_local)
                self.flat.assemble(self.w_local, self.params)
                step += 1
                rows = steps.step(loss, yb.numel(), lr * factor(step - 1), (logits.argmax(1) == yb).sum(),
                                  buf[-1] / world)
                if check and rows and (reason := diverged(rows, epoch)):
                    att.outcome, att.reason, att.steps = "diverged", reason, step
                    return att, theta
            rows = steps.flush()
            if check and (reason := diverged(rows, epoch)):
                att.outcome, att.reason, att.steps = "diverged", reason, step
                return att, theta
            # loss sum, correct, count; on the device (NCCL reduces device tensors only)
            sums = torch.tensor([steps.loss_sum, steps.extra_sums[0], steps.samples], dtype=torch.float64,
                                device=self.device)
            comm.all_reduce(sums)
            row = {"epoch": epoch + 1, "train_loss": sums[0].item() / max(sums[2].item(), 1),
                   "train_accuracy": sums[1].item() / max(sums[2].item(), 1), "lr": lr * factor(max(step - 1, 0))}
            if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0) and epoch + 1 < cfg.epochs:
                ev = self.evaluate_val(f"twa epoch {epoch + 1}")
                row.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"])
                _metrics().twa_eval(ev["accuracy"])
            att.epochs.append(row)
            _metrics().twa_coefficients(self.basis.alpha(theta).flatten().tolist())
            tracking.log_metrics({f"twa/epoch_{k}": v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            if comm.rank() == 0:
                print(f"twa epoch {epoch + 1}/{cfg.epochs} (lr {lr:g}): loss {row['train_loss']:.4f}"
                      + (f" val acc {row['val_accuracy']:.4f}" if "val_accuracy" in row else ""), flush=True)
        att.steps = step
        self.timings.add("train_seconds", time.perf_counter() - t_train)
        self.projection_seconds += proj_seconds
        self.steps += step
        return att, theta
