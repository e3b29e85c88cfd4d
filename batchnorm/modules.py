"""Drop-in BN layers (Sec. 3, 3.2): BatchNorm1d/2d/3d, BatchNorm for any channel axis, and
Batch Renormalization; one forward for all of them (validate -> transform -> commit).

The layers own gamma/beta and the running buffers; every statistical convention is stated
once, in `batchnorm.functional`'s docstring. They subclass torch's `_BatchNorm`, and
BatchNorm1d/2d/3d torch's class of the same name, so names, defaults, state_dict keys,
checkpoint migration and ``isinstance`` checks of torch's tooling and of model code (weight
init, weight decay, precise BN) carry over unchanged; torch.fx traces each as one call
(`_fx_leaf`) and torch's ``fuse_modules`` folds them (`_register_torch_fusers`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.fx import Proxy

from batchnorm import dispatch as _dispatch
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


# Counters on the CPU add this instead of the int 1, which the dispatcher would first wrap
# into a tensor (0.8 us of a (60, 100) layer's ~40 us forward).
_ONE = torch.ones((), dtype=torch.long)


def _host_readable(t: Tensor) -> bool:
    """Whether reading a value of ``t`` back to Python is free: eager mode on the CPU.

    On accelerators it would synchronize; under torch.compile it would break the graph;
    under torch.func transforms it is not allowed. There the commit selects with
    `torch.where` instead of branching."""
    return (
        t.is_cpu
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def _recomputing(eager: bool = False) -> bool:
    """Whether this forward runs inside autograd's backward pass: a checkpointed segment
    being recomputed (``torch.utils.checkpoint``, reentrant or not, and the wrappers built
    on it), whose real forward already committed. Under torch.compile the compiled graph
    does its own recomputation, without running this forward again (and dynamo cannot trace
    the query). ``eager``: the caller knows it is not compiling (`_host_readable`), which
    saves that check on the CPU fast path."""
    return (eager or not torch.compiler.is_compiling()) and (
        torch._C._current_graph_task_id() != -1
    )


def _fx_leaf(layer: nn.Module, input: Proxy, *args) -> Proxy:
    """``layer(input, *args)`` as one ``call_module`` node of the torch.fx trace ``input`` is in.

    torch.fx's tracer keeps torch.nn's modules as calls (leaves) and traces through every other
    module's code; ours branch in Python on shapes and values (the checks, the empty batch,
    the guard), which a symbolic trace cannot follow. So every BN-like layer here (BN, Batch
    Renorm, SyncBatchNorm, BatchNormAct, FrozenBatchNorm) opens its forward with
    ``if isinstance(input, Proxy): return _fx_leaf(self, input, ...)``: it records its own
    call, as the tracer records a leaf, and a ``torch.fx.GraphModule`` then runs the layer's
    forward (checks, mask, residual, commit) on real tensors, in training and eval mode.
    ``args`` are the forward's other arguments; trailing Nones are left out (``bn(x)``).

    Raises:
        torch.fx.proxy.TraceError: ``layer`` is the module being traced (``symbolic_trace(bn)``),
            which cannot be a call of itself (torch.nn's BN layers fail there too).
    """
    tracer = input.tracer
    path = tracer.path_of_module(layer)
    if not path:
        raise torch.fx.proxy.TraceError(
            f"torch.fx traces the code of the root module, and {type(layer).__name__}'s forward "
            "branches on its input (as torch.nn's BN layers do): trace a model that contains "
            "the layer instead, e.g. symbolic_trace(nn.Sequential(layer)), where it is one call"
        )
    while args and args[-1] is None:
        args = args[:-1]
    return tracer.create_proxy("call_module", path, (input, *args), {})


class _BatchNormBase(nn.modules.batchnorm._BatchNorm):
    """The one forward of every BN layer here: validate -> transform -> commit.

    - validate (`_check_input_dim`): rank, dtype, channel count, eps and mask, with errors
      that name the layer, what it expected and what came;
    - transform (`_transform`, the one step a subclass replaces): the output and the batch
      statistics (`batchnorm.functional.BatchStats`), or None when nothing is to be
      committed (an empty batch);
    - commit (`_commit`): the guarded running-statistics update (momentum, momentum=None's
      cumulative 1/k, Algorithm 2's m/(m-1), the non-finite guard) written in place into
      the buffers, with the counters ``num_batches_tracked`` and ``num_batches_skipped``.
      It is the layer's only write to its state.

    In eval mode with running statistics, forward is Algorithm 2's fixed map, for every
    layer (a mask is checked, then ignored). A fused kernel may do transform and commit in
    one call and must leave the same state: for the native backward without mask or Ghost
    BN that is torch's own kernel (`_forward_fused`), the fast path on the CPU.

    Beyond torch's module: a batch with non-finite statistics never reaches the running
    statistics (the update is skipped and counted in ``num_batches_skipped``, a buffer that is
    not saved in the state_dict so checkpoints stay interchangeable with torch's); an empty
    batch (N = 0), or one whose mask selects no position, moves nothing, counters included
    (torch counts an empty batch in ``num_batches_tracked``); ``backward="paper"`` selects the
    paper's backward pass; `inference_affine` exposes Algorithm 2's per-channel scale and
    shift.
    """

    _ranks: tuple[int, ...] = ()  # accepted input ranks; empty means any rank >= 2
    _axis: int = 1
    _fusable: bool = True  # the transform is the base one, so torch's kernel may replace it
    backend: str = "auto"  # set per layer; the class default serves layers pickled before it
    # Deferred commit (batchnorm.training.accumulate): while set, the commit step hands the
    # batch statistics to this slot (``.add(stats)``) instead of the buffers.
    _pending = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._fusable = cls._transform is _BatchNormBase._transform

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
        backend: str = "auto",
    ) -> None:
        if not eps >= 0:  # never valid; eps = 0 is torch's "eval only" (checked in forward)
            raise ValueError(f"eps must be positive, got {eps}")
        if backward not in ("native", "paper"):
            raise ValueError(f"backward must be 'native' or 'paper', got {backward!r}")
        if virtual_batch_size is not None:
            F.check_virtual_batch_size(virtual_batch_size)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if affine and not bias:
            # torch >= 2.13's ``bias=False``: gamma without beta (older torch lacks the flag).
            self.register_parameter("bias", None)
        self.backward = backward
        self.virtual_batch_size = virtual_batch_size  # Ghost BN; see functional.batch_norm
        _dispatch.check_backend(self, backend)
        self.backend = backend  # "auto" | "torch" | "triton": see batchnorm.dispatch
        self.register_buffer(
            "num_batches_skipped",
            torch.zeros((), dtype=torch.long, device=device),
            persistent=False,
        )

    def __getstate__(self) -> dict:
        # A copy or a pickle is not part of the accumulate that defers this layer's commit:
        # it would defer forever. It commits each forward, as a new layer does.
        state = super().__getstate__()
        state.pop("_pending", None)
        return state

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        # None while torch's constructor runs (it resets before this buffer exists).
        skipped = self._buffers.get("num_batches_skipped")
        if skipped is not None:
            skipped.zero_()

    # ----------------------------------------------------------------------------------------
    # validate -> transform -> commit

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input``; ``mask`` (bool, the input's shape without the channel axis)
        keeps padded positions out of the batch statistics in training."""
        if isinstance(input, Proxy):
            return _fx_leaf(self, input, mask)
        self._check_input_dim(input, mask)
        backend = self.backend  # the Triton kernels: batchnorm.dispatch (auto: CUDA only)
        if backend != "torch" and (input.is_cuda or backend == "triton"):
            if _dispatch.use_kernels(self, input, mask):
                return _dispatch.forward_kernels(self, input)
        # Buffers straight from their dict: nn.Module.__getattr__ costs about 1 us a lookup,
        # which a (60, 100) layer notices (torch's own forward pays it eight times).
        buffers = self._buffers
        running_mean = buffers["running_mean"]
        training = self.training
        if not training and running_mean is not None:
            return F.batch_norm_inference(
                input, running_mean, buffers["running_var"], self.weight, self.bias, self.eps,
                axis=self._axis, backward=self.backward,
            )  # fmt: skip
        commit = training and self.track_running_stats and running_mean is not None
        if (
            commit
            and mask is None
            and self._fusable
            and self.backward == "native"
            and self.virtual_batch_size is None
        ):
            output = self._forward_fused(input, running_mean, buffers)
            if output is not None:
                return output
        output, stats = self._transform(input, mask)
        if commit and stats is not None:
            self._commit(stats)
        return output

    def _check_input_dim(self, input: Tensor, mask: Tensor | None = None) -> None:
        dim = input.dim()
        if self._ranks:
            if dim not in self._ranks:
                expected = " or ".join(f"{r}D" for r in self._ranks)
                raise ValueError(
                    f"{type(self).__name__} expected {expected} input, got {dim}D input "
                    f"of shape {tuple(input.shape)}"
                )
        elif dim < 2:
            raise ValueError(
                f"{type(self).__name__} expected input of at least 2 dimensions (N, C, ...), "
                f"got shape {tuple(input.shape)}"
            )
        axis = self._axis
        if not -dim <= axis < dim:
            raise ValueError(
                f"{type(self).__name__} normalizes channel axis {axis}, which input of shape "
                f"{tuple(input.shape)} does not have"
            )
        if not input.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} expected a floating-point input, got {input.dtype}"
            )
        if input.shape[axis] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expected {self.num_features} "
                f"channels on axis {axis}, got {input.shape[axis]} (input shape "
                f"{tuple(input.shape)})"
            )
        if not self.eps > 0:
            F.check_eps(self.eps, self.training or self.running_mean is None)
        if mask is not None:
            F.check_mask(mask, input, axis % dim)

    def _transform(self, input: Tensor, mask: Tensor | None):
        """The transform step: (output, BatchStats or None), Algorithm 1 by default.

        The one step a subclass replaces (Batch Renorm, SyncBatchNorm); called in training,
        and in eval mode for a layer without running statistics.
        """
        return F.batch_norm_transform(
            input, self.weight, self.bias, self.eps, axis=self._axis, backward=self.backward,
            mask=mask, virtual_batch_size=self.virtual_batch_size if self.training else None,
            stats=self.training and self.track_running_stats,
        )  # fmt: skip

    def _momentum(self, readable: bool) -> float | Tensor:
        if self.momentum is not None:
            return self.momentum
        # Cumulative average: the k-th tracked batch gets weight 1/k (Algorithm 2's E_B). A
        # tensor unless reading k back is free, so that torch.compile keeps it in the graph
        # instead of specializing (and recompiling) on every new k.
        k = self.num_batches_tracked
        if readable:
            return 1.0 / (k.item() + 1)
        return (k + 1).to(self.running_mean.dtype).reciprocal()

    def _holds_commit(self) -> bool:
        """Whether `_commit` would hold this forward's statistics back from the buffers
        (deferred, or recomputed): a fused path that writes the buffers itself (the Triton
        kernels, `batchnorm.dispatch`) must then not write them."""
        return self._pending is not None or _recomputing()

    def _commit(self, stats: F.BatchStats) -> None:
        """The commit step: move the running statistics towards ``stats``, in place, guarded.

        The rule is `F.running_stats_step` (momentum, m/(m-1)); a batch whose step is not
        finite leaves the buffers alone and counts in ``num_batches_skipped``, one that is
        counts in ``num_batches_tracked``. On the CPU in eager mode the guard is read back and
        branches; elsewhere it selects with `torch.where` and adds the 0-d bool ``updated`` to
        the counters, so nothing synchronizes or breaks a compiled graph.

        Held back in two cases, so that the buffers move once per real forward: while the
        layer defers its commit (`batchnorm.accumulate`: the statistics go to ``_pending``
        and this rule commits their exact merge once per logical step), and while autograd
        recomputes a checkpointed forward (`_recomputing`: nothing is committed).
        """
        if _recomputing():
            return
        if self._pending is not None:
            self._pending.add(stats)
            return
        running_mean, running_var = self.running_mean, self.running_var
        readable = _host_readable(running_var)
        momentum = self._momentum(readable)
        if readable:
            new_mean, new_var = F.running_stats_step(running_mean, running_var, stats, momentum)
            if math.isfinite(new_var.max().item()):
                # Through .data, as torch's kernel writes them: no autograd version bump, so a
                # graph that saved the buffers (torch's kernel does) stays valid.
                torch._foreach_copy_([running_mean.data, running_var.data], [new_mean, new_var])
                self.num_batches_tracked.add_(_ONE)
            else:
                self.num_batches_skipped.add_(_ONE)
            return
        new_mean, new_var, updated = F.update_running_stats(
            running_mean, running_var, stats, momentum
        )
        self._write(running_mean, running_var, new_mean, new_var, updated)

    def _write(self, running_mean, running_var, new_mean, new_var, updated: Tensor) -> None:
        # The tensor form of the write-back: plain copies (foreach ops have no vmap rule) and
        # the 0-d bool ``updated`` added to the counters.
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
        self.num_batches_tracked.add_(updated)
        self.num_batches_skipped.add_(~updated)

    def _forward_fused(self, input: Tensor, running_mean: Tensor, buffers) -> Tensor | None:
        """Transform and commit in one call of torch's kernel: the native path's fast case.

        torch's kernel normalizes with the batch statistics and applies the same rule as
        `F.running_stats_step` to the buffers in place. The guard then runs after it: a copy
        of the two buffers taken before (one (2C,) cat) restores them if the new variance is
        not finite. Off the eager CPU the kernel updates that copy instead, and the guard
        selects between it and the buffers without reading anything back. Returns None where
        this path does not apply (empty or one-value batches, which the transform reports;
        momentum=None where 1/k must stay a tensor; a deferred commit, which needs the
        statistics). A recomputed checkpointed forward runs the kernel on copies of the buffers.

        Operations beyond torch.nn's forward (benchmarks/bench_bn.py counts them): the
        backup ``cat``, and the guard's ``max`` with its read-back (``_local_scalar_dense``);
        ``momentum=None`` reads k back (one more ``_local_scalar_dense``). Off the eager CPU
        the guard is two clones, ``isfinite``, ``all``, two ``where``, two copies and the counters'
        adds.
        """
        if self._pending is not None:
            return None
        axis = self._axis
        channels = input.shape[axis]
        if channels == 0 or input.numel() // channels < 2:
            return None
        running_var = buffers["running_var"]
        weight = self._parameters["weight"]
        if weight is not None and weight.dtype != running_var.dtype:
            return None  # bf16 parameters, fp32 buffers (FSDP2 mixed precision): no such kernel
        readable = _host_readable(running_var)
        momentum = self.momentum
        if momentum is None:
            if not readable:
                return None  # the commit step keeps 1/k a tensor in the graph
            momentum = 1.0 / (buffers["num_batches_tracked"].item() + 1)
        params = self._parameters
        x = input if axis == 1 else input.movedim(axis, 1)
        if _recomputing(readable):
            # Autograd recomputes a checkpointed forward: the real forward's kernel call (a
            # non-reentrant checkpoint checks that it saves the same tensors) on copies of
            # the buffers, which the real forward already moved.
            copies = running_mean.clone(), running_var.clone()
            weight, bias = params["weight"], params["bias"]
            if readable:
                output = torch.native_batch_norm(
                    x, weight, bias, *copies, True, momentum, self.eps
                )[0]
            else:
                output = torch.batch_norm(
                    x, weight, bias, *copies, True, momentum, self.eps,
                    torch.backends.cudnn.enabled,
                )  # fmt: skip
            return output if axis == 1 else output.movedim(1, axis)
        if readable:
            backup = torch.cat((running_mean, running_var))
            # On the CPU torch.batch_norm dispatches to this kernel through a composite layer
            # (_batch_norm_impl_index) that only adds time; cuDNN paths never come here.
            output = torch.native_batch_norm(
                x, params["weight"], params["bias"], running_mean, running_var, True, momentum,
                self.eps,
            )[0]  # fmt: skip
            if math.isfinite(running_var.max().item()):
                buffers["num_batches_tracked"].add_(_ONE)
            else:
                # Roll back through .data, as the kernel wrote: no autograd version bump (the
                # kernel saved the buffers for its backward, which does not read them).
                old = backup.chunk(2)
                torch._foreach_copy_([running_mean.data, running_var.data], list(old))
                buffers["num_batches_skipped"].add_(_ONE)
        else:
            # The kernel updates copies (whole tensors: vmap's rule for the kernel does not
            # write through views); the guard selects between them and the buffers.
            new_mean, new_var = running_mean.clone(), running_var.clone()
            output = torch.batch_norm(
                x, params["weight"], params["bias"], new_mean, new_var, True, momentum, self.eps,
                torch.backends.cudnn.enabled,
            )  # fmt: skip
            updated = F.all_finite(new_var)
            kept_mean = torch.where(updated, new_mean, running_mean)
            kept_var = torch.where(updated, new_var, running_var)
            self._write(running_mean, running_var, kept_mean, kept_var, updated)
        return output if axis == 1 else output.movedim(1, axis)

    # ----------------------------------------------------------------------------------------

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
        dtype); `batchnorm.swap` rebuilds layers as other classes from them."""
        return {
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "bias": not self.affine or self.bias is not None,
            "backward": self.backward,
            "virtual_batch_size": self.virtual_batch_size,
            "backend": self.backend,
        }

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self._axis != 1:
            text += f", axis={self._axis}"
        if self.backward != "native":
            text += f", backward={self.backward!r}"
        if self.virtual_batch_size is not None:
            text += f", virtual_batch_size={self.virtual_batch_size}"
        if self.backend != "auto":
            text += f", backend={self.backend!r}"
        return text


class BatchNorm1d(_BatchNormBase, nn.BatchNorm1d):
    """BN over (N, C) or (N, C, L): per activation, or per channel over N and L (Sec. 3, 3.2).

    Drop-in for ``torch.nn.BatchNorm1d``, and a subclass of it (same arguments, defaults,
    parameters and buffers).

    Shape: input (N, C) or (N, C, L); output the same.

    Example:
        >>> bn = BatchNorm1d(100)
        >>> bn(torch.randn(60, 100)).shape
        torch.Size([60, 100])
    """

    _ranks = (2, 3)


class BatchNorm2d(_BatchNormBase, nn.BatchNorm2d):
    """BN per feature map of (N, C, H, W), over N, H and W: m' = m*p*q values each (Sec. 3.2).

    Drop-in for ``torch.nn.BatchNorm2d``, and a subclass of it; channels_last input is handled
    without copies.

    Example:
        >>> bn = BatchNorm2d(64)
        >>> bn(torch.randn(8, 64, 14, 14)).shape
        torch.Size([8, 64, 14, 14])
    """

    _ranks = (4,)


class BatchNorm3d(_BatchNormBase, nn.BatchNorm3d):
    """BN per feature map of (N, C, D, H, W), over N, D, H and W (Sec. 3.2).

    Drop-in for ``torch.nn.BatchNorm3d``, and a subclass of it.
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

    Only the transform differs from BN (`F.batch_renorm_transform`: BN with gamma r and
    beta + gamma d, r and d constant in backprop), so ``backward="paper"`` and "native" both
    apply. ``r_max`` and ``d_max`` are plain attributes, so a training loop can follow the
    paper's schedule: ``layer.r_max, layer.d_max = F.renorm_limits(step)``. Buffers,
    state_dict and the eval-mode map are BN's (`inference_affine`, folding and export apply
    unchanged; a mask is ignored in eval mode as BN ignores it). Defaults follow the paper:
    momentum 0.01, r_max 3, d_max 5.
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
        if kwargs.get("virtual_batch_size") is not None:
            raise ValueError(
                "Batch Renormalization does not implement Ghost BN: virtual_batch_size must be "
                f"None, got {kwargs['virtual_batch_size']!r}"
            )
        F.check_renorm_limits(r_max, d_max)
        super().__init__(num_features, eps, momentum, *args, **kwargs)
        if not self.track_running_stats:
            raise ValueError(
                "Batch Renormalization corrects towards running statistics: "
                "track_running_stats must be True"
            )
        if self.momentum is None:
            raise ValueError("Batch Renormalization needs a momentum (the paper uses 0.01)")
        self.r_max, self.d_max = r_max, d_max

    def _transform(self, input, mask):
        if mask is not None:
            raise ValueError(
                f"{type(self).__name__} takes no mask in training (Batch Renormalization "
                "corrects full-batch statistics); a mask is accepted and ignored in eval mode"
            )
        F.check_renorm_limits(self.r_max, self.d_max)
        return F.batch_renorm_transform(
            input, self.running_mean, self.running_var, self.weight, self.bias, self.eps,
            r_max=self.r_max, d_max=self.d_max, axis=self._axis, backward=self.backward,
        )  # fmt: skip

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


def _register_torch_fusers() -> None:
    """Let ``torch.ao.quantization.fuse_modules`` fuse our BatchNorm1d/2d/3d as torch's.

    torch looks a fuser method up by the exact classes of the modules to fuse ((Conv2d,
    BatchNorm2d), (Conv2d, BatchNorm2d, ReLU), (Linear, BatchNorm1d), ...), so a subclass is
    "not found" although its eval-mode map is torch's (Algorithm 2, step 3). Each entry of
    torch's table that folds one of torch's BN classes into the conv or linear layer before it
    is entered once more with ours in its place and the same fuser method; nothing of torch's
    is changed. BN + ReLU (torch's ``BNReLU2d``) and fusing in training mode
    (quantization-aware training) stay torch's alone: their fused modules take only torch's
    classes.
    """
    from torch.ao.quantization import fuser_method_mappings

    table = getattr(fuser_method_mappings, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if not isinstance(table, dict):  # a torch that moved it; tests/test_dropin.py notices
        return
    ours = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
    for key, method in list(table.items()):
        if isinstance(key, tuple) and key[0] not in ours and any(cls in ours for cls in key):
            table.setdefault(tuple(ours.get(cls, cls) for cls in key), method)


_register_torch_fusers()
