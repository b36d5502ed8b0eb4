"""The distributed TWA stage: sharded snapshot load, subspace basis, coefficient loop.

    from twa_scale.twa import TwaConfig, run_twa
    result = run_twa(TwaConfig(snapshot_url="file:///runs", run_id="resnet20-digits-s0"))
"""
from __future__ import annotations

import torch

from twa_scale.twa.config import TwaConfig, parse_twa_args

__all__ = ["TwaConfig", "run_twa", "parse_twa_args", "load_run_inputs"]


def load_run_inputs(cfg: TwaConfig):
    """(reader, model, layout, refs, train_cfg, data) for a stored run; validates the run before any TWA work."""
    from twa_scale import comm, store
    from twa_scale.config import TrainConfig
    from twa_scale.data import build_data
    from twa_scale.layout import FlatLayout
    from twa_scale.models import build_model
    from twa_scale.twa.solver import select_snapshots

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
    refs = select_snapshots(reader.snapshots(), cfg.select)
    train_cfg = TrainConfig.from_dict(meta.get("config") or {})
    for name in ("data", "limit_train", "limit_val"):
        if getattr(cfg, name) is not None:
            setattr(train_cfg, name, getattr(cfg, name))
    data = build_data(train_cfg)
    if data.num_classes != int(meta["num_classes"]) or (meta.get("classes") and data.classes
                                                        and list(meta["classes"]) != list(data.classes)):
        from twa_scale.errors import ConfigError
        raise ConfigError(f"--data {train_cfg.data}: its {data.num_classes} classes do not match the "
                          f"{meta['num_classes']} classes the run's model {meta['model']!r} was trained on")
    return reader, model, layout, refs, train_cfg, data


def run_twa(cfg: TwaConfig) -> dict:
    """Run the TWA stage on every rank of the job; returns the result dict (same on every rank).

    Rank 0 writes model.safetensors, coefficients.png and, last, result.json under
    ``cfg.output_url``; nothing is written when any input check fails.
    """
    from twa_scale import comm, metrics, report
    from twa_scale.twa.solver import agree, solve

    comm.init()
    metrics.setup(run_id=cfg.run_id, role="twa", port=cfg.metrics_port, addr=cfg.metrics_addr)
    reader, model, layout, refs, train_cfg, data = load_run_inputs(cfg)
    world = comm.world_size()
    batch = cfg.batch_size or train_cfg.batch_size or 128
    if batch % world:
        raise ValueError(f"--batch-size {batch} does not divide over {world} ranks")
    if cfg.fit_on == "holdout" and not data.holdout:
        raise ValueError("--fit-on holdout: the run has no held-out split; train it with --holdout-fraction > 0")
    fit = data.train if cfg.fit_on == "train" else data.holdout
    result, _ = solve(cfg, model=model, layout=layout, refs=refs, load=reader.read, fit_data=fit,
                      val_data=data.val, bn_data=data.train, per_rank_batch=batch // world)
    result.update(run_id=cfg.run_id, snapshot_url=cfg.snapshot_url, model=reader.manifest.meta["model"],
                  output=cfg.output_url)
    state = model.state_dict()

    def write():
        if comm.rank() == 0:
            result["outputs"] = report.write_outputs(result, state, cfg.output_url, plot=cfg.plot,
                                                   storage_options=cfg.storage_options)
            print(report.format_table(result), flush=True)

    agree(write, f"writing the TWA result to {cfg.output_url}")
    return result
