"""`diagnose`'s statistics pass and per-layer measurements (Sec. 3.1, Algorithm 2).

`diagnose` runs the pass of `batchnorm.inference.population` (the one `batchnorm.recalibrate`
runs), accumulates per BN layer what `_LayerStats` needs, turns it into a `LayerDiagnosis`
(`_measure`), and asks `batchnorm.diagnose.problems` what is wrong.

Every quantity `diagnose` compares is measured on one scale: the layer's normalized output
xhat = (x - mean) / sqrt(var + eps), before gamma and beta. For two choices of (mean, var),
E[(xhat_1 - xhat_2)^2] over values with mean mu and variance s2 is

    s2 (a_1 - a_2)^2 + ((mu - m_1) a_1 - (mu - m_2) a_2)^2,   a_i = 1 / sqrt(v_i + eps),

so staleness (running vs population statistics), the train/eval gap (batch vs running) and
the batch noise (batch vs population) are all root-mean-square changes of xhat, in units of
its standard deviation (`_xhat_change2`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from batchnorm.diagnose.problems import accumulated_problem, layer_problems
from batchnorm.diagnose.report import DiagnosisReport, LayerDiagnosis, Thresholds
from batchnorm.inference.population import (
    SKIPPED,
    PopulationStats,
    StatisticsPass,
    check_estimator,
)
from batchnorm.swap import is_bn_like, is_frozen

# Which modules are BN layers, and which of them frozen, is the library's one predicate
# (`batchnorm.swap.is_bn_like`, `batchnorm.swap.is_frozen`): fold and fuse_activations see the
# same layers.


def _output_tensor(out) -> Tensor | None:
    """The model output to compare between modes: a tensor, or the first of a tuple/list."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if isinstance(out, Tensor) and out.is_floating_point():
        return out
    return None


# --------------------------------------------------------------------------------------------
# Accumulation during the pass
# --------------------------------------------------------------------------------------------


def _xhat_change2(mean, var, m1, v1, m2, v2, eps):
    """E[(xhat_1 - xhat_2)^2] over values of mean ``mean`` and variance ``var``, where
    xhat_i = (x - m_i) / sqrt(v_i + eps) (the module docstring has the derivation)."""
    a1, a2 = torch.rsqrt(v1 + eps), torch.rsqrt(v2 + eps)
    return var * (a1 - a2) ** 2 + ((mean - m1) * a1 - (mean - m2) * a2) ** 2


class _LayerStats(PopulationStats):
    """One BN layer's input over the pass: the population statistics of `PopulationStats`
    (those `batchnorm.recalibrate` writes with the same ``estimator``) and the sums behind the
    batch noise and the train/eval gap, in float64.

    The batch noise needs the population statistics, known only at the end, so the sums it
    needs are kept instead, shifted by the first batch's mean (``ref``) against
    cancellation: sum d (``sum_d``) and sum d^2 with d = mu_B - ref, and sum s2, s2 a, s2 a^2
    with a = 1/sqrt(s2 + eps). The train/eval gap uses the (fixed) running statistics
    directly.
    """

    def __init__(self, estimator: str, eps: float, running: tuple[Tensor, Tensor] | None) -> None:
        super().__init__(estimator)
        self.eps = eps
        self.running = running
        self.sums: dict[str, Tensor] = {}

    def add(self, mean: Tensor, var: Tensor, count: int) -> bool:
        if not super().add(mean, var, count):
            return False
        d = mean - self.ref
        a = torch.rsqrt(var + self.eps)
        terms = {"d2": d * d, "s2": var, "s2a": var * a, "s2a2": var * a * a}
        if self.running is not None:
            rm, rv = self.running
            terms["gap"] = _xhat_change2(mean, var, mean, var, rm, rv, self.eps)
        for k, t in terms.items():
            self.sums[k] = self.sums[k] + t if k in self.sums else t
        return True

    def merge(self, other: _LayerStats) -> None:
        # Another rank's sums; sum d^2 moves to this ref: d' = d + delta, delta = ref_o - ref.
        terms = dict(other.sums)
        if other.ref is not None and self.ref is not None and "d2" in terms:
            delta = other.ref - self.ref
            terms["d2"] = terms["d2"] + 2 * delta * other.sum_d + other.batches * delta * delta
        for k, t in terms.items():
            self.sums[k] = self.sums[k] + t if k in self.sums else t
        super().merge(other)

    def spread2(self, pm: Tensor) -> Tensor:
        """Mean over batches of (mu_B - pm)^2, from the shifted sums."""
        k = self.batches
        c = pm - self.ref
        return (self.sums["d2"] - 2 * c * self.sum_d + k * c * c).clamp_min(0) / k

    def noise2(self, pm: Tensor, pv: Tensor) -> Tensor:
        """Mean over batches of E[(xhat_B - xhat_pop)^2] per channel."""
        s, p = self.sums, torch.rsqrt(pv + self.eps)
        var_part = (s["s2a2"] - 2 * p * s["s2a"] + p * p * s["s2"]) / self.batches
        return var_part.clamp_min(0) + self.spread2(pm) * p * p


