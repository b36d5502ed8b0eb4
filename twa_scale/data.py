"""Datasets, deterministic splits and loaders.

- `digits`: scikit-learn's bundled 8×8 handwritten digits (1,797 images, no
  download), scaled up to 32×32 RGB so CIFAR-style networks run on it unchanged.
- A directory in ImageFolder layout with train/ and val/ (or test/): CIFAR
  augmentations for images of at most 64 px, ImageNet augmentations otherwise.

All splits (validation for digits, the TWA-v hold-out, the --limit-* subsets)
use a fixed split seed, so every training seed and the TWA stage see the same
partitions; ``cfg.seed`` drives only order and augmentation.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from twa_scale import comm

__all__ = ["DataBundle", "build_data", "make_loader", "check_image_folder", "SPLIT_SEED"]

SPLIT_SEED = 20230501  # fixed: partitions must not move with --seed
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def check_image_folder(path: str) -> tuple[Path, Path]:
    """(train_dir, val_dir) of an ImageFolder tree, or a one-line error naming the directory."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--data {path}: not a directory (use `digits` or an ImageFolder root)")
    train = root / "train"
    val = next((root / v for v in ("val", "test") if (root / v).is_dir()), None)
    if not train.is_dir() or val is None:
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise ValueError(f"--data {path}: expected subfolders train/ and val/ (or test/), found {found[:8] or 'none'}")
    return train, val


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


def _digits() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = ((x - 0.5) / 0.5).contiguous()
    y = torch.tensor(d.target, dtype=torch.long)
    train_idx, val_idx = _split(len(y), 0.2)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx])


def _image_size(folder: Path) -> int:
    from PIL import Image

    first = next(p for p in sorted(folder.rglob("*")) if p.is_file())
    with Image.open(first) as im:
        return max(im.size)


def _transforms(image_size: int, train: bool):
    from torchvision import transforms as T

    if image_size <= 64:  # CIFAR recipe: pad-and-crop + flip
        mean, std = CIFAR_MEAN, CIFAR_STD
        aug = [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()] if train else []
    else:  # ImageNet recipe
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        aug = ([T.RandomResizedCrop(224), T.RandomHorizontalFlip()] if train
               else [T.Resize(256), T.CenterCrop(224)])
    return T.Compose(aug + [T.ToTensor(), T.Normalize(mean, std)])


def build_data(cfg) -> DataBundle:
    """Datasets for a TrainConfig: train (minus hold-out), hold-out, val."""
    if cfg.data == "digits":
        train_full, val = _digits()
        train_eval_full, size, num_classes = train_full, 32, 10
    else:
        from torchvision.datasets import ImageFolder

        train_dir, val_dir = check_image_folder(cfg.data)
        size = _image_size(train_dir)
        train_full = ImageFolder(str(train_dir), transform=_transforms(size, train=True))
        train_eval_full = ImageFolder(str(train_dir), transform=_transforms(size, train=False))
        val = ImageFolder(str(val_dir), transform=_transforms(size, train=False))
        if val.classes != train_full.classes:
            raise ValueError(f"--data {cfg.data}: class folders of {val_dir.name}/ differ from train/")
        num_classes = len(train_full.classes)
    # The hold-out is carved out first, so --limit-train never changes which images it holds.
    kept, held = _split(len(train_full), cfg.holdout_fraction)
    kept = _limit_indices(kept, cfg.limit_train, salt=1)
    val_idx = _limit_indices(list(range(len(val))), cfg.limit_val, salt=2)
    return DataBundle(train=Subset(train_full, kept), holdout=Subset(train_eval_full, held) if held else None,
                      val=Subset(val, val_idx), num_classes=num_classes, image_size=size,
                      train_eval=Subset(train_eval_full, kept))


class _Strided(torch.utils.data.Sampler):
    """Rank r evaluates indices r, r+W, ...: no padding, so totals are exact after all-reduce."""

    def __init__(self, n: int, rank: int, world: int):
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self):
        return len(self.idx)


def make_loader(dataset: Dataset, *, batch_size: int, train: bool, seed: int = 0, epoch: int = 0,
                num_workers: int = 0) -> DataLoader:
    """A loader over this rank's shard.

    Train: a DistributedSampler shuffled by (seed, epoch), dropping the ragged
    tail so every rank takes the same number of steps. Eval: strided, unpadded.
    Augmentation randomness is seeded by (seed, epoch, rank), so a resumed run
    sees exactly the batches an uninterrupted one would.
    """
    rank, world = comm.rank(), comm.world_size()
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
    else:
        sampler = _Strided(len(dataset), rank, world)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7_919 + rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train, num_workers=num_workers,
                      generator=g, pin_memory=torch.cuda.is_available(), persistent_workers=False)
