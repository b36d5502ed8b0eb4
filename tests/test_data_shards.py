"""Unit + S3 tiers: packed datasets (WebDataset shards + index), deterministic batch plans, fast decode,
bad input. Small trees built from the shared CIFAR-10 (symlinks; nothing copied into the repo)."""
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import require_cifar10
from twa_scale.data import shards
from twa_scale.data.config import DataConfig
from twa_scale.data.datasets import build_data, make_loader
from twa_scale.errors import ConfigError
from twa_scale.store.format import DatasetIndex


def _tree(dst: Path, per_class: int, per_class_val: int, classes: int = 10) -> Path:
    src = require_cifar10()
    for split, n in (("train", per_class), ("test", per_class_val)):
        for c in sorted(os.listdir(src / split))[:classes]:
            (dst / split / c).mkdir(parents=True)
            for f in sorted(os.listdir(src / split / c))[:n]:
                (dst / split / c / f).symlink_to(src / split / c / f)
    return dst


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return _tree(tmp_path_factory.mktemp("c10") / "c10", 24, 6)


@pytest.fixture(scope="module")
def packed(tree, tmp_path_factory):
    url = f"file://{tmp_path_factory.mktemp('packed')}/c10"
    shards.pack(str(tree), url, shard_bytes=64 << 10, progress=False)
    return url


def _first_labels(spec, workers, seed=3, **kw):
    data = build_data(DataConfig(data=spec, **kw))
    return next(iter(make_loader(data.train, batch_size=16, train=True, epoch=1, num_workers=workers, seed=seed)))[1]


def test_pack_writes_webdataset_shards_and_index(packed, tree):
    import webdataset as wds

    idx = shards.open_index(packed)
    assert list(idx.classes) == sorted(os.listdir(tree / "train")) and idx.image_size == 32
    assert idx.split("train").samples == 240 and idx.split("val").samples == 60  # test/ serves as val
    train = idx.split("train").shards
    assert len(train) > 2 and sum(r.samples for r in train) == 240
    # a plain WebDataset reader sees the same samples and labels
    root = packed[len("file://"):]
    got = [(s["__key__"], int(s["cls"])) for s in wds.WebDataset(f"{root}/{train[0].name}", shardshuffle=False)]
    assert got == list(zip(train[0].keys, train[0].labels))
    assert shards.verify(packed) == []


def test_pack_is_resumable_and_repairs(packed, tree, monkeypatch):
    root = Path(packed[len("file://"):])
    name = shards.open_index(packed).split("train").shards[1].name
    data = bytearray((root / name).read_bytes())
    data[700:710] = b"X" * 10
    (root / name).write_bytes(bytes(data))
    problems = shards.verify(packed)
    assert len(problems) == 1 and name in problems[0] and "sha256" in problems[0]
    written = []
    real = shards._write_shard
    monkeypatch.setattr(shards, "_write_shard", lambda st, n, *a: written.append(n) or real(st, n, *a))
    shards.pack(str(tree), packed, shard_bytes=64 << 10, progress=False)
    assert written == [name]  # every other shard was verified and kept
    assert shards.verify(packed) == []


