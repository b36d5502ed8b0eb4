"""The typed on-storage format, strict URLs, storage options, the writer lease, commits that are
never empty or stolen, damaged snapshots that damage only themselves; on memory, file and S3."""
from __future__ import annotations

import json
import time
import uuid

import pytest
import torch

from tests.test_store import _model, _write
from twa_scale import store
from twa_scale.cli import main
from twa_scale.layout import FlatLayout
from twa_scale.store import (CommitMarker, FormatError, Lease, LeaseHeldError, RetryDeadlineExceeded, RetryPolicy,
                             RunExistsError, RunManifest, check_url, open_store)
from twa_scale.store.lease import LeaseLostError, acquire_lease

IDENTITY = {"model": {"name": "tiny"}, "seed": 0, "optimizer": {"lr": 0.1}}


def _new(url, run_id="run1", *, session=None, resume=False, identity=IDENTITY, world=2):
    layout = FlatLayout.from_model(_model())
    return store.create_run(url, run_id, layout, meta={"model": "tiny"}, world_size=world, identity=identity,
                            resume=resume, session=session or uuid.uuid4().hex[:12])


def _objects(url, prefix="run1"):
    st = open_store(url)
    return {k: st.get(k) for k in st.find(prefix)}


# ---------------------------------------------------------------- format
def test_records_round_trip_and_name_the_object_when_bad():
    layout = FlatLayout.from_model(_model())
    m = RunManifest(run_id="r", url="memory://x", created_at=1.0, fingerprint=layout.fingerprint, D=layout.D,
                    layout=layout, world_size=1, dtype="float32", identity=IDENTITY)
    again = RunManifest.from_json(m.to_json(), "x/run.json")
    assert again.identity == IDENTITY and again.layout.D == layout.D
    obj = json.loads(m.to_json())
    with pytest.raises(FormatError, match="x/run.json has format twa_scale.run/9, which this version"):
        RunManifest.from_json({**obj, "format": "twa_scale.run/9"}, "x/run.json")
    with pytest.raises(FormatError, match="x/run.json fails its own checksum"):
        RunManifest.from_json({**obj, "world_size": 3}, "x/run.json")
    with pytest.raises(FormatError, match="x/run.json is empty"):
        RunManifest.from_json(b"", "x/run.json")
    v1 = {k: v for k, v in obj.items() if k not in ("json_sha256", "run_id")} | {"format": "twa_scale.run/1"}
    with pytest.raises(FormatError, match="x/run.json .*has no field 'run_id'"):
        RunManifest.from_json(v1, "x/run.json")
    # offsets and sizes must follow from names and shapes (the fingerprint covers only those)
    entries = [list(e) for e in obj["layout"]["entries"]]
    entries[1][3] += 1
    forged = {k: v for k, v in obj.items() if k != "json_sha256"}
    forged["layout"] = {**obj["layout"], "entries": entries}
    with pytest.raises(FormatError, match="has offset"):
        RunManifest.from_json(store.format.seal(forged), "x/run.json")


def test_strict_urls():
    for bad, needle in [("s3://", "names no bucket"), ("s3:///x", "names no bucket"),
                        ("s3:/bucket/typo", "must be followed by '://'"), ("file://rel/path", "absolute path"),
                        ("", "empty")]:
        with pytest.raises(ValueError, match=needle):
            check_url(bad)
    assert check_url("s3://b/p") == ("s3", "b/p") and check_url("/abs/dir") == ("file", "/abs/dir")


def test_storage_options_and_fsspec_config_reach_the_filesystem(monkeypatch):
    pytest.importorskip("s3fs")
    from fsspec.config import conf

    monkeypatch.setitem(conf, "s3", {"endpoint_url": "http://from-fsspec-config:1",
                                     "config_kwargs": {"read_timeout": 7}})
    st = open_store("s3://bkt/p")
    assert st.fs.client_kwargs.get("endpoint_url") == "http://from-fsspec-config:1" or \
        st.fs.endpoint_url == "http://from-fsspec-config:1"
    assert st.fs.config_kwargs["read_timeout"] == 7 and st.fs.config_kwargs["connect_timeout"] == 10
    st = open_store("s3://bkt/p", '{"endpoint_url": "http://from-flag:2", "config_kwargs": {"connect_timeout": 3}}')
    assert "from-flag" in str(st.endpoint)
    assert st.fs.config_kwargs["read_timeout"] == 7 and st.fs.config_kwargs["connect_timeout"] == 3
    with pytest.raises(ValueError, match="--storage-options"):
        open_store("s3://bkt/p", "[1]")


