"""Data-free fake quantization of timm ViTs (PSAQ-ViT's scheme plus better calibrators).

One entry point per step::

    model = load_model("deit_tiny_patch16_224", checkpoint)
    fp = fingerprint(model)
    quantize_(model, QuantConfig(w_bits=4, a_bits=8, calibrator="mse"))
    calibrate(model, calibration_batches(model, "pool_dir", "deit_tiny_patch16_224"))
    save_quantized(model, "q.safetensors", "deit_tiny_patch16_224", fp)
"""

from sparseinv.quant.calibrate import calibrate, calibration_batches, folder_batches, noise_batches, pool_batches
from sparseinv.quant.config import CALIBRATORS, QuantConfig
from sparseinv.quant.io import fingerprint, load_quantized, read_header, save_quantized
from sparseinv.quant.model import QuantAttention, quantize_, set_quant_mode
from sparseinv.quant.quantizers import ActQuantizer, QuantConv2d, QuantLinear, fake_quant_weight, weight_scale

__all__ = [
    "CALIBRATORS",
    "ActQuantizer",
    "QuantAttention",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "calibrate",
    "calibration_batches",
    "fake_quant_weight",
    "fingerprint",
    "folder_batches",
    "load_quantized",
    "noise_batches",
    "pool_batches",
    "quantize_",
    "read_header",
    "save_quantized",
    "set_quant_mode",
    "weight_scale",
]
