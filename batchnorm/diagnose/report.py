"""What `diagnose` returns (Sec. 3.1): thresholds, problems, per-layer results; table, JSON, plot.

`Thresholds` (when a problem is reported), `Problem` (one finding), `LayerDiagnosis` (what
was measured at one BN layer) and `DiagnosisReport` (all of it, with its three outputs:
``str(report)``, a table; ``report.to_dict()``, JSON-ready; ``report.plot(path)``). The
helpers at the end (number formatting; `pyplot` on demand and `jsonable`, which `monitor`
uses too) make the three outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

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
        return {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}


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
            "output_gap": jsonable(self.output_gap),
            "output_agreement": jsonable(self.output_agreement),
            "accumulated_stale": jsonable(self.accumulated_stale),
            "thresholds": {f.name: getattr(self.thresholds, f.name) for f in fields(Thresholds)},
            "problems": [
                {
                    "layer": p.layer,
                    "kind": p.kind,
                    "severity": jsonable(p.severity),
                    "message": p.message,
                    "numbers": jsonable(p.numbers),
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
        plt = pyplot()
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


def pyplot():
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


def jsonable(v):
    if isinstance(v, Tensor):
        return jsonable(v.tolist())
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v
