"""Typed configuration of the training job: ``TrainConfig``, built from sections owned by the parts of the job.

Every field is keyword-only, documented, and validated in ``__post_init__`` so a bad value fails with a
one-line error that names the flag, before any process group or engine exists. The flags stay flat
(``--data``, ``--snapshot-url``, ``--checkpoint-every-steps``, ``--logger``): a section is a dataclass
that ``TrainConfig`` inherits, so ``cfg.snapshot_url`` reads as before, and each section checks its own
fields. ``DataConfig`` (owned by :mod:`twa_scale.data`): what the data loader reads; ``SnapshotSection``:
the snapshot store and cadence; ``CheckpointSection``: DeepSpeed checkpoints and resume; ``MetricsSection``
(shared with the TWA stage): logs, tracking and the Prometheus exporter.

The command line, config files, the environment and presets come from :mod:`twa_scale.cli_parse`:

    deepspeed launch/train.py --preset resnet50_imagenet --config my.yaml --lr 0.2 --print-config

With no ``--preset`` the `quickstart` preset is in force, whatever other flags are given (``--preset none``:
the dataclass defaults below).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Literal, Sequence

from twa_scale import knobs
from twa_scale.checks import bad, check_at_least_one, check_choice, check_run_id, check_store
from twa_scale.cli_parse import PRESETS_DIR, load_preset, parse_config, preset_names
from twa_scale.data.config import DataConfig

__all__ = ["TrainConfig", "SnapshotSection", "CheckpointSection", "MetricsSection",
           "parse_train_args", "preset_names", "load_preset", "DEFAULT_SNAPSHOT_URL", "PRESETS_DIR",
           "DEFAULT_TRAIN_PRESET"]

Schedule = Literal["step", "step-per-iter", "cosine", "linear", "constant"]
SnapshotDtype = Literal["float32", "bfloat16", "float16"]
LogFormat = Literal["text", "json"]
# Local default store: a directory next to where the job was started.
DEFAULT_SNAPSHOT_URL = "file://" + str(Path.cwd() / "twa_runs")
DEFAULT_TRAIN_PRESET = "quickstart"


@dataclasses.dataclass(kw_only=True)
class MetricsSection:
    """metrics: logs, experiment tracking and the Prometheus exporter (both stages)"""
    log_every_steps: int = 50
    """Read the per-step loss from the device every N steps (one host sync per N steps, not per step);
    the progress bar, the TWA divergence guard and the per-step Prometheus series see the steps at that cadence."""
    logger: str = "none"
    """Experiment tracking: `tensorboard` (event files under <snapshot-url>/<run-id>/tensorboard/<stage>/),
    `mlflow` (pip install 'twa_scale[mlflow]'; MLFLOW_TRACKING_URI, default ./mlruns), both comma-separated,
    or `none`. Rank 0 logs loss, lr and throughput per step, validation per epoch, snapshots and the TWA result."""
    log_format: LogFormat = "text"
    """Log lines as `text` or `json` (one JSON object per line, for log pipelines)."""
    log_all_ranks: bool = False
    """INFO lines from every rank; by default rank 0 logs INFO and the other ranks only warnings and errors."""
    metrics_port: int = 0
    """Port of this node's Prometheus exporter; 0 disables it (the Kubernetes manifests use 9400)."""
    metrics_addr: str = "0.0.0.0"
    """Bind address of the Prometheus exporter."""

    def __post_init__(self) -> None:
        from twa_scale.tracking import check_logger

        check_at_least_one(log_every_steps=self.log_every_steps)
        check_logger(self.logger)
        check_choice("log-format", self.log_format, LogFormat)
        if not 0 <= self.metrics_port < 65536:
            bad("metrics-port", f"must be in [0, 65535], got {self.metrics_port}")


