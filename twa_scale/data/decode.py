"""Image decode and augmentation on uint8 tensors: one recipe, three decoders.

- ``cpu`` (default): libjpeg-turbo through simplejpeg, decoding at 1/2, 1/4 or 1/8 scale when the crop
  still covers the output size at that scale (DCT-domain downscaling, nearly free), then crop, resize
  (torch's uint8 antialiased bilinear kernel) and flip on uint8 tensors. Non-JPEG files go through PIL.
- ``gpu``: workers only read bytes and draw the crop boxes; the batch is decoded with nvJPEG
  (``torchvision.io.decode_jpeg(..., device="cuda")``) and cropped, resized and flipped on the device.
- ``pil``: today's torchvision recipe (PIL decode + ``transforms.ToTensor``), the reference the fast
  paths are tested against.

The recipe is the same for all three: RandomResizedCrop(224) + horizontal flip for training and
Resize(256) + CenterCrop(224) for evaluation; images of at most 64 px (CIFAR) get pad-4 random crop +
flip. Every random draw comes from a numpy Generator seeded per batch, so the augmentation of a batch
does not depend on which loader worker made it.
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["Recipe", "recipe_for", "decode_batch", "decode_one", "pil_transform", "normalize", "plan_box",
           "gpu_finish", "DECODERS", "CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN", "IMAGENET_STD"]

DECODERS = ("cpu", "gpu", "pil")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What to do to each image: the CIFAR (small) or ImageNet recipe, train or eval."""

    small: bool
    train: bool
    size: int
    """Output side length: the image size for the CIFAR recipe, 224 for ImageNet."""

    @property
    def mean(self):
        return CIFAR_MEAN if self.small else IMAGENET_MEAN

    @property
    def std(self):
        return CIFAR_STD if self.small else IMAGENET_STD


def recipe_for(image_size: int, train: bool) -> Recipe:
    small = image_size <= 64
    return Recipe(small=small, train=train, size=image_size if small else 224)


def plan_box(h: int, w: int, r: Recipe, rng: np.random.Generator) -> tuple[int, int, int, int, bool]:
    """(top, left, height, width, flip) of the crop in original pixel coordinates.

    For the CIFAR training recipe the box lives in the zero-padded image (top/left may be negative).
    """
    flip = bool(r.train and rng.random() < 0.5)
    if r.small:
        if not r.train:
            return 0, 0, h, w, False
        pad = r.size // 8
        return int(rng.integers(0, 2 * pad + 1)) - pad, int(rng.integers(0, 2 * pad + 1)) - pad, r.size, r.size, flip
    if not r.train:  # Resize(256) then CenterCrop(224) == centre square of 224/256 of the short side
        c = max(1, round(min(h, w) * 224 / 256))
        return (h - c) // 2, (w - c) // 2, c, c, False
    # RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)), torchvision's algorithm
    area = h * w
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(lo, hi))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw, flip
    ratio = w / h
    if ratio < 3 / 4:
        cw, ch = w, round(w / (3 / 4))
    elif ratio > 4 / 3:
        ch, cw = h, round(h * (4 / 3))
    else:
        cw, ch = w, h
    ch, cw = min(ch, h), min(cw, w)
    return (h - ch) // 2, (w - cw) // 2, ch, cw, flip


