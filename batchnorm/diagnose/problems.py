"""The problems `diagnose` reports and its advice (Sec. 3.1, Algorithm 2): the rules as a table.

Each kind of problem is one `Rule`: when it is reported, what it is ranked by, and its
message, a ``str.format`` template over the problem's ``numbers`` and a few words chosen by
the rule (`TEXT`). The functions below measure nothing: each reads a `LayerDiagnosis`
(`batchnorm.diagnose.measure` filled it), compares it with the `Thresholds` and fills its
rule's message in: `layer_problems` for one layer, `accumulated_problem` for the model.
docs/diagnose.md says why each threshold has its value.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from batchnorm.diagnose.report import LayerDiagnosis, Problem, Thresholds


@dataclass(frozen=True)
class Rule:
    """One kind of problem.

    Attributes:
        kind: `Problem.kind`.
        when: the condition, in words of `LayerDiagnosis` and `Thresholds` fields.
        severity: the number problems are ranked by (1 is the edge).
        message: `Problem.message`, a ``str.format`` template over the problem's ``numbers``
            and the words the rule chooses.
    """

    kind: str
    when: str
    severity: str
    message: str


RULES = {rule.kind: rule for rule in (
    Rule(
        "stale_statistics",
        "stale_max > Thresholds.stale, or running statistics not finite (message: TEXT's "
        "'nonfinite')",
        "stale_max / Thresholds.stale; inf for non-finite running statistics",
        "running statistics do not match the population of this layer's input{history}: "
        "in {count} of {num_features} channels the eval-mode normalized output is "
        "off by more than {stale} std (worst: channel {worst_channel}, {stale_max:.3g}); mean "
        "shift up to {max_abs_mean_shift:.3g} population std, running/population variance "
        "{var_ratio_min:.3g}..{var_ratio_max:.3g}. Fix: {fix}",
    ),
    Rule(
        "train_eval_gap",
        "no stale_statistics or small_batch problem, and accumulated_stale (sqrt of the sum "
        "of the layers' stale_rms^2) > Thresholds.train_eval_gap",
        "accumulated_stale / Thresholds.train_eval_gap",
        "no single layer is over the stale threshold, but the small mismatches of many layers "
        "add up to {accumulated_stale:.3g} (sqrt of the sum of squared per-layer RMS errors)"
        "{symptom}; largest at {top}. Fix: batchnorm.recalibrate(model, loader)",
    ),
    Rule(
        "small_batch",
        "not frozen and noise > Thresholds.small_batch",
        "noise / Thresholds.small_batch",
        "batch statistics are noisy: with {values_per_channel:.0f} values per channel per batch "
        "the training-mode normalized output differs from the population-normalized one by "
        "{noise:.3g} std (RMS; batch means spread by {spread:.3g} population std), so "
        "training normalizes differently from inference and the eval-mode model is not the "
        "one that was trained. Fix: a batch about {batch_factor}x larger, or statistics "
        "over more examples: batchnorm.SyncBatchNorm across devices, a larger "
        "virtual_batch_size with Ghost BN, Batch Renormalization (batchnorm.BatchRenorm2d), or "
        "fixed statistics (batchnorm.freeze) when fine-tuning with small batches. diagnose "
        "measures the batch size it is given: pass batches of the training size",
    ),
    Rule(
        "dead_channels",
        "some channel has dead_gamma (|gamma_c| <= Thresholds.dead_gamma x max |gamma|) or "
        "dead_input (input variance <= Thresholds.dead_input x eps)",
        "1 + the share of dead channels",
        "{count} of {num_features} channels output a constant ({causes}): they "
        "carry no signal. A collapsed gamma often comes from weight decay on gamma or a "
        "too-high learning rate; a constant input from dead ReLUs or pruned filters "
        "upstream. Harmless for the train/eval gap; prune them or retrain with weight "
        "decay off for BN parameters",
    ),
    Rule(
        "eps_dominated",
        "some live channel has input variance < Thresholds.eps_dominated x eps",
        "1 + the share of eps-dominated channels",
        "{count} of {num_features} channels have an input variance below eps={eps:g} "
        "(smallest {min_var:.3g}, at {where}): BN divides "
        "by about sqrt(eps) there, so it no longer normalizes and their output std is "
        "as low as {low:.3g} instead of 1. Use a smaller eps (the layer's eps argument) "
        "or find why the input is so small (weights shrunk by weight decay before a "
        "scale-invariant BN, input scaling)",
    ),
    Rule(
        "skipped_batches",
        "num_batches_skipped > 0 (ours only)",
        "1 + the share of skipped training batches",
        "{num_batches_skipped} training batch(es) had non-finite statistics here and were left "
        "out of the running statistics ({num_batches_tracked} were used): the guard kept the "
        "statistics finite, but NaN/Inf reached this layer in training. Look for the first "
        "layer that skips: bad input data, an overflow (fp16 without loss scaling), or a "
        "learning rate that diverges",
    ),
)}

# The kinds of problem, in the order of the table.
KINDS = tuple(RULES)

# The words the rules choose between: the fix for stale statistics, the non-finite variant of
# its message, and the parts of the other messages that appear only sometimes.
TEXT = {
    "fix_batch": "recompute them with batchnorm.recalibrate(model, loader) on the data the "
    "model will see (training data after training; the new data after a distribution shift)",
    "fix_frozen": "unfreeze it (batchnorm.unfreeze), recalibrate (batchnorm.recalibrate(model, "
    "loader)) and freeze it again",
    "nonfinite": "running statistics are not finite in {count} of {num_features} channels "
    "({where}): a NaN/Inf batch reached them (torch.nn layers do not guard; batchnorm's "
    "layers skip such batches); {fix}",
    "history": " (num_batches_tracked={num_batches_tracked}, momentum={momentum})",
    "dead_gamma": "|gamma| <= {dead_gamma} x the largest at {where}",
    "dead_input": "input variance <= {dead_input:g} x eps at {where}",
    "symptom": "; the model output changes by {output_gap:.3g} std between modes",
    "agreement": " and the argmax agrees on {percent:.1f}%",
}


def _problem(kind: str, layer: str, severity: float, numbers: dict, **words) -> Problem:
    """A `Problem` of ``kind`` with its rule's message filled in from ``numbers`` and ``words``."""
    return Problem(layer, kind, severity, RULES[kind].message.format_map({**numbers, **words}),
                   numbers)


