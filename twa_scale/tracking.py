"""Experiment tracking: one small logger interface, TensorBoard built in, MLflow optional.

Engineers compare runs in TensorBoard or MLflow, not in JSON files; Prometheus (twa_scale/metrics.py)
stays for live operations. As torchtitan's ``MetricsProcessor`` and Lightning's loggers do, the stages
call one interface and each sink writes its own format:

    tracking.setup("tensorboard", run_url=cfg.run_url, stage="train", storage_options=...)
    tracking.log_metrics({"train/loss": 0.51, "train/lr": 0.1}, step=120)
    tracking.log_params(cfg.to_dict())
    tracking.log_text("twa/result", json_text)
    tracking.close()

``--logger tensorboard`` writes event files under ``<snapshot-url>/<run-id>/tensorboard/<stage>/``
(``tensorboard --logdir`` that directory, or its parent for every stage). A ``file://`` store gets them
in place; any other store gets a copy of each event file after every :func:`flush` (end of epoch) and
at :func:`close`, written from a local staging directory (an object store cannot append).
``--logger mlflow`` (``pip install 'twa_scale[mlflow]'``) logs to ``MLFLOW_TRACKING_URI`` (a server, or
a local store: ``sqlite:///mlflow.db``, or ``file:///path/mlruns`` with ``MLFLOW_ALLOW_FILE_STORE=true``
since MLflow 3), experiment ``twa_scale``, one MLflow run per stage named ``<run-id>/<stage>``.
Both: ``--logger tensorboard,mlflow``. Only global rank 0 logs; elsewhere every call is a no-op.

Tags: per optimizer step ``train/loss``, ``train/lr``, ``train/samples_per_second`` (step = global step,
at the --log-every-steps cadence); per epoch ``val/loss``, ``val/accuracy``, ``train/epoch_loss``
(step = epoch); ``snapshot/seq`` and ``snapshot/stall_seconds`` per snapshot (step = global step);
``twa/*`` per TWA epoch, the probes of a live follower (``probe/*``, step = the probe's index), and the
final result: ``twa/accuracy``, ``twa/swa_accuracy``, ``twa/start_accuracy``, and ``twa/coefficient``
(one value per snapshot: step = the snapshot's seq), with result.json as text ``twa/result``.
"""
from __future__ import annotations

import abc
import json
import logging
import os
import tempfile
from typing import Any, Mapping

__all__ = ["Tracker", "TensorBoardTracker", "MlflowTracker", "setup", "close", "flush", "log_metrics",
           "log_params", "log_text", "active", "LOGGERS", "check_logger"]

log = logging.getLogger("twa_scale.tracking")
LOGGERS = ("none", "tensorboard", "mlflow")


def check_logger(value: str) -> list[str]:
    """``--logger`` as a list of sink names (a one-line error naming the flag for an unknown one)."""
    names = [n.strip() for n in str(value).split(",") if n.strip()]
    for n in names:
        if n not in LOGGERS:
            raise ValueError(f"--logger: must be one of {', '.join(LOGGERS)} (or several, comma-separated), "
                             f"got {n!r}")
    return [n for n in names if n != "none"]


class Tracker(abc.ABC):
    """One experiment-tracking sink. Values are floats; ``step`` is the x axis of each series."""

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    @abc.abstractmethod
    def log_params(self, params: Mapping[str, Any]) -> None: ...

    @abc.abstractmethod
    def log_text(self, key: str, text: str) -> None: ...

    def flush(self) -> None:
        """Make what was logged so far visible (an epoch ended)."""

    def close(self) -> None:
        self.flush()


def _flat(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class TensorBoardTracker(Tracker):
    """Event files through torch's ``SummaryWriter`` (TensorBoard's own format and reader)."""

    def __init__(self, run_url: str, stage: str, storage_options: str | dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.url = f"{run_url.rstrip('/')}/tensorboard/{stage}"
        self._mirror = None
        if self.url.startswith("file://"):
            logdir = self.url[len("file://"):]
        else:  # staged locally, copied to the store at each flush
            from twa_scale.store import open_store

            logdir = tempfile.mkdtemp(prefix=f"twa-scale-tb-{stage}-")
            self._mirror = open_store(self.url, storage_options)
        self.logdir = logdir
        self.writer = SummaryWriter(log_dir=logdir)
        log.info("tensorboard: event files in %s", self.url)

    def log_metrics(self, metrics, step):
        for k, v in metrics.items():
            self.writer.add_scalar(k, float(v), global_step=int(step))

    def log_params(self, params):
        self.writer.add_text("config", "```\n" + json.dumps(_flat(params), indent=1, sort_keys=True) + "\n```")

    def log_text(self, key, text):
        self.writer.add_text(key, "```\n" + text + "\n```")

    def flush(self):
        self.writer.flush()
        if self._mirror is not None:
            for name in sorted(os.listdir(self.logdir)):
                with open(os.path.join(self.logdir, name), "rb") as f:
                    self._mirror.put_small(name, f.read())

    def close(self):
        self.writer.close()
        self.flush()


class MlflowTracker(Tracker):
    """An MLflow run per stage (``pip install 'twa_scale[mlflow]'``); ``MLFLOW_TRACKING_URI`` picks the server."""

    def __init__(self, run_id: str, stage: str):
        try:
            import mlflow
        except ImportError:
            raise ValueError("--logger mlflow: MLflow is not installed (pip install 'twa_scale[mlflow]')") from None
        self.mlflow = mlflow
        try:
            mlflow.set_experiment("twa_scale")
            self.run = mlflow.start_run(run_name=f"{run_id}/{stage}", tags={"twa_scale.run_id": run_id,
                                                                            "twa_scale.stage": stage})
        except mlflow.exceptions.MlflowException as e:  # e.g. a file store without MLFLOW_ALLOW_FILE_STORE=true
            raise ValueError(f"--logger mlflow: tracking URI {mlflow.get_tracking_uri()}: "
                             f"{str(e).splitlines()[0]}") from None
        log.info("mlflow: run %s in %s", self.run.info.run_id, mlflow.get_tracking_uri())

    def log_metrics(self, metrics, step):
        self.mlflow.log_metrics({k.replace("/", "."): float(v) for k, v in metrics.items()}, step=int(step))

    def log_params(self, params):
        flat = _flat(params)
        self.mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def log_text(self, key, text):
        self.mlflow.log_text(text, f"{key}.txt")

    def close(self):
        self.mlflow.end_run()


_sinks: list[Tracker] = []


def setup(logger: str, *, run_url: str, run_id: str, stage: str, storage_options: str | dict | None = None) -> None:
    """Open the ``--logger`` sinks for one stage on global rank 0 (closing any a previous stage left)."""
    from twa_scale import comm

    close()
    if comm.rank() != 0:
        return
    for name in check_logger(logger):
        _sinks.append(TensorBoardTracker(run_url, stage, storage_options) if name == "tensorboard"
                      else MlflowTracker(run_id, stage))


def active() -> bool:
    return bool(_sinks)


def log_metrics(metrics: Mapping[str, float], step: int) -> None:
    for s in _sinks:
        s.log_metrics(metrics, step)


def log_params(params: Mapping[str, Any]) -> None:
    for s in _sinks:
        s.log_params(params)


def log_text(key: str, text: str) -> None:
    for s in _sinks:
        s.log_text(key, text)


def flush() -> None:
    for s in _sinks:
        s.flush()


def close() -> None:
    while _sinks:
        _sinks.pop().close()
