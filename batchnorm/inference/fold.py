"""Algorithm 2, step 3 (Sec. 3.1): each fixed BN merged into the adjacent linear layer.

A BN with fixed statistics is one affine map per channel (`batchnorm.functional.
inference_affine`), so it folds into the Conv/ConvTranspose/Linear layer before or after
it. The neighbours come from `batchnorm.inference.graph` (torch.export with example
inputs, torch.fx, or nn.Sequential containers).
"""

from __future__ import annotations

import copy
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from batchnorm import functional as F
from batchnorm.fused import is_fused
from batchnorm.inference.graph import GraphReport, call_problem, capture, find_sites
from batchnorm.swap import (
    bn_kind,
    channel_axis,
    foreign_reason,
    is_bn_like,
    is_frozen,
    swap_modules,
    tracks_running_stats,
)

__all__ = ["fold", "FoldReport"]


@dataclass
class FoldReport(GraphReport):
    """What `fold` did: the BN layers folded, and those left alone with the reason.

    Attributes:
        folded: (bn name, layer name, "after" | "before"): the BN followed (or preceded) that
            Conv/ConvTranspose/Linear layer and was merged into it (it is now nn.Identity, or
            the activation it applied: a fused layer's, or timm's ``BatchNormAct2d``'s own
            ``drop`` and ``act`` modules).
        skipped, graph, traced, trace_error: as in `GraphReport`.
    """

    folded: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        changed = [f"  {bn} -> {layer} ({where})" for bn, layer, where in self.folded]
        return self._lines(f"folded {len(self.folded)} BN layer(s)", changed)


def _name(residue: nn.Module) -> str:
    inner = [type(m).__name__ for m in residue.children() if type(m) is not nn.Identity]
    inner = inner or [type(residue).__name__]
    return ", ".join(inner)


def _not_fixed_reason(bn: nn.Module) -> str | None:
    """Why ``bn`` is not one fixed affine map now, or None when it is (a frozen layer, ours or
    another library's, always is: `batchnorm.swap.is_frozen`)."""
    if is_frozen(bn):
        return None
    if not tracks_running_stats(bn):
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


def _residue(bn: nn.Module) -> nn.Module:
    """What stays in a folded BN's place: nothing (``nn.Identity``), a fused layer's activation
    module (`batchnorm.fused`), or a BN + activation layer's own ``drop`` and ``act`` children
    (timm's ``BatchNormAct2d``), under those names."""
    if is_fused(bn):
        return bn.activation_module()
    if bn_kind(bn) == "norm_act":
        kept = [(k, m) for k in ("drop", "act") if (m := bn._modules.get(k)) is not None]
        if any(type(m) is not nn.Identity for _, m in kept):
            return nn.Sequential(OrderedDict(kept))
    return nn.Identity()


def _layer_problem(layer: nn.Module, shared: set[int]) -> str | None:
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
        return "uninitialized lazy module"
    if torch.nn.utils.parametrize.is_parametrized(layer):
        return "its weight is parametrized"
    if id(layer.weight) in shared or (layer.bias is not None and id(layer.bias) in shared):
        return "its weight or bias is shared with another module"
    return None


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


def _axis_problem(bn: nn.Module, layer: nn.Module, rank: int | None) -> str | None:
    """Why the BN's channel axis is not the layer's feature axis, or None when it is.

    Convs put features on axis 1 of an (N, C, *spatial) tensor (every BN needs the batch
    axis first); Linear on the last axis. A BN over axis 1 next to a Linear is foldable only
    for 2-D (N, C) input: on (N, C, L) the Linear mixes L while the BN normalizes C. Without
    the rank (no example inputs) that case is left alone rather than guessed.
    """
    axis = channel_axis(bn)
    if isinstance(layer, _ConvNd):
        rank = len(layer.kernel_size) + 2 if rank is None else rank
        feature = 1
    elif rank is None:
        if axis == -1:  # the last axis, at any rank
            return None
        return (
            f"the BN normalizes axis {axis} and a Linear's features are on the last axis: "
            "the same axis only for 2-D (N, C) input, and the rank is unknown without "
            "example_inputs (pass example_inputs=(x,) to fold)"
        )
    else:
        feature = rank - 1
    if axis % rank != feature:
        return (
            f"the BN's channel axis {axis} is not the layer's feature axis ({feature} of "
            f"{rank}-D activations)"
        )
    return None


