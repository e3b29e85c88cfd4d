"""Algorithm 2, step 3 (Sec. 3.1) over a whole model: `freeze` and `unfreeze`.

`freeze` replaces each BN layer with running statistics by the layer `FrozenBatchNorm`
(`batchnorm.frozen`), `unfreeze` brings the trainable layers back; both swap layers through
`batchnorm.swap`, so tensors are shared and shared modules stay shared.
"""

from __future__ import annotations

from torch import nn

from batchnorm.frozen import FrozenBatchNorm
from batchnorm.fused import FrozenBatchNormAct
from batchnorm.swap import (
    foreign_reason,
    layer_settings,
    swap_modules,
    tracks_running_stats,
    warn_left_alone,
)

__all__ = ["FrozenBatchNorm", "freeze", "unfreeze"]


def freeze(model: nn.Module, trainable_affine: bool = False) -> nn.Module:
    """Replace every BN layer with running statistics by a `FrozenBatchNorm`, in place.

    Covers ours and every ``torch.nn`` BN, with or without beta (``bias=False``); layers
    with ``track_running_stats=False`` have no statistics to freeze and are left alone. A BN
    fused with its activation (`batchnorm.fused`), and a BN + activation layer of another
    library (timm's ``BatchNormAct2d``, see `batchnorm.swap.bn_kind`) whose act is
    an activation of `batchnorm.activations`, becomes a `FrozenBatchNormAct` with that
    activation. A BN subclass the library cannot read (its own forward or child modules,
    `batchnorm.swap.foreign_reason`) is left alone, and one warning names each
    such layer. A BN registered at several places becomes one shared frozen layer. Each
    frozen layer remembers its original class, settings and child modules for `unfreeze`.

    Args:
        model: the model (changed in place), or a single BN layer.
        trainable_affine: keep gamma and beta trainable (the same Parameter objects).

    Returns:
        ``model`` (a new module only when ``model`` itself is a BN layer).

    Example:
        >>> net = freeze(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
        >>> type(net[1]).__name__
        'FrozenBatchNorm'
    """

    left: dict[int, str] = {}

    def fn(m):
        if not tracks_running_stats(m):
            return None
        why = foreign_reason(m)
        if why is not None:
            left[id(m)] = why
            return None
        # A fused BN + activation (batchnorm.fused) names its frozen form; another library's
        # (its settings carry the activation) freezes into the same.
        frozen = getattr(m, "_frozen_class", None)
        if frozen is None and "activation" in layer_settings(m):
            frozen = FrozenBatchNormAct
        return (frozen or FrozenBatchNorm).from_batchnorm(m, trainable_affine)

    model = swap_modules(model, fn)
    warn_left_alone(model, left, "freeze")
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Replace every `FrozenBatchNorm` by a trainable BN again, in place; reverses `freeze`.

    A layer made by `freeze` returns to its original class (torch's, ours, timm's
    ``BatchNormAct2d``) with every setting it had (momentum, ``virtual_batch_size``, Batch
    Renorm's ``r_max``/``d_max``, ``backward``, ...), its original Parameter objects (an
    optimizer built before `freeze` trains them again) and child modules (timm's act); one
    built directly or loaded from a checkpoint becomes
    ``batchnorm.BatchNorm(num_features, axis=axis)`` with torch's defaults. Statistics,
    gamma, beta and the train/eval mode carry over.

    Returns:
        ``model`` (a new module only when ``model`` itself is a `FrozenBatchNorm`).
    """
    return swap_modules(
        model, lambda m: m.to_batchnorm() if isinstance(m, FrozenBatchNorm) else None
    )
