"""The Triton BN + activation (+ residual) as one autograd.Function and its functional form.

Conventions are those of `batchnorm.functional` (biased sigma2_B for normalizing, unbiased
running_var, momentum weighing the new value, the non-finite guard), here applied on the
device by the kernels in `forward` and `backward`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from batchnorm.kernels import backward as B
from batchnorm.kernels import forward as F
from batchnorm.kernels.common import ACTIVATIONS

GAMMA_MIN = 1e-3  # memory saving divides by gamma; below this |gamma| it keeps x instead
INVERTIBLE = ("identity", "leaky_relu")


def gamma_invertible(weight: Tensor | None, gamma_min: float = GAMMA_MIN) -> bool:
    """Whether memory saving may rebuild xhat = (u - beta) / gamma: every |gamma| >= gamma_min.

    The rebuilt xhat carries the output's rounding amplified by 1/|gamma|: with u_z the unit
    roundoff of the output dtype (2^-24 float32, 2^-11 float16, 2^-8 bfloat16),
    |xhat' - xhat| <= u_z * (|xhat| + |beta| / |gamma|) up to float32 rounding. Reads gamma
    back to the host (one synchronization on a GPU).
    """
    if weight is None:
        return True
    return bool((weight.detach().abs() >= gamma_min).all())


class BatchNormActFunction(torch.autograd.Function):
    """z = act(BN(x) + residual) by the Triton kernels, with the paper's backward (Sec. 3).

    Saves x and z (z only for relu/leaky_relu, whose backward reads the mask off z, as
    torch's ReLU does), or with memory saving only z: then x can be freed after the forward.
    """

    @staticmethod
    def forward(
        ctx,
        input,
        weight,
        bias,
        residual,
        running_mean,
        running_var,
        num_batches_tracked,
        num_batches_skipped,
        training,
        momentum,
        eps,
        activation,
        negative_slope,
        memory_saving,
    ):  # noqa: D102
        ctx.activation, ctx.negative_slope, ctx.eps = activation, negative_slope, eps
        ctx.has_residual = residual is not None
        use_batch = training or running_mean is None
        ctx.training = use_batch
        if input.shape[0] == 0:
            # Empty batch: nothing to normalize, nothing to learn from; buffers untouched.
            ctx.empty = True
            ctx.save_for_backward(input, weight, bias, residual)
            return torch.empty_like(input)
        ctx.empty = False
        if use_batch:
            output, mean, var = F.forward_train(
                input,
                weight,
                bias,
                residual,
                running_mean if training else None,
                running_var if training else None,
                num_batches_tracked if training else None,
                num_batches_skipped if training else None,
                momentum,
                eps,
                activation,
                negative_slope,
            )
        else:
            output = F.forward_eval(
                input,
                weight,
                bias,
                residual,
                running_mean,
                running_var,
                eps,
                activation,
                negative_slope,
            )
            mean, var = running_mean, running_var
        ctx.memory_saving = memory_saving and gamma_invertible(weight)
        if ctx.memory_saving:
            ctx.save_for_backward(output, mean, var, weight, bias, residual)
        else:
            keep_output = activation != "identity"
            ctx.save_for_backward(
                input, mean, var, weight, bias, residual, output if keep_output else None
            )
        return output

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx, grad_output):  # noqa: D102
        needs = ctx.needs_input_grad[:4]
        if ctx.empty:
            input_grads = [
                torch.zeros_like(t) if t is not None and need else None
                for t, need in zip(ctx.saved_tensors, needs)
            ]
            return (*input_grads, *([None] * 10))
        if ctx.memory_saving:
            output, mean, var, weight, bias, residual = ctx.saved_tensors
            source = output
        else:
            source, mean, var, weight, bias, residual, output = ctx.saved_tensors
        dx, dw, db, dr = B.backward(
            grad_output,
            source,
            output,
            mean,
            var,
            weight,
            bias,
            ctx.eps,
            ctx.activation,
            ctx.negative_slope,
            ctx.training,
            ctx.memory_saving,
            needs,
            residual_like=residual,
        )
        return dx, dw, db, dr, *([None] * 10)


def _check(
    input,
    weight,
    bias,
    residual,
    running_mean,
    running_var,
    num_batches_tracked,
    training,
    momentum,
    activation,
    negative_slope,
    memory_saving,
):
    if input.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *), got {tuple(input.shape)}")
    if input.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"the Triton BN kernels take float32, float16 or bfloat16 input, got {input.dtype}: "
            "use the torch path (backend='torch') for other dtypes"
        )
    c = input.shape[1]
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"expected {name} of shape ({c},), got {tuple(t.shape)}")
    if residual is not None and residual.shape != input.shape:
        raise ValueError(
            f"expected residual of the input's shape {tuple(input.shape)}, "
            f"got {tuple(residual.shape)}"
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if activation == "leaky_relu" and not negative_slope >= 0:
        raise ValueError(
            f"the fused leaky_relu needs negative_slope >= 0 (its backward reads the sign off "
            f"the output, like torch's in-place leaky_relu), got {negative_slope}"
        )
    if memory_saving:
        if activation not in INVERTIBLE or (activation == "leaky_relu" and negative_slope == 0):
            raise ValueError(
                f"memory_saving rebuilds the input from the output and needs an invertible "
                f"activation (identity, or leaky_relu with negative_slope > 0), got "
                f"{activation!r} with negative_slope={negative_slope}"
            )
        if residual is not None:
            raise ValueError(
                "memory_saving does not take a residual: subtracting it from the output would "
                "cancel most digits of gamma * xhat; add the residual after the layer instead"
            )
    if training and running_mean is not None and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if training and input.shape[0] > 0 and input.numel() // c <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {input.numel() // c} "
            f"(input size {tuple(input.shape)}): the batch variance of a single value is "
            "undefined. Use a larger batch, drop the last incomplete batch, or evaluate with "
            "population statistics (eval mode)."
        )


def batch_norm_act(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    activation: str = "identity",
    negative_slope: float = 0.01,
    residual: Tensor | None = None,
    memory_saving: bool = False,
) -> Tensor:
    """act(BN(input) + residual) in Triton kernels, updating the running buffers in place.

    Algorithm 1 in training (batch statistics; two kernel launches, one for small inputs),
    Algorithm 2's affine map otherwise (one elementwise launch). Conventions are those of
    `batchnorm.functional`; unlike its pure functions, this one writes the buffers like a
    layer's commit step would, on the device and without synchronizing: the running
    statistics move (momentum weighs the new value; ``momentum=None`` is the cumulative
    average 1/(k+1), k = ``num_batches_tracked``) unless a statistic is not finite, and
    ``num_batches_tracked`` or ``num_batches_skipped`` is incremented.

    Args:
        input: (N, C, *) float32, float16 or bfloat16 on a CUDA device (or on the CPU under
            ``TRITON_INTERPRET=1``), any of NCHW, channels_last, NCDHW, NDHWC, (N, C, L),
            (N, C) layouts; strides are used as they are.
        weight, bias: gamma and beta (C,), or None.
        running_mean, running_var: (C,) buffers, or None (``track_running_stats=False``).
        num_batches_tracked, num_batches_skipped: 0-d int64 counters, or None.
        training: normalize with batch statistics (always when there are no running ones).
        activation: "identity", "relu" or "leaky_relu" (``negative_slope`` >= 0).
        residual: added after the affine map and before the activation (input's shape).
        memory_saving: keep only the output for the backward pass (In-Place ABN); needs an
            invertible activation and no residual. Where some |gamma| < ``GAMMA_MIN`` the
            call keeps x instead (the gradients are exact either way): see `gamma_invertible`.

    Returns:
        The output, input's dtype and strides; an empty batch gives an empty output and
        leaves every buffer untouched.
    """
    _check(
        input,
        weight,
        bias,
        residual,
        running_mean,
        running_var,
        num_batches_tracked,
        training,
        momentum,
        activation,
        negative_slope,
        memory_saving,
    )
    return BatchNormActFunction.apply(
        input,
        weight,
        bias,
        residual,
        running_mean,
        running_var,
        num_batches_tracked,
        num_batches_skipped,
        training,
        momentum,
        eps,
        activation,
        negative_slope,
        memory_saving,
    )
