"""The command blocks marked `<!-- test:readme-commands -->` in README.md and docs/*.md run as written
(CPU, digits).

Each runs with bash in a scratch directory that sees the repository's `launch/` (so the files the
commands write stay out of the checkout), README first, then the chapters in name order; a command that
appears in several files (the README sketches a chapter's example) runs once. The only change:
`deepspeed` gets a free --master_port, so parallel tests do not collide on DeepSpeed's default port.
"""
import json
import os
import re
import subprocess

import pytest

from tests.support import REPO, free_port


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _commands(doc) -> list[str]:
    blocks = re.findall(r"<!-- test:readme-commands -->\s*```bash\n(.*?)\n```", doc.read_text(), re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def _all_commands() -> list[str]:
    return list(dict.fromkeys(cmd for doc in DOCS for cmd in _commands(doc)))


def test_the_docs_mark_command_blocks():
    assert _commands(REPO / "README.md"), "the README's workflow sketch lost its runnable block"
    assert len(_all_commands()) >= 12


@pytest.mark.slow
@pytest.mark.multirank
def test_readme_commands_run_as_written(tmp_path):
    (tmp_path / "launch").symlink_to(REPO / "launch")
    # as users run them: the bare command's preset in force (tests/conftest.py sets none for the rest)
    env = {k: v for k, v in os.environ.items() if k != "TWA_SCALE_TRAIN_PRESET"} | {"PYTHONPATH": str(REPO)}
    for cmd in _all_commands():
        run = re.sub(r"\bdeepspeed ", f"deepspeed --master_port {free_port()} ", cmd, count=1)
        proc = subprocess.run(["bash", "-c", f"set -euo pipefail; {run}"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    resolved = (tmp_path / "my.yaml").read_text()
    assert "model: mlp" in resolved and "epochs: 2" in resolved
    # one run each (a run id has one writer): the installed script, the module, the config file, the env
    for run in ("installed", "module", "mlp-digits-s0", "env"):
        assert (tmp_path / "twa_runs" / run / "train" / "metrics.json").is_file(), run
    # The TWA section: 16 snapshots (3 epochs x 5 + seq 0) on 3 ranks, then the 4 epoch ends on 1 rank.
    for out, n, world in ((tmp_path / "twa_runs" / "demo" / "twa", 16, 3), (tmp_path / "demo-k1", 4, 1)):
        result = json.loads((out / "result.json").read_text())
        assert len(result["snapshots"]) == n and result["world_size"] == world, (out, result.keys())
    env_run = (tmp_path / "twa_runs" / "env" / "train" / "metrics.json").read_text()
    assert '"epoch": 1' in env_run and '"epoch": 2' not in env_run  # TWA_SCALE_TRAIN_EPOCHS=1 took effect
