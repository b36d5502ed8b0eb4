"""Checkpoints on a store fail safe (issue 19): a damaged marker or file makes a resume take the newest intact
tag, with a warning naming the object; none intact is one CheckpointError. One process, on memory://, file://
and S3 (the 2-rank launches on S3 are in tests/test_checkpoints.py)."""
from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pytest

from twa_scale.train import checkpoints
from twa_scale.train.checkpoints import CheckpointError, committed_tags, fetch, newest, scan_tags
from twa_scale.store import CheckpointCommit, open_store

FIXTURE = Path(__file__).parent / "fixtures" / "store_today" / "runs" / "today-mlp" / "checkpoints"
FILES = {"mp_rank_00_model_states.pt": 3000, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 5000}


def _save(ckpt: Path, tag: str) -> dict[str, bytes]:
    """A stand-in for DeepSpeed's files of ``tag`` (their bytes are never unpickled here)."""
    out = {}
    for name, n in FILES.items():
        data = hashlib.sha256(f"{tag}/{name}".encode()).digest() * (n // 32)
        (ckpt / tag).mkdir(parents=True, exist_ok=True)
        (ckpt / tag / name).write_bytes(data)
        out[name] = data
    return out


@pytest.fixture
def uploaded(store_url, tmp_path):
    """Two tags uploaded and committed by the real Uploader: (url, {tag: {file: bytes}})."""
    url = f"{store_url}/ckpt"
    open_store(url).check_writable()  # creates the S3 bucket, as training's run store does first
    up = checkpoints.Uploader(url)
    written = {}
    for tag in ("epoch1", "epoch1-step4"):
        written[tag] = _save(tmp_path / "train", tag)
        up.submit(str(tmp_path / "train"), tag)
        assert up.wait(60)
    up.close()
    assert up.committed == ["epoch1", "epoch1-step4"] and not up.failed
    return url, written


def _damage(store, key: str, how: str) -> None:
    data = store.get(key)
    if how == "empty":
        store.put_small(key, b"")
    elif how == "truncated":
        store.put_small(key, data[: len(data) // 2])
    else:  # same size, one byte changed: only a checksum sees it
        i = data.index(b"epoch1-step4") + 5 if b"epoch1-step4" in data else len(data) // 2
        store.put_small(key, data[:i] + bytes([data[i] ^ 1]) + data[i + 1:])


@pytest.mark.parametrize("obj", ["COMMIT.json", "nodes/0.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
@pytest.mark.parametrize("how", ["empty", "truncated", "altered"])
def test_a_damaged_newest_tag_falls_back_to_the_previous_intact_one(uploaded, tmp_path, caplog, obj, how):
    url, written = uploaded
    store = open_store(url)
    commit = CheckpointCommit.from_json(store.get("epoch1-step4/COMMIT.json"), "commit")
    assert {f.name: (f.bytes, f.sha256) for f in commit.files} == {
        n: (len(d), hashlib.sha256(d).hexdigest()) for n, d in written["epoch1-step4"].items()}
    _damage(store, f"epoch1-step4/{obj}", how)
    caplog.set_level(logging.WARNING, "twa_scale.train.checkpoints")
    fresh = tmp_path / "fresh"
    assert fetch(str(fresh), url) == ("epoch1-step4" if obj.startswith("nodes/") else "epoch1")
    tag = (fresh / "latest").read_text()
    assert {p.name: p.read_bytes() for p in (fresh / tag).iterdir()} == written[tag]
    if tag == "epoch1":
        assert f"/ckpt/epoch1-step4/{obj}" in caplog.text, caplog.text  # the warning names the object
        assert not (fresh / "epoch1-step4").exists(), "no partial tag directory left behind"
        # --auto-resume's look skips a damaged marker or a wrong size from the listing alone
        if obj == "COMMIT.json" or how != "altered":
            assert newest(str(tmp_path / "other"), url) == ("epoch1", url)
            assert committed_tags(store) == ["epoch1"]


def test_a_damaged_local_copy_is_downloaded_again(uploaded, tmp_path):
    url, written = uploaded
    local = tmp_path / "train"  # the node kept its disk; `latest` names the newest tag
    (local / "latest").write_text("epoch1-step4")
    victim = local / "epoch1-step4" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    assert fetch(str(local), url) == "epoch1-step4"
    assert victim.read_bytes() == written["epoch1-step4"]["mp_rank_00_model_states.pt"]


def test_no_intact_tag_is_one_checkpoint_error(uploaded, tmp_path):
    url, _ = uploaded
    store = open_store(url)
    store.put_small("epoch1-step4/COMMIT.json", b"")
    _damage(store, "epoch1/mp_rank_00_model_states.pt", "truncated")
    for call in (lambda: fetch(str(tmp_path / "fresh"), url), lambda: newest(str(tmp_path / "fresh"), url)):
        with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*2 damaged.*epoch1-step4") as e:
            call()
        assert "\n" not in str(e.value) and "COMMIT.json is empty" in str(e.value)
    intact, damaged, _ = scan_tags(store)
    assert intact == [] and set(damaged) == {"epoch1", "epoch1-step4"}
    assert fetch(str(tmp_path / "none"), f"{url}-empty") is None  # nothing at all: a fresh start


def test_checkpoints_of_todays_code_still_resume(tmp_path):
    """A tag committed before checkpoint records had sizes and checksums (tests/fixtures/store_today)."""
    shutil.copytree(FIXTURE, tmp_path / "store")
    url = (tmp_path / "store").as_uri()
    assert committed_tags(open_store(url)) == ["epoch1"]
    assert fetch(str(tmp_path / "fresh"), url) == "epoch1"
    got = (tmp_path / "fresh" / "epoch1" / "mp_rank_00_model_states.pt").read_bytes()
    assert got == (FIXTURE / "epoch1" / "mp_rank_00_model_states.pt").read_bytes()
