"""Unit tier: the model registry."""
import pytest
import torch

from twa_scale.models import CIFAR_MODELS, build_model, model_names

pytestmark = pytest.mark.unit

# Parameter counts published for these architectures (CIFAR-10 heads).
EXPECTED_PARAMS = {"resnet20": 0.27e6, "resnet56": 0.85e6, "preresnet164": 1.70e6, "wrn28_10": 36.5e6,
                   "cifar_vgg16_bn": 15.0e6}


@pytest.mark.parametrize("name", sorted(CIFAR_MODELS))
def test_cifar_models_build_and_run(name):
    torch.manual_seed(0)
    m = build_model(name, num_classes=10).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    if name in EXPECTED_PARAMS:
        n = sum(p.numel() for p in m.parameters())
        assert n == pytest.approx(EXPECTED_PARAMS[name], rel=0.05), n


def test_torchvision_models_by_name():
    m = build_model("resnet18", num_classes=7)
    assert m.fc.out_features == 7
    assert {"resnet18", "resnet50", "vgg16_bn", "resnet20", "wrn28_10"} <= set(model_names())


def test_mlp_has_no_batchnorm():
    m = build_model("mlp", 10)
    assert not any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="unknown model 'resnet21'.*resnet20.*resnet50"):
        build_model("resnet21", 10)
