"""A real Prometheus scrapes a 2-rank training run with its TWA stage; every dashboard query answers.

    deepspeed --num_gpus 2 launch/train.py --data digits --epochs 2 --twa --metrics-port P ...

(2 epochs: the TWA stage needs at least 2 snapshots after the initial weights.)

Prometheus scrapes every second. The run ends quickly, so the exporter (local rank 0)
stays up after the run until one more scrape has read the final values
(TWA_SCALE_METRICS_LINGER_SECONDS caps the wait). The dashboard's queries are then run through
`/api/v1/query_range` over the run's time window, the way Grafana draws its panels, with
`$run_id` set to this run and `$__rate_interval` to 5 s (Grafana's rule: 4 x scrape interval,
rounded up). `promtool check metrics` lints the run's own exposition, rebuilt from the
exporter's multiprocess files after the run.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import yaml

from tests.support import REPO, free_port, require_binary
from tests.support.launch import env
from tests.support.prometheus import PrometheusServer, dashboard_queries

pytestmark = [pytest.mark.prometheus, pytest.mark.multirank, pytest.mark.slow]

DASHBOARD = REPO / "k8s" / "base" / "monitoring" / "twa-scale-dashboard.json"
RULES = REPO / "k8s" / "base" / "monitoring" / "prometheusrule.yaml"
RUN_ID = "prom-e2e"


@pytest.fixture(scope="module")
def scraped_run(tmp_path_factory):
    """(Prometheus server, run start, run end, multiprocess dir, result dir) for one 2-rank run."""
    require_binary("deepspeed")
    tmp = tmp_path_factory.mktemp("prom")
    port = free_port()
    rules = tmp / "alerts.yml"
    rules.write_text(yaml.safe_dump(yaml.safe_load(RULES.read_text())["spec"], sort_keys=False))
    prom = PrometheusServer(tmp / "prometheus", [f"127.0.0.1:{port}"], scrape_interval="1s", rule_files=[rules])
    prom.start()
    mpdir = tmp / "multiproc"
    try:
        start = time.time()
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
               "--data", "digits", "--model", "resnet20", "--epochs", "2", "--limit-train", "512",
               "--limit-val", "256", "--twa", "--twa-epochs", "2", "--seed", "0",
               "--snapshot-url", f"file://{tmp}/snap", "--run-id", RUN_ID, "--checkpoint-dir", str(tmp / "ckpt"),
               "--metrics-port", str(port), "--metrics-addr", "127.0.0.1"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env=env(TWA_SCALE_METRICS_DIR=str(mpdir), TWA_SCALE_METRICS_LINGER_SECONDS="15"))
        end = time.time()
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        yield prom, start, end, mpdir, tmp / "snap" / RUN_ID
    finally:
        prom.stop()


def _finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(v)) for series in result for _, v in series.get("values", [series.get("value")]))


def test_every_dashboard_query_returns_data(scraped_run):
    prom, start, end, _, _ = scraped_run
    queries = dashboard_queries(DASHBOARD, {"run_id": RUN_ID, "__rate_interval": "5s"})
    assert len(queries) >= 20
    empty = []
    for title, expr in queries:
        result = prom.query_range(expr, start - 5, end + 5, step=1)
        if not _finite(result):
            empty.append(f"{title}: {expr}")
    assert not empty, "dashboard queries without data:\n  " + "\n  ".join(empty)


def test_final_values_were_scraped(scraped_run):
    """The exporter's linger lets Prometheus read what the run wrote last (the TWA result)."""
    prom, start, end, _, run_dir = scraped_run
    result = json.loads((run_dir / "twa" / "result.json").read_text())
    window = f"[{int(time.time() - start) + 30}s]"
    samples = prom.query(f'sum(max_over_time(twa_scale_train_samples_total{{run_id="{RUN_ID}"}}{window}))')
    assert float(samples[0]["value"][1]) == 2 * 512.0   # 2 epochs of 512 images over both ranks
    ranks = prom.query(f'count(max_over_time(twa_scale_train_loss{{run_id="{RUN_ID}"}}{window}))')
    assert float(ranks[0]["value"][1]) == 2.0, "one exporter per node must carry both local ranks"
    acc = prom.query(f'last_over_time(twa_scale_twa_accuracy_ratio{{run_id="{RUN_ID}",rank="0"}}{window})')
    assert acc, "TWA accuracy never scraped"
    assert float(acc[0]["value"][1]) == pytest.approx(result["twa_accuracy"], abs=1e-6)
    coef = prom.query(f'last_over_time(twa_scale_twa_coefficient{{run_id="{RUN_ID}"}}{window})')
    assert 1 <= len(coef) <= 256


def test_alert_rules_load_in_the_server(scraped_run):
    prom = scraped_run[0]
    groups = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["name"] for r in rules} >= {"TwaScaleTrainingStalled", "TwaScaleSnapshotFailures"}
    assert all(r["health"] != "err" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    # a healthy run fires nothing
    assert not [a for a in prom.api("alerts")["alerts"] if a["labels"].get("run_id") == RUN_ID]


def test_run_exposition_passes_promtool(scraped_run, tmp_path):
    promtool = require_binary("promtool")
    mpdir = scraped_run[3]
    code = ("import sys\nfrom prometheus_client import CollectorRegistry, generate_latest\n"
            "from prometheus_client.multiprocess import MultiProcessCollector\n"
            "r = CollectorRegistry(); MultiProcessCollector(r, path=sys.argv[1])\n"
            "sys.stdout.write(generate_latest(r).decode())\n")
    text = subprocess.run([sys.executable, "-c", code, str(mpdir)], capture_output=True, text=True,
                          check=True).stdout
    assert "twa_scale_twa_loss{" in text and "twa_scale_snapshot_committed_total{" in text
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
