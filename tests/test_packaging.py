"""The installed package, as a user gets it: `pip install .` (not editable) into a fresh venv, then the
console script trains from an empty directory, with the default (shipped) DeepSpeed config and presets."""
import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.launch import RENDEZVOUS_ENV


def _see_the_outer_venv(venv) -> None:
    """Run from inside a virtualenv, `venv --system-site-packages` reaches the base interpreter's packages,
    not this venv's (where torch is): a .pth file in the inner venv lists this interpreter's site-packages.
    Plain paths, so their .pth files (this checkout's editable install among them) stay unprocessed."""
    if sys.prefix == sys.base_prefix:
        return  # the system interpreter (CI): --system-site-packages already sees its packages
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    (Path(purelib) / "outer-venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")


@pytest.mark.slow
def test_non_editable_install_trains_from_an_empty_directory(tmp_path):
    venv, work = tmp_path / "venv", tmp_path / "empty"
    work.mkdir()
    # the venv reuses the installed torch/deepspeed; the package itself is built from this checkout
    # without its own pip (ensurepip takes minutes on a loaded box): the visible outer pip installs into it
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=300)
    _see_the_outer_venv(venv)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", *RENDEZVOUS_ENV)}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps",
                          "--quiet", str(REPO)], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import twa_scale, twa_scale.train.engine as e; print(twa_scale.__file__); "
                            "print(e.default_ds_config_path())"],
                           cwd=work, env=env, capture_output=True, text=True, check=True, timeout=300)
    pkg, ds = where.stdout.split()[-2:]
    assert pkg.startswith(str(venv)) and ds.startswith(str(venv)) and os.path.isfile(ds), where.stdout
    run = subprocess.run([str(venv / "bin" / "twa-scale"), "train", "--data", "digits", "--epochs", "1", "--no-twa",
                          "--model", "mlp"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    metrics = json.loads((work / "twa_runs" / "mlp-digits-s0" / "train" / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1 and "val_accuracy" in metrics["final"]
    assert subprocess.run([str(venv / "bin" / "twa-scale"), "twa", "--preset", "paper_imagenet", "--snapshot-url",
                           "file:///x", "--run-id", "r", "--print-config"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300).stdout.count("base_lr: 0.3") == 1  # presets ship too
    kernel = subprocess.run([str(venv / "bin" / "python"), "-c", "from twa_scale.twa import quant; "
                             "print('twa_project' in quant._native_source())"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert kernel.stdout.split() == ["True"], kernel.stderr[-2000:]  # the C kernel source ships as package data
