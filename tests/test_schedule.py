"""The one LR schedule both stages use: the authors' epoch-wise MultiStepLR, the other schedules, warm-up."""
import pytest

from twa_scale.train.schedule import build_lr_scheduler, lr_factor, milestones


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
