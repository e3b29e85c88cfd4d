"""BN fused with its activation: BatchNormAct1d/2d/3d, FrozenBatchNormAct, fuse_activations.

A BN layer is almost always followed by a ReLU (Sec. 4.2's BN-Inception puts BN before every
nonlinearity), often after a residual add. `BatchNormAct2d` computes act(BN(x) + residual) in
one layer: on the Triton kernels (`batchnorm.kernels`, chosen by `batchnorm.dispatch`) that is
one pass over memory instead of three, and with ``memory_saving=True`` (In-Place ABN, Rota
Bulo et al. 2018) the backward pass rebuilds xhat from the output instead of keeping x. On the
torch path it is the BN layer's forward followed by torch's add and activation.

The layers subclass the BN layers: same parameters, buffers and state_dict keys as
``torch.nn.BatchNorm2d`` (checkpoints load both ways), the same validate -> transform ->
commit forward, Algorithm 2's map in eval mode, and `freeze`, `fold`, `recalibrate` apply.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as TF
from torch import Tensor, nn
from torch.fx import Proxy
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm import dispatch as _dispatch
from batchnorm import modules as M
from batchnorm.inference.frozen import FrozenBatchNorm
from batchnorm.inference.graph import (
    GraphReport,
    _first_line,
    _LeafTracer,
    capture,
    find_sites,
)
from batchnorm.inference.swap import rebuild, restore, swap_modules

__all__ = [
    "BatchNormAct",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "FrozenBatchNormAct",
    "FuseReport",
    "fuse_activations",
]

ACTIVATIONS = ("identity", "relu", "leaky_relu")


def _check_activation(activation: str, negative_slope: float, memory_saving: bool) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "leaky_relu" and not negative_slope >= 0:
        raise ValueError(
            "the fused leaky_relu needs negative_slope >= 0 (its backward reads the sign off "
            f"the output, like torch's in-place leaky_relu), got {negative_slope}"
        )
    if memory_saving and (
        activation == "relu" or (activation == "leaky_relu" and negative_slope == 0)
    ):
        raise ValueError(
            "memory_saving rebuilds the input from the output and needs an invertible "
            f"activation (identity, or leaky_relu with negative_slope > 0), got {activation!r} "
            f"with negative_slope={negative_slope}"
        )


def activate(input: Tensor, activation: str, negative_slope: float = 0.01) -> Tensor:
    """The torch path's activation: identity, relu or leaky_relu."""
    if activation == "relu":
        return torch.relu(input)
    if activation == "leaky_relu":
        return TF.leaky_relu(input, negative_slope)
    return input


def activation_module(activation: str, negative_slope: float = 0.01) -> nn.Module:
    """The torch.nn module of an activation (what stays in place when a BN is folded away)."""
    if activation == "relu":
        return nn.ReLU()
    if activation == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    return nn.Identity()


def _check_residual(layer: nn.Module, input: Tensor, residual: Tensor | None) -> None:
    if residual is None:
        return
    if residual.shape != input.shape:
        raise ValueError(
            f"{type(layer).__name__} expected a residual of the input's shape "
            f"{tuple(input.shape)}, got {tuple(residual.shape)}"
        )
    if getattr(layer, "memory_saving", False):
        raise ValueError(
            f"{type(layer).__name__}(memory_saving=True) takes no residual: subtracting it from "
            "the output would cancel most digits of gamma * xhat; add the residual after the "
            "layer instead"
        )


class _Activated:
    """What a trainable and a frozen fused layer share: the residual add and the activation
    after the normalization, the activation as a module, and its constructor settings."""

    def _activate(self, output: Tensor, residual: Tensor | None) -> Tensor:
        if residual is not None:
            output = output + residual
        return activate(output, self.activation, self.negative_slope)

    def activation_module(self) -> nn.Module:
        """The activation as a torch.nn module: what `fold` leaves in this layer's place."""
        return activation_module(self.activation, self.negative_slope)

    def _settings(self) -> dict:
        return {
            **super()._settings(),
            "activation": self.activation,
            "negative_slope": self.negative_slope,
        }


