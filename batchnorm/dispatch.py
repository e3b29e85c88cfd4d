"""Which engine computes a BN layer's forward, chosen once per call, and the engines.

Every layer here runs one forward (`batchnorm.modules._BatchNormBase._run`): validate once,
read the layer's tensors once (`state`), choose the engine once (`choose`), run it. The
engines:

- ``inference``: eval mode with running statistics, Algorithm 2's fixed map
  (`batchnorm.functional.batch_norm_inference`); a mask is checked, then ignored.
- ``fused``: training with running statistics, torch's kernel (``native_batch_norm``) for
  the plain native case (no mask, Ghost BN, paper backward, deferred commit, or transform of
  its own): it normalizes and applies the running-statistics rule to copies of the buffers,
  which the layer's write (`batchnorm.functional.write_running_stats`) then guards and stores.
  The fast path on the CPU.
- ``reference``: everything else on the torch path: the layer's transform step
  (`_transform`, Algorithm 1 or a subclass's: Batch Renorm, SyncBatchNorm, masks, Ghost BN,
  ``backward="paper"``), then its commit step (`_commit`).
- ``kernels``: the Triton kernels (`batchnorm.kernels`), transform in one or two launches
  (act(BN(x) + residual) for the fused layers), then the same commit step.

So the running statistics are written by one function for every engine, and a deferred
commit (`batchnorm.accumulate`) or a checkpoint's recomputation is handled once, in the
commit step.

The kernels are chosen by the layer's ``backend`` (``"auto"``, ``"torch"`` or ``"triton"``):

- ``"torch"``: never.
- ``"auto"`` (the default): for a CUDA tensor they take (`kernels.supports`:
  float32/float16/bfloat16, an address span under 2^31 elements, Triton importable) on a GPU
  architecture listed in `MEASURED`; never for CPU tensors, unmeasured architectures,
  float64, tensor subclasses (fake tensors under ``torch.export``, DTensor), forward-mode AD,
  and calls the kernels do not implement (`kernel_refusal`). `MEASURED` is empty: the kernels
  have not run on a GPU yet, so ``"auto"`` is the torch path everywhere and the kernels are
  opt-in with ``"triton"``.
- ``"triton"``: on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the
  tests run them). A call they cannot take raises a ``ValueError`` that says why.

Both ``"auto"`` and ``"triton"`` take the torch path under ``torch.compile``, inside
``torch.func`` transforms and under forward-mode AD (``torch.autograd.forward_ad``): the
kernels are an ``autograd.Function`` around Triton launches, not registered custom operators,
so those tools cannot trace them (torch.compile generates its own fused kernels from the torch
path instead), and they have no forward-mode derivative. A backward through the kernels that
is itself differentiated (``create_graph=True``) or batched (``is_grads_batched=True``) is
computed in torch operations (`batchnorm.kernels.function`); with memory saving, a double
backward raises (x was not kept).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from batchnorm import functional as F
from batchnorm import kernels
from batchnorm.activations import ACTIVATIONS

__all__ = [
    "BACKENDS",
    "MEASURED",
    "State",
    "Engine",
    "state",
    "choose",
    "check_backend",
    "kernel_refusal",
    "use_kernels",
]

BACKENDS = ("auto", "torch", "triton")

# The one switch of ``backend="auto"``: CUDA compute capabilities (major, minor) on which the
# kernels have passed benchmarks/gpu_check.py and been timed by benchmarks/bench_gpu.py, each
# mapped to the committed results file that shows it, e.g. {(9, 0): "results/gpu/h200.md"}.
# Empty: no card has run them yet, so "auto" takes the torch path on every GPU.
MEASURED: dict[tuple[int, int], str] = {}


def check_backend(layer, backend: str) -> None:
    """Refuse, at construction, a backend the layer cannot honour (named in the message)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        why = _setting_refusal(layer)
        if why is not None:
            raise ValueError(f"{type(layer).__name__}(backend='triton'): {why}")


def _setting_refusal(layer) -> str | None:
    """Why the kernels cannot run this layer's configuration, or None."""
    if not layer._fusable:
        return (
            f"{type(layer).__name__} replaces BN's transform step (Batch Renormalization, "
            "synchronized statistics), which the kernels do not implement; use backend='torch'"
        )
    if layer.backward != "native":
        return (
            "the kernels compute the native backward (Sec. 3's closed form); "
            "backward='paper' needs backend='torch'"
        )
    if layer.virtual_batch_size is not None:
        return "the kernels do not implement Ghost BN (virtual_batch_size); use backend='torch'"
    activation = getattr(layer, "activation", "identity")  # a fused layer's (batchnorm.fused)
    if ACTIVATIONS[activation].kernel is None:
        kernel = [name for name, act in ACTIVATIONS.items() if act.kernel is not None]
        return (
            f"the kernels implement the activations {', '.join(kernel)}, not {activation!r}; "
            "use backend='torch'"
        )
    return None


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _auto_takes(input: Tensor) -> bool:
    """The device rule of ``backend="auto"``: a CUDA tensor on a GPU whose architecture is in
    `MEASURED` (the interpreter is for tests)."""
    return input.is_cuda and bool(MEASURED) and _capability(input.device) in MEASURED


