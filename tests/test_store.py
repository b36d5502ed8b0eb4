"""Store contract suite: the same tests on memory://, file:// and real S3 (SeaweedFS)."""
from __future__ import annotations

import json
import uuid

import fsspec.core
import pytest
import torch
from torch import nn

from tests.support import free_port
from twa_scale import store
from twa_scale.layout import FlatLayout
from twa_scale.models import build_model

CHUNK = 4096  # small checksum chunks, so small vectors span many of them


def _model(seed: int = 0, width: int = 40) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 10))


def _write(writer: store.RunWriter, seq: int, vec: torch.Tensor, world: int, *, step: int = 0,
           epoch: int = 0, commit: bool = True, session: str | None = None) -> list[dict]:
    """Write ``vec`` as ``world`` writer shards of snapshot ``seq`` (what each streamer rank does)."""
    session = session or uuid.uuid4().hex[:8]
    dtype = store.DTYPES[writer.dtype]
    metas = []
    for r, (a, b) in enumerate(writer.layout.slices(world)):
        view = memoryview(vec[a:b].to(dtype).contiguous().view(torch.uint8).numpy())
        meta = writer.shard_meta(seq, rank=r, world_size=world, session=session, view=view, step=step,
                                 epoch=epoch, chunk_bytes=CHUNK)
        writer.put_shard(meta, view)
        metas.append(meta)
    if commit:
        writer.commit(seq, metas)
    return metas


def _run(url, model=None, world=2, dtype="float32"):
    model = model or _model()
    layout = FlatLayout.from_model(model)
    w = store.create_run(url, "run1", layout, meta={"model": "tiny", "data": "none"}, world_size=world, dtype=dtype)
    return model, layout, w


def _object(url: str, seq: int, rank: int = 0) -> str:
    fs, root = fsspec.core.url_to_fs(url)
    return [p for p in fs.find(f"{root}/run1/snapshots/{seq:08d}") if p.endswith(".bin")][rank]


def test_manifest_round_trip_and_idempotent_create(store_url):
    model, layout, w = _run(store_url)
    r = store.open_run(store_url, "run1")
    assert r.manifest.fingerprint == layout.fingerprint
    assert r.manifest.meta == {"model": "tiny", "data": "none"}
    assert r.manifest.world_size == 2 and r.manifest.dtype == "float32"
    assert r.layout.D == layout.D and r.snapshots() == []
    again = store.create_run(store_url, "run1", layout, meta={"model": "tiny"}, world_size=4)
    assert again.manifest.created_at == w.manifest.created_at  # kept, not rewritten


def test_create_with_another_model_names_both_fingerprints(store_url):
    _, layout, _ = _run(store_url)
    other = FlatLayout.from_model(_model(width=41))
    with pytest.raises(ValueError, match=f"{layout.fingerprint}.*{other.fingerprint}"):
        store.create_run(store_url, "run1", other, meta={}, world_size=1)
    assert store.open_run(store_url, "run1").manifest.fingerprint == layout.fingerprint


def test_world_size_larger_than_D_is_rejected(store_url):
    layout = FlatLayout.from_model(nn.Linear(2, 1))
    with pytest.raises(ValueError, match="larger than the number of parameters D=3"):
        store.create_run(store_url, "tiny", layout, meta={}, world_size=4)


def test_only_committed_snapshots_are_listed(store_url):
    model, layout, w = _run(store_url)
    vec = torch.randn(layout.D)
    _write(w, 0, vec, 2, step=10, epoch=1)
    _write(w, 1, vec + 1, 2, step=20, epoch=2, commit=False)  # shards but no marker: invisible
    _write(w, 2, vec + 2, 2, step=30, epoch=3)
    r = store.open_run(store_url, "run1")
    assert r.snapshots() == [store.SnapshotInfo(0, 10, 1, 4 * layout.D), store.SnapshotInfo(2, 30, 3, 4 * layout.D)]
    assert [i.epoch_fraction for i in r.snapshots()] == [None, None]
    with pytest.raises(KeyError, match="seq 1 .* not committed"):
        r.read(1)
    assert r.verify() == []


