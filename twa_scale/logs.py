"""Logs fit for a cluster: one handler on the project's logger, rank-0 INFO, no progress bars off a TTY.

``kubectl logs``, Loki and CloudWatch keep every byte a job writes, so:

- one handler, on the ``twa_scale`` logger (not the root): a library that configures the root logger
  cannot make a message appear twice, and third-party INFO (botocore's credential and endpoint lines,
  s3fs, DeepSpeed) is silenced: their warnings still show;
- rank 0 logs INFO; other ranks log warnings and errors only, each line prefixed with its rank
  (``--log-all-ranks``: every rank at INFO);
- progress (:func:`progress`) is a tqdm bar only when stderr is a terminal, on rank 0; otherwise a plain
  line every ``PROGRESS_SECONDS`` seconds (no ``\\r``, no bar redrawn into the log);
- ``--log-format json``: one JSON object per line (``time``, ``level``, ``logger``, ``rank``, ``message``)
  for log pipelines.

The launchers call :func:`configured` around a stage; it undoes itself on exit, so a test that runs a
stage in-process leaves pytest's own log capture as it was.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Iterable, Iterator

__all__ = ["configured", "configure", "progress", "rank_from_env", "LOGGER", "QUIET_LOGGERS", "PROGRESS_SECONDS"]

LOGGER = "twa_scale"
# Libraries whose INFO lines say nothing a user acts on (credentials found, endpoint chosen, op loaded).
QUIET_LOGGERS = ("botocore", "boto3", "aiobotocore", "s3fs", "fsspec", "urllib3", "asyncio", "DeepSpeed",
                 "torch.distributed", "filelock", "matplotlib", "PIL", "jsonargparse", "mlflow")
PROGRESS_SECONDS = 30.0
"""Off a terminal, a progress line at most this often."""
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def rank_from_env() -> int:
    """The global rank the launcher exported (0 outside a launcher): known before any process group."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _JsonFormatter(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
               "level": record.levelname, "logger": record.name, "rank": self.rank, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _Handler(logging.StreamHandler):
    """Ours (so :func:`configure` replaces it instead of adding a second one)."""


def configure(*, log_format: str = "text", all_ranks: bool = False, rank: int | None = None,
              stream=None) -> logging.Logger:
    """Install the one handler on the ``twa_scale`` logger (replacing an earlier one) and quiet the libraries."""
    rank = rank_from_env() if rank is None else rank
    logger = logging.getLogger(LOGGER)
    for h in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(h)
    handler = _Handler(sys.stderr if stream is None else stream)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter(rank))
    else:
        fmt = TEXT_FORMAT if rank == 0 else TEXT_FORMAT.replace("%(levelname)s", f"%(levelname)s [rank {rank}]")
        handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 or all_ranks else logging.WARNING)
    logger.propagate = False
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return logger


@contextlib.contextmanager
def configured(**kwargs) -> Iterator[logging.Logger]:
    """:func:`configure` for the duration of a stage; the loggers' earlier state is restored after."""
    logger = logging.getLogger(LOGGER)
    saved = (list(logger.handlers), logger.level, logger.propagate,
             {n: logging.getLogger(n).level for n in QUIET_LOGGERS})
    try:
        yield configure(**kwargs)
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
        for name, level in saved[3].items():
            logging.getLogger(name).setLevel(level)


class _Lines:
    """A progress iterator that logs a plain line every ``seconds`` on rank 0 (and nothing elsewhere).

    It takes tqdm's ``set_postfix`` so callers need not know which one they hold."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None, seconds: float, emit: bool):
        self.iterable, self.desc, self.seconds, self.emit = iterable, desc, seconds, emit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""
        self.log = logging.getLogger(f"{LOGGER}.progress")

    def set_postfix(self, refresh: bool = True, **kw) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kw.items())

    def __len__(self) -> int:
        return len(self.iterable)

    def __iter__(self):
        start = last = time.monotonic()
        for n, item in enumerate(self.iterable, start=1):
            yield item
            now = time.monotonic()
            if self.emit and now - last >= self.seconds:
                last = now
                of = f"/{self.total}" if self.total else ""
                extra = f", {self.postfix}" if self.postfix else ""
                self.log.info("%s: %d%s (%.2f it/s%s)", self.desc, n, of, n / max(now - start, 1e-9), extra)


def progress(iterable: Iterable, desc: str, *, total: int | None = None, rank: int | None = None,
             seconds: float | None = None):
    """A tqdm bar on rank 0 when stderr is a terminal; otherwise plain log lines (rank 0) or nothing."""
    from twa_scale import comm

    rank = comm.rank() if rank is None else rank
    if rank == 0 and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False, mininterval=2.0)
    return _Lines(iterable, desc, total, PROGRESS_SECONDS if seconds is None else seconds, emit=rank == 0)
