"""BN-Inception (Sec. 4.2, Figure 5): GoogLeNet with stacked 3x3 convs, with and without BN.

One network with switches reproduces every variant of Sec. 4.2.2: normalization (none, or BN
on the input of every nonlinearity, conv-wise, with the conv bias dropped because beta
subsumes it, Sec. 3.2), nonlinearity (ReLU or sigmoid), GoogLeNet's Local Response
Normalization and 40% Dropout for the non-BN baseline, the separable first convolution with
depth multiplier 8, the number of classes, and a width multiplier, input channels and a
small-input stem for CPU-scale runs.

Two discrepancies of the paper's Figure 5 table, and what this module does about them:

1. Rows 4c and 4d are not self-consistent: 160+160+160+128 = 608 and 96+192+192+128 = 608
   channels, while the table prints 576 and module 4e's pass-through needs the same width
   as its input. Like the public ports (the Caffe/TF BN-Inception models), we use
   #1x1 = 128 in 4c and 64 in 4d, so every row adds up to the printed output.
2. The text states 13.6M parameters; counting the table's layers (with the fix above,
   separable first conv, BN's gamma/beta, and a 1000-way classifier) gives about 11.2M.
   `parameter_count(build_inception("bn_inception"))` reports the exact number
   (11,188,288 with BN, 1000 classes; see tests/reproduce/test_inception.py for an independent count
   from the table). The paper does not say what its 13.6M includes; likely candidates are
   GoogLeNet's two auxiliary classifiers, which Figure 5 does not list and we omit.

Example:
    >>> model = build_inception("bn_inception", num_classes=10, width=0.25, in_channels=1,
    ...                         small_stem_stride=2)
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from batchnorm import BatchNorm2d

__all__ = [
    "INCEPTION_TABLE",
    "InceptionConfig",
    "BNInception",
    "MODELS",
    "INITS",
    "build_inception",
    "parameter_count",
]

# Figure 5, with the 4c/4d fix: (name, #1x1, #3x3 reduce, #3x3, double #3x3 reduce,
# double #3x3, pool kind, pool proj, stride). Stride-2 modules have no 1x1 branch and pass
# the max-pooled input through (pool proj 0).
INCEPTION_TABLE: tuple[tuple[str, int, int, int, int, int, str, int, int], ...] = (
    ("3a", 64, 64, 64, 64, 96, "avg", 32, 1),
    ("3b", 64, 64, 96, 64, 96, "avg", 64, 1),
    ("3c", 0, 128, 160, 64, 96, "max", 0, 2),
    ("4a", 224, 64, 96, 96, 128, "avg", 128, 1),
    ("4b", 192, 96, 128, 96, 128, "avg", 128, 1),
    ("4c", 128, 128, 160, 128, 160, "avg", 128, 1),  # table prints #1x1 = 160 (sums to 608)
    ("4d", 64, 128, 192, 160, 192, "avg", 128, 1),  # table prints #1x1 = 96 (sums to 608)
    ("4e", 0, 128, 192, 192, 256, "max", 0, 2),
    ("5a", 352, 192, 320, 160, 224, "avg", 128, 1),
    ("5b", 352, 192, 320, 192, 224, "max", 128, 1),
)


INITS = ("he", "googlenet")  # InceptionConfig.init


@dataclass(frozen=True)
class InceptionConfig:
    """Every switch of the network; `build_inception` takes a registry name plus overrides."""

    num_classes: int = 1000  # ImageNet's 1000-way softmax
    norm: str = "bn"  # "bn": BN before every nonlinearity (conv bias dropped); "none"
    nonlinearity: str = "relu"  # "relu" or "sigmoid" (BN-x5-Sigmoid, Inception-Sigmoid)
    lrn: bool = False  # GoogLeNet's LRN after the stem's first pool and its 3x3 conv
    dropout: float = 0.0  # GoogLeNet drops 40% before the classifier; BN-x5 removes it
    separable_stem: bool = True  # first conv separable, depth multiplier 8 (Sec. 4.2)
    width: float = 1.0  # multiplies every conv's output channels (CPU-scale runs)
    in_channels: int = 3  # 3 for RGB, 1 for MNIST-like data
    # None: the ImageNet stem (conv 7x7/2, pool, 1x1, 3x3, pool; 224 -> 28). An int s: a
    # small-input stem (conv 3x3/s, 1x1, 3x3, no pooling) so a 28x28 input reaches the
    # modules at 28/s instead of 3.5x3.5.
    small_stem_stride: int | None = None
    # BN layer class for the norm="bn" variant; the benchmark swaps in torch.nn.BatchNorm2d.
    bn_layer: Callable[[int], nn.Module] = BatchNorm2d
    # Conv initialization. "he": the current choice (He fan-in for ReLU, Glorot for sigmoid,
    # biases 0). "googlenet": the GoogLeNet era, as the public bvlc_googlenet Caffe model
    # (weights of variance 1/fan_in, its "xavier" filler, drawn Gaussian here; conv biases
    # 0.2), under which a deep ReLU net without BN starts with shrinking activations.
    init: str = "he"


def _nonlinearity(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"nonlinearity must be 'relu' or 'sigmoid', got {name!r}")


class ConvUnit(nn.Sequential):
    """conv -> [BN] -> nonlinearity: z = g(BN(Wu)) with BN, z = g(Wu + b) without (Sec. 3.2)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, cfg: InceptionConfig):
        bn = cfg.norm == "bn"
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=not bn)
        ]
        if bn:
            layers.append(cfg.bn_layer(cout))
        layers.append(_nonlinearity(cfg.nonlinearity))
        super().__init__(*layers)


