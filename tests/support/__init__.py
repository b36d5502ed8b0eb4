"""Shared test helpers.

A test whose real component (a binary, a server, a dataset) is missing skips on
a developer machine, but fails when ``CI`` is set: CI must never pass by skipping.
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

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


def free_port(avoid_plus: int | None = None) -> int:
    """A free TCP port on loopback; with ``avoid_plus``, port+avoid_plus is free too
    (SeaweedFS binds gRPC at HTTP port + 10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if avoid_plus is None:
            return port
        if port + avoid_plus < 65535 and port < 55000:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + avoid_plus))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port found")