def test_every_s3_call_has_a_read_and_a_connect_timeout_from_the_knobs(monkeypatch):
    """A stalled server accepts connections and then says nothing: only a read timeout ends such a call.
    Both timeouts come from knobs; quick stores halve the connect timeout; a poll sets both."""
    pytest.importorskip("s3fs")
    monkeypatch.setenv("TWA_SCALE_STORE_READ_TIMEOUT_SECONDS", "42")
    monkeypatch.setenv("TWA_SCALE_STORE_CONNECT_TIMEOUT_SECONDS", "8")
    kw = open_store("s3://bkt/p").fs.config_kwargs
    assert (kw["read_timeout"], kw["connect_timeout"]) == (42, 8)
    kw = open_store("s3://bkt/p", quick=True).fs.config_kwargs
    assert (kw["read_timeout"], kw["connect_timeout"], kw["retries"]) == (42, 4, {"max_attempts": 1})
    kw = open_store("s3://bkt/p", quick=True, timeout_seconds=3).fs.config_kwargs
    assert (kw["read_timeout"], kw["connect_timeout"]) == (3, 1.5)
    kw = open_store("s3://bkt/p", '{"config_kwargs": {"read_timeout": 5}}').fs.config_kwargs
    assert (kw["read_timeout"], kw["connect_timeout"]) == (5, 8)  # --storage-options wins
    monkeypatch.setenv("TWA_SCALE_STORE_READ_TIMEOUT_SECONDS", "soon")
    with pytest.raises(ValueError, match="TWA_SCALE_STORE_READ_TIMEOUT_SECONDS"):
        open_store("s3://bkt/p")


def test_retry_policy_is_bounded_and_raises_permanent_errors_at_once():
    calls = []

    def flaky():
        calls.append(1)
        raise ConnectionResetError("reset")

    t0 = time.monotonic()
    with pytest.raises(RetryDeadlineExceeded, match="writing x: gave up after .* ConnectionResetError"):
        RetryPolicy(deadline_seconds=0.5, initial_seconds=0.05).call("writing x", flaky)
    assert len(calls) >= 2 and time.monotonic() - t0 < 2
    with pytest.raises(PermissionError):
        RetryPolicy().call("w", lambda: (_ for _ in ()).throw(PermissionError("denied")))


# ---------------------------------------------------------------- run identity and lease
def test_relaunch_without_resume_is_refused_and_changes_nothing(store_url):
    w = _new(store_url)
    _write(w, 0, torch.randn(w.layout.D), 2, session=w.session)
    w.close()
    before = _objects(store_url)
    with pytest.raises(RunExistsError, match=r"run .*run1 already exists .* Pass --resume"):
        _new(store_url)
    assert _objects(store_url) == before
    with pytest.raises(RunExistsError, match=r"fields that differ .*optimizer.lr \(0.1 -> 0.2\), seed \(0 -> 1\)"):
        _new(store_url, resume=True, identity={**IDENTITY, "seed": 1, "optimizer": {"lr": 0.2}})
    assert _objects(store_url) == before
    _new(store_url, resume=True).close()  # the same identity resumes


def test_second_writer_fails_fast_naming_the_holder(store_url):
    a = _new(store_url, session="aaaa1111")
    with pytest.raises(LeaseHeldError, match=r"being written by session aaaa1111 .*last heartbeat \d+s ago"):
        _new(store_url, resume=True, session="bbbb2222")
    a.close()
    b = _new(store_url, resume=True, session="bbbb2222")  # released: free to take
    b.close()


