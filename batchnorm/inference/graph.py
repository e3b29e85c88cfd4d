"""Which layer feeds a BN and which one reads it (Algorithm 2, step 3 needs the neighbours).

Folding a BN into a linear layer (`batchnorm.inference.fold`), like fusing it with an
activation, needs the call that produces the BN's input and the call that reads its output.
This module captures a model's forward as a graph of calls, one representation from three
sources, tried in order:

1. ``torch.export`` with example inputs: any model ``torch.export`` can capture (Python
   control flow on shapes included), with every tensor's shape; the aten operations are
   grouped into module calls by their ``nn_module_stack``.
2. ``torch.fx`` symbolic tracing, without shapes; BN layers are kept as leaf calls.
3. The children of every ``nn.Sequential``, each reading the previous one's output.

`find_sites` then gives, for every call of a matching module, its producer and consumer.
`LeafTracer` (torch.fx keeping the BN layers as calls) and `first_line` (an error in one
line, for a report) serve the passes that trace a model again (`fuse_activations`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "Call",
    "CallGraph",
    "GraphReport",
    "LeafTracer",
    "Site",
    "call_problem",
    "capture",
    "find_sites",
    "first_line",
]


@dataclass(eq=False)
class Call:
    """One call in a model's forward: of a module, or of a function or operation.

    Attributes:
        name: the module's path in the model, or the function's name.
        module: the module called; None for a function or operation.
        inputs: the producer of each distinct tensor value this call reads (parameters and
            buffers excluded), in order; None where the value is a model input.
        users: the distinct calls that read this call's output (the model's output is a call
            named "output").
        outputs: how many distinct values of this call others read.
        rank: the rank of the first input, when shapes are known.
        touched: the forward reads this module's parameters or buffers outside its call.
        extra: the module is called with more than its input: another argument that is not
            None (a mask, a residual), even one its forward never reads (a BN in eval mode
            ignores its mask), so that a module taking only the input cannot replace it.
        caller: the path of the module whose forward made this call ("" for the model's
            own), where the capture knows it (torch.export); else None.
    """

    name: str
    module: nn.Module | None = None
    inputs: list[Call | None] = field(default_factory=list)
    users: list[Call] = field(default_factory=list)
    outputs: int = 1
    rank: int | None = None
    touched: bool = False
    extra: bool = False
    caller: str | None = None

    def __repr__(self) -> str:
        return f"Call({self.name!r})"


@dataclass
class CallGraph:
    """A model's forward as calls in execution order, and how it was captured.

    Attributes:
        calls: every call, in execution order.
        source: "torch.export", "torch.fx" or "nn.Sequential".
        times_called: how often each module (by ``id``) is called per forward; for
            "nn.Sequential", at least the number of places it is registered at.
    """

    calls: list[Call]
    source: str
    times_called: Counter


@dataclass
class Site:
    """A call of a matching module with its neighbours.

    Attributes:
        call: the call.
        producer: the call whose only read value is the call's only input, read by nothing
            else; None if there is no such call.
        consumer: the only reader of the call's only output, reading nothing else; or None.
    """

    call: Call
    producer: Call | None
    consumer: Call | None


def find_sites(graph: CallGraph, match: Callable[[nn.Module], bool]) -> list[Site]:
    """Every call of a module for which ``match`` is True, with its producer and consumer.

    The neighbours are any calls (a layer, an activation module, a function): the caller
    decides which it can use (``fold``: Conv/Linear layers). A module called k times has k
    sites; ``graph.times_called`` tells how often.

    Example:
        >>> graph, _ = capture(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
        >>> [(s.producer.name, s.call.name, s.consumer.name)
        ...  for s in find_sites(graph, lambda m: isinstance(m, nn.BatchNorm2d))]
        [('0', '1', '2')]
    """
    sites = []
    for call in graph.calls:
        if call.module is None or not match(call.module):
            continue
        producer = consumer = None
        if len(call.inputs) == 1 and call.inputs[0] is not None:
            source = call.inputs[0]
            if source.outputs == 1 and source.users == [call]:
                producer = source
        if call.outputs == 1 and len(call.users) == 1 and call.users[0].inputs == [call]:
            consumer = call.users[0]
        sites.append(Site(call, producer, consumer))
    return sites


def call_problem(graph: CallGraph, call: Call, takes: str) -> str | None:
    """Why a BN's ``call`` cannot be replaced by another module in place, or None when it can.

    The one check `batchnorm.inference.fold` (the BN becomes ``nn.Identity`` or its
    activation) and `batchnorm.inference.fuse` (the BN becomes its fused layer) share: the
    module is called once per forward, its tensors are read nowhere else, and the call passes
    it nothing but its input. ``takes`` completes the last reason: what the replacement makes
    of a second argument.
    """
    module = call.module
    if graph.times_called[id(module)] > 1 or sum(c.module is module for c in graph.calls) > 1:
        return "called more than once per forward"
    if call.touched:
        return "the forward reads its tensors outside its call"
    if call.extra or len(call.inputs) > 1:
        return f"called with more than its input {takes}"
    return None


def _link(calls: list[Call]) -> None:
    """Fill in ``users`` from ``inputs``."""
    for call in calls:
        for source in call.inputs:
            if source is not None and call not in source.users:
                source.users.append(call)


def _rank(node) -> int | None:
    value = node.meta.get("val") if hasattr(node, "meta") else None
    return value.dim() if isinstance(value, Tensor) else None


def _has_extra(args: tuple, kwargs: dict) -> bool:
    """Whether a call passes more than its input: another argument that is not None."""
    return any(a is not None for a in args[1:]) or any(v is not None for v in kwargs.values())


def _from_export(model: nn.Module, example_inputs: tuple, leaf: Callable) -> CallGraph:
    # The graph shows only the values a call reads; forward pre-hooks (run by the
    # non-strict export's tracing) see the arguments themselves.
    extra: set[int] = set()

    def note(module, args, kwargs):
        if _has_extra(args, kwargs):
            extra.add(id(module))

    hooks = [
        m.register_forward_pre_hook(note, with_kwargs=True) for m in model.modules() if leaf(m)
    ]
    try:
        program = torch.export.export(model, tuple(example_inputs), strict=False)
    finally:
        for h in hooks:
            h.remove()
    modules = dict(model.named_modules(remove_duplicate=False))
    # Placeholders that are parameters, buffers or constants: reads of a module's state.
    owner = {
        spec.arg.name: modules.get(spec.target.rpartition(".")[0])
        for spec in program.graph_signature.input_specs
        if spec.kind != torch.export.graph_signature.InputKind.USER_INPUT
        and spec.target is not None
    }
    groups: dict[str, Call] = {}  # nn_module_stack key (path, "@k" for the k-th call) -> call
    of_node: dict = {}  # fx node -> its Call
    calls: list[Call] = []
    read: dict[int, set] = {}  # id(call) -> the outside values (nodes) it reads
    given: dict[int, set] = {}  # id(call) -> its values (nodes) that others read
    touched: set[int] = set()  # ids of modules whose state is read outside their call
    for node in program.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        call = None
        if node.op == "call_function":
            # The outermost leaf on the stack: a BN with child modules (timm's BatchNormAct2d
            # and its act) is one call, its children's operations included.
            stack = node.meta.get("nn_module_stack") or {}
            outer = None
            for key, (path, _) in stack.items():
                module = modules.get(path)
                if module is not None and leaf(module):
                    call = groups.get(key)
                    if call is None:
                        call = groups[key] = Call(path, module, caller=outer)
                        calls.append(call)
                    break
                outer = path
        if call is None:
            call = Call("output" if node.op == "output" else str(node.target))
            calls.append(call)
        of_node[node] = call
        for source in node.all_input_nodes:
            if source.name in owner:  # a parameter or buffer read
                if owner[source.name] is not call.module and owner[source.name] is not None:
                    touched.add(id(owner[source.name]))
                continue
            if source.op == "get_attr":
                continue
            producer = of_node.get(source)  # None: a model input
            if producer is call or source in read.setdefault(id(call), set()):
                continue
            read[id(call)].add(source)
            if not call.inputs:
                call.rank = _rank(source)
            call.inputs.append(producer)
            if producer is not None:
                given.setdefault(id(producer), set()).add(source)
    for call in calls:
        call.outputs = max(1, len(given.get(id(call), ())))
        call.touched = call.module is not None and id(call.module) in touched
        call.extra = call.module is not None and id(call.module) in extra
    _link(calls)
    times = Counter(id(call.module) for call in groups.values())
    return CallGraph(calls, "torch.export", times)


class LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps the modules ``leaf`` selects (BN layers: ours check shapes in
    Python) as calls."""

    def __init__(self, leaf: Callable) -> None:
        super().__init__()
        self._leaf = leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._leaf(m) or super().is_leaf_module(m, qualname)


def _from_fx(model: nn.Module, leaf: Callable) -> CallGraph:
    graph = LeafTracer(leaf).trace(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    # Modules whose tensors the forward reads directly (self.conv.weight).
    touched = {
        id(modules.get(n.target.rpartition(".")[0])) for n in graph.nodes if n.op == "get_attr"
    }
    of_node: dict = {}
    calls: list[Call] = []
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "call_module":
            module = modules[node.target]
            call = Call(
                node.target,
                module,
                touched=id(module) in touched,
                extra=_has_extra(node.args, node.kwargs),
            )
        else:
            call = Call("output" if node.op == "output" else str(node.target))
        of_node[node] = call
        calls.append(call)
        call.inputs = [of_node.get(s) for s in node.all_input_nodes if s.op != "get_attr"]
    _link(calls)
    times = Counter(id(c.module) for c in calls if c.module is not None)
    return CallGraph(calls, "torch.fx", times)


def _from_sequential(model: nn.Module) -> CallGraph:
    calls: list[Call] = []
    names = {id(m): n for n, m in model.named_modules()}
    for container in model.modules():
        if not isinstance(container, nn.Sequential):
            continue
        if type(container).forward is not nn.Sequential.forward:
            continue  # a subclass with its own forward may not call its children in order
        previous = None
        for child in container._modules.values():
            if child is None:
                continue
            call = Call(names[id(child)], child, inputs=[previous])
            calls.append(call)
            previous = call
    listed = {id(c.module) for c in calls}
    for name, module in model.named_modules():  # modules seen outside any nn.Sequential
        if id(module) not in listed and module is not model:
            calls.append(Call(name, module, inputs=[None]))
    _link(calls)
    # A module registered at two places may be called from both, whatever this graph shows.
    times = Counter(id(c.module) for c in calls)
    places = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for key, n in places.items():
        times[key] = max(times[key], n)
    return CallGraph(calls, "nn.Sequential", times)


def first_line(err: Exception, limit: int = 300) -> str:
    """``err`` as "Type: its first line", at most ``limit`` characters of the line."""
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(err).__name__}: {line[:limit]}"


@dataclass(kw_only=True)
class GraphReport:
    """What every graph pass (`fold`, `fuse_activations`) reports besides what it changed.

    Attributes:
        skipped: (bn name, reason) for every BN-like layer left as it was.
        graph: how the neighbours were found: "torch.export" (with example inputs),
            "torch.fx", or "nn.Sequential" (adjacent children only, when neither could
            capture the model).
        traced: whether a graph of the whole forward was captured (torch.export or
            torch.fx); if not, ``trace_error`` says why.
        trace_error: what failed, one line per tool, with a hint when example inputs would
            help; None if nothing failed.
    """

    skipped: list[tuple[str, str]] = field(default_factory=list)
    graph: str = "torch.fx"
    trace_error: str | None = None

    @classmethod
    def of_capture(cls, graph: CallGraph, failures: list[str], example_inputs, action: str):
        """An empty report of a pass named ``action`` over what `capture` returned."""
        error = None
        if failures:
            error = "could not capture the model: " + "; ".join(failures)
            if example_inputs is None:
                error += f"; pass example_inputs=(x,) so that {action} can capture the model"
                error += " with torch.export"
        return cls(graph=graph.source, trace_error=error)

    @property
    def traced(self) -> bool:
        return self.graph != "nn.Sequential"

    def _lines(self, head: str, changed: list[str]) -> str:
        lines = [f"{head}, left {len(self.skipped)}", *changed]
        lines += [f"  kept {bn}: {why}" for bn, why in self.skipped]
        if self.trace_error is not None:
            lines.append(f"  (neighbours from {self.graph}; {self.trace_error})")
        return "\n".join(lines)


def capture(
    model: nn.Module,
    example_inputs: tuple | Tensor | None = None,
    *,
    leaf: Callable[[nn.Module], bool] = lambda m: False,
) -> tuple[CallGraph, list[str]]:
    """The call graph of ``model``'s forward, and why any better capture failed.

    With ``example_inputs`` it is captured with ``torch.export`` (shapes known); else, or
    if that fails, with ``torch.fx``; else from the ``nn.Sequential`` containers. The model
    is not run (export traces it with fake tensors) and not changed.

    Args:
        model: the model.
        example_inputs: positional inputs for ``torch.export`` (a single tensor is fine).
        leaf: modules kept as one call each, their child modules included, rather than
            traced through (torch.nn's are leaves for fx; for torch.export every module
            without children is one too).

    Returns:
        (graph, failures): ``failures`` holds one "<tool>: <error>" line per failed capture.
    """
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)

    def is_leaf(m: nn.Module) -> bool:
        return leaf(m) or not m._modules

    attempts = []
    if example_inputs is not None:
        attempts.append(("torch.export", lambda: _from_export(model, example_inputs, is_leaf)))
    attempts.append(("torch.fx", lambda: _from_fx(model, leaf)))
    failures = []
    for tool, build in attempts:
        try:
            return build(), failures
        except Exception as err:  # noqa: BLE001 - any capture failure means: try the next
            failures.append(f"{tool}: {first_line(err)}")
    return _from_sequential(model), failures