class _OutputStats:
    """The model output in both modes: sum of squared differences and of the training-mode
    output (shifted by its first mean), argmax agreement."""

    def __init__(self) -> None:
        self.n = 0
        self.diff2 = 0.0
        self.ref: float | None = None
        self.s1 = 0.0
        self.s2 = 0.0
        self.agree = 0
        self.votes = 0

    def add(self, y_train: Tensor, y_eval: Tensor) -> None:
        yt, ye = y_train.detach().double(), y_eval.detach().double()
        if self.ref is None:
            self.ref = yt.mean().item()
        d = yt - self.ref
        self.n += yt.numel()
        self.diff2 += ((ye - yt) ** 2).sum().item()
        self.s1 += d.sum().item()
        self.s2 += (d * d).sum().item()
        if yt.dim() >= 2 and yt.shape[1] >= 2:
            self.agree += (yt.argmax(1) == ye.argmax(1)).sum().item()
            self.votes += yt.argmax(1).numel()

    def merge(self, other: _OutputStats) -> None:
        # Another rank's sums, the shifted ones moved to this ref (as `_LayerStats.merge`).
        if other.n == 0:
            return
        if self.ref is None:
            self.__dict__.update(other.__dict__)
            return
        delta = other.ref - self.ref
        self.s2 += other.s2 + 2 * delta * other.s1 + other.n * delta * delta
        self.s1 += other.s1 + other.n * delta
        self.n += other.n
        self.diff2 += other.diff2
        self.agree += other.agree
        self.votes += other.votes

    def result(self) -> tuple[float | None, float | None]:
        if self.n == 0:
            return None, None
        var = max(self.s2 / self.n - (self.s1 / self.n) ** 2, 0.0)
        rms = math.sqrt(self.diff2 / self.n)
        gap = rms / math.sqrt(var) if var > 0 else (0.0 if rms == 0 else math.inf)
        return gap, (self.agree / self.votes if self.votes else None)


# --------------------------------------------------------------------------------------------
# diagnose
# --------------------------------------------------------------------------------------------


def _mode(bn: nn.Module) -> str:
    if is_frozen(bn):
        return "frozen"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "batch_always"
    return "batch"


def _num_features(bn: nn.Module) -> int:
    """C: the layer's ``num_features``, else (torchvision's FrozenBatchNorm2d has none) the
    size of its running statistics; a layer without running statistics always has the first."""
    features = getattr(bn, "num_features", None)
    return int(features if features is not None else bn.running_mean.numel())


def _scalar(t) -> int | None:
    return int(t) if isinstance(t, Tensor) else None


def _median(t: Tensor) -> float:
    return t.median().item() if t.numel() else float("nan")


