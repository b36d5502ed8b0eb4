"""Model registry: torchvision ImageNet models and the CIFAR-style networks of the TWA paper.

Model code knows nothing of distribution or of DeepSpeed.
"""
from __future__ import annotations

from typing import Callable

import torch
import torchvision
from torch import nn
import torch.nn.functional as F

__all__ = ["build_model", "model_names", "CIFAR_MODELS"]


# --- CIFAR ResNet (He et al. 2016, option A shortcuts) ------------------------------
class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin if (stride != 1 or cin != cout) else 0
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.pad:  # parameter-free shortcut, as in the original CIFAR ResNets
            short = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            for j in range(n):
                layers.append(_BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --- PreResNet-164 (bottleneck, pre-activation) -------------------------------------
class _PreBottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        cout = planes * 4
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, planes, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(planes), nn.Conv2d(planes, cout, 1, bias=False)
        self.down = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.down(out) if self.down is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + short


class _PreActNet(nn.Module):
    """Stem conv, three stages of ``n`` pre-activation blocks (the first of stages 2 and 3 strides 2),
    then BN-ReLU, global pooling and the classifier: the shape PreResNet and WRN share."""

    def __init__(self, block, widths: tuple[int, int, int], expansion: int, n: int, stem: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        layers, cin = [], stem
        for i, width in enumerate(widths):
            for j in range(n):
                layers.append(block(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width * expansion
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.layers(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PreResNet(_PreActNet):
    def __init__(self, depth: int = 164, num_classes: int = 10):
        if (depth - 2) % 9:
            raise ValueError(f"PreResNet (bottleneck) depth must be 9n+2, got {depth}")
        super().__init__(_PreBottleneck, (16, 32, 64), 4, (depth - 2) // 9, 16, num_classes)


# --- Wide ResNet 28-10 ---------------------------------------------------------------
class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        o = F.relu(self.bn1(x))
        short = self.short(o) if self.short is not None else x
        o = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return o + short


class WideResNet(_PreActNet):
    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10):
        super().__init__(_WideBlock, (16 * widen, 32 * widen, 64 * widen), 1, (depth - 4) // 6, 16, num_classes)


# --- VGG16-BN for 32x32 inputs ---------------------------------------------------------
class CifarVGG(nn.Module):
    CFG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for v in self.CFG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(True), nn.Linear(512, 512), nn.ReLU(True),
                                        nn.Linear(512, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class MLP(nn.Module):
    """A small network without BatchNorm: TWA runs on it need no BN recalibration,
    which makes single- and multi-rank coefficient comparisons exact."""

    def __init__(self, num_classes: int = 10, image_size: int = 32, hidden: int = 128):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(self.pool(x))


CIFAR_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": lambda k: CifarResNet(20, k),
    "resnet56": lambda k: CifarResNet(56, k),
    "cifar_vgg16_bn": lambda k: CifarVGG(k),
    "preresnet164": lambda k: PreResNet(164, k),
    "wrn28_10": lambda k: WideResNet(28, 10, k),
    "mlp": lambda k: MLP(k),
}


def _torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_names() -> list[str]:
    return sorted(CIFAR_MODELS) + _torchvision_names()


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build a freshly initialised model by name (random init, no downloaded weights)."""
    if name in CIFAR_MODELS:
        return CIFAR_MODELS[name](num_classes)
    if name in _torchvision_names():
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}. CIFAR-style: {', '.join(sorted(CIFAR_MODELS))}; "
                     f"torchvision: {', '.join(_torchvision_names())}")
