"""Why a BN model misbehaves (Sec. 3.1, Algorithm 2) and how its layer inputs move (Figure 1).

- `diagnose` measures, for every BN layer of any model, how its running statistics compare
  with the population statistics Algorithm 2 would give on the data passed in, how far
  training-mode (batch statistics) and eval-mode (running statistics) outputs differ, how
  noisy the batch statistics are, and which channels are dead or dominated by eps. It
  returns a `DiagnosisReport` whose `problems` say what is wrong and what to do.
- `monitor` records the percentiles of BN layer inputs during training with forward hooks:
  Figure 1(b, c) for any model.

Statistical conventions (biased sigma2_B for normalizing, unbiased ``running_var``, eps inside
the square root) are those stated once in `batchnorm.functional`.

Every quantity `diagnose` compares is measured on one scale: the layer's normalized output
xhat = (x - mean) / sqrt(var + eps), before gamma and beta. For two choices of (mean, var),
E[(xhat_1 - xhat_2)^2] over values with mean mu and variance s2 is

    s2 (a_1 - a_2)^2 + ((mu - m_1) a_1 - (mu - m_2) a_2)^2,   a_i = 1 / sqrt(v_i + eps),

so staleness (running vs population statistics), the train/eval gap (batch vs running) and
the batch noise (batch vs population) are all root-mean-square changes of xhat, in units of
its standard deviation (`_xhat_change2`).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.inference.population import (
    SKIPPED,
    PopulationStats,
    StatisticsPass,
    _mask_argument,
    check_estimator,
)
from batchnorm.inference.swap import channel_axis

__all__ = [
    "diagnose",
    "DiagnosisReport",
    "LayerDiagnosis",
    "Problem",
    "Thresholds",
    "monitor",
    "Monitor",
]

KINDS = (
    "stale_statistics",
    "train_eval_gap",
    "small_batch",
    "dead_channels",
    "eps_dominated",
    "skipped_batches",
)


# --------------------------------------------------------------------------------------------
# Which modules are BN layers
# --------------------------------------------------------------------------------------------


def _frozen_types() -> tuple[type, ...]:
    # Imported when called: the top-level name survives the library moving it between files.
    import batchnorm

    return (batchnorm.FrozenBatchNorm,)


def _is_frozen(m: nn.Module) -> bool:
    """Fixed statistics in train and eval mode: ours, or torchvision-style FrozenBatchNorm2d."""
    if isinstance(m, _frozen_types()):
        return True
    return (
        not isinstance(m, _BatchNorm)
        and "FrozenBatchNorm" in type(m).__name__
        and isinstance(getattr(m, "running_mean", None), Tensor)
        and isinstance(getattr(m, "running_var", None), Tensor)
    )


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) or _is_frozen(m)


def _output_tensor(out) -> Tensor | None:
    """The model output to compare between modes: a tensor, or the first of a tuple/list."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if isinstance(out, Tensor) and out.is_floating_point():
        return out
    return None


