"""Algorithm 2 (Sec. 3.1): population statistics, recalibration, freezing, folding, conversion.

After training, Algorithm 2 freezes the network, replaces each batch statistic by a population
one and turns every BN into one fixed affine map (`batchnorm.functional.inference_affine`).
This module is that step, for every BN layer of ours and of ``torch.nn`` inside any model:

- `recalibrate` recomputes E[x] and Var[x] with the weights frozen (Algorithm 2, step 2, the
  same procedure as precise BN), instead of trusting moving averages that lag the weights.
- `FrozenBatchNorm`, `freeze`, `unfreeze`: BN with fixed statistics in train and eval mode.
- `fold` merges each eval-mode BN's affine map into the adjacent Conv/ConvTranspose/Linear.
- `convert` swaps layers between ``torch.nn.BatchNorm*d`` and ours.

Statistical conventions (biased sigma2_B, unbiased running_var, where eps goes) are stated
once in `batchnorm.functional`; nothing here redefines them.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from tqdm.auto import tqdm

from batchnorm import functional as F
from batchnorm import modules as M

__all__ = [
    "recalibrate",
    "FrozenBatchNorm",
    "freeze",
    "unfreeze",
    "fold",
    "FoldReport",
    "convert",
]


def _bn_axis(bn: nn.Module) -> int:
    """The channel axis a BN layer normalizes: ours carry ``_axis``, torch's use 1."""
    return getattr(bn, "_axis", getattr(bn, "axis", 1))


def _tracks_stats(bn: nn.Module) -> bool:
    return (
        isinstance(bn, _BatchNorm)
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.running_var is not None
    )


# --------------------------------------------------------------------------------------------
# recalibrate: Algorithm 2, step 2
# --------------------------------------------------------------------------------------------


class _Algorithm2Stats:
    """E[x] = E_B[mu_B], Var[x] = E_B[m/(m-1) sigma2_B]: every batch weighs the same."""

    def __init__(self) -> None:
        self.batches = 0
        self.sum_mean: Tensor | float = 0.0
        self.sum_var: Tensor | float = 0.0

    def add(self, mean: Tensor, var: Tensor, count: int) -> None:
        self.batches += 1
        self.sum_mean = self.sum_mean + mean
        self.sum_var = self.sum_var + var * (count / (count - 1))

    def result(self) -> tuple[Tensor, Tensor]:
        return self.sum_mean / self.batches, self.sum_var / self.batches


class _PooledStats:
    """Exact mean and unbiased variance of every value seen, whatever the batch split.

    Merges each batch's (m, mu_B, M2 = m sigma2_B) into the running totals with
    `F.merge_stats`, which stays accurate where summing x and x^2 would cancel.
    """

    def __init__(self) -> None:
        self.batches = 0
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, mean: Tensor, var: Tensor, count: int) -> None:
        self.batches += 1
        if self.mean is None:
            self.n, self.mean, self.m2 = count, mean, var * count
            return
        counts = torch.tensor([[self.n], [count]], dtype=mean.dtype, device=mean.device)
        _, self.mean, self.m2 = F.merge_stats(
            counts, torch.stack([self.mean, mean]), torch.stack([self.m2, var * count])
        )
        self.n += count

    def result(self) -> tuple[Tensor, Tensor]:
        return self.mean, self.m2 / (self.n - 1)


_ESTIMATORS = {"algorithm2": _Algorithm2Stats, "pooled": _PooledStats}


def _first_input(batch) -> Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor):
        raise TypeError(
            "recalibrate expects batches that are tensors or tuples/lists whose first element "
            f"is the input tensor, got {type(x).__name__}"
        )
    return x


def recalibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    num_batches: int | None = None,
    estimator: str = "algorithm2",
    progress: bool = True,
) -> int:
    """Recompute every BN layer's population statistics with the weights frozen (Algorithm 2).

    Moving averages mix statistics of many past weight settings and lag the final weights;
    Algorithm 2 instead averages the statistics of the trained network over training batches.
    Each batch is passed through ``model`` once, with every BN layer in training mode so it
    normalizes with its batch statistics, as it did during training, and every other layer
    (dropout, ...) in eval mode, as at inference. A pre-forward hook records each BN input's
    per-channel mu_B and sigma2_B (`batchnorm.functional.batch_stats`, so our layers'
    channel axis is respected); the totals are kept in float64. This is precise BN
    (fvcore's ``update_bn_stats``) with a choice of estimator.

    Covers every ``torch.nn.modules.batchnorm._BatchNorm`` with running statistics: ours,
    ``torch.nn.BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (whose statistics are recorded per
    process; average the buffers across processes afterwards if the batches differ). Layers
    with ``track_running_stats=False`` always use batch statistics and are skipped, and so are
    `FrozenBatchNorm` layers (frozen means frozen: unfreeze them first). A layer
    that receives no input (e.g. an auxiliary head the eval-mode model never runs) keeps its
    statistics, with a warning. A layer called k times per forward counts k batches.

    On return the model's train/eval modes, momenta, parameters and ``num_batches_tracked``
    are as they were; only ``running_mean`` and ``running_var`` hold the new values.

    Args:
        model: any module containing BN layers; its parameters are not changed.
        batches: an iterable of input tensors, or of tuples/lists whose first element is the
            input (a DataLoader of (input, target) works). Inputs are moved to the device of
            the first BN layer's statistics. Batches should have more than one value per
            channel (a BN in training mode refuses a single value).
        num_batches: use at most this many batches (all of them when None).
        estimator: "algorithm2": E[x] = mean over batches of mu_B and Var[x] = mean over
            batches of m/(m-1) sigma2_B, each batch weighing the same (exactly Algorithm 2).
            "pooled": the exact mean and unbiased variance of all values seen, as if they were
            one batch; invariant to how the samples are split into batches. With equal batch
            sizes the two means coincide; the pooled variance also counts the spread of the
            batch means, which Algorithm 2 leaves out.
        progress: show a tqdm progress bar.

    Returns:
        The number of batches used.

    Raises:
        ValueError: no BN layer with running statistics, no batch, an unknown estimator,
            or non-finite statistics (nothing is written then).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU())
        >>> data = [torch.randn(16, 4) for _ in range(5)]
        >>> recalibrate(net, data, progress=False)
        5
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(_ESTIMATORS)}, got {estimator!r}")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches}")
    layers = [(name, m) for name, m in model.named_modules() if _tracks_stats(m)]
    if not layers:
        raise ValueError(
            f"recalibrate found no BN layer with running statistics in {type(model).__name__} "
            "(track_running_stats=False layers always normalize with batch statistics)"
        )
    stats = {name: _ESTIMATORS[estimator]() for name, _ in layers}
    modes = [(m, m.training) for m in model.modules()]
    # A training-mode forward also moves the running buffers (and num_batches_tracked); they
    # are restored afterwards, so the result never depends on momentum.
    saved = {
        name: {k: b.clone() for k, b in bn._buffers.items() if b is not None} for name, bn in layers
    }
    device = layers[0][1].running_mean.device

    def hook_for(acc, axis):
        def hook(module, args):
            s = F.batch_stats(args[0], axis)
            acc.add(s.mean.double(), s.var.double(), s.count)

        return hook

    hooks = [bn.register_forward_pre_hook(hook_for(stats[n], _bn_axis(bn))) for n, bn in layers]
    total = num_batches
    if hasattr(batches, "__len__"):
        total = len(batches) if num_batches is None else min(num_batches, len(batches))
    used = 0
    try:
        model.eval()
        for _, bn in layers:
            bn.train()
        it = batches if num_batches is None else itertools.islice(batches, num_batches)
        with torch.no_grad():
            for batch in tqdm(
                it, total=total, disable=not progress, desc="recalibrate", unit="batch"
            ):
                model(_first_input(batch).to(device))
                used += 1
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.training = training
        for name, bn in layers:
            for k, b in saved[name].items():
                bn._buffers[k].copy_(b)
    if used == 0:
        raise ValueError(
            "recalibrate received no batch: the iterable was empty, so no statistics were "
            "computed and the model is unchanged"
        )
    results, unseen, bad = {}, [], []
    for name, _ in layers:
        if stats[name].batches == 0:
            unseen.append(name)
            continue
        mean, var = stats[name].result()
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            bad.append(name)
        results[name] = (mean, var)
    if bad:
        raise ValueError(
            f"recalibrate computed non-finite statistics for {bad} (NaN/Inf inputs or "
            "activations); no statistics were written"
        )
    if unseen:
        warnings.warn(
            f"recalibrate: BN layers {unseen} received no input during the pass and keep "
            "their previous statistics",
            stacklevel=2,
        )
    with torch.no_grad():
        for name, bn in layers:
            if name in results:
                mean, var = results[name]
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
    return used


# --------------------------------------------------------------------------------------------
# Module replacement, shared by freeze, unfreeze and convert
# --------------------------------------------------------------------------------------------


def _replace(model: nn.Module, fn: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replace, in place, every submodule for which ``fn`` returns a module; return the root.

    A module shared between several parents is replaced by one shared new module.
    """
    memo: dict[int, nn.Module | None] = {}

    def swap(m):
        if id(m) not in memo:
            memo[id(m)] = fn(m)
        return memo[id(m)]

    root = swap(model)
    if root is not None:
        return root
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = swap(child)
            if new is not None:
                setattr(parent, name, new)
    return model