class _BatchNormActMixin(_Activated):
    """act(BN(input) + residual) on top of a BN layer; see `BatchNormAct2d`."""

    def __init__(
        self,
        num_features: int,
        *args,
        activation: str = "relu",
        negative_slope: float = 0.01,
        memory_saving: bool = False,
        **kwargs,
    ) -> None:
        _check_activation(activation, negative_slope, memory_saving)
        super().__init__(num_features, *args, **kwargs)
        self.activation = activation
        self.negative_slope = negative_slope
        self.memory_saving = memory_saving

    def forward(
        self, input: Tensor, residual: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """act(BN(input) + residual); ``mask`` as for the BN layers (torch path only)."""
        if isinstance(input, Proxy):
            return M._fx_leaf(self, input, residual, mask)
        _check_residual(self, input, residual)
        backend = self.backend
        if backend != "torch" and (input.is_cuda or backend == "triton"):
            self._check_input_dim(input, mask)
            if _dispatch.use_kernels(self, input, mask, residual):
                return _dispatch.forward_kernels(
                    self, input, residual, self.activation, self.negative_slope,
                    self.memory_saving,
                )  # fmt: skip
        return self._activate(super().forward(input, mask), residual)

    def _settings(self) -> dict:
        return {**super()._settings(), "memory_saving": self.memory_saving}

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        if self.memory_saving:
            text += ", memory_saving=True"
        return text

    @property
    def _frozen_class(self) -> type:
        return FrozenBatchNormAct


class BatchNormAct1d(_BatchNormActMixin, M.BatchNorm1d):
    """act(BN(x) + residual) over (N, C) or (N, C, L); see `BatchNormAct2d`."""


class BatchNormAct2d(_BatchNormActMixin, M.BatchNorm2d):
    """act(BN(x) + residual) per feature map of (N, C, H, W): BN (Sec. 3.2) fused with its
    activation and an optional residual add.

    ``forward(input, residual=None)`` returns act(BN(input) + residual), with
    act = identity, relu or leaky_relu(negative_slope). Parameters, buffers, state_dict keys,
    the running-statistics update and the eval-mode map are `batchnorm.BatchNorm2d`'s, so a
    checkpoint of ``nn.BatchNorm2d`` loads into it and back.

    With ``backend="triton"`` the Triton kernels compute the whole layer on CUDA tensors,
    forward and backward, in one pass over memory each (``"auto"`` only on GPUs whose results
    are in `batchnorm.dispatch.MEASURED`: none yet). Elsewhere (CPU, float64, torch.compile, a
    mask) the torch path computes the same values with torch's operations.

    Args:
        num_features, eps, momentum, affine, track_running_stats, bias, backward,
            virtual_batch_size, backend: as for `batchnorm.BatchNorm2d`.
        activation: "relu" (default), "leaky_relu" or "identity".
        negative_slope: leaky_relu's slope for negative inputs (>= 0).
        memory_saving: In-Place ABN (Rota Bulo et al. 2018): on the kernels, keep only the
            output for the backward pass and rebuild xhat = (act^-1(z) - beta) / gamma there,
            so the input can be freed. Needs an invertible activation (identity, or
            leaky_relu with negative_slope > 0) and no residual. Gamma near zero: on a call
            where some |gamma| < 1e-3 the kernels keep x instead (exact gradients; the check
            reads gamma back, one host synchronization per call). Nothing is
            reparametrized: the state_dict stays plain BN's. The torch path ignores it (same
            values; x is kept).

    Example:
        >>> layer = BatchNormAct2d(8)
        >>> x, skip = torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5)
        >>> bool((layer(x, skip) >= 0).all())
        True
    """


class BatchNormAct3d(_BatchNormActMixin, M.BatchNorm3d):
    """act(BN(x) + residual) per feature map of (N, C, D, H, W); see `BatchNormAct2d`."""


class BatchNormAct(_BatchNormActMixin, M.BatchNorm):
    """act(BN(x) + residual) with the channel on any ``axis``; see `BatchNormAct2d`."""


class FrozenBatchNormAct(_Activated, FrozenBatchNorm):
    """act(FrozenBatchNorm(x) + residual): a frozen `BatchNormAct2d` (Algorithm 2's map, then
    the residual add and the activation), what `batchnorm.freeze` makes of a fused layer.

    The state_dict is FrozenBatchNorm's (torch's BN keys); ``unfreeze`` brings the fused layer
    back with every setting it had.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        activation: str = "relu",
        negative_slope: float = 0.01,
        **kwargs,
    ) -> None:
        _check_activation(activation, negative_slope, False)
        super().__init__(num_features, eps, **kwargs)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(
        self, input: Tensor, residual: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """act(FrozenBatchNorm(input) + residual); ``mask`` checked and ignored, as there."""
        if isinstance(input, Proxy):
            return M._fx_leaf(self, input, residual, mask)
        _check_residual(self, input, residual)
        return self._activate(super().forward(input, mask), residual)

    def to_batchnorm(self) -> nn.Module:
        """The trainable fused layer this one was frozen from (`BatchNormAct` over the same
        axis when it was built directly)."""
        restored = restore(self)
        if restored is not None:
            return restored
        return rebuild(self, BatchNormAct, drop={"trainable_affine"})

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        return text


# ---------------------------------------------------------------------------------------------
# fuse_activations


@dataclass
class FuseReport(GraphReport):
    """What `fuse_activations` did: the BN -> activation pairs fused, and the BNs left.

    Attributes:
        fused: (bn name, activation name, activation): the BN became a fused layer and the
            activation module became ``nn.Identity``.
        residual: (bn name, activation call, activation) for every BN + add -> activation
            fused into one call ``bn(x, residual)`` of the fused layer in a rewritten
            ``torch.fx.GraphModule``.
        graph_module: the model was returned as a ``torch.fx.GraphModule`` (there were
            residual fusions); else it is the model passed in, changed in place.
        skipped, graph, traced, trace_error: as in `GraphReport`.
    """

    fused: list[tuple[str, str, str]] = field(default_factory=list)
    residual: list[tuple[str, str, str]] = field(default_factory=list)
    graph_module: bool = False

    def __str__(self) -> str:
        changed = [f"  {bn} + {act} -> {kind}" for bn, act, kind in self.fused]
        changed += [f"  {bn} + add + {act} -> {kind} (residual)" for bn, act, kind in self.residual]
        if self.graph_module:
            changed.append("  returned a torch.fx.GraphModule: the forward calls bn(x, residual)")
        return self._lines(f"fused {len(self.fused) + len(self.residual)} BN layer(s)", changed)


def _targets() -> dict[type, type]:
    """BN class -> fused class: exact classes only (a subclass may change forward)."""
    return {
        nn.BatchNorm1d: BatchNormAct1d,
        nn.BatchNorm2d: BatchNormAct2d,
        nn.BatchNorm3d: BatchNormAct3d,
        M.BatchNorm1d: BatchNormAct1d,
        M.BatchNorm2d: BatchNormAct2d,
        M.BatchNorm3d: BatchNormAct3d,
        M.BatchNorm: BatchNormAct,
        FrozenBatchNorm: FrozenBatchNormAct,
    }


def _unfused_origin(bn: nn.Module) -> type | None:
    """The class a frozen layer was frozen from (`freeze` remembers it for `unfreeze`) when
    that class has no fused form, else None."""
    origin = getattr(bn, "_origin", None) if type(bn) is FrozenBatchNorm else None
    if origin is None or origin.cls in _targets() and origin.cls is not FrozenBatchNorm:
        return None
    return origin.cls


def _is_bn_like(m: nn.Module) -> bool:
    return isinstance(m, (_BatchNorm, FrozenBatchNorm))


def _activation_of(module: nn.Module | None) -> tuple[str, float] | None:
    if type(module) is nn.ReLU:
        return "relu", 0.01
    if type(module) is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    return None


def _may_activate(call) -> bool:
    """A call that may apply a ReLU/LeakyReLU (a module, or a function named relu)."""
    return _activation_of(call.module) is not None or (call.module is None and "relu" in call.name)


def _describe(call) -> str:
    return call.name if call.module is None else f"{call.name} ({type(call.module).__name__})"


def fuse_activations(
    model: nn.Module,
    example_inputs: tuple | Tensor | None = None,
    *,
    memory_saving: bool = False,
) -> tuple[nn.Module, FuseReport]:
    """Replace every BN -> ReLU/LeakyReLU pair, and BN + add -> ReLU, by one fused layer.

    Each BN (``torch.nn.BatchNorm1d/2d/3d``, ours, or a `FrozenBatchNorm`) whose output is
    read only by an ``nn.ReLU`` or ``nn.LeakyReLU`` module (that reads nothing else) becomes
    the matching `BatchNormAct1d/2d/3d` (or `FrozenBatchNormAct`) sharing the very same
    parameter and buffer tensors, settings and train/eval mode (an optimizer keeps working);
    the activation module becomes ``nn.Identity``, so the model's forward code and state_dict
    keys stay as they were and its outputs are unchanged. This is done in place.

    BN + add -> ReLU (ResNet's ``out = self.relu(self.bn2(x) + identity)``) needs the
    residual passed to the fused layer, a change to the forward code. Where the graph shows
    it, the model is traced with torch.fx (BN layers kept as calls) and the BN call, the add
    and the activation become one call ``bn(x, residual)`` of the fused layer, if the BN's
    output is read only by the add, the add is a plain ``a + b`` / ``torch.add(a, b)`` of two
    tensors (no alpha) read only by an ``nn.ReLU``/``nn.LeakyReLU`` module called only there,
    or by ``F.relu`` / ``torch.relu`` / ``.relu()``, and the residual has the BN output's
    shape and dtype (checked on ``example_inputs`` with fake tensors, so these are needed).
    The model is then returned as a ``torch.fx.GraphModule`` holding the same modules and
    tensors under the same names (state_dict keys unchanged; `FuseReport.residual` lists
    these BNs, ``FuseReport.graph_module`` is True); the model passed in keeps its forward and
    shares every tensor with it. Without such a pattern the model passed in is returned.

    Left alone, with the reason in the report: a BN that is not followed by such a module (a
    convolution, a function such as ``F.relu``), an add that misses the conditions above (its
    sum also read elsewhere, a broadcast residual, alpha) or a model fx cannot trace, a BN or
    activation module called more than once per forward (torchvision's ResNet blocks reuse
    one ``self.relu``), a BN called with more than its input (``bn(x, mask)``: the fused
    layer's second argument is the residual), a LeakyReLU with a negative slope, and BN
    subclasses (Batch Renorm, SyncBatchNorm).

    The neighbours come from `batchnorm.inference.graph.capture`, as for `fold`: torch.export
    with ``example_inputs``, else torch.fx, else ``nn.Sequential`` containers.

    Args:
        model: the model (changed in place).
        example_inputs: positional inputs to capture the model with torch.export and to check
            the residuals' shapes (run on fake tensors only).
        memory_saving: build the LeakyReLU pairs (negative_slope > 0) with In-Place ABN's
            memory saving; ReLU pairs cannot use it (ReLU is not invertible), nor layers
            given a residual.

    Returns:
        (model, `FuseReport`): ``model`` is a ``torch.fx.GraphModule`` when a BN + add ->
        ReLU was fused, else the model passed in.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> net, report = fuse_activations(net)
        >>> report.fused, type(net[1]).__name__, type(net[2]).__name__
        ([('1', '2', 'relu')], 'BatchNormAct2d', 'Identity')
    """
    graph, failures = capture(model, example_inputs, leaf=_is_bn_like)
    report = FuseReport.of_capture(graph, failures, example_inputs, "fuse_activations")
    targets = _targets()
    replace: dict[int, nn.Module] = {}
    residual: dict[int, tuple] = {}  # BN + add candidates: id(bn) -> (name, bn, fused class)
    seen: set[int] = set()
    sites = find_sites(graph, _is_bn_like)
    called_by_bn = Counter(id(s.call.module) for s in sites)
    for site in sites:
        bn, name = site.call.module, site.call.name
        if id(bn) in seen:
            continue
        seen.add(id(bn))
        target = targets.get(type(bn))
        why = None
        if target is None:
            why = (
                "already fused"
                if isinstance(bn, (_BatchNormActMixin, FrozenBatchNormAct))
                else f"{type(bn).__name__} has no fused form (only plain BN layers are fused)"
            )
        elif graph.times_called[id(bn)] > 1 or called_by_bn[id(bn)] > 1:
            why = "called more than once per forward"
        elif _unfused_origin(bn) is not None:
            why = f"frozen from {_unfused_origin(bn).__name__}, which has no fused form"
        elif site.call.touched:
            why = "the forward reads its tensors outside its call"
        elif site.call.extra or len(site.call.inputs) > 1:
            why = (
                "called with more than its input (a mask?): the fused layer's second argument "
                "is the residual, so the call would change meaning"
            )
        consumer = site.consumer
        act = _activation_of(consumer.module) if consumer is not None else None
        if why is None and act is None:
            users = site.call.users
            user = users[0] if len(users) == 1 and users[0].module is None else None
            nxt = user.users[0] if user is not None and len(user.users) == 1 else None
            if user is not None and "add" in user.name and nxt is not None and _may_activate(nxt):
                residual[id(bn)] = (name, bn, target)  # decided on the fx graph below
                continue
            if consumer is None and user is not None:
                if user.name == "output":
                    why = "its output is the model's output"
                else:
                    why = f"its output goes to {_describe(user)}, not to a ReLU/LeakyReLU module"
            elif consumer is None:
                why = "its output is read by several calls, or by one that reads other values too"
            else:
                why = f"its output goes to {_describe(consumer)}, not to a ReLU/LeakyReLU module"
        if why is None and graph.times_called[id(consumer.module)] > 1:
            why = (
                f"the activation {consumer.name} is called more than once per forward "
                "(one module shared by several places)"
            )
        if why is None and act[0] == "leaky_relu" and act[1] < 0:
            why = f"LeakyReLU with negative_slope {act[1]} < 0 (the fused backward needs >= 0)"
        if why is not None:
            report.skipped.append((name, why))
            continue
        kind, slope = act
        replace[id(bn)] = _fused_layer(bn, target, kind, slope, memory_saving)
        replace[id(consumer.module)] = nn.Identity()
        report.fused.append((name, consumer.name, kind))
    model = swap_modules(model, lambda m: replace.get(id(m)))
    if residual:
        model = _fuse_residuals(model, residual, example_inputs, report)
    return model, report


def _fused_layer(
    bn: nn.Module, target: type, kind: str, slope: float, memory_saving: bool
) -> nn.Module:
    """The fused layer of ``target`` built on ``bn``'s very tensors and settings."""
    settings = {"activation": kind, "negative_slope": slope}
    saving = {"memory_saving": memory_saving and kind == "leaky_relu" and slope > 0}
    if target is FrozenBatchNormAct:
        new = rebuild(bn, target, **settings)
        origin = getattr(bn, "_origin", None)
        if origin is not None:  # unfreeze must bring back the fused trainable layer
            new._origin = origin._replace(
                cls=_targets()[origin.cls], settings={**origin.settings, **settings, **saving}
            )
        return new
    return rebuild(bn, target, **settings, **saving)


_ADDS = (operator.add, torch.add)
_RELUS = (torch.relu, TF.relu)


def _node_activation(node, source, gm: nn.Module) -> tuple[str, float] | str:
    """(activation, negative_slope) when fx ``node`` applies a ReLU/LeakyReLU to ``source``
    alone, else why not."""
    if node.op == "call_module":
        act = _activation_of(gm.get_submodule(node.target))
        if act is not None and node.args == (source,) and not node.kwargs:
            return act
    elif node.op == "call_function" and node.target in _RELUS:
        if node.args == (source,) and set(node.kwargs) <= {"inplace"}:
            return "relu", 0.01
    elif node.op == "call_method" and node.target == "relu":
        if node.args == (source,) and not node.kwargs:
            return "relu", 0.01
    return f"the sum goes to {node.name}, not to a ReLU/LeakyReLU"


def _residual_site(node, gm: nn.Module, modules_called: Counter):
    """(add node, activation node, residual node, (activation, slope)) when the fx call
    ``node`` of a BN is the pattern act(bn(x) + residual), else why not."""
    if len(node.args) != 1 or node.kwargs:
        return "the BN is called with more than its input"
    users = list(node.users)
    if len(users) != 1:
        return "its output is read by more than the add"
    add = users[0]
    plain = (
        add.op == "call_function"
        and add.target in _ADDS
        and len(add.args) == 2
        and not add.kwargs
        and all(isinstance(a, torch.fx.Node) for a in add.args)
        and add.args.count(node) == 1
    )
    if not plain:
        return f"{add.name} is not a plain a + b of two tensors (alpha, a scalar, or x + x)"
    if len(add.users) != 1:
        return f"the sum {add.name} is also read elsewhere ({', '.join(u.name for u in add.users)})"
    act_node = next(iter(add.users))
    act = _node_activation(act_node, add, gm)
    if isinstance(act, str):
        return act
    if act_node.op == "call_module" and modules_called[act_node.target] > 1:
        return (
            f"the activation {act_node.target} is called more than once per forward "
            "(one module shared by several places)"
        )
    if act[0] == "leaky_relu" and act[1] < 0:
        return f"LeakyReLU with negative_slope {act[1]} < 0 (the fused backward needs >= 0)"
    other = add.args[1] if add.args[0] is node else add.args[0]
    mine, theirs = node.meta.get("tensor_meta"), other.meta.get("tensor_meta")
    if mine is None or theirs is None:
        return "the shapes of the BN output and the residual are unknown"
    if (mine.shape, mine.dtype) != (theirs.shape, theirs.dtype):
        return (
            f"the residual {other.name} is {tuple(theirs.shape)} {theirs.dtype}, the BN output "
            f"{tuple(mine.shape)} {mine.dtype} (the fused layer adds no broadcast)"
        )
    return add, act_node, other, act


def _keep_state(model: nn.Module, gm: nn.Module) -> None:
    """Register on ``gm`` every module, parameter and buffer of ``model`` that it lacks (a
    GraphModule keeps only what the forward reads), so the state_dict keys stay the model's."""
    for path, module in model.named_modules():
        parent, _, attr = path.rpartition(".")
        if path and not hasattr(gm.get_submodule(parent), attr):
            gm.get_submodule(parent).add_module(attr, module)
        mirror = gm.get_submodule(path)
        if mirror is module:
            continue
        for key, value in module._parameters.items():
            if value is not None and key not in mirror._parameters:
                mirror.register_parameter(key, value)
        for key, value in module._buffers.items():
            if value is not None and key not in mirror._buffers:
                persistent = key not in module._non_persistent_buffers_set
                mirror.register_buffer(key, value, persistent=persistent)


def _fuse_residuals(
    model: nn.Module, candidates: dict, example_inputs, report: FuseReport
) -> nn.Module:
    """Rewrite act(bn(x) + residual) into one call bn(x, residual) of the fused layer on a
    torch.fx GraphModule of ``model``; the GraphModule when any was fused, else ``model``."""
    names = {name for name, _, _ in candidates.values()}
    hint = "or pass the residual to a fused layer in the forward code, layer(x, residual)"

    def leave(why: str) -> nn.Module:
        report.skipped.extend((name, f"BN + add -> activation: {why}") for name in names)
        return model

    if example_inputs is None:
        return leave(f"pass example_inputs to check the residual's shape, {hint}")
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    try:
        gm = torch.fx.GraphModule(model, _LeafTracer(_is_bn_like).trace(model))
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.passes.shape_prop import ShapeProp

        class Shapes(ShapeProp):  # a BN keeps its input's shape; ours read values (.item())
            def call_module(self, target, args, kwargs):
                if _is_bn_like(self.fetch_attr(target)):
                    return torch.empty_like(args[0])
                return super().call_module(target, args, kwargs)

        Shapes(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
    except Exception as err:  # noqa: BLE001 - any failure means: leave these BNs
        return leave(f"torch.fx could not capture the model ({_first_line(err)}), {hint}")
    modules_called = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    found = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and id(gm.get_submodule(node.target)) in candidates:
            found.setdefault(id(gm.get_submodule(node.target)), []).append(node)
    for key, (name, bn, target) in candidates.items():
        nodes = found.get(key, [])
        site = (
            _residual_site(nodes[0], gm, modules_called)
            if len(nodes) == 1
            else f"torch.fx sees {len(nodes)} calls of it, not one"
        )
        if isinstance(site, str):
            report.skipped.append((name, f"BN + add -> activation, no residual fusion: {site}"))
            continue
        node = nodes[0]
        add, act_node, other, (kind, slope) = site
        with gm.graph.inserting_before(act_node):
            fused = gm.graph.call_module(node.target, (node.args[0], other))
        act_node.replace_all_uses_with(fused)
        label = act_node.target if act_node.op == "call_module" else act_node.name
        for dead in (act_node, add, node):
            gm.graph.erase_node(dead)
        parent, _, attr = node.target.rpartition(".")
        setattr(gm.get_submodule(parent), attr, _fused_layer(bn, target, kind, slope, False))
        report.residual.append((name, str(label), kind))
    if not report.residual:
        return model
    gm.graph.lint()
    gm.recompile()
    _keep_state(model, gm)
    report.graph_module = True
    return gm