def test_stale_lease_is_taken_over_by_resume_only(store_url):
    st, paths = open_store(store_url), store.RunPaths("run1")
    w = _new(store_url, session="old00001")
    w.lease._stop.set()  # the holder "dies": no more heartbeats
    stale = Lease(**{**{k: getattr(w.lease.lease, k) for k in ("session", "host", "pid", "acquired_at")},
                     "heartbeat_at": time.time() - 500, "timeout_seconds": 120.0})
    st.put_small(paths.lease, stale.to_json())
    with pytest.raises(LeaseHeldError, match="stale .*relaunch with --resume"):
        acquire_lease(st, paths, "new00002", resume=False)
    new = acquire_lease(st, paths, "new00002", resume=True)
    # the old holder notices at its next heartbeat and stops committing
    with pytest.raises(LeaseLostError):
        w.lease.heartbeat()
    metas = _write(w, 3, torch.randn(w.layout.D), 2, session="old00001", commit=False)
    with pytest.raises(LeaseLostError, match="taken over"):
        w.commit(3, metas)
    new.release()


def test_a_relaunch_of_the_same_job_takes_its_live_looking_lease_at_once(store_url, monkeypatch):
    """After a kill -9 the dead launch's lease looks alive for TWA_SCALE_LEASE_TIMEOUT_SECONDS; a --resume
    of the same job (TWA_SCALE_JOB_ID: the JobSet's uid) takes it over at once, no other job does."""
    st, paths = open_store(store_url), store.RunPaths("run1")
    monkeypatch.setenv("TWA_SCALE_JOB_ID", "jobset-uid-1")
    w = _new(store_url, session="dead0001")
    w.lease._stop.set()  # killed: no more heartbeats, but the lease is fresh
    assert Lease.from_json(st.get(paths.lease), "lease").job == "jobset-uid-1"
    monkeypatch.setenv("TWA_SCALE_JOB_ID", "jobset-uid-2")
    with pytest.raises(LeaseHeldError, match=r"being written by session dead0001 .*job jobset-uid-1"):
        acquire_lease(st, paths, "othr0002", resume=True)
    monkeypatch.delenv("TWA_SCALE_JOB_ID")
    with pytest.raises(LeaseHeldError, match="being written by session dead0001"):
        acquire_lease(st, paths, "anon0003", resume=True)
    monkeypatch.setenv("TWA_SCALE_JOB_ID", "jobset-uid-1")
    with pytest.raises(LeaseHeldError, match="being written by session dead0001"):
        acquire_lease(st, paths, "same0004", resume=False)
    t0 = time.monotonic()
    new = acquire_lease(st, paths, "same0005", resume=True)
    assert time.monotonic() - t0 < 5 and new.lease.job == "jobset-uid-1"
    with pytest.raises(LeaseLostError):  # had the old launch survived, it would stop committing
        w.lease.heartbeat()
    new.release()


def test_commit_never_replaces_another_sessions_marker_and_cleanup_keeps_others(store_url):
    w = _new(store_url, session="sessaaaa")
    vec = torch.randn(w.layout.D)
    _write(w, 0, vec, 2, session="sessaaaa")
    other = _write(w, 0, vec + 1, 2, session="sessbbbb", commit=False)  # a second writer's shards
    kept = w.commit(0, other)
    assert kept.session == "sessaaaa"
    assert torch.equal(store.open_run(store_url, "run1").read(0), vec)
    w.remove_uncommitted(0)  # removes only its own session's unreferenced objects
    names = {k.rsplit("/", 1)[-1] for k in open_store(store_url).find("run1/snapshots/00000000")}
    assert any("sessbbbb" in n for n in names)
    w.close()


# ---------------------------------------------------------------- empty and damaged snapshots
def test_empty_marker_is_never_listed_and_resume_recommits_it(store_url, capsys):
    w = _new(store_url, session="sess0001")
    vecs = [torch.randn(w.layout.D) for _ in range(3)]
    for seq, v in enumerate(vecs):
        _write(w, seq, v, 2, session="sess0001", step=seq, epoch=seq)
    w.close()
    st = open_store(store_url)
    st.put_small("run1/snapshots/00000001/COMMIT.json", b"")  # SeaweedFS's zero-byte object
    r = store.open_run(store_url, "run1")
    infos, damaged = r.scan()
    assert [i.seq for i in infos] == [0, 2] and list(damaged) == [1] and "is empty" in damaged[1]
    assert main(["snapshots", "ls", f"{store_url}/run1"]) == 0
    out = capsys.readouterr().out
    assert "1 DAMAGED" in out and any(line.split()[:2] == ["1", "DAMAGED"] for line in out.splitlines())
    assert main(["snapshots", "verify", f"{store_url}/run1"]) == 1
    assert "snapshot seq 1: not committed" in capsys.readouterr().err
    _new(store_url, resume=True, session="sess0002").close()  # repairs on reopen
    r = store.open_run(store_url, "run1")
    assert [i.seq for i in r.snapshots()] == [0, 1, 2] and r.verify() == []
    assert torch.equal(r.read(1), vecs[1])


