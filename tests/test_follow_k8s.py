"""k8s/components/live-twa: the JobSet's `twa` Job becomes the live follower, validated like the overlays.

Rendered with the real kustomize over the cpu-smoke and gpu-8xN overlays; the JobSet is checked against
its CRD schema, every replicated Job template as a strict batch/v1 Job, and the pods' args with the
project's own parsers (tests/test_k8s.py's helpers).
"""
from __future__ import annotations

import os

import pytest
import yaml

from tests.test_k8s import (K8S, OVERLAYS, _kustomize, _parse_pod_args, by_kind, crd_errors, kubernetes_validate,
                            one, render, rjobs)

pytestmark = pytest.mark.k8s


def _with_live_twa(tmp_path, overlay: str) -> tuple[dict, ...]:
    rel = os.path.relpath(K8S, tmp_path)  # kustomize takes only relative paths
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"{rel}/{overlay}"], "components": [f"{rel}/components/live-twa"]}))
    return _kustomize(tmp_path)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_live_twa_component_turns_the_twa_job_into_a_concurrent_follower(overlay, tmp_path):
    docs = _with_live_twa(tmp_path, overlay)
    js = one(docs, "JobSet", "twa-scale")
    assert crd_errors(js) == []
    jobs = [{"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"twa-scale-{name}-0"}, "spec": spec}
            for name, spec in rjobs(docs).items()]
    kubernetes_validate(jobs, tmp_path)
    follow = js["spec"]["replicatedJobs"][1]
    assert follow["name"] == "twa" and "dependsOn" not in follow, "the follower starts with training"
    assert follow["template"]["spec"]["backoffLimit"] > 0, "a failed follower pod must not restart training"
    twa, _ = _parse_pod_args(docs, "twa")
    train, _ = _parse_pod_args(docs, "train")
    assert twa.follow and twa.stop_rule == "gain" and twa.stop_marker
    assert train.holdout_fraction > 0 and train.obey_stop, "probes need a hold-out split; training obeys the stop"
    assert twa.run_id == train.run_id and twa.snapshot_url == train.snapshot_url
    # everything else is the overlay's, unchanged
    plain = render(overlay)
    assert {d["kind"] for d in docs} == {d["kind"] for d in plain}
    assert by_kind(docs, "ConfigMap") == by_kind(plain, "ConfigMap")
    assert "dependsOn" in one(plain, "JobSet", "twa-scale")["spec"]["replicatedJobs"][1]
