"""Run project entry points as real processes: plain python, or `deepspeed` with several gloo ranks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import REPO, free_port


# An in-process test that joined a process group (comm.init's one-process fallback) leaves these in
# os.environ, with this process still listening on MASTER_PORT: a child must rendezvous on its own.
RENDEZVOUS_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env(unset: list[str] | tuple = (), **extra: str) -> dict[str, str]:
    """This process's environment for a child: the repo on PYTHONPATH, ``extra`` set, ``unset`` and the
    rendezvous variables removed."""
    e = {k: v for k, v in os.environ.items() if k not in unset and k not in RENDEZVOUS_ENV}
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")  # 2 cores: ranks must not oversubscribe them
    e.update(extra)
    return e


def run(args: list[str], *, timeout: float = 600, check: bool = True, extra_env: dict | None = None,
        unset_env: list[str] | tuple = (), cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command from the repo root; on failure the assertion shows its output tail."""
    proc = subprocess.run(args, cwd=cwd, env=env(unset_env, **(extra_env or {})), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def deepspeed(script: str, args: list[str], *, ranks: int = 1, **kw) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus R --master_port P script args` (gloo ranks on CPU)."""
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args]
    return run(cmd, **kw)


def python(script: str, args: list[str], **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, script, *args], **kw)

