"""Datasets, deterministic splits and loaders.

- `digits`: scikit-learn's bundled 8×8 handwritten digits (1,797 images, no
  download), scaled up to 32×32 RGB so CIFAR-style networks run on it unchanged.
- A directory in ImageFolder layout with train/ and val/ (or test/), scanned once
  per process; every view (train, eval, hold-out) shares the scan.
- A packed dataset (``twa-scale data pack``: WebDataset tar shards + index.json) at
  any fsspec URL (``s3://bucket/imagenet``, ``file:///data/c10``) or local path.

CIFAR augmentations for images of at most 64 px, ImageNet ones otherwise
(:mod:`twa_scale.data.decode`). All splits (validation for digits, the TWA-v hold-out,
the --limit-* subsets) use a fixed split seed, so every training seed and the TWA
stage see the same partitions; the training seed drives only order and augmentation.

Image loaders hand out whole batches planned up front from (seed, epoch): each
rank reads only its own batches, every rank gets the same number of training
batches, and batch k is made by ``dataset.load_batch`` with its own RNG, so the
order and the augmentation do not depend on ``num_workers``; ``start_batch``
starts an epoch at batch k (mid-epoch resume). Undecodable images are skipped,
logged by path and counted (``twa_scale_data_bad_images_total``); the loader fails
only when more than ``max_bad_fraction`` of an epoch's images are bad.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from twa_scale import comm
from twa_scale.data.config import DataConfig
from twa_scale.data.decode import DECODERS, Recipe, decode_batch, gpu_finish, normalize, recipe_for
from twa_scale.errors import ConfigError, TransientError, is_connection_error
from twa_scale.data.shards import (FolderSource, ShardSource, check_shards_present, image_size_of,
                              open_index, resolve_folder, scan_image_folder)

__all__ = ["DataBundle", "ImageDataset", "build_data", "make_loader",
           "SPLIT_SEED", "DEFAULT_MAX_BAD_FRACTION", "DECODERS"]

log = logging.getLogger("twa_scale.data")

SPLIT_SEED = 20230501  # fixed: partitions must not move with --seed
DEFAULT_MAX_BAD_FRACTION = 0.01
# Training batches of packed data are cut from runs of this many neighbouring samples (one ranged
# read each); the packed order is already random, and run boundaries move every epoch.
RUN_LENGTH = 16


@dataclasses.dataclass
class DataBundle:
    train: Dataset
    """Training images, without the hold-out."""
    holdout: Dataset | None
    """Deterministic hold-out split of the training data (TWA-v), or None."""
    val: Dataset
    num_classes: int
    image_size: int
    train_eval: Dataset | None = None
    """The training split with evaluation transforms (BatchNorm recalibration, TWA fitting)."""
    classes: list[str] | None = None
    """Class names in label order (None for digits)."""


def _split(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """(kept, held_out) index lists for a deterministic split of range(n)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    k = int(round(n * fraction))
    return sorted(perm[k:]), sorted(perm[:k])


def _limit_indices(indices: list[int], limit: int | None, salt: int) -> list[int]:
    """A fixed random subset of ``indices`` of size ``limit`` (all of them when None)."""
    if limit is None or limit >= len(indices):
        return indices
    g = torch.Generator().manual_seed(SPLIT_SEED + salt)
    return sorted(indices[i] for i in torch.randperm(len(indices), generator=g)[:limit].tolist())


def input_normalization(data: str, image_size: int) -> dict:
    """How evaluation feeds images to the model, as a plain-torchvision user would redo it: RGB in [0, 1],
    resized and centre-cropped (larger images), then (x - mean) / std per channel."""
    if data == "digits":
        return {"mean": [0.5] * 3, "std": [0.5] * 3, "size": 32, "resize": None}
    r = recipe_for(image_size, train=False)
    return {"mean": list(r.mean), "std": list(r.std), "size": r.size, "resize": None if r.small else 256}


def _digits() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = ((x - 0.5) / 0.5).contiguous()
    y = torch.tensor(d.target, dtype=torch.long)
    train_idx, val_idx = _split(len(y), 0.2)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx])


def _sharded(spec: str, storage_options: dict | str | None) -> tuple:
    """(train source, val source, classes, image size) of a packed dataset at SPEC."""
    idx = open_index(spec, storage_options)
    check_shards_present(idx, storage_options=storage_options)
    return (ShardSource(idx.url, idx.split("train"), storage_options),
            ShardSource(idx.url, idx.split("val"), storage_options), list(idx.classes), idx.image_size)


