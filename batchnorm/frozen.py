"""Algorithm 2, step 3 (Sec. 3.1) as a layer: `FrozenBatchNorm`.

A frozen BN applies the inference map y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta in
train and eval mode alike. It is rebuilt from and back into a trainable BN through
`batchnorm.swap`; the passes that do so over a whole model, `freeze` and `unfreeze`, live in
`batchnorm.inference.frozen`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.fx import Proxy

from batchnorm import functional as F
from batchnorm import modules as M
from batchnorm.swap import TRAINING_ONLY, FixedBatchNorm, rebuild, restore, tracks_running_stats

__all__ = ["FrozenBatchNorm"]


class FrozenBatchNorm(FixedBatchNorm):
    """BN with fixed statistics in train and eval mode: Algorithm 2's inference map, always.

    y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta along the channel ``axis``, computed by
    `batchnorm.functional.normalize`. Unlike a BN in eval mode, calling ``model.train()`` does
    not bring batch statistics back (Keras users meet that surprise with ``trainable=False``),
    and nothing is updated. gamma and beta are parameters that receive gradients when
    ``trainable_affine`` is True, otherwise buffers invisible to optimizers.

    The state_dict keys are those of ``torch.nn.BatchNorm*d`` (weight, bias, running_mean,
    running_var, num_batches_tracked), so checkpoints load both ways; a checkpoint without
    ``num_batches_tracked`` (torchvision's FrozenBatchNorm2d) loads with it set to 0.

    Args:
        num_features: C, the size of the channel axis.
        eps: added to Var[x] inside the square root.
        affine: whether gamma (and beta) exist (absent ones act as 1 and 0).
        bias: whether beta exists when ``affine`` (False: gamma only, like torch's
            ``bias=False``).
        axis: the channel axis (1, or -1 for channels-last data).
        trainable_affine: make gamma and beta trainable parameters.

    Shape: input (N, C, *) with C at ``axis``; output the same.

    Example:
        >>> bn = FrozenBatchNorm(3)
        >>> x = torch.randn(4, 3, 5)
        >>> torch.equal(bn.train()(x), bn.eval()(x))
        True
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        affine: bool = True,
        bias: bool = True,
        axis: int = 1,
        trainable_affine: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.axis = axis
        self.trainable_affine = trainable_affine and affine
        register = self.register_parameter if self.trainable_affine else self.register_buffer
        wrap = nn.Parameter if self.trainable_affine else (lambda t: t)
        gamma = wrap(torch.ones(num_features, **factory)) if affine else None
        beta = wrap(torch.zeros(num_features, **factory)) if affine and bias else None
        register("weight", gamma)
        register("bias", beta)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    def _settings(self) -> dict:
        """The constructor keywords that rebuild this layer (see `batchnorm.swap`)."""
        return {
            "eps": self.eps,
            "affine": self.affine,
            "bias": not self.affine or self.bias is not None,
            "axis": self.axis,
            "trainable_affine": self.trainable_affine,
        }

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, trainable_affine: bool = False) -> FrozenBatchNorm:
        """A frozen layer sharing a BN layer's (ours or torch's) statistics and gamma/beta.

        With ``trainable_affine`` the very same gamma/beta Parameter objects are reused, so an
        optimizer that holds them keeps training them; otherwise they are held as buffers
        (the same memory). The settings that only matter in training (momentum, Ghost BN,
        Batch Renorm's limits, ...) are remembered for `to_batchnorm`.

        Raises:
            ValueError: ``bn`` has no running statistics (track_running_stats=False).
        """
        if not tracks_running_stats(bn):
            raise ValueError(
                f"cannot freeze {type(bn).__name__} without running statistics "
                "(track_running_stats=False)"
            )
        return rebuild(
            bn, cls, drop=TRAINING_ONLY, remember=True, trainable_affine=trainable_affine
        )

    def to_batchnorm(self) -> nn.Module:
        """The trainable BN this layer was frozen from, with every setting it had.

        A layer made by `from_batchnorm`/`freeze` returns to its original class (torch's or
        ours) with its original settings and, where gamma/beta were buffers, the original
        Parameter objects; one built directly or loaded from a checkpoint becomes
        `batchnorm.BatchNorm` over the same axis with torch's defaults.
        """
        restored = restore(self)
        if restored is not None:
            return restored
        return rebuild(self, M.BatchNorm, drop={"trainable_affine"})

    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """The per-channel (scale, shift) of y = scale * x + shift (Algorithm 2, step 3)."""
        return F.inference_affine(
            self.running_mean, self.running_var, self.weight, self.bias, self.eps
        )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Algorithm 2's map of ``input``; ``mask`` is checked and ignored, as the BN layers
        ignore it in eval mode (so a model that passes one keeps working once frozen)."""
        if isinstance(input, Proxy):
            return M.fx_leaf(self, input, mask)
        F.check_input(input, self.num_features, self.axis, (), type(self).__name__)
        if mask is not None:
            F.check_mask(mask, input, self.axis % input.dim())
        return F.normalize(
            input, self.running_mean, self.running_var, self.weight, self.bias, self.eps, self.axis
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        key = prefix + "num_batches_tracked"
        if key not in state_dict and prefix + "running_mean" in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}, affine={self.affine}"
        if self.affine and self.bias is None:
            text += ", bias=False"
        if self.axis != 1:
            text += f", axis={self.axis}"
        if self.trainable_affine:
            text += ", trainable_affine=True"
        return text
