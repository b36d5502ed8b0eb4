"""The shipped presets are the TWA authors' recipes, value by value.

The table below is kept here, independently of the YAML files, each value with the authors' file and line
(github.com/nblt/TWA at fd0cf0a); a preset that drifts from it fails. The recipe lines of docs/training.md are
checked against the same values.
"""
import re
import types
from pathlib import Path

import pytest
import torch

from twa_scale.train.config import parse_train_args
from twa_scale.train.engine import build_optimizer
from twa_scale.train.schedule import lr_factor, milestones
from twa_scale.twa.config import parse_twa_args
from twa_scale.twa.selection import select_by_epochs

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("default_preset")]

TWA_REQUIRED = ["--snapshot-url", "memory://x", "--run-id", "r"]

# (field, the authors' value, where they set it)
AUTHORS = {
    ("train", "cifar_resnet20"): [
        ("epochs", 200, "run.sh:10 --epochs=200"),
        ("lr", 0.1, "run.sh:10 --lr 0.1 (train_sgd_cifar.py:38)"),
        ("batch_size", 128, "train_sgd_cifar.py:36"),
        ("momentum", 0.9, "train_sgd_cifar.py:40"),
        ("weight_decay", 1e-4, "train_sgd_cifar.py:42"),
        ("decay_norm_bias", True, "train_sgd_cifar.py:183 SGD(model.parameters(), ...)"),
        ("schedule", "step", "train_sgd_cifar.py:191 MultiStepLR, stepped per epoch (:212)"),
        ("warmup_epochs", 0.0, "train_sgd_cifar.py: no warm-up"),
        ("snapshot_every", 1, "train_sgd_cifar.py:201 (seq 0) and one per epoch"),
    ],
    ("train", "resnet50_imagenet"): [
        ("epochs", 90, "train_sgd_imagenet.py:42"),
        ("momentum", 0.9, "train_sgd_imagenet.py:53"),
        ("weight_decay", 1e-4, "train_sgd_imagenet.py:55"),
        ("decay_norm_bias", True, "train_sgd_imagenet.py:206 SGD(model.parameters(), ...)"),
        ("schedule", "step", "train_sgd_imagenet.py:470-472"),
        ("lr_milestones", [30, 60], "train_sgd_imagenet.py:472 lr * 0.1 ** (epoch // 30)"),
        ("warmup_epochs", 0.0, "train_sgd_imagenet.py:470-472: no warm-up"),
        ("snapshots_per_epoch", 5, "train_sgd_imagenet.py:358-369"),
    ],
    ("twa", "paper_cifar"): [
        ("epochs", 10, "run.sh:16 --epochs 10"),
        ("lr", 2.0, "run.sh:13 lr=2"),
        ("batch_size", 128, "run.sh:19 --batch-size 128"),
        ("momentum", 0.9, "train_twa.py:41"),
        ("weight_decay", 1e-5, "run.sh:15 wd_psgd=0.00001"),
        ("schedule", "step", "run.sh:17 --schedule step; train_twa.py:167-168"),
        ("select_epochs", "0:50%", "run.sh:14 end=101: seq 0..100 of a 200-epoch run"),
        ("start", None, "run.sh:18 --train_start -1: the SWA mean (train_twa.py:194-196)"),
    ],
    ("twa", "paper_imagenet"): [
        ("epochs", 2, "run.sh:38 --epochs 2"),
        ("lr", 0.3, "run.sh:36 lr=0.3"),
        ("batch_size", 256, "run.sh:41 --batch-size 256"),
        ("momentum", 0.9, "train_twa.py:41"),
        ("weight_decay", 1e-5, "run.sh:35 wd_psgd=0.00001"),
        ("schedule", "step", "run.sh:39 --schedule step"),
        ("select_epochs", "0:60", "run.sh:40 --params_end 301: seq 0..300 at 5 per epoch"),
        ("start", None, "run.sh:40 --train_start -1: the SWA mean"),
    ],
}


def _resolved(stage: str, name: str):
    if stage == "train":
        return parse_train_args(["--preset", name, "--data", "digits"])
    return parse_twa_args(TWA_REQUIRED + ["--preset", name])


