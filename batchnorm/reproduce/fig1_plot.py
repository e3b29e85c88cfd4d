"""Figure 1 (Sec. 4.1): the three panels (a, b, c) of a run's summary as fig1.png."""

from __future__ import annotations

from pathlib import Path

from batchnorm.reproduce.atomic import save_figure
from batchnorm.reproduce.fig1_config import Fig1Config
from batchnorm.reproduce.fig1_report import curve

__all__ = ["plot"]


def plot(summary: dict, config: Fig1Config, path: Path) -> None:
    """fig1.png: (a) test accuracy, (b) without BN and (c) with BN sigmoid-input percentiles.

    Lines are seed means; bands span the seeds' min..max when there is more than one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    for name, color, label in (
        ("baseline", "tab:blue", "Without BN"),
        ("bn", "tab:red", "With BN"),
    ):
        steps, acc = curve(summary[name], "test_accuracy")
        ax.plot(steps, acc[..., 0].mean(0), color=color, label=label, lw=1.2)
        if acc.shape[0] > 1:
            ax.fill_between(steps, acc[..., 0].min(0), acc[..., 0].max(0), color=color, alpha=0.2)
    ax.set_ylim(0.7, 1.0)
    ax.set_xlabel("training step")
    ax.set_title("(a) test accuracy")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    for ax, name, title in (
        (axes[1], "baseline", "(b) without BN"),
        (axes[2], "bn", "(c) with BN"),
    ):
        steps, p = curve(summary[name], "percentiles")
        for k, pct in enumerate((15, 50, 85)):
            ax.plot(
                steps,
                p[..., k].mean(0),
                color="k",
                lw=1.0 if k == 1 else 0.7,
                ls="-" if k == 1 else "--",
                label=f"{pct}th percentile",
            )
            if p.shape[0] > 1:
                ax.fill_between(steps, p[..., k].min(0), p[..., k].max(0), color="k", alpha=0.12)
        ax.set_xlabel("training step")
        ax.set_title(title)
        ax.set_ylabel(f"input to sigmoid {config.unit} of the last hidden layer", fontsize=8)
        ax.grid(alpha=0.3)
    lo = min(axes[1].get_ylim()[0], axes[2].get_ylim()[0], -2)
    hi = max(axes[1].get_ylim()[1], axes[2].get_ylim()[1], 2)
    for ax in axes[1:]:
        ax.set_ylim(lo, hi)
    axes[2].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    save_figure(path, fig, dpi=120)
    plt.close(fig)