@dataclasses.dataclass(kw_only=True)
class CheckpointSection:
    """checkpoints: DeepSpeed checkpoints, their upload, and resume"""
    checkpoint_dir: str | None = None
    """Local directory (disk or PVC) for DeepSpeed checkpoints; None uses ./twa_checkpoints/<run-id>."""
    checkpoint_url: str | None = None
    """fsspec URL each DeepSpeed checkpoint is uploaded to after it is saved in checkpoint_dir (a commit
    marker written last; the newest two kept); --resume downloads the newest committed one when
    checkpoint_dir has none. None: `<snapshot-url>/<run-id>/checkpoints`; `none`: local only."""
    checkpoint_every_steps: int | None = None
    """Also save a DeepSpeed checkpoint every N optimizer steps inside an epoch (the newest two are
    kept); --resume then continues mid-epoch, exactly. None: only at each epoch's end."""
    resume: bool = False
    """Continue from the latest DeepSpeed checkpoint in checkpoint_dir (mid-epoch ones included)."""
    auto_resume: bool = False
    """--resume if a checkpoint exists (in checkpoint_dir, or committed at checkpoint_url), else start
    afresh: what a restarted pod needs (launch/k8s-entry.sh passes it to every training pod)."""

    def __post_init__(self) -> None:
        check_at_least_one(checkpoint_every_steps=self.checkpoint_every_steps)
        if self.checkpoint_url not in (None, "", "none"):
            from twa_scale.store.backend import check_url
            try:
                check_url(self.checkpoint_url)
            except ValueError as e:
                bad("checkpoint-url", str(e))


