"""Typed configuration of the training job, and the one config mechanism both stages share.

Every field is keyword-only, documented, and validated in ``__post_init__`` so a bad value
fails with a one-line error that names the flag, before any process group or engine exists.

The command line is derived from the dataclass by jsonargparse (:func:`parse_config`), which
also gives both stages YAML config files and environment variables:

    deepspeed launch/train.py --preset resnet50_imagenet --config my.yaml --lr 0.2 --print-config

Precedence, lowest first: dataclass defaults < ``--preset NAME`` (a shipped YAML file in
``twa_scale/presets/<stage>/``) < environment ``TWA_SCALE_TRAIN_<FIELD>`` / ``TWA_SCALE_TWA_<FIELD>``
< ``--config FILE`` and flags, in command-line order. ``--print-config`` prints the fully
resolved config as YAML (derived fields included) and exits; fed back with ``--config`` it gives
the same run. Flags are spelled ``--snapshot-url`` or ``--snapshot_url``; booleans take
``--twa``, ``--no-twa`` or ``--twa=false``. The DeepSpeed launcher's ``--local_rank=N`` is accepted
and ignored (the rank comes from the environment it also sets).

jsonargparse was chosen over tyro because it reads YAML config files and the environment itself,
and LightningCLI users already know its ``--config``.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import sys
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

from twa_scale import knobs

__all__ = ["TrainConfig", "parse_train_args", "build_parser", "parse_config", "preset_names", "load_preset",
           "DEFAULT_SNAPSHOT_URL", "PRESETS_DIR"]

log = logging.getLogger(__name__)

Schedule = Literal["step", "step-per-iter", "cosine", "linear", "constant"]
SnapshotDtype = Literal["float32", "bfloat16", "float16"]
Decode = Literal["cpu", "gpu", "pil"]
LogFormat = Literal["text", "json"]
# Local default store: a directory next to where the job was started.
DEFAULT_SNAPSHOT_URL = "file://" + str(Path.cwd() / "twa_runs")
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def check_choice(flag: str, value: Any, allowed: Any) -> None:
    """One-line error naming ``--flag`` when ``value`` is not one of ``allowed`` (a tuple or a Literal)."""
    choices = typing.get_args(allowed) or tuple(allowed)
    if value not in choices:
        raise ValueError(f"--{flag}: must be one of {', '.join(map(str, choices))}, got {value!r}")


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_id(run_id: str) -> None:
    """A run id becomes part of every object key and log line: letters, digits and ``._-`` only (it starts
    with a letter or digit, at most 128 characters), so no newline, slash or space reaches a key or a log."""
    if not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"--run-id {run_id!r}: use letters, digits, '.', '_' and '-' only, starting with a letter "
                         "or digit (at most 128 characters)" if run_id else "--run-id: must not be empty")


def check_store_and_metrics(cfg: Any) -> None:
    """The checks both stages share: --metrics-port, --storage-options (JSON), --snapshot-url (its form),
    --logger, --log-format."""
    from twa_scale.store.backend import check_url, parse_storage_options
    from twa_scale.tracking import check_logger

    check_logger(cfg.logger)
    check_choice("log-format", cfg.log_format, LogFormat)

    if not 0 <= cfg.metrics_port < 65536:
        raise ValueError(f"--metrics-port: must be in [0, 65535], got {cfg.metrics_port}")
    parse_storage_options(cfg.storage_options)  # one-line error for bad JSON
    try:
        check_url(cfg.snapshot_url)  # s3:// without a bucket, s3:/typo
    except ValueError as e:
        raise ValueError(f"--snapshot-url: {e}") from None


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    model: str = "resnet20"
    """Model name: a CIFAR-style net (resnet20, resnet56, cifar_vgg16_bn, preresnet164, wrn28_10, mlp)
    or any torchvision classification model (resnet18, resnet50, vgg16_bn, ...)."""
    data: str = "digits"
    """`digits` (built in, no download), a directory with train/ and val/ (or test/) in ImageFolder layout,
    or a packed dataset (`twa-scale data pack`) at any fsspec URL, e.g. s3://bucket/imagenet or file:///data/c10."""
    decode: Decode = "cpu"
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
    log_every_steps: int = 50
    """Read the per-step loss from the device every N steps (one host sync per N steps, not per step);
    the progress bar and the per-step Prometheus series update at that cadence."""
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
        def bad(flag: str, msg: str):
            raise ValueError(f"--{flag}: {msg}")

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
        for flag, v in (("batch-size", self.batch_size), ("micro-batch", self.micro_batch),
                        ("limit-train", self.limit_train), ("limit-val", self.limit_val),
                        ("snapshots-per-epoch", self.snapshots_per_epoch),
                        ("checkpoint-every-steps", self.checkpoint_every_steps)):
            if v is not None and v < 1:
                bad(flag, f"must be >= 1, got {v}")
        if self.log_every_steps < 1:
            bad("log-every-steps", f"must be >= 1, got {self.log_every_steps}")
        if self.snapshot_every < 1:
            bad("snapshot-every", f"must be >= 1, got {self.snapshot_every}")
        if self.snapshots_per_epoch is not None and self.snapshot_every != 1:
            bad("snapshots-per-epoch", f"cannot be combined with --snapshot-every {self.snapshot_every} "
                                       "(sub-epoch snapshots are taken in every epoch)")
        check_choice("snapshot-dtype", self.snapshot_dtype, SnapshotDtype)
        if not 0.0 <= self.holdout_fraction < 1.0:
            bad("holdout-fraction", f"must be in [0, 1), got {self.holdout_fraction}")
        check_store_and_metrics(self)
        if self.deepspeed_config is not None:
            from twa_scale.engine import find_ds_config
            find_ds_config(self.deepspeed_config)  # one-line error naming --deepspeed_config
        check_choice("decode", self.decode, Decode)
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
        if self.run_id is None:  # derived: any character a run id may not hold becomes '-'
            self.run_id = re.sub(r"[^A-Za-z0-9._-]", "-", f"{self.model}-{Path(self.data).name or 'data'}-s{self.seed}")
        check_run_id(self.run_id)
        if self.checkpoint_dir is None:
            self.checkpoint_dir = str(Path.cwd() / "twa_checkpoints" / self.run_id)
        if self.checkpoint_url is None:
            self.checkpoint_url = self.run_url + "/checkpoints"
        elif self.checkpoint_url not in ("", "none"):
            from twa_scale.store.backend import check_url
            try:
                check_url(self.checkpoint_url)
            except ValueError as e:
                bad("checkpoint-url", str(e))

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


