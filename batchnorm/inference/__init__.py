"""Algorithm 2 (Sec. 3.1), the inference side: one module per verb, for ours and torch.nn's BN.

- `recalibrate` (recalibrate.py): population statistics with the weights frozen (step 2).
- population.py: the population estimators and the statistics pass behind `recalibrate`,
  shared with `batchnorm.diagnose`.
- `FrozenBatchNorm`, `freeze`, `unfreeze` (frozen.py): the fixed inference map as a layer.
- `fold`, `FoldReport` (fold.py): each fixed BN merged into the adjacent linear layer (step 3),
  with the neighbours found by graph.py.
- `convert` (convert.py): torch.nn's BN layers <-> ours.
- swap.py: the one way to rebuild a BN layer as another class, used by all of the above and
  by `SyncBatchNorm.convert_sync_batchnorm`.

Statistical conventions (biased sigma2_B, unbiased running_var, where eps goes) are stated
once in `batchnorm.functional`; nothing here redefines them.
"""

from batchnorm.inference.convert import convert
from batchnorm.inference.fold import FoldReport, fold
from batchnorm.inference.frozen import FrozenBatchNorm, freeze, unfreeze
from batchnorm.inference.recalibrate import recalibrate

__all__ = ["recalibrate", "FrozenBatchNorm", "freeze", "unfreeze", "fold", "FoldReport", "convert"]
