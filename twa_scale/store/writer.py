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

from twa_scale.errors import ConfigError
from twa_scale.layout import FlatLayout
from twa_scale.store.backend import ObjectStore, StoreAccessError, StoreUnreachable, open_store, store_error
from twa_scale.store.format import (DEFAULT_CHUNK_BYTES, DTYPES, CommitMarker, EpochRow, FormatError, RunManifest,
                                    RunPaths, ShardMeta, TrainMetrics, check_dtype, checksums)
from twa_scale.store.lease import RunLease, acquire_lease
from twa_scale.store.retry import RetryPolicy

__all__ = ["RunWriter", "RunExistsError", "create_run", "open_writer", "write_json", "identity_diff"]

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


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def identity_diff(stored: dict, given: dict) -> list[str]:
    """``field (stored -> given)`` for every field of the run identity that differs."""
    a, b = _flatten(stored), _flatten(given)
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
            if k.startswith("layout.entries"):
                out.append("layout.entries")
                continue
            out.append(f"{k} ({va!r} -> {vb!r})")
    return sorted(set(out), key=out.index)


def create_run(url: str, run_id: str, layout: FlatLayout, *, meta: dict, world_size: int,
               dtype: str = "float32", storage_options: dict | str | None = None,
               identity: dict | None = None, resume: bool | None = None, session: str | None = None,
               retry: RetryPolicy | None = None) -> "RunWriter":
    """Create run ``run_id`` under ``url`` (or reopen it, with ``resume``) and write ``run.json``.

    Rank 0 calls this before training. The store is probed for writes first (an unreachable or
    read-only store fails here, naming endpoint and bucket; a missing S3 bucket is created).

    ``resume=None`` (library use): reopen a run of the same layout fingerprint, else ValueError
    naming both. ``resume=False`` (a training launch): an existing run is refused, untouched.
    ``resume=True``: the stored ``identity`` must equal ``identity``; else refused, naming the
    fields that differ. With a ``session``, the writer lease is taken (see lease.py) and invalid
    commit markers are repaired where their shards verify.
    """
    check_dtype(dtype)
    layout.slices(world_size)  # W > D -> ValueError
    retry = retry or RetryPolicy()
    paths = RunPaths(run_id)
    store = open_store(url, storage_options, quick=True)
    where = store.describe(paths.root)
    try:
        store.check_writable()
        existing = _read_manifest(store, paths)
    except (PermissionError, ValueError):
        raise
    except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not all OSErrors
        raise _unreachable(store, e) from e
    created = False
    if existing is None:
        manifest = RunManifest(run_id=run_id, url=store.url, created_at=time.time(), fingerprint=layout.fingerprint,
                               D=layout.D, layout=layout, world_size=world_size, dtype=dtype,
                               model=meta.get("model"), data=meta.get("data"), meta=dict(meta), identity=identity)
        # Conditional create: of two launches into a new run id exactly one creates it.
        created = retry.call(f"creating {store.describe(paths.manifest)}",
                             lambda: store.create(paths.manifest, manifest.to_json()))
        if created:
            existing = manifest
        else:
            existing = _read_manifest(store, paths)
            if resume is None or resume is True:
                pass
            else:
                raise RunExistsError(f"run {where} was created by another launch a moment ago; a second "
                                     "job must not write into it. Use another --run-id")
    if not created:
        if resume is False:
            raise RunExistsError(f"run {where} already exists (created {time.ctime(existing.created_at)}, model "
                                 f"{existing.model}); nothing was changed. Pass --resume to continue it, or "
                                 f"choose another --run-id")
        if existing.fingerprint != layout.fingerprint:
            raise ValueError(f"run {where} already holds snapshots of a model with layout fingerprint "
                             f"{existing.fingerprint} (D={existing.D}); this model has {layout.fingerprint} "
                             f"(D={layout.D}). Use another --run-id.")
        if existing.dtype != dtype:
            raise ValueError(f"run {where} stores {existing.dtype} snapshots, not {dtype}")
        if resume and identity is not None and existing.identity is not None and existing.identity != identity:
            differ = ", ".join(identity_diff(existing.identity, identity))
            raise RunExistsError(f"--resume: run {where} was launched with a different configuration; fields "
                                 f"that differ (stored -> now): {differ}."
                                 f" Relaunch with the original settings, or choose another --run-id")
    writer = RunWriter(store, paths, existing, session=session, retry=retry)
    if session is not None:
        writer.lease = acquire_lease(store, paths, session, resume=bool(resume), retry=retry)
        if not created:
            writer.repair()
    return writer