class SeparableStem(nn.Sequential):
    """First conv 7x7/2 as depthwise (depth multiplier 8) then pointwise, then [BN], g.

    As in TF-slim's inception_v2: no nonlinearity between depthwise and pointwise; the
    depth multiplier is capped so the depthwise output never exceeds the 64 outputs.
    """

    def __init__(self, cin: int, cout: int, cfg: InceptionConfig, kernel: int = 7, stride=2):
        bn = cfg.norm == "bn"
        multiplier = max(1, min(8, cout // cin))
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cin * multiplier, kernel, stride, kernel // 2, groups=cin, bias=False),
            nn.Conv2d(cin * multiplier, cout, 1, bias=not bn),
        ]
        if bn:
            layers.append(cfg.bn_layer(cout))
        layers.append(_nonlinearity(cfg.nonlinearity))
        super().__init__(*layers)


class InceptionModule(nn.Module):
    """One row of Figure 5: 1x1 | 1x1->3x3 | 1x1->3x3->3x3 | pool[->1x1], concatenated."""

    def __init__(self, cin: int, row: tuple, cfg: InceptionConfig, scale: Callable[[int], int]):
        super().__init__()
        _, n1, n3r, n3, nd3r, nd3, pool, proj, stride = row
        self.branch1 = ConvUnit(cin, scale(n1), 1, 1, cfg) if n1 else None
        self.branch3 = nn.Sequential(
            ConvUnit(cin, scale(n3r), 1, 1, cfg), ConvUnit(scale(n3r), scale(n3), 3, stride, cfg)
        )
        self.branch33 = nn.Sequential(
            ConvUnit(cin, scale(nd3r), 1, 1, cfg),
            ConvUnit(scale(nd3r), scale(nd3), 3, 1, cfg),
            ConvUnit(scale(nd3), scale(nd3), 3, stride, cfg),
        )
        pool_layer = nn.AvgPool2d if pool == "avg" else nn.MaxPool2d
        # avg pooling excludes padding so border pixels are averages of real values (as Caffe)
        pool_kwargs = {"count_include_pad": False} if pool == "avg" else {}
        pool_mod = pool_layer(3, stride, padding=1, **pool_kwargs)
        if proj:
            self.branch_pool = nn.Sequential(pool_mod, ConvUnit(cin, scale(proj), 1, 1, cfg))
        else:  # stride-2 modules pass the pooled input through unchanged
            self.branch_pool = pool_mod
        self.out_channels = (
            (scale(n1) if n1 else 0) + scale(n3) + scale(nd3) + (scale(proj) if proj else cin)
        )

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.branch3(x), self.branch33(x), self.branch_pool(x)]
        if self.branch1 is not None:
            branches.insert(0, self.branch1(x))
        return torch.cat(branches, dim=1)  # (N, sum of branch widths, H/stride, W/stride)


