"""``DataConfig``: what the data loader reads (the `data` section of the training flags).

The TWA stage rebuilds it from a run's manifest (:meth:`DataConfig.from_dict`); ``TrainConfig`` inherits it,
so the flags stay flat (``--data``, ``--decode``, ``--limit-train``). Cheap to import: the training job's
``--help`` loads it, so the dataset modules (torch) are imported only to check a ``--data`` that is not
`digits`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Self

from twa_scale.checks import bad, check_at_least_one, check_choice

__all__ = ["DataConfig", "Decode"]

Decode = Literal["cpu", "gpu", "pil"]


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    """data: the dataset, its splits and its decoding"""
    data: str = "digits"
    """`digits` (built in, no download), a directory with train/ and val/ (or test/) in ImageFolder layout,
    or a packed dataset (`twa-scale data pack`) at any fsspec URL, e.g. s3://bucket/imagenet or file:///data/c10."""
    decode: Decode = "cpu"
    """Image decoder: `cpu` (libjpeg-turbo, reduced-size decoding, uint8 augmentations), `gpu` (nvJPEG and
    augmentations on the device), or `pil` (the torchvision reference path)."""
    max_bad_fraction: float = 0.01
    """Undecodable images are skipped, logged and counted; the job fails when more than this fraction
    of an epoch's images on a rank are bad."""
    holdout_fraction: float = 0.0
    """Fraction of the training set held out (excluded from training) for TWA-v to fit on."""
    limit_train: int | None = None
    """Use a fixed random subset of this many training images (tests, quick runs)."""
    limit_val: int | None = None
    """Use a fixed random subset of this many validation images."""
    num_workers: int | None = None
    """DataLoader workers per rank; None: 0 for digits, else min(4, CPUs per local rank)."""

    def __post_init__(self) -> None:
        check_choice("decode", self.decode, Decode)
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            bad("max-bad-fraction", f"must be in [0, 1], got {self.max_bad_fraction}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            bad("holdout-fraction", f"must be in [0, 1), got {self.holdout_fraction}")
        check_at_least_one(limit_train=self.limit_train, limit_val=self.limit_val)
        if self.data != "digits":
            from twa_scale.data.shards import check_data_spec  # one-line error for a bad directory or URL scheme
            check_data_spec(self.data)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Rebuild a config (this class or a subclass) from a run manifest's config; unknown keys (from newer
        versions) are ignored.

        Data paths are not re-validated here: the TWA stage may run where the
        training data sits at the same path, or be pointed elsewhere by the caller.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in d.items() if k in names}
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            setattr(obj, f.name, kept.get(f.name, f.default))
        return obj