@pytest.mark.parametrize("stage, name", sorted(AUTHORS))
def test_preset_equals_the_authors_recipe(stage, name):
    cfg = _resolved(stage, name)
    wrong = [f"{field}: preset {getattr(cfg, field)!r}, authors {want!r} ({where})"
             for field, want, where in AUTHORS[(stage, name)] if getattr(cfg, field) != want]
    assert not wrong, f"{stage} preset {name} differs from the authors' recipe: {wrong}"


def test_cifar_milestones_and_imagenet_lr_scaling_are_the_authors():
    # train_sgd_cifar.py:191 milestones=[100, 150] at the preset's 200 epochs
    assert milestones(_resolved("train", "cifar_resnet20").epochs) == (100, 150)
    # train_sgd_imagenet.py:46,51: lr 0.1 at a global batch of 256; the preset scales it linearly
    r50 = _resolved("train", "resnet50_imagenet")
    assert r50.lr / r50.batch_size * 256 == pytest.approx(0.1)
    # train_sgd_imagenet.py:472, epoch by epoch over the 90 epochs
    got = [lr_factor(e * 7, schedule="step", epochs=90, steps_per_epoch=7, lr_milestones=r50.lr_milestones)
           for e in range(90)]
    assert got == pytest.approx([0.1 ** (e // 30) for e in range(90)])


def test_trainer_defaults_follow_the_authors():
    cfg = parse_train_args(["--data", "digits", "--epochs", "1"])
    assert (cfg.weight_decay, cfg.decay_norm_bias, cfg.lr_milestones) == (1e-4, True, None)


def _optimizer_groups(argv):
    cfg = parse_train_args(["--data", "digits", "--epochs", "1", *argv])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    opt = build_optimizer(model, cfg)
    return {(p.ndim, g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


def test_weight_decay_reaches_batchnorm_and_biases_unless_switched_off():
    assert _optimizer_groups([]) == {(4, 1e-4), (1, 1e-4), (2, 1e-4)}
    assert _optimizer_groups(["--no-decay-norm-bias"]) == {(4, 1e-4), (1, 0.0), (2, 1e-4)}


def test_lr_milestones_are_checked():
    with pytest.raises(ValueError, match=r"^--lr-milestones: expected increasing"):
        parse_train_args(["--data", "digits", "--lr-milestones", "[60, 30]"])
    with pytest.raises(ValueError, match=r"^--lr-milestones: only applies to --schedule step"):
        parse_train_args(["--data", "digits", "--schedule", "cosine", "--lr-milestones", "[30]"])


def test_paper_head_selection_is_the_first_half_of_the_run():
    # a 20-epoch run at 1 snapshot per epoch: 0:50% is seq 0..10, as the authors' params_end = E/2 + 1
    infos = [types.SimpleNamespace(seq=s, epoch=s, epoch_fraction=float(s)) for s in range(21)]
    assert [i.seq for i in select_by_epochs(infos, "0:50%", run_epochs=20)] == list(range(11))
    # at 5 per epoch, 0:60 of a 90-epoch run is seq 0..300
    infos = [types.SimpleNamespace(seq=s, epoch=s // 5, epoch_fraction=s / 5) for s in range(451)]
    assert [i.seq for i in select_by_epochs(infos, "0:60", run_epochs=90)] == list(range(301))
    # an explicit --select replaces the preset's selection instead of clashing with it
    cfg = parse_twa_args(TWA_REQUIRED + ["--preset", "paper_cifar", "--select", "0:11"])
    assert (cfg.select, cfg.select_epochs) == ("0:11", None)


def test_documented_recipe_lines_match_the_presets():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    cifar = re.search(r"# CIFAR-10, ResNet-20, the TWA authors' recipe \((.*)\)", readme)
    assert cifar, "docs/training.md lost its CIFAR recipe line"
    c = _resolved("train", "cifar_resnet20")
    assert f"wd {c.weight_decay:g}" in cifar.group(1) and f"lr {c.lr:g}" in cifar.group(1)
    assert "÷10 at epochs 100 and 150" in cifar.group(1) and "BatchNorm and biases decayed" in cifar.group(1)
    imagenet = re.search(r"# ImageNet, ResNet-50 \(preset: (.*)\)", readme)
    assert imagenet, "docs/training.md lost its ImageNet recipe line"
    r = _resolved("train", "resnet50_imagenet")
    assert f"lr {r.lr:g} at batch {r.batch_size}" in imagenet.group(1)
    assert "÷10 at epochs 30 and 60" in imagenet.group(1) and "no warm-up" in imagenet.group(1)
