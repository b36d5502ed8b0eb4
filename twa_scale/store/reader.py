"""Reading a run: committed snapshots as flat fp32 ranges for any reader world size; verify."""
from __future__ import annotations

import dataclasses
import json
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Sequence

import torch

from twa_scale.layout import FlatLayout
from twa_scale.store.backend import open_store
from twa_scale.store.format import (DTYPES, CommitMarker, CorruptSnapshotError, FormatError, RunManifest,
                                    RunPaths, ShardMeta, checksums)

__all__ = ["SnapshotInfo", "RunReader", "open_run", "read_json", "verify_shard"]

_READ_PIECE_BYTES = 16 << 20  # range reads are split so s3fs fetches pieces concurrently


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    seq: int
    step: int
    epoch: int
    nbytes: int
    epoch_fraction: float | None = None


class _Piece(NamedTuple):
    """A byte range of one shard object that covers elements [e0, e1) of w."""

    meta: ShardMeta
    key: str
    b0: int
    b1: int
    e0: int
    e1: int


def open_run(url: str, run_id: str, *, storage_options: dict | str | None = None) -> "RunReader":
    """Reader of run ``run_id`` under ``url`` (FileNotFoundError naming run.json if absent)."""
    return RunReader(url, run_id, storage_options=storage_options)


