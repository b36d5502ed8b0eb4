"""GPU tier (marker `gpu`): the CUDA-only code paths. Deselected by default (`-m "not gpu"` in
pyproject.toml); run on a GPU host with `python -m pytest -m gpu`."""
import pytest
import torch
import torch.nn.functional as F

from twa_scale import comm, store
from twa_scale.train.config import TrainConfig
from twa_scale.train.engine import build_engine, load_ds_config, resolve_batch
from twa_scale.layout import FlatLayout
from twa_scale.models import build_model
from twa_scale.train.streamer import SnapshotStreamer, StreamerConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_streamer_pinned_side_stream_copies_match_device_weights(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20", 10).cuda()
    layout = FlatLayout.from_model(model)
    params = layout.trainable(model)
    url = f"file://{tmp_path}"
    store.create_run(url, "g", layout, meta={"model": "resnet20"}, world_size=1)
    s = SnapshotStreamer(url, "g", layout, rank=0, world_size=1, config=StreamerConfig())
    expected = []
    for seq in range(3):
        expected.append(layout.gather(params, 0, layout.D).cpu())
        s.snapshot(seq, seq, seq, params)
        with torch.no_grad():  # the next "step" must not leak into the queued copy
            for p in params:
                p.mul_(1.5)
    s.close()
    reader = store.open_run(url, "g")
    for seq, want in enumerate(expected):
        assert torch.equal(reader.read(seq), want)


def test_engine_trains_with_autocast_and_channels_last_activations():
    comm.init()
    torch.manual_seed(0)
    cfg = TrainConfig(model="resnet18", epochs=1)
    ds = load_ds_config("ds_configs/cifar_1gpu.json")
    resolve_batch(ds, batch_size=32, micro_batch=32, world=1)
    engine = build_engine(build_model("resnet18", 10).cuda(), cfg, ds, steps_per_epoch=10)
    x = torch.randn(32, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), device="cuda")
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_steplog_records_steps_without_a_host_sync():
    from twa_scale.train.steplog import StepLog

    log = StepLog(8, "cuda")
    loss = torch.full((), 0.5, device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call in step() raises
    try:
        for i in range(7):
            log.step(loss * (i + 1), 4, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [r.loss for r in log.flush()] == [0.5 * (i + 1) for i in range(7)]
