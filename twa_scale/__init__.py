"""Trainable Weight Averaging at cluster scale."""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("twa_scale")
except _metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
    __version__ = "0+unknown"
