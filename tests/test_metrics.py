"""twa_scale.metrics: no-ops before setup, one exporter per node, bounded series, clear errors.

Each case runs in fresh subprocesses: setup() switches prometheus_client into
multiprocess mode for the whole process, which must not leak into pytest.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from tests.support import REPO, free_port, require_binary

pytestmark = pytest.mark.e2e  # every case is a fresh process (above): not the unit lane
PRELUDE = "import sys, time, urllib.request; sys.path.insert(0, %r)\nfrom twa_scale import metrics\n" % str(REPO)


def _run(code: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _spawn(code: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
                            env={**os.environ, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _scrape(port: int, deadline: float = 20.0) -> str:
    end = time.monotonic() + deadline
    while True:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def _samples(text: str, name: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(name + "{") or ln.startswith(name + " ")]


def test_calls_before_setup_are_noops_and_port_zero_disables():
    r = _run("""
        metrics.train_step(0.1, 32, 2.0, 0.1); metrics.snapshot_failure(); metrics.twa_coefficients([1.0])
        assert metrics._m is None  # recording is off until setup
        metrics.setup(run_id="r", role="train", port=0)
        metrics.train_step(0.1, 32, 2.0, 0.1)
        assert metrics._m is None and metrics._state.server is None
        import prometheus_client.values as v
        assert not getattr(v.ValueClass, "_multiprocess", False), "port 0 must not touch prometheus_client"
        print("ok")
    """, env={"LOCAL_RANK": "0", "RANK": "0"})
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_bad_setup_arguments_name_the_parameter():
    r = _run("""
        for kw, word in ((dict(run_id="", role="train", port=1), "run_id"),
                         (dict(run_id="r", role="Train!", port=1), "role"),
                         (dict(run_id="r", role="train", port=70000), "70000")):
            try:
                metrics.setup(**kw)
            except ValueError as e:
                assert word in str(e), e
            else:
                raise SystemExit(f"no error for {kw}")
        print("ok")
    """)
    assert r.returncode == 0, r.stderr


def test_one_exporter_aggregates_local_ranks(tmp_path):
    """Two local ranks of one launch: rank 0 serves both; gauges carry no pid label."""
    port = free_port()
    worker = f"""
        import os
        metrics.setup(run_id="agg", role="train", port={port}, addr="127.0.0.1")
        r = int(os.environ["RANK"])
        for _ in range(3):
            metrics.train_step(0.05, 16, 1.5 + r, 0.1)
        metrics.snapshot_upload(0.2, 1000 * (r + 1))
        metrics.snapshot_committed(7)
        print("ready", flush=True)
        sys.stdin.readline()   # hold until the test has scraped
    """
    env = {"TWA_SCALE_METRICS_DIR": str(tmp_path / "prom"), "TWA_SCALE_METRICS_LINGER_SECONDS": "0"}
    procs = [_spawn(worker, {**env, "RANK": str(r), "LOCAL_RANK": str(r), "TWA_SCALE_NODE_NAME": "n0"}) for r in (0, 1)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        text = _scrape(port)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert "pid=" not in text
    loss = _samples(text, "twa_scale_train_loss")
    assert len(loss) == 2, loss
    assert any('rank="1"' in ln and ln.endswith(" 2.5") for ln in loss), loss
    samples = {ln.split("{")[1].split("}")[0]: float(ln.rsplit(" ", 1)[1])
               for ln in _samples(text, "twa_scale_train_samples_total")}
    assert sorted(samples.values()) == [48.0, 48.0]
    assert all('node="n0"' in k and 'run_id="agg"' in k and 'role="train"' in k for k in samples)
    nbytes = sum(float(ln.rsplit(" ", 1)[1]) for ln in _samples(text, "twa_scale_snapshot_bytes_total"))
    assert nbytes == 3000.0
    # counters of the role are pre-created at 0, so increase() sees the first failure
    assert all(ln.endswith(" 0.0") for ln in _samples(text, "twa_scale_snapshot_failures_total"))
    assert not _samples(text, "twa_scale_twa_steps_total"), "train role must not export TWA counters"


def test_port_in_use_is_a_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run(f"""
            try:
                metrics.setup(run_id="busy", role="train", port={port}, addr="127.0.0.1")
            except metrics.MetricsPortInUseError as e:
                print("ERR", e)
        """, env={"LOCAL_RANK": "0", "RANK": "0"})
    assert r.returncode == 0, r.stderr
    assert f"metrics port {port}" in r.stdout and "already in use" in r.stdout, r.stdout


def test_coefficients_are_bounded_and_role_switch_keeps_exporter():
    port = free_port()
    r = _run(f"""
        import urllib.request
        metrics.setup(run_id="coef", role="train", port={port}, addr="127.0.0.1", max_series=8)
        metrics.train_step(0.1, 4, 1.0, 0.1)
        # train.py --twa: the TWA stage sets up again (here with port 0): same exporter, new role
        metrics.setup(run_id="coef", role="twa", port=0)
        assert metrics._state.server is not None and metrics._state.port == {port}
        import torch
        metrics.twa_coefficients(torch.full((5, 4), 0.05))   # n x L layer-wise: 20 values
        metrics.twa_step(0.3); metrics.twa_eval(0.9); metrics.twa_effective_rank(5)
        print(urllib.request.urlopen("http://127.0.0.1:{port}/metrics").read().decode())
    """, env={"LOCAL_RANK": "0", "RANK": "0", "TWA_SCALE_METRICS_LINGER_SECONDS": "0"})
    assert r.returncode == 0, r.stderr
    coef = _samples(r.stdout, "twa_scale_twa_coefficient")
    assert len(coef) == 8 and all('role="twa"' in ln for ln in coef), coef
    assert _samples(r.stdout, "twa_scale_twa_coefficients")[0].endswith(" 20.0")
    assert "exporting the first 8 of 20" in r.stderr
    assert _samples(r.stdout, "twa_scale_train_loss")[0].count('role="train"') == 1


def test_exporter_lingers_for_one_scrape_after_exit():
    """A scraper that has been watching gets the final values before the process exits."""
    port = free_port()
    p = _spawn(f"""
        metrics.setup(run_id="linger", role="train", port={port}, addr="127.0.0.1")
        metrics.train_epoch(1, 0.25, 1.0)
        print("ready", flush=True)
        sys.stdin.readline()
        metrics.train_epoch(2, 0.75, 0.5)   # final value, written just before exit
    """, {"LOCAL_RANK": "0", "RANK": "0", "TWA_SCALE_METRICS_LINGER_SECONDS": "20"})
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        assert _samples(_scrape(port), "twa_scale_train_epoch")[0].endswith(" 1.0")
        p.stdin.write("\n")
        p.stdin.flush()
        time.sleep(0.5)
        assert p.poll() is None, "exporter must wait for a scrape of the final values"
        assert _samples(_scrape(port), "twa_scale_train_epoch")[0].endswith(" 2.0")
        assert p.wait(timeout=10) == 0
    finally:
        p.kill()
        p.wait()


def test_exporter_does_not_linger_without_a_scraper():
    port = free_port()
    t0 = time.monotonic()
    r = _run(f"""
        metrics.setup(run_id="nolinger", role="train", port={port}, addr="127.0.0.1")
        metrics.train_epoch(1, 0.25, 1.0)
    """, env={"LOCAL_RANK": "0", "RANK": "0", "TWA_SCALE_METRICS_LINGER_SECONDS": "30"})
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 20


@pytest.mark.prometheus
def test_exposition_passes_promtool(tmp_path):
    promtool = require_binary("promtool")
    port = free_port()
    r = _run(f"""
        metrics.setup(run_id="lint", role="train", port={port}, addr="127.0.0.1")
        metrics.train_step(0.1, 32, 2.3, 0.1); metrics.train_epoch(1, 0.5, 1.2)
        metrics.snapshot_stall(0.001); metrics.snapshot_upload(0.5, 1000); metrics.snapshot_retry()
        metrics.snapshot_failure(); metrics.snapshot_skipped(); metrics.snapshot_queue_depth(1)
        metrics.snapshot_committed(3)
        metrics.setup(run_id="lint", role="twa", port={port}, addr="127.0.0.1")
        metrics.twa_load(0.1, 100); metrics.twa_projection(0.001); metrics.twa_step(0.5)
        metrics.twa_eval(0.9); metrics.twa_effective_rank(5); metrics.twa_coefficients([0.2, 0.8])
        print(urllib.request.urlopen("http://127.0.0.1:{port}/metrics").read().decode())
    """, env={"LOCAL_RANK": "0", "RANK": "0", "TWA_SCALE_METRICS_LINGER_SECONDS": "0",
              "TWA_SCALE_METRICS_DIR": str(tmp_path / "prom")})
    assert r.returncode == 0, r.stderr
    lint = subprocess.run([promtool, "check", "metrics"], input=r.stdout, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
