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
- `SETTINGS` is the one table of the settings treated specially: each one's plain value,
  meaning (for refusals), whether it only shapes training (`TRAINING_ONLY`: freezing forgets
  it) and whether converting to torch drops it (`TORCH_DROPS`).
- `restore` undoes a `rebuild` made with ``remember=True`` (the original class, settings
  and Parameter objects).
- `swap_modules` replaces modules inside a model, in place; a module registered at several
  places (``nn.Sequential(bn, bn)``) is replaced everywhere by one shared new module, and
  nothing changes if any replacement is refused.
- `bn_kind` is the one predicate of what a BN layer is to the library (every pass asks it):
  one it reads exactly (torch.nn's, ours, or a subclass that keeps their forward and adds no
  child module), a known BN + activation layer of another library (timm's ``BatchNormAct2d``:
  its forward is torch's batch norm, then its ``drop`` and ``act`` children), a known frozen
  BN layer of another library (torchvision's ``FrozenBatchNorm2d``), or a foreign subclass
  whose own forward or children the library cannot read: never changed, always reported
  (`ForeignLayer`, `warn_left_alone`). `is_bn_like` is its yes/no form, `is_frozen` says
  which BN layers have fixed statistics (ours and the known frozen ones).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Collection
from typing import NamedTuple

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.activations import of_module

__all__ = [
    "NORM_ACT_CLASSES",
    "FROZEN_CLASSES",
    "ForeignLayer",
    "bn_kind",
    "foreign_reason",
    "is_bn_like",
    "is_frozen",
    "qualified_name",
    "warn_left_alone",
    "layer_settings",
    "rebuild",
    "restore",
    "swap_modules",
    "channel_axis",
    "tracks_running_stats",
    "FixedBatchNorm",
    "Setting",
    "SETTINGS",
    "TRAINING_ONLY",
    "TORCH_DROPS",
]

class Setting(NamedTuple):
    """What the library knows of one constructor keyword of a BN layer (a row of `SETTINGS`)."""

    plain: object = None  # its value in plain BN over channel axis 1 (when has_plain)
    has_plain: bool = False  # a target that cannot express it loses nothing at that value
    meaning: str | None = None  # for refusals: "<target> does not implement <meaning>"
    training_only: bool = False  # shapes only training: a frozen layer remembers it for unfreeze
    torch_drops: bool = False  # never a value (a gradient's method, a wait): convert(to="torch")
    # drops it, torch's layers having their own


def _plain(value: object, meaning: str, **flags: bool) -> Setting:
    return Setting(value, True, meaning, **flags)


# The constructor keywords of the BN layers that the swap utility treats specially, one row
# each: a new keyword is added here and nowhere else. Those not listed (eps, affine,
# activation, negative_slope, trainable_affine) carry over as they are or are refused by name.
SETTINGS: dict[str, Setting] = {
    "axis": _plain(1, "a channel axis other than 1"),
    "bias": _plain(True, "gamma without beta"),
    "backward": _plain(
        "native", "the paper's backward pass", training_only=True, torch_drops=True
    ),
    "virtual_batch_size": _plain(None, "Ghost BN", training_only=True),
    "r_max": Setting(meaning="Batch Renormalization", training_only=True),
    "d_max": Setting(meaning="Batch Renormalization", training_only=True),
    "process_group": _plain(None, "synchronized statistics", training_only=True),
    "timeout": _plain(None, "synchronized statistics", training_only=True, torch_drops=True),
    # How a layer is computed (batchnorm.dispatch); auto is the torch path wherever the
    # kernels do not apply.
    "backend": _plain("auto", "a choice of kernels", training_only=True, torch_drops=True),
    # The update of the statistics: every BN's eval-mode map is the same without them.
    "momentum": Setting(training_only=True),
    "track_running_stats": Setting(training_only=True),
    "memory_saving": Setting(training_only=True),  # a fused layer's backward (batchnorm.fused)
}

# Views of `SETTINGS`, read by `rebuild`, `FrozenBatchNorm.from_batchnorm` and `convert`.
_PLAIN = {key: row.plain for key, row in SETTINGS.items() if row.has_plain}
TRAINING_ONLY = frozenset(key for key, row in SETTINGS.items() if row.training_only)
TORCH_DROPS = frozenset(key for key, row in SETTINGS.items() if row.torch_drops)

# The state a BN layer holds, shared (not copied) by a rebuilt layer.
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class _Origin(NamedTuple):
    """What `rebuild(remember=True)` keeps on the new layer so that `restore` can undo it."""

    cls: type
    settings: dict
    overridden: frozenset  # settings the rebuild set itself (restore takes them from here)
    parameters: dict  # Parameter objects that became buffers, by name
    previous: _Origin | None  # the old layer's own origin
    children: tuple = ()  # (name, module): a BN + activation layer's drop and act, put back


# BN + activation layers of other libraries, read from their source: the forward is torch's
# batch norm with the layer's own eps, momentum, affine and track_running_stats, then the
# ``drop`` child, then the ``act`` child (timm's BatchNormAct2d; its SyncBatchNormAct is
# torch's SyncBatchNorm forward, then drop and act where present). Keyed by
# "module.qualname" so that the library never imports them.
NORM_ACT_CLASSES = frozenset(
    {"timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct"}
)
_NORM_ACT_CHILDREN = frozenset({"drop", "act"})

# Frozen BN layers of other libraries, read from their source: buffers weight, bias,
# running_mean and running_var, an ``eps`` attribute, no settings besides, and a forward that
# is Algorithm 2's map over channel axis 1 in train and eval mode alike (torchvision's
# FrozenBatchNorm2d: x * scale + (bias - running_mean * scale), scale = weight *
# rsqrt(running_var + eps)). Exact classes only (a subclass may change the forward), keyed as
# NORM_ACT_CLASSES. fold folds them, diagnose and monitor measure them; no layer here is
# rebuilt from them (they have no settings to read), so freeze, convert and the sync
# conversions leave them as they are.
FROZEN_CLASSES = frozenset({"torchvision.ops.misc.FrozenBatchNorm2d"})


class ForeignLayer(ValueError):
    """A BN layer whose forward, children or settings the library cannot read exactly: it is
    left alone (passes report it; `rebuild` refuses it with this error)."""


def qualified_name(cls: type) -> str:
    """"module.qualname" of a class: how `NORM_ACT_CLASSES` and `FROZEN_CLASSES` name the
    classes of other libraries, which the library never imports."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _known_forward(cls: type) -> bool:
    """Whether ``cls.forward`` is torch.nn's BN forward or one of this library's."""
    owner = next(c for c in cls.__mro__ if "forward" in vars(c))
    module = owner.__module__
    return module == _BatchNorm.__module__ or module.split(".")[0] == "batchnorm"


class FixedBatchNorm(nn.Module):
    """The base of this library's BN layers that are not ``_BatchNorm``s: a BN's state
    (weight, bias, running_mean, running_var, num_batches_tracked) applied with fixed
    statistics (`batchnorm.FrozenBatchNorm`). It adds nothing; it tells `is_bn_like` that
    the layer is a BN layer without this module importing the layer, which is built on
    `rebuild`."""


def is_bn_like(m: nn.Module) -> bool:
    """Whether ``m`` is a BN layer (`bn_kind` is not None): any ``_BatchNorm`` (torch's,
    ours, foreign subclasses), a `FixedBatchNorm` (`FrozenBatchNorm`) or a frozen layer of
    another library listed in `FROZEN_CLASSES` (torchvision's ``FrozenBatchNorm2d``). Every
    pass looks for these: the graph passes keep them as calls and report each one, diagnose
    and monitor measure each one."""
    return isinstance(m, (_BatchNorm, FixedBatchNorm)) or qualified_name(type(m)) in FROZEN_CLASSES


def is_frozen(m: nn.Module) -> bool:
    """Whether ``m`` is a BN layer with fixed statistics: it applies Algorithm 2's map with its
    running statistics in train and eval mode alike and updates nothing. Ours
    (`FixedBatchNorm`: `batchnorm.FrozenBatchNorm`, the fused `FrozenBatchNormAct`) and those
    of other libraries listed in `FROZEN_CLASSES` (`bn_kind` "frozen"). A BN layer in eval mode
    is not frozen: ``model.train()`` brings its batch statistics back."""
    return isinstance(m, FixedBatchNorm) or qualified_name(type(m)) in FROZEN_CLASSES


def bn_kind(m: nn.Module) -> str | None:
    """What a BN layer is to the library: the one predicate every pass asks.

    Returns:
        "exact": the library reads it exactly: ``torch.nn``'s BN classes, this library's
            layers, and subclasses that keep one of their forwards and add no child module
            (their eval-mode map is Algorithm 2's, their settings torch's).
        "norm_act": a BN + activation layer of another library listed in
            `NORM_ACT_CLASSES` (timm's ``BatchNormAct2d``): BN, then its ``drop`` and
            ``act`` children.
        "frozen": a frozen BN layer of another library listed in `FROZEN_CLASSES`
            (torchvision's ``FrozenBatchNorm2d``): Algorithm 2's map with its own buffers in
            train and eval mode, no settings but eps (ours are "exact"; `is_frozen` covers
            both).
        "foreign": any other ``_BatchNorm`` subclass (its own forward or child modules):
            the library never changes it and reports it.
        None: not a BN layer (`is_bn_like` is False).
    """
    if not is_bn_like(m):
        return None
    if qualified_name(type(m)) in FROZEN_CLASSES:
        return "frozen"
    children = {name for name, child in m._modules.items() if child is not None}
    if qualified_name(type(m)) in NORM_ACT_CLASSES and children <= _NORM_ACT_CHILDREN:
        return "norm_act"
    if _known_forward(type(m)) and not children:
        return "exact"
    return "foreign"


def foreign_reason(m: nn.Module) -> str | None:
    """Why the library cannot rebuild ``m`` exactly as another class, or None when it can.

    A "norm_act" layer can be rebuilt when its ``drop`` is ``nn.Identity`` (or absent) and its
    ``act`` an activation of `batchnorm.activations` (or ``nn.Identity``): the settings then
    carry ``activation`` and ``negative_slope``. A "frozen" one never (no settings to read).
    """
    kind = bn_kind(m)
    name = type(m).__name__
    if kind == "frozen":
        return (
            f"{name} is another library's frozen BN layer ({qualified_name(type(m))}): it has "
            "fixed statistics and no settings but eps, so no layer here is rebuilt from it"
        )
    if kind == "foreign":
        return (
            f"{name} subclasses {_BatchNorm.__name__} with its own forward or child modules, "
            "which the library cannot read"
        )
    if kind != "norm_act":
        return None
    drop = m._modules.get("drop")
    if drop is not None and type(drop) is not nn.Identity:
        return f"{name}'s drop child is {type(drop).__name__}, which no layer here applies"
    act = m._modules.get("act")
    if act is not None and type(act) is not nn.Identity and of_module(act) is None:
        return (
            f"{name}'s act child is {type(act).__name__}, not an activation of "
            "batchnorm.activations"
        )
    return None


def _norm_act_settings(m: nn.Module) -> dict:
    act = m._modules.get("act")
    if act is None or type(act) is nn.Identity:
        return {"activation": "identity", "negative_slope": 0.01}
    name, slope = of_module(act)
    return {"activation": name, "negative_slope": slope}


def warn_left_alone(model: nn.Module, left: dict, verb: str) -> None:
    """One warning naming each layer a pass left alone and why (``left``: id -> reason)."""
    if not left:
        return
    named = [(name, left[id(m)]) for name, m in model.named_modules() if id(m) in left]
    lines = "; ".join(f"{name or '(the model)'}: {why}" for name, why in named)
    warnings.warn(f"{verb} left {len(named)} BN layer(s) alone: {lines}", stacklevel=3)


@functools.cache
def _init_keywords(cls: type) -> frozenset:
    return frozenset(inspect.signature(cls.__init__).parameters)


def layer_settings(layer: nn.Module) -> dict:
    """The keyword arguments that rebuild ``layer``, apart from num_features, device, dtype.

    Our layers (and `FrozenBatchNorm`) report their own (``_settings``); for
    ``torch.nn.BatchNorm*d`` and ``torch.nn.SyncBatchNorm`` they are read from torch's
    constructor attributes: eps, momentum, affine, track_running_stats, bias (where torch's
    constructor takes it) and process_group. A BN + activation layer of another library
    (`bn_kind` "norm_act") adds ``activation`` and ``negative_slope``, read off its act child.

    Raises:
        TypeError: ``layer`` is not a BN layer.
        ForeignLayer: the library cannot read it (`foreign_reason`).
    """
    own = getattr(layer, "_settings", None)
    if own is not None:
        return own()
    why = foreign_reason(layer)
    if why is not None:
        raise ForeignLayer(why)
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
    if bn_kind(layer) == "norm_act":
        settings.update(_norm_act_settings(layer))
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
        meaning = SETTINGS[key].meaning if key in SETTINGS else None
        groups.setdefault(meaning or key, []).append(f"{key}={value!r}")
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
    children: tuple = (),
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
        remember: keep the original class, settings, Parameter objects and child modules (a
            BN + activation layer's drop and act) on the new layer, so that `restore` can
            undo this rebuild.
        children: (name, module) pairs to register on the new layer: how a BN + activation
            layer of another library (`NORM_ACT_CLASSES`) gets its activation, which its
            constructor builds from other arguments than ours.
        **settings: settings to set or override (e.g. ``process_group``).

    Returns:
        The new layer.

    Raises:
        ValueError: ``cls`` cannot express a setting of ``layer`` (named in the message), or
            its constructor refuses the settings, or it holds state ``layer`` lacks (or the
            reverse). ``layer`` is unchanged then.
        ForeignLayer: the library cannot read ``layer`` (`foreign_reason`).

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
    norm_act = qualified_name(cls) in NORM_ACT_CLASSES
    if norm_act:  # its activation is a child module, not a constructor keyword of ours
        kwargs = {key: value for key, value in kwargs.items() if key in _init_keywords(cls)}
    try:
        new = cls(layer.num_features, **kwargs, **_factory(layer))
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot rebuild {_describe(layer)} as {cls.__name__}: {err}") from err
    for name, child in children:
        new._modules[name] = child
    if norm_act:
        got = _norm_act_settings(new)
        if any(got[key] != wanted.get(key, got[key]) for key in got):
            raise ValueError(
                f"cannot rebuild {_describe(layer)} as {cls.__name__}: its act child would apply "
                f"{got['activation']!r}, not {wanted.get('activation')!r} (pass the act module "
                "as a child)"
            )
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
        own = tuple((name, child) for name, child in layer._modules.items() if child is not None)
        new._origin = _Origin(
            type(layer), layer_settings(layer), frozenset(settings), kept, origin, own
        )
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
    the rebuild turned into buffers come back as the same objects, and so do the original's
    child modules (timm's ``BatchNormAct2d`` gets its own ``drop`` and ``act`` back).
    """
    origin = getattr(layer, "_origin", None)
    if origin is None:
        return None
    current = layer_settings(layer)
    settings = {
        key: current.get(key, value) if key not in origin.overridden else value
        for key, value in origin.settings.items()
    }
    new = rebuild(layer, origin.cls, drop=set(current), children=origin.children, **settings)
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