def build_data(cfg: DataConfig, *, storage_options: dict | str | None = None) -> DataBundle:
    """Datasets for a DataConfig: train (minus hold-out), hold-out, val.

    ``cfg.data`` is `digits`, a local ImageFolder tree (scanned once per process, shared by every view),
    or a packed dataset (`twa-scale data pack`) at any store URL or local path, read with
    ``storage_options`` (``--storage-options``).
    """
    decode = cfg.decode
    max_bad = cfg.max_bad_fraction
    if cfg.data == "digits":
        train_full, val = _digits()
        n_train = len(train_full)
        size, num_classes, classes = 32, 10, None
    else:
        folder = resolve_folder(cfg.data)
        if folder is not None:
            root, train_dir, val_dir = folder
            classes, paths, labels = scan_image_folder(root, train_dir)
            val_classes = sorted(e.name for e in os.scandir(val_dir) if e.is_dir())
            if val_classes != classes:
                raise ConfigError(f"--data {cfg.data}: class folders of {val_dir.name}/ differ from train/")
            train_src = FolderSource(paths, labels)
            val_src = FolderSource(*scan_image_folder(root, val_dir, classes)[1:])
            size = image_size_of(paths)
        else:
            train_src, val_src, classes, size = _sharded(cfg.data, storage_options)
        num_classes = len(classes)
        n_train = len(train_src)

        def view(src, indices, train):
            return ImageDataset(src, indices, recipe_for(size, train), decode=decode, max_bad_fraction=max_bad,
                                label=cfg.data)
    # The hold-out is carved out first, so --limit-train never changes which images it holds.
    kept, held = _split(n_train, cfg.holdout_fraction)
    kept = _limit_indices(kept, cfg.limit_train, salt=1)
    if cfg.data == "digits":
        val_idx = _limit_indices(list(range(len(val))), cfg.limit_val, salt=2)
        return DataBundle(train=Subset(train_full, kept), holdout=Subset(train_full, held) if held else None,
                          val=Subset(val, val_idx), num_classes=num_classes, image_size=size,
                          train_eval=Subset(train_full, kept))
    val_idx = _limit_indices(list(range(len(val_src))), cfg.limit_val, salt=2)
    return DataBundle(train=view(train_src, kept, True), holdout=view(train_src, held, False) if held else None,
                      val=view(val_src, val_idx, False), num_classes=num_classes, image_size=size,
                      train_eval=view(train_src, kept, False), classes=classes)


class ImageDataset(Dataset):
    """A view (index subset + recipe) of an image source: ImageFolder files or packed shards.

    ``ds[i]`` decodes one sample (tests, notebooks); loaders call :meth:`load_batch`.
    """

    def __init__(self, source, indices: Sequence[int], recipe: Recipe, *, decode: str = "cpu",
                 max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, label: str = ""):
        if decode not in DECODERS:
            raise ConfigError(f"--decode {decode!r}: must be one of {', '.join(DECODERS)}")
        self.source, self.indices, self.recipe = source, list(indices), recipe
        self.decode, self.max_bad_fraction, self.label = decode, max_bad_fraction, label

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def packed(self) -> bool:
        return isinstance(self.source, ShardSource)

    def __getitem__(self, i: int):
        """(normalised float (3, S, S), label); random draws come from torch's global RNG."""
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        item = self.load_batch([i], rng, normalized=True, mode="pil" if self.decode == "pil" else "cpu")
        if item.get("error") or item["bad"]:
            raise ConfigError(item.get("error") or f"{item['bad'][0][0]}: {item['bad'][0][1]}")
        return item["x"][0], int(item["y"][0])

    def load_batch(self, positions: Sequence[int], rng: np.random.Generator, *, normalized: bool,
                   mode: str | None = None) -> dict:
        """Read and decode the samples at ``positions`` (into this view). Never raises for bad data:
        returns {"x", "y", "bad": [(name, error)]} or {"error": message}, so the message reaches the
        main process as one line rather than as a worker traceback."""
        mode = mode or self.decode
        src = np.asarray([self.indices[p] for p in positions], dtype=np.int64)
        try:
            blobs = self.source.read(src.tolist())
        except ConfigError as e:
            return {"error": str(e)}
        except OSError as e:  # the store is down (transient, exit 75) or refuses access (permanent, exit 2)
            return {"error": f"--data {self.label}: reading {self.source.name(int(src[0]))}: {e}",
                    "transient": is_connection_error(e)}
        x, ok, bad = decode_batch(blobs, self.recipe, rng, mode)
        if normalized and mode == "cpu":
            x = normalize(x, self.recipe)
        y = torch.as_tensor(self.source.labels[src[ok]], dtype=torch.long)
        return {"x": x, "y": y, "bad": [(self.source.name(int(src[p])), err) for p, err in bad]}