def _traced() -> bool:
    """Under torch.compile (or export's tracing), where the kernels cannot be traced."""
    return torch.compiler.is_compiling()


def kernel_refusal(layer, input: Tensor, mask: Tensor | None = None, residual=None) -> str | None:
    """Why the kernels cannot take this call, or None when they can.

    The call is refused for a mask, a non-fusable layer (Batch Renorm, SyncBatchNorm),
    ``backward="paper"``, Ghost BN, an activation the kernels do not implement
    (`batchnorm.activations`), and an input or residual `kernels.supports` rejects (CPU
    without the interpreter, float64, rank < 2, 2^31 elements or an address span that large,
    Triton missing) or a tensor subclass.
    """
    why = _setting_refusal(layer)
    if why is not None:
        return why
    if mask is not None:
        return "the kernels take no mask; use backend='torch' for masked batches"
    for name, t in (("input", input), ("residual", residual)):
        if t is not None and type(t) is not Tensor and not isinstance(t, torch.nn.Parameter):
            return f"the {name} is a tensor subclass ({type(t).__name__})"
    for name, t in (("input", input), ("residual", residual)):
        if t is not None and not kernels.supports(t):
            if not kernels.is_available():
                return "Triton is not installed (it ships with PyTorch's CUDA builds)"
            device = (
                "a CUDA device, or the CPU under TRITON_INTERPRET=1"
                if t.device.type == "cpu"
                else "a CUDA device"
            )
            return (
                f"the kernels take float32, float16 or bfloat16 tensors of rank >= 2 on "
                f"{device}, with fewer than 2^31 elements over an address span under 2^31 "
                f"elements (int32 offsets); got a {name} of {t.dtype}, shape "
                f"{tuple(t.shape)}, strides {t.stride()} on {t.device}"
            )
    return None


def use_kernels(layer, input: Tensor, mask: Tensor | None = None, residual=None) -> bool:
    """Whether this forward runs on the kernels, by the rules of the module docstring.

    Raises:
        ValueError: ``backend="triton"`` and the kernels cannot take the call (the reason is
            named).
    """
    backend = layer.backend
    if backend == "torch":
        return False
    if backend == "auto" and not _auto_takes(input):
        return False
    if (
        _traced()
        or kernels.transformed(input)
        or kernels.has_tangent(input, residual, *layer._parameters.values())
    ):
        return False
    why = kernel_refusal(layer, input, mask, residual)
    if why is None:
        return True
    if backend == "triton":
        raise ValueError(f"{type(layer).__name__}(backend='triton') cannot run this call: {why}")
    return False


class State(NamedTuple):
    """A layer's tensors, read once per call (`state`): what every engine computes with."""

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    num_batches_skipped: Tensor | None


def state(layer) -> State:
    """The accessor of a layer's parameters and buffers, straight from their dicts: one
    ``nn.Module.__getattr__`` costs about 1 us, which a (60, 100) layer notices (torch's own
    forward pays it eight times). A tensor set as a plain attribute instead (``del
    layer.weight; layer.weight = w``, as a functional or double-backward test does) is read
    as one."""
    params, buffers = layer._parameters, layer._buffers
    try:
        # torch's _BatchNorm registers all but the last (as None where a layer has no such
        # tensor); num_batches_skipped is ours, absent from a layer pickled before it existed.
        return State(
            params["weight"],
            params["bias"],
            buffers["running_mean"],
            buffers["running_var"],
            buffers["num_batches_tracked"],
            buffers.get("num_batches_skipped"),
        )
    except KeyError:
        return State(*(getattr(layer, name, None) for name in State._fields))


class Engine(NamedTuple):
    """One way to compute a layer's forward: ``run(layer, input, mask, residual, state)``.
    ``activates``: it computes act(BN(input) + residual) itself (the kernels); the torch
    engines return BN(input) and the layer adds the residual and applies the activation."""

    name: str
    run: Callable[..., Tensor]
    activates: bool = False


def _commits(layer, s: State) -> bool:
    """Whether this forward moves the running statistics: training, and tracking them."""
    return layer.training and layer.track_running_stats and s.running_mean is not None


def _run_inference(layer, input, mask, residual, s: State) -> Tensor:
    return F.batch_norm_inference(
        input, s.running_mean, s.running_var, s.weight, s.bias, layer.eps, axis=layer._axis,
        backward=layer.backward,
    )  # fmt: skip