@pytest.mark.parametrize("writers", [1, 2, 3])
def test_reads_reshard_any_range_for_any_reader_world(store_url, writers):
    _, layout, w = _run(store_url, world=writers)
    vec = torch.randn(layout.D)
    _write(w, 5, vec, writers)
    r = store.open_run(store_url, "run1")
    assert torch.equal(r.read(5), vec)
    for readers in (1, 3, 4):
        parts = [r.read(5, a, b) for a, b in layout.slices(readers)]
        assert torch.equal(torch.cat(parts), vec)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        a, b = sorted(torch.randint(0, layout.D + 1, (2,), generator=g).tolist())
        assert torch.equal(r.read(5, a, b), vec[a:b])
    assert r.read(5, 7, 7).numel() == 0


def test_reduced_precision_dtypes(store_url):
    for dtype in ("bfloat16", "float16"):
        model = _model()
        layout = FlatLayout.from_model(model)
        w = store.create_run(store_url, f"run-{dtype}", layout, meta={}, world_size=2, dtype=dtype)
        vec = torch.randn(layout.D)
        _write(w, 0, vec, 2)
        r = store.open_run(store_url, f"run-{dtype}")
        got = r.read(0, 3, layout.D - 5)
        assert got.dtype == torch.float32
        assert torch.equal(got, vec.to(store.DTYPES[dtype]).float()[3: layout.D - 5])
        assert r.snapshots()[0].nbytes == 2 * layout.D


def test_state_dict_loads_and_other_model_is_refused(store_url):
    model, layout, w = _run(store_url)
    trained = _model(seed=7)
    vec = layout.gather(layout.trainable(trained), 0, layout.D)
    _write(w, 0, vec, 2)
    r = store.open_run(store_url, "run1")
    fresh = _model(seed=1)
    fresh.load_state_dict(r.state_dict(0, fresh), strict=True)
    for (n, p), q in zip(fresh.named_parameters(), trained.parameters()):
        assert torch.equal(p, q), n
    other = _model(width=41)
    with pytest.raises(ValueError, match=f"{layout.fingerprint}.*{FlatLayout.from_model(other).fingerprint}"):
        r.state_dict(0, other)