# --------------------------------------------------------------------------------------------
# Thresholds and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """When `diagnose` reports a problem; the reason for each value is in docs/diagnose.md.

    stale: largest per-channel RMS change of the eval-mode normalized output caused by using
        running instead of population statistics (a quarter of the output's std).
    small_batch: RMS change of the training-mode normalized output between batch and
        population statistics (about 1.25 / sqrt(m) for m independent values per channel:
        0.35 is m of about 12).
    train_eval_gap: accumulated staleness sqrt(sum over layers of the per-layer RMS stale
        error squared), reported when no single layer crosses ``stale``.
    dead_gamma: |gamma_c| at most this fraction of the layer's largest |gamma|.
    dead_input: input variance at most ``dead_input * eps``: the normalized output's std,
        sqrt(var / (var + eps)), is then below 1e-3, a constant for every purpose.
    eps_dominated: input variance below ``eps_dominated * eps``: eps is then more than half of
        the variance the layer divides by and the output std below sqrt(1/2).
    """

    stale: float = 0.25
    small_batch: float = 0.35
    train_eval_gap: float = 0.25
    dead_gamma: float = 1e-3
    dead_input: float = 1e-6
    eps_dominated: float = 1.0


@dataclass
class Problem:
    """One finding of `diagnose`.

    Attributes:
        layer: the BN layer's qualified name in ``model.named_modules()`` ("" is the whole
            model, used for the accumulated train/eval gap).
        kind: one of "stale_statistics", "train_eval_gap", "small_batch", "dead_channels",
            "eps_dominated", "skipped_batches".
        severity: the number behind the problem divided by its threshold (1 is the edge;
            inf for non-finite running statistics); problems are ranked by it.
        message: what is wrong, in numbers, and what to do.
        numbers: the values behind the message.
    """

    layer: str
    kind: str
    severity: float
    message: str
    numbers: dict = field(default_factory=dict)

    def __str__(self) -> str:
        where = self.layer if self.layer else "(model)"
        return f"[{self.kind}] {where} (severity {self.severity:.2f}): {self.message}"


@dataclass
class LayerDiagnosis:
    """What `diagnose` measured at one BN layer. Per-channel values are (C,) float64 tensors
    on the CPU; None where the layer lacks the quantity (no running statistics, no input).

    Attributes:
        name, type: qualified name and class name.
        num_features, eps, momentum: the layer's settings.
        mode: "batch" (normalizes with batch statistics in training, running ones in eval),
            "batch_always" (track_running_stats=False) or "frozen" (running ones always).
        batches: how many inputs the layer received (a layer called k times per forward
            counts k per batch); nonfinite_batches: those with non-finite statistics, left out.
        values_per_channel: mean m, the values per channel in one batch.
        num_batches_tracked, num_batches_skipped: the layer's counters (None if absent).
        population_mean, population_var: exact mean and unbiased variance of all the
            layer's input values seen (Algorithm 2's population statistics, pooled).
        running_mean, running_var: the layer's statistics.
        mean_shift: (running_mean - population_mean) / sqrt(population_var + eps).
        var_ratio: (running_var + eps) / (population_var + eps).
        stale_error: per channel, RMS change of the eval-mode xhat from running instead of
            population statistics.
        batch_mean_spread: per channel, RMS of (mu_B - population_mean) over batches, in
            units of sqrt(population_var + eps).
        dead_gamma, dead_input, eps_dominated: per-channel bool masks.
        stale_max, stale_rms: max and RMS of stale_error over live channels (not dead, not
            eps-dominated).
        gap: RMS change of xhat between batch and running statistics on the same inputs (the
            layer's train/eval gap; 0 for frozen layers, None without running statistics).
        noise: RMS change of xhat between batch and population statistics (how noisy the
            training-mode output is).
        spread: median over live channels of batch_mean_spread.
    """

    name: str
    type: str
    num_features: int
    eps: float
    momentum: float | None
    mode: str
    batches: int = 0
    nonfinite_batches: int = 0
    values_per_channel: float | None = None
    num_batches_tracked: int | None = None
    num_batches_skipped: int | None = None
    population_mean: Tensor | None = None
    population_var: Tensor | None = None
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    mean_shift: Tensor | None = None
    var_ratio: Tensor | None = None
    stale_error: Tensor | None = None
    batch_mean_spread: Tensor | None = None
    dead_gamma: Tensor | None = None
    dead_input: Tensor | None = None
    eps_dominated: Tensor | None = None
    stale_max: float | None = None
    stale_rms: float | None = None
    gap: float | None = None
    noise: float | None = None
    spread: float | None = None

    @property
    def dead(self) -> Tensor | None:
        if self.dead_gamma is None and self.dead_input is None:
            return None
        if self.dead_gamma is None:
            return self.dead_input
        if self.dead_input is None:
            return self.dead_gamma
        return self.dead_gamma | self.dead_input

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}


@dataclass
class DiagnosisReport:
    """What `diagnose` returns: per-layer measurements, the model output gap, the problems.

    Attributes:
        layers: qualified name -> `LayerDiagnosis`, in ``named_modules()`` order.
        problems: `Problem` list, most severe first; empty for a healthy model.
        batches: batches passed through the model.
        output_gap: RMS of (eval-mode output - training-mode output) over the std of the
            training-mode output (None when the model output is not a floating tensor).
        output_agreement: fraction of argmax predictions (over axis 1) on which the two modes
            agree (None for outputs without a class axis).
        accumulated_stale: sqrt(sum over layers of stale_rms^2).
        thresholds: the `Thresholds` used.
    """

    layers: dict[str, LayerDiagnosis]
    problems: list[Problem]
    batches: int
    output_gap: float | None
    output_agreement: float | None
    accumulated_stale: float | None
    thresholds: Thresholds

    def to_dict(self) -> dict:
        """JSON-ready (non-finite numbers become None, tensors lists)."""
        return {
            "batches": self.batches,
            "output_gap": _jsonable(self.output_gap),
            "output_agreement": _jsonable(self.output_agreement),
            "accumulated_stale": _jsonable(self.accumulated_stale),
            "thresholds": {f.name: getattr(self.thresholds, f.name) for f in fields(Thresholds)},
            "problems": [
                {
                    "layer": p.layer,
                    "kind": p.kind,
                    "severity": _jsonable(p.severity),
                    "message": p.message,
                    "numbers": _jsonable(p.numbers),
                }
                for p in self.problems
            ],
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
        }

    def __str__(self) -> str:
        head = (
            "layer",
            "type",
            "C",
            "m",
            "max|shift|",
            "var ratio",
            "stale",
            "gap",
            "noise",
            "spread",
            "dead",
            "eps",
            "skipped",
        )
        rows = [head]
        for d in self.layers.values():
            shift = var = None
            if d.mean_shift is not None and d.mean_shift.numel():
                shift = _fmt(d.mean_shift.abs().max().item())
                var = f"{_fmt(d.var_ratio.min().item())}..{_fmt(d.var_ratio.max().item())}"
            rows.append(
                (
                    d.name,
                    d.type,
                    str(d.num_features),
                    _fmt(d.values_per_channel, 0),
                    shift or "-",
                    var or "-",
                    _fmt(d.stale_max),
                    _fmt(d.gap),
                    _fmt(d.noise),
                    _fmt(d.spread),
                    _count(d.dead),
                    _count(d.eps_dominated),
                    "-" if d.num_batches_skipped is None else str(d.num_batches_skipped),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"BN diagnosis over {self.batches} batches, {len(self.layers)} BN layers"]
        for k, row in enumerate(rows):
            lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                                   enumerate(zip(row, widths))))
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.output_gap is not None:
            text = f"model output: train/eval gap {self.output_gap:.3g} (RMS / std)"
            if self.output_agreement is not None:
                text += f", argmax agrees on {100 * self.output_agreement:.1f}%"
            lines.append(text)
        if self.accumulated_stale is not None:
            lines.append(f"accumulated staleness over layers: {self.accumulated_stale:.3g}")
        lines.append(
            "columns: m = values per channel per batch; shift = (running - population mean) / "
            "population std; var ratio = running / population variance; stale, gap, noise = RMS "
            "change of the normalized output (running vs population, batch vs running, batch vs "
            "population); spread = batch means' RMS spread / population std"
        )
        if not self.problems:
            lines.append("no problems found")
        else:
            lines.append(f"{len(self.problems)} problem(s), most severe first:")
            lines += [f"  {i + 1}. {p}" for i, p in enumerate(self.problems)]
        return "\n".join(lines)

    def plot(self, path) -> None:
        """Draw the per-layer mismatch: (a) staleness, train/eval gap and batch noise per
        layer against their thresholds, (b) per-channel mean shift, (c) per-channel variance
        ratio (log2), one column per layer. Needs matplotlib (imported here)."""
        plt = _pyplot()
        names = list(self.layers)
        layers = list(self.layers.values())
        x = torch.arange(len(names)).tolist()
        fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.55 * len(names) + 2), 9), sharex=True)
        ax = axes[0]
        width = 0.27
        for k, (attr, color, label) in enumerate(
            (
                ("stale_max", "tab:red", "stale (max over channels)"),
                ("gap", "tab:blue", "train/eval gap"),
                ("noise", "tab:green", "batch noise"),
            )
        ):
            values = [_num(getattr(d, attr)) for d in layers]
            ax.bar([i + (k - 1) * width for i in x], values, width, color=color, label=label)
        ax.axhline(self.thresholds.stale, color="tab:red", ls="--", lw=0.8)
        ax.axhline(self.thresholds.small_batch, color="tab:green", ls=":", lw=0.8)
        ax.set_ylabel("RMS change of xhat\n(units of its std)")
        ax.set_title("(a) per layer; dashed: stale threshold, dotted: small-batch threshold",
                     fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        for ax, attr, title, transform in (
            (axes[1], "mean_shift", "(b) mean shift per channel (population std)", None),
            (axes[2], "var_ratio", "(c) variance ratio per channel, running / population",
             "log2"),
        ):
            for i, d in enumerate(layers):
                v = getattr(d, attr)
                if v is None or not v.numel():
                    continue
                v = v.clone()
                if transform == "log2":
                    v = v.clamp_min(1e-12).log2()
                v = v[torch.isfinite(v)]
                jitter = (torch.rand(v.numel(), generator=torch.Generator().manual_seed(i)) - 0.5)
                ax.scatter(i + 0.3 * jitter, v, s=6, alpha=0.6, color="k")
            ax.axhline(0, color="gray", lw=0.6)
            ax.set_title(title)
            ax.grid(alpha=0.3, axis="y")
        axes[2].set_ylabel("log2 ratio")
        axes[1].set_ylabel("shift")
        axes[2].set_xticks(x)
        axes[2].set_xticklabels([n or "(root)" for n in names], rotation=60, ha="right",
                                fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend; only the plots need it."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "plotting needs matplotlib, which the library does not install: "
            "pip install matplotlib (or the project's reproduce extra)"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if digits == 0:
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def _count(mask: Tensor | None) -> str:
    return "-" if mask is None else str(int(mask.sum()))


def _jsonable(v):
    if isinstance(v, Tensor):
        return _jsonable(v.tolist())
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


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
    if _is_frozen(bn):
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

    Works for every ``torch.nn.modules.batchnorm._BatchNorm`` (ours, ``torch.nn.BatchNorm*d``,
    ``SyncBatchNorm``, track_running_stats=False layers) and frozen layers (`batchnorm.
    FrozenBatchNorm`, torchvision's ``FrozenBatchNorm2d``). The model is left exactly as it was:
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
    layers = [(name, m) for name, m in model.named_modules() if _is_bn(m)]
    if not layers:
        raise ValueError(
            f"diagnose found no BN layer in {type(model).__name__} (looked for torch's "
            "_BatchNorm subclasses, ours included, and FrozenBatchNorm layers)"
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
        problems += _layer_problems(d, limits)
    unseen = [name for name, d in results.items() if d.batches == 0 and d.nonfinite_batches == 0]
    if unseen:
        warnings.warn(
            f"diagnose: BN layers {unseen} received no input during the pass; nothing was "
            "measured there",
            stacklevel=2,
        )
    caused = any(p.kind in ("stale_statistics", "small_batch") for p in problems)
    if not caused and accumulated is not None and accumulated > limits.train_eval_gap:
        problems.append(_accumulated_problem(results, accumulated, gap, agreement, limits))
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


def _channels(mask: Tensor, limit: int = 8) -> str:
    idx = mask.nonzero().flatten().tolist()
    text = ", ".join(str(i) for i in idx[:limit])
    return text + (f", ... ({len(idx)} in all)" if len(idx) > limit else "")


def _stale_problem(d: LayerDiagnosis, limits: Thresholds) -> Problem | None:
    if d.running_mean is None:
        return None
    fix = (
        "unfreeze it (batchnorm.unfreeze), recalibrate (batchnorm.recalibrate(model, loader)) "
        "and freeze it again"
        if d.mode == "frozen"
        else "recompute them with batchnorm.recalibrate(model, loader) on the data the model "
        "will see (training data after training; the new data after a distribution shift)"
    )
    finite = torch.isfinite(d.running_mean).all() and torch.isfinite(d.running_var).all()
    if not finite:
        bad = ~(torch.isfinite(d.running_mean) & torch.isfinite(d.running_var))
        return Problem(
            d.name,
            "stale_statistics",
            math.inf,
            f"running statistics are not finite in {int(bad.sum())} of {d.num_features} channels "
            f"({_channels(bad)}): a NaN/Inf batch reached them (torch.nn layers do not guard; "
            f"batchnorm's layers skip such batches); {fix}",
            {"nonfinite_channels": bad.nonzero().flatten().tolist()},
        )
    if d.stale_max is None or d.stale_max <= limits.stale:
        return None
    c = int(torch.where(torch.isfinite(d.stale_error), d.stale_error, 0).argmax())
    live = ~(d.dead | d.eps_dominated)
    shift = d.mean_shift[live].abs()
    ratio = d.var_ratio[live]
    bad = (d.stale_error > limits.stale) & live
    history = ""
    if d.num_batches_tracked is not None and d.momentum is not None:
        history = f" (num_batches_tracked={d.num_batches_tracked}, momentum={d.momentum})"
    message = (
        f"running statistics do not match the population of this layer's input{history}: "
        f"in {int(bad.sum())} of {d.num_features} channels the eval-mode normalized output is "
        f"off by more than {limits.stale} std (worst: channel {c}, {d.stale_max:.3g}); mean "
        f"shift up to {shift.max().item():.3g} population std, running/population variance "
        f"{ratio.min().item():.3g}..{ratio.max().item():.3g}. Fix: {fix}"
    )
    numbers = {
        "stale_max": d.stale_max,
        "stale_rms": d.stale_rms,
        "worst_channel": c,
        "max_abs_mean_shift": shift.max().item(),
        "var_ratio_min": ratio.min().item(),
        "var_ratio_max": ratio.max().item(),
        "channels": bad.nonzero().flatten().tolist(),
    }
    return Problem(d.name, "stale_statistics", d.stale_max / limits.stale, message, numbers)


def _small_batch_problem(d: LayerDiagnosis, limits: Thresholds) -> Problem | None:
    if d.mode == "frozen" or d.noise is None or d.noise <= limits.small_batch:
        return None
    m = d.values_per_channel
    factor = math.ceil((d.noise / limits.small_batch) ** 2)
    message = (
        f"batch statistics are noisy: with {m:.0f} values per channel per batch the "
        f"training-mode normalized output differs from the population-normalized one by "
        f"{d.noise:.3g} std (RMS; batch means spread by {d.spread:.3g} population std), so "
        "training normalizes differently from inference and the eval-mode model is not the "
        f"one that was trained. Fix: a batch about {factor}x larger, or statistics "
        "over more examples: batchnorm.SyncBatchNorm across devices, a larger "
        "virtual_batch_size with Ghost BN, Batch Renormalization (batchnorm.BatchRenorm2d), or "
        "fixed statistics (batchnorm.freeze) when fine-tuning with small batches. diagnose "
        "measures the batch size it is given: pass batches of the training size"
    )
    numbers = {"noise": d.noise, "spread": d.spread, "values_per_channel": m,
               "batch_factor": factor}
    return Problem(d.name, "small_batch", d.noise / limits.small_batch, message, numbers)


def _layer_problems(d: LayerDiagnosis, limits: Thresholds) -> list[Problem]:
    problems = [p for p in (_stale_problem(d, limits), _small_batch_problem(d, limits)) if p]
    dead = d.dead
    if dead is not None and dead.any():
        n = int(dead.sum())
        parts = []
        if d.dead_gamma is not None and d.dead_gamma.any():
            parts.append(
                f"|gamma| <= {limits.dead_gamma} x the largest at {_channels(d.dead_gamma)}"
            )
        if d.dead_input is not None and d.dead_input.any():
            parts.append(
                f"input variance <= {limits.dead_input:g} x eps at {_channels(d.dead_input)}"
            )
        problems.append(
            Problem(
                d.name,
                "dead_channels",
                1 + n / d.num_features,
                f"{n} of {d.num_features} channels output a constant ({'; '.join(parts)}): they "
                "carry no signal. A collapsed gamma often comes from weight decay on gamma or a "
                "too-high learning rate; a constant input from dead ReLUs or pruned filters "
                "upstream. Harmless for the train/eval gap; prune them or retrain with weight "
                "decay off for BN parameters",
                {"channels": dead.nonzero().flatten().tolist(), "count": n},
            )
        )
    if d.eps_dominated is not None and d.eps_dominated.any():
        n = int(d.eps_dominated.sum())
        v = d.population_var[d.eps_dominated]
        low = math.sqrt((v / (v + d.eps)).min().item())
        problems.append(
            Problem(
                d.name,
                "eps_dominated",
                1 + n / d.num_features,
                f"{n} of {d.num_features} channels have an input variance below eps={d.eps:g} "
                f"(smallest {v.min().item():.3g}, at {_channels(d.eps_dominated)}): BN divides "
                f"by about sqrt(eps) there, so it no longer normalizes and their output std is "
                f"as low as {low:.3g} instead of 1. Use a smaller eps (the layer's eps argument) "
                "or find why the input is so small (weights shrunk by weight decay before a "
                "scale-invariant BN, input scaling)",
                {"channels": d.eps_dominated.nonzero().flatten().tolist(), "count": n,
                 "min_var": v.min().item()},
            )
        )
    if d.num_batches_skipped:
        tracked = d.num_batches_tracked or 0
        k = d.num_batches_skipped
        problems.append(
            Problem(
                d.name,
                "skipped_batches",
                1 + k / max(k + tracked, 1),
                f"{k} training batch(es) had non-finite statistics here and were left out of the "
                f"running statistics ({tracked} were used): the guard kept the statistics "
                "finite, but NaN/Inf reached this layer in training. Look for the first layer "
                "that skips: bad input data, an overflow (fp16 without loss scaling), or a "
                "learning rate that diverges",
                {"num_batches_skipped": k, "num_batches_tracked": tracked},
            )
        )
    if d.nonfinite_batches:
        warnings.warn(
            f"diagnose: {d.nonfinite_batches} batch(es) of the data passed in gave non-finite "
            f"statistics at {d.name!r} and were left out of its measurements",
            stacklevel=3,
        )
    return problems


def _accumulated_problem(results, accumulated, gap, agreement, limits) -> Problem:
    ranked = sorted(
        (d for d in results.values() if d.stale_rms is not None), key=lambda d: -d.stale_rms
    )
    top = ", ".join(f"{d.name} ({d.stale_rms:.3g})" for d in ranked[:3])
    symptom = ""
    if gap is not None:
        symptom = f"; the model output changes by {gap:.3g} std between modes"
        if agreement is not None:
            symptom += f" and the argmax agrees on {100 * agreement:.1f}%"
    return Problem(
        "",
        "train_eval_gap",
        accumulated / limits.train_eval_gap,
        f"no single layer is over the stale threshold, but the small mismatches of many layers "
        f"add up to {accumulated:.3g} (sqrt of the sum of squared per-layer RMS errors){symptom}; "
        f"largest at {top}. Fix: batchnorm.recalibrate(model, loader)",
        {"accumulated_stale": accumulated, "output_gap": gap, "output_agreement": agreement,
         "largest": [d.name for d in ranked[:3]]},
    )


# --------------------------------------------------------------------------------------------
# monitor: Figure 1(b, c) for any model
# --------------------------------------------------------------------------------------------


POOLED_VALUES = 2048  # values behind the all-channel percentiles of one record


def _percentiles(rows: Tensor, q: Tensor) -> Tensor:
    """(P, R) percentiles of each row of ``rows`` (R, n): one sort, then the linear
    interpolation between order statistics that ``torch.quantile`` uses by default."""
    ordered = rows.sort(dim=1).values
    pos = q * (rows.shape[1] - 1)  # (P,)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    a, b = ordered[:, lo], ordered[:, hi]  # (R, P)
    return torch.lerp(a, b, (pos - lo).to(rows.dtype)).t()


class Monitor:
    """Records percentiles of layer inputs during training; made by `monitor`.

    Attributes:
        history: layer name -> list of records ``{"step": int, "percentiles": (P,) tensor,
            "per_channel": (P, C) tensor or None}``. ``percentiles`` are over every value of
            the layer's input (all channels; at most 2048 of the sampled values),
            ``per_channel`` over each channel's values (sampled to at most ``max_values`` per
            channel). Tensors stay on the input's
            device (no synchronization during training).
        percentiles: the percentiles recorded, ascending.
        step: training-mode forward passes of the model seen so far.
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 1,
        percentiles: Sequence[float] = (15, 50, 85),
        *,
        layers: Sequence[str] | None = None,
        per_channel: bool = True,
        max_values: int = 512,
        seed: int = 0,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        q = sorted(float(p) for p in percentiles)
        if not q or q[0] < 0 or q[-1] > 100:
            raise ValueError(
                f"percentiles must be a non-empty list of numbers in [0, 100], got {percentiles!r}"
            )
        if max_values < 1:
            raise ValueError(f"max_values must be a positive integer, got {max_values}")
        modules = dict(model.named_modules())
        if layers is None:
            names = [n for n, m in modules.items() if _is_bn(m)]
            if not names:
                raise ValueError(
                    f"monitor found no BN layer in {type(model).__name__}; name the modules "
                    "whose inputs to record with layers=[...]"
                )
        else:
            names = list(layers)
            missing = [n for n in names if n not in modules]
            if missing:
                raise ValueError(
                    f"monitor: no module named {missing} in {type(model).__name__}; names are "
                    f"those of model.named_modules(), e.g. {list(modules)[1:6]}"
                )
        self.model = model
        self.every = every
        self.percentiles = tuple(q)
        self.per_channel = per_channel
        self.max_values = max_values
        self.layers = names
        self.history: dict[str, list[dict]] = {n: [] for n in names}
        self.step = 0
        self._modules = {n: modules[n] for n in names}
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._handles: list = []
        self._current: int | None = None
        self._seen: set[str] = set()

    # -- hooks ---------------------------------------------------------------------------------

    def _on_model(self, module, args) -> None:
        self._seen = set()
        if module.training:
            self._current = self.step if self.step % self.every == 0 else None
            self.step += 1
        else:
            self._current = None

    def _after_model(self, module, args, output) -> None:
        self._current = None

    def _hook_for(self, name: str, axis: int):
        def hook(module, args, kwargs):
            if self._current is None or name in self._seen or not args:
                return
            x = args[0]
            if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
                return
            mask = _mask_argument(module, args, kwargs) if x.dim() >= 2 else None
            if mask is not None:
                a = axis % x.dim()
                if mask.shape != x.shape[:a] + x.shape[a + 1 :] or not mask.any():
                    return  # the layer itself refuses this mask (or this batch)
            self._seen.add(name)
            with torch.no_grad():
                self.history[name].append(self._record(x.detach(), axis, mask))

        return hook

    def _record(self, x: Tensor, axis: int, mask: Tensor | None = None) -> dict:
        q = torch.tensor(self.percentiles, dtype=torch.float32, device=x.device) / 100
        if x.dim() < 2:
            x, axis = x.reshape(-1, 1), 1
        y = x.movedim(axis, 1)
        n, c = y.shape[0], y.shape[1]
        y = y.reshape(n, c, -1)  # (N, C, S): a view for contiguous and channels-last input
        s = y.shape[2]
        # A mask (the input's shape without the channel axis, so (N, S) in y's order) keeps
        # padding out, as it keeps it out of the layer's statistics.
        where = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
        total = n * s if where is None else where.numel()
        if total > self.max_values:
            # The same random positions for every channel, drawn with the monitor's own
            # generator so that training's random stream is left untouched.
            idx = torch.randint(total, (self.max_values,), generator=self._generator(x.device),
                                device=x.device)
            idx = idx if where is None else where[idx]
            sample = y[idx // s, :, idx % s]  # (max_values, C)
        else:
            sample = y.transpose(1, 2).reshape(-1, c)  # (N * S, C)
            sample = sample if where is None else sample[where]
        sample = sample.float()
        # All channels together: at most POOLED_VALUES values (whole rows, already random).
        rows = max(1, -(-POOLED_VALUES // c)) if c else 1
        pooled = _percentiles(sample[:rows].reshape(1, -1), q)[:, 0]
        per = _percentiles(sample.t().contiguous(), q) if self.per_channel else None
        return {"step": self._current, "percentiles": pooled, "per_channel": per}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]

    # -- context -------------------------------------------------------------------------------

    def __enter__(self) -> Monitor:
        if self._handles:
            raise RuntimeError("this monitor is already active")
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._on_model))
            self._handles.append(self.model.register_forward_hook(self._after_model))
            for name, m in self._modules.items():
                self._handles.append(
                    m.register_forward_pre_hook(
                        self._hook_for(name, channel_axis(m)), with_kwargs=True
                    )
                )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (the history stays)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._current = None

    @property
    def active(self) -> bool:
        return bool(self._handles)

    # -- output --------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-ready history: {layer: [{"step", "percentiles", "per_channel"}, ...]}."""
        return {
            "every": self.every,
            "percentiles": list(self.percentiles),
            "history": {
                name: [
                    {
                        "step": r["step"],
                        "percentiles": _jsonable(r["percentiles"].cpu()),
                        "per_channel": None
                        if r["per_channel"] is None
                        else _jsonable(r["per_channel"].cpu()),
                    }
                    for r in records
                ]
                for name, records in self.history.items()
            },
        }

    def curves(self, layer: str, channel: int | None = None) -> tuple[list[int], Tensor]:
        """(steps, (S, P) percentiles) of one layer: pooled, or of one channel."""
        if layer not in self.history:
            raise KeyError(f"monitor recorded no layer {layer!r}; it has {self.layers}")
        records = self.history[layer]
        steps = [r["step"] for r in records]
        if not records:
            return steps, torch.empty(0, len(self.percentiles))
        if channel is None:
            values = torch.stack([r["percentiles"].cpu() for r in records])
        else:
            if records[0]["per_channel"] is None:
                raise ValueError("per-channel percentiles were not recorded (per_channel=False)")
            values = torch.stack([r["per_channel"][:, channel].cpu() for r in records])
        return steps, values

    def plot(self, path, layers: Sequence[str] | None = None, channel: int | None = None,
             titles: Sequence[str] | None = None) -> None:
        """Figure 1(b, c)-style panels: each chosen layer's input percentiles against the
        training step (median solid, the others dashed), over all its values or one channel.

        Args:
            path: where to save the figure (PNG, PDF, ... by extension).
            layers: the layers to draw (default: up to four, spread over the model).
            channel: draw this channel's percentiles instead of those over all channels.
            titles: one panel title per layer (default: the layer names).
        """
        plt = _pyplot()
        if layers is None:
            n = len(self.layers)
            picks = sorted({round(i * (n - 1) / 3) for i in range(4)}) if n > 4 else range(n)
            layers = [self.layers[i] for i in picks]
        layers = list(layers)
        fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), squeeze=False)
        median = min(range(len(self.percentiles)), key=lambda k: abs(self.percentiles[k] - 50))
        for k, (ax, name) in enumerate(zip(axes[0], layers)):
            steps, values = self.curves(name, channel)
            for j, pct in enumerate(self.percentiles):
                ax.plot(steps, values[:, j].tolist() if len(steps) else [], color="k",
                        lw=1.0 if j == median else 0.7, ls="-" if j == median else "--",
                        label=f"{pct:g}th percentile")
            title = titles[k] if titles is not None else (name or "(root)")
            if channel is not None:
                title += f", channel {channel}"
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("training step")
            ax.set_ylabel("layer input")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def save(self, path) -> None:
        """Write `to_dict` as JSON."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)


def monitor(
    model: nn.Module,
    every: int = 1,
    percentiles: Sequence[float] = (15, 50, 85),
    *,
    layers: Sequence[str] | None = None,
    per_channel: bool = True,
    max_values: int = 512,
    seed: int = 0,
) -> Monitor:
    """Record the percentiles of BN layer inputs during training: Figure 1(b, c) for any model.

    Use as a context manager; forward hooks are registered on entry and removed on exit, also
    when the block raises. Every training-mode forward pass of ``model`` counts one step (0, 1,
    2, ...); at steps divisible by ``every`` each watched layer's input (its first call in that
    pass) is summarized by the given percentiles over all its channels together, and per
    channel; a layer called with a ``mask`` (ours) is summarized over the positions it selects,
    as its statistics are (finding them reads the mask back: one host synchronization per record
    on accelerators, as the masked layer itself has). Eval-mode passes are neither counted nor
    recorded. Inputs with more than ``max_values`` values per channel are sampled at
    ``max_values`` random positions (the monitor's own random generator, so training's random
    stream is untouched), and the all-channel percentiles use at most 2048 of the sampled
    values; the percentiles are then estimates (the standard error of a median is about 1.25 std
    / sqrt(n): 5.5% of a std per channel at 512 values, 2.8% for all channels at 2048). The cost
    is measured in docs/diagnose.md; it is one sort of C x max_values values per watched layer
    and record.

    Args:
        model: the model being trained.
        every: record every ``every`` training steps.
        percentiles: which percentiles (0-100); Figure 1 shows 15, 50 and 85.
        layers: qualified names of the modules whose input to record (default: every BN
            layer). Any module works, so a network without BN can be watched too
            (Figure 1(b): the input of a sigmoid).
        per_channel: also record the percentiles of each channel.
        max_values: values per channel kept for the percentiles (the cost grows with it).
        seed: seed of the monitor's sampling generator.

    Returns:
        A `Monitor`: ``mon.history[layer]`` lists ``{"step", "percentiles", "per_channel"}``
        records; ``mon.plot(path)`` draws Figure 1(b, c)-style panels.

    Example:
        >>> import batchnorm
        >>> net = nn.Sequential(nn.Linear(4, 8), batchnorm.BatchNorm1d(8), nn.Sigmoid())
        >>> with batchnorm.monitor(net, every=2) as mon:
        ...     for _ in range(5):
        ...         net(torch.randn(16, 4)).sum().backward()
        >>> [r["step"] for r in mon.history["1"]]
        [0, 2, 4]
    """
    return Monitor(
        model,
        every,
        percentiles,
        layers=layers,
        per_channel=per_channel,
        max_values=max_values,
        seed=seed,
    )