def test_damaged_snapshot_damages_only_itself_and_twa_selection_refuses_it(store_url, capsys):
    from twa_scale.errors import ConfigError
    from twa_scale.twa.selection import check_selection

    w = _new(store_url, session="sess0001")
    for seq in (0, 1, 2, 3, 5):
        _write(w, seq, torch.randn(w.layout.D), 2, session="sess0001")
    w.close()
    st = open_store(store_url)
    st.delete(next(k for k in st.find("run1/snapshots/00000002") if k.endswith(".bin")))
    st.put_small("run1/snapshots/00000003/COMMIT.json", b'{"format": "twa_scale.commit/2"')
    assert main(["snapshots", "verify", f"{store_url}/run1"]) == 1
    err = capsys.readouterr().err
    assert "seq 2" in err and "is missing" in err and "seq 3" in err and "2 problem(s)" in err
    r = store.open_run(store_url, "run1")
    infos, damaged = r.scan()
    assert [i.seq for i in infos] == [0, 1, 5] and sorted(damaged) == [2, 3]
    ok = [0, 1, 5]
    with pytest.raises(ConfigError, match=r"--select 1: includes damaged snapshot seq 2"):
        check_selection("1:", ok, damaged)
    with pytest.raises(ConfigError, match=r"every snapshot\) includes damaged snapshot seq 2"):
        check_selection(None, ok, damaged)
    check_selection("0:2", ok, damaged)  # avoids it
    with pytest.raises(ConfigError, match=r"seq\(s\) \[4\] are not committed; pass --allow-gaps"):
        check_selection("4:6", ok, damaged)
    check_selection("4:6", ok, damaged, allow_gaps=True)
    check_selection("-1:", ok, damaged)  # the last one only


