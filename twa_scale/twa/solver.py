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
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from twa_scale import comm
from twa_scale.engine import lr_factor
from twa_scale.layout import FlatLayout
from twa_scale.twa.bn import has_batchnorm, recalibrate_bn
from twa_scale.twa.config import TwaConfig, parse_select
from twa_scale.twa.subspace import Basis, build_basis, use_compiled_kernels

__all__ = ["SliceLoader", "SnapshotRef", "select_snapshots", "ShardedFlat", "solve", "agree"]

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
    lo = refs[0].seq if a is None else a
    return [r for r in refs if r.seq >= lo and (b is None or r.seq < b) and (r.seq - lo) % stride == 0]


def agree(fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn`` on every rank; if it fails anywhere, every rank raises.

    Without this a rank that hits a corrupt shard would raise while the others
    block forever in the next collective.
    """
    err, out = None, None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below on every rank
        err = e
    if comm.world_size() == 1:
        if err is not None:
            raise err
        return out
    flag = torch.tensor([float(comm.rank() + 1) if err is not None else 0.0], device=comm.device())
    comm.all_reduce(flag, op="max")
    bad = int(flag.item())
    if bad:
        kind = next((k for k in (ValueError, KeyError, OSError) if isinstance(err, k)), RuntimeError)
        info = comm.broadcast_object((kind.__name__, f"{type(err).__name__}: {err}") if err is not None else None,
                                     src=bad - 1)
        if err is not None:
            raise err
        # the other ranks raise the same kind of error, so launchers report it the same way
        kind = {"ValueError": ValueError, "KeyError": KeyError, "OSError": OSError}.get(info[0], RuntimeError)
        raise kind(f"rank {bad - 1} failed while {what}: {info[1]}")
    return out


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


def _build_optimizer(cfg: TwaConfig, theta: nn.Parameter) -> torch.optim.Optimizer:
    # The optimizer state lives on the k (or k*L) coefficients: projected SGD on w with
    # momentum and weight decay follows the same path as SGD on beta (w = Pᵀ beta).
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW([theta], lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD([theta], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _load_slices(refs: Sequence[SnapshotRef], load: SliceLoader, start: int, stop: int,
                 device: torch.device) -> tuple[torch.Tensor, int, float]:
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


def solve(cfg: TwaConfig, *, model: nn.Module, layout: FlatLayout, refs: Sequence[SnapshotRef],
          load: SliceLoader, fit_data, val_data, bn_data, per_rank_batch: int,
          device: torch.device | None = None, make_loader: Callable[..., Any] | None = None,
          evaluate: Callable[..., dict] | None = None) -> tuple[dict, Basis]:
    """Run the TWA stage on an already-built model; returns (result, basis).

    ``load`` reads snapshot slices, so tests can drive this without a store.
    ``make_loader``/``evaluate`` default to twa_scale.data / twa_scale.evaluation.
    The model ends at the TWA weights with recalibrated BatchNorm.
    """
    if make_loader is None:
        from twa_scale.data import make_loader
    if evaluate is None:
        from twa_scale.evaluation import evaluate
    device = device or comm.device()
    rank, world = comm.rank(), comm.world_size()
    timings: dict[str, float] = {}
    t_total = time.perf_counter()

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
    params = layout.trainable(model)
    flat = ShardedFlat(layout, world, rank, device)  # world > D fails here, identically on every rank

    # --- sharded load: only columns S_r of each snapshot ------------------------------------
    x, bytes_read, timings["load_seconds"] = agree(
        lambda: _load_slices(refs, load, flat.start, flat.stop, device), "reading snapshot slices")

    # --- basis ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if cfg.p_bits <= 8 and (cfg.compile or (cfg.compile is None and device.type == "cuda")):
        use_compiled_kernels(True)
    blocks = layout.blocks(cfg.block_size)
    basis = build_basis(x, flat.start, flat.stop, blocks, directions=cfg.directions,
                        layerwise=cfg.coefficients == "layerwise", bits=cfg.p_bits, alpha_start=alpha_start,
                        reduce=comm.all_reduce, tol=cfg.rank_tol)
    del x
    timings["basis_seconds"] = time.perf_counter() - t0
    _metrics().twa_effective_rank(basis.k)
    if basis.report.get("dropped"):
        msg = (f"TWA basis: dropped {len(basis.report['dropped'])} nearly dependent direction(s) "
               f"(seq {[seqs[i] for i in basis.report['dropped']]}); effective rank {basis.k} of {n}")
        log.warning(msg)
        if rank == 0:
            print(msg, flush=True)

    theta = nn.Parameter(basis.theta0.clone())
    opt = _build_optimizer(cfg, theta)
    w_local = basis.reconstruct(theta.detach())
    flat.assemble(w_local, params)

    workers = cfg.num_workers
    val_loader = make_loader(val_data, batch_size=per_rank_batch, train=False, num_workers=workers)

    def bn_and_eval(tag: str) -> dict:
        t = time.perf_counter()
        if has_batchnorm(model):
            recalibrate_bn(model, make_loader(bn_data, batch_size=per_rank_batch, train=True, seed=cfg.seed,
                                              epoch=10_000, num_workers=workers), device, max_batches=cfg.bn_batches)
        timings["bn_seconds"] = timings.get("bn_seconds", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        ev = evaluate(model, val_loader, device, desc=tag)
        timings["eval_seconds"] = timings.get("eval_seconds", 0.0) + time.perf_counter() - t
        return ev

    start_eval = bn_and_eval("start")
    _metrics().twa_eval(start_eval["accuracy"])
    alpha0 = basis.alpha(theta)
    _metrics().twa_coefficients(alpha0.flatten().tolist())

    # --- coefficient loop ---------------------------------------------------------------------
    steps_per_epoch = len(make_loader(fit_data, batch_size=per_rank_batch, train=True, seed=cfg.seed, epoch=0))
    if cfg.epochs and steps_per_epoch == 0:
        raise ValueError(f"--batch-size: the {cfg.fit_on} split has {len(fit_data)} samples, fewer than one "
                         f"global batch of {per_rank_batch * world}")
    def factor(t: int) -> float:  # the training job's schedule function
        return lr_factor(t, schedule=cfg.schedule, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                         warmup_steps=int(cfg.warmup * cfg.epochs * steps_per_epoch))
    history: list[dict] = []
    proj_seconds, step = 0.0, 0
    t_train = time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs):
        loader = make_loader(fit_data, batch_size=per_rank_batch, train=True, seed=cfg.seed, epoch=epoch,
                             num_workers=workers)
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        for xb, yb in loader:
            lr = cfg.lr * factor(step)
            for group in opt.param_groups:
                group["lr"] = lr
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            for p in params:
                p.grad = None
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            loss.backward()
            g_local = flat.grad_slice(params)
            tp = time.perf_counter()
            c = basis.project(g_local)
            comm.all_reduce(c)  # the only per-step reduction the TWA method adds: k*L floats
            dt = time.perf_counter() - tp
            proj_seconds += dt
            _metrics().twa_projection(dt)
            theta.grad = c.to(theta.dtype)
            opt.step()
            basis.reconstruct(theta.detach(), out=w_local)
            flat.assemble(w_local, params)
            step += 1
            sums += torch.tensor([loss.item() * yb.numel(), (logits.argmax(1) == yb).sum().item(), yb.numel()],
                                 dtype=torch.float64)
            _metrics().twa_step(loss.item())
        comm.all_reduce(sums)
        row = {"epoch": epoch + 1, "train_loss": sums[0].item() / max(sums[2].item(), 1),
               "train_accuracy": sums[1].item() / max(sums[2].item(), 1), "lr": cfg.lr * factor(max(step - 1, 0))}
        if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0) and epoch + 1 < cfg.epochs:
            t = time.perf_counter()
            ev = evaluate(model, val_loader, device, desc=f"twa epoch {epoch + 1}")
            timings["eval_seconds"] = timings.get("eval_seconds", 0.0) + time.perf_counter() - t
            row.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"])
            _metrics().twa_eval(ev["accuracy"])
        history.append(row)
        _metrics().twa_coefficients(basis.alpha(theta).flatten().tolist())
        if rank == 0:
            print(f"twa epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}"
                  + (f" val acc {row['val_accuracy']:.4f}" if "val_accuracy" in row else ""), flush=True)
    timings["train_seconds"] = time.perf_counter() - t_train

    final_eval = bn_and_eval("twa") if cfg.epochs else start_eval
    if history:
        history[-1].update(val_loss=final_eval["loss"], val_accuracy=final_eval["accuracy"])
    _metrics().twa_eval(final_eval["accuracy"])
    timings["total_seconds"] = time.perf_counter() - t_total
    timings["projection_ms_per_step"] = 1e3 * proj_seconds / max(step, 1)

    per_rank = torch.zeros(world * 2, dtype=torch.float64, device=device)
    comm.all_gather(per_rank, torch.tensor([float(bytes_read), float(basis.nbytes)], dtype=torch.float64,
                                           device=device))
    alpha = basis.alpha(theta)
    layerwise = basis.num_coef_blocks > 1 or cfg.coefficients == "layerwise"
    report = dict(basis.report)
    report["kept"] = [seqs[i] for i in report.get("kept", [])] if not layerwise else seqs
    report["dropped"] = [seqs[i] for i in report.get("dropped", [])]
    result = {
        "mode": cfg.mode,
        "world_size": world,
        "snapshots": [dataclasses.asdict(r) for r in refs],
        "start": "swa" if cfg.start is None else cfg.start,
        "hyperparameters": {k: v for k, v in cfg.to_dict().items()
                            if k not in ("snapshot_url", "run_id", "output", "metrics_port", "metrics_addr")},
        "per_rank_batch": per_rank_batch,
        "steps": step,
        "basis": report,
        "effective_rank": basis.k,
        "coefficients": theta.detach().double().squeeze(1).tolist() if not layerwise else theta.detach().double().tolist(),
        "alpha": alpha.squeeze(1).tolist() if not layerwise else alpha.tolist(),
        "alpha_exact": cfg.p_bits == 32,
        "alpha_sum": alpha.sum(0).tolist(),
        "epochs": history,
        "start_accuracy": start_eval["accuracy"],
        "start_loss": start_eval["loss"],
        "swa_accuracy": start_eval["accuracy"] if cfg.start is None else None,
        "twa_accuracy": final_eval["accuracy"],
        "twa_loss": final_eval["loss"],
        "timings": timings,
        "bytes_read_per_rank": [int(v) for v in per_rank[0::2].tolist()],
        "p_bytes_per_rank": [int(v) for v in per_rank[1::2].tolist()],
        "reduced_floats_per_step": basis.k * basis.num_coef_blocks,
    }
    return result, basis
