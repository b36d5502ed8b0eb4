"""One small object-store interface over fsspec, chosen once from the URL.

:func:`open_store` parses the URL strictly and returns one of:

* :class:`LocalStore` for ``file://`` URLs and plain paths: small objects are written through a
  rename (whole or nothing), conditional creates through ``os.link`` (fails if present);
* :class:`S3Store` for ``s3://bucket/prefix``: large objects as concurrent multipart uploads,
  conditional creates as ``PutObject`` with ``If-None-Match: *``, plain single GETs (s3fs's
  size lookup goes through a directory cache that can be stale for other writers' objects);
* :class:`FsspecStore` for every other fsspec URL (``memory://``, ...), whose PUTs are whole.

Keys are '/'-separated names relative to the store's URL. Options reach the filesystem in this
order, later ones winning: this module's defaults, fsspec's own configuration
(``fsspec.config.conf``: its config files and ``FSSPEC_<PROTOCOL>_*`` variables), then
``storage_options`` (``--storage-options JSON``); nested ``config_kwargs``/``client_kwargs`` dicts
are merged key by key.
Options are never logged: they may hold credentials.
"""
from __future__ import annotations

import abc
import json
import logging
import os
import re
import threading
import uuid
from typing import Any, Sequence

from twa_scale import knobs
from twa_scale.errors import ConfigError, StoreUnreachableError, auth_error_code, is_connection_error

__all__ = ["ObjectStore", "FsspecStore", "LocalStore", "S3Store", "open_store", "parse_storage_options",
           "check_url", "StoreUnreachable", "StoreAccessError", "StoreAuthError", "store_error"]

log = logging.getLogger("twa_scale.store")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


StoreUnreachable = StoreUnreachableError  # network-level: transient, exit 75


class StoreAccessError(ConfigError, OSError):
    """The store answered but refuses us (credentials, permissions, no bucket): permanent, exit 2."""


class StoreAuthError(StoreAccessError, PermissionError):
    """The store rejected our credentials (a wrong secret, an unknown key id, an expired token) or refused
    them access: a configuration error (exit 2), never an outage to wait out. Also a ``PermissionError``,
    so code that treats refusals as permanent still does."""


_CREDENTIAL_HINT = ("check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), the profile, "
                    "or --storage-options key/secret")


def store_error(message: str, err: BaseException) -> OSError:
    """``message`` as StoreUnreachableError (transient, 75) when ``err`` is a network failure, else as
    StoreAccessError (permanent, 2)."""
    return (StoreUnreachableError if is_connection_error(err) else StoreAccessError)(message)


def check_url(url: str, what: str = "snapshot URL") -> tuple[str, str]:
    """(protocol, rest) of a store URL, strictly: ``s3://`` needs a bucket; a scheme needs ``://``.
    A plain path (no scheme) is a local directory. ``what`` names the URL in errors."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"{what} {url!r} is empty")
    if "://" not in url:
        m = _SCHEME.match(url)
        if m and len(m.group(1)) > 1:  # "C:" would be a drive letter
            raise ValueError(f"{what} {url!r}: scheme {m.group(1)!r} must be followed by '://' "
                             f"(e.g. {m.group(1)}://bucket/prefix)")
        return "file", url
    protocol, rest = url.split("://", 1)
    if not _SCHEME.match(protocol + ":") or ":" in protocol:
        raise ValueError(f"{what} {url!r}: invalid scheme {protocol!r}")
    protocol = protocol.lower()
    if protocol in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
        bucket = rest.split("/", 1)[0]
        if not bucket or bucket in (".", ".."):
            raise ValueError(f"{what} {url!r} names no bucket (expected {protocol}://BUCKET/prefix)")
    if protocol == "file" and not rest.startswith("/"):
        raise ValueError(f"{what} {url!r}: file:// URLs need an absolute path (file:///abs/path)")
    return protocol, rest


def parse_storage_options(raw: str | dict | None) -> dict:
    """``--storage-options``: a JSON object of fsspec filesystem arguments (or None)."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return dict(raw)
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"--storage-options: not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(obj, dict):
        raise ValueError("--storage-options: must be a JSON object, e.g. '{\"anon\": false}'")
    return obj


def _merge(*layers: dict) -> dict:
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in (layer or {}).items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = {**out[k], **v}
            else:
                out[k] = v
    return out


class _Parts:
    """Sliceable view of a buffer whose slices are ``bytes``: botocore takes bytes, not
    memoryviews, so s3fs's multipart upload copies one part at a time, never the whole shard."""

    def __init__(self, view: memoryview):
        self.view = view

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, key: slice) -> bytes:
        return bytes(self.view[key])


