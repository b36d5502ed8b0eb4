"""Train, then (with --twa) run the TWA stage in the same job, and print the summary table."""
from __future__ import annotations

from twa_scale import comm
from twa_scale.train.config import TrainConfig
from twa_scale.train.loop import run_training

__all__ = ["run_pipeline"]


def run_pipeline(cfg: TrainConfig) -> dict:
    final = run_training(cfg)
    out = {"train": final}
    if cfg.twa:
        from twa_scale.twa import TwaConfig, run_twa

        overrides = {k: v for k, v in (("epochs", cfg.twa_epochs), ("lr", cfg.twa_lr)) if v is not None}
        out["twa"] = run_twa(TwaConfig(snapshot_url=cfg.snapshot_url, run_id=cfg.run_id,
                                       storage_options=cfg.storage_options,
                                       metrics_port=cfg.metrics_port, metrics_addr=cfg.metrics_addr,
                                       logger=cfg.logger, log_format=cfg.log_format,
                                       log_all_ranks=cfg.log_all_ranks,
                                       **overrides)).to_dict()
    if comm.rank() == 0:
        print(_table(out), flush=True)
    return out


def _table(out: dict) -> str:
    rows = [("last (SGD)", out["train"]["val_accuracy"])]
    if "twa" in out:
        rows += [("SWA", out["twa"].get("swa_accuracy")), ("TWA", out["twa"].get("twa_accuracy"))]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'method':<{width}}  val accuracy", f"{'-' * width}  ------------"]
    lines += [f"{name:<{width}}  {acc:.4f}" if acc is not None else f"{name:<{width}}  n/a" for name, acc in rows]
    return "\n".join(lines)
