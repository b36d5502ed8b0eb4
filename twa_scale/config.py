"""Typed configuration for the training job, with CLI parsing and named presets.

Every field is keyword-only, documented, and validated in ``__post_init__`` so a
bad value fails with a one-line error before any process group or engine exists.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["TrainConfig", "parse_train_args", "build_train_parser", "quickstart", "cifar_resnet20",
           "resnet50_imagenet", "PRESETS", "DEFAULT_SNAPSHOT_URL", "field_docs", "add_dataclass_flags"]

SCHEDULES = ("step", "cosine", "constant")
SNAPSHOT_DTYPES = ("float32", "bfloat16", "float16")
# Local default store: a directory next to where the job was started.
DEFAULT_SNAPSHOT_URL = "file://" + str(Path.cwd() / "twa_runs")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    model: str = "resnet20"
    """Model name: a CIFAR-style net (resnet20, resnet56, cifar_vgg16_bn, preresnet164, wrn28_10, mlp)
    or any torchvision classification model (resnet18, resnet50, vgg16_bn, ...)."""
    data: str = "digits"
    """`digits` (built in, no download), a directory with train/ and val/ (or test/) in ImageFolder layout,
    or a packed dataset (`twa-scale data pack`) at any fsspec URL, e.g. s3://bucket/imagenet or file:///data/c10."""
    decode: str = "cpu"
    """Image decoder: `cpu` (libjpeg-turbo, reduced-size decoding, uint8 augmentations), `gpu` (nvJPEG and
    augmentations on the device), or `pil` (the torchvision reference path)."""
    max_bad_fraction: float = 0.01
    """Undecodable images are skipped, logged and counted; the job fails when more than this fraction
    of an epoch's images on a rank are bad."""
    epochs: int = 10
    """Number of training epochs."""
    lr: float = 0.1
    """Peak learning rate (SGD)."""
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    """`step` (÷10 at 50% and 75% of training, the TWA paper's recipe), `cosine`, or `constant`."""
    warmup_epochs: float = 0.0
    """Linear warm-up length in epochs (any schedule)."""
    batch_size: int | None = None
    """Global batch size; None takes `train_batch_size` from the DeepSpeed config."""
    micro_batch: int | None = None
    """Per-rank micro-batch; None takes `train_micro_batch_size_per_gpu` from the DeepSpeed config."""
    seed: int = 0
    """Seeds model init, data order and augmentation. Runs with the same seed are identical."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON; None picks ds_configs/cpu_smoke.json on CPU and ds_configs/cifar_1gpu.json on GPU."""
    snapshot_url: str = DEFAULT_SNAPSHOT_URL
    """fsspec URL of the snapshot store (s3://bucket/prefix, file:///abs/path, memory://x)."""
    run_id: str | None = None
    """Run name under the snapshot URL; None derives `<model>-<data>-s<seed>`."""
    storage_options: str | None = None
    """JSON object of fsspec filesystem arguments for every store URL the job opens (snapshots,
    metrics, --init-from), e.g. '{"profile": "train"}'; merged over fsspec's own configuration.
    Never logged or stored (it may hold credentials)."""
    snapshot_every: int = 1
    """Take a snapshot every K epochs (snapshot 0 is the initial weights)."""
    snapshots_per_epoch: int | None = None
    """Take K snapshots per epoch, evenly spaced by optimizer steps, the last at the epoch's end (the
    authors' ImageNet protocol takes 5); None: per epoch, every --snapshot-every epochs."""
    snapshot_dtype: str = "float32"
    """Stored dtype of snapshots: float32, bfloat16 or float16."""
    checkpoint_dir: str | None = None
    """Local directory (disk or PVC) for DeepSpeed checkpoints; None uses ./twa_checkpoints/<run-id>."""
    resume: bool = False
    """Continue from the latest DeepSpeed checkpoint in checkpoint_dir."""
    init_from: str | None = None
    """Start from the weights of a committed snapshot, `URL/RUN@SEQ` (e.g. a tail-stage run that
    continues a finished run at a constant learning rate). BatchNorm statistics re-adapt in training."""
    holdout_fraction: float = 0.0
    """Fraction of the training set held out (excluded from training) for TWA-v to fit on."""
    limit_train: int | None = None
    """Use a fixed random subset of this many training images (tests, quick runs)."""
    limit_val: int | None = None
    """Use a fixed random subset of this many validation images."""
    num_workers: int | None = None
    """DataLoader workers per rank; None: 0 for digits, else min(4, CPUs per local rank)."""
    channels_last: bool | None = None
    """channels_last activations on GPU (parameters stay contiguous for DeepSpeed); None = on for CUDA."""
    twa: bool = False
    """Run the TWA stage in the same job after training."""
    twa_epochs: int | None = None
    """TWA epochs when --twa is given (None: the TWA stage's default)."""
    twa_lr: float | None = None
    """TWA learning rate when --twa is given (None: the TWA stage's default)."""
    log_every_steps: int = 50
    """Read the per-step loss from the device every N steps (one host sync per N steps, not per step);
    the progress bar and the per-step Prometheus series update at that cadence."""
    metrics_port: int = 0
    """Port of this node's Prometheus exporter; 0 disables it (the Kubernetes manifests use 9400)."""
    metrics_addr: str = "0.0.0.0"
    """Bind address of the Prometheus exporter."""

    def __post_init__(self) -> None:
        def bad(flag: str, msg: str):
            raise ValueError(f"--{flag}: {msg}")

        if self.epochs < 0:
            bad("epochs", f"must be >= 0, got {self.epochs}")
        if self.lr <= 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_epochs < 0:
            bad("warmup-epochs", f"must be >= 0, got {self.warmup_epochs}")
        for flag, v in (("batch-size", self.batch_size), ("micro-batch", self.micro_batch),
                        ("limit-train", self.limit_train), ("limit-val", self.limit_val)):
            if v is not None and v < 1:
                bad(flag, f"must be >= 1, got {v}")
        if self.log_every_steps < 1:
            bad("log-every-steps", f"must be >= 1, got {self.log_every_steps}")
        if self.snapshot_every < 1:
            bad("snapshot-every", f"must be >= 1, got {self.snapshot_every}")
        if self.snapshots_per_epoch is not None:
            if self.snapshots_per_epoch < 1:
                bad("snapshots-per-epoch", f"must be >= 1, got {self.snapshots_per_epoch}")
            if self.snapshot_every != 1:
                bad("snapshots-per-epoch", f"cannot be combined with --snapshot-every {self.snapshot_every} "
                                           "(sub-epoch snapshots are taken in every epoch)")
        if self.snapshot_dtype not in SNAPSHOT_DTYPES:
            bad("snapshot-dtype", f"must be one of {', '.join(SNAPSHOT_DTYPES)}, got {self.snapshot_dtype!r}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            bad("holdout-fraction", f"must be in [0, 1), got {self.holdout_fraction}")
        if not 0 <= self.metrics_port < 65536:
            bad("metrics-port", f"must be in [0, 65535], got {self.metrics_port}")
        from twa_scale.store.backend import parse_storage_options
        parse_storage_options(self.storage_options)  # one-line error for bad JSON
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            bad("deepspeed_config", f"file not found: {self.deepspeed_config}")
        if self.decode not in ("cpu", "gpu", "pil"):
            bad("decode", f"must be one of cpu, gpu, pil, got {self.decode!r}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            bad("max-bad-fraction", f"must be in [0, 1], got {self.max_bad_fraction}")
        if self.data != "digits":
            from twa_scale.data import check_data_spec  # one-line error for a bad directory or URL scheme
            check_data_spec(self.data)
        from twa_scale.models import model_names
        if self.model not in model_names():
            from twa_scale.models import build_model
            try:
                build_model(self.model, 10)
            except ValueError as e:  # the registry's message lists the valid names
                raise ValueError(f"--model: {e}") from None
        if self.run_id is None:
            self.run_id = f"{self.model}-{Path(self.data).name or 'data'}-s{self.seed}"
        if self.checkpoint_dir is None:
            self.checkpoint_dir = str(Path.cwd() / "twa_checkpoints" / self.run_id)

    def parse_init_from(self) -> tuple[str, str, int]:
        """(snapshot URL, run id, seq) of --init-from."""
        run_url, sep, seq = (self.init_from or "").rpartition("@")
        url, _, run_id = run_url.rstrip("/").rpartition("/")
        if not sep or not url or not run_id or not seq.isdigit():
            raise ValueError(f"--init-from: expected URL/RUN@SEQ (e.g. file:///runs/r1@10), got {self.init_from!r}")
        return url, run_id, int(seq)

    @property
    def run_url(self) -> str:
        return self.snapshot_url.rstrip("/") + "/" + self.run_id

    def to_dict(self) -> dict[str, Any]:
        """The fields, with storage_options redacted (this dict is stored and logged)."""
        d = dataclasses.asdict(self)
        if d.get("storage_options"):
            d["storage_options"] = "<redacted>"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Rebuild a config from a run manifest; unknown keys (from newer versions) are ignored.

        Data paths are not re-validated here: the TWA stage may run where the
        training data sits at the same path, or be pointed elsewhere by the caller.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in d.items() if k in names}
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            setattr(obj, f.name, kept.get(f.name, f.default))
        return obj


# --- presets -------------------------------------------------------------------------
def quickstart() -> TrainConfig:
    """What `deepspeed launch/train.py` runs with no arguments: digits, ResNet-20, TWA after."""
    # TWA lr 0.5, not the paper's 2: with only 12 snapshots of a small net, lr 2 diverges (measured:
    # TWA 0.10 at lr 2, 0.989 at lr 0.5, against SWA 0.981 and the last SGD epoch 0.986).
    return TrainConfig(model="resnet20", data="digits", epochs=12, lr=0.1, twa=True, twa_epochs=3, twa_lr=0.5)


def cifar_resnet20(data: str = "../shared/datasets/cifar10") -> TrainConfig:
    """The TWA paper's CIFAR recipe on ResNet-20 (200 epochs, snapshots every epoch)."""
    return TrainConfig(model="resnet20", data=data, epochs=200, lr=0.1, weight_decay=5e-4, schedule="step",
                       batch_size=128)


def resnet50_imagenet(data: str = "/data/imagenet") -> TrainConfig:
    """ResNet-50 on ImageNet, 8 GPUs × N nodes, ZeRO-2 (the TWA paper's head stage uses 60 of 90 epochs)."""
    return TrainConfig(model="resnet50", data=data, epochs=90, lr=0.4, weight_decay=1e-4, schedule="step",
                       warmup_epochs=5, batch_size=1024, deepspeed_config="ds_configs/imagenet_r50_8gpu_zero2.json")


PRESETS = {"quickstart": quickstart, "cifar_resnet20": cifar_resnet20, "resnet50_imagenet": resnet50_imagenet}


def _flag(name: str) -> str:
    return "--deepspeed_config" if name == "deepspeed_config" else "--" + name.replace("_", "-")


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field, for --help (argparse %-formats help, so % is doubled)."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {prev.target.id: " ".join(str(node.value.value).split()).replace("%", "%%")
            for prev, node in zip(body, body[1:])
            if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}