class ObjectStore(abc.ABC):
    """Objects under one URL: the one storage seam of the service (snapshots, checkpoints, datasets,
    control and metrics records). Every method takes keys relative to :attr:`url`."""

    url: str

    @abc.abstractmethod
    def describe(self, key: str) -> str:
        """The full URL of ``key`` (for messages)."""

    @abc.abstractmethod
    def put_small(self, key: str, data: bytes) -> None:
        """Write a small object whole or not at all, replacing any previous one."""

    @abc.abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist (atomically); False when it already did."""

    @abc.abstractmethod
    def put_large(self, key: str, view: memoryview, *, part_bytes: int | None = None,
                  concurrency: int | None = None) -> None:
        """Write a large object (multipart where the store has it)."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object; FileNotFoundError when absent."""

    @abc.abstractmethod
    def get_many(self, keys: Sequence[str]) -> list:
        """Whole objects, concurrently where possible; an exception in place of a failed one."""

    @abc.abstractmethod
    def get_ranges(self, keys: Sequence[str], starts: Sequence[int], ends: Sequence[int]) -> list:
        """Byte ranges [start, end) of objects, concurrently where possible; exceptions in place."""

    @abc.abstractmethod
    def find(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (recursive, fresh: no cached listing)."""

    @abc.abstractmethod
    def sizes(self, prefix: str) -> dict[str, int]:
        """{key: size in bytes} of every key under ``prefix``, from the same fresh listing as :meth:`find`."""

    @abc.abstractmethod
    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the immediate sub-directories (common prefixes) under ``prefix``, sorted."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` exists (one GET or HEAD, never a cached listing)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; no error when it is absent."""

    @abc.abstractmethod
    def check_writable(self) -> None:
        """Fail fast, naming the endpoint, when the store cannot be reached or written."""


class FsspecStore(ObjectStore):
    """Any fsspec filesystem whose writes are whole-object (memory://, gcs, ...)."""

    def __init__(self, url: str, fs, root: str):
        self.url, self.fs, self.root = url.rstrip("/"), fs, root.rstrip("/")
        self._create_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _path(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.root}/{key}" if key else self.root

    def _key(self, path: str) -> str:
        path = path.rstrip("/")
        root = self.root.rstrip("/")
        return path[len(root) + 1:] if path.startswith(root + "/") else path

    def describe(self, key: str) -> str:
        return self.fs.unstrip_protocol(self._path(key))

    def put_small(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)

    def create(self, key: str, data: bytes) -> bool:
        # One process owns a memory:// filesystem, so a lock makes check-and-put atomic.
        with self._create_lock:
            if self.exists(key):
                return False
            self.put_small(key, data)
            return True

    def put_large(self, key, view, *, part_bytes=None, concurrency=None) -> None:
        self.fs.pipe_file(self._path(key), bytes(view))

    def get(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.describe(key)} does not exist") from None

    def get_many(self, keys):
        keys = list(keys)
        return self.get_ranges(keys, [None] * len(keys), [None] * len(keys))

    def get_ranges(self, keys, starts, ends):
        return self.fs.cat_ranges([self._path(k) for k in keys], list(starts), list(ends), on_error="return")

    def find(self, prefix: str) -> list[str]:
        return list(self.sizes(prefix))

    def sizes(self, prefix: str) -> dict[str, int]:
        path = self._path(prefix)
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
        return {self._key(p): int(info.get("size") or 0) for p, info in found.items()}

    def list_dirs(self, prefix: str = "") -> list[str]:
        path = self._path(prefix)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    def exists(self, key: str) -> bool:
        try:
            self.get(key)  # one GET, never a cached listing
            return True
        except FileNotFoundError:
            return False

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass

    def check_writable(self) -> None:
        probe = f".twa-write-probe-{uuid.uuid4().hex[:12]}"
        try:
            self.put_small(probe, b"{}")
            self.delete(probe)
        except Exception as e:  # noqa: BLE001 - any failure here means: not writable
            raise store_error(f"snapshot store {self.url} is not reachable or not writable: "
                              f"{type(e).__name__}: {e}", e) from e


class LocalStore(FsspecStore):
    """A local (or mounted) directory."""

    def _write_temp(self, key: str, data: bytes) -> tuple[str, str]:
        """Write ``data`` durably to a hidden temporary beside ``key``'s path; (temp path, final path)."""
        path = self._path(key)
        d = os.path.dirname(path)
        self.fs.makedirs(d, exist_ok=True)
        tmp = f"{d}/.{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp, path

    def put_small(self, key: str, data: bytes) -> None:
        tmp, path = self._write_temp(key, data)
        os.replace(tmp, path)

    def create(self, key: str, data: bytes) -> bool:
        tmp, path = self._write_temp(key, data)
        try:
            os.link(tmp, path)  # atomic, and fails when the name exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def put_large(self, key, view, *, part_bytes=None, concurrency=None) -> None:
        path = self._path(key)
        self.fs.makedirs(os.path.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, view)

    def sizes(self, prefix: str) -> dict[str, int]:
        return {k: n for k, n in super().sizes(prefix).items() if ".tmp-" not in k.rsplit("/", 1)[-1]}


class S3Store(FsspecStore):
    """An S3 bucket and prefix (AWS or any S3 API: SeaweedFS, MinIO, ...)."""

    def __init__(self, url: str, fs, root: str, *, quick_options: dict | None = None, data=None):
        super().__init__(url, fs, root)
        self.bucket = self.root.split("/", 1)[0]
        self._quick_options = quick_options
        self._quick = None
        self._data = data  # s3client.ObstoreS3: large puts and ranged reads (TWA_SCALE_S3_CLIENT)

    @property
    def _quick_fs(self):
        """A filesystem that fails fast (one attempt, short connect timeout), for probes."""
        if self._quick is None:
            import fsspec

            if self._quick_options is None:
                return self.fs
            self._quick = fsspec.filesystem("s3", **self._quick_options)
            self._quick.retries = 1
        return self._quick

    @property
    def endpoint(self) -> str:
        ep = getattr(self.fs, "client_kwargs", {}).get("endpoint_url") or getattr(self.fs, "endpoint_url", None)
        return ep or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS default"

    def where(self) -> str:
        return f"endpoint {self.endpoint}, bucket {self.bucket}"

    def put_small(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)  # one PutObject: whole or nothing

    def create(self, key: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self._path(key), data, mode="create")  # If-None-Match: *
            return True
        except FileExistsError:
            return False
        except OSError as e:
            # s3fs turns 412 PreconditionFailed into OSError(EINVAL, "At least one of the pre-conditions
            # you specified did not hold") (SeaweedFS 4.48 and AWS answer the same).
            text = f"{e} {e.__cause__ or ''}".lower()
            if "pre-condition" in text or "precondition" in text or "412" in text:
                return False
            raise

    def put_large(self, key, view, *, part_bytes=None, concurrency=None) -> None:
        part = part_bytes or 16 << 20
        if self._data is not None:
            return self._data.put(self._path(key)[len(self.bucket) + 1:], view, part_bytes=part,
                                  concurrency=concurrency or 16)
        if len(view) < 2 * part:  # s3fs sends this as one PUT
            self.fs.pipe_file(self._path(key), bytes(view))
        else:
            self.fs.pipe_file(self._path(key), _Parts(view), chunksize=part, max_concurrency=concurrency)

    def _guard(self, fn, *args, **kwargs):
        """Call into s3fs; botocore errors that are not OSErrors (NoCredentialsError, ...) and refused
        credentials become one StoreUnreachableError/StoreAccessError/StoreAuthError naming endpoint and
        bucket."""
        try:
            out = fn(*args, **kwargs)
        except PermissionError as e:  # s3fs's translation of 403s: say which credentials failed, where
            if auth_error_code(e) is None:
                raise
            raise self.unreachable(e) from e
        except (OSError, ValueError, TypeError):
            raise
        except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors
            raise self.unreachable(e) from e
        if isinstance(out, list):
            for x in out:
                if isinstance(x, Exception) and (not isinstance(x, (OSError, ValueError)) or auth_error_code(x)):
                    raise self.unreachable(x) from x
        return out

    def get(self, key: str) -> bytes:
        try:
            return self._guard(self.fs.cat_file, self._path(key), max_concurrency=1)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.describe(key)} does not exist") from None

    def get_many(self, keys):
        keys = list(keys)
        return self._guard(self.fs.cat_ranges, [self._path(k) for k in keys], [None] * len(keys),
                           [None] * len(keys), on_error="return", max_concurrency=1)

    def get_ranges(self, keys, starts, ends):
        if self._data is not None and None not in starts and None not in ends:
            return self._guard(self._data.get_ranges, [self._path(k)[len(self.bucket) + 1:] for k in keys],
                               starts, ends)
        return self._guard(super().get_ranges, keys, starts, ends)

    def sizes(self, prefix: str) -> dict[str, int]:
        return self._guard(super().sizes, prefix)

    def list_dirs(self, prefix: str = "") -> list[str]:
        return self._guard(super().list_dirs, prefix)

    def check_writable(self) -> None:
        """Resolve credentials, reach the endpoint, create a missing bucket, prove a write."""
        fs = self._quick_fs
        try:
            fs.ls(self.bucket, detail=False)  # lists at most one page; raises when the bucket is absent
        except FileNotFoundError:
            try:
                fs.mkdir(self.bucket)
                log.info("created bucket s3://%s", self.bucket)
            except Exception as e:  # noqa: BLE001
                raise store_error(f"bucket s3://{self.bucket} ({self.where()}) does not exist and could "
                                  f"not be created: {type(e).__name__}: {e}", e) from e
        except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not all OSErrors
            raise self.unreachable(e) from e
        probe = self._path(f".twa-write-probe-{uuid.uuid4().hex[:12]}")
        try:
            fs.pipe_file(probe, b"{}")
            fs.rm_file(probe)
        except Exception as e:  # noqa: BLE001
            raise self.unreachable(e, what="not writable") from e

    def unreachable(self, err: BaseException, what: str = "not reachable") -> OSError:
        """The one-line error for ``err``: an authentication failure when the store refused the credentials
        (StoreAuthError, exit 2), else unreachable (transient, 75) or not writable/refused (2)."""
        code = auth_error_code(err)
        if code is not None:
            detail = (str(err).splitlines() or [code])[0].rstrip(".")
            if code in ("AccessDenied", "403", "Forbidden"):  # a wrong key pair, or an identity without the right
                kind = "access denied" + (f" ({what})" if what != "not reachable" else "")
                hint = f"check the identity's permissions on bucket {self.bucket}, or {_CREDENTIAL_HINT}"
            else:
                kind = "credentials missing" if code.endswith("CredentialsError") else "authentication failed"
                hint = _CREDENTIAL_HINT
            return StoreAuthError(f"snapshot store {self.url}: {kind} ({self.where()}): {code}: {detail}; {hint}")
        return store_error(f"snapshot store {self.url} is {what} ({self.where()}): {type(err).__name__}: {err}", err)


