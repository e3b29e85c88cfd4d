"""The Sec. 4.1 MNIST network (Figure 1): 784-100-100-100-10 sigmoid MLP, with or without BN.

Two forms of the same network live here:

- `MLP`, an ordinary ``nn.Module`` built from `batchnorm.BatchNorm1d`: the readable reference,
  and the form Algorithm 2's recalibration and checkpoints of single models use.
- `StackedMLP`, S independent copies of one `MLP` kind held as stacked tensors, with a
  hand-written forward/backward and an in-place SGD step. It trains several seeds (or several
  settings of a sweep) in one batched matmul per layer and spends no time in autograd or
  ``nn.Module`` dispatch: the Figure 1 loop is bound by per-op overhead, not arithmetic. Its
  normalization is `batchnorm.functional.batch_norm`; tests check its losses, gradients and
  running statistics against `MLP` trained with autograd and ``torch.optim.SGD``.

Per hidden layer the baseline computes y = sigmoid(W u + b) and the BN net
y = sigmoid(BN(W u)) with the bias dropped, beta taking its place (Sec. 3.2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from batchnorm import BatchNorm1d
from batchnorm import functional as bnf

__all__ = ["MLP", "StackedMLP", "SIZES"]

SIZES = (784, 100, 100, 100, 10)  # input, three hidden layers of sigmoids, ten logits


class MLP(nn.Module):
    """784-100-100-100-10 sigmoid network of Sec. 4.1, optionally with BN before each sigmoid.

    Args:
        bn: insert `batchnorm.BatchNorm1d` before every hidden sigmoid and drop those layers'
            biases (beta subsumes them).
        sizes: layer widths, input first, logits last.
        eps, momentum: passed to each `BatchNorm1d` (torch conventions: momentum weighs the
            new batch statistics).

    Shape:
        input (N, 784) float, output (N, 10) logits.

    Example:
        >>> net = MLP(bn=True)
        >>> net(torch.rand(60, 784)).shape
        torch.Size([60, 10])
    """

    def __init__(
        self, bn: bool, sizes: Sequence[int] = SIZES, eps: float = 1e-5, momentum: float = 0.1
    ) -> None:
        super().__init__()
        self.bn = bn
        pairs = list(zip(sizes[:-2], sizes[1:-1]))
        self.hidden = nn.ModuleList(nn.Linear(i, o, bias=not bn) for i, o in pairs)
        self.norms = (
            nn.ModuleList(BatchNorm1d(o, eps=eps, momentum=momentum) for _, o in pairs)
            if bn
            else nn.ModuleList()
        )
        self.out = nn.Linear(sizes[-2], sizes[-1])

    def pre_activations(self, x: Tensor) -> list[Tensor]:
        """The input of every hidden sigmoid, (N, width) each, then the logits (N, 10)."""
        zs = []
        for i, linear in enumerate(self.hidden):
            z = linear(x)
            if self.bn:
                z = self.norms[i](z)
            zs.append(z)
            x = torch.sigmoid(z)
        zs.append(self.out(x))
        return zs

    def forward(self, x: Tensor) -> Tensor:
        return self.pre_activations(x)[-1]


class StackedMLP:
    """S independent `MLP` s of one kind as stacked tensors, trained by a hand-fused SGD step.

    Weights are stored as (S, in, out), so a layer is one ``torch.bmm`` for all S models;
    biases, gamma and beta as (S, 1, out); running statistics as (S, 1, out). The backward pass
    is written out: for the softmax cross-entropy d logits = (softmax - onehot) / m, for a
    sigmoid dl/dz = dl/dy * y (1 - y), and for BN the compact form of the paper's chain rule
    (Sec. 3), dl/dx = gamma / s * (g - mean(g) - xhat * mean(g * xhat)) with g = dl/dy and
    s = sqrt(sigma2_B + eps). Every gradient is linear in d logits, so the learning rate is
    folded into it once instead of scaling each gradient.

    The moving averages follow `batchnorm.functional`'s conventions (momentum weighs the new
    value, running_var is unbiased, m/(m-1) * sigma2_B) and are updated in one fused op for
    all layers; unlike `BatchNorm1d` they do not skip non-finite batches (a diverged run is
    visible in its accuracy anyway).

    Args:
        tensors: the state, as returned by `state_dict` (see `from_modules`).
        bn: whether the hidden layers use BN.
        eps, momentum: BN's eps and moving-average momentum.
    """

    def __init__(
        self, tensors: dict[str, Tensor], bn: bool, eps: float = 1e-5, momentum: float = 0.1
    ) -> None:
        self.bn, self.eps, self.momentum = bn, eps, momentum
        self.depth = sum(1 for k in tensors if k.startswith("weight"))  # linear layers
        get = tensors.__getitem__
        self.weights = [get(f"weight{i}") for i in range(self.depth)]
        self.out_bias = get(f"bias{self.depth - 1}")
        hidden = range(self.depth - 1)
        if bn:
            self.gammas = [get(f"gamma{i}") for i in hidden]
            self.betas = [get(f"beta{i}") for i in hidden]
            self.running_means = [get(f"running_mean{i}") for i in hidden]
            self.running_vars = [get(f"running_var{i}") for i in hidden]
            self.shifts = self.betas
            self.params = [*self.weights, self.out_bias, *self.gammas, *self.betas]
        else:
            self.shifts = [get(f"bias{i}") for i in hidden]
            self.params = [*self.weights, self.out_bias, *self.shifts]

    @property
    def num_models(self) -> int:
        return self.weights[0].shape[0]

    # ----------------------------------------------------------------------------------------
    # Conversion to and from modules, and state for checkpoints.

    @classmethod
    def from_modules(cls, models: Sequence[MLP]) -> StackedMLP:
        """Stack S `MLP` s of the same kind (their parameters are copied)."""
        bn = models[0].bn
        if any(m.bn != bn for m in models):
            raise ValueError("from_modules stacks models of one kind (all BN or all baseline)")
        linears = [[*m.hidden, m.out] for m in models]
        t: dict[str, Tensor] = {}
        for i in range(len(linears[0])):
            # nn.Linear keeps (out, in); we keep (in, out) so that h @ W needs no transpose.
            t[f"weight{i}"] = torch.stack([ls[i].weight.detach().t() for ls in linears])
            if linears[0][i].bias is not None:
                t[f"bias{i}"] = torch.stack([ls[i].bias.detach()[None] for ls in linears])
        if bn:
            for i in range(len(models[0].norms)):
                for ours, theirs in [
                    ("gamma", "weight"),
                    ("beta", "bias"),
                    ("running_mean", "running_mean"),
                    ("running_var", "running_var"),
                ]:
                    t[f"{ours}{i}"] = torch.stack(
                        [getattr(m.norms[i], theirs).detach()[None] for m in models]
                    )
        norm = models[0].norms[0] if bn else None
        kwargs = {"eps": norm.eps, "momentum": norm.momentum} if norm is not None else {}
        return cls({k: v.clone().contiguous() for k, v in t.items()}, bn, **kwargs)

    def to_module(self, index: int) -> MLP:
        """Model ``index`` of the stack as an `MLP` (a copy; BN layers in eval mode state)."""
        sizes = [self.weights[0].shape[1]] + [w.shape[2] for w in self.weights]
        model = MLP(self.bn, sizes, eps=self.eps, momentum=self.momentum)
        with torch.no_grad():
            for i, linear in enumerate([*model.hidden, model.out]):
                linear.weight.copy_(self.weights[i][index].t())
                if linear.bias is not None:
                    bias = self.out_bias if i == self.depth - 1 else self.shifts[i]
                    linear.bias.copy_(bias[index, 0])
            for i, norm in enumerate(model.norms):
                norm.weight.copy_(self.gammas[i][index, 0])
                norm.bias.copy_(self.betas[i][index, 0])
                norm.running_mean.copy_(self.running_means[i][index, 0])
                norm.running_var.copy_(self.running_vars[i][index, 0])
        return model

    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor of the stack by name (views, not copies)."""
        t = {f"weight{i}": w for i, w in enumerate(self.weights)}
        t[f"bias{self.depth - 1}"] = self.out_bias
        for i in range(self.depth - 1):
            if self.bn:
                t[f"gamma{i}"] = self.gammas[i]
                t[f"beta{i}"] = self.betas[i]
                t[f"running_mean{i}"] = self.running_means[i]
                t[f"running_var{i}"] = self.running_vars[i]
            else:
                t[f"bias{i}"] = self.shifts[i]
        return t

    # ----------------------------------------------------------------------------------------
    # Forward passes.

    def _bn_2d(self, a: Tensor) -> Tensor:
        # (S, m, C) -> (m, S*C): BN's channels are (model, unit) pairs, reduced over m only.
        s, m, c = a.shape
        return a.view(m, c) if s == 1 else a.transpose(0, 1).reshape(m, s * c)

    @staticmethod
    def _bn_3d(y: Tensor, s: int) -> Tensor:
        # (m, S*C) -> (S, m, C), the inverse of _bn_2d.
        m = y.shape[0]
        return y.view(1, m, -1) if s == 1 else y.view(m, s, -1).transpose(0, 1)

    @torch.no_grad()
    def evaluate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Inference (population statistics for BN): logits and the last hidden pre-activations.

        Args:
            x: (S, N, 784), or (N, 784) shared by all S models.

        Returns:
            (logits (S, N, 10), input of the last hidden layer's sigmoids (S, N, 100)).
        """
        s = self.num_models
        h = x.expand(s, *x.shape) if x.dim() == 2 else x
        z = h
        for i in range(self.depth - 1):
            if self.bn:
                a = torch.bmm(h, self.weights[i])  # (S, N, in) @ (S, in, out) -> (S, N, out)
                out = bnf.batch_norm(
                    self._bn_2d(a),
                    self._flat(self.running_means[i]),
                    self._flat(self.running_vars[i]),
                    self._flat(self.gammas[i]),
                    self._flat(self.betas[i]),
                    training=False,
                    eps=self.eps,
                )
                z = self._bn_3d(out.output, s)
            else:
                z = torch.baddbmm(self.shifts[i], h, self.weights[i])
            h = torch.sigmoid(z)
        return torch.baddbmm(self.out_bias, h, self.weights[-1]), z

    @staticmethod
    def _flat(t: Tensor) -> Tensor:
        return t.reshape(-1)  # (S, 1, C) -> (S*C,), matching _bn_2d's channel order

    def loss(self, x: Tensor, onehot: Tensor) -> Tensor:
        """Training-mode cross-entropy of each model on its batch, (S,); no side effects."""
        logits = self._forward_train(x)[0]
        return -(torch.log_softmax(logits, -1) * onehot).sum(-1).mean(-1)

    def _forward_train(self, x: Tensor):
        # Returns logits, the sigmoid outputs per layer (input first), and for BN per layer
        # xhat, 1/s, mu_B and the unbiased variance (what the moving averages take).
        hs, cache = [x], []
        h = x
        s, m = x.shape[0], x.shape[1]
        for i in range(self.depth - 1):
            if self.bn:
                a = torch.bmm(h, self.weights[i])  # (S, m, in) @ (S, in, C) -> (S, m, C)
                # xhat from the library's Algorithm 1 (no affine: gamma and beta come below,
                # and no running statistics: they are updated for all layers at once).
                xhat = self._bn_3d(
                    bnf.batch_norm(self._bn_2d(a), None, None, training=True, eps=self.eps).output,
                    s,
                )
                # mu_B and sigma2_B again (the fused kernel keeps them), two-pass, for the
                # backward and the moving averages: three small ops, cheaper than unfusing.
                mean = a.mean(1, keepdim=True)  # (S, 1, C)
                sq = (a - mean).square_().sum(1, keepdim=True)
                rstd = torch.rsqrt(sq / m + self.eps)
                cache.append((xhat, rstd, mean, sq / (m - 1)))
                z = torch.addcmul(self.betas[i], xhat, self.gammas[i])
            else:
                z = torch.baddbmm(self.shifts[i], h, self.weights[i])
            h = torch.sigmoid(z)
            hs.append(h)
        logits = torch.baddbmm(self.out_bias, h, self.weights[-1])
        return logits, hs, cache

    def gradients(self, x: Tensor, onehot: Tensor, scale: float | Tensor = 1.0) -> list[Tensor]:
        """Gradients of each model's mean cross-entropy, times ``scale``, in `params` order.

        Also advances the BN moving averages, as a training forward pass does.

        Args:
            x: (S, m, 784) one batch per model.
            onehot: (S, m, 10) one-hot labels.
            scale: a float, or (S, 1, 1) per model (the learning rate, for `sgd_step`).
        """
        with torch.no_grad():
            logits, hs, cache = self._forward_train(x)
            m = x.shape[1]
            d = torch.softmax(logits, -1).sub_(onehot).mul_(scale / m)  # dl/dlogits * scale
            grad_w = [torch.empty(0)] * self.depth
            grad_shift: list[Tensor] = [torch.empty(0)] * (self.depth - 1)
            grad_gamma: list[Tensor] = [torch.empty(0)] * (self.depth - 1)
            grad_out_bias = d.sum(1, keepdim=True)
            for i in range(self.depth - 1, -1, -1):
                grad_w[i] = torch.bmm(hs[i].transpose(1, 2), d)  # (S, in, m) @ (S, m, out)
                if i == 0:
                    break
                dh = torch.bmm(d, self.weights[i].transpose(1, 2))
                g = torch.ops.aten.sigmoid_backward(dh, hs[i])  # dh * y * (1 - y)
                j = i - 1
                if self.bn:  # the paper's backward pass of Algorithm 1, from the library
                    xhat, rstd, _, _ = cache[j]
                    d, grad_gamma[j], grad_shift[j] = bnf.batch_norm_backward(
                        g, xhat, rstd, self.gammas[j], dims=(1,)
                    )
                else:
                    grad_shift[j] = g.sum(1, keepdim=True)  # dl/db
                    d = g
            if self.bn:
                stats = [t for c in cache for t in c[2:]]
                running = [t for pair in zip(self.running_means, self.running_vars) for t in pair]
                torch._foreach_lerp_(running, stats, self.momentum)
                return [*grad_w, grad_out_bias, *grad_gamma, *grad_shift]
            return [*grad_w, grad_out_bias, *grad_shift]

    def sgd_step(self, x: Tensor, onehot: Tensor, lr: float | Tensor) -> None:
        """One plain SGD step on each model's batch: p <- p - lr * dl/dp (in place)."""
        grads = self.gradients(x, onehot, lr)
        with torch.no_grad():
            torch._foreach_sub_(self.params, grads)
