"""Helpers for TWA tests: real snapshot trajectories, runs written through the store
by any number of writer ranks, and gloo process groups on CPU.

Workers live here (an importable module) so ``torch.multiprocessing.spawn`` can
start them whatever the test runner's import mode.
"""
from __future__ import annotations

import os
import sys
import traceback
import uuid
from typing import Any, Callable, Sequence

import torch

from tests.support import free_port

__all__ = ["digits_config", "make_trajectory", "write_run", "run_ranks", "gram_schmidt"]


def digits_config(**overrides):
    """A small TrainConfig on the built-in digits data (mlp unless overridden)."""
    from twa_scale.train.config import TrainConfig

    kw = dict(model="mlp", data="digits", epochs=1, lr=0.1, batch_size=48, limit_train=240, limit_val=120,
              seed=0, snapshot_url="memory://unused", run_id="t")
    kw.update(overrides)
    return TrainConfig(**kw)


def make_trajectory(cfg, n: int, *, steps_between: int = 4, lr: float = 0.2) -> tuple[torch.nn.Module, list]:
    """Train ``cfg.model`` with plain SGD on ``cfg``'s data and take n+1 flat snapshots
    (seq 0 = initial weights). Returns (model, [w_0, ..., w_n])."""
    from twa_scale.data.datasets import build_data
    from twa_scale.layout import FlatLayout
    from twa_scale.models import build_model

    data = build_data(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes)
    layout = FlatLayout.from_model(model)
    params = layout.trainable(model)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    loader = torch.utils.data.DataLoader(data.train, batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    snaps = [layout.gather(params, 0, layout.D).clone()]
    it = iter(loader)
    for _ in range(n):
        for _ in range(steps_between):
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(loader)
                x, y = next(it)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        snaps.append(layout.gather(params, 0, layout.D).clone())
    return model, snaps


def write_run(url: str, run_id: str, model: torch.nn.Module, snaps: Sequence[torch.Tensor], *, cfg,
              num_classes: int = 10, writer_world: int = 2) -> Any:
    """Write ``snaps`` as committed snapshots seq 0.. of a run, as ``writer_world`` writer
    ranks would (one shard object per rank), through the store's writer API."""
    from twa_scale import store
    from twa_scale.layout import FlatLayout

    layout = FlatLayout.from_model(model)
    meta = {"model": cfg.model, "num_classes": num_classes, "data": cfg.data, "config": cfg.to_dict()}
    writer = store.create_run(url, run_id, layout, meta=meta, world_size=writer_world)
    session = uuid.uuid4().hex[:8]
    for seq, w in enumerate(snaps):
        metas = []
        for r, (s, e) in enumerate(layout.slices(writer_world)):
            view = memoryview(w[s:e].contiguous().numpy()).cast("B")
            meta_r = writer.shard_meta(seq, rank=r, world_size=writer_world, session=session, view=view,
                                       step=seq * 10, epoch=seq)
            writer.put_shard(meta_r, view)
            metas.append(meta_r)
        writer.commit(seq, metas)
    return writer


def gram_schmidt(x: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """The authors' basis: sequential (re-orthogonalised) Gram-Schmidt in float64, dense."""
    basis: list[torch.Tensor] = []
    for v0 in x.double():
        v = v0.clone()
        for _ in range(2):
            for q in basis:
                v -= (q @ v) * q
        if v.norm() > tol * v0.norm():
            basis.append(v / v.norm())
    return torch.stack(basis)


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}, path)
    finally:
        # Every rank is past its last collective before any tears the group down, and the process then ends
        # without interpreter finalization: gloo's worker threads can abort a finalizing interpreter
        # (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#179291), which
        # would fail a rank whose result is already written.
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_ranks(world: int, fn: Callable, *args, out_dir: str) -> list[dict]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks (spawned processes);
    returns each rank's {"ok", "result"|"error"} (results must be tensors/plain data)."""
    import torch.multiprocessing as mp

    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(_worker, args=(world, free_port(), fn, args, out_dir), nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world)]


# --- workers (run on every rank) ------------------------------------------------------------
def projection_worker(rank: int, world: int, snaps: torch.Tensor, blocks: list, g: torch.Tensor,
                      bits: int = 32) -> dict:
    """Sharded basis of ``snaps`` (n x D); returns the gathered basis rows, P g and Pᵀ(P g)."""
    from twa_scale import comm
    from twa_scale.layout import balanced_slices
    from twa_scale.twa.subspace import build_basis

    d_total = snaps.shape[1]
    s, e = balanced_slices(d_total, world)[rank]
    basis = build_basis(snaps[:, s:e].contiguous(), s, e, blocks, bits=bits, reduce=comm.all_reduce)
    c = basis.project(g[s:e].contiguous())
    comm.all_reduce(c)
    pg_local = basis.reconstruct(basis.theta0 + c) - basis.w_start  # Pᵀ c on this slice
    return {"c": c, "pg": _gather_slices(pg_local, d_total, world), "k": basis.k,
            "q": torch.stack([_gather_slices(basis.dequantized()[i], d_total, world) for i in range(basis.k)])
            if bits == 32 else torch.zeros(0)}


def _gather_slices(local: torch.Tensor, d_total: int, world: int) -> torch.Tensor:
    from twa_scale import comm
    from twa_scale.layout import balanced_slices

    slices = balanced_slices(d_total, world)
    m = max(b - a for a, b in slices)
    buf = torch.zeros(m)
    buf[: local.numel()] = local
    full = torch.zeros(world * m)
    comm.all_gather(full, buf)
    return torch.cat([full[r * m: r * m + b - a] for r, (a, b) in enumerate(slices)])


def twa_worker(rank: int, world: int, cfg_kwargs: dict) -> dict:
    """run_twa on this rank; returns the parts of the result the tests compare."""
    from twa_scale.twa import TwaConfig, run_twa

    res = run_twa(TwaConfig(**cfg_kwargs))
    return {"coefficients": torch.tensor(res.coefficients, dtype=torch.float64),
            "alpha": torch.tensor(res.alpha, dtype=torch.float64),
            "twa_accuracy": res.twa_accuracy, "swa_accuracy": res.swa_accuracy,
            "bytes_read": torch.tensor(res.bytes_read_per_rank), "lr_final": res.lr_final,
            "outcomes": [a.outcome for a in res.guard.attempts], "effective_batch": res.effective_global_batch,
            "returned": res.returned, "fallback": res.guard.fallback, "basis": res.basis.to_dict()}


def growing_basis_worker(rank: int, world: int, x: torch.Tensor) -> dict:
    """The live follower's GrowingBasis over this rank's columns of ``x`` (n x D), one snapshot at a time."""
    from twa_scale import comm
    from twa_scale.layout import balanced_slices
    from twa_scale.twa.subspace import GrowingBasis

    s, e = balanced_slices(x.shape[1], world)[rank]
    grow = GrowingBasis(s, e, reduce=comm.all_reduce)
    for row in x:
        grow.append(row[s:e])
    b = grow.basis()
    return {"q": b.dequantized(), "w_start": b.w_start, "theta0": b.theta0}