@torch.no_grad()
def diagnose(
    model: nn.Module,
    data: Iterable,
    batches: int | None = None,
    progress: bool = True,
    *,
    estimator: str = "algorithm2",
    thresholds: Thresholds | None = None,
    process_group=None,
) -> DiagnosisReport:
    """Measure why a BN model behaves differently in eval mode, layer by layer (Alg. 2, Sec. 3.1).

    Each batch passes through the model twice. First as Algorithm 2 (and `batchnorm.
    recalibrate`) sees it: every BN layer in training mode, normalizing with its batch
    statistics, every other layer in eval mode; a forward pre-hook records each BN input's
    mu_B and sigma2_B (`batchnorm.functional.batch_stats` on the layer's channel axis); this
    pass and the population estimators are `batchnorm.inference.population`'s, the very ones
    `batchnorm.recalibrate` runs. Then in eval mode, with the running statistics, to compare
    the model outputs. Per layer this
    gives the population statistics (those `batchnorm.recalibrate` would write with the same
    ``estimator``), their mismatch with the running statistics, the
    train/eval gap, the noise of the batch statistics, dead and eps-dominated channels, and
    the layer's count of skipped non-finite batches (``num_batches_skipped``, ours only).
    Because the first pass normalizes every layer with batch statistics, a layer's input does
    not depend on the running statistics of the layers before it: a stale layer is blamed
    alone, not every layer after it.

    Works for every BN layer of `batchnorm.swap.is_bn_like`, the predicate of every pass: any
    ``torch.nn.modules.batchnorm._BatchNorm`` (ours, ``torch.nn.BatchNorm*d``,
    ``SyncBatchNorm``, track_running_stats=False layers, subclasses of other libraries) and
    frozen layers (`batchnorm.FrozenBatchNorm`, torchvision's ``FrozenBatchNorm2d``:
    `batchnorm.swap.FROZEN_CLASSES`). The model is left exactly as it was:
    every buffer (running statistics, ``num_batches_tracked``, ``num_batches_skipped``) is
    restored after each batch, parameters are not touched and every module's train/eval mode
    is restored. Inputs go to the device of the model's first parameter or buffer. A batch in
    which some layer sees fewer than 2 values per channel is skipped as a whole, with a
    warning, as `batchnorm.recalibrate` skips it. A BN
    ``mask`` argument is not seen (hooks see positional inputs), and a Ghost BN layer's noise
    is that of the whole batch passed here: pass batches of its virtual_batch_size.

    Args:
        model: any module with BN layers.
        data: an iterable of input tensors, or of tuples/lists whose first element is the
            input (a DataLoader of (input, target) works). Use the data the model is evaluated
            on, in batches of the size it was trained with (the batch noise is measured at the
            size given), and enough of it for the population estimate (precise BN uses
            10^3-10^4 samples).
        batches: use at most this many batches (all when None).
        progress: show a tqdm progress bar.
        estimator: how the population statistics are estimated, as in `batchnorm.
            recalibrate` ("algorithm2": the mean of mu_B and of m/(m-1) sigma2_B over batches;
            "pooled": every value seen as one batch). A model recalibrated on the same data
            with the same estimator has exactly its population statistics.
        thresholds: when each problem is reported (`Thresholds`; the defaults are explained
            in docs/diagnose.md).
        process_group: diagnose over every rank of this torch.distributed group
            (``torch.distributed.group.WORLD`` for all ranks): each rank passes its own
            batches and every rank gets the report of all of them, as one process would
            over the concatenated batches (the pooling of `batchnorm.recalibrate`, in
            `batchnorm.inference.population`). Every rank must call it. None: this process.

    Returns:
        A `DiagnosisReport`: ``print(report)`` shows a table of every layer and the problems,
        ``report.problems`` lists them by severity, ``report.to_dict()`` is JSON-ready and
        ``report.plot(path)`` draws the per-layer mismatch.

    Raises:
        ValueError: the model has no BN layer, ``data`` yields no usable batch, an unknown
            estimator, or ``batches`` < 1.
        TypeError: ``data`` is a tensor (pass an iterable of batches, e.g. ``[x]``).

    Example:
        >>> import batchnorm
        >>> net = nn.Sequential(nn.Linear(4, 8), batchnorm.BatchNorm1d(8), nn.ReLU())
        >>> data = [torch.randn(64, 4) for _ in range(10)]
        >>> _ = batchnorm.recalibrate(net, data, progress=False)
        >>> batchnorm.diagnose(net, data, progress=False).problems
        []
    """
    if isinstance(data, Tensor):
        raise TypeError(
            "diagnose expects an iterable of batches (a list of tensors, a DataLoader), got a "
            "single tensor; pass [x] to diagnose one batch"
        )
    if batches is not None and batches < 1:
        raise ValueError(f"batches must be a positive integer or None, got {batches}")
    check_estimator(estimator)
    limits = thresholds if thresholds is not None else Thresholds()
    layers = [(name, m) for name, m in model.named_modules() if is_bn_like(m)]
    if not layers:
        raise ValueError(
            f"diagnose found no BN layer in {type(model).__name__} (looked for torch's "
            "_BatchNorm subclasses, ours included, FrozenBatchNorm and torchvision's "
            "FrozenBatchNorm2d: batchnorm.swap.is_bn_like)"
        )
    stats = {}
    for name, bn in layers:
        running = None
        if _mode(bn) != "batch_always":
            running = (bn.running_mean.detach().double(), bn.running_var.detach().double())
        stats[name] = _LayerStats(estimator, bn.eps, running)
    output = _OutputStats()
    any_batch_mode = any(_mode(bn) == "batch" for _, bn in layers)
    layer_stats = {n: (bn, stats[n]) for n, bn in layers}
    with StatisticsPass(model, layer_stats, "diagnose", process_group) as run:
        for x in run.inputs(data, batches, progress):
            y_train = run.record(x)
            if y_train is SKIPPED:
                continue
            y_train = _output_tensor(y_train)
            y_eval = _output_tensor(run.eval_output(x)) if any_batch_mode else y_train
            if y_train is not None and y_eval is not None and y_train.shape == y_eval.shape:
                output.add(y_train, y_eval)
    used = run.finish(output)

    results = {name: _measure(name, bn, stats[name], limits) for name, bn in layers}
    accumulated = None
    rms = [d.stale_rms for d in results.values() if d.stale_rms is not None]
    if rms:
        accumulated = math.sqrt(sum(r * r for r in rms if math.isfinite(r)))
    gap, agreement = output.result()
    problems = []
    for d in results.values():
        problems += layer_problems(d, limits)
    unseen = [name for name, d in results.items() if d.batches == 0 and d.nonfinite_batches == 0]
    if unseen:
        warnings.warn(
            f"diagnose: BN layers {unseen} received no input during the pass; nothing was "
            "measured there",
            stacklevel=2,
        )
    caused = any(p.kind in ("stale_statistics", "small_batch") for p in problems)
    if not caused and accumulated is not None and accumulated > limits.train_eval_gap:
        problems.append(accumulated_problem(results, accumulated, gap, agreement, limits))
    problems.sort(key=lambda p: -p.severity)
    return DiagnosisReport(results, problems, used, gap, agreement, accumulated, limits)


