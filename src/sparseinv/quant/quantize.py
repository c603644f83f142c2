"""``quantize_``: the one entry point, ``quantize_(model, config, calibration)``.

It prepares the model (:func:`sparseinv.quant.model.prepare_`, which records the fingerprint
of its full-precision weights: what a quantized file is checked against), and fits it to
the calibration images (:func:`sparseinv.quant.calibrate.fit`). The other quant modules
import downwards only; this one sits on top.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from sparseinv.quant.calibrate import fit
from sparseinv.quant.config import QuantConfig
from sparseinv.quant.model import default_filter, prepare_


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable | None = None,
    *,
    filter_fn: Callable[[nn.Module, str], bool] = default_filter,
    progress: bool = True,
) -> nn.Module:
    """Make ``model`` fake-quantized in place; returns it for chaining.

    Without ``calibration`` this only prepares the model (see
    :func:`~sparseinv.quant.model.prepare_`). With it, the model comes back ready to run:
    ranges calibrated, LayerNorms folded and blocks reconstructed as ``config`` says::

        model = load_model("deit_tiny_patch16_224", checkpoint)
        batches = calibration_batches(model, "pools/sparse", "deit_tiny_patch16_224")
        quantize_(model, QuantConfig.for_method("recon", w_bits=4, a_bits=4), batches)

    Args:
        model: A timm ViT.
        config: Scheme, bit-widths, quantizers, reconstruction.
        calibration: ``(images, keep)`` batches (see :mod:`sparseinv.quant.calibrate`).
        filter_fn: ``(module, name) -> bool``: which Linear-like modules to wrap.
        progress: Show progress bars while fitting.
    """
    prepare_(model, config, filter_fn=filter_fn)
    if calibration is not None:
        fit(model, calibration, progress=progress)
    return model
