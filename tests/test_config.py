"""Configuration parsing and validation: flags, presets, config files, the environment, run ids."""
import dataclasses
import json

import pytest
import yaml

from twa_scale.train.config import TrainConfig, load_preset, parse_train_args, preset_names
from twa_scale.twa.config import TwaConfig, parse_twa_args

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("default_preset")]
TWA_REQUIRED = ["--snapshot-url", "memory://x", "--run-id", "r"]


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
    (["--lr", "abc"], "--lr"),
    (["--snapshots-per-epoch", "0"], "--snapshots-per-epoch"),
])
def test_bad_flags_name_the_flag(argv, flag):
    with pytest.raises(ValueError, match=flag):
        parse_train_args(argv)


@pytest.mark.parametrize("argv", [["--schedule", "exp"], ["--snapshot-dtype", "int8"]])
def test_choices_rejected_by_the_parser(argv):
    with pytest.raises(ValueError, match=f"^{argv[0]}: .*'cosine'.*Got value: exp$|^{argv[0]}: .*'bfloat16'.*int8$"):
        parse_train_args(argv)
    with pytest.raises(ValueError, match=argv[0]):  # and by the dataclass, for Python callers
        TrainConfig(**{argv[0][2:].replace("-", "_"): argv[1]})


def test_launcher_flags_and_both_spellings():
    """deepspeed passes --local_rank=N first; flags take dashes or underscores; booleans --x / --no-x / --x=false."""
    cfg = parse_train_args(["--local_rank=3", "--snapshot_url", "memory://a", "--weight-decay", "0.001", "--twa",
                            "--channels-last=false", "--deepspeed_config", "ds_configs/cpu_smoke.json"])
    assert (cfg.snapshot_url, cfg.weight_decay, cfg.twa, cfg.channels_last) == ("memory://a", 0.001, True, False)
    assert parse_train_args(["--twa=false", "--epochs", "1"]).twa is False
    assert parse_train_args(["--local_rank", "0"]).epochs == 12  # only the launcher's flag: still the quickstart


@pytest.mark.parametrize("stage, parse, extra", [("train", parse_train_args, []),
                                                 ("twa", parse_twa_args, TWA_REQUIRED)])
def test_unknown_preset_lists_valid_ones(stage, parse, extra):
    with pytest.raises(ValueError) as e:
        parse(extra + ["--preset", "nope"])
    assert str(e.value).startswith("--preset 'nope': no such preset") and all(
        n in str(e.value) for n in preset_names(stage))


def test_every_shipped_preset_parses():
    assert {"quickstart", "cifar_resnet20", "resnet50_imagenet"} <= set(preset_names("train"))
    assert {"paper_cifar", "paper_imagenet", "journal"} <= set(preset_names("twa"))
    for name in preset_names("train"):
        parse_train_args(["--preset", name, "--data", "digits"])
    for name in preset_names("twa"):
        parse_twa_args(TWA_REQUIRED + ["--preset", name])


def test_paper_presets_are_the_authors_protocols():
    cifar = parse_twa_args(TWA_REQUIRED + ["--preset", "paper_cifar"])
    assert (cifar.batch_size, cifar.lr, cifar.weight_decay, cifar.momentum, cifar.epochs, cifar.schedule,
            cifar.select) == (128, 2.0, 1e-5, 0.9, 10, "step", None)
    # the defaults too, but for the selection: every committed snapshot, against the paper's head
    assert cifar == dataclasses.replace(parse_twa_args(TWA_REQUIRED), select_epochs="0:50%")
    imagenet = parse_twa_args(TWA_REQUIRED + ["--preset", "paper_imagenet"])
    assert (imagenet.batch_size, imagenet.lr, imagenet.epochs, imagenet.mode) == (256, 0.3, 2, "paper")
    journal = parse_twa_args(TWA_REQUIRED + ["--preset", "journal"])
    assert (journal.warmup, journal.optimizer, journal.schedule, journal.weight_decay, journal.p_bits,
            journal.quant_granularity, journal.mode) == (0.2, "adamw", "cosine", 0.0, 4, "block", "journal")
    assert parse_train_args(["--preset", "resnet50_imagenet", "--data", "digits"]).snapshots_per_epoch == 5


