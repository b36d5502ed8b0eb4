"""Shared fixtures: a real S3 server (SeaweedFS) and one store URL per backend; untiered tests marked `unit`.

``s3_server`` is one ``weed server`` for the whole session, with the standard AWS variables
pointing at it for every test. ``fresh_s3`` is a private server for fault tests that kill,
pause or restart it. ``store_url`` runs a test once per backend: memory://, file:// and s3://.
"""
from __future__ import annotations

import glob
import os
import uuid

import pytest

from tests.support.s3 import SeaweedS3


def pytest_sessionstart(session):
    """Free /dev/shm of DeepSpeed all-reduce buffers that no live process maps.

    Jobs killed before ``comm.init`` unlinked their buffer (and any run from before that fix) left
    69 MB files in RAM-backed /dev/shm; on a machine that ran many jobs they add up to an OOM kill.
    """
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split()[-1] for line in f if "deepspeed_allreduce_buffer" in line)
        except OSError:  # the process ended, or is not ours to read
            continue
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        if path not in mapped:
            try:
                os.unlink(path)
            except OSError:
                pass


# Component tests launch training with the flags under test on the dataclass defaults. The `quickstart`
# preset, which the bare command keeps in force under other flags, has tests of its own that lift this
# (tests/test_config.py, tests/test_presets.py, the README and docs commands).
os.environ["TWA_SCALE_TRAIN_PRESET"] = "none"


@pytest.fixture
def default_preset(monkeypatch):
    """The preset as users get it: no TWA_SCALE_TRAIN_PRESET in the environment."""
    monkeypatch.delenv("TWA_SCALE_TRAIN_PRESET", raising=False)


# Every marker that puts a test in a heavier tier than `unit` (pyproject.toml's [tool.pytest.ini_options]).
TIERS = ("multirank", "s3", "prometheus", "k8s", "gpu", "image", "experiments", "slow", "e2e")


def pytest_collection_modifyitems(config, items):
    """A test without a tier marker is a unit test: `pytest -m unit` selects exactly the fast lane."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in TIERS):
            item.add_marker(pytest.mark.unit)


def _clear_s3fs_cache() -> None:
    # s3fs caches filesystem instances by their arguments, not by AWS_ENDPOINT_URL.
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


def _point_env_at(server: SeaweedS3) -> dict[str, str | None]:
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    _clear_s3fs_cache()
    return saved


def _restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _clear_s3fs_cache()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on free loopback ports; AWS_* env points at it. Stopped by PID."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    saved = _point_env_at(server)
    try:
        yield server
    finally:
        server.stop(grace_seconds=2.0)
        _restore_env(saved)


@pytest.fixture
def s3_url(s3_server) -> str:
    """A fresh prefix in a shared bucket of the session server."""
    os.environ.update(s3_server.env)
    return f"s3://twa-test/{uuid.uuid4().hex[:10]}"


@pytest.fixture
def fresh_s3(tmp_path):
    """A private SeaweedFS server that the test may kill -9, pause and restart."""
    server = SeaweedS3(tmp_path / "seaweedfs").start()
    saved = _point_env_at(server)
    try:
        yield server
    finally:
        try:
            server.resume()
        except (OSError, AttributeError):
            pass
        server.stop(grace_seconds=1.0)
        _restore_env(saved)


@pytest.fixture(params=["memory", "file", pytest.param("s3", marks=pytest.mark.s3),
                        pytest.param("s3-obstore", marks=pytest.mark.s3)])
def store_url(request, tmp_path, monkeypatch) -> str:
    """One store URL per backend; the s3 cases use the session SeaweedFS server, with each S3 client
    of large puts and ranged reads (TWA_SCALE_S3_CLIENT: s3fs by default, obstore)."""
    if request.param == "memory":
        return f"memory://twa-{uuid.uuid4().hex[:10]}"
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    if request.param == "s3-obstore":
        monkeypatch.setenv("TWA_SCALE_S3_CLIENT", "obstore")
    return request.getfixturevalue("s3_url")