# --- presets: shipped YAML files, one directory per stage -----------------------------------
def preset_names(stage: str) -> list[str]:
    """Names of the presets shipped for ``stage`` (`train` or `twa`)."""
    return sorted(p.stem for p in (PRESETS_DIR / stage).glob("*.yaml"))


def load_preset(stage: str, name: str) -> dict[str, Any]:
    """The values of preset ``name``; an unknown name fails listing the valid ones."""
    import yaml

    path = PRESETS_DIR / stage / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"--preset {name!r}: no such preset; valid: {', '.join(preset_names(stage))}")
    return yaml.safe_load(path.read_text()) or {}


# --- the one config mechanism (both stages) ----------------------------------------------------
_ENV_PREFIX = {"train": knobs.TRAIN_CONFIG_ENV_PREFIX, "twa": knobs.TWA_CONFIG_ENV_PREFIX}


def build_parser(cls: type, *, stage: str, prog: str, description: str):
    """A jsonargparse parser derived from dataclass ``cls``: one flag per field (help from the field
    docstrings), ``--config FILE``, environment variables ``<prefix><FIELD>``."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    epilog = (f"--preset NAME starts from a shipped preset ({', '.join(preset_names(stage))}); "
              "--print-config prints the resolved config as YAML and exits. Every flag can also come from "
              f"the environment as {_ENV_PREFIX[stage]}<FLAG> (e.g. {_ENV_PREFIX[stage]}EPOCHS=3). "
              "Precedence: defaults < preset < environment < --config files and flags, in order.")
    p = ArgumentParser(prog=prog, description=description, epilog=epilog, env_prefix=_ENV_PREFIX[stage][:-1],
                       default_env=True, exit_on_error=False, print_config=None)
    p.add_argument("--config", action=ActionConfigFile, help="YAML config file (as --print-config writes it)")
    p.add_class_arguments(cls, as_group=False, fail_untyped=True)
    bools = _bool_fields(cls)
    for action in list(p._actions):
        if isinstance(action.help, str):  # the field docstrings' `literal` marks: plain text in a terminal
            action.help = action.help.replace("`", "")
        for opt in list(action.option_strings):
            if opt.startswith("--") and "_" in opt:  # --snapshot-url as well as --snapshot_url
                dashed = opt.replace("_", "-")
                action.option_strings.insert(0 if action.dest != "deepspeed_config" else 1, dashed)
                p._option_string_actions[dashed] = action
        if action.dest in bools:  # `--twa` alone means true
            action.nargs, action.const = "?", True
    return p


def _bool_fields(cls: type) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {f.name for f in dataclasses.fields(cls) if bool in (hints[f.name], *typing.get_args(hints[f.name]))}


def _split_argv(argv: Sequence[str], bools: set[str]) -> tuple[list[str], str | None, bool]:
    """(argv for the parser, --preset NAME, --print-config); drops the DeepSpeed launcher's --local_rank."""
    out: list[str] = []
    preset, print_config = None, False
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        flag = name.replace("-", "_")
        if flag == "__local_rank":
            i += 1 if eq or i + 1 >= len(argv) or argv[i + 1].startswith("-") else 2
            continue
        if flag == "__print_config":
            print_config = True
        elif flag == "__preset":
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError("--preset: expected a preset name")
                i, value = i + 1, argv[i + 1]
            preset = value
        elif flag.startswith("__no_") and flag[5:] in bools and not eq:
            out.append(f"--{flag[5:]}=false")
        else:
            out.append(arg)
        i += 1
    return out, preset, print_config


