"""The README's quick start, as written, after the install that CI has already done.

Its second command runs in a scratch directory that sees the repository's `launch/` (as the README
commands test does), with a free --master_port. It must end with the accuracies the README states, and its
log (not a TTY) must fit a cluster: no carriage return, no line of 300 characters or more, and no INFO
line from anything but twa_scale (botocore's, DeepSpeed's launcher's).
"""
import os
import re
import subprocess

import pytest

from tests.support import REPO, free_port

# The README's accuracies are one run's; another host may differ by a few of the 360 validation images.
TOLERANCE = 0.015


def _quickstart() -> tuple[str, dict[str, float]]:
    """The quick start's training command and the accuracies the README states for it."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    install_and_run = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).strip()
    assert install_and_run.startswith("pip install -e . && "), install_and_run
    stated = re.search(r"last / SWA / TWA accuracy\s*\(measured [^:]*: ([\d.]+) / ([\d.]+) / ([\d.]+)[:)]", section)
    assert stated, "the quick start lost its measured accuracies"
    return install_and_run.split(" && ", 1)[1], dict(zip(("last (SGD)", "SWA", "TWA"), map(float, stated.groups())))


@pytest.mark.slow
@pytest.mark.e2e
def test_the_quickstart_prints_the_readme_accuracies_in_a_log_fit_for_a_cluster(tmp_path):
    command, stated = _quickstart()
    (tmp_path / "launch").symlink_to(REPO / "launch")
    env = {k: v for k, v in os.environ.items() if k != "TWA_SCALE_TRAIN_PRESET"} | {"PYTHONPATH": str(REPO)}
    run = command.replace("deepspeed ", f"deepspeed --master_port {free_port()} ", 1)
    proc = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "\r" not in log
    lines = log.splitlines()
    assert max(len(line) for line in lines) < 300
    info = [line for line in lines if re.search(r"\bINFO\b", line)]
    assert all(re.match(r"\S+ \S+ INFO twa_scale[.:]", line) for line in info), info
    assert "preset quickstart in force" in log
    printed = dict(re.findall(r"^(last \(SGD\)|SWA|TWA)\s+([\d.]+)$", proc.stdout, re.M))
    assert set(printed) == set(stated), proc.stdout[-2000:]
    for method, acc in stated.items():
        assert float(printed[method]) == pytest.approx(acc, abs=TOLERANCE), (method, printed)
