"""Algorithm 1 (Sec. 3): the Batch Normalizing Transform, its statistics, its backward pass,
and the rule that moves the running statistics (Algorithm 2, step 2).

Everything here is a pure function: it computes and returns, new running statistics included,
and never writes into its arguments, so `torch.func` transforms and `torch.compile` apply;
the one exception is `running.write_running_stats` (with `commit_running_stats` around it), the
single place where the layers' and the kernels' running statistics are written back.

Conventions (stated once, here; the modules and the rest of the library refer to this).
Paper symbols map to torch names as gamma = ``weight``, beta = ``bias``, mu_B = batch mean,
sigma2_B = batch variance, E[x] = ``running_mean``, Var[x] = ``running_var``.

- Statistics are taken per channel over every other axis: per activation for (N, C), per
  feature map over N and all spatial positions for (N, C, *spatial) (Sec. 3.2, m' = m*p*q).
  ``axis`` names the channel axis (1 by default, -1 for channels-last data). m is the number
  of values per channel (with a mask: the number of positions it selects).
- Normalization uses the biased batch variance sigma2_B = 1/m sum (x - mu_B)^2 and
  xhat = (x - mu_B) / sqrt(sigma2_B + eps): eps goes inside the square root. eps must be
  positive when batch statistics are used and non-negative otherwise (as torch).
- ``running_var`` stores the unbiased variance m/(m-1) * sigma2_B (Algorithm 2, step 2).
- ``momentum`` weighs the NEW value (torch's convention):
  running = (1 - momentum) * running + momentum * batch. Keras/Flax's momentum 0.99 is
  torch's 0.01. A cumulative average (Algorithm 2's E_B over equal batches) is momentum
  1/k at the k-th update; the layers' ``momentum=None`` computes 1/k as a tensor.
- Half-precision input (float16/bfloat16) is normalized with float32 statistics and float32
  gamma/beta; the output keeps the input dtype.
- A batch whose statistics are not finite (NaN/Inf input, an overflowing variance) still
  produces its non-finite output, but the running statistics stay unchanged. ``updated``,
  whether they moved, is always a 0-d bool tensor on the statistics' device: one type in
  eager mode, under torch.compile and torch.func, on any device, and never a host sync.
- An empty batch (N = 0) in training gives an empty output and moves nothing, counters
  included (torch counts it in ``num_batches_tracked``); so does a batch whose mask selects no
  position, whose output is then the map without statistics, gamma * x + beta.
- Training needs more than one value per channel (the variance of one value is undefined).

The layers' forward reads top to bottom as validate -> transform -> commit: a transform
(`batch_norm_transform`, `batch_renorm_transform`, SyncBatchNorm's) returns the output and the
batch statistics `BatchStats`; `running_stats_step` is the one rule that turns them into new
running statistics, and `commit_running_stats` the one function that writes them in place.

One file per part of the paper:

- `checks`: the conventions above as functions (channel axis, reduced dims, m) and the
  argument checks every caller shares;
- `statistics`: Algorithm 1, steps 1-2 (mu_B, sigma2_B; masks, Ghost BN groups, exact merge);
- `normalize`: the normalizing map, Algorithm 1's output and Algorithm 2, step 3;
- `backward`: the paper's backward pass (Sec. 3);
- `transform`: Algorithm 1 as a transform step, and `batch_norm`, a whole layer as a function;
- `running`: Algorithm 2, step 2 (the moving averages, their guard, their one write);
- `renorm`: Batch Renormalization (Ioffe 2017).
"""

from batchnorm.functional.backward import BatchNormFunction, batch_norm_backward
from batchnorm.functional.checks import (
    channel_axis,
    check_arguments,
    check_backward,
    check_eps,
    check_input,
    check_mask,
    check_renorm_limits,
    check_residual,
    check_training_batch,
    check_virtual_batch_size,
    has_tangent,
    per_channel,
    reduce_dims,
    stats_dtype,
    transformed,
    values_per_channel,
)
from batchnorm.functional.normalize import batch_norm_inference, inference_affine, normalize
from batchnorm.functional.renorm import batch_renorm, batch_renorm_transform, renorm_limits
from batchnorm.functional.running import (
    all_finite,
    commit_running_stats,
    finite_step,
    host_readable,
    momentum_value,
    running_stats_step,
    update_running_stats,
    write_running_stats,
)
from batchnorm.functional.statistics import (
    BatchStats,
    batch_stats,
    ghost_batch_stats,
    ghost_groups,
    merge_stats,
)
from batchnorm.functional.transform import (
    BatchNormOutput,
    batch_norm,
    batch_norm_transform,
    empty_output,
)

__all__ = [
    "BatchStats",
    "BatchNormOutput",
    "batch_stats",
    "ghost_batch_stats",
    "merge_stats",
    "normalize",
    "inference_affine",
    "batch_norm_inference",
    "running_stats_step",
    "all_finite",
    "update_running_stats",
    "commit_running_stats",
    "batch_norm_transform",
    "batch_norm",
    "BatchNormFunction",
    "batch_norm_backward",
    "batch_renorm_transform",
    "batch_renorm",
    "renorm_limits",
    # The shared conventions and checks (`checks`), the write of the running statistics
    # (`running`) and the helpers that the layers, the collectives and the kernels build on.
    "channel_axis",
    "check_arguments",
    "check_backward",
    "check_eps",
    "check_input",
    "check_mask",
    "check_renorm_limits",
    "check_residual",
    "check_training_batch",
    "check_virtual_batch_size",
    "has_tangent",
    "per_channel",
    "reduce_dims",
    "stats_dtype",
    "transformed",
    "values_per_channel",
    "finite_step",
    "host_readable",
    "momentum_value",
    "write_running_stats",
    "ghost_groups",
    "empty_output",
]