class RunReader:
    """Committed snapshots of one run, read as flat fp32 ranges for any reader world size."""

    def __init__(self, url: str, run_id: str, *, storage_options: dict | str | None = None):
        self.paths = RunPaths(run_id)
        self.store = open_store(url, storage_options)
        self.url, self.run_id = self.store.url, run_id
        where = self.store.describe(self.paths.manifest)
        try:
            raw = self.store.get(self.paths.manifest)
        except FileNotFoundError:
            raise FileNotFoundError(f"no run {run_id!r} under {url}: {where} does not exist") from None
        self.manifest: RunManifest = RunManifest.from_json(raw, where)
        self.layout: FlatLayout = self.manifest.layout
        self._commits: dict[int, CommitMarker] = {}

    @property
    def D(self) -> int:  # noqa: N802
        return self.layout.D

    def describe(self, key: str) -> str:
        return self.store.describe(key)

    def _parse_marker(self, key: str, raw: bytes) -> CommitMarker:
        where = self.describe(key)
        marker = CommitMarker.from_json(raw, where)
        if marker.fingerprint != self.layout.fingerprint:
            raise FormatError(f"{where} has layout fingerprint {marker.fingerprint}, the run manifest has "
                              f"{self.layout.fingerprint}")
        return marker

    def _marker(self, seq: int) -> CommitMarker:
        if seq not in self._commits:
            key = self.paths.commit(seq)
            try:
                raw = self.store.get(key)
            except FileNotFoundError:
                raise KeyError(f"snapshot seq {seq} of {self.describe(self.paths.root)} is not committed") from None
            self._commits[seq] = self._parse_marker(key, raw)
        return self._commits[seq]

    def scan(self) -> tuple[list[SnapshotInfo], dict[int, str]]:
        """(committed snapshots, {seq: problem} of damaged ones), from one listing.

        Committed: a valid marker whose shard objects are all present. Damaged: an empty or invalid
        marker (never listed as committed), or a valid one whose objects are missing. Checksums
        are checked by ``read`` and ``verify``, not here.
        """
        # One flat listing (s3fs: fresh, paginated, no per-directory requests, no stale cache).
        keys = set(self.store.find(self.paths.snapshots))
        markers = {seq: k for k in keys if (seq := self.paths.commit_seq(k)) is not None}
        todo = {s: k for s, k in markers.items() if s not in self._commits}
        damaged: dict[int, str] = {}
        if todo:
            for (seq, key), data in zip(todo.items(), self.store.get_many(list(todo.values()))):
                if isinstance(data, Exception) or data is None:
                    damaged[seq] = f"cannot read {self.describe(key)}: {data}"
                    continue
                try:
                    self._commits[seq] = self._parse_marker(key, data)
                except FormatError as e:
                    damaged[seq] = f"not committed: {e}"
        infos = []
        for seq in sorted(markers):
            if seq in damaged:
                continue
            m = self._commits[seq]
            absent = [k for sm in m.shards for k in (self.paths.shard_object(sm), self.paths.shard_meta_object(sm))
                      if k not in keys]
            if absent:
                damaged[seq] = f"{self.describe(absent[0])} is missing" + (
                    f" (and {len(absent) - 1} more object(s))" if len(absent) > 1 else "")
                continue
            infos.append(self.info(seq))
        return infos, dict(sorted(damaged.items()))

    def snapshots(self) -> list[SnapshotInfo]:
        """Committed, undamaged snapshots, sorted by seq (see :meth:`scan`)."""
        return self.scan()[0]

    def damaged(self) -> dict[int, str]:
        """{seq: problem} of snapshots with an invalid marker or missing objects (see :meth:`scan`)."""
        return self.scan()[1]

    def info(self, seq: int) -> SnapshotInfo:
        m = self._marker(seq)
        return SnapshotInfo(m.seq, m.step, m.epoch, m.nbytes, m.epoch_fraction)

    def marker(self, seq: int) -> CommitMarker:
        """The commit marker of ``seq`` (KeyError when not committed)."""
        return self._marker(seq)

    def _plan(self, seq: int, start: int, stop: int) -> list[_Piece]:
        plan = []
        for m in self._marker(seq).shards:
            lo, hi = max(start, m.start), min(stop, m.stop)
            if lo >= hi:
                continue
            item, cb = m.itemsize, m.chunk_bytes
            b0 = ((lo - m.start) * item) // cb * cb
            b1 = min(-(-((hi - m.start) * item) // cb) * cb, m.nbytes)
            key = self.paths.shard_object(m)
            for p0 in range(b0, b1, _READ_PIECE_BYTES):
                p1 = min(p0 + _READ_PIECE_BYTES, b1)
                e0 = max(lo, m.start + p0 // item)
                e1 = min(hi, m.start + p1 // item)
                if e0 < e1:
                    plan.append(_Piece(m, key, p0, p1, e0, e1))
        return plan

    def read(self, seq: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """w[start:stop] of committed snapshot ``seq`` as a flat fp32 tensor.

        Fetches only the byte ranges (whole checksum chunks) that cover the range, from any
        number of writer shards, and verifies the CRC-32 of every chunk it touches; a bad
        object raises CorruptSnapshotError naming it.
        """
        stop = self.D if stop is None else stop
        if not (0 <= start <= stop <= self.D):
            raise ValueError(f"read range start={start}, stop={stop} is not within [0, D={self.D}]")
        out = torch.empty(stop - start, dtype=torch.float32)
        plan = self._plan(seq, start, stop)
        if not plan:
            return out
        # One concurrent batch of range GETs on async filesystems (s3fs); a loop elsewhere.
        blobs = self.store.get_ranges([p.key for p in plan], [p.b0 for p in plan], [p.b1 for p in plan])

        def place(i: int) -> None:
            m, key, b0, b1, e0, e1 = plan[i]
            blob = blobs[i]
            where = self.describe(key)
            if isinstance(blob, FileNotFoundError):
                raise CorruptSnapshotError(f"{where} is missing (snapshot seq {seq})")
            if isinstance(blob, Exception):
                raise blob
            if len(blob) != b1 - b0:
                raise CorruptSnapshotError(f"{where} is truncated: bytes [{b0}, {b1}) gave {len(blob)} "
                                           f"(expected object size {m.nbytes})")
            cb = m.chunk_bytes
            view = memoryview(blob)
            for off in range(0, len(blob), cb):
                k = (b0 + off) // cb
                if zlib.crc32(view[off: off + cb]) != m.chunks[k]:
                    raise CorruptSnapshotError(f"{where}: checksum mismatch in chunk {k} "
                                               f"(bytes [{b0 + off}, {min(b0 + off + cb, m.nbytes)}))")
            first = (e0 - m.start) * m.itemsize - b0
            with warnings.catch_warnings():  # read-only buffer: we copy out of it at once
                warnings.simplefilter("ignore", UserWarning)
                values = torch.frombuffer(blob, dtype=DTYPES[m.dtype], count=e1 - e0, offset=first)
            out[e0 - start: e1 - start].copy_(values)

        # CRC-32 and the copy release the GIL: check pieces side by side.
        if len(plan) == 1:
            place(0)
        else:
            with ThreadPoolExecutor(min(4, len(plan))) as pool:
                list(pool.map(place, range(len(plan))))
        return out

    def state_dict(self, seq: int, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the trainable parameters of snapshot ``seq``.

        Buffers (BatchNorm statistics) are the model's own: snapshots hold trainable weights
        only. A model with a different layout raises ValueError naming both fingerprints.
        """
        self.layout.check_matches(FlatLayout.from_model(model))
        flat = self.read(seq)
        params = self.layout.unflatten(flat)
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, value in params.items():
            sd[name] = value.to(dtype=sd[name].dtype).clone()
        return sd

    def verify(self, seqs: Sequence[int] | None = None) -> list[str]:
        """Check every snapshot with a marker (or ``seqs``) in full; a list of problems, each naming
        the object at fault (empty when all is well)."""
        problems: list[str] = []
        infos, damaged = self.scan()
        if seqs is None:
            problems += [f"snapshot seq {s}: {why}" for s, why in damaged.items()]
            seqs = [i.seq for i in infos]
        for seq in seqs:
            try:
                marker = self._marker(seq)
            except (KeyError, CorruptSnapshotError) as e:
                problems.append(str(e).strip("'\""))
                continue
            for m in marker.shards:
                problems += verify_shard(self.store, self.paths, m)
        return problems


def verify_shard(store, paths: RunPaths, m: ShardMeta) -> list[str]:
    """Problems of one shard (its metadata object, size and every chunk's CRC-32), naming objects."""
    problems = []
    key, meta_key = paths.shard_object(m), paths.shard_meta_object(m)
    where = store.describe(key)
    try:
        if ShardMeta.from_json(store.get(meta_key), store.describe(meta_key)) != m:
            problems.append(f"{store.describe(meta_key)} differs from the copy in its commit marker")
    except FileNotFoundError:
        problems.append(f"{store.describe(meta_key)} is missing")
    except CorruptSnapshotError as e:
        problems.append(str(e))
    try:
        blob = store.get(key)
    except FileNotFoundError:
        return problems + [f"{where} is missing"]
    if len(blob) != m.nbytes:
        return problems + [f"{where} has {len(blob)} bytes, expected {m.nbytes} (truncated or overwritten)"]
    bad = [k for k, c in enumerate(checksums(memoryview(blob), m.chunk_bytes)) if c != m.chunks[k]]
    if bad:
        problems.append(f"{where}: checksum mismatch in chunk(s) {bad}")
    return problems


def read_json(url: str, default: Any = ..., *, storage_options: dict | str | None = None) -> Any:
    """JSON object at ``url``; ``default`` when it does not exist (else FileNotFoundError)."""
    base, _, name = url.rstrip("/").rpartition("/")
    store = open_store(base, storage_options)
    try:
        raw = store.get(name)
    except FileNotFoundError:
        if default is ...:
            raise
        return default
    try:
        return json.loads(raw)
    except ValueError as e:
        raise FormatError(f"{store.describe(name)} is not valid JSON: {e}") from None
