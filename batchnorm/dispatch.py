"""Which implementation a BN layer's forward runs: the torch path or the Triton kernels.

A layer's ``backend`` chooses (``"auto"``, ``"torch"`` or ``"triton"``):

- ``"torch"``: always the torch path (validate -> transform -> commit in
  `batchnorm.modules`).
- ``"auto"`` (the default): the kernels (`batchnorm.kernels`) for a CUDA tensor they take
  (`kernels.supports`: float32/float16/bfloat16, an address span under 2^31 elements, Triton
  importable) on a GPU architecture listed in `MEASURED`, the torch path for everything
  else: CPU tensors, unmeasured architectures, float64, tensor subclasses (fake tensors
  under ``torch.export``, DTensor), forward-mode AD, and calls the kernels do not implement
  (`kernel_refusal`). `MEASURED` is empty: the kernels have not run on a GPU yet, so
  ``"auto"`` is the torch path everywhere and the kernels are opt-in with ``"triton"``.
- ``"triton"``: the kernels, on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``
  (how the tests run them). A call they cannot take raises a ``ValueError`` that says why.

Both ``"auto"`` and ``"triton"`` take the torch path under ``torch.compile``, inside
``torch.func`` transforms and under forward-mode AD (``torch.autograd.forward_ad``): the
kernels are an ``autograd.Function`` around Triton launches, not registered custom operators,
so those tools cannot trace them (torch.compile generates its own fused kernels from the torch
path instead), and they have no forward-mode derivative. A backward through the kernels that
is itself differentiated (``create_graph=True``) or batched (``is_grads_batched=True``) is
computed in torch operations (`batchnorm.kernels.function`); with memory saving, a double
backward raises (x was not kept).

The kernel call is transform and commit in one (like the layer's ``_forward_fused``): it
leaves the buffers and counters as the torch path's commit step would (Algorithm 1 and the
guarded running-statistics update, on the device, without a host synchronization).
While a layer defers its commit (`batchnorm.accumulate`) its forwards take the torch path,
which hands the batch statistics over; a checkpointed forward that autograd recomputes runs
the kernels without the update.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchnorm import kernels
from batchnorm.activations import ACTIVATIONS

__all__ = [
    "BACKENDS",
    "MEASURED",
    "check_backend",
    "kernel_refusal",
    "use_kernels",
    "forward_kernels",
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
    if layer._pending is not None:
        # A deferred commit (batchnorm.accumulate) needs the batch statistics, which the
        # kernels keep to themselves: the torch path hands them over.
        return False
    why = kernel_refusal(layer, input, mask, residual)
    if why is None:
        return True
    if backend == "triton":
        raise ValueError(f"{type(layer).__name__}(backend='triton') cannot run this call: {why}")
    return False


def forward_kernels(
    layer,
    input: Tensor,
    residual: Tensor | None = None,
    activation: str = "identity",
    negative_slope: float = 0.01,
    memory_saving: bool = False,
) -> Tensor:
    """act(BN(input) + residual) for ``layer`` by the kernels: transform and commit in one.

    In training with running statistics the buffers move and the counters count as the
    commit step would; in eval mode with running statistics it is Algorithm 2's map; without
    running statistics, batch statistics and no update. The channel axis (``BatchNorm``'s
    ``axis``) is moved to 1 as a view: the kernels address strides, nothing is copied.
    """
    buffers, params = layer._buffers, layer._parameters
    running_mean = buffers.get("running_mean")
    training = layer.training
    # A recomputed checkpointed forward (`_holds_commit`) normalizes and commits nothing.
    commit = training and layer.track_running_stats and running_mean is not None
    commit = commit and not layer._holds_commit()
    use_running = commit or (not training and running_mean is not None)
    axis = layer._axis % input.dim()
    if axis != 1:
        input = input.movedim(axis, 1)
        if residual is not None:
            residual = residual.movedim(axis, 1)
    output = kernels.batch_norm_act(
        input,
        params.get("weight"),
        params.get("bias"),
        running_mean if use_running else None,
        buffers["running_var"] if use_running else None,
        buffers.get("num_batches_tracked") if commit else None,
        buffers.get("num_batches_skipped") if commit else None,
        training=not use_running or training,
        momentum=layer.momentum,
        eps=layer.eps,
        activation=activation,
        negative_slope=negative_slope,
        residual=residual,
        memory_saving=memory_saving,
    )
    return output if axis == 1 else output.movedim(1, axis)