def test_one_scan_and_same_views_for_folder_and_packed(tree, packed):
    a = build_data(DataConfig(data=str(tree), holdout_fraction=0.1))
    b = build_data(DataConfig(data=packed, holdout_fraction=0.1))
    for d in (a, b):
        assert (len(d.train), len(d.holdout), len(d.val), d.num_classes, d.image_size) == (216, 24, 60, 10, 32)
        assert d.train.source is d.holdout.source is d.train_eval.source  # one scan / one index, shared
        x, y = d.train[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    counts = [np.bincount(d.val.source.labels, minlength=10).tolist() for d in (a, b)]
    assert counts[0] == counts[1] == [6] * 10


@pytest.mark.parametrize("kind", ["folder", "packed"])
def test_first_batch_labels_same_with_1_and_2_workers(kind, tree, packed):
    spec = str(tree) if kind == "folder" else packed
    one, two = _first_labels(spec, 1), _first_labels(spec, 2)
    assert torch.equal(one, two)
    assert not torch.equal(one, _first_labels(spec, 1, seed=1))


def test_batches_equal_per_rank_disjoint_and_resumable(packed, monkeypatch):
    data = build_data(DataConfig(data=packed))
    per_rank = []
    for r in range(3):
        monkeypatch.setattr("twa_scale.comm.rank", lambda r=r: r)
        monkeypatch.setattr("twa_scale.comm.world_size", lambda: 3)
        loader = make_loader(data.train, batch_size=16, train=True, seed=0, epoch=2)
        per_rank.append([b for b in loader])
        # mid-epoch start at batch 2: exactly the batches an uninterrupted epoch has from there on
        tail = list(make_loader(data.train, batch_size=16, train=True, seed=0, epoch=2, start_batch=2))
        assert len(tail) == len(per_rank[-1]) - 2
        for (x1, y1), (x2, y2) in zip(tail, per_rank[-1][2:]):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
        ev = make_loader(data.val, batch_size=16, train=False)
        assert sum(len(y) for _, y in ev) in (20,)  # 60 val images over 3 ranks, unpadded
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == 240 // 3 // 16


def _imagenet_tree(root: Path, n: int) -> Path:
    """ImageNet-sized JPEGs (CIFAR upscaled to 500x375, quality 90), as bench/data_throughput.py makes them."""
    from PIL import Image

    src = require_cifar10() / "train"
    classes = sorted(os.listdir(src))[:4]
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for f in sorted(os.listdir(src / c))[:n]:
                with Image.open(src / c / f) as im:
                    im.convert("RGB").resize((500, 375), Image.BICUBIC).save(root / split / c / f, quality=90)
    return root


@pytest.mark.parametrize("size", ["imagenet", "cifar"])
def test_fast_decode_matches_pil_distribution(size, tmp_path, tree):
    root = _imagenet_tree(tmp_path / "inet", 8) if size == "imagenet" else tree
    out = 224 if size == "imagenet" else 32
    for train in (True, False):
        stats = {}
        for decode in ("cpu", "pil"):
            data = build_data(DataConfig(data=str(root), decode=decode))
            ds = data.train if train else data.train_eval
            torch.manual_seed(0)
            xs = torch.stack([ds[i][0] for i in range(0, len(ds), max(1, len(ds) // 32))])
            assert xs.shape[1:] == (3, out, out) and xs.dtype == torch.float32
            stats[decode] = xs
        fast, ref = stats["cpu"], stats["pil"]
        assert fast.min() >= ref.min() - 0.05 and fast.max() <= ref.max() + 0.05
        per_channel = (fast.mean((0, 2, 3)) - ref.mean((0, 2, 3))).abs().max().item()
        assert per_channel < (0.15 if train else 0.03), (train, per_channel)
        assert abs(fast.std().item() - ref.std().item()) < (0.1 if train else 0.03)
        if not train:  # eval is deterministic: the two decoders agree image by image
            assert (fast - ref).abs().mean().item() < 0.05


def test_bad_images_skipped_counted_and_bounded(tmp_path, monkeypatch):
    root = _tree(tmp_path / "bad", 8, 2)
    first = sorted((root / "train" / "airplane").iterdir())[0]
    first.unlink()
    first.write_bytes(b"")  # zero-byte JPEG, first file of the tree
    mid = sorted((root / "train" / "dog").iterdir())[3]
    mid.unlink()
    mid.write_bytes(b"\xff\xd8garbage")
    counted = []
    monkeypatch.setattr("twa_scale.metrics.data_bad_images", lambda n=1: counted.append(n))
    url = f"file://{tmp_path}/packed"
    shards.pack(str(root), url, progress=False)
    for spec in (str(root), url):
        counted.clear()
        data = build_data(DataConfig(data=spec, max_bad_fraction=0.05))
        assert data.image_size == 32  # the zero-byte first file is not where the size comes from
        loader = make_loader(data.train, batch_size=8, train=True)
        seen = sum(len(y) for _, y in loader)
        assert seen == 80 - 2 and sum(counted) == 2
        strict = build_data(DataConfig(data=spec, max_bad_fraction=0.0))
        with pytest.raises(ConfigError, match="undecodable") as e:
            list(make_loader(strict.train, batch_size=8, train=True))
        assert "\n" not in str(e.value)


def test_bad_specs_are_one_line_errors(tmp_path, packed):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        build_data(DataConfig(data=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="no filesystem for scheme 'nosuch'"):
        DataConfig(data="nosuch://bucket/c10")
    with pytest.raises(ConfigError, match="no index.json"):
        build_data(DataConfig(data=f"file://{tmp_path}/nothing"))
    root = Path(packed[len("file://"):])
    (root / "index.json").rename(root / "index.bak")
    (root / "index.json").write_text(json.dumps({"format": "other"}))
    try:
        with pytest.raises(ConfigError, match="index.json is not a twa_scale dataset_index record"):
            build_data(DataConfig(data=packed))
    finally:
        (root / "index.bak").replace(root / "index.json")
    victim = shards.open_index(packed).split("val").shards[0].name
    (root / victim).rename(root / "moved")
    try:
        with pytest.raises(ConfigError, match=f"shard .*{victim} is missing"):
            build_data(DataConfig(data=packed))
    finally:
        (root / "moved").replace(root / victim)


@pytest.mark.s3
def test_packed_on_s3_reads_like_local(tree, packed, s3_url):
    url = s3_url + "/c10"
    shards.pack(str(tree), url, shard_bytes=64 << 10, progress=False)
    assert shards.verify(url) == []
    s3, local = (build_data(DataConfig(data=u)) for u in (url, packed))
    for a, b in zip(make_loader(s3.train, batch_size=16, train=True, seed=1, num_workers=1),
                    make_loader(local.train, batch_size=16, train=True, seed=1)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    import s3fs

    fs = s3fs.S3FileSystem()
    victim = shards.open_index(url).split("train").shards[0].name
    fs.rm(f"{url[5:]}/{victim}")
    with pytest.raises(ConfigError, match=f"{victim} is missing"):
        build_data(DataConfig(data=url))


@pytest.mark.s3
@pytest.mark.multirank
def test_two_ranks_train_from_packed_s3(tmp_path, s3_url, s3_server):
    """`twa-scale data pack` to SeaweedFS, then `deepspeed --num_gpus 2 launch/train.py --data s3://...`: the
    endpoint and credentials come from --storage-options alone (no AWS_* variable in the jobs' environment)."""
    from tests.support.launch import deepspeed, python

    tree = _tree(tmp_path / "c10", 100, 20)
    url = s3_url + "/c10"
    env = s3_server.env
    opts = json.dumps({"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"],
                       "endpoint_url": env["AWS_ENDPOINT_URL"], "client_kwargs": {"region_name": "us-east-1"}})
    no_aws = [k for k in os.environ if k.startswith("AWS_")]
    python("-m", ["twa_scale.cli", "data", "pack", str(tree), url, "--shard-size", "256KB", "--quiet",
                  "--storage-options", opts], unset_env=no_aws)
    verify = python("-m", ["twa_scale.cli", "data", "verify", url, "--storage-options", opts], unset_env=no_aws)
    assert "every shard matches its sha256" in verify.stdout
    deepspeed("launch/train.py", ["--data", url, "--model", "resnet20", "--epochs", "2", "--no-twa",
                                  "--batch-size", "64", "--lr", "0.05", "--num-workers", "1",
                                  "--snapshot-url", f"file://{tmp_path}/snap", "--run-id", "s3data",
                                  "--storage-options", opts, "--checkpoint-dir", str(tmp_path / "ckpt")],
              ranks=2, unset_env=no_aws)
    m = json.loads((tmp_path / "snap" / "s3data" / "train" / "metrics.json").read_text())
    e1, e2 = m["epochs"]
    assert m["final"]["world_size"] == 2
    assert e2["train_loss"] < e1["train_loss"] and m["final"]["val_accuracy"] > 0.15, m["epochs"]


def test_twa_refuses_a_dataset_whose_classes_differ_from_the_model(tmp_path):
    from tests.support.twa import digits_config, make_trajectory, write_run
    from twa_scale.twa import TwaConfig
    from twa_scale.twa.stage import load_inputs

    url = f"file://{tmp_path}/c3"
    shards.pack(str(_tree(tmp_path / "tree", 4, 2, classes=3)), url, progress=False)
    cfg = digits_config()
    model, snaps = make_trajectory(cfg, 2, steps_between=1)
    write_run(f"file://{tmp_path}/runs", "r", model, snaps, cfg=cfg, writer_world=1)
    with pytest.raises(ConfigError, match="3 classes do not match the 10 classes"):
        load_inputs(TwaConfig(snapshot_url=f"file://{tmp_path}/runs", run_id="r", data=url))


def test_index_dataclasses_round_trip(packed):
    idx = shards.open_index(packed)
    again = DatasetIndex.from_json(idx.to_json(), "index.json")
    assert again.url == "" and dataclasses.replace(again, url=idx.url) == idx
    assert shards.parse_size("256MiB") == 256 << 20 and shards.parse_size("256MB") == 256_000_000
    assert shards.parse_size("1.5GiB") == 3 << 29 and shards.parse_size("64KiB") == 65536 == shards.parse_size("65536")
    with pytest.raises(ConfigError):
        shards.parse_size("lots")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decode_matches_cpu_decode(tmp_path):
    """--decode gpu: nvJPEG batches decoded and augmented on the device, same recipe as the CPU path."""
    root = _imagenet_tree(tmp_path / "inet", 8)
    url = f"file://{tmp_path}/packed"
    shards.pack(str(root), url, progress=False)
    dev = torch.device("cuda")
    got = {}
    for decode in ("gpu", "cpu"):
        data = build_data(DataConfig(data=url, decode=decode))
        for train, ds in ((True, data.train), (False, data.val)):
            batches = list(make_loader(ds, batch_size=8, train=train, seed=0, device=dev, num_workers=1))
            x = torch.cat([b[0] for b in batches])
            assert x.device.type == "cuda" and x.dtype == torch.float32 and x.shape[1:] == (3, 224, 224)
            got[decode, train] = (x.float().cpu(), torch.cat([b[1] for b in batches]).cpu())
    for train in (True, False):
        (g, gy), (c, cy) = got["gpu", train], got["cpu", train]
        assert torch.equal(gy, cy)  # same plan, same labels
        # same crop boxes and flips; nvJPEG and libjpeg-turbo differ by a few grey levels (and the CPU
        # path may decode at reduced DCT scale), so compare statistics and the per-image error
        assert (g.mean((0, 2, 3)) - c.mean((0, 2, 3))).abs().max().item() < 0.05
        assert (g - c).abs().mean().item() < (0.15 if train else 0.05)