def _run_reference(layer, input, mask, residual, s: State) -> Tensor:
    output, stats = layer._transform(input, mask)
    if stats is not None and _commits(layer, s):
        layer._commit(stats)
    return output


def _fused_applies(layer, input: Tensor, mask, s: State) -> bool:
    """Whether torch's kernel computes this call: training with running statistics, the
    base transform with the native backward, no mask, Ghost BN or deferred commit (which
    needs the batch statistics), more than one value per channel (else the transform
    handles the empty batch or raises), parameters in the buffers' dtype (FSDP2's bf16
    parameters with fp32 buffers have no such kernel), and a float momentum (momentum=None
    keeps 1/k a tensor where reading k back is not free). The cheapest tests first: this
    runs on every training call of the CPU fast path."""
    if mask is not None or s.running_mean is None or not layer.training:
        return False
    if not (layer._fusable and layer.track_running_stats and layer.backward == "native"):
        return False
    if layer.virtual_batch_size is not None or layer._pending is not None:
        return False
    channels = input.shape[layer._axis]
    if channels == 0 or input.numel() < 2 * channels:
        return False
    weight = s.weight
    if weight is not None and weight.dtype != s.running_var.dtype:
        return False
    return layer.momentum is not None or F.host_readable(s.running_var)


def _run_fused(layer, input, mask, residual, s: State) -> Tensor:
    """Transform and the rule in one call of torch's kernel; the layer's write then guards
    what it wrote. On the eager CPU the kernel writes the buffers in place, after a (2C,)
    backup that a failed guard restores; elsewhere it writes copies (whole tensors: vmap's
    rule for the kernel does not write through views), which the guard selects from. A
    checkpointed forward that autograd recomputes (`_holds_commit`) runs the same kernel on
    copies (a non-reentrant checkpoint checks that it saves what the real forward saved) and
    writes nothing."""
    readable = F.host_readable(s.running_var)
    held = layer._holds_commit(eager=readable)
    momentum = F.momentum_value(layer.momentum, s.num_batches_tracked, s.running_mean, readable)
    axis = layer._axis
    x = input if axis == 1 else input.movedim(axis, 1)
    backup = None
    if readable and not held:
        backup = torch.cat((s.running_mean, s.running_var))
        new_mean, new_var = s.running_mean, s.running_var
    else:
        new_mean, new_var = s.running_mean.clone(), s.running_var.clone()
    if readable:
        # On the CPU torch.batch_norm dispatches to this kernel through a composite layer
        # (_batch_norm_impl_index) that only adds time; cuDNN paths never come here.
        output = torch.native_batch_norm(
            x, s.weight, s.bias, new_mean, new_var, True, momentum, layer.eps
        )[0]
    else:
        output = torch.batch_norm(
            x, s.weight, s.bias, new_mean, new_var, True, momentum, layer.eps,
            torch.backends.cudnn.enabled,
        )  # fmt: skip
    if not held:
        F.write_running_stats(
            s.running_mean, s.running_var, new_mean, new_var, s.num_batches_tracked,
            s.num_batches_skipped, readable, backup,
        )  # fmt: skip
    return output if axis == 1 else output.movedim(1, axis)


def _run_kernels(layer, input, mask, residual, s: State) -> Tensor:
    """act(BN(input) + residual) by the kernels, then the commit step. The channel axis
    (``BatchNorm``'s ``axis``) is moved to 1 as a view: the kernels address strides."""
    axis = layer._axis % input.dim()
    if axis != 1:
        input = input.movedim(axis, 1)
        if residual is not None:
            residual = residual.movedim(axis, 1)
    output, stats = kernels.transform(
        input, s.weight, s.bias, residual, s.running_mean, s.running_var, layer.training,
        layer.eps, activation=getattr(layer, "activation", "identity"),
        negative_slope=getattr(layer, "negative_slope", 0.01),
        memory_saving=getattr(layer, "memory_saving", False),
    )  # fmt: skip
    if stats is not None and _commits(layer, s):
        layer._commit(stats)
    return output if axis == 1 else output.movedim(1, axis)


INFERENCE = Engine("inference", _run_inference)
FUSED = Engine("fused", _run_fused)
REFERENCE = Engine("reference", _run_reference)
KERNELS = Engine("kernels", _run_kernels, activates=True)


def choose(layer, input: Tensor, mask: Tensor | None, residual: Tensor | None, s: State) -> Engine:
    """The engine of this call, by the rules of the module docstring (the call is valid:
    the layer has checked it).

    Raises:
        ValueError: ``backend="triton"`` and the kernels cannot take the call.
    """
    backend = layer.backend
    if backend != "torch" and (input.is_cuda or backend == "triton"):
        if use_kernels(layer, input, mask, residual):
            return KERNELS
    if not layer.training and s.running_mean is not None:
        return INFERENCE
    if _fused_applies(layer, input, mask, s):
        return FUSED
    return REFERENCE
