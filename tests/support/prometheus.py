"""A real Prometheus server for tests (Debian package `prometheus`, DESIGN §3).

`PrometheusServer` writes a config that scrapes the given targets every `scrape_interval`,
starts `prometheus` on a free loopback port with its TSDB in a temp dir, and answers
queries through the HTTP API. It is stopped by its PID (SIGTERM, then SIGKILL).
`dashboard_queries` pulls every PromQL expression out of a Grafana dashboard JSON, with
Grafana's variables replaced the way Grafana would for one run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from tests.support import free_port, require_binary

__all__ = ["PrometheusServer", "dashboard_queries"]


class PrometheusServer:
    def __init__(self, workdir: Path, targets: list[str], *, scrape_interval: str = "1s",
                 rule_files: list[Path] = (), job: str = "twa-scale"):
        self.binary = require_binary("prometheus")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval,
                       "scrape_timeout": scrape_interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }
        self.config = self.workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = self.workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "PrometheusServer":
        log = open(self.log, "w")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus not ready on {self.url} after {timeout}s:\n{self.log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path>; returns `data`, raising on an API error (naming the query)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"prometheus API {path} {params}: HTTP {e.code}: {e.read().decode()}") from None
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus API {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} if at is None else {"query": expr, "time": at}
        return self.api("query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def scrapes_ok(self, job: str = "twa-scale") -> float:
        """Number of successful scrapes of `job` so far (from the `up` series)."""
        res = self.query(f'sum(sum_over_time(up{{job="{job}"}}[1h]))')
        return float(res[0]["value"][1]) if res else 0.0


def dashboard_queries(dashboard: Path, variables: dict[str, str]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, variables substituted."""
    dash = json.loads(Path(dashboard).read_text())
    out = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                expr = t["expr"]
                for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
                    expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
                assert "$" not in expr, f"panel {p['title']!r}: unsubstituted variable in {expr}"
                out.append((p["title"], expr))

    walk(dash["panels"])
    return out
