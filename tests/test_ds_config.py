"""The DeepSpeed config: loading, the sections it refuses, batch arithmetic over ranks."""
import json

import pytest

from twa_scale.train.engine import load_ds_config, resolve_batch


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
