"""The one way to rebuild a BN layer (Sec. 3, Algorithm 2) as another class, and to swap it in.

freeze/unfreeze, convert, ``SyncBatchNorm.convert_sync_batchnorm`` and
``revert_sync_batchnorm`` all go through this module:

- `layer_settings` reads the constructor keywords that rebuild a layer: the layer class
  reports them itself (``_settings``); ``torch.nn``'s BN layers have none, so they are read
  from torch's constructor attributes here.
- `rebuild` makes a layer of another class from those settings, holding the very same
  parameter and buffer tensors (an optimizer keeps working), with the same train/eval mode,
  device, dtype and ``requires_grad``. A setting the target class cannot express is refused
  with an error that names it, unless it has its plain-BN value (``axis=1``,
  ``virtual_batch_size=None``, ...) or the caller lists it in ``drop``.
- `restore` undoes a `rebuild` made with ``remember=True`` (the original class, settings
  and Parameter objects).
- `swap_modules` replaces modules inside a model, in place; a module registered at several
  places (``nn.Sequential(bn, bn)``) is replaced everywhere by one shared new module, and
  nothing changes if any replacement is refused.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Collection
from typing import NamedTuple

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "layer_settings",
    "rebuild",
    "restore",
    "swap_modules",
    "channel_axis",
    "tracks_running_stats",
]

# Settings whose value here makes a layer plain BN over channel axis 1: a target class that
# cannot express such a setting loses nothing when it has this value.
_PLAIN = {
    "axis": 1,
    "bias": True,
    "backward": "native",
    "virtual_batch_size": None,
    "process_group": None,
    "timeout": None,
    "backend": "auto",  # auto is the torch path wherever the kernels do not apply
}

# What a setting means, for refusals: "<target> does not implement <meaning> (<settings>)".
_MEANING = {
    "axis": "a channel axis other than 1",
    "bias": "gamma without beta",
    "backward": "the paper's backward pass",
    "virtual_batch_size": "Ghost BN",
    "r_max": "Batch Renormalization",
    "d_max": "Batch Renormalization",
    "process_group": "synchronized statistics",
    "timeout": "synchronized statistics",
    "backend": "a choice of kernels",
}

# The state a BN layer holds, shared (not copied) by a rebuilt layer.
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class _Origin(NamedTuple):
    """What `rebuild(remember=True)` keeps on the new layer so that `restore` can undo it."""

    cls: type
    settings: dict
    overridden: frozenset  # settings the rebuild set itself (restore takes them from here)
    parameters: dict  # Parameter objects that became buffers, by name
    previous: _Origin | None  # the old layer's own origin


@functools.cache
def _init_keywords(cls: type) -> frozenset:
    return frozenset(inspect.signature(cls.__init__).parameters)


def layer_settings(layer: nn.Module) -> dict:
    """The keyword arguments that rebuild ``layer``, apart from num_features, device, dtype.

    Our layers (and `FrozenBatchNorm`) report their own (``_settings``); for
    ``torch.nn.BatchNorm*d`` and ``torch.nn.SyncBatchNorm`` they are read from torch's
    constructor attributes: eps, momentum, affine, track_running_stats, bias (where torch's
    constructor takes it) and process_group.

    Raises:
        TypeError: ``layer`` is not a BN layer.
    """
    own = getattr(layer, "_settings", None)
    if own is not None:
        return own()
    if not isinstance(layer, _BatchNorm):
        raise TypeError(f"expected a BN layer, got {type(layer).__name__}")
    settings = {
        "eps": layer.eps,
        "momentum": layer.momentum,
        "affine": layer.affine,
        "track_running_stats": layer.track_running_stats,
    }
    if "bias" in _init_keywords(type(layer)):  # torch >= 2.13: gamma without beta
        settings["bias"] = not layer.affine or layer.bias is not None
    if hasattr(layer, "process_group"):
        settings["process_group"] = layer.process_group
    return settings


@functools.cache
def _expressible(cls: type) -> frozenset:
    """The settings a ``cls`` layer reports, hence takes: read from a 1-channel meta layer."""
    return frozenset(layer_settings(cls(1, device="meta")))


def channel_axis(layer: nn.Module) -> int:
    """The axis a layer normalizes: its ``axis`` setting where it reports one (ours), else 1
    (torch's BN layers, torchvision's ``FrozenBatchNorm2d``, any other module)."""
    own = getattr(layer, "_settings", None)
    return 1 if own is None else own().get("axis", 1)


def tracks_running_stats(layer: nn.Module) -> bool:
    """Whether ``layer`` is a ``_BatchNorm`` with running statistics (ours or torch's)."""
    return (
        isinstance(layer, _BatchNorm)
        and layer.track_running_stats
        and layer.running_mean is not None
        and layer.running_var is not None
    )


def _describe(layer: nn.Module) -> str:
    return f"{type(layer).__name__}({layer.num_features})"


def _refusal(layer: nn.Module, cls: type, lost: dict) -> ValueError:
    groups: dict[str, list[str]] = {}
    for key, value in lost.items():
        groups.setdefault(_MEANING.get(key, key), []).append(f"{key}={value!r}")
    what = "; ".join(f"{meaning} ({', '.join(items)})" for meaning, items in groups.items())
    return ValueError(
        f"cannot rebuild {_describe(layer)} as {cls.__name__}: {cls.__name__} does not "
        f"implement {what}. Nothing was changed."
    )


def _factory(layer: nn.Module) -> dict:
    """device and floating dtype of a layer's state (its weight or running_mean)."""
    for name in ("weight", "running_mean", "running_var"):
        t = getattr(layer, name, None)
        if isinstance(t, Tensor) and t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    t = next(iter(layer.buffers()), None)
    return {} if t is None else {"device": t.device}


def _slot(layer: nn.Module, name: str) -> dict | None:
    """The dict (``_parameters`` or ``_buffers``) in which ``layer`` registers ``name``."""
    for slot in (layer._parameters, layer._buffers):
        if name in slot:
            return slot
    return None


def rebuild(
    layer: nn.Module,
    cls: type,
    *,
    drop: Collection[str] = (),
    remember: bool = False,
    **settings,
) -> nn.Module:
    """A ``cls`` layer with ``layer``'s settings and the very same tensors.

    The new layer is ``cls(layer.num_features, **settings, device=..., dtype=...)`` where the
    settings are `layer_settings(layer)` updated by the keyword arguments given here. Its
    weight, bias, running_mean, running_var and num_batches_tracked ARE the old layer's
    tensors (Parameter objects stay Parameter objects, so an optimizer keeps updating them
    and ``requires_grad`` carries over; a Parameter that the target holds as a buffer is
    shared as ``param.detach()``, the same memory). The train/eval mode and a ``qconfig``
    carry over. Buffers only the target has (``num_batches_skipped``) start fresh on the
    layer's device.

    A setting that ``cls`` does not take (it is not among the settings a ``cls`` layer
    reports) is dropped only if it has its plain-BN value (axis 1, bias, the native backward,
    no Ghost BN, no process group) or is named in ``drop``; anything else is refused.

    Args:
        layer: the BN layer to rebuild; it is not modified.
        cls: the class of the new layer.
        drop: settings the caller accepts losing (e.g. freezing forgets training-only ones).
        remember: keep the original class, settings and Parameter objects on the new layer,
            so that `restore` can undo this rebuild.
        **settings: settings to set or override (e.g. ``process_group``).

    Returns:
        The new layer.

    Raises:
        ValueError: ``cls`` cannot express a setting of ``layer`` (named in the message), or
            its constructor refuses the settings, or it holds state ``layer`` lacks (or the
            reverse). ``layer`` is unchanged then.

    Example:
        >>> from batchnorm import BatchNorm2d
        >>> bn = nn.BatchNorm2d(8, momentum=0.01)
        >>> ours = rebuild(bn, BatchNorm2d)
        >>> ours.weight is bn.weight, ours.momentum
        (True, 0.01)
    """
    wanted = {**layer_settings(layer), **settings}
    accepted = _expressible(cls)
    lost = {
        key: value
        for key, value in wanted.items()
        if key not in accepted
        and key not in drop
        and not (key in _PLAIN and (value is _PLAIN[key] or value == _PLAIN[key]))
    }
    if lost:
        raise _refusal(layer, cls, lost)
    kwargs = {key: value for key, value in wanted.items() if key in accepted}
    try:
        new = cls(layer.num_features, **kwargs, **_factory(layer))
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot rebuild {_describe(layer)} as {cls.__name__}: {err}") from err
    origin = getattr(layer, "_origin", None)
    parameters = origin.parameters if origin is not None else {}
    kept: dict[str, nn.Parameter] = {}
    for name in _STATE:
        source, slot = getattr(layer, name, None), _slot(new, name)
        if slot is None or (slot[name] is None) != (source is None):
            raise ValueError(
                f"cannot rebuild {_describe(layer)} as {cls.__name__}: "
                f"{type(layer).__name__}.{name} is {'absent' if source is None else 'present'}"
                f" but the new layer {'has' if slot and slot[name] is not None else 'lacks'} it"
            )
        if source is None:
            continue
        if slot is new._buffers:
            if isinstance(source, nn.Parameter):  # held as a buffer: the same memory
                kept[name] = source
                source = source.detach()
            slot[name] = source
        elif isinstance(source, nn.Parameter):
            slot[name] = source
        else:  # a buffer becomes a Parameter: the one it came from, if it still fits
            param = parameters.get(name)
            if param is not None and (param.shape, param.dtype, param.device) == (
                source.shape,
                source.dtype,
                source.device,
            ):
                param.data = source
                slot[name] = param
            else:
                slot[name] = nn.Parameter(source)
    if remember:
        new._origin = _Origin(type(layer), layer_settings(layer), frozenset(settings), kept, origin)
    elif origin is not None:
        new._origin = origin
    new.train(layer.training)
    if hasattr(layer, "qconfig"):
        new.qconfig = layer.qconfig
    return new


def restore(layer: nn.Module) -> nn.Module | None:
    """Undo `rebuild(..., remember=True)`: the original class, or None if none is recorded.

    The original settings come back, updated by the layer's current values of those it
    shares with the original class (an eps or momentum changed since), except the settings
    the rebuild itself set. Tensors are shared as in `rebuild`; the Parameter objects that
    the rebuild turned into buffers come back as the same objects.
    """
    origin = getattr(layer, "_origin", None)
    if origin is None:
        return None
    current = layer_settings(layer)
    settings = {
        key: current.get(key, value) if key not in origin.overridden else value
        for key, value in origin.settings.items()
    }
    new = rebuild(layer, origin.cls, drop=set(current), **settings)
    new._origin = origin.previous
    if origin.previous is None:
        del new._origin
    return new


def swap_modules(model: nn.Module, fn: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replace, in place, every module for which ``fn`` returns a new module; return the root.

    ``fn`` is called once per module object: a module registered at several places (under
    two names, in two containers, twice in one ``nn.Sequential``) is replaced at every place
    by the same new module, so it stays one shared module. All replacements are computed
    before any is made, so if ``fn`` raises, the model is unchanged.

    Returns:
        ``model``, or ``fn(model)`` when ``model`` itself is replaced.
    """
    root = fn(model)
    if root is not None:
        return root
    new: dict[int, nn.Module] = {}
    places = []
    for parent in model.modules():
        # _modules, not named_children(): named_children skips a repeated entry.
        for name, child in parent._modules.items():
            if child is None:
                continue
            if id(child) not in new:
                replacement = fn(child)
                new[id(child)] = child if replacement is None else replacement
            if new[id(child)] is not child:
                places.append((parent, name, new[id(child)]))
    for parent, name, module in places:
        parent._modules[name] = module
    return model
