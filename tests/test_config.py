"""Unit tier: configuration parsing and validation, presets, config files, the LR schedule."""
import dataclasses
import json

import pytest
import yaml

from twa_scale.config import TrainConfig, load_preset, parse_train_args, preset_names
from twa_scale.engine import build_lr_scheduler, load_ds_config, lr_factor, milestones, resolve_batch
from twa_scale.twa.config import TwaConfig, parse_twa_args

pytestmark = pytest.mark.unit
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


def test_batch_must_divide_over_ranks_and_micro_batch():
    ds = {"train_batch_size": 128}
    assert resolve_batch(ds, batch_size=None, micro_batch=None, world=2) == (128, 64, 1)
    assert ds["train_micro_batch_size_per_gpu"] == 64
    assert resolve_batch({}, batch_size=256, micro_batch=32, world=2) == (256, 32, 4)
    with pytest.raises(ValueError, match=r"--batch-size 100 does not divide over 3 ranks × --micro-batch .*"
                                         r"nearest valid: 96, 99, 102$"):
        resolve_batch({}, batch_size=100, micro_batch=None, world=3)
    with pytest.raises(ValueError, match="--batch-size 128 does not divide over 2 ranks × --micro-batch 48; "
                                         "nearest valid: 96, 192, 288"):
        resolve_batch({}, batch_size=128, micro_batch=48, world=2)


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_ds_config_optimizer_and_scheduler_are_refused(section, tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_batch_size": 8, section: {"type": "Adam", "params": {}}}))
    with pytest.raises(ValueError, match=f"--deepspeed_config {p}: the '{section}' section is not supported"):
        load_ds_config(str(p))


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


@pytest.mark.parametrize("epochs, factors", [(2, [1.0, 0.1]),
                                             (10, [1.0] * 5 + [0.1] * 3 + [0.01] * 2)])
def test_paper_schedule_per_epoch_factors(epochs, factors):
    """The authors' MultiStepLR, milestones [int(0.5E), int(0.75E + 0.9)], stepped once per epoch."""
    spe = 7
    got = [[lr_factor(e * spe + i, schedule="step", epochs=epochs, steps_per_epoch=spe) for i in range(spe)]
           for e in range(epochs)]
    assert got == [[pytest.approx(f)] * spe for f in factors]
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones(epochs)))
    torch_lrs = []
    for _ in range(epochs):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert torch_lrs == pytest.approx([2.0 * f for f in factors])


def test_one_epoch_step_schedule_keeps_the_peak_lr():
    """E = 1: the authors' rule would put a milestone at epoch 0 (lr/10 for the whole job); ours waits."""
    assert milestones(1) == (1, 1)
    assert [lr_factor(s, schedule="step", epochs=1, steps_per_epoch=5) for s in range(5)] == [1.0] * 5


def test_other_schedules_and_warmup_are_shared_by_both_stages():
    kw = dict(epochs=2, steps_per_epoch=100)
    f = [lr_factor(s, schedule="step-per-iter", **kw) for s in range(200)]
    assert f[0] == f[99] == 1.0 and f[100] == f[149] == 0.1 and f[150] == f[199] == 0.01
    c = [lr_factor(s, schedule="cosine", warmup_steps=10, **kw) for s in range(200)]
    assert c[0] == pytest.approx(0.1) and c[9] == 1.0 and c[10] == 1.0 and c[-1] < 0.001
    assert all(a >= b for a, b in zip(c[10:], c[11:]))
    assert lr_factor(100, schedule="linear", **kw) == pytest.approx(0.5)
    assert lr_factor(5, schedule="constant", **kw) == 1
    # warm-up, then the milestones stay at absolute epochs
    assert [lr_factor(s, schedule="step", warmup_steps=50, **kw) for s in (0, 49, 50, 99, 100)] == \
        [pytest.approx(0.02), 1.0, 1.0, 1.0, pytest.approx(0.1)]
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, schedule="cosine", warmup_steps=10, **kw)
    lrs = []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(c)


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse_train_args(["--help"])
    text = capsys.readouterr().out
    assert "--snapshot-url" in text and "--init-from" in text and "int(0.75E+0.9)" in text and "--preset" in text
    assert "TWA_SCALE_TRAIN_EPOCHS" in text


def _flag(name: str) -> str:
    return "--deepspeed_config" if name == "deepspeed_config" else "--" + name.replace("_", "-")


def test_readme_documents_every_training_flag():
    from pathlib import Path

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


def test_readme_lists_every_knob_and_only_knobs_reads_the_environment():
    """Every TWA_SCALE_* variable is declared once in knobs.py and listed in the README; no other module
    reads a TWA_* variable itself."""
    import re
    from pathlib import Path

    from twa_scale import knobs

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("### Environment variables"):]
    section = section[:section.index("\n### ")]
    listed = set(re.findall(r"^\| `(TWA_SCALE_[A-Z0-9_]+)`", section, re.M))
    source = (root / "twa_scale" / "knobs.py").read_text()
    declared = set(knobs.KNOBS) | {n for n in re.findall(r'"(TWA_SCALE_[A-Z0-9_]+)"', source) if not n.endswith("_")}
    assert listed == declared, (f"README lacks {sorted(declared - listed)}; "
                                f"README has undeclared {sorted(listed - declared)}")
    reads = re.compile(r"""(?:environ\.get|getenv|environ\[|env_int|env_float)\(?\s*["']TWA""")
    offenders = [str(p.relative_to(root)) for p in (root / "twa_scale").rglob("*.py")
                 if p.name != "knobs.py" and reads.search(p.read_text())]
    assert not offenders, f"read TWA_* environment variables outside knobs.py: {offenders}"


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
