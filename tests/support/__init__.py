"""Shared test helpers.

A test whose real component (a binary, a server, a dataset) is missing skips on
a developer machine, but fails when ``CI`` is set: CI must never pass by skipping.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from devtools.s3server import free_port  # noqa: F401 - shared with the benchmarks

REPO = Path(__file__).resolve().parents[2]
CIFAR10 = REPO.parent / "shared" / "datasets" / "cifar10"


def missing(what: str) -> None:
    """Skip (locally) or fail (under CI) because ``what`` is not available."""
    if os.environ.get("CI"):
        pytest.fail(f"required test component missing under CI: {what}")
    pytest.skip(f"missing: {what}")


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"executable {name!r} on PATH")
    return path


def require_cifar10() -> Path:
    if not (CIFAR10 / "train").is_dir():
        missing(f"CIFAR-10 at {CIFAR10}")
    return CIFAR10
