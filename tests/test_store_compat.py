"""Runs written by the first store format (twa_scale.*/1, commit 31b20c8) still read, bit-identically.

The fixture is a real run of the old code (see tests/fixtures/store_v1/make.py): `mlp` on digits,
2 gloo ranks, bfloat16, 2 snapshots; and a tiny float32 run with 3 writer ranks plus one
snapshot from the old streamer. expected.json holds the sha256 of what the old reader returned.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from twa_scale import store
from twa_scale.models import build_model

FIXTURE = Path(__file__).parent / "fixtures" / "store_v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture
def old_runs(tmp_path) -> str:
    """A copy of the fixture (readers must never need to write, but a bug must not touch the repo)."""
    dst = tmp_path / "runs"
    shutil.copytree(FIXTURE, dst, ignore=shutil.ignore_patterns("*.py", "expected.json"))
    return dst.as_uri()


@pytest.mark.parametrize("run_id", sorted(EXPECTED))
def test_old_format_reads_bit_identically(old_runs, run_id):
    exp = EXPECTED[run_id]
    r = store.open_run(old_runs, run_id)
    assert [[i.seq, i.step, i.epoch, i.nbytes] for i in r.snapshots()] == exp["snapshots"]
    for key, digest in exp["reads"].items():
        seq, a, b = map(int, key.split(":"))
        assert _sha(r.read(seq, a, b)) == digest, key
    for seq, tensors in exp["state_dict"].items():
        sd = r.state_dict(int(seq), build_model("mlp", 10))
        assert {k: _sha(v.float()) for k, v in sd.items() if k in tensors} == tensors
    assert r.verify() == []


# --- what the code before issue 19's records wrote (tests/fixtures/store_today/make.md) --------------------------
TODAY = Path(__file__).parent / "fixtures" / "store_today"


@pytest.fixture
def today(tmp_path) -> Path:
    dst = tmp_path / "today"
    shutil.copytree(TODAY, dst, ignore=shutil.ignore_patterns("*.md"))
    return dst


def test_metrics_and_probes_of_todays_code_read_as_records(today):
    run = today / "runs" / "today-mlp"
    m = store.TrainMetrics.from_json((run / "train" / "metrics.json").read_bytes(), "metrics.json")
    row = store.EpochRow.from_json((run / "train" / "epochs" / "000001.json").read_bytes(), "000001.json")
    assert m.run_id == "today-mlp" and m.epochs == (row,) and row.epoch == 1 and m.final["epochs"] == 1
    assert 0 < row.val_accuracy < 1 and row.epoch_fraction is None
    old = store.TrainMetrics.from_json((FIXTURE / "mlp-digits-bf16" / "train" / "metrics.json").read_bytes(), "v1")
    assert old.run_id == "mlp-digits-bf16" and [r.epoch for r in old.epochs] == [1] and old.final is not None
    probes = store.ProbeLog.from_json((run / "twa" / "probes.json").read_bytes(), "probes.json")  # a bare list
    assert [p["last_seq"] for p in probes.probes] == [1] and probes.run_id is None


def test_dataset_index_of_todays_code_reads_and_trains(today):
    from twa_scale.data import shards
    from twa_scale.data.config import DataConfig
    from twa_scale.data.datasets import build_data, make_loader

    url = (today / "dataset").as_uri()
    idx = shards.open_index(url)
    assert idx.classes == ("cat", "dog") and idx.split("train").samples == 6 and idx.image_size == 8
    assert shards.verify(url) == []
    data = build_data(DataConfig(data=url, holdout_fraction=0.0))
    x, y = next(iter(make_loader(data.train, batch_size=6, train=False)))
    assert x.shape[0] == 6 and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
