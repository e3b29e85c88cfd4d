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

One module per concern, imports flowing one way (report <- problems <- measure <- monitor):

- `measure`: the statistics pass and the per-layer measurements (`diagnose`);
- `problems`: the rules, as a table of kind -> condition, severity and advice (`KINDS`);
- `report`: what `diagnose` returns (`Thresholds`, `Problem`, `LayerDiagnosis`,
  `DiagnosisReport`) and its table, JSON and plot;
- `monitor`: `monitor` and `Monitor`.
"""

from batchnorm.diagnose.measure import diagnose
from batchnorm.diagnose.monitor import POOLED_VALUES as POOLED_VALUES  # the old module's names
from batchnorm.diagnose.monitor import Monitor, monitor
from batchnorm.diagnose.problems import KINDS as KINDS
from batchnorm.diagnose.report import DiagnosisReport, LayerDiagnosis, Problem, Thresholds

__all__ = [
    "diagnose",
    "DiagnosisReport",
    "LayerDiagnosis",
    "Problem",
    "Thresholds",
    "monitor",
    "Monitor",
]