def test_cli_one_line_errors(tmp_path, capsys, monkeypatch):
    assert main(["snapshots", "ls", "s3:/bucket/typo/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be followed by '://'" in err[0]
    assert main(["runs", "ls", "s3://"]) == 2
    assert "names no bucket" in capsys.readouterr().err


@pytest.mark.s3
def test_no_credentials_is_one_line_naming_endpoint_and_bucket(s3_server, monkeypatch, capsys, tmp_path):
    import s3fs

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        code = main(["snapshots", "ls", "s3://twa-test/nocreds/run"])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"endpoint {s3_server.endpoint}, bucket twa-test" in err[0] and "NoCredentialsError" in err[0]


def test_runs_ls_lists_fingerprint_lease_and_state(tmp_path, capsys):
    url = tmp_path.as_uri()
    w = _new(url, "r-live", session="live0001")
    _new(url, "r-done", session="done0001").close()
    assert main(["runs", "ls", "--json", url]) == 0
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["r-live"]["state"] == "writing" and rows["r-live"]["lease"]["session"] == "live0001"
    assert rows["r-done"]["state"] == "idle" and rows["r-done"]["fingerprint"]
    assert main(["runs", "ls", url]) == 0
    assert "session live0001" in capsys.readouterr().out
    w.close()


def test_commit_marker_carries_epoch_fraction(store_url):
    w = _new(store_url, session="frac0001")
    view = memoryview(torch.zeros(w.layout.D).numpy()).cast("B")
    meta = w.shard_meta(4, rank=0, world_size=1, session="frac0001", view=view, step=40, epoch=2,
                        epoch_fraction=2.5)
    w.put_shard(meta, view)
    marker = w.commit(4, [meta])
    assert CommitMarker.from_json(marker.to_json(), "m").epoch_fraction == 2.5
    assert store.open_run(store_url, "run1").snapshots()[0].epoch_fraction == 2.5
    w.close()


def test_runs_ls_counts_intact_commits_as_snapshots_ls_does(tmp_path, capsys):
    url = tmp_path.as_uri()
    w = _new(url, "r", session="cnt00001")
    view = memoryview(torch.zeros(w.layout.D).numpy()).cast("B")
    for seq in range(3):
        meta = w.shard_meta(seq, rank=0, world_size=1, session="cnt00001", view=view, step=seq, epoch=seq)
        w.put_shard(meta, view)
        w.commit(seq, [meta])
    w.close()
    (tmp_path / "r" / "snapshots" / "00000001" / "COMMIT.json").write_bytes(b"")  # a client died mid-PUT
    (tmp_path / "r" / "snapshots" / "00000003").mkdir()
    (tmp_path / "r" / "snapshots" / "00000003" / "COMMIT.json").write_text("{")
    assert main(["snapshots", "ls", "--json", f"{url}/r"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["seq"] for r in listed if "damaged" not in r] == [0, 2]
    assert main(["runs", "ls", "--json", url]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert (row["snapshots"], row["damaged_snapshots"]) == (2, 2)


_RECORDS = [
    store.CheckpointCommit(tag="epoch1", files=(store.CheckpointFile(name="a.pt", bytes=3, sha256="ab" * 32),),
                           committed_at=1.0),
    store.CheckpointNode(tag="epoch1", node=0, files=(store.CheckpointFile(name="a.pt", bytes=3, sha256="ab" * 32),)),
    store.TrainMetrics(run_id="r", epochs=(store.EpochRow(epoch=1, train_loss=2.0, val_loss=1.5, val_accuracy=0.5,
                                                          lr=0.1, seconds=3.0),), final={"epochs": 1}),
    store.ProbeLog(run_id="r", probes=({"probe": 0, "last_seq": 4, "twa_accuracy": None},)),
    store.DatasetIndex(classes=("a", "b"), image_size=32, splits={"train": store.DatasetSplit(samples=1, shards=(
        store.DatasetShard(name="train-00000.tar", samples=1, bytes=1024, sha256="cd" * 32, offsets=(512,),
                           sizes=(10,), labels=(1,), crc32=(7,), keys=("train00000000",)),))}),
]


@pytest.mark.parametrize("rec", _RECORDS, ids=lambda r: type(r).__name__)
def test_every_new_record_round_trips_and_fails_in_one_line_naming_the_object(rec):
    raw = rec.to_json()
    assert type(rec).from_json(raw, "x") == rec
    body = json.loads(raw)
    assert body["format"] == f"twa_scale.{rec.KIND}/2" and "json_sha256" in body
    field = next(k for k in sorted(body) if k not in ("format", "json_sha256"))
    altered = json.dumps({**body, field: None}).encode()
    missing = json.dumps(store.format.seal({k: v for k, v in body.items() if k not in (field, "json_sha256")})).encode()
    for bad, why in ((b"", "is empty"), (raw[:len(raw) // 2], "not valid JSON"), (altered, "fails its own checksum"),
                     (missing, f"has no field {field!r}")):
        if why.startswith("has no field") and field in type(rec).OPTIONAL:
            continue
        with pytest.raises(FormatError, match="s3://b/p/obj.json") as e:
            type(rec).from_json(bad, "s3://b/p/obj.json")
        assert why in str(e.value) and "\n" not in str(e.value)


def test_records_refuse_what_would_escape_their_prefix_or_disagree():
    with pytest.raises(FormatError, match="not a plain file name"):
        store.CheckpointCommit.from_json(json.dumps({"tag": "t", "files": ["../../etc/passwd"]}), "c")
    with pytest.raises(FormatError, match="per-sample lists"):
        store.DatasetShard.from_json(json.dumps({"name": "s.tar", "samples": 2, "bytes": 1, "sha256": "x",
                                                 "offsets": [0], "sizes": [1], "labels": [0], "crc32": [0],
                                                 "keys": ["k"]}), "s.tar.json")
    with pytest.raises(FormatError, match="integer last_seq"):
        store.ProbeLog.from_json(json.dumps([{"probe": 0}]), "probes.json")
    with pytest.raises(TypeError):
        store.EpochRow.from_row({"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5, "lr": 0.1,
                                 "seconds": 1.0, "new_field": 3})  # never silently dropped
