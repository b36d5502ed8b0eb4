"""The exit-code taxonomy (twa_scale.errors) that the Kubernetes failure policies rely on.

0 done, 2 bad configuration (permanent), 75 transient infrastructure, 143 preemption.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import REPO, free_port
from twa_scale import errors
from twa_scale.cli import launch_main

pytestmark = pytest.mark.k8s


def _raise(exc):
    def run(_cfg):
        raise exc
    return run


@pytest.mark.parametrize("exc,permanent,code", [
    (errors.ConfigError("bad --lr"), (), 2),
    (ValueError("bad --lr"), (ValueError,), 2),
    (errors.TransientError("rendezvous timed out"), (ValueError,), 75),
    # a store outage is an OSError too; transient wins even where OSError means bad input (twa.py)
    (errors.StoreUnreachableError("store down"), (ValueError, OSError), 75),
    (OSError("corrupt shard"), (ValueError, OSError), 2),
])
def test_launch_main_maps_expected_errors_to_one_line_and_a_status(exc, permanent, code, capsys):
    assert launch_main(lambda: object(), _raise(exc), errors=permanent or (ValueError,)) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(exc) in err[0], err
    assert ("transient" in err[0]) == (code == 75)


def test_launch_main_keeps_the_traceback_of_a_bug():
    with pytest.raises(ZeroDivisionError):
        launch_main(lambda: object(), _raise(ZeroDivisionError("bug")))


def test_preemption_keeps_its_status():
    from twa_scale.train.streamer import Preempted

    with pytest.raises(SystemExit) as e:
        launch_main(lambda: object(), _raise(Preempted(143)))
    assert e.value.code == errors.EXIT_PREEMPTED == 143


def test_torch_rendezvous_failures_are_transient():
    from torch.distributed import DistNetworkError, DistStoreError

    assert errors.exit_code(DistStoreError("Timed out after 1801 seconds waiting for clients")) == 75
    assert errors.exit_code(DistNetworkError("Connection refused")) == 75
    assert errors.exit_code(RuntimeError("something else")) is None


def test_connection_errors_are_recognised_through_their_cause():
    class EndpointConnectionError(Exception):  # botocore's, matched by name
        pass

    try:
        try:
            raise EndpointConnectionError("Could not connect")
        except EndpointConnectionError as inner:
            raise OSError("wrapped") from inner
    except OSError as outer:
        assert errors.is_connection_error(outer)
    assert errors.is_connection_error(ConnectionRefusedError())
    assert not errors.is_connection_error(PermissionError("AccessDenied"))


@pytest.mark.slow
def test_unreachable_store_at_start_exits_75(tmp_path):
    """A real training launch against an endpoint where nothing listens: transient, not bad config."""
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--data", "digits", "--model", "resnet20",
                        "--epochs", "1", "--snapshot-url", "s3://bkt/runs", "--run-id", "x",
                        "--checkpoint-dir", str(tmp_path / "ckpt")],
                       env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert r.returncode == 75, r.stderr[-3000:]
    assert "transient error" in r.stderr and "not reachable" in r.stderr
    assert "Traceback" not in r.stderr
