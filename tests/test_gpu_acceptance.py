"""`bash bench/gpu_acceptance.sh --dry-run`: the GPU acceptance script runs end to end on CPU, so it never rots."""
import json
import os
import subprocess
import sys

import pytest

from tests.support import REPO, missing

TAR = REPO.parent / "shared" / "datasets" / "cifar10.tar.gz"


@pytest.mark.slow
def test_dry_run_writes_one_json_with_every_section(tmp_path):
    if not TAR.exists():
        missing(f"CIFAR-10 archive at {TAR}")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_acceptance.sh", "--dry-run", str(out), "--data-tar", str(TAR),
                           "--require-data", "--work-dir", str(tmp_path / "work")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_acceptance.json", "gpu_acceptance.log"]
    result = json.loads((out / "gpu_acceptance.json").read_text())
    assert result["mode"] == "dry-run" and result["ok"] is True
    s = result["sections"]
    assert set(s) == {"env", "gpu_tests", "train_throughput", "twa_step", "streamer_hotpath", "store_clients",
                      "data_gpu_decode", "e2e_cifar10"}
    assert {k: v["status"] for k, v in s.items() if k != "data_gpu_decode"} == dict.fromkeys(
        set(s) - {"data_gpu_decode"}, "pass")
    assert s["store_clients"]["upload_vs_boto3"] > 0 and s["store_clients"]["read_vs_s3fs"] > 0
    assert s["data_gpu_decode"]["status"] in ("pass", "skip") and s["data_gpu_decode"].get("note")
    assert s["env"]["import_errors"] == {} or set(s["env"]["import_errors"]) <= {"triton", "boto3", "s3fs"}
    assert s["gpu_tests"]["failed"] == 0 and s["gpu_tests"]["skipped"] >= 1  # CPU: the gpu tier skips
    assert s["train_throughput"]["engine_vs_plain"] > 0 and s["train_throughput"]["met"] is None
    assert s["train_throughput"]["k5_stall_vs_memcpy"] > 0 and s["train_throughput"]["k5_met"] is None
    assert {(c["n"], c["p_bits"]) for c in s["twa_step"]["configs"]} == {(4, 32), (8, 32), (4, 4), (8, 4)}
    assert s["streamer_hotpath"]["committed"] >= 4 and s["streamer_hotpath"]["stall_vs_baseline"] > 0
    e2e = s["e2e_cifar10"]
    assert [e["epoch"] for e in e2e["epochs"]] == [1, 2] and all(e["seconds"] > 0 for e in e2e["epochs"])
    assert 0 <= e2e["twa_accuracy"] <= 1 and 0 <= e2e["swa_accuracy"] <= 1 and len(e2e["twa_snapshots"]) >= 2
    assert result["claims"] and all(v is None for v in result["claims"].values())  # tiny sizes: not judged


@pytest.mark.slow
def test_science_dry_run_writes_the_frontier_report_and_the_followers_decisions(tmp_path):
    """`--science --dry-run`: the GPU science run's plan (reproduce's frontier with a follower on the head run) at
    E=4, K=2, H=1,2, T=1 on a few hundred images."""
    if not TAR.exists():
        missing(f"CIFAR-10 archive at {TAR}")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    # a generous budget: on a shared 2-core box (load ~10) the 8 processes' start-up alone took ~6 minutes
    proc = subprocess.run(["bash", "bench/gpu_acceptance.sh", "--science", "--dry-run", str(out), "--data-tar",
                           str(TAR), "--require-data", "--work-dir", str(tmp_path / "work"), "--budget-seconds", "840"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_acceptance.json").read_text())
    assert set(result["sections"]) == {"env", "science"} and result["ok"] is True
    sci = result["sections"]["science"]
    assert sci["status"] == "pass" and sci["missing_steps"] == [] and "--follow-head" in sci["command"]
    science = out / "science"
    for name in ("report.md", "results.json", "frontier.png", "probes.json"):
        assert (science / name).is_file(), sorted(p.name for p in science.iterdir())
    blob = (science / "frontier.png").read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5_000
    assert not (science / "work").exists()  # snapshots and checkpoints stay in the scratch space

    # the frontier rows: TWA per head (H + T epochs spent), SGD on those budgets, full SGD, SWA
    res = json.loads((science / "results.json").read_text())
    pts = {m: [r["epochs_spent"] for r in rows] for m, rows in res["frontier"]["points"].items()}
    assert pts == {"twa": [2, 3], "sgd_budget": [2, 3], "sgd_full": [4], "swa": [1, 2]}
    assert [c["head"] for c in res["frontier"]["claims"]] == [1, 2]
    assert all(c["vs_budget_sgd"]["n"] == 1 for c in res["frontier"]["claims"])
    assert sci["frontier"]["twa"] == [{"epochs_spent": x, "accuracy": r["mean"]}
                                      for x, r in zip((2, 3), res["frontier"]["points"]["twa"])]
    report = (science / "report.md").read_text()
    assert "## Equal-compute frontier" in report and "![accuracy against epochs spent](frontier.png)" in report

    # the follower on the head run: every probe of probes.json, each with its decision, in results and report
    probes = json.loads((science / "probes.json").read_text())["probes"]
    fol = res["seeds"]["0"]["follower"]
    assert probes and [q["epoch"] for q in fol["probes"]] == [q["epoch"] for q in probes]
    assert all(q["decision"] and q["would_stop"] is not None for q in fol["probes"])
    assert fol["rule"] == "gain" and fol["epochs_trained"] == 4  # record-only: the run went to its end
    assert sci["follower"]["rule"] == "gain" and len(sci["follower"]["decisions"]) == len(probes)
    assert "## Live follower on the head run (seed 0)" in report
    assert all(q["decision"] in report for q in probes)