def test_twa_lr_scales_with_its_own_batch(caplog):
    with caplog.at_level("INFO"):
        cfg = parse_twa_args(TWA_REQUIRED + ["--preset", "paper_imagenet", "--batch-size", "512"])
    assert (cfg.batch_size, cfg.lr) == (512, pytest.approx(0.6)) and "--lr 0.6: scaled linearly" in caplog.text
    assert parse_twa_args(TWA_REQUIRED + ["--batch-size", "64", "--lr", "0.5"]).lr == 0.5  # an explicit lr wins
    assert TwaConfig(snapshot_url="m://x", run_id="r", batch_size=256).lr == 4.0
    assert TwaConfig(snapshot_url="m://x", run_id="r").to_dict()["lr"] == 2.0  # reported in result.json


@pytest.mark.parametrize("stage, parse, argv", [
    ("train", parse_train_args, ["--preset", "resnet50_imagenet", "--data", "digits", "--lr", "0.2", "--no-resume"]),
    ("train", parse_train_args, []),
    ("twa", parse_twa_args, TWA_REQUIRED + ["--preset", "journal", "--batch-size", "256", "--select", "0::2"]),
])
def test_print_config_round_trips_through_config(stage, parse, argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv + ["--print-config"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    path = tmp_path / "c.yaml"
    path.write_text(text)
    again = parse(["--config", str(path)])
    assert again == parse(argv)
    printed = yaml.safe_load(text)
    default_preset = "quickstart" if stage == "train" else "none"
    assert printed.pop("preset") == dict(zip(argv, argv[1:])).get("--preset", default_preset)
    resolved = dataclasses.asdict(again)
    assert printed.keys() == resolved.keys() and {k for k, v in printed.items() if v != resolved[k]} <= \
        {"run_id", "checkpoint_dir", "checkpoint_url", "lr"}  # what stays derived: null in the print


def _print_config(parse, argv, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(argv + ["--print-config"])
    path = tmp_path / "printed.yaml"
    path.write_text(capsys.readouterr().out)
    return str(path)


def test_a_printed_config_is_a_template_whose_derived_values_follow_the_flags(tmp_path, capsys):
    """Derived values print as null and stay derived: --batch-size rescales the TWA lr, --model renames the run."""
    printed = _print_config(parse_twa_args, TWA_REQUIRED, tmp_path, capsys)
    assert yaml.safe_load(open(printed))["lr"] is None
    assert parse_twa_args(["--config", printed]).lr == 2.0
    assert parse_twa_args(["--config", printed, "--batch-size", "256"]).lr == pytest.approx(4.0)
    # a value the user set is kept as set
    printed = _print_config(parse_twa_args, TWA_REQUIRED + ["--lr", "0.5"], tmp_path, capsys)
    assert parse_twa_args(["--config", printed, "--batch-size", "256"]).lr == 0.5

    printed = _print_config(parse_train_args, [], tmp_path, capsys)
    cfg = parse_train_args(["--config", printed, "--model", "mlp"])
    assert (cfg.run_id, cfg.model, cfg.epochs, cfg.twa) == ("mlp-digits-s0", "mlp", 12, True)
    assert cfg.checkpoint_url.endswith("/mlp-digits-s0/checkpoints") and cfg.checkpoint_dir.endswith("mlp-digits-s0")
    printed = _print_config(parse_train_args, ["--run-id", "mine"], tmp_path, capsys)
    assert parse_train_args(["--config", printed, "--model", "mlp"]).run_id == "mine"


def test_the_preset_stays_in_force_until_another_or_none_is_picked(caplog):
    with caplog.at_level("INFO"):
        cfg = parse_train_args(["--epochs", "3"])
    assert (cfg.epochs, cfg.twa, cfg.twa_lr) == (3, True, 0.5)  # a flag changes that value only
    assert "preset quickstart in force" in caplog.text
    bare = parse_train_args(["--preset", "none", "--epochs", "3"])
    assert (bare.epochs, bare.twa, bare.twa_lr) == (3, False, None) and bare == TrainConfig(epochs=3)
    assert parse_twa_args(TWA_REQUIRED) == TwaConfig(snapshot_url="memory://x", run_id="r")  # TWA: no default preset


def test_the_environment_or_a_config_file_may_name_the_preset(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("preset: cifar_resnet20\ndata: digits\nepochs: 3\n")
    cfg = parse_train_args(["--config", str(path)])
    assert (cfg.epochs, cfg.batch_size, cfg.twa) == (3, 128, False)  # the preset's batch, the file's epochs
    monkeypatch.setenv("TWA_SCALE_TRAIN_PRESET", "none")
    assert parse_train_args(["--epochs", "3"]) == TrainConfig(epochs=3)


def test_the_quickstart_is_the_bare_command():
    """`deepspeed launch/train.py` with no arguments: the quickstart preset over the dataclass defaults."""
    want = dataclasses.replace(TrainConfig(), run_id=None, checkpoint_dir=None, checkpoint_url=None,
                               **load_preset("train", "quickstart"))
    assert parse_train_args([]) == want


def test_config_file_then_flags_and_environment(tmp_path, monkeypatch):
    path = tmp_path / "my.yaml"
    path.write_text("epochs: 3\nlr: 0.05\nmodel: mlp\n")
    cfg = parse_train_args(["--config", str(path), "--lr", "0.2"])
    assert (cfg.epochs, cfg.lr, cfg.model) == (3, 0.2, "mlp")
    monkeypatch.setenv("TWA_SCALE_TRAIN_EPOCHS", "7")
    assert parse_train_args(["--model", "mlp"]).epochs == 7  # environment over defaults
    assert parse_train_args(["--config", str(path)]).epochs == 3  # the command line over the environment
    monkeypatch.setenv("TWA_SCALE_TWA_LR", "0.25")
    assert parse_twa_args(TWA_REQUIRED).lr == 0.25
    path.write_text("epochs: 3\nbogus: 1\n")
    with pytest.raises(ValueError, match="bogus"):
        parse_train_args(["--config", str(path)])


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


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse_train_args(["--help"])
    text = capsys.readouterr().out
    assert "--snapshot-url" in text and "--init-from" in text and "int(0.75E+0.9)" in text and "--preset" in text
    assert "TWA_SCALE_TRAIN_EPOCHS" in text


@pytest.mark.parametrize("run_id", ["a\nb", "a/b", "a b", ".hidden", "-x", "x" * 129, ""])
def test_run_ids_outside_the_safe_set_are_refused_naming_the_flag(run_id):
    for parse, extra in ((parse_train_args, ["--data", "digits"]), (parse_twa_args, ["--snapshot-url", "memory://x"])):
        with pytest.raises(ValueError, match=r"^--run-id"):
            parse([*extra, f"--run-id={run_id}"])


def test_a_derived_run_id_is_made_safe():
    cfg = parse_train_args(["--data", "digits", "--model", "mlp", "--seed", "3"])
    assert cfg.run_id == "mlp-digits-s3"
    assert parse_train_args(["--data", "digits", "--run-id", "r20.s0_v-2"]).run_id == "r20.s0_v-2"


def test_a_malformed_config_file_is_named_with_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlr: [0.1\n")
    with pytest.raises(ValueError, match=rf"^--config {bad}: line 3, column 1: not valid YAML"):
        parse_train_args(["--config", str(bad)])
    with pytest.raises(ValueError, match=rf"^--config {tmp_path}/missing.yaml: No such file"):
        parse_twa_args(["--config", str(tmp_path / "missing.yaml")])
