"""launch/k8s-entry.sh: a pod's environment becomes a `deepspeed --no_ssh` launch.

The 2-"pod" test runs the entrypoint twice as local processes, each given the
environment an Indexed Job pod gets, with the rendezvous pointed at 127.0.0.1;
they train one epoch together on the built-in `digits` data.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.support import REPO, free_port, require_binary

ENTRY = REPO / "launch" / "k8s-entry.sh"

POD_ENV = {
    "TWA_SCALE_NNODES": "2",
    "TWA_SCALE_GPUS_PER_NODE": "1",
    "TWA_SCALE_SERVICE_NAME": "twa-scale",
    "TWA_SCALE_MASTER_PORT": "29500",
    "TWA_SCALE_ROLE": "train",
    "JOB_COMPLETION_INDEX": "0",
}


def _entry(env: dict, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in POD_ENV and not k.startswith("TWA_")}
    return subprocess.run(["bash", str(ENTRY), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=timeout, check=False)


pytestmark = pytest.mark.k8s


@pytest.mark.parametrize("var", sorted(POD_ENV))
def test_missing_variable_is_named(var):
    env = {k: v for k, v in POD_ENV.items() if k != var}
    r = _entry(env)
    assert r.returncode == 2
    assert f"environment variable {var} is not set" in r.stderr, r.stderr


@pytest.mark.parametrize("var,value,word", [
    ("TWA_SCALE_NNODES", "two", "TWA_SCALE_NNODES=two"),
    ("JOB_COMPLETION_INDEX", "2", "not below TWA_SCALE_NNODES=2"),
    ("TWA_SCALE_ROLE", "eval", "TWA_SCALE_ROLE=eval"),
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
    env = {**POD_ENV, "JOB_COMPLETION_INDEX": "1", "HOSTNAME": "twa-scale-train-0-1", "TWA_SCALE_METRICS_PORT": "9400",
           "TWA_SCALE_MASTER_ADDR": "127.0.0.1", "OUT": str(tmp_path),
           "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    r = _entry(env, "--epochs", "3")
    assert r.returncode == 0, r.stderr
    argv = (tmp_path / "argv").read_text().split("\n")[:-1]
    assert argv[2:] == ["--no_ssh", "--node_rank", "1", "--master_addr", "127.0.0.1", "--master_port", "29500",
                        "--log_level", "warning", str(REPO / "launch" / "train.py"), "--metrics-port", "9400",
                        "--epochs", "3", "--auto-resume"]
    # hostnames come from the pod's own name, which JobSet makes <jobset>-<replicatedJob>-<jobIndex>-<podIndex>
    # (the Job's name, then the pod's completion index): <job>-<index>.<service>, G slots each
    assert (tmp_path / "hostfile").read_text() == ("twa-scale-train-0-0.twa-scale slots=1\n"
                                                   "twa-scale-train-0-1.twa-scale slots=1\n")
    # without the override the rendezvous is pod 0 of the same Job
    env.pop("TWA_SCALE_MASTER_ADDR")
    env["JOB_COMPLETION_INDEX"] = "0"
    r = _entry(env)
    assert r.returncode == 0, r.stderr
    assert "--master_addr\ntwa-scale-train-0-0.twa-scale\n" in (tmp_path / "argv").read_text()


def test_pod_0_still_pending_is_transient():
    """Pod 0 never resolving (Pending: no capacity yet) is exit 75, which the JobSet restarts, not 2."""
    env = {**POD_ENV, "JOB_COMPLETION_INDEX": "1", "TWA_SCALE_MASTER_ADDR": "no-such-host.invalid",
           "TWA_SCALE_RDZV_TIMEOUT_SECONDS": "1"}
    r = _entry(env)
    assert r.returncode == 75
    assert "no-such-host.invalid" in r.stderr and "did not resolve" in r.stderr, r.stderr


def _fake_deepspeed(tmp_path, body: str = ""):
    """A `deepspeed` on PATH that records its argv, then runs ``body``."""
    fake = tmp_path / "bin" / "deepspeed"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "$OUT/argv"\n{body}\n')
    fake.chmod(0o755)
    return {"OUT": str(tmp_path), "PATH": f"{fake.parent}:{os.environ['PATH']}", "TWA_SCALE_MASTER_ADDR": "127.0.0.1"}


@pytest.mark.parametrize("attempt,added", [
    (None, "--auto-resume"),  # the job resumes if it finds a checkpoint, local or on the store
    ("0", "--auto-resume"),
    ("2", "--resume"),        # a JobSet group restart: the run exists, even before its first checkpoint
])
def test_auto_resume(tmp_path, attempt, added):
    env = {**POD_ENV, **_fake_deepspeed(tmp_path)}
    if attempt is not None:
        env["TWA_SCALE_RESTART_ATTEMPT"] = attempt
    r = _entry(env, "--epochs", "3")
    assert r.returncode == 0, r.stderr
    argv = (tmp_path / "argv").read_text().split("\n")[:-1]
    assert argv[-1] == added and "--resume" not in argv[:-1] and "--auto-resume" not in argv[:-1], argv
    assert ("auto-resume (restart attempt 2)" in r.stderr) == (added == "--resume")
    # the TWA stage never gets either; an explicit --resume is not doubled
    _entry({**env, "TWA_SCALE_ROLE": "twa"})
    assert "resume" not in (tmp_path / "argv").read_text()
    _entry(env, "--resume")
    assert (tmp_path / "argv").read_text().split("\n")[:-1][-1:] == ["--resume"]
    assert (tmp_path / "argv").read_text().count("resume") == 1


@pytest.mark.parametrize("launcher_exit", [0, 2, 75, 143, 1])
def test_exit_status_of_the_job_is_kept(tmp_path, launcher_exit):
    env = {**POD_ENV, **_fake_deepspeed(tmp_path, f"exit {launcher_exit}")}
    assert _entry(env).returncode == launcher_exit


def test_sigterm_reaches_the_ranks_once_and_exits_143(tmp_path):
    """Like the real runner under --no_ssh, the fake one does not handle SIGTERM; its child (the
    per-node launcher) must get exactly one SIGTERM, and the pod exits 143 (preemption)."""
    launch = tmp_path / "launch.py"
    launch.write_text(
        "import os, signal, sys, time\n"
        "out = os.environ['OUT']\n"
        "def term(*_):\n"
        "    open(out + '/terms', 'a').write('TERM\\n')\n"
        "    time.sleep(0.5)\n"      # the flush
        "    sys.exit(1)\n"          # what deepspeed.launcher.launch exits with after terminating the ranks
        "signal.signal(signal.SIGTERM, term)\n"
        "open(out + '/ready', 'w').close()\n"
        "time.sleep(60)\n")
    env = {**POD_ENV, **_fake_deepspeed(tmp_path, f'{sys.executable} {launch} & wait $!')}
    base = {k: v for k, v in os.environ.items() if k not in POD_ENV and not k.startswith("TWA_")}
    p = subprocess.Popen(["bash", str(ENTRY)], env={**base, **env}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline and p.poll() is None, "fake launcher did not start"
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 143
    finally:
        if p.poll() is None:
            p.kill()
    assert (tmp_path / "terms").read_text() == "TERM\n"
    assert "stopped by SIGTERM" in p.stderr.read()


def _run_pods(tmp_path, args: list[str], name: str, extra_env: dict | None = None, timeout: float = 600):
    """Two "pods" (node 0 and node 1, 1 gloo rank each) through the entrypoint, as local processes with
    the rendezvous on 127.0.0.1; returns (exit codes, logs)."""
    require_binary("deepspeed")
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("TWA_")}
    base["PYTHONPATH"] = str(REPO) + os.pathsep + base.get("PYTHONPATH", "")
    base.setdefault("OMP_NUM_THREADS", "1")   # 2 cores: the two pods must not oversubscribe them
    pods = []
    for index in (0, 1):
        env = {**base, **POD_ENV, "JOB_COMPLETION_INDEX": str(index), "TWA_SCALE_MASTER_PORT": str(port),
               "TWA_SCALE_MASTER_ADDR": "127.0.0.1", "HOSTNAME": f"twa-scale-train-0-{index}",
               "TWA_SCALE_HOSTFILE": str(tmp_path / f"hostfile-{name}-{index}"), **(extra_env or {})}
        cwd = tmp_path / f"{name}{index}.cwd"   # a pod's own disk (relative paths in args land here)
        cwd.mkdir()
        log = open(tmp_path / f"{name}{index}.log", "w")  # noqa: SIM115 - closed in the finally below
        pods.append((subprocess.Popen(["bash", str(ENTRY), *args], env=env, cwd=cwd, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True), log))
    try:
        codes = [p.wait(timeout=timeout) for p, _ in pods]
    finally:
        for p, log in pods:
            if p.poll() is None:  # a hung "pod": its launcher and ranks too
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            log.close()
    return codes, {i: (tmp_path / f"{name}{i}.log").read_text() for i in (0, 1)}


@pytest.mark.multirank
@pytest.mark.slow
def test_two_pods_train_one_epoch_together(tmp_path):
    snap = tmp_path / "snap"
    args = ["--data", "digits", "--model", "resnet20", "--epochs", "1", "--limit-train", "512",
            "--limit-val", "256", "--snapshot-url", f"file://{snap}", "--run-id", "pods", "--seed", "0",
            "--checkpoint-dir", str(tmp_path / "ckpt")]
    codes, logs = _run_pods(tmp_path, args, "pod")
    assert codes == [0, 0], logs
    # both pods joined one world of 2 ranks and finished the epoch
    assert "epoch 1/1" in logs[0], logs[0]
    from twa_scale import store

    reader = store.open_run(f"file://{snap}", "pods")
    assert reader.manifest.world_size == 2
    assert [s.seq for s in reader.snapshots()] == [0, 1]


@pytest.mark.multirank
@pytest.mark.slow
def test_kill_9_mid_epoch_then_the_relaunched_pods_resume_by_themselves(tmp_path):
    """Issue 13's done test. kill -9 of rank 0 (node 0, the writer-lease holder) after global step 18 of 22
    (epoch 2, step 7 of 11; checkpoints every 4 steps, the newest at step 16). The relaunch is recreated
    pods: the same job (TWA_SCALE_JOB_ID), the same args, empty checkpoint directories, no restart counter
    (a plain Job, or a re-applied JobSet). The entrypoint's --auto-resume finds the checkpoint committed on
    the store, the run's live-looking lease is taken over at once (the default 120 s timeout is never
    waited for), at most 4 steps are redone, and the snapshots are contiguous, without duplicates, verified."""
    from twa_scale import store

    every, kill_at, url = 4, 18, f"file://{tmp_path}/snap"
    args = ["--data", "digits", "--model", "mlp", "--epochs", "2", "--no-twa", "--seed", "1", "--lr", "0.05",
            "--snapshots-per-epoch", "3", "--checkpoint-every-steps", str(every), "--log-every-steps", "3",
            "--snapshot-url", url, "--run-id", "k9", "--checkpoint-dir", "ckpt"]   # relative: per "pod" below
    job = {"TWA_SCALE_JOB_ID": "jobset-uid-0001"}
    first = tmp_path / "first"
    first.mkdir()
    codes, logs = _run_pods(first, args, "pod", {**job, "TWA_SCALE_FAULT_KILL_AT_STEP": f"0:{kill_at}"}, timeout=300)
    assert codes[0] != 0 and codes[1] != 0, logs
    assert "rank 0 kills itself after step 18" in logs[0], logs[0][-3000:]
    lease = store.read_json(f"{url}/k9/LEASE.json")  # left behind by the killed holder
    assert lease["job"] == "jobset-uid-0001"

    again = tmp_path / "again"   # recreated pods: their local disks are empty
    again.mkdir()
    t0 = time.monotonic()
    codes, logs = _run_pods(again, args, "pod", job, timeout=300)
    seconds = time.monotonic() - t0
    assert codes == [0, 0], logs
    assert "--auto-resume" in logs[0] and "--auto-resume: checkpoint epoch1-step5 found in file://" in logs[0]
    assert "taking over the live-looking (this job's earlier launch) writer lease" in logs[0], logs[0][-3000:]
    m = re.search(r"resumed from \S+ at epoch 1, step 5 of 11 \(global step (\d+)\)", logs[0])
    assert m, logs[0][-3000:]
    assert kill_at - int(m.group(1)) <= every  # at most --checkpoint-every-steps steps redone
    assert seconds < 120, f"the relaunch took {seconds:.0f} s: it waited for the lease to go stale"

    reader = store.open_run(url, "k9")
    assert [s.seq for s in reader.snapshots()] == list(range(7))  # contiguous; a duplicate would repeat a seq
    assert [e["epoch"] for e in store.read_json(f"{url}/k9/train/metrics.json")["epochs"]] == [1, 2]
    verify = subprocess.run([sys.executable, "-m", "twa_scale", "snapshots", "verify", f"{url}/k9"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and "7 committed snapshot(s), all checksums OK" in verify.stdout, verify.stdout
