"""One-line errors that name the flag: the value checks every config section shares (training, data, TWA)."""
from __future__ import annotations

import re
import typing
from typing import Any

__all__ = ["bad", "check_choice", "check_at_least_one", "check_run_id", "check_store"]


def bad(flag: str, msg: str):
    raise ValueError(f"--{flag}: {msg}")


def check_choice(flag: str, value: Any, allowed: Any) -> None:
    """One-line error naming ``--flag`` when ``value`` is not one of ``allowed`` (a tuple or a Literal)."""
    choices = typing.get_args(allowed) or tuple(allowed)
    if value not in choices:
        bad(flag, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_at_least_one(**values: int | None) -> None:
    """``--flag: must be >= 1`` for each keyword (a field name) whose value is set and below 1."""
    for name, v in values.items():
        if v is not None and v < 1:
            bad(name.replace("_", "-"), f"must be >= 1, got {v}")


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_id(run_id: str) -> None:
    """A run id becomes part of every object key and log line: letters, digits and ``._-`` only (it starts
    with a letter or digit, at most 128 characters), so no newline, slash or space reaches a key or a log."""
    if not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"--run-id {run_id!r}: use letters, digits, '.', '_' and '-' only, starting with a letter "
                         "or digit (at most 128 characters)" if run_id else "--run-id: must not be empty")


def check_store(snapshot_url: str, storage_options: str | None) -> None:
    """--storage-options (JSON) and --snapshot-url (its form), which both stages check."""
    from twa_scale.store.backend import check_url, parse_storage_options

    parse_storage_options(storage_options)  # one-line error for bad JSON
    try:
        check_url(snapshot_url)  # s3:// without a bucket, s3:/typo
    except ValueError as e:
        raise ValueError(f"--snapshot-url: {e}") from None
