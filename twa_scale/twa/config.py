"""Typed configuration of the TWA stage, its CLI, and named presets.

Paper mode (ICLR 2023) is the default: Gram-Schmidt basis of the raw snapshots,
start at the SWA mean, projected SGD (lr 2, momentum 0.9, wd 1e-5, 10 epochs,
step schedule), BatchNorm recalibrated at start and end. The released ImageNet
values are lr 0.3 and 2 epochs (:func:`paper_imagenet`). Journal mode
(arXiv 2205.13104) is the set of options in :func:`journal`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Sequence

from twa_scale.config import add_dataclass_flags

__all__ = ["TwaConfig", "build_twa_parser", "parse_twa_args", "parse_select", "paper_cifar", "paper_imagenet",
           "journal", "PRESETS"]

SCHEDULES = ("step", "linear", "constant", "cosine")
OPTIMIZERS = ("sgd", "adamw")
DIRECTIONS = ("raw", "centered")
COEFFICIENTS = ("global", "layerwise")
P_BITS = (32, 16, 8, 4, 2, 1)
FIT_ON = ("train", "holdout")


def parse_select(spec: str | None) -> tuple[int | None, int | None, int]:
    """``A:B[:STRIDE]`` over snapshot sequence numbers, Python slice semantics (A <= seq < B)."""
    if spec is None:
        return 1, None, 1
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"--select {spec!r}: expected A:B or A:B:STRIDE (e.g. 1:101 or 0::2)")
    try:
        a = int(parts[0]) if parts[0] else None
        b = int(parts[1]) if parts[1] else None
        stride = int(parts[2]) if len(parts) == 3 and parts[2] else 1
    except ValueError:
        raise ValueError(f"--select {spec!r}: A, B and STRIDE must be integers") from None
    if stride < 1:
        raise ValueError(f"--select {spec!r}: STRIDE must be >= 1")
    return a, b, stride


@dataclasses.dataclass(kw_only=True)
class TwaConfig:
    snapshot_url: str
    """fsspec URL of the snapshot store (s3://bucket/prefix, file:///abs/path, memory://x)."""
    run_id: str
    """Run name under the snapshot URL."""
    storage_options: str | None = None
    """JSON object of fsspec filesystem arguments for the snapshot and output URLs; never logged."""
    select: str | None = None
    """Snapshots A:B[:STRIDE] by sequence number (A <= seq < B); default `1:` = all but seq 0 (the random init)."""
    start: int | None = None
    """Start from snapshot SEQ instead of the SWA mean of the selected snapshots."""
    epochs: int = 10
    """TWA epochs (paper: 10 on CIFAR, 2 on ImageNet). 0 evaluates the start point only."""
    lr: float = 2.0
    """Learning rate on the coefficients (paper: 2 on CIFAR, 0.3 on ImageNet)."""
    momentum: float = 0.9
    """SGD momentum on the coefficients."""
    weight_decay: float = 1e-5
    """Weight decay on the coefficients (paper 1e-5; journal mode uses 0)."""
    schedule: str = "step"
    """`step` (÷10 at 50% and 75%), `linear` (to 0), `constant`, or `cosine`."""
    warmup: float = 0.0
    """Linear warm-up as a fraction of all TWA steps (any schedule)."""
    optimizer: str = "sgd"
    """`sgd` (paper) or `adamw` (journal)."""
    directions: str = "raw"
    """`raw` snapshots (paper) or `centered` on the SWA mean (journal)."""
    coefficients: str = "global"
    """`global` (one per direction) or `layerwise` (one per direction and block, journal)."""
    block_size: int | None = None
    """Block size in parameters for layer-wise coefficients and quantisation; None = one block per tensor."""
    p_bits: int = 32
    """Storage precision of P: 32, 16, or 8/4/2/1-bit per-(snapshot, block) min/max quantisation."""
    fit_on: str = "train"
    """Fit the coefficients on `train` (TWA-t) or on the `holdout` split the training excluded (TWA-v)."""
    compile: bool | None = None
    """Fuse the packed-P unpack into the products with torch.compile (p-bits <= 8); None = on CUDA only."""
    rank_tol: float = 1e-5
    """Drop a snapshot whose residual after the earlier ones is below this fraction of its norm."""
    batch_size: int | None = None
    """Global batch size of the TWA steps; None = the training run's, else 128."""
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
    metrics_port: int = 0
    """Prometheus exporter port of this node (0: off)."""
    metrics_addr: str = "0.0.0.0"
    """Bind address of the Prometheus exporter."""

    def __post_init__(self) -> None:
        def bad(flag: str, msg: str):
            raise ValueError(f"--{flag}: {msg}")

        if not self.snapshot_url:
            bad("snapshot-url", "is required")
        if not self.run_id:
            bad("run-id", "is required")
        parse_select(self.select)
        if self.epochs < 0:
            bad("epochs", f"must be >= 0, got {self.epochs}")
        if self.lr <= 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            bad("momentum", f"must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            bad("weight-decay", f"must be >= 0, got {self.weight_decay}")
        for flag, v, allowed in (("schedule", self.schedule, SCHEDULES), ("optimizer", self.optimizer, OPTIMIZERS),
                                 ("directions", self.directions, DIRECTIONS),
                                 ("coefficients", self.coefficients, COEFFICIENTS),
                                 ("p-bits", self.p_bits, P_BITS), ("fit-on", self.fit_on, FIT_ON)):
            if v not in allowed:
                bad(flag, f"must be one of {', '.join(map(str, allowed))}, got {v!r}")
        if not 0 <= self.warmup < 1:
            bad("warmup", f"is a fraction of the TWA steps in [0, 1), got {self.warmup}")
        if not 0 < self.rank_tol < 1:
            bad("rank-tol", f"must be in (0, 1), got {self.rank_tol}")
        for flag, v in (("block-size", self.block_size), ("batch-size", self.batch_size),
                        ("bn-batches", self.bn_batches), ("limit-train", self.limit_train),
                        ("limit-val", self.limit_val)):
            if v is not None and v < 1:
                bad(flag, f"must be >= 1, got {v}")
        if self.eval_every < 0:
            bad("eval-every", f"must be >= 0, got {self.eval_every}")
        if not 0 <= self.metrics_port < 65536:
            bad("metrics-port", f"must be in [0, 65535], got {self.metrics_port}")
        from twa_scale.store.backend import parse_storage_options
        parse_storage_options(self.storage_options)  # one-line error for bad JSON

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


# --- presets: plain functions returning keyword overrides ------------------------------------
def paper_cifar() -> dict[str, Any]:
    """ICLR 2023 released CIFAR settings (the defaults)."""
    return dict(epochs=10, lr=2.0, momentum=0.9, weight_decay=1e-5, schedule="step")


def paper_imagenet() -> dict[str, Any]:
    """ICLR 2023 released ImageNet settings: lr 0.3, 2 epochs."""
    return dict(epochs=2, lr=0.3, momentum=0.9, weight_decay=1e-5, schedule="step")


def journal() -> dict[str, Any]:
    """arXiv 2205.13104: centred, layer-wise coefficients, AdamW + warmup + cosine, no weight decay, TWA-v."""
    return dict(directions="centered", coefficients="layerwise", optimizer="adamw", schedule="cosine",
                warmup=0.1, weight_decay=0.0, lr=0.01, fit_on="holdout")


PRESETS = {"paper_cifar": paper_cifar, "paper_imagenet": paper_imagenet, "journal": journal}


def build_twa_parser() -> argparse.ArgumentParser:
    """One flag per TwaConfig field (help from the field docstrings)."""
    p = argparse.ArgumentParser(prog="launch/twa.py", description="Trainable Weight Averaging over streamed snapshots.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from named settings; flags override them")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    add_dataclass_flags(p, TwaConfig, flag=lambda name: "--" + name.replace("_", "-"),
                        choices={"schedule": SCHEDULES, "optimizer": OPTIMIZERS, "directions": DIRECTIONS,
                                 "coefficients": COEFFICIENTS, "p_bits": P_BITS, "fit_on": FIT_ON})
    return p


def parse_twa_args(argv: Sequence[str] | None = None) -> TwaConfig:
    ns = build_twa_parser().parse_args(argv)
    user = {k: v for k, v in vars(ns).items() if v is not None and k not in ("preset", "local_rank")}
    base = PRESETS[ns.preset]() if ns.preset else {}
    return TwaConfig(**{**base, **user})
