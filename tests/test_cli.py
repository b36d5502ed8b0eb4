"""`twa-scale snapshots ls|verify URL/RUN` on a real store, good and damaged."""
from __future__ import annotations

import json
import subprocess
import sys

import fsspec.core
import pytest
import torch

from tests.support import REPO
from tests.test_store import _model, _write
from twa_scale import store
from twa_scale.cli import human_bytes, main, split_run_url
from twa_scale.layout import FlatLayout


def _populate(url: str) -> FlatLayout:
    layout = FlatLayout.from_model(_model())
    w = store.create_run(url, "run1", layout, meta={"model": "tiny"}, world_size=2)
    for seq in range(3):
        _write(w, seq, torch.randn(layout.D), 2, step=10 * seq, epoch=seq)
    return layout


def test_split_run_url():
    assert split_run_url("s3://b/p/run-7") == ("s3://b/p", "run-7")
    assert split_run_url("file:///data/x/run/") == ("file:///data/x", "run")
    with pytest.raises(ValueError, match="URL/RUN"):
        split_run_url("s3://bucket")


def test_ls_and_verify_good_run(store_url, capsys):
    layout = _populate(store_url)
    assert main(["snapshots", "ls", f"{store_url}/run1"]) == 0
    out = capsys.readouterr().out
    assert "3 committed snapshot(s)" in out and f"D={layout.D}" in out
    rows = [line.split() for line in out.splitlines()[2:]]
    assert rows == [[str(s), str(10 * s), str(s), *human_bytes(4 * layout.D).split()] for s in range(3)]
    assert main(["snapshots", "ls", "--json", f"{store_url}/run1"]) == 0
    assert json.loads(capsys.readouterr().out)[2] == {"seq": 2, "step": 20, "epoch": 2, "epoch_fraction": None,
                                                      "bytes": 4 * layout.D}
    assert main(["snapshots", "verify", f"{store_url}/run1"]) == 0
    assert "all checksums OK" in capsys.readouterr().out


def test_verify_names_every_bad_object_and_fails(store_url, capsys):
    _populate(store_url)
    fs, root = fsspec.core.url_to_fs(store_url)
    bins = sorted(p for p in fs.find(f"{root}/run1/snapshots") if p.endswith(".bin"))
    flipped, truncated = bins[1], bins[4]
    blob = bytearray(fs.cat_file(flipped))
    blob[0] ^= 1
    fs.pipe_file(flipped, bytes(blob))
    fs.pipe_file(truncated, fs.cat_file(truncated)[:-4])
    assert main(["snapshots", "verify", f"{store_url}/run1"]) == 1
    err = capsys.readouterr().err
    assert fs.unstrip_protocol(flipped) in err and "checksum mismatch" in err
    assert fs.unstrip_protocol(truncated) in err and "truncated" in err
    assert "2 problem(s) in 3 committed snapshot(s)" in err


def test_unknown_run_is_a_clear_error(tmp_path, capsys):
    assert main(["snapshots", "ls", f"{tmp_path.as_uri()}/nope"]) == 2
    assert "run.json does not exist" in capsys.readouterr().err


@pytest.mark.e2e
def test_module_entry_point_runs(tmp_path):
    _populate(tmp_path.as_uri())
    proc = subprocess.run([sys.executable, "-m", "twa_scale.cli", "snapshots", "verify", f"{tmp_path.as_uri()}/run1"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "3 committed snapshot(s), all checksums OK" in proc.stdout


def test_json_verdict_of_verify(tmp_path, capsys):
    url = tmp_path.as_uri()
    _populate(url)
    assert main(["snapshots", "verify", "--json", f"{url}/run1"]) == 0
    assert json.loads(capsys.readouterr().out) == {"run": f"{url}/run1", "snapshots": 3, "ok": True, "problems": []}
    bin0 = sorted(tmp_path.glob("run1/snapshots/00000000/*.bin"))[0]
    bin0.write_bytes(bin0.read_bytes()[:-4])
    assert main(["snapshots", "verify", "--json", f"{url}/run1"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert not out["ok"] and len(out["problems"]) == 1 and bin0.name in out["problems"][0]


def test_a_missing_location_is_an_error_and_messages_name_the_right_flag(tmp_path, capsys):
    assert main(["runs", "ls", f"{tmp_path.as_uri()}/nothing"]) == 2
    assert capsys.readouterr().err.strip() == (f"twa-scale: error: {tmp_path.as_uri()}/nothing: no such location "
                                               "(nothing is stored there; check the URL)")
    assert main(["runs", "ls", tmp_path.as_uri()]) == 0  # exists, holds no runs: an empty table
    assert main(["data", "verify", f"{tmp_path.as_uri()}/nothing"]) == 2
    err = capsys.readouterr().err
    assert "--data" not in err and "nothing: no index.json" in err and err.count("'") % 2 == 0


def test_version_and_plain_help_under_the_console_script(capsys):
    from twa_scale import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"twa-scale {__version__}"
    for stage in ("train", "twa"):
        with pytest.raises(SystemExit) as exit_:
            main([stage, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: twa-scale {stage} ") and "`" not in text, text[:200]


def test_exit_process_runs_atexit_handlers_flushes_and_keeps_the_code():
    """The entry points end through exit_process (no interpreter finalization, where gloo can abort): what
    atexit and the buffered streams hold must still come out, with the stage's exit status."""
    code = ("import atexit, sys\n"
            "from twa_scale.cli import exit_process\n"
            "atexit.register(lambda: print('atexit ran'))\n"
            "print('buffered', end=' ')\n"
            "sys.stderr.write('to stderr')\n"
            "exit_process(3)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 3
    assert p.stdout == "buffered atexit ran\n" and p.stderr == "to stderr"