class RunExistsError(ConfigError):
    """A launch would write into a run that exists (without --resume) or differs from it."""


def open_writer(url: str, run_id: str, layout: FlatLayout, *, timeout_seconds: float = 120.0,
                storage_options: dict | str | None = None, session: str | None = None) -> "RunWriter":
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
    return RunWriter(store, paths, manifest, session=session)


def _session_of(name: str) -> str | None:
    # shard-00000-of-00002.<session>.json
    parts = name.split(".")
    return parts[1] if len(parts) == 3 and name.startswith("shard-") else None


class RunWriter:
    """Writes shards and commit markers of one run (see the module docstring for the protocol)."""

    def __init__(self, store: ObjectStore, paths: RunPaths, manifest: RunManifest, *, session: str | None = None,
                 retry: RetryPolicy | None = None):
        self.store, self.paths, self.manifest = store, paths, manifest
        self.layout = manifest.layout
        self.dtype = manifest.dtype
        self.url, self.run_id = store.url, paths.run_id
        self.session = session
        self.retry = retry or RetryPolicy()
        self.lease: RunLease | None = None
        self._rows_written: set[int] = set()

    def close(self) -> None:
        """Release the writer lease (if held)."""
        if self.lease is not None:
            self.lease.release()

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
        """Write the commit marker of ``seq`` from all W shard metadata (checked to tile [0, D)).

        A valid marker of another session is never replaced (its marker is returned); an empty
        or invalid one is. Raises LeaseLostError when this writer's lease was taken over.
        """
        if self.lease is not None:
            self.lease.check()
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
        key = self.paths.commit(seq)
        if self.store.create(key, marker.to_json()):
            return marker
        try:
            current = self.read_commit(seq)
        except FormatError as e:
            log.warning("%s; replacing it", e)
            self.store.put_small(key, marker.to_json())
            return marker
        if current is not None and current.session != marker.session:
            log.warning("%s is already committed by session %s; keeping it", self.commit_url(seq), current.session)
        return current or marker

    def remove_uncommitted(self, seq: int) -> int:
        """Delete this session's objects of ``seq`` that its commit marker does not reference.
        Other sessions' objects are never touched (a live job may be writing them). Best effort;
        returns how many were removed."""
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
                name = os.path.basename(key)
                if name not in keep and self.session is not None and f".{self.session}." in name:
                    self.store.delete(key)
                    removed += 1
        except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not all OSErrors
            log.warning("could not clean up %s: %s", self.describe(self.paths.seq_dir(seq)), e)
        return removed

    def repair(self) -> list[int]:
        """Re-commit every snapshot whose marker is empty or invalid when one session's shards
        are complete and verify; returns the re-committed seqs. Others stay uncommitted (and unlisted)."""
        from twa_scale.store.reader import verify_shard

        fixed = []
        keys = self.store.find(self.paths.snapshots)
        for key in keys:
            seq = self.paths.commit_seq(key)
            if seq is None:
                continue
            try:
                self.read_commit(seq)
                continue
            except FormatError as e:
                log.warning("%s: trying to re-commit it from its shards", e)
            prefix = self.paths.seq_dir(seq) + "/"
            by_session: dict[str, list[ShardMeta]] = {}
            for k in keys:
                name = k[len(prefix):] if k.startswith(prefix) else None
                if not name or not name.endswith(".json") or _session_of(name) is None:
                    continue
                try:
                    m = ShardMeta.from_json(self.store.get(k), self.describe(k))
                except (FileNotFoundError, FormatError):
                    continue
                by_session.setdefault(m.session, []).append(m)
            for session, metas in by_session.items():
                world = metas[0].world_size
                if len(metas) != world or any(m.world_size != world for m in metas):
                    continue
                if any(verify_shard(self.store, self.paths, m) for m in metas):
                    continue
                marker = CommitMarker(seq=seq, step=metas[0].step, epoch=metas[0].epoch,
                                      epoch_fraction=metas[0].epoch_fraction, world_size=world, dtype=metas[0].dtype,
                                      fingerprint=metas[0].fingerprint, session=session,
                                      nbytes=sum(m.nbytes for m in metas), committed_at=time.time(),
                                      shards=tuple(sorted(metas, key=lambda m: m.rank)))
                self.retry.call(f"re-committing {self.commit_url(seq)}",
                                lambda s=seq, m=marker: self.store.put_small(self.paths.commit(s), m.to_json()))
                log.warning("re-committed snapshot seq %d from the verified shards of session %s", seq, session)
                fixed.append(seq)
                break
            else:
                log.error("snapshot seq %d of %s has an invalid commit marker and no complete verified shard set; "
                          "it stays uncommitted", seq, self.describe(self.paths.root))
        return fixed


    def write_metrics(self, rows: Sequence[dict | EpochRow], final: dict | None) -> None:
        """Each epoch row as its own sealed object, then the sealed aggregate train/metrics.json,
        every write through the retry policy. Call it before the checkpoint that covers ``rows``."""
        if self.lease is not None:
            self.lease.check()
        rows = [EpochRow.from_row(r) for r in rows]
        for row in rows:
            if row.epoch in self._rows_written:
                continue
            key, data = self.paths.epoch_row(row.epoch), row.to_json()
            self.retry.call(f"writing {self.describe(key)}", lambda k=key, d=data: self.store.put_small(k, d))
            self._rows_written.add(row.epoch)
        data = TrainMetrics(run_id=self.run_id, epochs=tuple(rows), final=final).to_json()
        self.retry.call(f"writing {self.describe(self.paths.metrics)}",
                        lambda: self.store.put_small(self.paths.metrics, data))

    def read_metrics_rows(self, upto_epoch: int) -> list[dict]:
        """Epoch rows 1..``upto_epoch`` for a resume: from the per-epoch objects, else from metrics.json
        (runs of the first format). Invalid objects are named in a warning and skipped."""
        rows: dict[int, EpochRow] = {}
        try:
            raw = self.store.get(self.paths.metrics)
            rows.update((r.epoch, r) for r in TrainMetrics.from_json(raw, self.describe(self.paths.metrics)).epochs)
        except FileNotFoundError:
            pass
        except FormatError as e:
            log.warning("%s; rebuilding the metrics from the per-epoch rows", e)
        for key in self.store.find(self.paths.epoch_rows):
            try:
                r = EpochRow.from_json(self.store.get(key), self.describe(key))
                rows[r.epoch] = r
            except (FileNotFoundError, FormatError) as e:
                log.warning("skipping metrics row %s: %s", self.describe(key), e)
        return [rows[e].fields_dict() for e in sorted(rows) if e <= upto_epoch]


def _split(url: str) -> tuple[str, str]:
    base, _, name = url.rstrip("/").rpartition("/")
    return base, name


def write_json(url: str, obj: Any, *, storage_options: dict | str | None = None) -> None:
    """Write ``obj`` as JSON to ``url``, whole or not at all."""
    base, name = _split(url)
    open_store(base, storage_options).put_small(name, json.dumps(obj, indent=1, sort_keys=True).encode())
