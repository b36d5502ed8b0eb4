"""Snapshot store: a typed, versioned on-storage format behind one object-store interface.

    format.py   every record the service stores (snapshots, checkpoints, metrics, probes, dataset index) and
                the object names of a run
    backend.py  ObjectStore (an ABC): local (file://), S3, any other fsspec URL; chosen once from the URL
    writer.py   create_run / open_writer -> RunWriter (shards, commit markers)
    reader.py   open_run -> RunReader (.snapshots(), .read(seq, start, stop), .state_dict, .verify)
    lease.py    the writer lease (one session writes a run at a time)
    retry.py    the bounded retry policy of every store write
"""
from __future__ import annotations

from twa_scale.store.backend import (ObjectStore, StoreAccessError, StoreAuthError, StoreUnreachable, check_url,
                                     open_store, parse_storage_options)
from twa_scale.store.format import (DEFAULT_CHUNK_BYTES, DTYPES, CheckpointCommit, CheckpointFile, CheckpointNode,
                                    CommitMarker, CorruptSnapshotError, DatasetIndex, DatasetShard, DatasetSplit,
                                    EpochRow, FormatError, Lease, ProbeLog, RunManifest, RunPaths, ShardMeta,
                                    StopMarker, TrainMetrics, check_dtype, checksums)
from twa_scale.store.reader import RunReader, SnapshotInfo, open_run, read_json
from twa_scale.store.lease import LeaseHeldError, LeaseLostError
from twa_scale.store.retry import RetryDeadlineExceeded, RetryPolicy
from twa_scale.store.writer import RunExistsError, RunWriter, create_run, open_writer, write_json

__all__ = [
    "open_run", "create_run", "open_writer", "read_json", "write_json", "RunReader", "RunWriter", "SnapshotInfo",
    "RunManifest", "ShardMeta", "CommitMarker", "Lease", "StopMarker", "RunPaths", "CorruptSnapshotError",
    "FormatError", "CheckpointFile", "CheckpointNode", "CheckpointCommit", "EpochRow", "TrainMetrics", "ProbeLog",
    "DatasetShard", "DatasetSplit", "DatasetIndex",
    "ObjectStore", "StoreUnreachable", "StoreAccessError", "StoreAuthError", "open_store", "check_url",
    "parse_storage_options",
    "DTYPES", "DEFAULT_CHUNK_BYTES", "check_dtype", "checksums", "RunExistsError", "LeaseHeldError",
    "LeaseLostError", "RetryPolicy", "RetryDeadlineExceeded",
]