def _channels(mask: Tensor, limit: int = 8) -> str:
    idx = mask.nonzero().flatten().tolist()
    text = ", ".join(str(i) for i in idx[:limit])
    return text + (f", ... ({len(idx)} in all)" if len(idx) > limit else "")


def _stale_problem(d: LayerDiagnosis, limits: Thresholds) -> Problem | None:
    if d.running_mean is None:
        return None
    fix = TEXT["fix_frozen"] if d.mode == "frozen" else TEXT["fix_batch"]
    finite = torch.isfinite(d.running_mean).all() and torch.isfinite(d.running_var).all()
    if not finite:
        bad = ~(torch.isfinite(d.running_mean) & torch.isfinite(d.running_var))
        return Problem(
            d.name,
            "stale_statistics",
            math.inf,
            TEXT["nonfinite"].format(count=int(bad.sum()), num_features=d.num_features,
                                     where=_channels(bad), fix=fix),
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
        history = TEXT["history"].format(num_batches_tracked=d.num_batches_tracked,
                                         momentum=d.momentum)
    numbers = {
        "stale_max": d.stale_max,
        "stale_rms": d.stale_rms,
        "worst_channel": c,
        "max_abs_mean_shift": shift.max().item(),
        "var_ratio_min": ratio.min().item(),
        "var_ratio_max": ratio.max().item(),
        "channels": bad.nonzero().flatten().tolist(),
    }
    return _problem("stale_statistics", d.name, d.stale_max / limits.stale, numbers,
                    history=history, count=int(bad.sum()), num_features=d.num_features,
                    stale=limits.stale, fix=fix)


def _small_batch_problem(d: LayerDiagnosis, limits: Thresholds) -> Problem | None:
    if d.mode == "frozen" or d.noise is None or d.noise <= limits.small_batch:
        return None
    m = d.values_per_channel
    factor = math.ceil((d.noise / limits.small_batch) ** 2)
    numbers = {"noise": d.noise, "spread": d.spread, "values_per_channel": m,
               "batch_factor": factor}
    return _problem("small_batch", d.name, d.noise / limits.small_batch, numbers)


def layer_problems(d: LayerDiagnosis, limits: Thresholds) -> list[Problem]:
    problems = [p for p in (_stale_problem(d, limits), _small_batch_problem(d, limits)) if p]
    dead = d.dead
    if dead is not None and dead.any():
        n = int(dead.sum())
        parts = []
        if d.dead_gamma is not None and d.dead_gamma.any():
            parts.append(TEXT["dead_gamma"].format(dead_gamma=limits.dead_gamma,
                                                   where=_channels(d.dead_gamma)))
        if d.dead_input is not None and d.dead_input.any():
            parts.append(TEXT["dead_input"].format(dead_input=limits.dead_input,
                                                   where=_channels(d.dead_input)))
        problems.append(
            _problem(
                "dead_channels",
                d.name,
                1 + n / d.num_features,
                {"channels": dead.nonzero().flatten().tolist(), "count": n},
                num_features=d.num_features,
                causes="; ".join(parts),
            )
        )
    if d.eps_dominated is not None and d.eps_dominated.any():
        n = int(d.eps_dominated.sum())
        v = d.population_var[d.eps_dominated]
        low = math.sqrt((v / (v + d.eps)).min().item())
        problems.append(
            _problem(
                "eps_dominated",
                d.name,
                1 + n / d.num_features,
                {"channels": d.eps_dominated.nonzero().flatten().tolist(), "count": n,
                 "min_var": v.min().item()},
                num_features=d.num_features,
                eps=d.eps,
                where=_channels(d.eps_dominated),
                low=low,
            )
        )
    if d.num_batches_skipped:
        tracked = d.num_batches_tracked or 0
        k = d.num_batches_skipped
        problems.append(
            _problem(
                "skipped_batches",
                d.name,
                1 + k / max(k + tracked, 1),
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


def accumulated_problem(results, accumulated, gap, agreement, limits) -> Problem:
    ranked = sorted(
        (d for d in results.values() if d.stale_rms is not None), key=lambda d: -d.stale_rms
    )
    top = ", ".join(f"{d.name} ({d.stale_rms:.3g})" for d in ranked[:3])
    symptom = ""
    if gap is not None:
        symptom = TEXT["symptom"].format(output_gap=gap)
        if agreement is not None:
            symptom += TEXT["agreement"].format(percent=100 * agreement)
    return _problem(
        "train_eval_gap",
        "",
        accumulated / limits.train_eval_gap,
        {"accumulated_stale": accumulated, "output_gap": gap, "output_agreement": agreement,
         "largest": [d.name for d in ranked[:3]]},
        symptom=symptom,
        top=top,
    )