def _plan(n: int, *, batch_size: int, train: bool, seed: int, epoch: int, rank: int, world: int,
          run_length: int = 1) -> list[np.ndarray]:
    """This rank's batches (positions into the dataset) for one epoch, from (seed, epoch) only.

    Train: one global order (a permutation of runs of ``run_length`` neighbours, run boundaries
    shifted per epoch; run_length 1 = a plain permutation), cut into equal contiguous rank spans
    of whole batches: every rank gets ``n // world // batch_size`` batches. Eval: contiguous,
    unpadded spans, so the union over ranks is the dataset exactly once.
    """
    if not train:
        lo, hi = rank * n // world, (rank + 1) * n // world
        return [np.arange(s, min(s + batch_size, hi)) for s in range(lo, hi, batch_size)]
    rng = np.random.default_rng([seed, epoch, SPLIT_SEED])
    if run_length > 1:
        shift = int(rng.integers(0, run_length))
        starts = np.arange(shift - run_length, n, run_length)
        runs = [np.arange(max(0, s), min(n, s + run_length)) for s in starts if min(n, s + run_length) > max(0, s)]
        order = np.concatenate([runs[j] for j in rng.permutation(len(runs))]) if runs else np.arange(0)
    else:
        order = rng.permutation(n)
    per_rank = n // world
    mine = order[rank * per_rank: rank * per_rank + per_rank // batch_size * batch_size]
    return [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]


class _Batches(Dataset):
    """Map-style over (seed, epoch, k): item is batch k of that epoch's plan for this rank, made in whichever
    worker the DataLoader picks, with an RNG of its own. Plans are computed where needed (in the worker)."""

    def __init__(self, dataset: ImageDataset, *, batch_size: int, train: bool, rank: int, world: int,
                 normalized: bool):
        self.dataset, self.batch_size, self.train, self.normalized = dataset, batch_size, train, normalized
        self.rank, self.world = rank, world
        self._plans: dict[tuple[int, int], list[np.ndarray]] = {}

    def plan(self, seed: int, epoch: int) -> list[np.ndarray]:
        key = (seed, epoch)
        if key not in self._plans:
            if len(self._plans) > 2:
                self._plans.clear()
            self._plans[key] = _plan(len(self.dataset), batch_size=self.batch_size, train=self.train, seed=seed,
                                     epoch=epoch, rank=self.rank, world=self.world,
                                     run_length=RUN_LENGTH if self.dataset.packed else 1)
        return self._plans[key]

    def __len__(self) -> int:  # not used: the sampler says which items an epoch has
        return 0

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        seed, epoch, k = key
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, self.rank, k]))
        return self.dataset.load_batch(self.plan(seed, epoch)[k].tolist(), rng, normalized=self.normalized)


class _Keys(torch.utils.data.Sampler):
    """The (seed, epoch, k) items of the current pass; reset before each pass of a reused DataLoader."""

    def __init__(self):
        self.keys: list[tuple[int, int, int]] = []

    def __iter__(self):
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


_INHERITED: list = []


def _worker_init(_worker_id: int) -> None:
    """A forked worker inherits the parent's fsspec clients (s3fs: bound to the parent's event loop).
    fsspec drops them from its cache in the child, and their finalizers would then fail noisily on a
    loop that does not run here. Keep them referenced: a worker ends with os._exit, so they are never
    finalised here, and the parent closes its own."""
    import fsspec

    todo = [fsspec.AbstractFileSystem]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        _INHERITED.extend(getattr(cls, "_cache", {}).values())


# DataLoaders with persistent workers, reused across epochs (no fork, no new S3 connections per epoch).
# Keyed by the view and the loader's shape; the two most recent (train and eval) are kept.
_LOADERS: dict[tuple, tuple] = {}
_MAX_LOADERS = 2


def _shared_loader(dataset: ImageDataset, *, batch_size: int, train: bool, num_workers: int, normalized: bool,
                   pin: bool) -> tuple[DataLoader, _Keys, _Batches]:
    rank, world = comm.rank(), comm.world_size()
    key = (id(dataset), batch_size, train, num_workers, normalized, pin, rank, world)
    if key in _LOADERS:
        _LOADERS[key] = _LOADERS.pop(key)  # most recent last
        return _LOADERS[key][1:]
    while len(_LOADERS) >= _MAX_LOADERS:
        _LOADERS.pop(next(iter(_LOADERS)))  # workers of the evicted loader shut down with it
    batches = _Batches(dataset, batch_size=batch_size, train=train, rank=rank, world=world, normalized=normalized)
    keys = _Keys()
    loader = DataLoader(batches, batch_size=None, sampler=keys, num_workers=num_workers, pin_memory=pin,
                        persistent_workers=num_workers > 0, worker_init_fn=_worker_init)
    _LOADERS[key] = (dataset, loader, keys, batches)  # holding the dataset keeps id() unique
    return loader, keys, batches


