"""Alert rules: `promtool check rules` and `promtool test rules` on the PrometheusRule's groups.

The rules live once, in k8s/base/monitoring/prometheusrule.yaml; promtool reads plain rule
files, so the tests write its spec (the `groups:` list) to a temporary file. The unit tests
make each alert fire on synthetic series, and stay silent on healthy ones.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support import REPO, require_binary

pytestmark = pytest.mark.prometheus

RULE = REPO / "k8s" / "base" / "monitoring" / "prometheusrule.yaml"

RUN = 'run_id="r1",role="train",node="twa-train-0",rank="0"'

UNIT_TESTS = {
    "rule_files": ["alerts.yml"],
    "evaluation_interval": "1m",
    "tests": [
        {   # S3 is down: retries run out and snapshots fail -> critical alert within one evaluation
            "interval": "1m",
            "input_series": [
                {"series": f"twa_scale_snapshot_failures_total{{{RUN}}}", "values": "0x5 1 2 2 2x20"},
                {"series": f'twa_scale_snapshot_failures_total{{{RUN.replace("r1", "healthy")}}}',
                 "values": "0x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "4m", "alertname": "TwaScaleSnapshotFailures", "exp_alerts": []},
                {"eval_time": "8m", "alertname": "TwaScaleSnapshotFailures", "exp_alerts": [
                    {"exp_labels": {"run_id": "r1", "severity": "critical"}}]},
                {"eval_time": "25m", "alertname": "TwaScaleSnapshotFailures", "exp_alerts": []},
            ],
        },
        {   # steps stop at 10m while the exporter stays up -> stalled after 15 min + 5 min `for`
            "interval": "1m",
            "input_series": [
                {"series": f"twa_scale_train_last_step_timestamp_seconds{{{RUN}}}",
                 "values": "0+60x10 600x40"},
                # a run that went on to its TWA stage in the same process is not stalled
                {"series": f'twa_scale_train_last_step_timestamp_seconds{{{RUN.replace("r1", "r2")}}}',
                 "values": "0+60x10 600x40"},
                {"series": 'twa_scale_twa_steps_total{run_id="r2",role="twa",node="twa-train-0",rank="0"}',
                 "values": "0+5x50"},
            ],
            "alert_rule_test": [
                {"eval_time": "20m", "alertname": "TwaScaleTrainingStalled", "exp_alerts": []},
                {"eval_time": "35m", "alertname": "TwaScaleTrainingStalled", "exp_alerts": [
                    {"exp_labels": {"run_id": "r1", "severity": "critical"}}]},
            ],
        },
        {   # a queue that never drains lags; one that drains between snapshots does not
            "interval": "1m",
            "input_series": [
                {"series": f"twa_scale_snapshot_queue_depth{{{RUN}}}", "values": "1x10 2x30"},
                {"series": f'twa_scale_snapshot_queue_depth{{{RUN.replace("r1", "ok")}}}',
                 "values": "1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0"},
            ],
            "alert_rule_test": [
                {"eval_time": "30m", "alertname": "TwaScaleSnapshotUploadLagging", "exp_alerts": [
                    {"exp_labels": {"run_id": "r1", "severity": "warning"}}]},
            ],
        },
        {   # kube-state-metrics reports the TWA Job's failed pods
            "interval": "1m",
            "input_series": [
                {"series": 'kube_job_status_failed{namespace="twa-scale",job_name="twa-scale-twa-0"}',
                 "values": "0 0 1 1 1"},
                {"series": 'kube_job_status_failed{namespace="twa-scale",job_name="other-job"}',
                 "values": "1 1 1 1 1"},
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "TwaScaleTwaJobFailed", "exp_alerts": []},
                {"eval_time": "3m", "alertname": "TwaScaleTwaJobFailed", "exp_alerts": [
                    {"exp_labels": {"namespace": "twa-scale", "job_name": "twa-scale-twa-0", "severity": "critical"}}]},
            ],
        },
    ],
}


@pytest.fixture
def rules_file(tmp_path) -> Path:
    spec = yaml.safe_load(RULE.read_text())["spec"]
    path = tmp_path / "alerts.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_promtool_check_rules(rules_file):
    promtool = require_binary("promtool")
    r = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_promtool_unit_tests_fire_the_alerts(rules_file):
    promtool = require_binary("promtool")
    # promtool compares annotations verbatim; their templates are checked by `check rules`.
    spec = yaml.safe_load(rules_file.read_text())
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    test = rules_file.parent / "alerts_test.yml"
    test.write_text(yaml.safe_dump(UNIT_TESTS, sort_keys=False))
    r = subprocess.run([promtool, "test", "rules", str(test)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