def _s3_defaults() -> dict[str, Any]:
    # Both timeouts, always: a stalled server (SIGSTOP, a hung proxy) accepts connections and then
    # says nothing, and only the read timeout ends such a call. Knobs, read when a store is opened.
    return {"config_kwargs": {"connect_timeout": knobs.STORE_CONNECT_TIMEOUT_SECONDS.get(),
                              "read_timeout": knobs.STORE_READ_TIMEOUT_SECONDS.get()}}


def open_store(url: str, storage_options: dict | str | None = None, *, quick: bool = False,
               timeout_seconds: float | None = None) -> ObjectStore:
    """The store for ``url`` (see the module docstring); ValueError for a malformed URL.

    ``quick``: no library-level retries and half the connect timeout, for callers that retry
    with their own backoff and deadline (writers) and for probes. ``timeout_seconds``: the connect
    and read timeout of every call (with ``quick``, the most one call can take against a stalled
    server: the background stop-marker poll).
    """
    import fsspec
    from fsspec.config import conf

    protocol, rest = check_url(url)
    options = parse_storage_options(storage_options)
    if protocol == "file":
        from fsspec.implementations.local import LocalFileSystem

        path = rest if "://" in url else os.path.abspath(rest)
        fs = LocalFileSystem(**{k: v for k, v in options.items() if k in ("auto_mkdir",)})
        return LocalStore(url if "://" in url else "file://" + path, fs, path)
    if protocol in ("s3", "s3a"):
        try:
            import s3fs  # noqa: F401
        except ImportError as e:
            raise ImportError(f"{url}: s3:// URLs need s3fs; install it with `pip install s3fs`") from e
        defaults = _s3_defaults()
        if not os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION"):
            # Our own per-chunk CRC-32 checks the bytes end to end; botocore's extra per-request checksum
            # costs ~30% of upload throughput in s3fs's single asyncio thread.
            defaults = _merge(defaults, {"config_kwargs": {"request_checksum_calculation": "when_required"}})
        merged = _merge(defaults, conf.get("s3", {}), options)
        if timeout_seconds is not None:
            merged = _merge(merged, {"config_kwargs": {"connect_timeout": timeout_seconds,
                                                       "read_timeout": timeout_seconds}})
        fast = _merge(merged, {"config_kwargs": {"connect_timeout": merged["config_kwargs"]["connect_timeout"] / 2,
                                                 "retries": {"max_attempts": 1}}})
        fs = fsspec.filesystem("s3", **(fast if quick else merged))
        if quick:
            fs.retries = 1
        from twa_scale.store.s3client import ObstoreS3, s3_client

        data = ObstoreS3(rest.split("/", 1)[0], fast if quick else merged, quick=quick) \
            if s3_client() == "obstore" else None
        return S3Store(f"s3://{rest.rstrip('/')}", fs, rest.rstrip("/"), quick_options=fast, data=data)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as e:  # ValueError: "Protocol not known"
        raise ImportError(f"{url}: no filesystem for scheme {protocol!r} is installed (gs:// needs gcsfs, az:// "
                          f"adlfs): {str(e).splitlines()[0]}") from e
    return FsspecStore(url, fs, path)
