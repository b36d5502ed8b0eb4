"""The S3 data path for large objects: obstore (Rust ``object_store``) for multipart puts and ranged
reads, chosen by ``TWA_SCALE_S3_CLIENT`` (``obstore``, the default, or ``s3fs``).

Why: s3fs runs every request of a process on one asyncio thread in Python; a 100 MB shard
upload waited on it 99.8% of the time and reached 0.85x boto3's ``upload_file``. obstore runs
the transfers on Rust threads without the GIL (``bench/store_clients.py`` measures all three).
Everything fsspec-shaped (small objects, conditional creates, listings, deletes) stays on s3fs.

The client is built from the same merged options as the s3fs filesystem (``storage_options``,
fsspec config, this package's defaults), so both reach the same endpoint as the same identity:

* ``key``/``secret``/``token``: static credentials; ``anon``: unsigned requests;
* otherwise botocore's own credential chain (environment, ``profile``, shared files, web
  identity / IRSA, container and instance metadata), through a boto3 session, refreshed by obstore;
* ``endpoint_url`` (or ``client_kwargs.endpoint_url``, ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``),
  ``client_kwargs.region_name`` (or ``AWS_REGION``, ``AWS_DEFAULT_REGION``);
* ``config_kwargs.connect_timeout``; ``quick`` stores (writers, with their own RetryPolicy and
  deadline) make one attempt per call, like the quick s3fs filesystem.

Integrity is end to end, as on s3fs: every shard carries CRC-32 per chunk, checked on read.
Errors become the ones callers already handle: FileNotFoundError, PermissionError,
ConnectionError (network), OSError (other).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Sequence

from twa_scale import knobs

__all__ = ["ObstoreS3", "s3_client"]

_READ_PIECE_BYTES = 64 << 20   # a longer ranged read is cut into pieces of this size, fetched concurrently


def s3_client() -> str:
    """The S3 client for large puts and ranged reads: knob TWA_SCALE_S3_CLIENT."""
    return knobs.S3_CLIENT.get()


def _has_boto3() -> bool:
    """Without boto3, obstore resolves the environment, web identity and instance roles itself."""
    import importlib.util

    return importlib.util.find_spec("boto3") is not None


def _seconds(value) -> str:
    return f"{float(value)}s"


class ObstoreS3:
    """Large puts and ranged reads of one bucket through obstore; ``options`` as for s3fs."""

    def __init__(self, bucket: str, options: dict, *, quick: bool = False):
        self.bucket, self._options, self._quick = bucket, options, quick
        self._client = None
        self._lock = threading.Lock()

    @property
    def _store(self):
        """The obstore client, built on first use: a store that only lists or writes small objects
        never resolves credentials here (s3fs reports a missing identity first, naming the endpoint)."""
        with self._lock:
            if self._client is None:
                self._client = self._build(self.bucket, self._options, self._quick)
            return self._client

    @staticmethod
    def _build(bucket: str, options: dict, quick: bool):
        from obstore.store import S3Store

        client_kwargs = options.get("client_kwargs") or {}
        config_kwargs = options.get("config_kwargs") or {}
        endpoint = (options.get("endpoint_url") or client_kwargs.get("endpoint_url")
                    or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
        region = (client_kwargs.get("region_name") or os.environ.get("AWS_REGION")
                  or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        config: dict = {"region": region}
        client_options: dict = {"connect_timeout": _seconds(config_kwargs.get("connect_timeout", 10)),
                                # one request moves at most a part or a read piece (64 MiB at most)
                                "timeout": _seconds(2 * config_kwargs.get("read_timeout", 60))}
        if endpoint:
            config["endpoint"] = endpoint
            client_options["allow_http"] = endpoint.startswith("http://")
        provider = None
        if options.get("anon"):
            config["skip_signature"] = True
        elif options.get("key") and options.get("secret"):
            config.update(access_key_id=options["key"], secret_access_key=options["secret"])
            if options.get("token"):
                config["session_token"] = options["token"]
        elif _has_boto3():
            import boto3
            from obstore.auth.boto3 import Boto3CredentialProvider

            session = boto3.Session(profile_name=options.get("profile"))
            if session.get_credentials() is None:
                raise PermissionError(f"s3://{bucket} (endpoint {endpoint or 'AWS default'}): NoCredentialsError: "
                                      "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or --storage-options")
            provider = Boto3CredentialProvider(session)
        retry = {"max_retries": 0} if quick else {"max_retries": 5}
        return S3Store(bucket, config=config, client_options=client_options, retry_config=retry,
                       credential_provider=provider)

    def put(self, path: str, view: memoryview, *, part_bytes: int, concurrency: int) -> None:
        """Write ``view`` to ``path`` (inside the bucket): one PUT, or a multipart upload of
        ``part_bytes`` parts, ``concurrency`` at a time. Whole or nothing, like every PUT."""
        import obstore

        with _errors(path):
            obstore.put(self._store, path, view, chunk_size=part_bytes, max_concurrency=concurrency)

    def get_ranges(self, paths: Sequence[str], starts: Sequence[int], ends: Sequence[int]) -> list:
        """Bytes [start, end) of each object, or the exception in its place. The ranges of one object
        go in one ``obstore.get_ranges`` call (concurrent GETs on Rust threads, no coalescing); a range
        over ``_READ_PIECE_BYTES`` is cut into pieces fetched side by side and joined."""
        import obstore

        out: list = [None] * len(paths)
        by_path: dict[str, list[int]] = {}
        for i, p in enumerate(paths):
            by_path.setdefault(p, []).append(i)
        for path, idx in by_path.items():
            cuts = [(i, a, min(a + _READ_PIECE_BYTES, ends[i]))
                    for i in idx for a in (range(starts[i], ends[i], _READ_PIECE_BYTES) or [starts[i]])]
            try:
                with _errors(path):
                    got = obstore.get_ranges(self._store, path, starts=[c[1] for c in cuts],
                                             ends=[c[2] for c in cuts], coalesce=0)
            except Exception as e:  # noqa: BLE001 - in place, like fsspec's on_error="return"
                for i in idx:
                    out[i] = e
                continue
            pieces: dict[int, list] = {}
            for (i, _, _), blob in zip(cuts, got):
                pieces.setdefault(i, []).append(blob)
            for i, parts in pieces.items():
                out[i] = parts[0] if len(parts) == 1 else b"".join(memoryview(x) for x in parts)
        return out


@contextlib.contextmanager
def _errors(path: str):
    """obstore's exceptions as the builtin ones callers and RetryPolicy classify."""
    try:
        yield
    except Exception as err:
        if not type(err).__module__.startswith("obstore"):
            raise
        name, text = type(err).__name__, f"{type(err).__name__}: {err}"
        if name == "NotFoundError":
            raise FileNotFoundError(f"{path} does not exist") from err
        if name in ("PermissionDeniedError", "UnauthenticatedError"):
            raise PermissionError(text) from err
        low = text.lower()
        if any(s in low for s in ("error sending request", "connection", "timed out", "timeout", "dns")):
            raise ConnectionError(text) from err
        raise OSError(text) from err
