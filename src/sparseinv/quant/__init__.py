"""Data-free fake quantization of timm ViTs, in one call::

    model = load_model("deit_tiny_patch16_224", checkpoint)
    batches = calibration_batches(model, "pools/sparse", "deit_tiny_patch16_224")
    quantize_(model, QuantConfig.for_method("recon", w_bits=4, a_bits=4), batches)
    save_quantized(model, "q.safetensors", "deit_tiny_patch16_224")

``quantize_`` prepares the model (the scheme's quantizers), calibrates its ranges,
folds LayerNorms and reconstructs its blocks as the config says; ``load_quantized``
rebuilds the same model from the file.
"""

from typing import TYPE_CHECKING

from sparseinv._lazy import lazy_exports

if TYPE_CHECKING:
    from sparseinv.quant.calibrate import calibrate, calibration_batches, fit, folder_batches, noise_batches, pool_batches
    from sparseinv.quant.config import CALIBRATORS, DEFAULT_METHOD, METHODS, SCHEMES, QuantConfig, ReconConfig
    from sparseinv.quant.io import load_quantized, read_header, save_quantized
    from sparseinv.quant.model import Quantization, QuantAttention, default_filter, fingerprint, prepare_, quantization, set_quant_mode
    from sparseinv.quant.qat import clamp_step_sizes, end_qat, in_qat, qat_parameters, start_qat
    from sparseinv.quant.quantize import quantize_
    from sparseinv.quant.quantizers import (
        ActQuantizer,
        Log2Quantizer,
        QuantConv2d,
        SignedLog2Quantizer,
        QuantLinear,
        QuantWeight,
        fake_quant,
        fake_quant_weight,
        weight_scale,
    )
    from sparseinv.quant.reconstruct import reconstruct
    from sparseinv.quant.reparam import fold_layernorms, ln_linear_pairs

_EXPORTS = {
    "calibrate": "sparseinv.quant.calibrate",
    "calibration_batches": "sparseinv.quant.calibrate",
    "fit": "sparseinv.quant.calibrate",
    "folder_batches": "sparseinv.quant.calibrate",
    "noise_batches": "sparseinv.quant.calibrate",
    "pool_batches": "sparseinv.quant.calibrate",
    "CALIBRATORS": "sparseinv.quant.config",
    "DEFAULT_METHOD": "sparseinv.quant.config",
    "METHODS": "sparseinv.quant.config",
    "SCHEMES": "sparseinv.quant.config",
    "QuantConfig": "sparseinv.quant.config",
    "ReconConfig": "sparseinv.quant.config",
    "fingerprint": "sparseinv.quant.model",
    "Quantization": "sparseinv.quant.model",
    "quantization": "sparseinv.quant.model",
    "load_quantized": "sparseinv.quant.io",
    "read_header": "sparseinv.quant.io",
    "save_quantized": "sparseinv.quant.io",
    "QuantAttention": "sparseinv.quant.model",
    "default_filter": "sparseinv.quant.model",
    "prepare_": "sparseinv.quant.model",
    "set_quant_mode": "sparseinv.quant.model",
    "clamp_step_sizes": "sparseinv.quant.qat",
    "end_qat": "sparseinv.quant.qat",
    "in_qat": "sparseinv.quant.qat",
    "qat_parameters": "sparseinv.quant.qat",
    "start_qat": "sparseinv.quant.qat",
    "quantize_": "sparseinv.quant.quantize",
    "ActQuantizer": "sparseinv.quant.quantizers",
    "Log2Quantizer": "sparseinv.quant.quantizers",
    "SignedLog2Quantizer": "sparseinv.quant.quantizers",
    "QuantConv2d": "sparseinv.quant.quantizers",
    "QuantLinear": "sparseinv.quant.quantizers",
    "QuantWeight": "sparseinv.quant.quantizers",
    "fake_quant": "sparseinv.quant.quantizers",
    "fake_quant_weight": "sparseinv.quant.quantizers",
    "weight_scale": "sparseinv.quant.quantizers",
    "reconstruct": "sparseinv.quant.reconstruct",
    "fold_layernorms": "sparseinv.quant.reparam",
    "ln_linear_pairs": "sparseinv.quant.reparam",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "CALIBRATORS",
    "DEFAULT_METHOD",
    "METHODS",
    "SCHEMES",
    "ActQuantizer",
    "Log2Quantizer",
    "QuantAttention",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "SignedLog2Quantizer",
    "QuantWeight",
    "Quantization",
    "ReconConfig",
    "calibrate",
    "calibration_batches",
    "clamp_step_sizes",
    "default_filter",
    "end_qat",
    "fake_quant",
    "fake_quant_weight",
    "fingerprint",
    "fit",
    "fold_layernorms",
    "folder_batches",
    "in_qat",
    "ln_linear_pairs",
    "load_quantized",
    "noise_batches",
    "pool_batches",
    "prepare_",
    "qat_parameters",
    "quantization",
    "quantize_",
    "read_header",
    "reconstruct",
    "save_quantized",
    "set_quant_mode",
    "start_qat",
    "weight_scale",
]
