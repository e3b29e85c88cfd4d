"""fig2.png: validation accuracy vs steps (Figure 2), the initialization contrast, the sweep."""

from __future__ import annotations

import os
from pathlib import Path

from batchnorm.reproduce.atomic import save_figure

__all__ = ["plot"]


def _curves(ax, variants: dict, keys: list[str], target: float | None, title: str) -> None:
    for key in keys:
        r = variants[key]
        if not r["curve"]:
            continue
        steps, acc = zip(*r["curve"])
        style = "--" if key.startswith("inception") else "-"
        (line,) = ax.plot(steps, acc, style, label=r["name"], linewidth=1.4)
        if r.get("failure"):  # stopped early: mark where
            ax.plot(steps[-1], acc[-1], "x", color=line.get_color(), markersize=9)
    if target is not None:
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("training steps (mini-batch 32)")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)


def plot(summary: dict, path: str | os.PathLike) -> None:
    """Write the three panels of a fig2 run's summary to ``path`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    variants = summary["variants"]
    main = [k for k in variants if "@" not in k]
    contrast = [k for k in variants if k.split("@")[0] in ("inception", "bn_baseline")]
    sweep = summary["sweep"]
    panels = 2 + bool(sweep.get("runs"))
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.3))
    _curves(axes[0], variants, main, summary["figure3"]["target"],
            "Figure 2 at CPU scale (x: stopped early)")  # fmt: skip
    _curves(axes[1], variants, contrast, None, "BN-Baseline vs Inception, both inits")
    if sweep.get("runs"):
        ax = axes[2]
        rates = [float(lr) for lr in sweep["runs"]]
        acc = [r["curve"][-1][1] if r["curve"] else 0.1 for r in sweep["runs"].values()]
        ax.semilogx(rates, acc, "o-", color="black")
        for lr, a, r in zip(rates, acc, sweep["runs"].values()):
            if r.get("failure"):
                ax.plot(lr, a, "x", color="red", markersize=10)
        eta0 = sweep["eta0"]
        ax.axvline(eta0, color="tab:blue", linestyle="--", label=f"eta0 = {eta0:g}")
        ax.axhline(sweep["threshold"], color="grey", linestyle=":", label="trains above")
        ax.set_xlabel("learning rate (Inception, no BN)")
        ax.set_ylabel(f"validation accuracy after {sweep['steps']} steps")
        ax.set_ylim(0, 1)
        ax.set_title("Stage 1: the sweep that sets eta0 (x: stopped)", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(path, fig, dpi=110)
    plt.close(fig)
