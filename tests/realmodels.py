"""The one place tests import torchvision and timm: ``from realmodels import import_timm``.

Why a helper instead of a plain ``import torchvision``: the torchvision wheel on PyPI for
linux x86_64 is a CUDA build (``0.28.0+cu130``; the CPU builds live only on PyTorch's own
index, which this project's machines cannot reach). Its C extension ``torchvision/_C.so``
links ``libtorch_cuda.so`` and ``libc10_cuda.so``, which the CPU torch wheel does not ship,
so ``torchvision.extension`` fails to load it. torchvision is written to survive that
(``_has_ops()`` is then False and its C ops raise "Couldn't load custom C++ ops" when
called), except for two lines of ``torchvision/_meta_registrations.py`` that run
unconditionally at import: ``torch.library.register_fake("torchvision::nms")`` and the same
for ``torchvision::qnms``. They need the operator's schema, which only ``_C.so`` defines, so
``import torchvision`` (and ``import timm``, whose ``timm/layers/create_norm.py`` imports
``torchvision.ops.misc``) fails with ``RuntimeError: operator torchvision::nms does not
exist``. torchvision has no switch or environment variable to skip that registration, and
every torchvision release pins one exact torch, so no other release pairs with torch 2.13.

What this helper does, and only when that exact error happens: it defines the two schemas
(the strings compiled into ``_C.so`` from torchvision's ``csrc/ops/nms.cpp``; ``qnms`` has
the same signature) with ``torch.library`` and no kernel, then imports torchvision again.
The pure-Python model code (``torchvision.models``, ``torchvision.ops.misc``) then works as
on any machine; the C ops (nms, roi_align, deform_conv2d, ...) stay unavailable and raise
torchvision's own "Couldn't load custom C++ ops" error, so tests must not call them. On a
machine whose torchvision loads its extension (a matching CPU or CUDA pair) the first
import succeeds and nothing here runs.
"""

import importlib
import sys

import torch

# The torch.library.Library that holds the two schemas. A Library removes its definitions
# when it is garbage collected, so it lives as long as the process.
_SCHEMAS = None

_MISSING_NMS = "operator torchvision::nms does not exist"


def import_torchvision():
    """Import and return torchvision, defining the schemas its import needs when its C
    extension cannot load (see the module docstring)."""
    global _SCHEMAS
    try:
        import torchvision
    except RuntimeError as error:
        if _MISSING_NMS not in str(error) or _SCHEMAS is not None:
            raise
        # The failed import left torchvision and the submodules it had finished in
        # sys.modules; drop them so the second import runs the package from the top.
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        _SCHEMAS = torch.library.Library("torchvision", "FRAGMENT")
        _SCHEMAS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _SCHEMAS.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        torchvision = importlib.import_module("torchvision")
    return torchvision


def import_timm():
    """Import and return timm (which imports torchvision at import time)."""
    import_torchvision()
    import timm

    return timm


def torchvision_has_ops():
    """Whether torchvision's C ops (nms, roi_align, ...) loaded on this machine."""
    return import_torchvision().extension._has_ops()


# The real models of tests/test_real_models.py and scripts/real_models.py, declared once:
# name -> builder (random init, nothing downloaded). torchvision's and timm's own classes,
# as users build them; timm's efficientnet_b0, mobilenetv3_small_100 and regnetx_002 hold
# timm's BatchNormAct2d (an nn.BatchNorm2d subclass with its activation inside), the others
# torch's BatchNorm2d; convnext_atto has no BN at all (the negative control).
MODELS = {
    "tv_resnet18": lambda: import_torchvision().models.resnet18(weights=None),
    "tv_resnet50": lambda: import_torchvision().models.resnet50(weights=None),
    "tv_mobilenet_v3_small": lambda: import_torchvision().models.mobilenet_v3_small(weights=None),
    "tv_efficientnet_b0": lambda: import_torchvision().models.efficientnet_b0(weights=None),
    "tv_densenet121": lambda: import_torchvision().models.densenet121(weights=None),
    "tv_regnet_y_400mf": lambda: import_torchvision().models.regnet_y_400mf(weights=None),
    "tv_shufflenet_v2_x0_5": lambda: import_torchvision().models.shufflenet_v2_x0_5(weights=None),
    "timm_resnet18": lambda: import_timm().create_model("resnet18", pretrained=False),
    "timm_resnet26d": lambda: import_timm().create_model("resnet26d", pretrained=False),
    "timm_efficientnet_b0": lambda: import_timm().create_model("efficientnet_b0", pretrained=False),
    "timm_mobilenetv3_small_100": lambda: import_timm().create_model(
        "mobilenetv3_small_100", pretrained=False
    ),
    "timm_regnetx_002": lambda: import_timm().create_model("regnetx_002", pretrained=False),
    "timm_convnext_atto": lambda: import_timm().create_model("convnext_atto", pretrained=False),
}


def bn_layers(model):
    """(name, layer) of every torch BN layer (``_BatchNorm``: torch's, ours, timm's)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]


def build(name, seed=0):
    """``MODELS[name]`` in eval mode, with BN statistics a trained model could have.

    Random init leaves gamma = 1, beta = 0, mean 0 and variance 1, under which BN is nearly
    the identity in eval mode and a wrong fold or freeze could pass unseen. So gamma and beta
    are drawn at random, and the running statistics are those of one training-mode batch of
    8 random images, computed by the model's own BN layers (``momentum=None``, torch's
    cumulative average), so every layer's input is normalized as in training.
    """
    torch.manual_seed(seed)
    model = MODELS[name]()
    g = torch.Generator().manual_seed(seed)
    layers = [m for _, m in bn_layers(model)]
    momenta = [m.momentum for m in layers]
    with torch.no_grad():
        for m in layers:
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.reset_running_stats()
            m.momentum = None
        model.train()
        model(torch.randn(8, 3, 32, 32, generator=g))
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    return model.eval()
