"""Figure 2/3's tables, goals and report.md from the measured curves of a `fig2` run."""

from __future__ import annotations

import math

from batchnorm.reproduce.recipes import PAPER_FIGURE3

__all__ = ["speedup_table", "goals", "summarize", "report", "standard_error"]

_PAPER_BASE_STEPS = PAPER_FIGURE3["inception"][0]  # 31.0M steps: Inception to 72.2%
SIGMOID_POINTS = 0.03  # "within a few points" of Inception's max, fixed before the runs
NEAR_CHANCE = 0.15  # 10 classes: chance 10%, "near chance" = below 15%


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` images."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n) if n else float("nan")


def _first_step_reaching(curve: list, target: float) -> int | None:
    return next((int(s) for s, a in curve if a >= target), None)


def speedup_table(results: dict[str, dict], base: str, keys: list[str], n_val: int) -> dict:
    """Figure 3 from measured curves: steps to reach ``base``'s max, max, speed-up.

    The target is the maximum validation accuracy of ``base``; a run's speed-up is
    ``base``'s steps to that maximum divided by its own (None if it never gets there).
    """
    if base not in results or not results[base]["curve"]:
        return {"base": base, "target": None, "target_steps": None, "rows": {}}
    target = max(a for _, a in results[base]["curve"])
    base_steps = _first_step_reaching(results[base]["curve"], target)
    rows = {}
    for key in keys:
        r = results[key]
        curve = r["curve"]
        best = max((a for _, a in curve), default=float("nan"))
        steps = _first_step_reaching(curve, target)
        paper = PAPER_FIGURE3.get(key)
        rows[key] = {
            "name": r["name"],
            "steps_to_target": steps,
            "max_accuracy": best,
            "max_se": standard_error(best, n_val),
            "max_at_step": next((int(s) for s, a in curve if a == best), None),
            "final_accuracy": curve[-1][1] if curve else None,
            "speedup": base_steps / steps if steps else None,
            "failure": r.get("failure"),
            "paper_steps_to_target": paper[0] if paper else None,
            "paper_max_accuracy": paper[1] if paper else None,
            "paper_speedup": _PAPER_BASE_STEPS / paper[0] if paper and paper[0] else None,
        }
    return {"base": base, "target": target, "target_steps": base_steps, "rows": rows}


def _goal(goal: str, measured: str, met: bool | None) -> dict:
    return {"goal": goal, "measured": measured, "met": met}


def _pct(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}%"


def goals(table: dict, contrast: dict) -> list[dict]:
    """The issue's goals, each with what was measured and whether it is met."""
    rows, target, out = table["rows"], table["target"], []
    if target is None:
        return out
    if "bn_x5" in rows:
        s = rows["bn_x5"]["speedup"]
        out.append(_goal("BN-x5 reaches Inception's max >= 5x sooner",
                         "never reaches it" if s is None else f"{s:.1f}x", bool(s and s >= 5)))
    if "bn_x30" in rows:
        r = rows["bn_x30"]
        finals = {k: v["final_accuracy"] or 0.0 for k, v in rows.items()}
        best = max(finals, key=finals.get)
        out.append(_goal(
            "BN-x30 reaches Inception's max and has the best final accuracy",
            f"reaches it: {'yes' if r['steps_to_target'] else 'no'}; final "
            f"{_pct(r['final_accuracy'])}, best final: {rows[best]['name']} "
            f"({_pct(finals[best])})",
            bool(r["steps_to_target"]) and best == "bn_x30",
        ))  # fmt: skip
    if "inception_x5" in rows:
        r = rows["inception_x5"]
        f = r["failure"]
        out.append(_goal(
            "Inception-x5 diverges or stalls",
            f"{f['kind']} at step {f['step']}" if f else
            f"no divergence or stall; final {_pct(r['final_accuracy'])}",
            bool(f) or (r["final_accuracy"] or 0) < NEAR_CHANCE,
        ))  # fmt: skip
    if "inception_sigmoid" in rows:
        r = rows["inception_sigmoid"]
        out.append(_goal(f"Inception-Sigmoid stays near chance (max < {_pct(NEAR_CHANCE)})",
                         f"max {_pct(r['max_accuracy'])}", r["max_accuracy"] < NEAR_CHANCE))
    if "bn_x5_sigmoid" in rows:
        r = rows["bn_x5_sigmoid"]
        gap = target - r["max_accuracy"]
        out.append(_goal(
            f"BN-x5-Sigmoid within {100 * SIGMOID_POINTS:.0f} points of Inception's max",
            f"max {_pct(r['max_accuracy'])} vs {_pct(target)} ({100 * abs(gap):.1f} points "
            f"{'below' if gap > 0 else 'above'})",
            gap <= SIGMOID_POINTS,
        ))  # fmt: skip
    for t in (table, contrast):
        if t.get("target") is None:
            continue
        base = t["base"]  # "inception" or "inception@<init>": BN-Baseline with the same init
        bn = "bn_baseline" + base[len("inception"):]
        if bn in t["rows"]:
            s = t["rows"][bn]["speedup"]
            out.append(_goal(
                f"BN-Baseline vs {t['rows'][base]['name']} (reported either way)",
                f"target {_pct(t['target'])} at step {t['target_steps']}; BN-Baseline "
                + ("never reaches it" if s is None else f"{s:.1f}x"), None,
            ))  # fmt: skip
    return out


def summarize(cfg, sweep: dict, results: dict, source: str, n_train: int, n_val: int) -> dict:
    """summary.json: data, sweep and eta0, every curve, the tables, goals, times."""
    main = [k for k in results if "@" not in k]
    contrast_keys = [k for k in results if "@" in k]
    table = speedup_table(results, "inception", main, n_val)
    contrast_base = f"inception@{cfg.contrast_init}"
    contrast = speedup_table(results, contrast_base, contrast_keys, n_val)
    sweep_seconds = sum(r["seconds"] for r in sweep.get("runs", {}).values())
    return {
        "data": {"name": cfg.dataset, "source": source, "train": n_train, "validation": n_val},
        "eta0": sweep["eta0"],
        "sweep": sweep,
        "variants": results,
        "figure3": table,
        "init_contrast": contrast,
        "goals": goals(table, contrast),
        "seconds": sweep_seconds + sum(r["seconds"] for r in results.values()),
        "seconds_sweep": sweep_seconds,
    }


def _fmt(value, kind: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "acc":
        return f"{100 * value:.1f}%"
    if kind == "x":
        return f"{value:.1f}x"
    if kind == "M":
        return f"{value / 1e6:.1f}M"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _stopped(failure: dict | None) -> str:
    return f"{failure['kind']} (step {failure['step']})" if failure else "-"


def _table_lines(table: dict, paper: bool) -> list[str]:
    head = "| model | steps to target | max ± s.e. (at step) | final | speed-up | stopped |"
    rule = "|---|---|---|---|---|---|"
    if paper:
        head += " paper: steps | paper: max | paper: speed-up |"
        rule += "---|---|---|"
    lines = [head, rule]
    for row in table["rows"].values():
        line = (
            f"| {row['name']} | {_fmt(row['steps_to_target'])} | "
            f"{_fmt(row['max_accuracy'], 'acc')} ± {100 * row['max_se']:.1f} "
            f"({_fmt(row['max_at_step'])}) | {_fmt(row['final_accuracy'], 'acc')} | "
            f"{_fmt(row['speedup'], 'x')} | {_stopped(row['failure'])} |"
        )
        if paper:
            line += (
                f" {_fmt(row['paper_steps_to_target'], 'M')} | "
                f"{_fmt(row['paper_max_accuracy'], 'acc')} | {_fmt(row['paper_speedup'], 'x')} |"
            )
        lines.append(line)
    return lines


def report(cfg, summary: dict) -> str:
    """report.md: settings, the sweep and eta0, Figure 3 next to the paper's, goals, timings."""
    sweep, table, contrast = summary["sweep"], summary["figure3"], summary["init_contrast"]
    d = summary["data"]
    lines = [
        "# Figure 2/3 at CPU scale",
        "",
        f"Data: {d['name']} ({d['source']}), {d['train']:,} training images; validation: the "
        f"first {d['validation']:,} test images (one standard error: about "
        f"{100 * standard_error(0.85, d['validation']):.1f} points at 85%). Model: "
        f"BN-Inception (every Figure 5 module), width {cfg.width}, small stem stride "
        f"{cfg.small_stem_stride}, {summary['parameters']:,} parameters with BN; init "
        f"{cfg.init}. {cfg.steps} steps of mini-batch 32 per recipe. Training time "
        f"{summary['seconds'] / 60:.1f} min (sweep {summary['seconds_sweep'] / 60:.1f} min; "
        "all sessions).",
        "",
        "## Learning rate",
        "",
    ]
    if sweep.get("runs"):
        lines += [
            f"Stage 1 trained Inception (no BN) for {sweep['steps']} steps at each rate of "
            f"the grid, constant lr. Rule, fixed before the runs: a rate *trains* when it "
            f"neither diverges nor stalls and its final accuracy is at least "
            f"{_fmt(sweep['threshold'], 'acc')} (half-way from chance to the sweep's best); "
            "eta0 is the largest rate that trains and whose 5x (two grid places up) does not.",
            "",
            "| lr | final accuracy | stopped | trains |",
            "|---|---|---|---|",
        ]
        for lr, r in sweep["runs"].items():
            acc = r["curve"][-1][1] if r["curve"] else None
            lines.append(
                f"| {float(lr):g} | {_fmt(acc, 'acc')} | "
                f"{_stopped(r['failure'])} | "
                f"{'yes' if sweep['trains'][lr] else 'no'} |"
            )
        lines.append("")
    lines += [
        f"**eta0 = {summary['eta0']:g}** ({sweep['reason']}); every recipe's rate is its "
        "paper multiple of eta0 (BN-x5 and Inception-x5: 5 eta0, BN-x30: 30 eta0).",
        "",
        "## Figure 3",
        "",
    ]
    if table["target"] is not None:
        lines += [
            f"Target: Inception's maximum validation accuracy, {_fmt(table['target'], 'acc')}, "
            f"first reached at step {table['target_steps']} (the paper: 72.2% after 31.0M).",
            "",
            *_table_lines(table, paper=True),
            "",
        ]
    if contrast["target"] is not None:
        lines += [
            f"Initialization contrast ({cfg.contrast_init} init): target "
            f"{_fmt(contrast['target'], 'acc')}, Inception's max with that init, first "
            f"reached at step {contrast['target_steps']}.",
            "",
            *_table_lines(contrast, paper=False),
            "",
        ]
    if summary["goals"]:
        lines += ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
        for g in summary["goals"]:
            met = {True: "yes", False: "no", None: "-"}[g["met"]]
            lines.append(f"| {g['goal']} | {g['measured']} | {met} |")
        lines.append("")
    lines += ["## Time", "", "| run | steps | s/step | wall |", "|---|---|---|---|"]
    for r in [*sweep.get("runs", {}).values(), *summary["variants"].values()]:
        lines.append(f"| {r['name']} | {r['steps_done']} | {r['seconds_per_step']:.3f} | "
                     f"{r['seconds'] / 60:.1f} min |")  # fmt: skip
    lines += ["", "![Figure 2](fig2.png)", ""]
    return "\n".join(lines)