def _pil_rgb(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        # a writable copy: np.asarray would share PIL's read-only buffer, which torch.from_numpy refuses to
        # promise anything about (and an eval image that needs no resize would be returned as that view)
        return np.array(im.convert("RGB"))


def _jpeg_header(data: bytes) -> tuple[int, int] | None:
    import simplejpeg

    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        return h, w
    except ValueError:
        return None


def _crop_resize(img: torch.Tensor, top: int, left: int, ch: int, cw: int, flip: bool, r: Recipe) -> torch.Tensor:
    """CHW uint8 (any strides) -> (3, size, size) uint8."""
    from torchvision.transforms.v2 import functional as TF

    if r.small:
        if r.train:
            pad = r.size // 8
            img = torch.nn.functional.pad(img, [pad, pad, pad, pad])
            img = img[:, top + pad:top + pad + ch, left + pad:left + pad + cw]
        if img.shape[-2:] != (r.size, r.size):
            img = TF.resize(img, [r.size, r.size], antialias=True)
    else:
        img = img[:, top:top + ch, left:left + cw]
        img = TF.resize(img, [r.size, r.size], antialias=True)
    return img.flip(-1) if flip else img


def decode_one(data: bytes, r: Recipe, rng: np.random.Generator) -> torch.Tensor:
    """Encoded image -> augmented (3, size, size) uint8 tensor on the CPU. Raises on undecodable data."""
    import simplejpeg

    hw = _jpeg_header(data)
    if hw is None:  # PNG, CMYK JPEG, ...: PIL
        arr = _pil_rgb(data)
        top, left, ch, cw, flip = plan_box(arr.shape[0], arr.shape[1], r, rng)
    else:
        h, w = hw
        top, left, ch, cw, flip = plan_box(h, w, r, rng)
        if r.small:
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
        else:  # the smallest DCT scale whose crop still covers the output
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=math.ceil(h * r.size / ch),
                                         min_width=math.ceil(w * r.size / cw))
            if arr.shape[:2] != (h, w):
                sy, sx = arr.shape[0] / h, arr.shape[1] / w
                top, left = int(top * sy), int(left * sx)
                ch = max(1, min(arr.shape[0] - top, round(ch * sy)))
                cw = max(1, min(arr.shape[1] - left, round(cw * sx)))
    img = torch.from_numpy(arr).permute(2, 0, 1)  # channels-last strides: torch's fast uint8 resize path
    return _crop_resize(img, top, left, ch, cw, flip, r)


def pil_transform(image_size: int, train: bool):
    """The PIL reference recipe (torchvision transforms v1), normalised float output."""
    from torchvision import transforms as T

    r = recipe_for(image_size, train)
    if r.small:
        aug = [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()] if train else []
    else:
        aug = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()] if train else [T.Resize(256), T.CenterCrop(224)]
    return T.Compose(aug + [T.ToTensor(), T.Normalize(r.mean, r.std)])


def normalize(x: torch.Tensor, r: Recipe) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> normalised float32."""
    mean = torch.tensor(r.mean, device=x.device).view(1, 3, 1, 1) * 255
    inv = 1.0 / (torch.tensor(r.std, device=x.device).view(1, 3, 1, 1) * 255)
    return (x.float() - mean).mul_(inv)


def decode_batch(blobs: Sequence[bytes], r: Recipe, rng: np.random.Generator, mode: str):
    """Decode a batch on this (worker) process.

    Returns (payload, ok, bad): ``ok`` are the positions decoded, ``bad`` (position, error) pairs.
    ``cpu``/``pil``: payload is a (len(ok), 3, size, size) uint8 tensor (pil: normalised float).
    ``gpu``: payload is a list, per ok position, of either a uint8 tensor already done on the CPU
    (non-JPEG) or (encoded bytes as a uint8 tensor, box) for :func:`gpu_finish`.
    """
    out, ok, bad = [], [], []
    pil = pil_transform(r.size if r.small else 256, r.train) if mode == "pil" else None
    for pos, data in enumerate(blobs):
        try:
            if not data:
                raise ValueError("empty file")
            if mode == "gpu":
                hw = _jpeg_header(data)
                if hw is None:
                    out.append(decode_one(data, r, rng))
                else:
                    out.append((torch.frombuffer(bytearray(data), dtype=torch.uint8), plan_box(*hw, r, rng)))
            elif mode == "pil":
                from PIL import Image

                with Image.open(io.BytesIO(data)) as im:
                    out.append(pil(im.convert("RGB")))
            else:
                out.append(decode_one(data, r, rng))
            ok.append(pos)
        except Exception as e:  # noqa: BLE001 - any decoder error: the image is skipped and counted
            bad.append((pos, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    if mode != "gpu":
        shape = (0, 3, r.size, r.size)
        out = torch.stack(out) if out else torch.empty(shape, dtype=torch.float32 if pil else torch.uint8)
    return out, ok, bad


def gpu_finish(items: list, r: Recipe, device: torch.device) -> torch.Tensor:
    """Batched nvJPEG decode of the encoded items, then crop/resize/flip on the device -> uint8 batch."""
    from torchvision.io import ImageReadMode, decode_jpeg

    enc = [(i, it) for i, it in enumerate(items) if isinstance(it, tuple)]
    decoded = decode_jpeg([t for _, (t, _) in enc], device=device, mode=ImageReadMode.RGB) if enc else []
    out = torch.empty((len(items), 3, r.size, r.size), dtype=torch.uint8, device=device)
    for (i, (_, box)), img in zip(enc, decoded):
        out[i] = _crop_resize(img, *box, r)
    for i, it in enumerate(items):
        if not isinstance(it, tuple):
            out[i] = it.to(device, non_blocking=True)
    return out