def fold(
    model: nn.Module, example_inputs: tuple | Tensor | None = None
) -> tuple[nn.Module, FoldReport]:
    """Fold every fixed BN into its adjacent Conv/ConvTranspose/Linear layer (Alg. 2, step 3).

    A BN with fixed statistics (eval mode with running statistics, a `FrozenBatchNorm`, or
    another library's frozen layer, torchvision's ``FrozenBatchNorm2d``: `batchnorm.swap.
    is_frozen`) is the affine map y = scale * x + shift per channel (`batchnorm.functional.
    inference_affine`), so it merges into a linear layer next to it:

    - after the layer (the usual conv -> BN): W' = scale * W per output channel and
      b' = scale * b + shift; Conv1d/2d/3d (grouped and depthwise included), ConvTranspose1d/
      2d/3d and Linear, with or without bias.
    - before the layer (BN -> Linear, or BN -> conv without zero padding): W' = W * scale per
      input channel and b' = b + W shift. Zero padding would receive no shift (the BN output
      is nonzero there), and a transposed conv sums fewer inputs at its border, so those cases
      are not exact and are left alone.

    The BN becomes ``nn.Identity`` (a BN fused with its activation, `batchnorm.fused`, becomes
    that activation's module, and folds only into the layer before it); the model keeps its
    class and forward code. Folding is
    computed in float64 and cast back, so a float32 model's outputs match within about 1e-6
    relative error (the tests demand 1e-5). A BN is folded into a layer only if the BN is the
    sole user of that layer's output (or the layer is the sole user of the BN's output), both
    are called once per forward, and the BN's call reads nothing but its input (``bn(x,
    mask)`` or a fused ``bn(x, residual)`` stays); everything else is left alone and reported.

    The neighbours come from `batchnorm.inference.graph.capture`: with ``example_inputs``
    the model is captured with ``torch.export`` (Python control flow on shapes is fine, and
    every shape is known); otherwise with ``torch.fx``; a model neither can capture falls
    back to adjacent pairs inside ``nn.Sequential`` containers, and the report says what
    failed. A BN over axis 1 next to a Linear needs the rank (2-D input folds, (N, C, L) does
    not), so without ``example_inputs`` it is left alone with that reason.

    Args:
        model: the model; it is not modified (a deep copy is folded).
        example_inputs: positional inputs (a tuple, or one tensor) to capture the model
            with; they are not run eagerly.

    Returns:
        (folded model, `FoldReport`).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        >>> folded, report = fold(net.eval())
        >>> report.folded
        [('1', '0', 'after')]
    """
    model = copy.deepcopy(model)
    graph, failures = capture(model, example_inputs, leaf=is_bn_like)
    report = FoldReport.of_capture(graph, failures, example_inputs, "fold")
    shared_counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    shared = {i for i, c in shared_counts.items() if c > 1}
    seen = set()
    for site in find_sites(graph, is_bn_like):
        bn, name = site.call.module, site.call.name
        if id(bn) in seen:  # a BN called several times has one site per call
            continue
        seen.add(id(bn))
        why = foreign_reason(bn) if bn_kind(bn) == "foreign" else None
        if why is None:
            why = _not_fixed_reason(bn)
        if why is None:
            why = call_problem(
                graph, site.call, "(a mask, a residual): the module left in its place takes the "
                "input alone",
            )  # fmt: skip
        if why is not None:
            report.skipped.append((name, why))
            continue
        reasons = []
        # A BN with an activation leaves the activation in its place, which stands between it
        # and the next layer.
        residue = _residue(bn)
        for where, neighbour in (("after", site.producer), ("before", site.consumer)):
            if neighbour is None or not isinstance(neighbour.module, _LINEAR):
                continue
            layer = neighbour.module
            problem = _layer_problem(layer, shared)
            if problem is None and graph.times_called[id(layer)] > 1:
                problem = "it is called more than once per forward"
            if problem is None and neighbour.touched:
                problem = "the forward reads its weight outside its call"
            if problem is None:
                problem = _axis_problem(bn, layer, site.call.rank)
            if problem is None and where == "before":
                problem = _pre_fold_problem(layer)
            if problem is None and where == "before" and not isinstance(residue, nn.Identity):
                problem = f"the activation {_name(residue)} lies between the BN and this layer"
            if problem is not None:
                reasons.append(f"{where} {neighbour.name} ({type(layer).__name__}): {problem}")
                continue
            scale, shift = _affine64(bn)
            (_fold_after if where == "after" else _fold_before)(layer, scale, shift)
            swap_modules(model, lambda m, bn=bn, new=residue: new if m is bn else None)
            report.folded.append((name, neighbour.name, where))
            break
        else:
            if not reasons:
                reasons.append(
                    "no adjacent Conv/ConvTranspose/Linear whose output only it uses, nor one "
                    "that is the only user of its output"
                    + ("" if report.traced else " inside an nn.Sequential (see trace_error)")
                )
            report.skipped.append((name, "; ".join(reasons)))
    return model, report
