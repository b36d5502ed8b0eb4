"""Unit tier: the linter CI runs (`ruff check .`, rules in pyproject.toml's [tool.ruff])."""
import shutil
import subprocess
import sys

import pytest

from tests.support import REPO

pytestmark = pytest.mark.unit


def test_ruff_check_passes():
    ruff = shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    proc = subprocess.run([*cmd, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