def _measure(name: str, bn: nn.Module, acc: _LayerStats, limits: Thresholds) -> LayerDiagnosis:
    mode = _mode(bn)
    d = LayerDiagnosis(
        name=name,
        type=type(bn).__name__,
        num_features=_num_features(bn),
        eps=float(bn.eps),
        momentum=getattr(bn, "momentum", None),
        mode=mode,
        batches=acc.batches,
        nonfinite_batches=acc.nonfinite,
        num_batches_tracked=_scalar(getattr(bn, "num_batches_tracked", None)),
        num_batches_skipped=_scalar(getattr(bn, "num_batches_skipped", None)),
    )
    gamma = getattr(bn, "weight", None)
    if isinstance(gamma, Tensor):
        g = gamma.detach().double().abs().cpu()
        d.dead_gamma = g <= limits.dead_gamma * g.max()
    if acc.running is not None:
        d.running_mean, d.running_var = (t.cpu() for t in acc.running)
    if acc.batches == 0:
        return d
    eps = d.eps
    d.values_per_channel = acc.n / acc.batches
    pm, pv = acc.result()
    d.population_mean, d.population_var = pm.cpu(), pv.cpu()
    d.dead_input = (pv <= limits.dead_input * eps).cpu()
    dead = d.dead_input if d.dead_gamma is None else d.dead_input | d.dead_gamma
    d.eps_dominated = (pv < limits.eps_dominated * eps).cpu() & ~dead
    live = ~(dead | d.eps_dominated)
    p = torch.rsqrt(pv + eps)
    spread = (acc.spread2(pm).sqrt() * p).cpu()
    d.batch_mean_spread = spread
    d.spread = _median(spread[live])
    d.noise = math.sqrt(acc.noise2(pm, pv).cpu()[live].mean().item()) if live.any() else None
    if acc.running is not None:
        rm, rv = acc.running
        d.mean_shift = ((rm - pm) * p).cpu()
        d.var_ratio = ((rv + eps) / (pv + eps)).cpu()
        err2 = _xhat_change2(pm, pv, pm, pv, rm, rv, eps).cpu()
        d.stale_error = err2.sqrt()
        if live.any():
            d.stale_max = d.stale_error[live].max().item()
            d.stale_rms = math.sqrt(err2[live].mean().item())
        if mode == "frozen":
            d.gap = 0.0
        elif live.any():
            d.gap = math.sqrt((acc.sums["gap"].cpu()[live] / acc.batches).mean().item())
    return d