@dataclasses.dataclass(kw_only=True)
class SnapshotSection:
    """snapshots: where weight snapshots are stored, and how often"""
    snapshot_url: str = DEFAULT_SNAPSHOT_URL
    """fsspec URL of the snapshot store (s3://bucket/prefix, file:///abs/path, memory://x)."""
    run_id: str | None = None
    """Run name under the snapshot URL; None derives `<model>-<data>-s<seed>`."""
    storage_options: str | None = None
    """JSON object of fsspec filesystem arguments for every store URL the job opens (snapshots,
    metrics, checkpoints, --data, --init-from), e.g. '{"profile": "train"}'; merged over fsspec's own configuration.
    Never logged or stored (it may hold credentials)."""
    snapshot_every: int = 1
    """Take a snapshot every K epochs (snapshot 0 is the initial weights)."""
    snapshots_per_epoch: int | None = None
    """Take K snapshots per epoch, evenly spaced by optimizer steps, the last at the epoch's end (the
    authors' ImageNet protocol takes 5); None: per epoch, every --snapshot-every epochs."""
    snapshot_dtype: SnapshotDtype = "float32"
    """Stored dtype of snapshots: float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        check_at_least_one(snapshot_every=self.snapshot_every, snapshots_per_epoch=self.snapshots_per_epoch)
        if self.snapshots_per_epoch is not None and self.snapshot_every != 1:
            bad("snapshots-per-epoch", f"cannot be combined with --snapshot-every {self.snapshot_every} "
                                       "(sub-epoch snapshots are taken in every epoch)")
        check_choice("snapshot-dtype", self.snapshot_dtype, SnapshotDtype)
        check_store(self.snapshot_url, self.storage_options)
        if self.run_id is not None:
            check_run_id(self.run_id)


@dataclasses.dataclass(kw_only=True)
class TrainConfig(DataConfig, SnapshotSection, CheckpointSection, MetricsSection):
    """training: the model and its recipe (optimiser, schedule, batch), and TWA after training"""
    model: str = "resnet20"
    """Model name: a CIFAR-style net (resnet20, resnet56, cifar_vgg16_bn, preresnet164, wrn28_10, mlp)
    or any torchvision classification model (resnet18, resnet50, vgg16_bn, ...)."""
    epochs: int = 10
    """Number of training epochs."""
    lr: float = 0.1
    """Peak learning rate (SGD)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """SGD weight decay (the TWA authors' 1e-4: train_sgd_cifar.py:42, train_sgd_imagenet.py:55)."""
    decay_norm_bias: bool = True
    """Apply weight decay to BatchNorm weights and biases too, as the authors do (they decay
    model.parameters() whole); --no-decay-norm-bias exempts every 1-D parameter."""
    schedule: Schedule = "step"
    """`step`: the TWA authors' epoch-wise MultiStepLR, ÷10 at epochs int(0.5E) and int(0.75E+0.9)
    (or at --lr-milestones); `step-per-iter`: ÷10 at 50% and 75% of the steps; `cosine`, `linear`
    (to 0) or `constant`."""
    lr_milestones: list[int] | None = None
    """Epochs at which `step` divides the lr by 10, e.g. [30, 60] (the authors' ImageNet script);
    None: int(0.5E) and int(0.75E+0.9)."""
    warmup_epochs: float = 0.0
    """Linear warm-up length in epochs (any schedule; int(epochs × steps per epoch) steps)."""
    batch_size: int | None = None
    """Global batch size; None takes `train_batch_size` from the DeepSpeed config."""
    micro_batch: int | None = None
    """Per-rank micro-batch; None takes `train_micro_batch_size_per_gpu` from the DeepSpeed config."""
    seed: int = 0
    """Seeds model init, data order and augmentation. Runs with the same seed are identical."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON; None picks ds_configs/cpu_smoke.json on CPU and ds_configs/cifar_1gpu.json on GPU.
    `ds_configs/NAME.json` also finds the configs shipped with the installed package."""
    init_from: str | None = None
    """Start from the weights of a committed snapshot, `URL/RUN@SEQ` (e.g. a tail-stage run that
    continues a finished run at a constant learning rate). BatchNorm statistics re-adapt in training."""
    channels_last: bool | None = None
    """channels_last activations on GPU (parameters stay contiguous for DeepSpeed); None = on for CUDA."""
    obey_stop: bool = True
    """Rank 0 polls <run>/control/STOP.json (written by the live TWA follower's stop rule or `twa-scale
    stop`) in the background and, once it is present, training ends cleanly after the next snapshot (exit 0;
    metrics.json records `stopped_by`). --no-obey-stop ignores the marker (a full run beside a record-only
    follower)."""
    twa: bool = False
    """Run the TWA stage in the same job after training."""
    twa_epochs: int | None = None
    """TWA epochs when --twa is given (None: the TWA stage's default)."""
    twa_lr: float | None = None
    """TWA learning rate when --twa is given (None: the TWA stage's default)."""

    def __post_init__(self) -> None:
        if self.epochs < 0:
            bad("epochs", f"must be >= 0, got {self.epochs}")
        if self.lr <= 0:
            bad("lr", f"must be > 0, got {self.lr}")
        check_choice("schedule", self.schedule, Schedule)
        if self.lr_milestones is not None:
            if self.schedule != "step":
                bad("lr-milestones", f"only applies to --schedule step, got --schedule {self.schedule}")
            if any(m < 1 for m in self.lr_milestones) or list(self.lr_milestones) != sorted(self.lr_milestones):
                bad("lr-milestones", f"expected increasing epochs >= 1, got {self.lr_milestones}")
        if self.warmup_epochs < 0:
            bad("warmup-epochs", f"must be >= 0, got {self.warmup_epochs}")
        check_at_least_one(batch_size=self.batch_size, micro_batch=self.micro_batch)
        if self.deepspeed_config is not None:
            from twa_scale.train.engine import find_ds_config
            find_ds_config(self.deepspeed_config)  # one-line error naming --deepspeed_config
        from twa_scale.models import model_names
        if self.model not in model_names():
            from twa_scale.models import build_model
            try:
                build_model(self.model, 10)
            except ValueError as e:  # the registry's message lists the valid names
                raise ValueError(f"--model: {e}") from None
        for section in (DataConfig, SnapshotSection, CheckpointSection, MetricsSection):
            section.__post_init__(self)
        # Derived unless set; a printed config (--print-config) leaves them null, so they follow --model etc.
        if self.run_id is None:  # any character a run id may not hold becomes '-'
            self.run_id = re.sub(r"[^A-Za-z0-9._-]", "-", f"{self.model}-{Path(self.data).name or 'data'}-s{self.seed}")
            check_run_id(self.run_id)
        if self.checkpoint_dir is None:
            self.checkpoint_dir = str(Path.cwd() / "twa_checkpoints" / self.run_id)
        if self.checkpoint_url is None:
            self.checkpoint_url = self.run_url + "/checkpoints"

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


def parse_train_args(argv: Sequence[str] | None = None, prog: str = "launch/train.py") -> TrainConfig:
    """Parse argv (flags, --config, --preset, environment TWA_SCALE_TRAIN_*) into a TrainConfig.
    The `quickstart` preset is in force unless --preset picks another or `none`."""
    return parse_config(TrainConfig, argv, stage="train", prog=prog, env_prefix=knobs.TRAIN_CONFIG_ENV_PREFIX[:-1],
                        default_preset=DEFAULT_TRAIN_PRESET,
                        description="Train a model with DeepSpeed while streaming weight snapshots; optionally "
                                    "run TWA after. The quickstart preset is in force unless --preset picks another.")