def _bn_kwargs(bn: nn.Module) -> dict:
    """Constructor arguments that rebuild ``bn`` (apart from num_features, device, dtype)."""
    kw = dict(eps=bn.eps, momentum=bn.momentum, affine=bn.affine)
    kw["track_running_stats"] = bn.track_running_stats
    if isinstance(bn, M.BatchNorm):
        kw["axis"] = bn._axis
    if isinstance(bn, M._BatchNormBase):
        kw["backward"] = bn.backward
    if hasattr(bn, "process_group"):  # torch's and our SyncBatchNorm
        kw["process_group"] = bn.process_group
    if isinstance(bn, M._BatchNormBase) and hasattr(bn, "timeout"):
        kw["timeout"] = bn.timeout
    return kw


def _factory(module: nn.Module) -> dict:
    t = next(itertools.chain(module.parameters(), module.buffers()), None)
    if t is None:
        return {}
    dtype = t.dtype
    for name in ("weight", "running_mean"):
        tensor = getattr(module, name, None)
        if isinstance(tensor, Tensor) and tensor.is_floating_point():
            dtype = tensor.dtype
            break
    return {"device": t.device, "dtype": dtype}


def _rebuild_bn(old: nn.Module, cls: type, **kw) -> nn.Module:
    """A ``cls`` layer holding the very same parameter and buffer tensors as ``old``.

    Reusing the tensors (not copies) keeps an optimizer's references valid across the swap.
    """
    new = cls(old.num_features, **kw, **_factory(old))
    for name in ("weight", "bias"):
        if name in old._parameters:
            new._parameters[name] = old._parameters[name]
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if name in old._buffers:
            new._buffers[name] = old._buffers[name]
    new.train(old.training)
    return new


# --------------------------------------------------------------------------------------------
# Frozen BN
# --------------------------------------------------------------------------------------------


