"""The `image` tier (opt-in: ``python -m pytest -m image``): build the CPU image, run it as pods.

1. Build ``k8s/image/Containerfile`` (VARIANT=cpu) with podman. Without a registry the base is a
   Debian bookworm minbase made by debootstrap and imported (``localhost/debian-bookworm-minbase``);
   pip inside the build sees this machine's pip configuration and local wheel directories, mounted
   read-only, so torch comes from the local wheels. Podman's layer cache makes a rebuild after a code
   change take seconds; ``TWA_SCALE_IMAGE=name`` uses a prebuilt image instead.
2. Two containers on the host network run ``launch/k8s-entry.sh`` (the image's entrypoint) with the
   environment a JobSet pod gets, as user 1000 with a read-only root filesystem and a ``/data`` of
   its own (the pod's emptyDir: no shared volume): 2-node ``digits`` training with snapshots and
   checkpoints to SeaweedFS on the host.
3. Two more run the TWA stage over those snapshots.
4. One pod is stopped (SIGTERM) mid-training: it exits 143, and the recreated pod (an empty ``/data``)
   resumes by itself from the checkpoint on the store.

Times and the image size go to ``bench/out/image_tier.json`` and the test log.
"""
from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import REPO, free_port, missing

pytestmark = [pytest.mark.image, pytest.mark.slow]

BASE = "localhost/debian-bookworm-minbase"
IMAGE = "localhost/twa-scale:cpu-test"
# crun refuses the hybrid cgroups here and the default ulimits cannot be raised (measured on the CI host)
PODMAN_FLAGS = ["--runtime", "runc", "--network=host", "--ulimit", "nofile=20000:20000",
                "--ulimit", "nproc=4096:4096"]
RESULTS: dict = {}


def _podman(*args, timeout=600, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} … exited {r.returncode}:\n{r.stdout[-3000:]}\n"
                             f"{r.stderr[-5000:]}")
    return r


def _pip_mounts(tmp: Path) -> list[str]:
    """-v flags that give pip inside the build this machine's indexes: a pip.conf with the local
    find-links/extra-index-url directories (mounted read-only at the same paths), the constraints,
    and the CA bundle (this machine may reach PyPI through a TLS-inspecting proxy)."""
    r = subprocess.run(["pip", "config", "list"], capture_output=True, text=True, check=False)
    values: dict[str, str] = {}
    for line in r.stdout.splitlines():
        key, _, value = line.partition("=")
        values[key.split(".", 1)[-1]] = value.strip().strip("'")
    cfg = configparser.ConfigParser()
    cfg["global"] = {}
    mounts: list[str] = []
    dirs = set()
    for key in ("find-links", "extra-index-url", "index-url"):
        if key in values:
            cfg["global"][key] = values[key]
            for item in values[key].split():
                path = item.removeprefix("file://")
                if path.startswith("/"):
                    dirs.add(Path(path).parent if path.endswith("/simple") else Path(path))
    for d in sorted(dirs):
        if d.is_dir():
            mounts += ["-v", f"{d}:{d}:ro"]
    if Path(values.get("constraint", "")).is_file():
        c = values["constraint"]
        mounts += ["-v", f"{c}:/etc/pip-constraints.txt:ro"]
        cfg["global"]["constraint"] = "/etc/pip-constraints.txt"
    cert = values.get("cert") or "/etc/ssl/certs/ca-certificates.crt"
    if Path(cert).is_file():
        mounts += ["-v", f"{cert}:/etc/host-ca.crt:ro"]
        cfg["global"]["cert"] = "/etc/host-ca.crt"
    conf = tmp / "pip.conf"
    with conf.open("w") as f:
        cfg.write(f)
    return [*mounts, "-v", f"{conf}:/etc/pip.conf:ro"]