def test_flipped_byte_fails_read_and_verify_naming_the_object(store_url):
    _, layout, w = _run(store_url)
    vec = torch.randn(layout.D)
    _write(w, 0, vec, 2)
    _write(w, 1, vec, 2)
    path = _object(store_url, 1, rank=1)
    fs, _ = fsspec.core.url_to_fs(store_url)
    blob = bytearray(fs.cat_file(path))
    blob[CHUNK + 5] ^= 0x40  # second chunk of rank 1's shard
    fs.pipe_file(path, bytes(blob))
    r = store.open_run(store_url, "run1")
    name = fs.unstrip_protocol(path)
    start1 = layout.slices(2)[1][0]
    with pytest.raises(store.CorruptSnapshotError, match="checksum mismatch in chunk 1") as err:
        r.read(1)
    assert name in str(err.value)
    # a range that touches only intact chunks still reads
    assert torch.equal(r.read(1, start1, start1 + CHUNK // 4), vec[start1: start1 + CHUNK // 4])
    problems = r.verify()
    assert len(problems) == 1 and name in problems[0]
    assert torch.equal(r.read(0), vec)  # the other snapshot is untouched


def test_truncated_object_fails_read_and_verify_naming_it(store_url):
    _, layout, w = _run(store_url)
    vec = torch.randn(layout.D)
    _write(w, 0, vec, 2)
    path = _object(store_url, 0, rank=0)
    fs, _ = fsspec.core.url_to_fs(store_url)
    fs.pipe_file(path, fs.cat_file(path)[:-10])
    r = store.open_run(store_url, "run1")
    name = fs.unstrip_protocol(path)
    with pytest.raises(store.CorruptSnapshotError, match="truncated") as err:
        r.read(0)
    assert name in str(err.value)
    problems = r.verify()
    assert len(problems) == 1 and name in problems[0] and "truncated" in problems[0]


def test_missing_object_fails_naming_it(store_url):
    _, layout, w = _run(store_url)
    _write(w, 0, torch.randn(layout.D), 2)
    path = _object(store_url, 0, rank=1)
    fs, _ = fsspec.core.url_to_fs(store_url)
    fs.rm_file(path)
    r = store.open_run(store_url, "run1")
    with pytest.raises(store.CorruptSnapshotError, match="missing") as err:
        r.read(0)
    assert fs.unstrip_protocol(path) in str(err.value)
    assert any(fs.unstrip_protocol(path) in p for p in r.verify())


def test_bad_read_ranges_and_unknown_run(store_url):
    _, layout, w = _run(store_url)
    _write(w, 0, torch.randn(layout.D), 2)
    r = store.open_run(store_url, "run1")
    for a, b in [(-1, 5), (5, 4), (0, layout.D + 1)]:
        with pytest.raises(ValueError, match=f"start={a}, stop={b}"):
            r.read(0, a, b)
    with pytest.raises(FileNotFoundError, match="run.json"):
        store.open_run(store_url, "nope")


def test_commit_refuses_shards_that_do_not_tile(store_url):
    _, layout, w = _run(store_url)
    metas = _write(w, 0, torch.randn(layout.D), 3, commit=False)
    with pytest.raises(ValueError, match="do not tile"):
        w.commit(0, metas[:2])
    assert store.open_run(store_url, "run1").snapshots() == []


def test_json_helpers(store_url):
    url = f"{store_url}/x/metrics.json"
    assert store.read_json(url, default={}) == {}
    store.write_json(url, {"a": [1, 2]})
    assert store.read_json(url) == {"a": [1, 2]}


def test_unwritable_file_url_fails_clearly(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    url = (blocker / "store").as_uri()
    with pytest.raises(OSError, match=f"snapshot store {url} is not reachable or not writable"):
        store.create_run(url, "run1", FlatLayout.from_model(_model()), meta={}, world_size=1)


def test_bad_run_id_and_dtype():
    layout = FlatLayout.from_model(_model())
    with pytest.raises(ValueError, match="run id"):
        store.create_run("memory://x", "a/b", layout, meta={}, world_size=1)
    with pytest.raises(ValueError, match="float64"):
        store.create_run("memory://x", "r", layout, meta={}, world_size=1, dtype="float64")


@pytest.mark.s3
def test_missing_bucket_is_created(s3_server):
    bucket = f"twa-new-{uuid.uuid4().hex[:8]}"
    layout = FlatLayout.from_model(_model())
    w = store.create_run(f"s3://{bucket}/p", "run1", layout, meta={}, world_size=1)
    _write(w, 0, torch.ones(layout.D), 1)
    assert torch.equal(store.open_run(f"s3://{bucket}/p", "run1").read(0), torch.ones(layout.D))


@pytest.mark.s3
def test_unreachable_endpoint_fails_before_training(s3_server, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(OSError, match=r"s3://twa-test/x is not reachable "
                                          r"\(endpoint http://127.0.0.1:\d+, bucket twa-test\)"):
            store.create_run("s3://twa-test/x", "run1", FlatLayout.from_model(_model()), meta={}, world_size=1)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_resnet_state_dict_round_trip_file(tmp_path):
    """A real model through the store: snapshot -> state_dict -> identical parameters."""
    model = build_model("resnet20", 10)
    layout = FlatLayout.from_model(model)
    url = tmp_path.as_uri()
    w = store.create_run(url, "r", layout, meta={"model": "resnet20"}, world_size=3)
    _write(w, 0, layout.gather(layout.trainable(model), 0, layout.D), 3)
    fresh = build_model("resnet20", 10)
    fresh.load_state_dict(store.open_run(url, "r").state_dict(0, fresh))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    assert manifest["model"] == "resnet20" and manifest["D"] == layout.D


def test_object_store_contract_listing(store_url):
    """The listing methods every caller uses (snapshots, checkpoints, datasets, runs ls), on every backend."""
    from twa_scale.store import ObjectStore

    st = store.open_store(store_url)
    assert isinstance(st, ObjectStore)
    st.check_writable()
    st.put_small("a/COMMIT.json", b"{}")
    st.put_large("a/files/x.bin", memoryview(b"x" * 1000))
    st.put_small("b/y.json", b"[1]")
    assert st.sizes("") == {"a/COMMIT.json": 2, "a/files/x.bin": 1000, "b/y.json": 3}
    assert sorted(st.find("a")) == ["a/COMMIT.json", "a/files/x.bin"] and st.sizes("nothing") == {}
    assert st.list_dirs("") == ["a", "b"] and st.list_dirs("a") == ["files"]
    st.delete("a/files/x.bin")
    st.delete("a/files/x.bin")  # absent: no error
    assert not st.exists("a/files/x.bin") and st.exists("b/y.json")
    with pytest.raises(TypeError):
        ObjectStore()  # an abstract base: a backend implements every method
