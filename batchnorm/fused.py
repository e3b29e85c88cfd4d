"""BN fused with its activation: BatchNormAct1d/2d/3d, SyncBatchNormAct, FrozenBatchNormAct.

A BN layer is almost always followed by a ReLU (Sec. 4.2's BN-Inception puts BN before every
nonlinearity), often after a residual add. `BatchNormAct2d` computes act(BN(x) + residual) in
one layer: on the Triton kernels (`batchnorm.kernels`, chosen by `batchnorm.dispatch`) that is
one pass over memory instead of three, and with ``memory_saving=True`` (In-Place ABN, Rota
Bulo et al. 2018) the backward pass rebuilds xhat from the output instead of keeping x. On the
torch path it is the BN layer's forward followed by torch's add and activation.

The layers subclass the BN layers: same parameters, buffers and state_dict keys as
``torch.nn.BatchNorm2d`` (checkpoints load both ways), the same validate -> transform ->
commit forward, Algorithm 2's map in eval mode, and `freeze`, `fold`, `recalibrate` apply.
`batchnorm.inference.fuse.fuse_activations` puts them into an existing model.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.fx import Proxy

from batchnorm import dispatch as _dispatch
from batchnorm import modules as M
from batchnorm.activations import ACTIVATIONS, check_activation
from batchnorm.distributed import SyncBatchNorm
from batchnorm.frozen import FrozenBatchNorm
from batchnorm.functional import check_residual
from batchnorm.swap import rebuild, restore

__all__ = [
    "BatchNormAct",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "FrozenBatchNormAct",
    "SyncBatchNormAct",
    "fused_class",
    "is_fused",
]


def activate(input: Tensor, activation: str, negative_slope: float = 0.01) -> Tensor:
    """The torch path's activation: the registry's torch function (`batchnorm.activations`)."""
    return ACTIVATIONS[activation].function(input, negative_slope)


def activation_module(activation: str, negative_slope: float = 0.01) -> nn.Module:
    """The torch.nn module of an activation (what stays in place when a BN is folded away)."""
    return ACTIVATIONS[activation].make_module(negative_slope)


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
        check_activation(activation, negative_slope, memory_saving)
        super().__init__(num_features, *args, **kwargs)
        self.activation = activation
        self.negative_slope = negative_slope
        self.memory_saving = memory_saving
        _dispatch.check_backend(self, self.backend)  # again, now that the activation is set

    def forward(
        self, input: Tensor, residual: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """act(BN(input) + residual); ``mask`` as for the BN layers (torch path only)."""
        if isinstance(input, Proxy):
            return M.fx_leaf(self, input, residual, mask)
        check_residual(input, residual, getattr(self, "memory_saving", False), type(self).__name__)
        return self._run(input, mask, residual)

    def _finish(self, output: Tensor, residual: Tensor | None) -> Tensor:
        return self._activate(output, residual)

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
    act one of `batchnorm.activations.ACTIVATIONS` (identity, relu, leaky_relu(negative_slope),
    silu, hardswish, relu6, gelu, gelu_tanh). Parameters, buffers, state_dict keys,
    the running-statistics update and the eval-mode map are `batchnorm.BatchNorm2d`'s, so a
    checkpoint of ``nn.BatchNorm2d`` loads into it and back.

    With ``backend="triton"`` the Triton kernels compute the whole layer on CUDA tensors,
    forward and backward, in one pass over memory each (``"auto"`` only on GPUs whose results
    are in `batchnorm.dispatch.MEASURED`: none yet). Elsewhere (CPU, float64, torch.compile, a
    mask) the torch path computes the same values with torch's operations.

    Args:
        num_features, eps, momentum, affine, track_running_stats, bias, backward,
            virtual_batch_size, backend: as for `batchnorm.BatchNorm2d`.
        activation: "relu" (default), or another name of `batchnorm.activations.ACTIVATIONS`
            ("identity", "leaky_relu", "silu", "hardswish", "relu6", "gelu", "gelu_tanh");
            the kernels implement identity, relu and leaky_relu, and ``backend="auto"`` runs
            the others on the torch path (``backend="triton"`` refuses them).
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


class SyncBatchNormAct(_BatchNormActMixin, SyncBatchNorm):
    """act(SyncBatchNorm(x) + residual): what `SyncBatchNorm.convert_sync_batchnorm` makes of a
    fused layer (and of timm's ``BatchNormAct2d``), so that the activation is kept;
    `SyncBatchNorm.revert_sync_batchnorm` brings the original layer back. The torch path
    always (the kernels do not synchronize)."""

    _unsynced = BatchNormAct  # what revert_sync_batchnorm makes of one built directly


# convert_sync_batchnorm's target for a layer with an activation (ours or timm's): read by
# batchnorm.distributed, which cannot import this module (built on it).
SyncBatchNorm._activated = SyncBatchNormAct


def fused_class(cls: type) -> type | None:
    """Our fused layer for our BN class ``cls`` (BatchNorm2d -> BatchNormAct2d, SyncBatchNorm
    -> SyncBatchNormAct, FrozenBatchNorm -> FrozenBatchNormAct), or None."""
    return {**_targets(), SyncBatchNorm: SyncBatchNormAct}.get(cls)


def is_fused(layer: nn.Module) -> bool:
    """Whether ``layer`` is one of the fused layers here (`BatchNormAct2d` and its kin,
    `SyncBatchNormAct`, `FrozenBatchNormAct`): it applies its activation itself."""
    return isinstance(layer, _Activated)


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
        check_activation(activation, negative_slope, False)
        super().__init__(num_features, eps, **kwargs)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(
        self, input: Tensor, residual: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """act(FrozenBatchNorm(input) + residual); ``mask`` checked and ignored, as there."""
        if isinstance(input, Proxy):
            return M.fx_leaf(self, input, residual, mask)
        check_residual(input, residual, getattr(self, "memory_saving", False), type(self).__name__)
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
