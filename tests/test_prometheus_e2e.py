"""A real Prometheus scrapes a 2-rank training run and the live TWA follower beside it; every dashboard
query answers.

    deepspeed --num_gpus 2 launch/train.py --data digits --epochs 2 --snapshots-per-epoch 2 \
        --holdout-fraction 0.2 --metrics-port P ...
    deepspeed --num_gpus 1 launch/twa.py --follow --stop-rule none --metrics-port Q ...

The follower (started first: it waits for the run) probes every 2 snapshots on the hold-out split, which
feeds the "Live TWA probes" panel, and runs the final TWA stage when training ends (its result.json is
the run's TWA result, as in the Kubernetes JobSet).

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
    """(Prometheus server, run start, run end, multiprocess dirs, result dir) for one 2-rank run + follower."""
    require_binary("deepspeed")
    tmp = tmp_path_factory.mktemp("prom")
    port, follow_port = free_port(), free_port()
    rules = tmp / "alerts.yml"
    rules.write_text(yaml.safe_dump(yaml.safe_load(RULES.read_text())["spec"], sort_keys=False))
    prom = PrometheusServer(tmp / "prometheus", [f"127.0.0.1:{port}", f"127.0.0.1:{follow_port}"],
                            scrape_interval="1s", rule_files=[rules])
    prom.start()
    mpdir, follow_mpdir = tmp / "multiproc", tmp / "multiproc-follow"
    store = ["--snapshot-url", f"file://{tmp}/snap", "--run-id", RUN_ID, "--metrics-addr", "127.0.0.1"]
    follower = None
    try:
        start = time.time()
        follow = ["deepspeed", "--num_gpus", "1", "--master_port", str(free_port()), "launch/twa.py", *store,
                  "--follow", "--stop-rule", "none", "--probe-every", "2", "--probe-steps", "4",
                  "--probe-bn-batches", "2", "--poll-seconds", "0.5", "--follow-timeout", "300", "--epochs", "2",
                  "--metrics-port", str(follow_port)]
        follower = subprocess.Popen(follow, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=env(TWA_SCALE_METRICS_DIR=str(follow_mpdir),
                                            TWA_SCALE_METRICS_LINGER_SECONDS="15"))
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py", *store,
               "--data", "digits", "--model", "resnet20", "--epochs", "2", "--snapshots-per-epoch", "2",
               "--holdout-fraction", "0.2", "--limit-train", "512", "--limit-val", "256", "--no-twa", "--seed", "0",
               "--checkpoint-dir", str(tmp / "ckpt"), "--metrics-port", str(port)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env=env(TWA_SCALE_METRICS_DIR=str(mpdir), TWA_SCALE_METRICS_LINGER_SECONDS="15"))
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        follow_out, _ = follower.communicate(timeout=600)
        end = time.time()
        (tmp / "follow.log").write_text(follow_out)
        assert follower.returncode == 0, f"{' '.join(follow)}\n{follow_out[-6000:]}"
        yield prom, start, end, (mpdir, follow_mpdir), tmp / "snap" / RUN_ID
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
        prom.stop()


def _finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(v)) for series in result for _, v in series.get("values", [series.get("value")]))


def test_every_dashboard_query_returns_data(scraped_run):
    prom, start, end, _, _ = scraped_run
    # cluster and namespace at "All" (.*): this scrape has neither label, as a single-cluster Prometheus
    # outside Kubernetes would not
    queries = dashboard_queries(DASHBOARD, {"run_id": RUN_ID, "namespace": ".*", "cluster": ".*",
                                            "__rate_interval": "5s"})
    assert len(queries) >= 20
    empty = []
    for title, expr in queries:
        result = prom.query_range(expr, start - 5, end + 5, step=1)
        if not _finite(result):
            empty.append(f"{title}: {expr}")
    assert not empty, "dashboard queries without data:\n  " + "\n  ".join(empty)


def test_final_values_were_scraped(scraped_run):
    """The exporter's linger lets Prometheus read what the run wrote last (the follower's TWA result)."""
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
    probes = json.loads((run_dir / "twa" / "probes.json").read_text())["probes"]
    got = prom.query(f'last_over_time(twa_scale_twa_probe_accuracy_ratio{{run_id="{RUN_ID}"}}{window})')
    assert probes and float(got[0]["value"][1]) == pytest.approx(probes[-1]["twa_accuracy"], abs=1e-6)


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
    train_dir, follow_dir = scraped_run[3]
    code = ("import sys\nfrom prometheus_client import CollectorRegistry, generate_latest\n"
            "from prometheus_client.multiprocess import MultiProcessCollector\n"
            "r = CollectorRegistry(); MultiProcessCollector(r, path=sys.argv[1])\n"
            "sys.stdout.write(generate_latest(r).decode())\n")
    for mpdir, family in ((train_dir, "twa_scale_snapshot_committed_total{"),
                          (follow_dir, "twa_scale_twa_probe_accuracy_ratio{")):
        text = subprocess.run([sys.executable, "-c", code, str(mpdir)], capture_output=True, text=True,
                              check=True).stdout
        assert family in text
        lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
