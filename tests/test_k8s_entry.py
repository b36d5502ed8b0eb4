"""launch/k8s-entry.sh: a pod's environment becomes a `deepspeed --no_ssh` launch.

The 2-"pod" test runs the entrypoint twice as local processes, each given the
environment an Indexed Job pod gets, with the rendezvous pointed at 127.0.0.1;
they train one epoch together on the built-in `digits` data.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import REPO, free_port, require_binary

ENTRY = REPO / "launch" / "k8s-entry.sh"

POD_ENV = {
    "TWA_NNODES": "2",
    "TWA_GPUS_PER_NODE": "1",
    "TWA_SERVICE_NAME": "twa-scale",
    "TWA_MASTER_PORT": "29500",
    "TWA_ROLE": "train",
    "JOB_COMPLETION_INDEX": "0",
}


def _entry(env: dict, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in POD_ENV and not k.startswith("TWA_")}
    return subprocess.run(["bash", str(ENTRY), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=timeout)


pytestmark = pytest.mark.k8s


@pytest.mark.parametrize("var", sorted(POD_ENV))
def test_missing_variable_is_named(var):
    env = {k: v for k, v in POD_ENV.items() if k != var}
    r = _entry(env)
    assert r.returncode == 2
    assert f"environment variable {var} is not set" in r.stderr, r.stderr


@pytest.mark.parametrize("var,value,word", [
    ("TWA_NNODES", "two", "TWA_NNODES=two"),
    ("JOB_COMPLETION_INDEX", "2", "not below TWA_NNODES=2"),
    ("TWA_ROLE", "eval", "TWA_ROLE=eval"),
])
def test_bad_variable_is_named(var, value, word):
    r = _entry({**POD_ENV, var: value})
    assert r.returncode == 2
    assert word in r.stderr, r.stderr


def test_builds_the_no_ssh_command(tmp_path):
    """A fake `deepspeed` on PATH records the command line and the hostfile."""
    fake = tmp_path / "bin" / "deepspeed"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$OUT/argv"\ncp "$2" "$OUT/hostfile"\n')
    fake.chmod(0o755)
    env = {**POD_ENV, "JOB_COMPLETION_INDEX": "1", "HOSTNAME": "twa-train-1", "TWA_METRICS_PORT": "9400",
           "TWA_MASTER_ADDR": "127.0.0.1", "OUT": str(tmp_path),
           "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    r = _entry(env, "--epochs", "3")
    assert r.returncode == 0, r.stderr
    argv = (tmp_path / "argv").read_text().split("\n")[:-1]
    assert argv[2:] == ["--no_ssh", "--node_rank", "1", "--master_addr", "127.0.0.1", "--master_port", "29500",
                        str(REPO / "launch" / "train.py"), "--metrics-port", "9400", "--epochs", "3"]
    # hostnames come from the pod's own name: <job>-<index>.<service>, G slots each
    assert (tmp_path / "hostfile").read_text() == ("twa-train-0.twa-scale slots=1\n"
                                                   "twa-train-1.twa-scale slots=1\n")
    # without the override the rendezvous is pod 0 of the same Job
    env.pop("TWA_MASTER_ADDR")
    env["JOB_COMPLETION_INDEX"] = "0"
    r = _entry(env)
    assert r.returncode == 0, r.stderr
    assert "--master_addr\ntwa-train-0.twa-scale\n" in (tmp_path / "argv").read_text()


def test_worker_fails_naming_an_unresolvable_master():
    env = {**POD_ENV, "JOB_COMPLETION_INDEX": "1", "TWA_MASTER_ADDR": "no-such-host.invalid",
           "TWA_RDZV_TIMEOUT_SECONDS": "1"}
    r = _entry(env)
    assert r.returncode == 2
    assert "no-such-host.invalid" in r.stderr and "did not resolve" in r.stderr, r.stderr


@pytest.mark.multirank
@pytest.mark.slow
def test_two_pods_train_one_epoch_together(tmp_path):
    require_binary("deepspeed")
    port = free_port()
    snap = tmp_path / "snap"
    args = ["--data", "digits", "--model", "resnet20", "--epochs", "1", "--limit-train", "512",
            "--limit-val", "256", "--snapshot-url", f"file://{snap}", "--run-id", "pods", "--seed", "0",
            "--checkpoint-dir", str(tmp_path / "ckpt")]
    base = {k: v for k, v in os.environ.items() if not k.startswith("TWA_")}
    base["PYTHONPATH"] = str(REPO) + os.pathsep + base.get("PYTHONPATH", "")
    base.setdefault("OMP_NUM_THREADS", "1")   # 2 cores: the two pods must not oversubscribe them
    pods = []
    for index in (0, 1):
        env = {**base, **POD_ENV, "JOB_COMPLETION_INDEX": str(index), "TWA_MASTER_PORT": str(port),
               "TWA_MASTER_ADDR": "127.0.0.1", "HOSTNAME": f"twa-train-{index}",
               "TWA_HOSTFILE": str(tmp_path / f"hostfile-{index}")}
        log = open(tmp_path / f"pod{index}.log", "w")
        pods.append((subprocess.Popen(["bash", str(ENTRY), *args], env=env, cwd=tmp_path, stdout=log,
                                      stderr=subprocess.STDOUT), log))
    try:
        codes = [p.wait(timeout=600) for p, _ in pods]
    finally:
        for p, log in pods:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = {i: (tmp_path / f"pod{i}.log").read_text() for i in (0, 1)}
    assert codes == [0, 0], logs
    # both pods joined one world of 2 ranks and finished the epoch
    assert "epoch 1/1" in logs[0], logs[0]
    sys.path.insert(0, str(REPO))
    from twa_scale import store

    reader = store.open_run(f"file://{snap}", "pods")
    assert reader.manifest["world_size"] == 2
    assert [s.seq for s in reader.snapshots()] == [0, 1]
