"""Drop-in BN layers (Sec. 3, 3.2): BatchNorm1d/2d/3d, and BatchNorm for any channel axis.

The layers own gamma/beta and the running buffers and write back what the pure core in
`batchnorm.functional` returns; every statistical convention is stated once, in that
module's docstring. They subclass torch's `_BatchNorm`, so names, defaults, state_dict keys,
checkpoint migration and ``isinstance`` checks of torch's tooling carry over unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from batchnorm import functional as F

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
]


class _BatchNormBase(nn.modules.batchnorm._BatchNorm):
    """Shared forward of every BN layer; subclasses only say which input ranks they accept.

    Beyond torch's module: a batch with non-finite statistics never reaches the running
    statistics (the update is skipped and counted in ``num_batches_skipped``, a buffer that is
    not saved in the state_dict so checkpoints stay interchangeable with torch's); errors name
    the layer's expected and received shapes; ``backward="paper"`` selects the paper's
    backward pass; `inference_affine` exposes Algorithm 2's per-channel scale and shift.
    """

    _ranks: tuple[int, ...] = ()  # accepted input ranks; empty means any rank >= 2
    _axis: int = 1

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        backward: str = "native",
        virtual_batch_size: int | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if affine and not bias:
            # torch >= 2.13's ``bias=False``: gamma without beta (older torch lacks the flag).
            self.register_parameter("bias", None)
        if backward not in ("native", "paper"):
            raise ValueError(f"backward must be 'native' or 'paper', got {backward!r}")
        self.backward = backward
        self.virtual_batch_size = virtual_batch_size  # Ghost BN; see functional.batch_norm
        self.register_buffer(
            "num_batches_skipped",
            torch.zeros((), dtype=torch.long, device=device),
            persistent=False,
        )

    def _check_input_dim(self, input: Tensor) -> None:
        if self._ranks and input.dim() not in self._ranks:
            expected = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(
                f"{type(self).__name__} expected {expected} input, got {input.dim()}D input "
                f"of shape {tuple(input.shape)}"
            )
        if input.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} expected input of at least 2 dimensions (N, C, ...), "
                f"got shape {tuple(input.shape)}"
            )
        if not (input.is_floating_point()):
            raise TypeError(
                f"{type(self).__name__} expected a floating-point input, got {input.dtype}"
            )
        channels = input.shape[self._axis]
        if channels != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expected {self.num_features} "
                f"channels on axis {self._axis}, got {channels} (input shape {tuple(input.shape)})"
            )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input``; ``mask`` (bool, the input's shape without the channel axis)
        keeps padded positions out of the batch statistics in training."""
        self._check_input_dim(input)
        training = self.training
        tracking = training and self.track_running_stats
        running_mean, running_var = self.running_mean, self.running_var
        use_running = not training or self.track_running_stats
        result = self._transform(
            input,
            running_mean if use_running else None,
            running_var if use_running else None,
            training or running_mean is None,
            self._momentum() if tracking else 0.0,
            mask,
        )
        if tracking and result.updated is not None:
            self._write_back(result)
        return result.output

    def _momentum(self) -> float:
        if self.momentum is None:
            # Cumulative average: the k-th batch gets weight 1/k (Algorithm 2's E_B).
            return 1.0 / (float(self.num_batches_tracked) + 1.0)
        return self.momentum

    def _write_back(self, result: F.BatchNormOutput) -> None:
        # The new statistics carry no autograd history (the kernel and the paper path both
        # hand them back detached), so plain copies suffice.
        updated = result.updated
        if updated is False:
            self.num_batches_skipped.add_(1)
            return
        torch._foreach_copy_(
            [self.running_mean, self.running_var], [result.running_mean, result.running_var]
        )
        if updated is True:
            self.num_batches_tracked.add_(1)
        else:  # a tensor: select without synchronizing
            self.num_batches_tracked.add_(updated)
            self.num_batches_skipped.add_(~updated)

    def _transform(self, input, running_mean, running_var, training, momentum, mask):
        # The functional core this layer applies; the write-back above is shared.
        return F.batch_norm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            training,
            momentum,
            self.eps,
            axis=self._axis,
            backward=self.backward,
            mask=mask,
            virtual_batch_size=self.virtual_batch_size,
        )

    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """Algorithm 2, step 3: the per-channel (scale, shift) this layer applies in eval mode.

        y = scale * x + shift along the channel axis, with scale = gamma / sqrt(Var[x] + eps)
        and shift = beta - scale * E[x]. Used by folding and export.
        """
        if self.running_mean is None or self.running_var is None:
            raise RuntimeError(
                f"{type(self).__name__} was built with track_running_stats=False: it always "
                "normalizes with batch statistics and has no fixed affine map"
            )
        return F.inference_affine(
            self.running_mean, self.running_var, self.weight, self.bias, self.eps
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # Checkpoints written before num_batches_tracked existed, or by frameworks that never
        # had it, load as if it were 0 (torch only does this for version < 2 metadata).
        key = prefix + "num_batches_tracked"
        if (
            self.track_running_stats
            and key not in state_dict
            and prefix + "running_mean" in state_dict
        ):
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def _settings(self) -> dict:
        """The constructor keywords that rebuild this layer (all but num_features, device and
        dtype); `batchnorm.inference.swap` rebuilds layers as other classes from them."""
        return {
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "bias": not self.affine or self.bias is not None,
            "backward": self.backward,
            "virtual_batch_size": self.virtual_batch_size,
        }

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self._axis != 1:
            text += f", axis={self._axis}"
        if self.backward != "native":
            text += f", backward={self.backward!r}"
        if self.virtual_batch_size is not None:
            text += f", virtual_batch_size={self.virtual_batch_size}"
        return text


class BatchNorm1d(_BatchNormBase):
    """BN over (N, C) or (N, C, L): per activation, or per channel over N and L (Sec. 3, 3.2).

    Drop-in for ``torch.nn.BatchNorm1d`` (same arguments, defaults, parameters and buffers).

    Shape: input (N, C) or (N, C, L); output the same.

    Example:
        >>> bn = BatchNorm1d(100)
        >>> bn(torch.randn(60, 100)).shape
        torch.Size([60, 100])
    """

    _ranks = (2, 3)


class BatchNorm2d(_BatchNormBase):
    """BN per feature map of (N, C, H, W), over N, H and W: m' = m*p*q values each (Sec. 3.2).

    Drop-in for ``torch.nn.BatchNorm2d``; channels_last input is handled without copies.

    Example:
        >>> bn = BatchNorm2d(64)
        >>> bn(torch.randn(8, 64, 14, 14)).shape
        torch.Size([8, 64, 14, 14])
    """

    _ranks = (4,)


class BatchNorm3d(_BatchNormBase):
    """BN per feature map of (N, C, D, H, W), over N, D, H and W (Sec. 3.2).

    Drop-in for ``torch.nn.BatchNorm3d``.
    """

    _ranks = (5,)


class BatchNorm(_BatchNormBase):
    """BN with the channel on any axis, for any rank >= 2, e.g. channels-last (N, L, C).

    Args:
        num_features: C, the size of the channel axis.
        axis: the channel axis (default 1; -1 for channels-last data).
        Other arguments as for `BatchNorm1d`.

    Example:
        >>> bn = BatchNorm(16, axis=-1)
        >>> bn(torch.randn(4, 10, 16)).shape
        torch.Size([4, 10, 16])
    """

    def __init__(self, num_features: int, *args, axis: int = 1, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self._axis = axis

    def _settings(self) -> dict:
        return {**super()._settings(), "axis": self._axis}


class _BatchRenormMixin:
    """Batch Renormalization (Ioffe 2017) on top of a BN layer: see `F.batch_renorm`.

    ``r_max`` and ``d_max`` are plain attributes, so a training loop can follow the paper's
    schedule: ``layer.r_max, layer.d_max = F.renorm_limits(step)``. Buffers, state_dict and
    the eval-mode map are BN's (`inference_affine`, folding and export apply unchanged).
    Defaults follow the paper: momentum 0.01, r_max 3, d_max 5.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        *args,
        r_max: float = 3.0,
        d_max: float = 5.0,
        **kwargs,
    ) -> None:
        super().__init__(num_features, eps, momentum, *args, **kwargs)
        if not self.track_running_stats:
            raise ValueError(
                "Batch Renormalization corrects towards running statistics: "
                "track_running_stats must be True"
            )
        if self.momentum is None:
            raise ValueError("Batch Renormalization needs a momentum (the paper uses 0.01)")
        self.r_max, self.d_max = r_max, d_max

    def _transform(self, input, running_mean, running_var, training, momentum, mask):
        if mask is not None or self.virtual_batch_size is not None:
            raise ValueError("Batch Renormalization takes neither mask nor virtual_batch_size")
        return F.batch_renorm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            training,
            momentum,
            self.eps,
            r_max=self.r_max,
            d_max=self.d_max,
            axis=self._axis,
        )

    def _settings(self) -> dict:
        return {**super()._settings(), "r_max": self.r_max, "d_max": self.d_max}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"


class BatchRenorm1d(_BatchRenormMixin, BatchNorm1d):
    """Batch Renormalization over (N, C) or (N, C, L); see `_BatchRenormMixin`."""


class BatchRenorm2d(_BatchRenormMixin, BatchNorm2d):
    """Batch Renormalization per feature map of (N, C, H, W); see `_BatchRenormMixin`."""


class BatchRenorm3d(_BatchRenormMixin, BatchNorm3d):
    """Batch Renormalization per feature map of (N, C, D, H, W); see `_BatchRenormMixin`."""