def add_dataclass_flags(p: argparse.ArgumentParser, cls, *, choices: dict[str, Sequence] | None = None,
                        flag=_flag) -> None:
    """One flag per dataclass field. Flags default to None, so a --preset can fill what the user left out;
    the help shows the dataclass default."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_text = docs.get(f.name, "") + ("" if required else f" (default: {f.default})")
        if f.type in ("bool", "bool | None"):
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = {"int": int, "int | None": int, "float": float, "float | None": float}.get(f.type, str)
        p.add_argument(flag(f.name), type=kind, default=None, required=required,
                       choices=(choices or {}).get(f.name), help=help_text)


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train a model with DeepSpeed while streaming weight snapshots; optionally run TWA after. "
                    "With no arguments: the `quickstart` preset.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset; flags override it")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    add_dataclass_flags(p, TrainConfig, choices={"schedule": SCHEDULES, "snapshot_dtype": SNAPSHOT_DTYPES,
                                                 "decode": ("cpu", "gpu", "pil")})
    return p


def parse_train_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse argv into a TrainConfig. No arguments at all selects the `quickstart` preset."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_train_parser().parse_args(argv)
    user = {k: v for k, v in vars(ns).items() if v is not None and k not in ("preset", "local_rank")}
    preset = ns.preset or ("quickstart" if not user else None)
    base = dataclasses.asdict(PRESETS[preset]()) if preset else {}
    if preset:  # derived fields are recomputed from the merged values
        base.pop("run_id"), base.pop("checkpoint_dir")
    return TrainConfig(**{**base, **user})

