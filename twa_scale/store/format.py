"""The on-storage contract of a snapshot run: typed, versioned records and object names.

Objects of one run, under any store URL (``file://``, ``s3://``, ``memory://``)::

    <url>/<run>/run.json                                                   RunManifest
    <url>/<run>/snapshots/<seq:08d>/shard-<r:05d>-of-<W:05d>.<session>.bin  raw little-endian values
    <url>/<run>/snapshots/<seq:08d>/shard-<r:05d>-of-<W:05d>.<session>.json ShardMeta
    <url>/<run>/snapshots/<seq:08d>/COMMIT.json                            CommitMarker, written last
    <url>/<run>/LEASE.json                                                 Lease: the one writer session
    <url>/<run>/train/metrics.json                                         TrainMetrics: the training curve
    <url>/<run>/train/epochs/<epoch:06d>.json                              EpochRow, one per finished epoch
    <url>/<run>/control/STOP.json                                          StopMarker: end training (live TWA)
    <url>/<run>/twa/probes.json                                            ProbeLog: the live TWA follower's probes
    <url>/<run>/twa/result.json, model.safetensors, coefficients.png       the TWA stage's outputs (--output)
    <url>/<run>/tensorboard/<stage>/                                       TensorBoard event files (--logger)
    <ckpt>/<tag>/<file>                                                    DeepSpeed checkpoint file (--checkpoint-url)
    <ckpt>/<tag>/nodes/<node>.json                                         CheckpointNode: one node's files uploaded
    <ckpt>/<tag>/COMMIT.json                                               CheckpointCommit, written last
    <data>/index.json                                                      DatasetIndex (`twa-scale data pack`)
    <data>/<split>-<n>.tar, <data>/<split>-<n>.tar.json                    WebDataset shard, its DatasetShard

``<ckpt>`` is ``--checkpoint-url`` (by default ``<url>/<run>/checkpoints``); ``<data>`` a packed dataset's URL.

* A shard holds writer rank r's contiguous slice of the flat vector w (layout.py), in the run's
  stored dtype (float32 by default; bfloat16/float16 selectable), little-endian, nothing else.
* Shard checksums: CRC-32 (``zlib.crc32``) of every ``chunk_bytes`` chunk (default 4 MiB). CRC-32
  detects every burst error up to 32 bits; it runs ~2.5x faster than blake2b here and releases
  the GIL, and a reader of any range fetches and checks only the chunks the range touches. It
  guards against corruption, not against an adversary.
* Every small JSON record of format version 2 carries ``json_sha256``, the SHA-256 of its own
  canonical JSON without that key: an empty, truncated or altered record is detected on read.
  Version 1 records (the first format) have none and are read as they are; so are the records that
  code before the checkpoint, metrics, probe and dataset records wrote (no ``format`` field, or the
  dataset index's own ``twa_scale.shards/webdataset-tar``): each record's ``_legacy`` maps them to version 1.
* Checkpoint files: size and SHA-256 of each in the commit record, checked before a resume loads them.
* Nothing read from storage is unpickled: only JSON and raw tensor bytes.

Each record is a frozen dataclass with ``to_json()`` (bytes) and ``from_json(raw, where)``; a record
of an unknown format version, or one missing a field, raises :class:`FormatError` naming ``where``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import zlib
from typing import Any, ClassVar

import torch

from twa_scale.errors import ConfigError
from twa_scale.layout import FlatLayout

__all__ = ["CorruptSnapshotError", "FormatError", "RunManifest", "ShardMeta", "CommitMarker", "Lease", "StopMarker",
           "RunPaths", "CheckpointFile", "CheckpointNode", "CheckpointCommit", "EpochRow", "TrainMetrics", "ProbeLog",
           "DatasetShard", "DatasetSplit", "DatasetIndex",
           "DTYPES", "DEFAULT_CHUNK_BYTES", "check_dtype", "checksums", "seal", "unseal"]

if sys.byteorder != "little":  # shards are raw little-endian values; no byte swapping is implemented
    raise ImportError("twa_scale.store needs a little-endian host")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CHUNK_BYTES = 4 << 20
VERSION = 2          # what this code writes
READS = (1, 2)       # what it reads
SEAL_KEY = "json_sha256"


class CorruptSnapshotError(ConfigError, IOError):
    """A stored object is missing, truncated or fails its checksum; the message names it.
    Permanent bad input (exit 2): retrying cannot repair it."""


class FormatError(CorruptSnapshotError):
    """A stored record is not valid JSON, fails its own checksum, has an unknown format version
    or lacks a field; the message names the object."""


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"snapshot dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def checksums(view: memoryview, chunk_bytes: int) -> list[int]:
    """CRC-32 of each ``chunk_bytes`` chunk of ``view`` (the last one may be short)."""
    return [zlib.crc32(view[i: i + chunk_bytes]) for i in range(0, len(view), chunk_bytes)]


def _digest(body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def seal(obj: dict) -> dict:
    """``obj`` plus its own ``json_sha256`` (over everything else)."""
    body = {k: v for k, v in obj.items() if k != SEAL_KEY}
    return {**body, SEAL_KEY: _digest(body)}


def unseal(raw: bytes | str | dict, where: str, *, required: bool = True) -> dict:
    """Parse a sealed JSON record and check its ``json_sha256``; FormatError naming ``where``.
    ``required=False`` accepts a record without one (the first format had none)."""
    if isinstance(raw, dict):
        obj = raw
    else:
        if not raw:
            raise FormatError(f"{where} is empty")
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise FormatError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{where} is not a JSON object")
    if SEAL_KEY in obj:
        body = {k: v for k, v in obj.items() if k != SEAL_KEY}
        if _digest(body) != obj[SEAL_KEY]:
            raise FormatError(f"{where} fails its own checksum ({SEAL_KEY}): altered or partly written")
        return body
    if required:
        raise FormatError(f"{where} has no {SEAL_KEY}: not a complete record")
    return obj


def _version(obj: dict, kind: str, where: str) -> int:
    fmt = obj.get("format")
    name, _, ver = str(fmt).partition("/")
    if name != f"twa_scale.{kind}" or not ver.isdigit():
        raise FormatError(f"{where} is not a twa_scale {kind} record (format {fmt!r})")
    if int(ver) not in READS:
        raise FormatError(f"{where} has format {fmt}, which this version of twa_scale cannot read "
                          f"(it reads twa_scale.{kind}/{READS[0]}..{READS[-1]}); upgrade twa_scale")
    return int(ver)


class _Record:
    """to_json/from_json for the frozen dataclasses below."""

    KIND: ClassVar[str]
    OPTIONAL: ClassVar[dict[str, Any]] = {}  # fields older versions may lack -> default
    TRANSIENT: ClassVar[tuple[str, ...]] = ()  # fields that are never stored (set by the reader)

    def fields_dict(self) -> dict:
        """The stored fields, encoded, without format or seal (a record nested in another one)."""
        return {f.name: self._encode(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in self.TRANSIENT}

    def to_dict(self) -> dict:
        return seal({"format": f"twa_scale.{self.KIND}/{VERSION}", **self.fields_dict()})

    def _encode(self, name: str, value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def _decode(cls, name: str, value: Any, where: str, version: int) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @classmethod
    def _legacy(cls, loose: Any) -> dict | None:
        """``loose`` (parsed JSON without a twa_scale format) as a version 1 record, when it is what code
        before this record wrote; else None."""
        return None

    @classmethod
    def from_json(cls, raw: bytes | str | dict | list, where: str):
        """The record in ``raw`` (bytes, text or parsed JSON); FormatError naming ``where``."""
        loose = raw if isinstance(raw, (dict, list)) else None
        if loose is None:
            if not raw:
                raise FormatError(f"{where} is empty")
            try:
                loose = json.loads(raw)
            except ValueError as e:
                raise FormatError(f"{where} is not valid JSON: {e}") from None
        if not (isinstance(loose, dict) and str(loose.get("format", "")).startswith(f"twa_scale.{cls.KIND}/")):
            loose = cls._legacy(loose) or loose
        if not isinstance(loose, dict):
            raise FormatError(f"{where} is not a JSON object")
        version = _version(loose, cls.KIND, where)
        obj = unseal(loose, where, required=version >= 2)
        return cls.from_fields(obj, where, version)

    @classmethod
    def from_fields(cls, obj: Any, where: str, version: int = VERSION):
        """The record of the fields in ``obj`` (a nested record: no format, no seal)."""
        if not isinstance(obj, dict):
            raise FormatError(f"{where} is not a JSON object")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in cls.TRANSIENT:
                continue
            if f.name in obj:
                kwargs[f.name] = cls._decode(f.name, obj[f.name], where, version)
            elif f.name in cls.OPTIONAL:
                kwargs[f.name] = cls.OPTIONAL[f.name]
            else:
                raise FormatError(f"{where} ({obj.get('format', f'twa_scale.{cls.KIND}')}) has no field {f.name!r}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise FormatError(f"{where}: {e}") from None

    @staticmethod
    def _nested(kind: type, value: Any, where: str, version: int, name: str) -> tuple:
        """A list of nested ``kind`` records (FormatError naming the item)."""
        if not isinstance(value, list):
            raise FormatError(f"{where}: {name!r} is not a list")
        return tuple(kind.from_fields(v, f"{where} ({name}[{i}])", version) for i, v in enumerate(value))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _SnapshotRecord(_Record):
    """What every per-snapshot record carries: where on the training trajectory it was taken."""

    OPTIONAL: ClassVar[dict[str, Any]] = {"epoch_fraction": None}

    seq: int
    step: int
    epoch: int
    epoch_fraction: float | None = None
    """Epochs of training done when the snapshot was taken (e.g. 2.5); None in format 1 records."""
    world_size: int
    """Ranks that wrote the snapshot."""
    dtype: str
    nbytes: int
    """Bytes this record covers: one shard's data, or the whole snapshot's for a commit marker."""
    session: str
    """Launch that wrote it (one writer per run: see writer.py's lease)."""
    fingerprint: str
    """Layout fingerprint of the run."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardMeta(_SnapshotRecord):
    """One writer rank's slice of one snapshot: where it sits in w and the CRC-32 of its chunks."""

    KIND: ClassVar[str] = "shard"

    rank: int
    start: int
    stop: int
    byteorder: str = "little"
    object: str
    """Name of the data object, relative to the snapshot's directory."""
    checksum: str = "crc32"
    chunk_bytes: int
    chunks: tuple[int, ...]
    written_at: float

    def __post_init__(self):
        check_dtype(self.dtype)
        if self.checksum != "crc32" or self.byteorder != "little":
            raise ValueError(f"unsupported checksum {self.checksum!r} or byte order {self.byteorder!r}")
        if not (0 <= self.start <= self.stop) or self.chunk_bytes <= 0:
            raise ValueError(f"bad slice [{self.start}, {self.stop}) or chunk_bytes {self.chunk_bytes}")
        if len(self.chunks) != -(-self.nbytes // self.chunk_bytes):
            raise ValueError(f"{len(self.chunks)} chunk checksums for {self.nbytes} bytes in "
                             f"{self.chunk_bytes}-byte chunks")

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def meta_object(self) -> str:
        return self.object[: -len(".bin")] + ".json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommitMarker(_SnapshotRecord):
    """The per-snapshot record, written last: a snapshot exists when its valid marker does."""

    KIND: ClassVar[str] = "commit"

    committed_at: float
    shards: tuple[ShardMeta, ...]

    def __post_init__(self):
        if len(self.shards) != self.world_size:
            raise ValueError(f"{len(self.shards)} shards for world size {self.world_size}")

    def _encode(self, name: str, value: Any) -> Any:
        if name == "shards":
            return [m.to_dict() for m in value]
        return super()._encode(name, value)

    @classmethod
    def _decode(cls, name: str, value: Any, where: str, version: int) -> Any:
        if name == "shards":
            if not isinstance(value, list):
                raise FormatError(f"{where}: 'shards' is not a list")
            return tuple(ShardMeta.from_json(m, f"{where} (shard {i})") for i, m in enumerate(value))
        return super()._decode(name, value, where, version)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunManifest(_Record):
    """What a run is: its layout, stored dtype, writer world size, and what produced it."""

    KIND: ClassVar[str] = "run"
    OPTIONAL: ClassVar[dict[str, Any]] = {"identity": None, "model": None, "data": None, "meta": {}}

    run_id: str
    url: str
    created_at: float
    fingerprint: str
    """Layout fingerprint (names and shapes)."""
    D: int  # noqa: N815 - the paper's name
    layout: FlatLayout
    world_size: int
    dtype: str
    byteorder: str = "little"
    model: str | None = None
    data: str | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    """Free-form description from the writer (launch/train.py: model, num_classes, data, config)."""
    identity: dict | None = None
    """What defines the run (model, layout with offsets and sizes, data, seed, optimizer, schedule,
    cadence); a relaunch must match it. None in format 1 records."""

    def __post_init__(self):
        check_dtype(self.dtype)
        if self.layout.fingerprint != self.fingerprint or self.layout.D != self.D:
            raise ValueError(f"layout ({self.layout.fingerprint}, D={self.layout.D}) does not match "
                             f"fingerprint {self.fingerprint}, D={self.D}")

    def _encode(self, name: str, value: Any) -> Any:
        if name == "layout":
            return value.to_json()
        return super()._encode(name, value)

    @classmethod
    def _decode(cls, name: str, value: Any, where: str, version: int) -> Any:
        if name == "layout":
            try:
                layout = FlatLayout.from_json(value)
            except (KeyError, TypeError, ValueError) as e:
                raise FormatError(f"{where}: invalid layout: {e}") from None
            _check_offsets(layout, where)
            return layout
        return value


def _check_offsets(layout: FlatLayout, where: str) -> None:
    """The fingerprint covers names and shapes only: offsets and sizes must follow from them."""
    offset = 0
    for e in layout.entries:
        numel = 1
        for d in e.shape:
            numel *= d
        if e.offset != offset or e.numel != numel:
            raise FormatError(f"{where}: layout entry {e.name!r} has offset {e.offset} and size {e.numel}; "
                              f"its shape {list(e.shape)} after the entries before it needs offset {offset}, "
                              f"size {numel}")
        offset += numel


@dataclasses.dataclass(frozen=True, kw_only=True)
class Lease(_Record):
    """The writer lease of a run: one session writes it at a time; a heartbeat proves it is alive."""

    KIND: ClassVar[str] = "lease"
    OPTIONAL: ClassVar[dict[str, Any]] = {"job": None}

    session: str
    host: str
    pid: int
    acquired_at: float
    heartbeat_at: float
    timeout_seconds: float
    """After this long without a heartbeat the lease is stale (a --resume may take it over)."""
    job: str | None = None
    """The launching job's identity (TWA_SCALE_JOB_ID): a relaunch of the same job takes the lease over at
    once. None: not set (absent in leases written before it existed)."""

    def age_seconds(self, now: float) -> float:
        return max(0.0, now - self.heartbeat_at)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StopMarker(_Record):
    """A request to end training after its next snapshot, written by the live TWA follower's stop rule or by
    hand (`twa-scale stop`); the training job checks for it at each snapshot (see twa_scale/store/control.py)."""

    KIND: ClassVar[str] = "stop"

    reason: str
    """Why, in one line (the rule's verdict, or the user's --reason)."""
    rule: str
    """The stop rule that fired (`plateau`, `target:0.97`), or `manual`."""
    by: str
    """Who asked: `twa` (the follower) or `user` (twa-scale stop); training records it as `stopped_by`."""
    host: str
    written_at: float
    probes: tuple = ()
    """The probe records the rule decided on (empty for a manual stop)."""


def _check_name(name: str, what: str) -> None:
    """A stored name that becomes a key or a local file name: one plain path component."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"{what} name {name!r} is not a plain file name")


# --- checkpoints (--checkpoint-url) -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointFile(_Record):
    """One file of a DeepSpeed checkpoint tag: its size and SHA-256 (None in records of the first code)."""

    KIND: ClassVar[str] = "checkpoint_file"
    OPTIONAL: ClassVar[dict[str, Any]] = {"bytes": None, "sha256": None}

    name: str
    bytes: int | None = None
    sha256: str | None = None

    def __post_init__(self):
        _check_name(self.name, "checkpoint file")

    def problem(self, data: bytes | memoryview, where: str) -> str | None:
        """Why ``data`` is not this file (size or checksum), naming ``where``; None when it is (or unknown)."""
        if self.bytes is not None and len(data) != self.bytes:
            return f"{where} has {len(data)} bytes, the commit records {self.bytes} (truncated or overwritten)"
        if self.sha256 is not None and hashlib.sha256(data).hexdigest() != self.sha256:
            return f"{where} fails its sha256 (corrupt)"
        return None


class _FilesRecord(_Record):
    """A checkpoint record that lists files (nested :class:`CheckpointFile` records)."""

    def _encode(self, name: str, value: Any) -> Any:
        return [f.fields_dict() for f in value] if name == "files" else value

    @classmethod
    def _decode(cls, name: str, value: Any, where: str, version: int) -> Any:
        if name != "files":
            return value
        files = cls._nested(CheckpointFile, value, where, version, "files")
        if version >= 2 and any(f.bytes is None or f.sha256 is None for f in files):
            raise FormatError(f"{where}: a file has no size or sha256")
        return files

    @classmethod
    def _legacy(cls, loose: Any) -> dict | None:
        """The first code wrote ``{"files": [names]}`` (and ``"tag"`` in a commit): no sizes, no checksums."""
        keys = {f.name for f in dataclasses.fields(cls)} - set(cls.OPTIONAL)
        if isinstance(loose, dict) and set(loose) == keys and isinstance(loose["files"], list):
            return {**loose, "format": f"twa_scale.{cls.KIND}/1", "files": [{"name": n} for n in loose["files"]]}
        return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointNode(_FilesRecord):
    """``<tag>/nodes/<node>.json``: one node's local rank 0 uploaded these files of the tag."""

    KIND: ClassVar[str] = "checkpoint_node"
    OPTIONAL: ClassVar[dict[str, Any]] = {"tag": None, "node": None, "written_at": None}

    tag: str | None
    node: int | None
    files: tuple[CheckpointFile, ...]
    written_at: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointCommit(_FilesRecord):
    """``<tag>/COMMIT.json``, written last by rank 0 once every node's marker is in: the tag is complete,
    and each file's size and SHA-256 say whether a downloaded copy is intact."""

    KIND: ClassVar[str] = "checkpoint_commit"
    OPTIONAL: ClassVar[dict[str, Any]] = {"committed_at": None}

    tag: str
    files: tuple[CheckpointFile, ...]
    committed_at: float | None = None


# --- training metrics ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class EpochRow(_Record):
    """One finished epoch of training (``train/epochs/<epoch>.json``, and a row of ``train/metrics.json``)."""

    KIND: ClassVar[str] = "metrics_row"
    OPTIONAL: ClassVar[dict[str, Any]] = {"epoch_fraction": None}

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float
    epoch_fraction: float | None = None
    """Where a stop inside the epoch ended it (the row then evaluates a partial epoch); None otherwise."""

    def fields_dict(self) -> dict:
        out = super().fields_dict()
        if out["epoch_fraction"] is None:
            del out["epoch_fraction"]  # the rows of epochs that ran to their end, as before
        return out

    @classmethod
    def from_row(cls, row: dict | "EpochRow") -> "EpochRow":
        """A row built by the training loop; an unknown key is an error here, not a silently dropped value."""
        return row if isinstance(row, EpochRow) else cls(**row)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainMetrics(_Record):
    """``train/metrics.json``: every finished epoch's row, and ``final`` (the job's summary) once it ends."""

    KIND: ClassVar[str] = "metrics"
    OPTIONAL: ClassVar[dict[str, Any]] = {"run_id": None, "final": None}

    run_id: str | None
    epochs: tuple[EpochRow, ...]
    final: dict | None = None
    """Set when training has ended (the follower's "done"): accuracy, seconds, snapshot summary, stop fields."""

    @classmethod
    def _legacy(cls, loose: Any) -> dict | None:
        if isinstance(loose, dict) and "epochs" in loose and "format" not in loose:
            return {**loose, "format": f"twa_scale.{cls.KIND}/1"}
        return None

    def _encode(self, name: str, value: Any) -> Any:
        return [r.fields_dict() for r in value] if name == "epochs" else value

    @classmethod
    def _decode(cls, name: str, value: Any, where: str, version: int) -> Any:
        return cls._nested(EpochRow, value, where, version, "epochs") if name == "epochs" else value

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode()  # read by people too


# --- live TWA ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeLog(_Record):
    """``twa/probes.json``: the live TWA follower's probe records, oldest first (the whole list is
    rewritten by one put per probe). Each probe is the dict twa/follow.py records; ``last_seq`` (the
    newest snapshot it covered) is what a restarted follower resumes from."""

    KIND: ClassVar[str] = "probes"
    OPTIONAL: ClassVar[dict[str, Any]] = {"run_id": None}

    run_id: str | None
    probes: tuple[dict, ...]

    def __post_init__(self):
        for i, p in enumerate(self.probes):
            if not isinstance(p, dict) or not isinstance(p.get("last_seq"), int):
                raise ValueError(f"probe {i} is not a probe record (an object with an integer last_seq)")

    @classmethod
    def _legacy(cls, loose: Any) -> dict | None:
        return {"format": f"twa_scale.{cls.KIND}/1", "probes": loose} if isinstance(loose, list) else None

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode()


# --- packed datasets (twa-scale data pack) ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetShard(_Record):
    """One WebDataset tar shard (``<split>-<n>.tar.json``, and an entry of ``index.json``): its SHA-256 and
    every sample's byte range, label and CRC-32, so a reader fetches exactly the bytes of its batch."""

    KIND: ClassVar[str] = "dataset_shard"

    name: str
    samples: int
    bytes: int
    sha256: str
    offsets: tuple[int, ...]
    """Byte offset of each sample's image member data inside the tar."""
    sizes: tuple[int, ...]
    labels: tuple[int, ...]
    crc32: tuple[int, ...]
    keys: tuple[str, ...]
    """WebDataset keys (``<key>.jpg``); bad-image logs name ``<shard>#<key>``."""

    def __post_init__(self):
        _check_name(self.name, "shard")
        counts = {len(getattr(self, k)) for k in ("offsets", "sizes", "labels", "crc32", "keys")}
        if counts != {self.samples}:
            raise ValueError(f"shard {self.name}: {self.samples} samples but per-sample lists of lengths {counts}")

    @classmethod
    def _legacy(cls, loose: Any) -> dict | None:
        if isinstance(loose, dict) and "format" not in loose and "sha256" in loose:
            return {**loose, "format": f"twa_scale.{cls.KIND}/1"}
        return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetSplit(_Record):
    KIND: ClassVar[str] = "dataset_split"

    samples: int
    shards: tuple[DatasetShard, ...]

    def _encode(self, name: str, value: Any) -> Any:
        return [r.fields_dict() for r in value] if name == "shards" else value

    @classmethod
    def _decode(cls, name: str, value: Any, where: str, version: int) -> Any:
        return cls._nested(DatasetShard, value, where, version, "shards") if name == "shards" else value


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetIndex(_Record):
    """``index.json`` of a packed dataset, written last: the dataset exists once it does."""

    KIND: ClassVar[str] = "dataset_index"
    TRANSIENT: ClassVar[tuple[str, ...]] = ("url",)
    LEGACY_FORMAT: ClassVar[str] = "twa_scale.shards/webdataset-tar"  # what `data pack` wrote before

    classes: tuple[str, ...]
    image_size: int
    """Longest side of the first training image (picks the CIFAR or ImageNet recipe)."""
    splits: dict[str, DatasetSplit]
    url: str = ""
    """Where it was read from (not stored)."""

    @classmethod
    def _legacy(cls, loose: Any) -> dict | None:
        if isinstance(loose, dict) and loose.get("format") == cls.LEGACY_FORMAT and loose.get("version") == 1:
            return {**loose, "format": f"twa_scale.{cls.KIND}/1"}
        return None

    def _encode(self, name: str, value: Any) -> Any:
        if name == "splits":
            return {k: v.fields_dict() for k, v in value.items()}
        return super()._encode(name, value)

    @classmethod
    def _decode(cls, name: str, value: Any, where: str, version: int) -> Any:
        if name == "splits":
            if not isinstance(value, dict):
                raise FormatError(f"{where}: 'splits' is not an object")
            return {k: DatasetSplit.from_fields(v, f"{where} (split {k})", version) for k, v in value.items()}
        return super()._decode(name, value, where, version)

    def split(self, name: str) -> DatasetSplit:
        """The split ``name`` (``val`` falls back to ``test``); FormatError naming the index when absent."""
        if name == "val" and "val" not in self.splits:
            name = "test"
        if name not in self.splits:
            raise FormatError(f"{self.url}/index.json: no split {name!r} (has {sorted(self.splits)})")
        return self.splits[name]


class RunPaths:
    """Object names of one run, relative to the store URL."""

    def __init__(self, run_id: str):
        if not run_id or "/" in run_id or run_id in (".", "..") or run_id.strip() != run_id:
            raise ValueError(f"run id {run_id!r} must be a non-empty name without '/'")
        self.run_id = run_id
        self.root = run_id
        self.manifest = f"{run_id}/run.json"
        self.lease = f"{run_id}/LEASE.json"
        self.snapshots = f"{run_id}/snapshots"
        self.metrics = f"{run_id}/train/metrics.json"
        self.epoch_rows = f"{run_id}/train/epochs"
        self.stop = f"{run_id}/control/STOP.json"
        self.probes = f"{run_id}/twa/probes.json"

    def epoch_row(self, epoch: int) -> str:
        return f"{self.epoch_rows}/{epoch:06d}.json"

    def seq_dir(self, seq: int) -> str:
        return f"{self.snapshots}/{seq:08d}"

    def shard_stem(self, seq: int, rank: int, world: int, session: str) -> str:
        return f"{self.seq_dir(seq)}/shard-{rank:05d}-of-{world:05d}.{session}"

    def shard_object(self, meta: ShardMeta) -> str:
        return f"{self.seq_dir(meta.seq)}/{meta.object}"

    def shard_meta_object(self, meta: ShardMeta) -> str:
        return f"{self.seq_dir(meta.seq)}/{meta.meta_object}"

    def commit(self, seq: int) -> str:
        return f"{self.seq_dir(seq)}/COMMIT.json"

    def commit_seq(self, key: str) -> int | None:
        """The seq of a listed ``.../snapshots/<seq>/COMMIT.json`` key, else None."""
        parts = key.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-1] == "COMMIT.json" and parts[-2].isdigit():
            return int(parts[-2])
        return None
