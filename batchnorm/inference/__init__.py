"""Algorithm 2 (Sec. 3.1), the inference side: one module per verb, for ours and torch.nn's BN.

- `recalibrate` (recalibrate.py): population statistics with the weights frozen (step 2).
- population.py: the population estimators and the statistics pass behind `recalibrate`,
  shared with `batchnorm.diagnose`.
- `freeze`, `unfreeze` (frozen.py): every BN of a model as the fixed inference map, the layer
  `FrozenBatchNorm` (which lives with the layers, in `batchnorm.frozen`), and back.
- `fold`, `FoldReport` (fold.py): each fixed BN merged into the adjacent linear layer (step 3),
  with the neighbours found by graph.py.
- `fuse_activations`, `FuseReport` (fuse.py): each BN -> activation pair made one fused layer
  (`batchnorm.fused`), with the same neighbours and the same check of a BN's call as `fold`.
- `convert` (convert.py): torch.nn's BN layers <-> ours.

Every pass rebuilds layers through `batchnorm.swap`, the one way to rebuild a BN layer as
another class (below the passes, beside the layers, so the layers use it too).

Statistical conventions (biased sigma2_B, unbiased running_var, where eps goes) are stated
once in `batchnorm.functional`; nothing here redefines them.
"""

from batchnorm.inference.convert import convert
from batchnorm.inference.fold import FoldReport, fold
from batchnorm.inference.frozen import FrozenBatchNorm, freeze, unfreeze
from batchnorm.inference.fuse import FuseReport, fuse_activations
from batchnorm.inference.recalibrate import recalibrate

__all__ = ["recalibrate", "FrozenBatchNorm", "freeze", "unfreeze", "fold", "FoldReport", "convert"]
__all__ += ["fuse_activations", "FuseReport"]
