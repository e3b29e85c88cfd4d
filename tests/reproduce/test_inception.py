"""BN-Inception (Figure 5) and the Sec. 4.2 recipes: shapes, parameter count, switches, configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchnorm import BatchNorm2d
from batchnorm.reproduce.models.inception import MODELS, build_inception, parameter_count
from batchnorm.reproduce.recipes import PAPER_FIGURE3, RECIPES

pytestmark = pytest.mark.usefixtures("one_thread")


VARIANTS = sorted(MODELS)
# Declared once: (model switches each registry entry must have) -> checked by every test.
EXPECTED_SWITCHES = {
    "inception": dict(norm="none", nonlinearity="relu", lrn=True, dropout=0.4),
    "inception_sigmoid": dict(norm="none", nonlinearity="sigmoid", lrn=True, dropout=0.4),
    "bn_baseline": dict(norm="bn", nonlinearity="relu", lrn=True, dropout=0.4),
    "bn_inception": dict(norm="bn", nonlinearity="relu", lrn=False, dropout=0.0),
    "bn_inception_sigmoid": dict(norm="bn", nonlinearity="sigmoid", lrn=False, dropout=0.0),
}
SMALL = dict(num_classes=10, width=0.125, in_channels=1, small_stem_stride=2)


def test_registry_is_declared():
    assert set(MODELS) == set(EXPECTED_SWITCHES)


@pytest.mark.parametrize("name", VARIANTS)
def test_switches(name):
    model = build_inception(name, **SMALL)
    expected = EXPECTED_SWITCHES[name]
    for key, value in expected.items():
        assert getattr(model.config, key) == value
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, BatchNorm2d)]
    depthwise = model.stem[0][0]  # the separable stem's depthwise conv: no bias, no BN of its own
    assert model.config.separable_stem and depthwise.out_channels == 8 * depthwise.in_channels
    pointwise = [c for c in convs if c is not depthwise]
    if expected["norm"] == "bn":
        assert len(bns) == len(pointwise)  # one BN per conv, before each nonlinearity
        assert all(c.bias is None for c in convs)  # beta subsumes the bias (Sec. 3.2)
    else:
        assert not bns and all(c.bias is not None for c in pointwise)
    lrns = [m for m in model.modules() if isinstance(m, nn.LocalResponseNorm)]
    assert len(lrns) == (2 if expected["lrn"] else 0)
    drops = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops == ([0.4] if expected["dropout"] else [])
    act = nn.ReLU if expected["nonlinearity"] == "relu" else nn.Sigmoid
    other = nn.Sigmoid if act is nn.ReLU else nn.ReLU
    assert any(isinstance(m, act) for m in model.modules())
    assert not any(isinstance(m, other) for m in model.modules())


@pytest.mark.parametrize("name", VARIANTS)
@torch.no_grad()
def test_shapes_small_and_imagenet_stem(name):
    small = build_inception(name, **SMALL)
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    # ImageNet stem: total stride 8, then 3c and 4e halve: 64 -> 8 -> 2 (224 -> 28 -> 7)
    model = build_inception(name, num_classes=7, width=0.0625)
    stem = model.stem(torch.randn(2, 3, 64, 64))
    assert stem.shape[-2:] == (8, 8)
    assert model.inception(stem).shape == (2, model.num_features, 2, 2)


@torch.no_grad()
def test_full_size_input():
    model = build_inception("bn_inception", num_classes=5, width=0.0625).eval()
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 5)
    assert model.inception(model.stem(torch.randn(1, 3, 224, 224))).shape[-2:] == (7, 7)


def test_module_output_widths_match_the_table():
    model = build_inception("bn_inception")
    x = torch.zeros(1, 192, 12, 12)  # ImageNet: 28x28; 12 keeps the test cheap
    printed = {"3a": 256, "3b": 320, "3c": 576, "4a": 576, "4b": 576, "4c": 576, "4d": 576,
               "4e": 1024, "5a": 1024, "5b": 1024}  # fmt: skip
    sides = {"3a": 12, "3b": 12, "3c": 6, "4a": 6, "4b": 6, "4c": 6, "4d": 6, "4e": 3,
             "5a": 3, "5b": 3}  # fmt: skip
    with torch.no_grad():
        for name, module in model.inception.named_children():
            x = module.eval()(x)
            assert x.shape[1:] == (printed[name], sides[name], sides[name])


def _table_parameter_count(bn: bool, classes: int = 1000) -> int:
    """Independent count from Figure 5 (4c #1x1 = 128, 4d #1x1 = 64), by formula."""

    def conv(k, cin, cout):  # weights + (gamma, beta) with BN, + bias without
        return k * k * cin * cout + (2 * cout if bn else cout)

    total = 7 * 7 * 3 * 8 + 24 * 64 + (2 * 64 if bn else 64)  # separable 7x7, multiplier 8
    total += conv(1, 64, 64) + conv(3, 64, 192)
    rows = [  # cin, 1x1, 3x3r, 3x3, d3x3r, d3x3, proj
        (192, 64, 64, 64, 64, 96, 32), (256, 64, 64, 96, 64, 96, 64),
        (320, 0, 128, 160, 64, 96, 0), (576, 224, 64, 96, 96, 128, 128),
        (576, 192, 96, 128, 96, 128, 128), (576, 128, 128, 160, 128, 160, 128),
        (576, 64, 128, 192, 160, 192, 128), (576, 0, 128, 192, 192, 256, 0),
        (1024, 352, 192, 320, 160, 224, 128), (1024, 352, 192, 320, 192, 224, 128),
    ]  # fmt: skip
    for cin, n1, r3, n3, rd, nd, proj in rows:
        total += conv(1, cin, n1) if n1 else 0
        total += conv(1, cin, r3) + conv(3, r3, n3)
        total += conv(1, cin, rd) + conv(3, rd, nd) + conv(3, nd, nd)
        total += conv(1, cin, proj) if proj else 0
    return total + 1024 * classes + classes


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_count(name):
    model = build_inception(name)
    bn = EXPECTED_SWITCHES[name]["norm"] == "bn"
    assert parameter_count(model) == _table_parameter_count(bn)
    # documented in the module docstring and docs/imagenet.md; the paper says 13.6M
    assert parameter_count(model) == (11_188_288 if bn else 11_178_336)


# --- recipes: declared once, every field checked ---------------------------------------------
BASE_LR, L2, DECAY = 0.0015, 2e-4, 8.0
EXPECTED_RECIPES = {  # key: (model, lr, decay_epochs, weight_decay, distortions, thorough)
    "inception": ("inception", BASE_LR, DECAY, L2, "strong", False),
    "bn_baseline": ("bn_baseline", BASE_LR, DECAY, L2, "strong", False),
    "bn_x5": ("bn_inception", 5 * BASE_LR, DECAY / 6, L2 / 5, "weak", True),
    "bn_x30": ("bn_inception", 30 * BASE_LR, DECAY / 6, L2 / 5, "weak", True),
    "bn_x5_sigmoid": ("bn_inception_sigmoid", 5 * BASE_LR, DECAY / 6, L2 / 5, "weak", True),
    "inception_sigmoid": ("inception_sigmoid", BASE_LR, DECAY, L2, "strong", False),
    "inception_x5": ("inception", 5 * BASE_LR, DECAY, L2, "strong", False),
}


def test_recipes_declared():
    assert set(RECIPES) == set(EXPECTED_RECIPES)
    assert set(PAPER_FIGURE3) <= set(RECIPES)


@pytest.mark.parametrize("key", sorted(EXPECTED_RECIPES))
def test_recipe_values(key):
    recipe = RECIPES[key]
    model, lr, decay_epochs, l2, distortions, thorough = EXPECTED_RECIPES[key]
    assert recipe.model == model and recipe.model in MODELS
    assert recipe.lr == pytest.approx(lr)
    assert recipe.decay_epochs == pytest.approx(decay_epochs)
    assert recipe.weight_decay == pytest.approx(l2)
    assert (recipe.distortions, recipe.thorough_shuffle) == (distortions, thorough)
    assert (recipe.batch_size, recipe.momentum, recipe.decay_rate) == (32, 0.9, 0.96)
    with pytest.raises(AttributeError):  # frozen
        recipe.lr = 1.0  # type: ignore[misc]
    # exponential decay: 4% per decay_epochs, continuous in between
    assert recipe.lr_at(0, 100) == pytest.approx(lr)
    assert recipe.lr_at(int(100 * decay_epochs * 2), 100) == pytest.approx(lr * 0.96**2, rel=1e-3)
    # fig2's compressed clock: a run of 64 paper epochs ends at 0.96**8 (BN-x: 0.96**48)
    end = recipe.lr_at_fraction(1.0, 64.0) / lr
    assert end == pytest.approx(0.96 ** (8 if decay_epochs == DECAY else 48))


def test_paper_figure3_speedups():
    steps = {k: v[0] for k, v in PAPER_FIGURE3.items()}
    assert steps["inception"] / steps["bn_baseline"] == pytest.approx(2.33, abs=0.01)
    assert steps["inception"] / steps["bn_x5"] == pytest.approx(14.8, abs=0.05)
    assert steps["inception"] / steps["bn_x30"] == pytest.approx(11.5, abs=0.05)


def test_torch_bn_layer_swaps_in():
    model = build_inception("bn_inception", bn_layer=nn.BatchNorm2d, **SMALL)
    assert not any(isinstance(m, BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_bad_arguments():
    with pytest.raises(KeyError):
        build_inception("resnet")
    with pytest.raises(TypeError):
        build_inception("bn_inception", colour=True)
    with pytest.raises(ValueError):
        build_inception("bn_inception", norm="layer")
