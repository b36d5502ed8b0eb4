"""Refused credentials against a real SeaweedFS that enforces identities: called an authentication failure
(or access denied), naming the endpoint and the bucket, exit 2 (configuration, not an outage), no secret."""
from __future__ import annotations

import json
import uuid

import pytest

from devtools.s3server import S3_ENV
from tests.support import REPO
from tests.support.launch import python
from tests.support.s3 import SeaweedS3
from twa_scale import errors, store

pytestmark = pytest.mark.s3

KEY, SECRET = S3_ENV["AWS_ACCESS_KEY_ID"], S3_ENV["AWS_SECRET_ACCESS_KEY"]
WRONG_SECRET = "wrong-secret-7f3a9c"


@pytest.fixture(scope="module")
def guarded_s3(tmp_path_factory):
    """A private server with two identities: the suite's key pair (everything) and a read-only one."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs-auth"), identities={
        "admin": (KEY, SECRET, ["Admin", "Read", "Write", "List", "Tagging"]),
        "reader": ("reader-key", "reader-secret", ["Read", "List"])}).start()
    try:
        yield server
    finally:
        server.stop(grace_seconds=1.0)


@pytest.fixture
def endpoint_env(guarded_s3, monkeypatch):
    """This process's AWS_* at the guarded server; s3fs's instance cache cleared both ways."""
    import s3fs

    for k, v in guarded_s3.env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    yield guarded_s3
    s3fs.S3FileSystem.clear_instance_cache()


def _options(key: str, secret: str) -> str:
    return json.dumps({"key": key, "secret": secret})


@pytest.mark.parametrize("key, secret, kind, code", [
    (KEY, WRONG_SECRET, "authentication failed", "SignatureDoesNotMatch"),
    ("no-such-key", WRONG_SECRET, "authentication failed", "InvalidAccessKeyId"),
    ("reader-key", "reader-secret", "access denied (not writable)", "AccessDenied"),
])
def test_refused_credentials_at_the_write_probe(endpoint_env, key, secret, kind, code):
    bucket = f"auth-{uuid.uuid4().hex[:8]}"
    store.open_store(f"s3://{bucket}/runs", quick=True).check_writable()  # the right key pair: fine
    st = store.open_store(f"s3://{bucket}/runs", _options(key, secret), quick=True)
    with pytest.raises(store.StoreAuthError) as info:
        st.check_writable()
    msg = str(info.value)
    assert f"snapshot store s3://{bucket}/runs: {kind} (endpoint {endpoint_env.endpoint}, bucket {bucket})" in msg
    assert code in msg and "not reachable" not in msg and "\n" not in msg
    assert secret not in msg
    assert errors.exit_code(info.value) == errors.EXIT_CONFIG and not errors.is_transient(info.value)


@pytest.mark.parametrize("client", ["s3fs", "obstore"])
def test_a_wrong_secret_on_the_read_path(endpoint_env, monkeypatch, client):
    """A reader (the TWA stage, `runs ls`) gets the same error, not a bare PermissionError, whichever client
    makes the ranged reads."""
    monkeypatch.setenv("TWA_SCALE_S3_CLIENT", client)
    url = f"s3://auth-{uuid.uuid4().hex[:8]}/runs"
    store.open_store(url).put_small("x/run.json", b"{}")
    wrong = store.open_store(url, _options(KEY, WRONG_SECRET))
    where = f"(endpoint {endpoint_env.endpoint}, bucket {url[5:].split('/')[0]})"
    with pytest.raises(store.StoreAuthError, match="authentication failed .*SignatureDoesNotMatch"):
        wrong.get("x/run.json")
    with pytest.raises(store.StoreAuthError) as info:  # the shards' ranged reads
        wrong.get_ranges(["x/run.json"], [0], [2])
    # obstore's error holds the response body, so its S3 code is read from there
    assert f"authentication failed {where}: SignatureDoesNotMatch" in str(info.value), str(info.value)
    with pytest.raises(PermissionError):  # still a PermissionError for code that treats refusals as permanent
        wrong.sizes("x")


@pytest.mark.e2e
def test_training_with_a_wrong_secret_exits_2_naming_endpoint_and_bucket(guarded_s3, tmp_path):
    bucket = f"auth-{uuid.uuid4().hex[:8]}"
    proc = python(str(REPO / "launch" / "train.py"),
                  ["--data", "digits", "--model", "mlp", "--epochs", "1", "--no-twa", "--run-id", "auth",
                   "--snapshot-url", f"s3://{bucket}/runs", "--checkpoint-dir", str(tmp_path / "ckpt")],
                  check=False, cwd=tmp_path, extra_env={**guarded_s3.env, "AWS_SECRET_ACCESS_KEY": WRONG_SECRET})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "authentication failed" in lines[0] and "SignatureDoesNotMatch" in lines[0], lines[0]
    assert f"endpoint {guarded_s3.endpoint}, bucket {bucket}" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and WRONG_SECRET not in proc.stderr + proc.stdout
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir()), "nothing trained"


@pytest.mark.e2e
def test_twa_with_a_wrong_secret_exits_2(guarded_s3, tmp_path):
    bucket = f"auth-{uuid.uuid4().hex[:8]}"
    proc = python(str(REPO / "launch" / "twa.py"), ["--snapshot-url", f"s3://{bucket}/runs", "--run-id", "auth"],
                  check=False, cwd=tmp_path, extra_env={**guarded_s3.env, "AWS_SECRET_ACCESS_KEY": WRONG_SECRET})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "authentication failed" in lines[0] and f"endpoint {guarded_s3.endpoint}, bucket {bucket}" in lines[0]
    assert "Traceback" not in proc.stderr and WRONG_SECRET not in proc.stderr + proc.stdout


def test_auth_codes_are_read_through_the_cause_chain():
    class ClientError(Exception):  # botocore's shape: the code in response["Error"]["Code"]
        def __init__(self, code, status):
            super().__init__(code)
            self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}

    try:
        try:
            raise ClientError("SignatureDoesNotMatch", 403)
        except ClientError as inner:
            raise PermissionError("denied") from inner
    except PermissionError as outer:
        assert errors.auth_error_code(outer) == "SignatureDoesNotMatch"
    assert errors.auth_error_code(ClientError("", 403)) == "403"  # a HEAD's bare 403
    assert errors.auth_error_code(ClientError("NoSuchKey", 404)) is None
    assert errors.auth_error_code(ConnectionRefusedError()) is None
