"""batchnorm: Batch Normalization (Ioffe & Szegedy 2015) for PyTorch.

Algorithm 1 lives in `batchnorm.functional`, the layers in `batchnorm.modules`, Algorithm 2's
inference side (recalibration, freezing, folding, conversion) in `batchnorm.inference`.
"""

from batchnorm import functional
from batchnorm.diagnose import diagnose, monitor
from batchnorm.distributed import SyncBatchNorm
from batchnorm.fused import (
    BatchNormAct,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    FrozenBatchNormAct,
)
from batchnorm.inference import (
    FoldReport,
    FrozenBatchNorm,
    FuseReport,
    convert,
    fold,
    freeze,
    fuse_activations,
    recalibrate,
    unfreeze,
)
from batchnorm.modules import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
)
from batchnorm.parallel import sync_buffers
from batchnorm.training import Accumulation, accumulate, checkpoint_safe, ema_update

__version__ = "0.1.0"

__all__ = ["functional", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"]
__all__ += ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]
__all__ += ["recalibrate", "FrozenBatchNorm", "freeze", "unfreeze", "fold", "FoldReport", "convert"]
__all__ += ["diagnose", "monitor"]
__all__ += ["sync_buffers"]
__all__ += ["BatchNormAct", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]
__all__ += ["FrozenBatchNormAct", "fuse_activations", "FuseReport"]
__all__ += ["accumulate", "Accumulation", "checkpoint_safe", "ema_update"]
