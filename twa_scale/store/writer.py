"""Writing a run: the manifest, shard objects, commit markers.

Commit protocol: every writer rank uploads its shard data, then its ShardMeta. Rank 0 waits until
all W ShardMeta objects of its session exist, checks that their slices tile [0, D), and writes the
CommitMarker (which embeds all W ShardMeta) last. Readers list only valid markers, so a snapshot is
visible either whole or not at all. Object names carry a per-launch ``session`` token, so a killed
attempt's leftovers are never mistaken for a live rank's shard and never overwrite a committed one;
writing a ``seq`` that is already committed is a no-op (resume is idempotent).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Sequence

from twa_scale.layout import FlatLayout
from twa_scale.store.backend import ObjectStore, StoreAccessError, StoreUnreachable, open_store, store_error
from twa_scale.store.format import (DEFAULT_CHUNK_BYTES, DTYPES, CommitMarker, FormatError, RunManifest,
                                    RunPaths, ShardMeta, check_dtype, checksums)

__all__ = ["RunWriter", "create_run", "open_writer", "write_json"]

log = logging.getLogger("twa_scale.store")


def _unreachable(store: ObjectStore, err: Exception) -> OSError:
    if isinstance(err, (StoreUnreachable, StoreAccessError)):
        return err
    if hasattr(store, "unreachable"):
        return store.unreachable(err, what="not reachable or not writable")
    return store_error(f"snapshot store {store.url} is not reachable or not writable: "
                       f"{type(err).__name__}: {err}", err)


def _read_manifest(store: ObjectStore, paths: RunPaths) -> RunManifest | None:
    try:
        raw = store.get(paths.manifest)
    except FileNotFoundError:
        return None
    return RunManifest.from_json(raw, store.describe(paths.manifest))


def create_run(url: str, run_id: str, layout: FlatLayout, *, meta: dict, world_size: int,
               dtype: str = "float32", storage_options: dict | str | None = None) -> "RunWriter":
    """Create (or re-open, on resume) run ``run_id`` under ``url`` and write ``run.json``.

    Rank 0 calls this before training. Idempotent for the same layout fingerprint; a different
    fingerprint raises ValueError naming both. An unreachable or unwritable URL raises OSError
    here, before any training step. A missing S3 bucket is created. ``world_size`` larger than D
    raises ValueError.
    """
    check_dtype(dtype)
    layout.slices(world_size)  # W > D -> ValueError
    paths = RunPaths(run_id)
    store = open_store(url, storage_options, quick=True)
    try:
        store.check_writable()
        existing = _read_manifest(store, paths)
    except (PermissionError, ValueError, FormatError):
        raise
    except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not all OSErrors
        raise _unreachable(store, e) from e
    where = store.describe(paths.root)
    if existing is not None:
        if existing.fingerprint != layout.fingerprint:
            raise ValueError(f"run {where} already holds snapshots of a model with layout fingerprint "
                             f"{existing.fingerprint} (D={existing.D}); this model has {layout.fingerprint} "
                             f"(D={layout.D}). Use another --run-id.")
        if existing.dtype != dtype:
            raise ValueError(f"run {where} stores {existing.dtype} snapshots, not {dtype}")
        return RunWriter(store, paths, existing)
    manifest = RunManifest(run_id=run_id, url=store.url, created_at=time.time(), fingerprint=layout.fingerprint,
                           D=layout.D, layout=layout, world_size=world_size, dtype=dtype,
                           model=meta.get("model"), data=meta.get("data"), meta=dict(meta))
    # The endpoint answered the probe, so an error here is most likely a transient 5xx (SeaweedFS
    # answers InternalError while it grows volumes for a bucket created a moment ago).
    for delay in (0.25, 0.5, 1.0, 2.0, 4.0, None):
        try:
            store.put_small(paths.manifest, manifest.to_json())
            RunManifest.from_json(store.get(paths.manifest), where)  # proves it reads back
            return RunWriter(store, paths, manifest)
        except (PermissionError, ValueError):
            raise
        except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not all OSErrors
            if delay is None:
                raise _unreachable(store, e) from e
            log.warning("writing %s failed (%s); retrying in %.2fs", store.describe(paths.manifest), e, delay)
            time.sleep(delay)


def open_writer(url: str, run_id: str, layout: FlatLayout, *, timeout_seconds: float = 120.0,
                storage_options: dict | str | None = None) -> "RunWriter":
    """Writer for a run that rank 0 creates: waits (bounded) for ``run.json`` and checks the layout."""
    paths = RunPaths(run_id)
    store = open_store(url, storage_options, quick=True)
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            manifest = _read_manifest(store, paths)
        except FormatError:  # caught mid-write on a filesystem without atomic puts
            manifest = None
        except PermissionError:
            raise
        except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not all OSErrors
            raise _unreachable(store, e) from e
        if manifest is not None:
            break
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"{store.describe(paths.manifest)} did not appear within "
                                    f"{timeout_seconds:.0f}s: rank 0 must call store.create_run first")
        time.sleep(0.2)
    manifest.layout.check_matches(layout, "this model")
    return RunWriter(store, paths, manifest)


class RunWriter:
    """Writes shards and commit markers of one run (see the module docstring for the protocol)."""

    def __init__(self, store: ObjectStore, paths: RunPaths, manifest: RunManifest):
        self.store, self.paths, self.manifest = store, paths, manifest
        self.layout = manifest.layout
        self.dtype = manifest.dtype
        self.url, self.run_id = store.url, paths.run_id

    def describe(self, key: str) -> str:
        return self.store.describe(key)

    def shard_object(self, seq: int, rank: int, world_size: int, session: str) -> str:
        """URL of a shard's data object (for messages)."""
        return self.describe(self.paths.shard_stem(seq, rank, world_size, session) + ".bin")

    def commit_url(self, seq: int) -> str:
        return self.describe(self.paths.commit(seq))

    def read_commit(self, seq: int) -> CommitMarker | None:
        """The valid commit marker of ``seq``; None when absent (FormatError when invalid)."""
        try:
            raw = self.store.get(self.paths.commit(seq))
        except FileNotFoundError:
            return None
        return CommitMarker.from_json(raw, self.commit_url(seq))

    def is_committed(self, seq: int) -> bool:
        """A valid marker exists; an empty or invalid one means "not committed" (it is re-written)."""
        try:
            return self.read_commit(seq) is not None
        except FormatError as e:
            log.warning("%s; treating seq %d as not committed", e, seq)
            return False

    def shard_meta(self, seq: int, *, rank: int, world_size: int, session: str, view: memoryview,
                   step: int, epoch: int, epoch_fraction: float | None = None,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ShardMeta:
        """Metadata (with per-chunk CRC-32) for rank's slice ``view`` of snapshot ``seq``."""
        start, stop = self.layout.slice_for(rank, world_size)
        itemsize = DTYPES[self.dtype].itemsize
        if len(view) != (stop - start) * itemsize:
            raise ValueError(f"rank {rank}/{world_size} shard of seq {seq} must be {(stop - start) * itemsize} "
                             f"bytes ({self.dtype} values [{start}, {stop})), got {len(view)}")
        if chunk_bytes % itemsize or chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be a positive multiple of {itemsize}")
        stem = self.paths.shard_stem(seq, rank, world_size, session)
        return ShardMeta(seq=seq, step=int(step), epoch=int(epoch),
                         epoch_fraction=None if epoch_fraction is None else float(epoch_fraction),
                         rank=rank, world_size=world_size, start=start, stop=stop, dtype=self.dtype,
                         nbytes=len(view), object=os.path.basename(stem) + ".bin", session=session,
                         fingerprint=self.layout.fingerprint, chunk_bytes=chunk_bytes,
                         chunks=tuple(checksums(view, chunk_bytes)), written_at=time.time())

    def put_shard(self, meta: ShardMeta, view: memoryview, *, part_bytes: int | None = None,
                  concurrency: int | None = None) -> None:
        """Upload the shard data, then its metadata (the metadata means "data is durable")."""
        self.store.put_large(self.paths.shard_object(meta), view, part_bytes=part_bytes, concurrency=concurrency)
        self.store.put_small(self.paths.shard_meta_object(meta), meta.to_json())

    def shard_metas(self, seq: int, world_size: int, session: str) -> list[ShardMeta | None]:
        """The metadata of every rank's shard of this session, None where not written (or not valid) yet."""
        out: list[ShardMeta | None] = []
        for r in range(world_size):
            key = self.paths.shard_stem(seq, r, world_size, session) + ".json"
            try:
                out.append(ShardMeta.from_json(self.store.get(key), self.describe(key)))
            except (FileNotFoundError, FormatError):  # FormatError: a local file caught mid-write
                out.append(None)
        return out

    def commit(self, seq: int, metas: Sequence[ShardMeta]) -> CommitMarker:
        """Write the commit marker of ``seq`` from all W shard metadata (checked to tile [0, D))."""
        metas = sorted(metas, key=lambda m: m.rank)
        world = len(metas)
        if [(m.start, m.stop) for m in metas] != self.layout.slices(world):
            raise ValueError(f"seq {seq}: shard slices {[(m.start, m.stop) for m in metas]} do not tile "
                             f"[0, {self.layout.D}) for {world} writer ranks")
        for key in ("seq", "step", "epoch", "epoch_fraction", "dtype", "fingerprint", "session"):
            if len({getattr(m, key) for m in metas}) != 1:
                raise ValueError(f"seq {seq}: shards disagree on {key}: {[getattr(m, key) for m in metas]}")
        first = metas[0]
        marker = CommitMarker(seq=seq, step=first.step, epoch=first.epoch, epoch_fraction=first.epoch_fraction,
                              world_size=world, dtype=first.dtype, fingerprint=first.fingerprint,
                              session=first.session, nbytes=sum(m.nbytes for m in metas),
                              committed_at=time.time(), shards=tuple(metas))
        self.store.put_small(self.paths.commit(seq), marker.to_json())
        return marker

    def remove_uncommitted(self, seq: int) -> int:
        """Delete objects of ``seq`` that its commit marker does not reference (a killed attempt's
        leftovers). Best effort; returns how many were removed."""
        try:
            marker = self.read_commit(seq)
        except FormatError:
            return 0
        if marker is None:
            return 0
        keep = {"COMMIT.json"} | {m.object for m in marker.shards} | {m.meta_object for m in marker.shards}
        removed = 0
        try:
            for key in self.store.find(self.paths.seq_dir(seq)):
                if os.path.basename(key) not in keep:
                    self.store.delete(key)
                    removed += 1
        except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not all OSErrors
            log.warning("could not clean up %s: %s", self.describe(self.paths.seq_dir(seq)), e)
        return removed


def _split(url: str) -> tuple[str, str]:
    base, _, name = url.rstrip("/").rpartition("/")
    return base, name


def write_json(url: str, obj: Any, *, storage_options: dict | str | None = None) -> None:
    """Write ``obj`` as JSON to ``url``, whole or not at all."""
    base, name = _split(url)
    open_store(base, storage_options).put_small(name, json.dumps(obj, indent=1, sort_keys=True).encode())