def _one_line(err: BaseException) -> str:
    """jsonargparse's (often multi-line) message as one line that names the flag."""
    import re

    msg = " ".join(str(err).split())
    literal = re.search(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$", msg)
    if literal:
        choices = ", ".join(c.strip().strip("'") for c in literal.group(1).split(","))
        msg = re.sub(r"Expected a typing.*$", f"must be one of {choices}, got {literal.group(2)!r}", msg)
    required = re.match(r"the following arguments are required: (.*)$", msg)
    if required:
        flags = ", ".join("--" + k.strip().replace("_", "-") for k in required.group(1).split(","))
        return f"{flags}: required"
    for prefix in ('Parser key "', 'Key "'):
        if msg.startswith(prefix):
            key, _, rest = msg[len(prefix):].partition('"')
            return f"--{key.replace('_', '-')}: {rest.lstrip(': ')}"
    return msg


def parse_config(cls: type, argv: Sequence[str] | None, *, stage: str, prog: str, description: str,
                 default_preset: str | None = None):
    """Parse argv into a ``cls`` instance. Errors are ValueErrors of one line naming the flag.

    ``default_preset`` applies when argv has no configuration at all.
    """
    from argparse import ArgumentError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(cls, stage=stage, prog=prog, description=description)
    rest, preset, print_config = _split_argv(argv, _bool_fields(cls))
    if preset is None and not rest:
        preset = default_preset
    if preset is not None:
        values = load_preset(stage, preset)
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise ValueError(f"--preset {preset}: unknown keys {unknown} in {PRESETS_DIR / stage / preset}.yaml")
        # YAML reads `5` as an int; a float field keeps a float, so --print-config shows the same value
        parser.set_defaults(**{k: float(v) if float in (hints[k], *typing.get_args(hints[k])) and type(v) is int
                               else v for k, v in values.items()})
    check_config_files(rest)
    try:
        ns = parser.parse_args(rest)
    except ArgumentError as e:
        raise ValueError(_one_line(e)) from None
    fields = {f.name: ns.get(f.name) for f in dataclasses.fields(cls) if f.init}
    cfg = cls(**fields)
    if print_config:
        print(dump_config(cfg, stage=stage, preset=preset), end="")
        raise SystemExit(0)
    return cfg


def check_config_files(argv: Sequence[str]) -> None:
    """Each ``--config FILE`` must exist and be valid YAML: a one-line error naming the file and the line
    (jsonargparse's own message names neither the file nor the flag)."""
    import yaml

    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name != "--config" or (not eq and i + 1 >= len(argv)):
            continue
        path = Path(value if eq else argv[i + 1])
        try:
            yaml.safe_load(path.read_text())
        except OSError as e:
            raise ValueError(f"--config {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise ValueError(f"--config {path}: {where}not valid YAML ({getattr(e, 'problem', None) or e})") from None


def dump_config(cfg: Any, *, stage: str, preset: str | None = None) -> str:
    """The resolved config as YAML; `--config` of this text gives the same config."""
    import yaml

    head = f"# twa_scale {stage} config, fully resolved" + (f" (from preset {preset})" if preset else "") + "\n"
    d = cfg.to_dict()  # redacts what must never be printed (storage_options may hold credentials)
    for key in [k for k, v in d.items() if v == "<redacted>"]:
        del d[key]
        flag = "--" + key.replace("_", "-")
        head += f"# {key}: omitted (it may hold credentials); set it with {flag} or the environment\n"
    return head + yaml.safe_dump(d, sort_keys=False)


def parse_train_args(argv: Sequence[str] | None = None, prog: str = "launch/train.py") -> TrainConfig:
    """Parse argv into a TrainConfig. No arguments at all selects the `quickstart` preset."""
    return parse_config(TrainConfig, argv, stage="train", prog=prog, default_preset="quickstart",
                        description="Train a model with DeepSpeed while streaming weight snapshots; optionally "
                                    "run TWA after. With no arguments: the quickstart preset.")