def _ensure_base(tmp: Path) -> None:
    if _podman("image", "exists", BASE, check=False).returncode == 0:
        return
    if shutil.which("debootstrap") is None:
        missing("debootstrap (apt-get install podman runc debootstrap)")
    root = tmp / "rootfs"
    t0 = time.monotonic()
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root)], check=True, capture_output=True,
                   timeout=1200)
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["podman", "import", "-", BASE], stdin=tar.stdout, check=True, capture_output=True, timeout=600)
    tar.wait()
    RESULTS["debootstrap_seconds"] = round(time.monotonic() - t0, 1)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            missing(f"{tool} (apt-get install podman runc debootstrap)")
    if os.environ.get("TWA_SCALE_IMAGE"):
        return os.environ["TWA_SCALE_IMAGE"]
    tmp = tmp_path_factory.mktemp("image")
    _ensure_base(tmp)
    t0 = time.monotonic()
    _podman("build", *PODMAN_FLAGS, *_pip_mounts(tmp), "--build-arg", f"BASE={BASE}",
            "--build-arg", "VARIANT=cpu", "--build-arg", "TORCH_INDEX_URL=",
            "-f", str(REPO / "k8s" / "image" / "Containerfile"), "-t", IMAGE, str(REPO), timeout=3600)
    RESULTS["build_seconds"] = round(time.monotonic() - t0, 1)
    return IMAGE


def _pod(image: str, name: str, env: dict, args: list[str], data: Path) -> subprocess.Popen:
    """One "pod": the image's entrypoint with a JobSet pod's environment and security context."""
    flags = ["--rm", "--name", name, "--user", "1000:1000", "--read-only", "--tmpfs", "/tmp:rw,exec,size=4g",
             "--shm-size", "1g", "-v", f"{data}:/data", "--cap-drop", "ALL",
             "--security-opt", "no-new-privileges"]
    for k, v in env.items():
        flags += ["-e", f"{k}={v}"]
    log = open(data / f"{name}.log", "w")  # noqa: SIM115 - closed by _wait
    p = subprocess.Popen(["podman", "run", *PODMAN_FLAGS, *flags, image, *args], stdout=log,
                         stderr=subprocess.STDOUT)
    p.log = log  # type: ignore[attr-defined]
    p.log_path = data / f"{name}.log"  # type: ignore[attr-defined]
    return p


def _wait(pods, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in pods]
    finally:
        for p in pods:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.log.close()


def _logs(pods) -> str:
    return "\n".join(f"--- {p.log_path.name}\n{p.log_path.read_text()[-4000:]}" for p in pods)


def _own_dir(data: Path, name: str) -> Path:
    """A pod's own /data (its emptyDir)."""
    d = data / name
    d.mkdir()
    d.chmod(0o777)
    return d


def _pod_env(s3_server, role: str, index: int, nnodes: int, port: int, job: str) -> dict:
    return {"JOB_COMPLETION_INDEX": str(index), "TWA_SCALE_NNODES": str(nnodes), "TWA_SCALE_GPUS_PER_NODE": "1",
            "TWA_SCALE_SERVICE_NAME": "twa-scale", "TWA_SCALE_MASTER_PORT": str(port), "TWA_SCALE_ROLE": role,
            "TWA_SCALE_MASTER_ADDR": "127.0.0.1", "TWA_SCALE_JOB_NAME": job,
            "TWA_SCALE_HOSTFILE": f"/tmp/hostfile-{index}",
            "HOME": "/tmp/home", "TORCH_EXTENSIONS_DIR": "/tmp/torch_extensions", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "TWA_SCALE_RESTART_ATTEMPT": "0", **s3_server.env}


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    d.chmod(0o777)  # the pods run as UID 1000 (fsGroup in Kubernetes)
    return d


def _record() -> None:
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "image_tier.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **RESULTS}, indent=2) + "\n")
    print(f"image tier: {json.dumps(RESULTS)} -> {path}")


def test_image_is_non_root_prebuilt_and_compiler_free(image):
    info = json.loads(_podman("image", "inspect", image).stdout)[0]
    assert info["Config"]["User"] == "1000"
    assert info["Config"]["Entrypoint"] == ["/opt/twa_scale/launch/k8s-entry.sh"]
    RESULTS["image_bytes"] = info["Size"]
    RESULTS["image_gb"] = round(info["Size"] / 1e9, 2)
    r = _podman("run", "--rm", *PODMAN_FLAGS, "--entrypoint", "bash", image, "-c",
                "id -u; command -v g++ c++ gcc cc || echo no-compiler; "
                "python -c 'import torch; print(torch.__version__)'; "
                "python -c \"from deepspeed.git_version_info import installed_ops as o; "
                "print('shm_comm', o['deepspeed_shm_comm'])\" 2>/dev/null")
    lines = r.stdout.split()
    assert lines[0] == "1000" and "no-compiler" in lines, r.stdout
    assert "shm_comm" in lines and lines[lines.index("shm_comm") + 1] in ("1", "True"), r.stdout
    RESULTS["torch"] = lines[lines.index("no-compiler") + 1]
    _record()


