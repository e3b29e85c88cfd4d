"""Sec. 3's BN layers across libraries: `convert` swaps ``torch.nn``'s BN layers and ours.

Both directions go through `batchnorm.swap`: the new layer shares the tensors and
keeps every setting, or the conversion is refused with the setting named.
"""

from __future__ import annotations

from torch import nn

from batchnorm import modules as M
from batchnorm.distributed import SyncBatchNorm
from batchnorm.fused import fused_class
from batchnorm.swap import (
    NORM_ACT_CLASSES,
    TORCH_DROPS,
    bn_kind,
    foreign_reason,
    is_bn_like,
    qualified_name,
    rebuild,
    restore,
    swap_modules,
    warn_left_alone,
)

__all__ = ["convert"]

def _to_ours() -> dict[type, type]:
    return {
        nn.BatchNorm1d: M.BatchNorm1d,
        nn.BatchNorm2d: M.BatchNorm2d,
        nn.BatchNorm3d: M.BatchNorm3d,
        nn.SyncBatchNorm: SyncBatchNorm,
    }


def _to_torch() -> dict[type, type]:
    # Batch Renorm maps to torch's layer of the same rank, which has no r_max/d_max: the swap
    # utility refuses it with those settings named, as it refuses Ghost BN.
    pairs = {ours: torch_cls for torch_cls, ours in _to_ours().items()}
    pairs.update(
        {
            M.BatchRenorm1d: nn.BatchNorm1d,
            M.BatchRenorm2d: nn.BatchNorm2d,
            M.BatchRenorm3d: nn.BatchNorm3d,
        }
    )
    return pairs


def convert(model: nn.Module, to: str = "batchnorm") -> nn.Module:
    """Swap every BN layer between ``torch.nn``'s and ours, in place.

    ``torch.nn.BatchNorm1d/2d/3d`` <-> ``batchnorm.BatchNorm1d/2d/3d`` and
    ``torch.nn.SyncBatchNorm`` <-> ``batchnorm.SyncBatchNorm``. The new layer holds the same
    parameter and buffer tensors (so optimizers keep working), every setting (eps, momentum,
    affine, track_running_stats, bias, process_group), device, dtype and train/eval mode; a
    module registered at several places stays one shared module.

    Converting to torch refuses, with the setting named and the model unchanged, what torch's
    layers cannot express: Ghost BN (``virtual_batch_size``), Batch Renormalization
    (``BatchRenorm1d/2d/3d``) and ``batchnorm.BatchNorm`` (a channel axis for any rank, which
    torch has no class for). It drops ``backward="paper"`` (the same gradients by another
    formula; torch has only its kernel), ``backend`` (which kernels compute the same
    values) and SyncBatchNorm's ``timeout`` (torch's waits for the process group's).

    To ours, a BN + activation layer of another library (timm's ``BatchNormAct2d``, see
    `batchnorm.swap.bn_kind`) whose act is an activation of
    `batchnorm.activations` becomes our fused layer with that activation
    (`batchnorm.BatchNormAct2d`; timm's ``SyncBatchNormAct``: `batchnorm.fused.SyncBatchNormAct`).
    Every other BN layer without a counterpart in the target library is left alone, and one
    warning names each: subclasses the library cannot read (their own forward or child
    modules), and, converting to torch, our layers torch has no class for (fused, frozen).
    Converting back to torch, a fused layer made from timm's becomes timm's layer again (its
    own ``drop`` and ``act`` modules included), so the round trip gives the original model.

    Args:
        model: the model (changed in place), or a single BN layer.
        to: "batchnorm" (ours) or "torch".

    Returns:
        ``model`` (a new module only when ``model`` itself is a BN layer).

    Raises:
        ValueError: ``to`` is unknown, or a layer cannot be expressed by the target library.

    Example:
        >>> net = convert(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)), to="batchnorm")
        >>> type(net[1]).__module__
        'batchnorm.modules'
    """
    if to not in ("batchnorm", "torch"):
        raise ValueError(f"to must be 'batchnorm' or 'torch', got {to!r}")
    mapping = _to_ours() if to == "batchnorm" else _to_torch()
    drop = TORCH_DROPS if to == "torch" else ()  # torch has its own kernel and timeout

    left: dict[int, str] = {}

    def fn(m):
        if to == "torch" and type(m) is M.BatchNorm:
            raise ValueError(
                f"cannot convert {m} to torch: torch.nn has no BN layer for a channel axis of "
                "any rank; build batchnorm.BatchNorm1d/2d/3d instead"
            )
        origin = getattr(m, "_origin", None)
        if to == "torch" and origin is not None and qualified_name(origin.cls) in NORM_ACT_CLASSES:
            return restore(m)  # our fused layer made from timm's: timm's layer again
        target = mapping.get(type(m))
        norm_act = target is None and to == "batchnorm" and bn_kind(m) == "norm_act"
        if norm_act:
            target = _fused_form(type(m), mapping)
        if target is not None and foreign_reason(m) is None:
            return rebuild(m, target, drop=drop, remember=norm_act)
        if is_bn_like(m) and not _native(type(m), to):
            library = "torch.nn" if to == "torch" else "batchnorm (exact classes only)"
            left[id(m)] = foreign_reason(m) or f"{library} has no layer for {type(m).__name__}"
        return None

    model = swap_modules(model, fn)
    warn_left_alone(model, left, f"convert(to={to!r})")
    return model


def _native(cls: type, to: str) -> bool:
    """Whether ``cls`` already belongs to the library converted to."""
    library = "batchnorm" if to == "batchnorm" else "torch"
    return cls.__module__.split(".")[0] == library


def _fused_form(cls: type, mapping: dict) -> type | None:
    """Our fused layer for a BN + activation class of another library: the fused form of our
    counterpart of the torch class it subclasses."""
    base = next((c for c in cls.__mro__ if c in mapping), None)
    return None if base is None else fused_class(mapping[base])
