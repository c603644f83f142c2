"""sparseinv: fast inversion of Vision Transformers into synthetic training data.

Sparse Model Inversion (Hu et al., ICML 2024): while inverting, stop optimising the
patches the model does not attend to and drop them from the token sequence.
"""

from typing import TYPE_CHECKING

from sparseinv._lazy import lazy_exports

if TYPE_CHECKING:
    from sparseinv.distill import DistillConfig, distill, kd_loss
    from sparseinv.errors import UsageError
    from sparseinv.inversion import BatchResult, InversionConfig, invert_batch
    from sparseinv.inversion.losses import InversionLoss, LossInputs
    from sparseinv.models import ViTInfo, load_model, vit_info
    from sparseinv.pool import Pool, read_pool
    from sparseinv.quant import QuantConfig, calibrate, calibration_batches, load_quantized, quantize_, save_quantized
    from sparseinv.runs.inversion import InversionResult, invert
    from sparseinv.inversion.schedule import PruneSchedule
    from sparseinv.vit.forward import SparseOutput, sparse_forward

_EXPORTS = {
    "DistillConfig": "sparseinv.distill",
    "distill": "sparseinv.distill",
    "kd_loss": "sparseinv.distill",
    "UsageError": "sparseinv.errors",
    "BatchResult": "sparseinv.inversion",
    "InversionConfig": "sparseinv.inversion",
    "InversionResult": "sparseinv.runs.inversion",
    "invert": "sparseinv.runs.inversion",
    "invert_batch": "sparseinv.inversion",
    "InversionLoss": "sparseinv.inversion.losses",
    "LossInputs": "sparseinv.inversion.losses",
    "ViTInfo": "sparseinv.models",
    "load_model": "sparseinv.models",
    "vit_info": "sparseinv.models",
    "Pool": "sparseinv.pool",
    "read_pool": "sparseinv.pool",
    "QuantConfig": "sparseinv.quant",
    "calibrate": "sparseinv.quant",
    "calibration_batches": "sparseinv.quant",
    "load_quantized": "sparseinv.quant",
    "quantize_": "sparseinv.quant",
    "save_quantized": "sparseinv.quant",
    "PruneSchedule": "sparseinv.inversion.schedule",
    "SparseOutput": "sparseinv.vit.forward",
    "sparse_forward": "sparseinv.vit.forward",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__version__ = "0.1.0"

__all__ = [
    "BatchResult",
    "DistillConfig",
    "InversionConfig",
    "InversionLoss",
    "InversionResult",
    "LossInputs",
    "Pool",
    "PruneSchedule",
    "QuantConfig",
    "SparseOutput",
    "UsageError",
    "calibrate",
    "calibration_batches",
    "ViTInfo",
    "distill",
    "invert",
    "invert_batch",
    "kd_loss",
    "load_model",
    "load_quantized",
    "quantize_",
    "read_pool",
    "save_quantized",
    "sparse_forward",
    "vit_info",
]
