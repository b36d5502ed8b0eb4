"""StepLog: per-step values stay on the device; the host reads them once per window."""
import pytest
import torch

from twa_scale.train.steplog import StepLog


def test_reads_once_per_window_and_exports_every_step():
    windows = []
    log = StepLog(4, "cpu", extra=1, on_rows=windows.append)
    losses = [2.5, 2.0, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25, 0.125, 0.0625]
    for i, v in enumerate(losses):
        log.step(torch.tensor(v), 8 + i, 0.1 * i, torch.tensor(float(i)))
    assert [len(w) for w in windows] == [4, 4]  # steps 1-4 and 5-8 read; 9-10 buffered
    log.flush()
    assert [len(w) for w in windows] == [4, 4, 2] and log.syncs == 3 and log.steps == 10
    rows = [r for w in windows for r in w]
    assert [r.loss for r in rows] == losses
    assert [r.samples for r in rows] == list(range(8, 18))
    assert [r.lr for r in rows] == pytest.approx([0.1 * i for i in range(10)])
    assert [r.extra[0] for r in rows] == list(range(10))
    assert log.extra_sums == [45.0]
    want = sum(v * n for v, n in zip(losses, range(8, 18))) / sum(range(8, 18))
    assert log.loss_sum / log.samples == pytest.approx(want, rel=1e-12)
    assert log.flush() == [] and log.syncs == 3  # nothing buffered: no read


def test_step_never_reads_the_device():
    # On the meta device any host read raises: step() must only queue device copies.
    log = StepLog(3, "meta")
    for _ in range(2):
        log.step(torch.empty((), device="meta"), 4, 0.1)
    with pytest.raises((NotImplementedError, RuntimeError)):
        log.step(torch.empty((), device="meta"), 4, 0.1)  # the window is full: now it reads


def test_epoch_loss_equals_per_step_item_sums():
    # The float64 host sum of float32 values: bit-identical to the old loss.item() per step.
    torch.manual_seed(0)
    values = torch.rand(23) * 3
    log = StepLog(5, "cpu")
    ref = torch.zeros(2, dtype=torch.float64)
    for v in values:
        log.step(v, 16, 0.1)
        ref += torch.tensor([v.item() * 16, 16], dtype=torch.float64)
    log.flush()
    assert log.loss_sum == ref[0].item() and log.samples == 16 * 23


def test_bad_window():
    with pytest.raises(ValueError, match="log_every_steps"):
        StepLog(0, "cpu")
