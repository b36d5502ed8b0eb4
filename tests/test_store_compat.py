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
