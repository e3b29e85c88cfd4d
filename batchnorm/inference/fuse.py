"""Algorithm 2's layers made one call with their activation: `fuse_activations` (a model pass).

Each BN -> activation pair of a model, and BN + add -> activation, becomes one fused layer
(`batchnorm.fused`): in place where the forward code can stay, through a rewritten
``torch.fx.GraphModule`` where the residual must be passed to the layer. The neighbours come
from `batchnorm.inference.graph`, as for `batchnorm.inference.fold`, and both passes ask
`batchnorm.inference.graph.call_problem` whether a BN's call can be replaced.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from batchnorm.activations import ACTIVATIONS, of_call, of_module
from batchnorm.distributed import SyncBatchNorm
from batchnorm.frozen import FrozenBatchNorm
from batchnorm.fused import FrozenBatchNormAct, fused_class, is_fused
from batchnorm.inference.graph import (
    GraphReport,
    LeafTracer,
    call_problem,
    capture,
    find_sites,
    first_line,
)
from batchnorm.swap import bn_kind, foreign_reason, is_bn_like, rebuild, swap_modules

__all__ = ["FuseReport", "fuse_activations"]


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


def _fused_form(cls: type) -> type | None:
    """The fused class `fuse_activations` makes of a BN class: `batchnorm.fused.fused_class`'s,
    except for SyncBatchNorm, a BN subclass it leaves alone."""
    return None if cls is SyncBatchNorm else fused_class(cls)


def _unfused_origin(bn: nn.Module) -> type | None:
    """The class a frozen layer was frozen from (`freeze` remembers it for `unfreeze`) when
    that class has no fused form, else None."""
    origin = getattr(bn, "_origin", None) if type(bn) is FrozenBatchNorm else None
    if origin is None or _fused_form(origin.cls) is not None and origin.cls is not FrozenBatchNorm:
        return None
    return origin.cls


def _may_activate(call) -> bool:
    """A call that may apply an activation of the registry (a module, or a function whose
    name says so; the torch.fx graph decides)."""
    if call.module is not None:
        return of_module(call.module) is not None
    return any(name in call.name for name in ACTIVATIONS if name != "identity")


def _describe(call) -> str:
    return call.name if call.module is None else f"{call.name} ({type(call.module).__name__})"


def fuse_activations(
    model: nn.Module,
    example_inputs: tuple | Tensor | None = None,
    *,
    memory_saving: bool = False,
) -> tuple[nn.Module, FuseReport]:
    """Replace every BN -> activation pair, and BN + add -> activation, by one fused layer.

    Each BN (``torch.nn.BatchNorm1d/2d/3d``, ours, or a `FrozenBatchNorm`) whose output is
    read only by an activation module of `batchnorm.activations` (``nn.ReLU``,
    ``nn.LeakyReLU``, ``nn.SiLU``, ``nn.Hardswish``, ``nn.ReLU6``, ``nn.GELU``; exact classes)
    that reads nothing else becomes the matching `BatchNormAct1d/2d/3d` (or
    `FrozenBatchNormAct`) sharing the very same parameter and buffer tensors, settings and
    train/eval mode (an optimizer keeps working); the activation module becomes
    ``nn.Identity``, so the model's forward code and state_dict keys stay as they were and its
    outputs are unchanged. This is done in place, so it must hold on every path of the
    forward, not only the one captured: with ``example_inputs`` (torch.export follows one
    path), the forward of the module that calls the BN and its activation is traced again with
    torch.fx, which sees every path, and the pair is fused only if there too the BN's output
    goes to the activation alone (``nn.Identity`` modules between are fine). A forward that
    branches on a flag (``return_preact=True`` also returning the BN's output) is left alone.

    BN + add -> activation (ResNet's ``out = self.relu(self.bn2(x) + identity)``) needs the
    residual passed to the fused layer, a change to the forward code. Where the graph shows
    it, the model is traced with torch.fx (BN layers kept as calls) and the BN call, the add
    and the activation become one call ``bn(x, residual)`` of the fused layer, if the BN's
    output is read only by the add, the add is a plain ``a + b`` / ``torch.add(a, b)`` of two
    tensors (no alpha) read only by an activation module called only there, or by a
    functional form (``F.relu``, ``torch.relu``, ``.relu()``, ``F.silu``, ``F.hardswish``,
    ``F.relu6``, ``F.gelu``), and the residual has the BN output's shape and dtype (checked on
    ``example_inputs`` with fake tensors, so these are needed; the output of a block fused
    before counts, so every block of a ResNet fuses). Where both operands of the add are BN
    outputs (``bn2(x) + downsample(x)``) the first is fused and the second becomes its
    residual. The model is then returned as a ``torch.fx.GraphModule`` holding the same
    modules and tensors under the same names (state_dict keys unchanged;
    `FuseReport.residual` lists these BNs, ``FuseReport.graph_module`` is True); the model
    passed in keeps its forward and shares every tensor with it. Without such a pattern the
    model passed in is returned.

    Left alone, with the reason in the report: a BN that is not followed by such a module (a
    convolution, a function such as ``F.relu`` without a residual add), an add that misses
    the conditions above (its sum also read elsewhere, a broadcast residual, alpha) or a
    model fx cannot trace, a BN or activation module called more than once per forward
    (torchvision's ResNet blocks reuse one ``self.relu``), a pair that may differ on another
    path (above), a BN called with more than its input (``bn(x, mask)``: the fused layer's
    second argument is the residual), a LeakyReLU with a negative slope, BN subclasses (Batch
    Renorm, SyncBatchNorm), another library's BN + activation layer (timm's
    ``BatchNormAct2d``: `batchnorm.convert` makes it ours) and any BN subclass the library
    cannot read (`batchnorm.swap.bn_kind`).

    The neighbours come from `batchnorm.inference.graph.capture`, as for `fold`: torch.export
    with ``example_inputs``, else torch.fx, else ``nn.Sequential`` containers.

    Args:
        model: the model (changed in place).
        example_inputs: positional inputs to capture the model with torch.export and to check
            the residuals' shapes (run on fake tensors only).
        memory_saving: build the pairs with an invertible activation (LeakyReLU with
            negative_slope > 0) with In-Place ABN's memory saving; the others cannot use it,
            nor layers given a residual.

    Returns:
        (model, `FuseReport`): ``model`` is a ``torch.fx.GraphModule`` when a BN + add ->
        activation was fused, else the model passed in.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> net, report = fuse_activations(net)
        >>> report.fused, type(net[1]).__name__, type(net[2]).__name__
        ([('1', '2', 'relu')], 'BatchNormAct2d', 'Identity')
    """
    graph, failures = capture(model, example_inputs, leaf=is_bn_like)
    report = FuseReport.of_capture(graph, failures, example_inputs, "fuse_activations")
    replace: dict[int, nn.Module] = {}
    residual: dict[int, tuple] = {}  # BN + add candidates: id(bn) -> (name, bn, fused class)
    seen: set[int] = set()
    for site in find_sites(graph, is_bn_like):
        bn, name = site.call.module, site.call.name
        if id(bn) in seen:
            continue
        seen.add(id(bn))
        target = _fused_form(type(bn))
        why = None
        if target is None:
            if is_fused(bn):
                why = "already fused"
            elif bn_kind(bn) == "norm_act":
                act = bn._modules.get("act")
                why = (
                    f"{type(bn).__name__} is another library's BN + activation layer (its act "
                    f"child: {type(act).__name__}); batchnorm.convert makes it our fused layer"
                )
            elif bn_kind(bn) == "foreign":
                why = foreign_reason(bn)
            else:
                why = f"{type(bn).__name__} has no fused form (only plain BN layers are fused)"
        else:
            why = call_problem(
                graph, site.call, "(a mask?): the fused layer's second argument is the "
                "residual, so the call would change meaning",
            )  # fmt: skip
        if why is None and _unfused_origin(bn) is not None:
            why = f"frozen from {_unfused_origin(bn).__name__}, which has no fused form"
        consumer = site.consumer
        act = of_module(consumer.module) if consumer is not None else None
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
                    why = f"its output goes to {_describe(user)}, not to an activation module"
            elif consumer is None:
                why = "its output is read by several calls, or by one that reads other values too"
            else:
                why = f"its output goes to {_describe(consumer)}, not to an activation module"
        if why is None and graph.times_called[id(consumer.module)] > 1:
            why = (
                f"the activation {consumer.name} is called more than once per forward "
                "(one module shared by several places)"
            )
        if why is None and act[0] == "leaky_relu" and act[1] < 0:
            why = f"LeakyReLU with negative_slope {act[1]} < 0 (the fused backward needs >= 0)"
        if why is None:
            why = _in_place_problem(model, graph, site.call, consumer)
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


def _in_place_problem(model: nn.Module, graph, bn_call, act_call) -> str | None:
    """Why fusing a BN and its activation in place (the BN becomes the fused layer, the
    activation ``nn.Identity``) might change a path of the forward the capture did not take;
    None when the BN's output goes to the activation alone on every path.

    torch.fx refuses Python control flow on the forward's inputs, so a graph it captured shows
    every path, and an ``nn.Sequential`` has one. torch.export follows the one path the
    example inputs take (a flag such as ``return_preact=True`` may return the BN's output
    too), so the forward that calls the BN and its activation is traced again with torch.fx.
    """
    if graph.source != "torch.export":
        return None
    where = bn_call.caller or "the model"
    if bn_call.caller != act_call.caller:
        return (
            f"the BN is called by the forward of {where}, its activation {act_call.name} by "
            f"that of {act_call.caller or 'the model'}: torch.export saw one path, and another "
            "may use the BN's output without the activation"
        )
    caller = model.get_submodule(bn_call.caller)
    if type(caller).forward is nn.Sequential.forward:
        return None
    try:
        traced = LeafTracer(is_bn_like).trace(caller)
    except Exception as err:  # noqa: BLE001 - any failure means: the other paths are unseen
        return (
            f"torch.export saw one path through the forward of {where} "
            f"({type(caller).__name__}) and torch.fx cannot trace it to see the others "
            f"({first_line(err, 120)}): another path (a flag such as return_preact=True) may "
            "use the BN's output without the activation"
        )
    prefix = f"{bn_call.caller}." if bn_call.caller else ""
    calls = [n for n in traced.nodes if n.op == "call_module"]
    bn_nodes = [n for n in calls if prefix + n.target == bn_call.name]
    act_nodes = [n for n in calls if prefix + n.target == act_call.name]
    if len(bn_nodes) != 1 or len(act_nodes) != 1:
        return (
            f"torch.fx sees {len(bn_nodes)} call(s) of the BN and {len(act_nodes)} of "
            f"{act_call.name} in the forward of {where}, not one each"
        )
    (bn_node,), (act_node,) = bn_nodes, act_nodes
    source = bn_node  # torch.export drops an nn.Identity (timm's drop_block); fx keeps it
    while len(source.users) == 1 and _is_identity(next(iter(source.users)), source, caller):
        source = next(iter(source.users))
    if list(source.users) != [act_node] or act_node.args != (source,) or act_node.kwargs:
        readers = ", ".join(u.name for u in source.users)
        return (
            f"in the forward of {where} the BN's output is read by {readers}, not by "
            f"{act_call.name} alone"
        )
    return None


def _is_identity(node, source, root: nn.Module) -> bool:
    """Whether fx ``node`` calls an ``nn.Identity`` module on ``source`` alone."""
    return (
        node.op == "call_module"
        and type(root.get_submodule(node.target)) is nn.Identity
        and node.args == (source,)
        and not node.kwargs
    )


def _fused_layer(
    bn: nn.Module, target: type, kind: str, slope: float, memory_saving: bool
) -> nn.Module:
    """The fused layer of ``target`` built on ``bn``'s very tensors and settings."""
    settings = {"activation": kind, "negative_slope": slope}
    saving = {"memory_saving": memory_saving and ACTIVATIONS[kind].invertible(slope)}
    if target is FrozenBatchNormAct:
        new = rebuild(bn, target, **settings)
        origin = getattr(bn, "_origin", None)
        if origin is not None:  # unfreeze must bring back the fused trainable layer
            new._origin = origin._replace(
                cls=fused_class(origin.cls), settings={**origin.settings, **settings, **saving}
            )
        return new
    return rebuild(bn, target, **settings, **saving)


_ADDS = (operator.add, torch.add)


def _node_activation(node, source, gm: nn.Module) -> tuple[str, float] | str:
    """(activation, negative_slope) when fx ``node`` applies an activation to ``source``
    alone, else why not."""
    if node.op == "call_module":
        act = of_module(gm.get_submodule(node.target))
        if act is not None and node.args == (source,) and not node.kwargs:
            return act
    elif node.op in ("call_function", "call_method") and node.args[:1] == (source,):
        act = of_call(node.target, node.args[1:], node.kwargs)
        if act is not None:
            return act
    return f"the sum goes to {node.name}, not to an activation of batchnorm.activations"


def _residual_site(node, gm: nn.Module, modules_called: Counter, residual_of: dict):
    """(add node, activation node, residual node, (activation, slope)) when the fx call
    ``node`` of a BN is the pattern act(bn(x) + residual), else why not."""
    if len(node.args) != 1 or node.kwargs:
        return "the BN is called with more than its input"
    users = list(node.users)
    if len(users) != 1:
        return "its output is read by more than the add"
    add = users[0]
    if add in residual_of:  # bn2(x) + downsample(x): one add, one BN fused
        return f"its output is the residual of {residual_of[add]}, fused with that add"
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
        gm = torch.fx.GraphModule(model, LeafTracer(is_bn_like).trace(model))
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.passes.shape_prop import ShapeProp

        class Shapes(ShapeProp):  # a BN keeps its input's shape; ours read values (.item())
            def call_module(self, target, args, kwargs):
                if is_bn_like(self.fetch_attr(target)):
                    return torch.empty_like(args[0])
                return super().call_module(target, args, kwargs)

        Shapes(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
    except Exception as err:  # noqa: BLE001 - any failure means: leave these BNs
        return leave(f"torch.fx could not capture the model ({first_line(err)}), {hint}")
    modules_called = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    residual_of: dict = {}  # fused call node -> the BN's name
    found = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and id(gm.get_submodule(node.target)) in candidates:
            found.setdefault(id(gm.get_submodule(node.target)), []).append(node)

    def second_operand(item) -> bool:  # x + shortcut: where both are BNs, x's is fused
        nodes = found.get(item[0], [])
        users = list(nodes[0].users) if len(nodes) == 1 else []
        return len(users) == 1 and users[0].args[:1] != (nodes[0],)

    for key, (name, bn, target) in sorted(candidates.items(), key=second_operand):
        nodes = found.get(key, [])
        site = (
            _residual_site(nodes[0], gm, modules_called, residual_of)
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
        # act(bn(x) + r) has the BN output's shape: a later residual that reads it needs it.
        fused.meta["tensor_meta"] = act_node.meta.get("tensor_meta")
        residual_of[fused] = name
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
