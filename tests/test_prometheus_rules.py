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

RUN = 'namespace="ml",job="ml/twa-scale",run_id="r1",role="train",node="twa-train-0",rank="0"'
ROUTE = {"namespace": "ml", "job": "ml/twa-scale"}  # what Alertmanager routes on: kept by every alert

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
                    {"exp_labels": {**ROUTE, "run_id": "r1", "severity": "critical"}}]},
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
                {"series": 'twa_scale_twa_steps_total{namespace="ml",job="ml/twa-scale",run_id="r2",role="twa",'
                           'node="twa-train-0",rank="0"}',
                 "values": "0+5x50"},
            ],
            "alert_rule_test": [
                {"eval_time": "20m", "alertname": "TwaScaleTrainingStalled", "exp_alerts": []},
                {"eval_time": "35m", "alertname": "TwaScaleTrainingStalled", "exp_alerts": [
                    {"exp_labels": {**ROUTE, "run_id": "r1", "severity": "critical"}}]},
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
                    {"exp_labels": {**ROUTE, "run_id": "r1", "severity": "warning"}}]},
            ],
        },
        {   # a tenth of step time blocked on the streamer, for long enough; a healthy run alongside
            "interval": "1m",
            "input_series": [
                {"series": f"twa_scale_snapshot_stall_seconds_sum{{{RUN}}}", "values": "0+6x40"},
                {"series": f"twa_scale_train_step_seconds_sum{{{RUN}}}", "values": "0+60x40"},
                {"series": f'twa_scale_snapshot_stall_seconds_sum{{{RUN.replace("r1", "ok")}}}', "values": "0+1x40"},
                {"series": f'twa_scale_train_step_seconds_sum{{{RUN.replace("r1", "ok")}}}', "values": "0+60x40"},
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "TwaScaleSnapshotStallHigh", "exp_alerts": []},
                {"eval_time": "35m", "alertname": "TwaScaleSnapshotStallHigh", "exp_alerts": [
                    {"exp_labels": {**ROUTE, "run_id": "r1", "severity": "warning"}}]},
            ],
        },
        {   # kube-state-metrics: failed pods of the Jobs of a JobSet, whatever the JobSet is named (an overlay's
            # namePrefix); a Job of the same name that no JobSet owns does not page
            "interval": "1m",
            "input_series": [
                {"series": 'kube_job_status_failed{namespace="ml",job_name="exp7-twa-0"}', "values": "0 0 1 1 1"},
                {"series": 'kube_job_owner{namespace="ml",job_name="exp7-twa-0",owner_kind="JobSet",'
                           'owner_name="exp7",owner_is_controller="true"}', "values": "1 1 1 1 1"},
                {"series": 'kube_job_status_failed{namespace="ml",job_name="exp7-train-1"}', "values": "0 1 1 1 1"},
                {"series": 'kube_job_owner{namespace="ml",job_name="exp7-train-1",owner_kind="JobSet",'
                           'owner_name="exp7",owner_is_controller="true"}', "values": "1 1 1 1 1"},
                {"series": 'kube_job_status_failed{namespace="ml",job_name="cron-twa-0"}', "values": "1 1 1 1 1"},
                {"series": 'kube_job_owner{namespace="ml",job_name="cron-twa-0",owner_kind="CronJob",'
                           'owner_name="cron",owner_is_controller="true"}', "values": "1 1 1 1 1"},
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "TwaScaleTwaJobFailed", "exp_alerts": []},
                {"eval_time": "3m", "alertname": "TwaScaleTwaJobFailed", "exp_alerts": [
                    {"exp_labels": {"namespace": "ml", "job_name": "exp7-twa-0", "owner_name": "exp7",
                                    "severity": "critical"}}]},
                {"eval_time": "3m", "alertname": "TwaScaleTrainJobFailed", "exp_alerts": [
                    {"exp_labels": {"namespace": "ml", "job_name": "exp7-train-1", "owner_name": "exp7",
                                    "severity": "warning"}}]},
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


def test_every_alert_routes_and_links_a_runbook_section_that_exists():
    """namespace kept (and the scrape job for the twa_scale_* alerts), no Job name written in, and a
    runbook_url whose anchor is a heading of docs/operations.md; each alert has a promtool unit test."""
    import re

    spec = yaml.safe_load(RULE.read_text())["spec"]
    rules = [r for g in spec["groups"] for r in g["rules"]]
    headings = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", (REPO / "docs" / "operations.md").read_text(), re.M)}
    tested = {t["alertname"] for case in UNIT_TESTS["tests"] for t in case["alert_rule_test"]}
    for r in rules:
        name, expr = r["alert"], r["expr"]
        path, _, anchor = r["annotations"]["runbook_url"].partition("#")
        assert path == "docs/operations.md" and anchor in headings, (name, anchor)
        assert all("namespace" in by for by in re.findall(r"by \(([^)]*)\)", expr)), (name, expr)
        if "twa_scale_" in expr:  # the alert's own aggregations (not the `unless` side) keep the scrape job
            assert all("job" in by.split(", ") for by in re.findall(r"(?:max|sum) by \(([^)]*)\)", expr)), name
        assert "twa-scale-" not in expr, (name, expr)  # no Job or JobSet name written in
        assert name in tested, f"{name} has no promtool unit test"
