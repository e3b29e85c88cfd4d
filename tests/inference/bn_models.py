"""Model builders and helpers shared by the inference tests (Algorithm 2's toolkit)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import FrozenBatchNorm


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and gamma/beta, so no check passes by identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm)):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g))
                    m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.5)
                for t in (m.weight, m.bias):
                    if t is not None:
                        t.copy_(torch.randn(c, generator=g))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def figure1_mlp() -> nn.Sequential:
    """Sec. 4.1's network: 3 x (Linear -> BN -> sigmoid), Linear; no bias before BN."""
    layers, width = [], 784
    for _ in range(3):
        layers += [nn.Linear(width, 100, bias=False), batchnorm.BatchNorm1d(100), nn.Sigmoid()]
        width = 100
    return nn.Sequential(*layers, nn.Linear(100, 10))


class Block(nn.Module):
    """ResNet basic block: conv-bn-relu, conv-bn, + identity or a 1x1 conv-bn downsample."""

    def __init__(self, cin, cout, stride, bn=batchnorm.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def small_resnet(bn=batchnorm.BatchNorm2d) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        bn(8),
        nn.ReLU(),
        Block(8, 8, 1, bn),
        Block(8, 16, 2, bn),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


class SharedUse(nn.Module):
    """Layouts that cannot be folded: a conv output used twice, a BN called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = batchnorm.BatchNorm2d(3)

    def forward(self, x):
        h = self.conv(x)
        return self.bn_a(h) + h + self.bn_b(self.bn_b(x))


class Aliased(nn.Module):
    """One BN registered under two names and called after two convs: folding it is wrong."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.other = self.bn

    def forward(self, x):
        return self.bn(self.conv1(x)) + self.other(self.conv2(x))


class Tokens(nn.Module):
    """Linear on (N, L, C) tokens followed by a channels-last BN."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.bn = batchnorm.BatchNorm(4, axis=-1)

    def forward(self, x):
        return self.bn(self.fc(x))


def bn_inception() -> nn.Module:
    """Sec. 4.2's BN-Inception (Figure 5), narrowed to 1/8 width with the 32x32 stem."""
    inception = pytest.importorskip("batchnorm.reproduce.models.inception")
    return inception.build_inception("bn_inception", width=0.125, small_stem_stride=2)


# --- Hugging Face transformers' ResNet, rebuilt with its structure (no dependency) -----------
# Conv, normalization and activation are attributes of a small module called in order, the
# stages are containers of such modules, and the embeddings check the input's channel count
# in Python: torch.fx cannot trace it, and no nn.Sequential holds a conv next to its BN.


class HFConvLayer(nn.Module):
    """transformers' ResNetConvLayer."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, activation=True):
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False)
        self.normalization = nn.BatchNorm2d(cout)
        self.activation = nn.ReLU() if activation else nn.Identity()

    def forward(self, input):
        hidden_state = self.convolution(input)
        hidden_state = self.normalization(hidden_state)
        hidden_state = self.activation(hidden_state)
        return hidden_state


class HFEmbeddings(nn.Module):
    """transformers' ResNetEmbeddings: the channel check is Python control flow."""

    def __init__(self, num_channels, width):
        super().__init__()
        self.embedder = HFConvLayer(num_channels, width, kernel_size=7, stride=2)
        self.pooler = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.num_channels = num_channels

    def forward(self, pixel_values):
        num_channels = pixel_values.shape[1]
        if num_channels != self.num_channels:
            raise ValueError(
                "Make sure that the channel dimension of the pixel values match with the one "
                "set in the configuration."
            )
        return self.pooler(self.embedder(pixel_values))


class HFShortCut(nn.Module):
    """transformers' ResNetShortCut: 1x1 conv and BN as attributes."""

    def __init__(self, cin, cout, stride=2):
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)
        self.normalization = nn.BatchNorm2d(cout)

    def forward(self, input):
        hidden_state = self.convolution(input)
        hidden_state = self.normalization(hidden_state)
        return hidden_state


class HFBasicLayer(nn.Module):
    """transformers' ResNetBasicLayer: residual added in place, then the activation."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        apply_shortcut = cin != cout or stride != 1
        self.shortcut = HFShortCut(cin, cout, stride) if apply_shortcut else nn.Identity()
        self.layer = nn.Sequential(
            HFConvLayer(cin, cout, stride=stride), HFConvLayer(cout, cout, activation=False)
        )
        self.activation = nn.ReLU()

    def forward(self, hidden_state):
        residual = hidden_state
        hidden_state = self.layer(hidden_state)
        residual = self.shortcut(residual)
        hidden_state += residual
        hidden_state = self.activation(hidden_state)
        return hidden_state


class HFResNet(nn.Module):
    """transformers' ResNetModel with BasicLayers, depths [1, 1, 1, 1]: 12 BN layers."""

    def __init__(self, num_channels=3, widths=(8, 16, 32, 64)):
        super().__init__()
        self.embeddings = HFEmbeddings(num_channels, widths[0])
        stages, cin = [], widths[0]
        for i, cout in enumerate(widths):
            stages.append(nn.Sequential(HFBasicLayer(cin, cout, stride=1 if i == 0 else 2)))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.pooler = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, pixel_values):
        hidden_state = self.embeddings(pixel_values)
        for stage in self.stages:
            hidden_state = stage(hidden_state)
        return self.pooler(hidden_state).flatten(1)
