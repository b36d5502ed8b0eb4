"""Tunables read from the environment, so a Kubernetes manifest can set them without new flags.

A malformed value fails with an error that names the variable.
"""
from __future__ import annotations

import os

__all__ = ["env_int", "env_float", "TRAIN_CONFIG_ENV_PREFIX", "TWA_CONFIG_ENV_PREFIX"]

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