def test_two_pods_train_on_s3_then_twa(image, s3_server, data_dir):
    import s3fs  # noqa: F401 - the host reads the store back

    from twa_scale import store

    url, run = "s3://image-tier/runs", f"img-{int(time.time())}"
    t0 = time.monotonic()
    port = free_port()
    train_args = ["--preset=quickstart", f"--snapshot-url={url}", f"--run-id={run}", "--no-twa", "--epochs=2",
                  "--limit-train=512", "--limit-val=256", f"--checkpoint-dir=/data/checkpoints/{run}",
                  "--deepspeed_config=/opt/twa_scale/ds_configs/cpu_smoke.json"]
    pods = [_pod(image, f"train-{i}", _pod_env(s3_server, "train", i, 2, port, "twa-scale-train-0"), train_args,
                 _own_dir(data_dir, f"train-{i}")) for i in (0, 1)]
    codes = _wait(pods, 900)
    assert codes == [0, 0], _logs(pods)
    RESULTS["train_seconds"] = round(time.monotonic() - t0, 1)
    logs = _logs(pods)
    assert "Building extension" not in logs and "ninja" not in logs.lower(), "a pod compiled an op"
    os.environ.update(s3_server.env)
    reader = store.open_run(url, run)
    assert reader.manifest.world_size == 2
    assert [s.seq for s in reader.snapshots()] == [0, 1, 2]
    assert reader.verify() == []

    t1 = time.monotonic()
    port = free_port()
    twa_args = ["--preset=paper_cifar", f"--snapshot-url={url}", f"--run-id={run}", "--epochs=1", "--lr=0.5",
                "--limit-train=256", "--limit-val=128"]
    pods = [_pod(image, f"twa-{i}", _pod_env(s3_server, "twa", i, 2, port, "twa-scale-twa-0"), twa_args,
                 data_dir) for i in (0, 1)]
    codes = _wait(pods, 900)
    assert codes == [0, 0], _logs(pods)
    RESULTS["twa_seconds"] = round(time.monotonic() - t1, 1)
    result = store.read_json(f"{url}/{run}/twa/result.json")
    assert result["world_size"] == 2
    assert 0.0 <= result["twa_accuracy"] <= 1.0
    _record()


def test_preempted_pod_exits_143_and_the_restart_resumes(image, s3_server, data_dir):
    url, run = "s3://image-tier/runs", f"pre-{int(time.time())}"
    args = ["--preset=quickstart", f"--snapshot-url={url}", f"--run-id={run}", "--no-twa", "--epochs=3",
            "--limit-train=512", "--limit-val=256", f"--checkpoint-dir=/data/checkpoints/{run}",
            "--deepspeed_config=/opt/twa_scale/ds_configs/cpu_smoke.json"]
    env = _pod_env(s3_server, "train", 0, 1, free_port(), "twa-scale-train-0")
    t0 = time.monotonic()
    (pod,) = [_pod(image, "pre-0", env, args, _own_dir(data_dir, "pre-0"))]
    ckpt = data_dir / "pre-0" / "checkpoints" / run / "latest"
    try:
        deadline = time.monotonic() + 600
        while not ckpt.exists():  # the first epoch's checkpoint is written
            assert pod.poll() is None and time.monotonic() < deadline, pod.log_path.read_text()[-4000:]
            time.sleep(1)
        _podman("stop", "-t", "60", "pre-0", timeout=120)   # SIGTERM, like a preemption
    finally:
        codes = _wait([pod], 120)
    log = pod.log_path.read_text()
    assert codes == [143], log[-4000:]
    assert "stopped by SIGTERM" in log
    RESULTS["preempt_seconds"] = round(time.monotonic() - t0, 1)
    # the pod is recreated (same environment and args, an empty /data, no restart counter: a plain Job, or a
    # re-applied JobSet); k8s-entry.sh adds --auto-resume, which finds the checkpoint on the store
    (pod,) = [_pod(image, "pre-1", env, args, _own_dir(data_dir, "pre-1"))]
    codes = _wait([pod], 900)
    log = pod.log_path.read_text()
    assert codes == [0], log[-4000:]
    assert f"found in {url}/{run}/checkpoints: resuming" in log and "resumed from" in log, log[-4000:]
    RESULTS["preempt_and_resume_seconds"] = round(time.monotonic() - t0, 1)
    _record()
