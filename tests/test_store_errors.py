"""Bad store input at launch: one line naming the thing at fault, exit 2, nothing trained or written."""
from __future__ import annotations

import uuid

import pytest

from tests.support import REPO
from tests.support.launch import python
from twa_scale import store
from twa_scale.layout import FlatLayout
from twa_scale.models import build_model

TRAIN = str(REPO / "launch" / "train.py")


def _one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.e2e
@pytest.mark.parametrize("url, needle", [("s3://", "names no bucket"), ("s3:/bucket/typo", "followed by '://'")])
def test_malformed_snapshot_url_is_refused(tmp_path, url, needle):
    proc = python(TRAIN, ["--model", "mlp", "--epochs", "1", "--no-twa", "--snapshot-url", url,
                                      "--checkpoint-dir", str(tmp_path / "c")], check=False, cwd=tmp_path)
    assert needle in _one_error_line(proc)
    assert not any(tmp_path.glob("s3*")), "nothing may be written to a local directory named after the URL"


def _run_with_mlp(url: str) -> FlatLayout:
    model = build_model("mlp", 10)
    layout = FlatLayout.from_model(model)
    w = store.create_run(url, "src", layout, meta={"model": "mlp", "num_classes": 10}, world_size=1)
    vec = layout.gather(layout.trainable(model), 0, layout.D)
    view = memoryview(vec.contiguous().numpy()).cast("B")
    meta = w.shard_meta(0, rank=0, world_size=1, session=uuid.uuid4().hex[:12], view=view, step=0, epoch=0)
    w.put_shard(meta, view)
    w.commit(0, [meta])
    return layout


@pytest.mark.e2e
@pytest.mark.parametrize("damage, needle", [
    ("flip", "checksum mismatch"),
    ("empty-marker", "not committed"),
    ("bad-dtype", "COMMIT.json"),
])
def test_init_from_a_damaged_snapshot_is_one_line(tmp_path, damage, needle):
    url = (tmp_path / "snap").as_uri()
    _run_with_mlp(url)
    seq_dir = tmp_path / "snap" / "src" / "snapshots" / "00000000"
    if damage == "flip":
        shard = next(seq_dir.glob("*.bin"))
        blob = bytearray(shard.read_bytes())
        blob[10] ^= 0xFF
        shard.write_bytes(bytes(blob))
    elif damage == "empty-marker":
        (seq_dir / "COMMIT.json").write_bytes(b"")
    else:
        marker = seq_dir / "COMMIT.json"
        marker.write_text(marker.read_text().replace('"float32"', '"float64"'))
    proc = python(TRAIN, ["--model", "mlp", "--epochs", "0", "--no-twa", "--snapshot-url", url,
                                      "--run-id", "dst", "--init-from", f"{url}/src@0",
                                      "--checkpoint-dir", str(tmp_path / "c")], check=False, cwd=tmp_path)
    line = _one_error_line(proc)
    assert needle in line and "src" in line, line
    assert not (tmp_path / "snap" / "dst").exists()


def test_select_negative_start_is_accepted():
    from twa_scale.twa.config import parse_twa_args

    assert parse_twa_args(["--snapshot-url", "file:///x", "--run-id", "r", "--select", "-5:"]).select == "-5:"
    assert parse_twa_args(["--snapshot-url", "file:///x", "--run-id", "r", "--select=-5:"]).select == "-5:"
