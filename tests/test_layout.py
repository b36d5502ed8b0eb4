"""FlatLayout: canonical order, fingerprint, balanced slices, gather/scatter round trips."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from twa_scale.layout import FlatLayout, balanced_slices
from twa_scale.models import build_model

pytestmark = pytest.mark.unit


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3))


def test_layout_is_trainable_params_in_order_without_buffers():
    net = _net()
    net[1].bias.requires_grad_(False)
    layout = FlatLayout.from_model(net)
    names = [e.name for e in layout.entries]
    assert names == ["0.weight", "0.bias", "1.weight", "3.weight", "3.bias"]
    assert layout.D == sum(p.numel() for p in net.parameters() if p.requires_grad)
    offsets = [e.offset for e in layout.entries]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_fingerprint_depends_on_names_and_shapes_only():
    a, b = FlatLayout.from_model(_net()), FlatLayout.from_model(_net())
    assert a.fingerprint == b.fingerprint
    other = FlatLayout.from_model(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5, 3)))
    assert other.fingerprint != a.fingerprint
    with pytest.raises(ValueError, match=f"{a.fingerprint}.*{other.fingerprint}"):
        a.check_matches(other)


@pytest.mark.parametrize("total,world", [(10, 1), (10, 3), (10, 10), (1001, 7)])
def test_balanced_slices_tile_the_range(total, world):
    s = balanced_slices(total, world)
    assert s[0][0] == 0 and s[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(s, s[1:]))
    sizes = [b - a for a, b in s]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_world_larger_than_D_is_an_error():
    layout = FlatLayout.from_model(nn.Linear(2, 1))  # D = 3
    with pytest.raises(ValueError, match="larger than the number of parameters D=3"):
        layout.slices(4)


def test_gather_scatter_round_trip_over_every_slicing():
    model = build_model("resnet20", 10)
    layout = FlatLayout.from_model(model)
    params = layout.trainable(model)
    full = layout.gather(params, 0, layout.D)
    for world in (1, 3, 7):
        parts = [layout.gather(params, a, b) for a, b in layout.slices(world)]
        assert torch.equal(torch.cat(parts), full)
    clone = build_model("resnet20", 10)
    cparams = layout.trainable(clone)
    for a, b in layout.slices(5):
        layout.scatter(full[a:b], cparams, a, b)
    assert all(torch.equal(p, q) for p, q in zip(params, cparams))


def test_json_round_trip_and_tamper_check():
    layout = FlatLayout.from_model(_net())
    again = FlatLayout.from_json(layout.to_json())
    assert again.fingerprint == layout.fingerprint and again.entries == layout.entries
    bad = layout.to_json()
    bad["entries"][0][1] = [9, 9, 9, 9]
    with pytest.raises(ValueError, match="does not match its entries"):
        FlatLayout.from_json(bad)