class FrozenBatchNorm(nn.Module):
    """BN with fixed statistics in train and eval mode: Algorithm 2's inference map, always.

    y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta along the channel ``axis``, computed by
    `batchnorm.functional.normalize`. Unlike a BN in eval mode, calling ``model.train()`` does
    not bring batch statistics back (Keras users meet that surprise with ``trainable=False``),
    and nothing is updated. gamma and beta are parameters that receive gradients when
    ``trainable_affine`` is True, otherwise buffers invisible to optimizers.

    The state_dict keys are those of ``torch.nn.BatchNorm*d`` (weight, bias, running_mean,
    running_var, num_batches_tracked), so checkpoints load both ways; a checkpoint without
    ``num_batches_tracked`` (torchvision's FrozenBatchNorm2d) loads with it set to 0.

    Args:
        num_features: C, the size of the channel axis.
        eps: added to Var[x] inside the square root.
        affine: whether gamma and beta exist (absent ones act as 1 and 0).
        axis: the channel axis (1, or -1 for channels-last data).
        trainable_affine: make gamma and beta trainable parameters.

    Shape: input (N, C, *) with C at ``axis``; output the same.

    Example:
        >>> bn = FrozenBatchNorm(3)
        >>> x = torch.randn(4, 3, 5)
        >>> torch.equal(bn.train()(x), bn.eval()(x))
        True
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        affine: bool = True,
        axis: int = 1,
        trainable_affine: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.axis = axis
        self.trainable_affine = trainable_affine and affine
        # What `unfreeze` rebuilds: (class, constructor kwargs); None means `BatchNorm(axis)`.
        self._source: tuple[type, dict] | None = None
        if affine and trainable_affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        elif affine:
            self.register_buffer("weight", torch.ones(num_features, **factory))
            self.register_buffer("bias", torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, trainable_affine: bool = False) -> FrozenBatchNorm:
        """A frozen copy of a BN layer (ours or torch's) with running statistics.

        With ``trainable_affine`` the very same gamma/beta Parameter objects are reused, so an
        optimizer that holds them keeps training them.
        """
        if not _tracks_stats(bn):
            raise ValueError(
                f"cannot freeze {type(bn).__name__} without running statistics "
                "(track_running_stats=False)"
            )
        frozen = cls(
            bn.num_features,
            bn.eps,
            affine=bn.affine,
            axis=_bn_axis(bn),
            trainable_affine=trainable_affine,
            **_factory(bn),
        )
        with torch.no_grad():
            if bn.affine and trainable_affine:
                frozen.weight, frozen.bias = bn.weight, bn.bias
            elif bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
        frozen._source = (type(bn), _bn_kwargs(bn))
        frozen.train(bn.training)
        return frozen

    def to_batchnorm(self) -> nn.Module:
        """The trainable BN this layer was frozen from (its class), or `BatchNorm(axis)`."""
        cls, kw = self._source if self._source is not None else (M.BatchNorm, {"axis": self.axis})
        kw = {**kw, "eps": self.eps, "affine": self.affine, "track_running_stats": True}
        bn = cls(self.num_features, **kw, **_factory(self))
        with torch.no_grad():
            if self.affine and self.trainable_affine:
                bn.weight, bn.bias = self.weight, self.bias
            elif self.affine:
                bn.weight.copy_(self.weight)
                bn.bias.copy_(self.bias)
            bn.running_mean.copy_(self.running_mean)
            bn.running_var.copy_(self.running_var)
            bn.num_batches_tracked.copy_(self.num_batches_tracked)
        bn.train(self.training)
        return bn

    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """The per-channel (scale, shift) of y = scale * x + shift (Algorithm 2, step 3)."""
        return F.inference_affine(
            self.running_mean, self.running_var, self.weight, self.bias, self.eps
        )

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[self.axis] != self.num_features:
            raise ValueError(
                f"FrozenBatchNorm({self.num_features}) expected {self.num_features} channels on "
                f"axis {self.axis}, got input of shape {tuple(input.shape)}"
            )
        return F.normalize(
            input, self.running_mean, self.running_var, self.weight, self.bias, self.eps, self.axis
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        key = prefix + "num_batches_tracked"
        if key not in state_dict and prefix + "running_mean" in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}, affine={self.affine}"
        if self.axis != 1:
            text += f", axis={self.axis}"
        if self.trainable_affine:
            text += ", trainable_affine=True"
        return text


def freeze(model: nn.Module, trainable_affine: bool = False) -> nn.Module:
    """Replace every BN layer with running statistics by a `FrozenBatchNorm`, in place.

    Covers ours and every ``torch.nn`` BN (any ``_BatchNorm``); layers with
    ``track_running_stats=False`` have no statistics to freeze and are left alone.

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

    def fn(m):
        if _tracks_stats(m):
            return FrozenBatchNorm.from_batchnorm(m, trainable_affine)
        return None

    return _replace(model, fn)


def unfreeze(model: nn.Module) -> nn.Module:
    """Replace every `FrozenBatchNorm` by a trainable BN again, in place; reverses `freeze`.

    A layer made by `freeze` returns to its original class (torch's or ours) with its original
    momentum and constructor flags; one built directly or loaded from a checkpoint becomes
    ``batchnorm.BatchNorm(num_features, axis=axis)`` with torch's defaults. Statistics,
    gamma, beta and the train/eval mode carry over.

    Returns:
        ``model`` (a new module only when ``model`` itself is a `FrozenBatchNorm`).
    """
    return _replace(model, lambda m: m.to_batchnorm() if isinstance(m, FrozenBatchNorm) else None)


# --------------------------------------------------------------------------------------------
# convert between torch.nn's layers and ours
# --------------------------------------------------------------------------------------------


def _class_pairs() -> list[tuple[type, type]]:
    pairs = [
        (nn.BatchNorm1d, M.BatchNorm1d),
        (nn.BatchNorm2d, M.BatchNorm2d),
        (nn.BatchNorm3d, M.BatchNorm3d),
    ]
    try:  # our SyncBatchNorm is optional: without it torch's is left alone
        from batchnorm.distributed import SyncBatchNorm
    except ImportError:
        return pairs
    return [*pairs, (nn.SyncBatchNorm, SyncBatchNorm)]


def convert(model: nn.Module, to: str = "batchnorm") -> nn.Module:
    """Swap every BN layer between ``torch.nn``'s and ours, in place.

    ``torch.nn.BatchNorm1d/2d/3d`` <-> ``batchnorm.BatchNorm1d/2d/3d`` (and SyncBatchNorm once
    this library has one; until then torch's is left alone). The new layer holds the same
    parameter and buffer tensors (so optimizers keep working), the same eps, momentum,
    affine/track_running_stats flags, device, dtype and train/eval mode. Only exact classes
    are swapped: subclasses, `FrozenBatchNorm` and ``batchnorm.BatchNorm`` (any channel axis,
    which torch has no class for) are left alone. Converting to torch drops our
    ``backward="paper"`` choice (torch has only its kernel).

    Args:
        model: the model (changed in place), or a single BN layer.
        to: "batchnorm" (ours) or "torch".

    Returns:
        ``model`` (a new module only when ``model`` itself is a BN layer).

    Example:
        >>> net = convert(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)), to="batchnorm")
        >>> type(net[1]).__module__
        'batchnorm.modules'
    """
    if to not in ("batchnorm", "torch"):
        raise ValueError(f"to must be 'batchnorm' or 'torch', got {to!r}")
    pairs = _class_pairs()
    mapping = {a: b for a, b in pairs} if to == "batchnorm" else {b: a for a, b in pairs}

    def fn(m):
        target = mapping.get(type(m))
        if target is None:
            return None
        kw = _bn_kwargs(m)
        if to == "torch":  # torch's layers have only their kernel and the group's timeout
            kw.pop("backward", None)
            kw.pop("timeout", None)
        return _rebuild_bn(m, target, **kw)

    return _replace(model, fn)


# --------------------------------------------------------------------------------------------
# fold: Algorithm 2, step 3, merged into the adjacent linear layer
# --------------------------------------------------------------------------------------------


@dataclass
class FoldReport:
    """What `fold` did: the BN layers folded, and those left alone with the reason.

    Attributes:
        folded: (bn name, layer name, "after" | "before"): the BN followed (or preceded) that
            Conv/ConvTranspose/Linear layer and was merged into it (it is now nn.Identity).
        skipped: (bn name, reason) for every BN-like layer left in the model.
        traced: whether torch.fx traced the model; if not, only adjacent pairs inside
            nn.Sequential containers were considered (see ``trace_error``).
    """

    folded: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    traced: bool = True
    trace_error: str | None = None

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BN layer(s), left {len(self.skipped)}"]
        lines += [f"  {bn} -> {layer} ({where})" for bn, layer, where in self.folded]
        lines += [f"  kept {bn}: {why}" for bn, why in self.skipped]
        if not self.traced:
            lines.append(f"  (torch.fx could not trace the model: {self.trace_error})")
        return "\n".join(lines)


def _is_bn_like(m: nn.Module) -> bool:
    return isinstance(m, (_BatchNorm, FrozenBatchNorm))


def _not_fixed_reason(bn: nn.Module) -> str | None:
    """Why ``bn`` is not one fixed affine map now, or None when it is."""
    if isinstance(bn, FrozenBatchNorm):
        return None
    if not _tracks_stats(bn):
        return "track_running_stats=False: it always normalizes with batch statistics"
    if bn.training:
        return "in training mode: it normalizes with batch statistics (call .eval() first)"
    return None


def _affine64(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Algorithm 2's (scale, shift) of a fixed BN, in float64 so folding adds no rounding."""

    def d(t):
        return None if t is None else t.detach().double()

    return F.inference_affine(
        d(bn.running_mean), d(bn.running_var), d(bn.weight), d(bn.bias), bn.eps
    )


_LINEAR = (nn.Linear, _ConvNd)


def _layer_problem(layer: nn.Module, shared: set[int]) -> str | None:
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
        return "uninitialized lazy module"
    if torch.nn.utils.parametrize.is_parametrized(layer):
        return "its weight is parametrized"
    if id(layer.weight) in shared or (layer.bias is not None and id(layer.bias) in shared):
        return "its weight or bias is shared with another module"
    return None


def _axis_ok(bn: nn.Module, layer: nn.Module, rank: int | None) -> bool:
    """Does the BN's channel axis coincide with the layer's feature axis?

    Convs put features on axis 1 of an (N, C, *spatial) tensor; Linear on the last axis. With
    the rank unknown (no example input), a Linear is assumed to see 2-D (N, C) activations,
    the Sec. 4.1 case, where axis 1 is the last axis.
    """
    axis = _bn_axis(bn)
    if isinstance(layer, _ConvNd):
        rank = len(layer.kernel_size) + 2 if rank is None else rank
        return axis % rank == 1
    if rank is None:
        return axis in (1, -1)
    return axis % rank == rank - 1


def _pre_fold_problem(layer: nn.Module) -> str | None:
    """Why a BN's shift cannot be folded into the *next* layer exactly, or None."""
    if isinstance(layer, _ConvTransposeNd):
        return (
            f"the next layer {type(layer).__name__} sums fewer inputs at the output border, so "
            "a preceding BN's shift is not one constant per channel (not exact)"
        )
    if isinstance(layer, _ConvNd) and layer.padding_mode == "zeros":
        pad = layer.padding
        if pad == "same":
            pad = tuple(d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size))
        if pad != "valid" and any(pad):
            return (
                f"the next layer {type(layer).__name__} pads with zeros, which a preceding BN's "
                "shift does not reach (not exact)"
            )
    return None


def _per_out(scale: Tensor, w: Tensor) -> Tensor:
    return scale.reshape(-1, *([1] * (w.dim() - 1)))


@torch.no_grad()
def _fold_after(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """layer <- BN(layer(x)) = scale * layer(x) + shift, per output feature."""
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    if isinstance(layer, _ConvTransposeNd):
        # weight is (in, out/groups, *k): output channel g*opg + j sits at [group g, :, j].
        g, opg = layer.groups, w.shape[1]
        s = scale.reshape(g, 1, opg, *([1] * (w.dim() - 2)))
        w = (w.reshape(g, w.shape[0] // g, opg, *w.shape[2:]) * s).reshape(w.shape)
    else:  # Conv (out, in/groups, *k) and Linear (out, in): output on axis 0
        w = w * _per_out(scale, w)
    _write(layer, w, b * scale + shift)


@torch.no_grad()
def _fold_before(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """layer <- layer(BN(x)) = layer(scale * x + shift), per input feature."""
    w = layer.weight.detach().double()
    out = w.shape[0]
    b = layer.bias.detach().double() if layer.bias is not None else w.new_zeros(out)
    if isinstance(layer, nn.Linear):
        _write(layer, w * scale, b + w @ shift)
        return
    # Conv weight (out, in/groups, *k): output o of group g reads inputs g*ipg .. g*ipg+ipg-1.
    g, ipg = layer.groups, w.shape[1]
    expand = (g, out // g, ipg)
    s = scale.reshape(g, 1, ipg).expand(expand).reshape(out, ipg)
    t = shift.reshape(g, 1, ipg).expand(expand).reshape(out, ipg)
    spatial = [1] * (w.dim() - 2)
    # Valid only without zero padding: every output sums a full window, so the shift adds
    # sum(w * t) everywhere.
    _write(
        layer,
        w * s.reshape(out, ipg, *spatial),
        b + (w * t.reshape(out, ipg, *spatial)).sum(tuple(range(1, w.dim()))),
    )


def _write(layer: nn.Module, w: Tensor, b: Tensor) -> None:
    dtype = layer.weight.dtype
    layer.weight.copy_(w.to(dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(b.to(dtype), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(b.to(dtype))


class _LeafBNTracer(torch.fx.Tracer):
    """fx tracer that keeps BN layers (ours include Python shape checks) as leaf calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_bn_like(m) or super().is_leaf_module(m, qualname)


@dataclass
class _Site:
    """One BN call and its neighbours, as seen by fx or inside an nn.Sequential."""

    bn: str
    calls: int  # how often the BN module is called per forward
    prev: str | None  # the layer whose output is the BN's only input, used by nothing else
    next: str | None  # the layer that is the BN output's only user
    in_rank: int | None  # rank of the BN's input, if known from an example input
    prev_calls: int = 1
    next_calls: int = 1


def _fx_sites(model: nn.Module, example_inputs) -> list[_Site]:
    graph = _LeafBNTracer().trace(model)
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        # Run on a copy: a training-mode BN would update the statistics of the returned model.
        probe = copy.deepcopy(model)
        gm = torch.fx.GraphModule(probe, graph)
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    modules = dict(model.named_modules(remove_duplicate=False))
    # Counted per module object: one module registered under two names is still one module.
    calls = Counter(id(modules[n.target]) for n in graph.nodes if n.op == "call_module")
    # Modules whose tensors the forward reads directly (self.conv.weight) cannot change meaning.
    touched = {n.target.rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}

    def is_layer(n):
        return (
            isinstance(n, torch.fx.Node)
            and n.op == "call_module"
            and isinstance(modules[n.target], _LINEAR)
            and n.target not in touched
        )

    sites = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_bn_like(modules[node.target]):
            continue
        src = node.args[0] if node.args else None
        simple = len(node.args) == 1 and not node.kwargs and node.target not in touched
        prev = src.target if simple and is_layer(src) and len(src.users) == 1 else None
        users = list(node.users)
        nxt = None
        if simple and len(users) == 1 and is_layer(users[0]) and users[0].args[:1] == (node,):
            if list(users[0].args[1:]) == [] and not users[0].kwargs:
                nxt = users[0].target
        meta = src.meta.get("tensor_meta") if isinstance(src, torch.fx.Node) else None
        sites.append(
            _Site(
                bn=node.target,
                calls=calls[id(modules[node.target])],
                prev=prev,
                next=nxt,
                in_rank=len(meta.shape) if meta is not None else None,
                prev_calls=calls[id(modules[prev])] if prev else 1,
                next_calls=calls[id(modules[nxt])] if nxt else 1,
            )
        )
    return sites


def _sequential_sites(model: nn.Module) -> list[_Site]:
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    names = {id(m): n for n, m in model.named_modules()}
    sites, seen = [], set()
    for m in model.modules():
        if not isinstance(m, nn.Sequential):
            continue
        children = list(m.children())
        for i, child in enumerate(children):
            if not _is_bn_like(child) or id(child) in seen:
                continue
            seen.add(id(child))
            prev = children[i - 1] if i > 0 else None
            nxt = children[i + 1] if i + 1 < len(children) else None
            sites.append(
                _Site(
                    bn=names[id(child)],
                    calls=counts[id(child)],
                    prev=names[id(prev)] if isinstance(prev, _LINEAR) else None,
                    next=names[id(nxt)] if isinstance(nxt, _LINEAR) else None,
                    in_rank=None,
                    prev_calls=counts[id(prev)] if prev is not None else 1,
                    next_calls=counts[id(nxt)] if nxt is not None else 1,
                )
            )
    # BN layers outside any Sequential are reported too.
    for name, child in model.named_modules():
        if _is_bn_like(child) and id(child) not in seen:
            sites.append(_Site(name, counts[id(child)], None, None, None))
    return sites


def fold(model: nn.Module, example_inputs: tuple | None = None) -> tuple[nn.Module, FoldReport]:
    """Fold every fixed BN into its adjacent Conv/ConvTranspose/Linear layer (Alg. 2, step 3).

    A BN with fixed statistics (eval mode with running statistics, or a `FrozenBatchNorm`) is
    the affine map y = scale * x + shift per channel (`batchnorm.functional.inference_affine`),
    so it merges into a linear layer next to it:

    - after the layer (the usual conv -> BN): W' = scale * W per output channel and
      b' = scale * b + shift; Conv1d/2d/3d (grouped and depthwise included), ConvTranspose1d/
      2d/3d and Linear, with or without bias.
    - before the layer (BN -> Linear, or BN -> conv without zero padding): W' = W * scale per
      input channel and b' = b + W shift. Zero padding would receive no shift (the BN output
      is nonzero there), and a transposed conv sums fewer inputs at its border, so those cases
      are not exact and are left alone.

    The BN becomes ``nn.Identity``; the model keeps its class and forward code. Folding is
    computed in float64 and cast back, so a float32 model's outputs match within about 1e-6
    relative error (the tests demand 1e-5). The layers are found with torch.fx: a BN is folded
    into a layer only if the BN is the sole user of that layer's output (or the layer is the
    sole user of the BN's output) and both are called once per forward. Models fx cannot trace
    fall back to adjacent pairs inside ``nn.Sequential`` containers. Everything else is left
    alone and reported.

    Args:
        model: the model; it is not modified (a deep copy is folded).
        example_inputs: optional positional inputs; if given, shapes are propagated so a BN
            next to a Linear is checked to normalize the Linear's feature (last) axis.
            Without them a Linear is assumed to see 2-D (N, C) activations.

    Returns:
        (folded model, `FoldReport`).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        >>> folded, report = fold(net.eval())
        >>> report.folded
        [('1', '0', 'after')]
    """
    model = copy.deepcopy(model)
    report = FoldReport()
    try:
        sites = _fx_sites(model, example_inputs)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: use the fallback
        report.traced, report.trace_error = False, f"{type(err).__name__}: {err}"
        sites = _sequential_sites(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    shared_counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    shared = {i for i, c in shared_counts.items() if c > 1}
    seen = set()
    for site in sites:
        bn = modules[site.bn]
        if id(bn) in seen:  # a BN called several times has one site per call
            continue
        seen.add(id(bn))
        why = _not_fixed_reason(bn)
        if why is None and site.calls > 1:
            why = "called more than once per forward"
        if why is not None:
            report.skipped.append((site.bn, why))
            continue
        reasons = []
        done = False
        for where, name, n_calls in (
            ("after", site.prev, site.prev_calls),
            ("before", site.next, site.next_calls),
        ):
            if name is None:
                continue
            layer = modules[name]
            problem = _layer_problem(layer, shared)
            if problem is None and n_calls > 1:
                problem = "it is called more than once per forward"
            if problem is None and not _axis_ok(bn, layer, site.in_rank):
                problem = f"the BN's channel axis {_bn_axis(bn)} is not the layer's feature axis"
            if problem is None and where == "before":
                problem = _pre_fold_problem(layer)
            if problem is not None:
                reasons.append(f"{where} {name} ({type(layer).__name__}): {problem}")
                continue
            scale, shift = _affine64(bn)
            (_fold_after if where == "after" else _fold_before)(layer, scale, shift)
            model.set_submodule(site.bn, nn.Identity())
            report.folded.append((site.bn, name, where))
            done = True
            break
        if not done:
            if not reasons:
                reasons.append(
                    "no adjacent Conv/ConvTranspose/Linear whose output only it uses, nor one "
                    "that is the only user of its output"
                )
            report.skipped.append((site.bn, "; ".join(reasons)))
    return model, report