class BNInception(nn.Module):
    """The Figure 5 network for a given `InceptionConfig`.

    Shape:
        input (N, in_channels, H, W); H = W = 224 with the ImageNet stem (any size divisible
        by 32 works), 28 or 32 with ``small_stem_stride``. Output: logits (N, num_classes).
    """

    def __init__(self, cfg: InceptionConfig = InceptionConfig()):
        super().__init__()
        if cfg.norm not in ("bn", "none"):
            raise ValueError(f"norm must be 'bn' or 'none', got {cfg.norm!r}")
        if cfg.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {cfg.init!r}")
        self.config = cfg

        def scale(c: int) -> int:
            return max(1, round(c * cfg.width))

        stem: list[nn.Module] = []
        if cfg.small_stem_stride is None:
            if cfg.separable_stem:
                stem.append(SeparableStem(cfg.in_channels, scale(64), cfg))
            else:
                stem.append(ConvUnit(cfg.in_channels, scale(64), 7, 2, cfg))
            stem.append(nn.MaxPool2d(3, 2, padding=1))  # 112 -> 56
            if cfg.lrn:
                stem.append(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75))
            stem += [ConvUnit(scale(64), scale(64), 1, 1, cfg)]
            stem += [ConvUnit(scale(64), scale(192), 3, 1, cfg)]
            if cfg.lrn:
                stem.append(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75))
            stem.append(nn.MaxPool2d(3, 2, padding=1))  # 56 -> 28
        else:
            s = cfg.small_stem_stride
            if cfg.separable_stem:
                stem.append(SeparableStem(cfg.in_channels, scale(64), cfg, kernel=3, stride=s))
            else:
                stem.append(ConvUnit(cfg.in_channels, scale(64), 3, s, cfg))
            if cfg.lrn:
                stem.append(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75))
            stem += [ConvUnit(scale(64), scale(64), 1, 1, cfg)]
            stem += [ConvUnit(scale(64), scale(192), 3, 1, cfg)]
            if cfg.lrn:
                stem.append(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75))
        self.stem = nn.Sequential(*stem)

        modules: dict[str, nn.Module] = {}  # named by the table's rows: inception.3a.*
        channels = scale(192)
        for row in INCEPTION_TABLE:
            module = InceptionModule(channels, row, cfg, scale)
            modules[row[0]] = module
            channels = module.out_channels
        self.inception = nn.Sequential(OrderedDict(modules))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(channels, cfg.num_classes)
        self.num_features = channels
        self._init_weights()

    def _init_weights(self) -> None:
        # The paper gives no init. "he": the usual choice per nonlinearity: He (fan-in)
        # for ReLU so a deep non-BN ReLU net starts with unit-scale activations, Glorot for
        # sigmoid (the initialisation it was derived for). Biases start at 0, gamma 1, beta 0.
        # "googlenet": N(0, 1/fan_in) for every conv, conv biases 0.2 (bvlc_googlenet).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if self.config.init == "googlenet":
                    fan_in = m.weight[0].numel()  # in_channels / groups * kh * kw
                    nn.init.normal_(m.weight, std=fan_in**-0.5)
                    if m.bias is not None:
                        nn.init.constant_(m.bias, 0.2)
                    continue
                if self.config.nonlinearity == "relu":
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                else:
                    nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        x = self.inception(self.stem(x))  # (N, C_in, H, W) -> (N, 1024*width, H/32, W/32)
        return x.mean(dim=(2, 3))  # global average pool -> (N, 1024*width)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.features(x)))


# Registry: name -> the switches of that variant (Sec. 4.2.2). Tests run over every entry, and a
# new variant is one line here.
_VARIANTS: dict[str, dict] = {
    # GoogLeNet-style baseline "Inception": no BN, LRN, 40% Dropout
    "inception": dict(norm="none", lrn=True, dropout=0.4),
    "inception_sigmoid": dict(norm="none", lrn=True, dropout=0.4, nonlinearity="sigmoid"),
    # BN-Baseline: Inception + BN, otherwise unchanged (LRN and Dropout kept)
    "bn_baseline": dict(norm="bn", lrn=True, dropout=0.4),
    # BN-x5 / BN-x30: Sec. 4.2.1 removes Dropout and LRN
    "bn_inception": dict(norm="bn"),
    "bn_inception_sigmoid": dict(norm="bn", nonlinearity="sigmoid"),
}


def _builder(variant: dict) -> Callable[..., BNInception]:
    def build(**overrides) -> BNInception:
        return BNInception(InceptionConfig(**{**variant, **overrides}))

    return build


MODELS: dict[str, Callable[..., BNInception]] = {
    name: _builder(variant) for name, variant in _VARIANTS.items()
}


def build_inception(name: str, **overrides) -> BNInception:
    """Build a registered variant; ``overrides`` are `InceptionConfig` fields."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(InceptionConfig)}
    if unknown:
        raise TypeError(f"unknown InceptionConfig fields: {sorted(unknown)}")
    return MODELS[name](**overrides)


def parameter_count(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters: conv weights, biases, BN gamma/beta, classifier."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
