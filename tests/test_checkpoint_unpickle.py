"""Nothing from the store runs code (issue 20): a checkpoint planted in the store whose pickle would run a
command when loaded is refused by --resume in one line naming the object, and the command never runs.

The attacker here can write the bucket, so the planted file comes with a COMMIT.json whose sizes and
checksums match it: the integrity checks pass and only the weights-only load stands in the way."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys

import pytest
import torch

from tests.support.launch import run
from twa_scale.store import CheckpointCommit, open_store

ARGS = ["--data", "digits", "--model", "mlp", "--epochs", "1", "--no-twa", "--seed", "0", "--limit-train", "256",
        "--batch-size", "64"]


class _Evil:
    """Unpickling this calls os.system (what a planted checkpoint would do with torch.load(weights_only=False))."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.e2e
def test_a_planted_pickle_is_refused_by_resume_and_never_runs(tmp_path):
    snap, ckpt_url = f"file://{tmp_path}/snap", f"file://{tmp_path}/snap/r/checkpoints"
    args = [*ARGS, "--snapshot-url", snap, "--run-id", "r", "--checkpoint-dir", str(tmp_path / "ckpt")]
    run([sys.executable, "launch/train.py", *args])
    store = open_store(ckpt_url)
    commit = CheckpointCommit.from_json(store.get("epoch1/COMMIT.json"), "COMMIT.json")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"module": _Evil(str(marker))}, evil)
    data = evil.read_bytes()
    name = "mp_rank_00_model_states.pt"
    store.put_small(f"epoch1/{name}", data)
    files = tuple(f if f.name != name else type(f)(name=name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
                  for f in commit.files)
    store.put_small("epoch1/COMMIT.json", type(commit)(tag=commit.tag, files=files).to_json())
    shutil.rmtree(tmp_path / "ckpt")  # the next pod starts with an empty disk and downloads the tag
    proc = run([sys.executable, "launch/train.py", *args, "--resume"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --resume: checkpoint ") and f"{ckpt_url}/epoch1/{name}" in last, last
    assert "refused: not only tensors and plain containers" in last and "Traceback" not in proc.stderr
    assert not marker.exists(), "the planted pickle ran a command"
