"""Unit tier: configuration parsing and validation."""
import json

import pytest

from twa_scale.config import TrainConfig, parse_train_args
from twa_scale.engine import load_ds_config, lr_factor, resolve_batch


def test_no_arguments_selects_quickstart():
    cfg = parse_train_args([])
    assert (cfg.model, cfg.data, cfg.twa) == ("resnet20", "digits", True)
    assert cfg.run_id == "resnet20-digits-s0"


def test_flags_override_preset_and_derive_run_id():
    cfg = parse_train_args(["--preset", "quickstart", "--epochs", "3", "--seed", "7", "--no-twa"])
    assert cfg.epochs == 3 and cfg.seed == 7 and cfg.twa is False
    assert cfg.run_id == "resnet20-digits-s7"


@pytest.mark.parametrize("argv, flag", [
    (["--model", "resnet21"], "--model"),
    (["--epochs", "-1"], "--epochs"),
    (["--holdout-fraction", "1.0"], "--holdout-fraction"),
    (["--snapshot-every", "0"], "--snapshot-every"),
    (["--deepspeed_config", "/nonexistent/ds.json"], "--deepspeed_config"),
    (["--metrics-port", "70000"], "--metrics-port"),
])
def test_bad_flags_name_the_flag(argv, flag):
    with pytest.raises(ValueError, match=flag):
        parse_train_args(argv)


@pytest.mark.parametrize("argv", [["--schedule", "exp"], ["--snapshot-dtype", "int8"]])
def test_choices_rejected_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_train_args(argv)
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err
    with pytest.raises(ValueError, match=argv[0]):  # and by the dataclass, for Python callers
        TrainConfig(**{argv[0][2:].replace("-", "_"): argv[1]})


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError) as e:
        TrainConfig(model="resnet21")
    assert "resnet20" in str(e.value) and "resnet50" in str(e.value) and "wrn28_10" in str(e.value)


def test_data_dir_without_splits(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=r"--data .*expected subfolders train/ and val/ \(or test/\)"):
        TrainConfig(data=str(tmp_path))
    (tmp_path / "test").mkdir()
    TrainConfig(data=str(tmp_path))  # test/ is accepted in place of val/


def test_from_dict_round_trip_ignores_unknown_keys():
    cfg = TrainConfig(model="mlp", epochs=2, holdout_fraction=0.1, seed=3)
    d = json.loads(json.dumps(cfg.to_dict()))
    d["field_from_the_future"] = 1
    assert TrainConfig.from_dict(d) == cfg


def test_batch_must_divide_over_ranks_and_micro_batch():
    ds = {"train_batch_size": 128}
    assert resolve_batch(ds, batch_size=None, micro_batch=None, world=2) == (128, 64, 1)
    assert ds["train_micro_batch_size_per_gpu"] == 64
    assert resolve_batch({}, batch_size=256, micro_batch=32, world=2) == (256, 32, 4)
    with pytest.raises(ValueError, match=r"--batch-size 100 does not divide over 3 ranks × --micro-batch"):
        resolve_batch({}, batch_size=100, micro_batch=None, world=3)
    with pytest.raises(ValueError, match="--batch-size 128 does not divide over 2 ranks × --micro-batch 48"):
        resolve_batch({}, batch_size=128, micro_batch=48, world=2)


def test_ds_config_rejects_bf16_section(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_batch_size": 8, "bf16": {"enabled": True}}))
    with pytest.raises(ValueError, match="torch_autocast"):
        load_ds_config(str(p))
    p.write_text("{not json")
    with pytest.raises(ValueError, match=str(p)):
        load_ds_config(str(p))


def test_shipped_ds_configs_load():
    for name in ("cpu_smoke", "cifar_1gpu", "imagenet_r50_8gpu_zero2"):
        cfg = load_ds_config(f"ds_configs/{name}.json")
        assert not any(k.startswith("_") for k in cfg)


def test_step_schedule_matches_paper_recipe():
    total = 200
    f = [lr_factor(s, total, schedule="step", warmup_steps=0) for s in range(total)]
    assert f[0] == f[99] == 1.0 and f[100] == f[149] == 0.1 and f[150] == f[199] == 0.01
    c = [lr_factor(s, total, schedule="cosine", warmup_steps=10) for s in range(total)]
    assert c[0] == pytest.approx(0.1) and c[9] == 1.0 and c[10] == 1.0 and c[-1] < 0.001
    assert all(a >= b for a, b in zip(c[10:], c[11:]))


def test_help_lists_every_flag():
    from twa_scale.config import build_train_parser

    text = build_train_parser().format_help()
    assert "--snapshot-url" in text and "--init-from" in text and "50%" in text


def test_readme_documents_every_training_flag():
    import dataclasses
    from pathlib import Path

    from twa_scale.config import _flag

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [_flag(f.name) for f in dataclasses.fields(TrainConfig) if f"`{_flag(f.name)}`" not in readme]
    assert not missing, f"README configuration reference lacks {missing}"


def test_ci_runs_the_readme_test_command():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    block = re.search(r"<!-- ci:test-command -->\s*```bash\n(.*?)\n```", (root / "README.md").read_text(), re.S)
    assert block, "README.md lost its ci:test-command block"
    assert block.group(1).strip() in (root / ".ci" / "run").read_text().splitlines()