class _ImageLoader:
    """One pass over this rank's batches of an :class:`ImageDataset`: (x, y) pairs; counts and bounds
    undecodable images."""

    def __init__(self, dataset: ImageDataset, *, batch_size: int, train: bool, seed: int, epoch: int,
                 start_batch: int, num_workers: int, device: torch.device, uint8: bool = False):
        self.dataset, self.device, self.uint8 = dataset, device, uint8
        self.on_device = device.type != "cpu" or dataset.decode == "gpu" or uint8
        self.loader, self.keys, batches = _shared_loader(dataset, batch_size=batch_size, train=train,
                                                         num_workers=num_workers, normalized=not self.on_device,
                                                         pin=device.type == "cuda")
        plan = batches.plan(seed, epoch)
        self.items = [(seed, epoch, k) for k in range(start_batch, len(plan))]
        self.planned = sum(len(b) for b in plan[start_batch:])
        self.bad = 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        from twa_scale import metrics

        ds = self.dataset
        self.keys.keys = self.items
        for item in self.loader:
            if item.get("error"):
                raise (TransientError if item.get("transient") else ConfigError)(item["error"])
            for name, err in item["bad"]:
                log.warning("skipped undecodable image %s (%s)", name, err)
                metrics.data_bad_images(1)
            self.bad += len(item["bad"])
            if self.bad > ds.max_bad_fraction * self.planned:
                raise ConfigError(f"--data {ds.label}: {self.bad} of this epoch's {self.planned} images on rank "
                                  f"{comm.rank()} are undecodable, more than --max-bad-fraction "
                                  f"{ds.max_bad_fraction:g} (last: {item['bad'][-1][0]}: {item['bad'][-1][1]})")
            if not len(item["y"]):
                raise ConfigError(f"--data {ds.label}: every image of a batch is undecodable "
                                  f"(last: {item['bad'][-1][0]})")
            x = item["x"]
            if ds.decode == "gpu":
                x = gpu_finish(x, ds.recipe, self.device)
            elif self.on_device:
                x = x.to(self.device, non_blocking=True)
            if self.on_device and not self.uint8 and x.dtype == torch.uint8:  # (`pil` batches come normalised)
                x = normalize(x, ds.recipe)
            yield x, item["y"]


class _Strided(torch.utils.data.Sampler):
    """Rank r evaluates indices r, r+W, ...: no padding, so totals are exact after all-reduce."""

    def __init__(self, n: int, rank: int, world: int):
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self):
        return len(self.idx)


def make_loader(dataset: Dataset, *, batch_size: int, train: bool, seed: int = 0, epoch: int = 0,
                num_workers: int = 0, start_batch: int = 0, device: torch.device | None = None,
                uint8: bool = False):
    """A loader over this rank's part of ``dataset`` (an iterable of (x, y) with ``len``).

    Train: shuffled by (seed, epoch), the ragged tail dropped so every rank takes the same number
    of steps. Eval: unpadded, each sample on exactly one rank. Augmentation randomness is seeded
    by (seed, epoch, rank, batch), so a resumed run sees exactly the batches an uninterrupted one
    would, whatever ``num_workers``. ``start_batch`` skips the first k batches of the epoch
    without reading them. Image batches come back on ``device`` (default: the rank's CUDA device,
    else the CPU), normalised to float32 (on a CUDA device: moved as uint8, normalised there), or
    as uint8 with ``uint8=True`` (normalise with ``twa_scale.data.decode.normalize(x, dataset.recipe)``).
    """
    rank, world = comm.rank(), comm.world_size()
    if isinstance(dataset, ImageDataset):
        dev = device or (comm.device() if torch.cuda.is_available() else torch.device("cpu"))
        return _ImageLoader(dataset, batch_size=batch_size, train=train, seed=seed, epoch=epoch,
                            start_batch=start_batch, num_workers=num_workers, device=dev, uint8=uint8)
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
    else:
        sampler = _Strided(len(dataset), rank, world)
    if start_batch:
        sampler = list(sampler)[start_batch * batch_size:]
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7_919 + rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train, num_workers=num_workers,
                      generator=g, pin_memory=torch.cuda.is_available(), persistent_workers=False)
