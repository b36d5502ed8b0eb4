"""Canonical flat layout of a model's trainable parameters.

A snapshot is the vector w in R^D made by concatenating the trainable
parameters in ``model.named_parameters()`` order (BatchNorm running statistics
are buffers, so they are not part of w). Slices of [0, D) are what a rank
writes, reads and projects; they are computed here for any world size so the
writer and reader world sizes stay independent.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Iterable, Sequence

import torch

__all__ = ["Entry", "FlatLayout", "balanced_slices"]


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    numel: int


def balanced_slices(total: int, world: int) -> list[tuple[int, int]]:
    """Contiguous slices of [0, total) whose sizes differ by at most one."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if world > total:
        raise ValueError(f"world size {world} is larger than the number of parameters D={total}; "
                         "every rank needs a non-empty slice")
    base, extra = divmod(total, world)
    bounds, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class FlatLayout:
    """Names, shapes, dtypes and offsets of the trainable parameters, and D."""

    def __init__(self, entries: Sequence[Entry]):
        self.entries = list(entries)
        self.numel = sum(e.numel for e in self.entries)
        self.fingerprint = hashlib.sha256(
            json.dumps([[e.name, list(e.shape)] for e in self.entries]).encode()
        ).hexdigest()[:16]

    @property
    def D(self) -> int:  # noqa: N802 - the paper's name for it
        return self.numel

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "FlatLayout":
        entries, offset = [], 0
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            entries.append(Entry(name, tuple(p.shape), str(p.dtype).removeprefix("torch."), offset, p.numel()))
            offset += p.numel()
        if not entries:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        return cls(entries)

    # -- serialisation (JSON only: nothing from storage is unpickled) ------------
    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "D": self.D,
            "entries": [[e.name, list(e.shape), e.dtype, e.offset, e.numel] for e in self.entries],
        }

    @classmethod
    def from_json(cls, obj: dict) -> "FlatLayout":
        layout = cls([Entry(n, tuple(s), d, int(o), int(k)) for n, s, d, o, k in obj["entries"]])
        if "fingerprint" in obj and obj["fingerprint"] != layout.fingerprint:
            raise ValueError(f"layout fingerprint {obj['fingerprint']} does not match its entries "
                             f"({layout.fingerprint})")
        return layout

    def check_matches(self, other: "FlatLayout", what: str = "model") -> None:
        if other.fingerprint != self.fingerprint:
            raise ValueError(f"layout mismatch: snapshots have fingerprint {self.fingerprint} "
                             f"(D={self.D}), {what} has {other.fingerprint} (D={other.D})")

    # -- slices ------------------------------------------------------------------
    def slices(self, world: int) -> list[tuple[int, int]]:
        return balanced_slices(self.D, world)

    def slice_for(self, rank: int, world: int) -> tuple[int, int]:
        return self.slices(world)[rank]

    def overlaps(self, start: int, stop: int) -> Iterable[tuple[int, Entry, int, int]]:
        """(index, entry, lo, hi) for every entry cut by [start, stop); lo/hi are within the entry."""
        for i, e in enumerate(self.entries):
            lo, hi = max(start, e.offset), min(stop, e.offset + e.numel)
            if lo < hi:
                yield i, e, lo - e.offset, hi - e.offset

    def trainable(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """The model's trainable parameters in canonical order, checked against this layout."""
        params = [p for _, p in model.named_parameters() if p.requires_grad]
        self.check_matches(FlatLayout.from_model(model))
        return params

    def slice_views(self, tensors: Sequence[torch.Tensor], start: int, stop: int) -> list[torch.Tensor] | None:
        """Views of ``tensors`` (canonical order) whose concatenation is w[start:stop], or None when a
        cut tensor is not contiguous (its flat ``view`` would fail; :meth:`gather` copies it instead)."""
        pieces = list(self.overlaps(start, stop))
        if not all(tensors[i].is_contiguous() for i, _, _, _ in pieces):
            return None
        return [tensors[i].detach().view(-1)[lo:hi] for i, _, lo, hi in pieces]

    def gather(self, tensors: Sequence[torch.Tensor], start: int, stop: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy w[start:stop] out of ``tensors`` (canonical order) into ``out``."""
        if out is None:
            out = torch.empty(stop - start, dtype=torch.float32, device=tensors[0].device)
        for i, e, lo, hi in self.overlaps(start, stop):
            dst = e.offset + lo - start
            out[dst: dst + hi - lo].copy_(tensors[i].detach().reshape(-1)[lo:hi], non_blocking=True)
        return out

    def scatter(self, flat: torch.Tensor, tensors: Sequence[torch.Tensor], start: int, stop: int) -> None:
        """Write ``flat`` (= w[start:stop]) into the matching parts of ``tensors``."""
        if flat.numel() != stop - start:
            raise ValueError(f"slice [{start}, {stop}) needs {stop - start} values, got {flat.numel()}")
        with torch.no_grad():
            for i, e, lo, hi in self.overlaps(start, stop):
                src = e.offset + lo - start
                tensors[i].view(-1)[lo:hi].copy_(flat[src: src + hi - lo])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A {name: tensor} dict from the full vector w (views into ``flat``)."""
        if flat.numel() != self.D:
            raise ValueError(f"expected a vector of D={self.D} values, got {flat.numel()}")
        return {e.name: flat[e.offset: e.offset + e.numel].view(e.shape) for e in self.entries}

    def blocks(self, block_size: int | None = None) -> list[tuple[int, int]]:
        """Layer blocks for layer-wise coefficients: one per parameter tensor, or
        fixed-size runs of ``block_size`` parameters when given."""
        if block_size is None:
            return [(e.offset, e.offset + e.numel) for e in self.entries]
        if block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {block_size}")
        return [(s, min(s + block_size, self.D)) for s in range(0, self.D, block_size)]
