"""Tunables read from the environment, so a Kubernetes manifest can set them without new flags.

A malformed value fails with an error that names the variable.
"""
from __future__ import annotations

import os

__all__ = ["env_int", "env_float", "TRAIN_CONFIG_ENV_PREFIX", "TWA_CONFIG_ENV_PREFIX", "p_kernel", "p_chunk_columns",
           "P_KERNELS"]

# Every flag of launch/train.py and launch/twa.py can also come from the environment (twa_scale.config):
# TWA_SCALE_TRAIN_<FLAG> and TWA_SCALE_TWA_<FLAG>, e.g. TWA_SCALE_TRAIN_EPOCHS=3, TWA_SCALE_TWA_CONFIG=twa.yaml.
TRAIN_CONFIG_ENV_PREFIX = "TWA_SCALE_TRAIN_"
TWA_CONFIG_ENV_PREFIX = "TWA_SCALE_TWA_"


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None


P_KERNELS = ("auto", "native", "compile", "eager")


def p_kernel() -> str:
    """TWA_SCALE_P_KERNEL: how packed (1/2/4/8-bit) P is multiplied: auto | native | compile | eager.

    auto: the C kernel on CPU when a compiler is found, torch.compile on CUDA, else eager.
    """
    raw = (os.environ.get("TWA_SCALE_P_KERNEL") or "auto").strip().lower()
    if raw not in P_KERNELS:
        raise ValueError(f"environment variable TWA_SCALE_P_KERNEL={raw!r} is not one of {', '.join(P_KERNELS)}")
    return raw


def p_chunk_columns() -> int:
    """TWA_SCALE_P_CHUNK_COLUMNS: columns per step of the eager packed-P path (bounds its temporaries)."""
    return max(1, env_int("TWA_SCALE_P_CHUNK_COLUMNS", 1 << 15))
