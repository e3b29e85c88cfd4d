"""The paper's backward pass of Algorithm 1 (Sec. 3): the chain rule through mu_B and sigma2_B,
as an autograd Function (``backward="paper"``) and as the one gradient helper it uses."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from batchnorm.functional.checks import per_channel, reduce_dims, transformed
from batchnorm.functional.normalize import normalize
from batchnorm.functional.statistics import batch_stats

__all__ = ["BatchNormFunction", "batch_norm_backward"]


class BatchNormFunction(torch.autograd.Function):
    """Algorithm 1 with the paper's backward pass, for channel-at-axis-1 input.

    Forward saves only x, mu_B and 1/sqrt(sigma2_B + eps); backward recomputes xhat from them
    and applies the compact form of the paper's chain rule (Sec. 3), `batch_norm_backward`.
    The gradient flows through mu_B and sigma2_B (the two sums), which Sec. 2 shows is
    necessary. Returns (y, mu_B, sigma2_B); the statistics are not differentiable outputs.

    Twice differentiable: when a graph of the backward is requested (``create_graph=True``),
    the backward recomputes mu_B and sigma2_B from x with differentiable operations, so that
    the second derivative includes their dependence on x (saved statistics would be constants
    to autograd and give wrong second derivatives).
    """

    generate_vmap_rule = True  # forward and backward use only torch ops, so vmap may batch them

    @staticmethod
    def forward(input, weight, bias, eps):  # noqa: D102
        stats = batch_stats(input, 1)
        y = normalize(input, stats.mean, stats.var, weight, bias, eps, 1)
        return y, stats.mean, stats.var

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D102
        input, weight, bias, eps = inputs
        _, mean, var = output
        ctx.save_for_backward(input, weight, mean, torch.rsqrt(var + eps))
        ctx.has_bias, ctx.eps = bias is not None, eps
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # no zero tensors for the statistics' (unused) grads

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):  # noqa: D102
        if grad_y is None:
            return None, None, None, None
        input, weight, mean, invstd = ctx.saved_tensors
        dims = reduce_dims(input, 1)
        dtype = invstd.dtype
        if torch.is_grad_enabled():  # create_graph: mu_B and 1/s as differentiable functions of x
            mean, var, _ = batch_stats(input, 1)
            invstd = torch.rsqrt(var + ctx.eps)
        invstd = per_channel(invstd, input, 1)
        xhat = (input.to(dtype) - per_channel(mean, input, 1)) * invstd
        gamma = None if weight is None else per_channel(weight.to(dtype), input, 1)
        grad_input, grad_gamma, grad_beta = batch_norm_backward(
            grad_y.to(dtype), xhat, invstd, gamma, dims
        )
        grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = grad_gamma.reshape(-1).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_beta.reshape(-1).to(grad_y.dtype if weight is None else weight.dtype)
        return grad_input.to(input.dtype), grad_weight, grad_bias, None


def batch_norm_backward(
    grad_output: Tensor,
    xhat: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    dims,
    *,
    count: int | Tensor | None = None,
    mask: Tensor | None = None,
    all_reduce=None,
    input_grad: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """The paper's backward pass of Algorithm 1 (Sec. 3), compact form, as a pure function.

    With dl/dxhat = dl/dy * gamma, s = sqrt(sigma2_B + eps) and m values per channel:

        dl/dx     = gamma/(m s) * (m dl/dy - sum dl/dy - xhat * sum(dl/dy * xhat))
        dl/dgamma = sum dl/dy * xhat          dl/dbeta = sum dl/dy

    The one gradient helper of the library: `BatchNormFunction`, SyncBatchNorm's backward
    and the Figure 1 network's hand-written step all call it. Built from differentiable
    operations when grad mode is on (a graph of the backward is being recorded), in place
    otherwise.

    Args:
        grad_output: dl/dy.
        xhat: the normalized input, same shape.
        invstd: 1/s = 1/sqrt(sigma2_B + eps), shaped to broadcast against xhat.
        weight: gamma shaped like invstd, or None for gamma = 1.
        dims: the reduced (non-channel) dimensions.
        count: m (default: the number of values per channel, or the mask's count); a 0-d
            tensor is fine (SyncBatchNorm's global count).
        mask: bool, broadcastable to xhat: positions marked False (padding) add nothing to
            the two sums and get dl/dx = dl/dy * gamma / s (they did not enter mu_B, sigma2_B).
        all_reduce: a function that sums a tensor over processes in place (SyncBatchNorm):
            dl/dx then uses the sums over every process; dl/dgamma and dl/dbeta stay local.
        input_grad: whether to compute dl/dx (None is returned otherwise, and nothing is
            reduced).

    Returns:
        (dl/dx, dl/dgamma, dl/dbeta); the last two keep the reduced dims with size 1.
    """
    dy, xh = grad_output, xhat
    if mask is not None:  # select, never multiply: xhat may be NaN at padding
        dy = torch.where(mask, grad_output, 0.0)
        xh = torch.where(mask, xhat, 0.0)
    product = dy * xh
    grad_beta = dy.sum(dims, keepdim=True)
    grad_gamma = product.sum(dims, keepdim=True)
    if not input_grad:
        return None, grad_gamma, grad_beta
    sum_dy, sum_dy_xhat = grad_beta, grad_gamma
    if all_reduce is not None:
        sums = torch.cat([grad_beta, grad_gamma])
        all_reduce(sums)
        sum_dy, sum_dy_xhat = sums.chunk(2)
    if count is None:
        count = mask.expand_as(xhat).sum(dims, keepdim=True) if mask is not None else None
        if count is None:
            count = math.prod(xhat.shape[d] for d in dims)
    k = invstd if weight is None else invstd * weight
    if torch.is_grad_enabled() or transformed(dy):
        # Out of place, so that autograd can differentiate this backward (double backward)
        # and vmap can batch it (is_grads_batched, jacobian(vectorize=True)).
        grad_input = (dy - sum_dy / count - xh * (sum_dy_xhat / count)) * k
    else:
        # dl/dx = (dy - sum(dy)/m - xhat * sum(dy * xhat)/m) * gamma / s, in the buffer of
        # dy * xhat: one full-size temporary besides it.
        if isinstance(count, Tensor):
            grad_input = torch.sub(dy, sum_dy / count, out=product)
            grad_input.addcmul_(xh, sum_dy_xhat / count, value=-1)
        else:
            grad_input = torch.sub(dy, sum_dy, alpha=1 / count, out=product)
            grad_input.addcmul_(xh, sum_dy_xhat, value=-1 / count)
        grad_input.mul_(k)
    if mask is not None:
        grad_input = torch.where(mask, grad_input, grad_output * k)
    return grad_input, grad_gamma, grad_beta
