"""The first run says what it does: a taken rendezvous port fails at once naming --master_port, and the
one-off JIT compile of DeepSpeed's CPU communication op is announced before it starts."""
import logging
import socket

import pytest

from tests.support import REPO
from tests.support.launch import run
from twa_scale import comm


@pytest.mark.multirank
def test_a_taken_master_port_fails_at_once_naming_the_flag(tmp_path):
    """Before: rank 0 waited out torch's store timeout (~4.5 min) and exited 75 (transient), naming nothing."""
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run(["deepspeed", "--num_gpus", "1", "--master_port", str(port), str(REPO / "launch/train.py"),
                    "--model", "mlp", "--epochs", "1", "--no-twa", "--snapshot-url", tmp_path.as_uri(),
                    "--run-id", "x"], check=False, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: --master_port {port}: the rendezvous port is already in use" in proc.stderr
    assert not (tmp_path / "x").exists()  # nothing written


def test_the_shm_op_compile_is_announced_only_when_it_will_happen(tmp_path, monkeypatch, caplog):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty extension cache: a compile is due
    with caplog.at_level(logging.INFO, logger="twa_scale.comm"):
        comm._announce_shm_op_build()
    said = [r.getMessage() for r in caplog.records if r.name == "twa_scale.comm"]  # not torch's own warnings
    assert len(said) == 1 and said[0].startswith("compiling DeepSpeed's CPU communication op once (1-2 min")
    built = tmp_path / said[0].split("cached in ")[1].rstrip(")")
    built.mkdir(parents=True, exist_ok=True)
    (built / "deepspeed_shm_comm.so").write_bytes(b"")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="twa_scale.comm"):
        comm._announce_shm_op_build()
    assert not [r for r in caplog.records if r.name == "twa_scale.comm"]
