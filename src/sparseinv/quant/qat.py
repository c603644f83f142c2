"""Quantization-aware training of a quantized model: :func:`start_qat`, train, :func:`end_qat`.

A model from :func:`sparseinv.quant.quantize_` (or :func:`~sparseinv.quant.load_quantized`)
computes with fixed integer codes and step sizes. :func:`start_qat` gives it latent float
weights (straight-through rounding) and learned step sizes (LSQ), :func:`qat_parameters`
picks what trains, :func:`clamp_step_sizes` keeps step sizes positive after each step, and
:func:`end_qat` fixes the codes again, so the model is what its quantized file holds.
Whether a model is mid-training is read from the model itself (:func:`in_qat`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparseinv.errors import UsageError
from sparseinv.quant.model import act_quantizers, is_quantized, weight_modules
from sparseinv.quant.quantizers import Log2Quantizer


class _LogScale(nn.Module):
    """A step size learned as its logarithm (``exp`` of the parameter): an optimiser step then moves
    it by a fraction of itself, where weight step sizes span more than two orders of magnitude."""

    def forward(self, log_scale: torch.Tensor) -> torch.Tensor:
        return log_scale.exp()

    def right_inverse(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.clamp_min(1e-12).log()


def _learned(module: nn.Module, name: str) -> nn.Parameter | None:
    """The parameter that trains for ``name`` (its logarithm when learned in log space), if any."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return module._parameters.get(name)


def _to_parameter(module: nn.Module, name: str, log: bool = False) -> None:
    value = module._buffers.pop(name)
    module.register_parameter(name, nn.Parameter(value.detach().clone()))
    if log:
        parametrize.register_parametrization(module, name, _LogScale())


def _to_buffer(module: nn.Module, name: str) -> None:
    if parametrize.is_parametrized(module, name):
        value = getattr(module, name)
        # Not parametrize.remove_parametrizations: a deep copy (save_student's) shares the injected
        # class with its original, and removing deletes the property from that class, for both.
        # A quantizer carries one learned step size: its plain class comes back whole.
        del module.parametrizations
        module.__class__ = module.__class__.__bases__[0]
    else:
        value = module._parameters.pop(name)
    module.register_buffer(name, value.detach().clone())


def in_qat(model: nn.Module) -> bool:
    """Whether :func:`start_qat` has made ``model`` trainable (its weight step sizes are parameters) and no
    :func:`end_qat` has fixed it since."""
    return is_quantized(model) and any(_learned(m, "w_scale") is not None for m in weight_modules(model))


def start_qat(model: nn.Module, log_step_sizes: bool = False) -> nn.Module:
    """Make a quantized model trainable: straight-through weights, learned step sizes.

    Each quantized weight's latent float value starts at its dequantized code, so the
    model computes exactly what the post-training model did; rounding is the
    straight-through estimator from then on. Weight and activation step sizes become
    parameters (LSQ) so every process of a run shares their gradients. The softmax's
    log2 quantizer keeps its range. ``log_step_sizes`` learns each step size as its
    logarithm (relative steps; the model then computes within rounding of the start).
    A model already training is left as it is (nothing is a code or a buffer any more).
    """
    if not is_quantized(model):
        raise UsageError("start_qat needs a model returned by quantize_ (or load_quantized).")
    with torch.no_grad():
        for m in weight_modules(model):
            if m.w_int.numel():
                m.float_weight.copy_(m.w_int.float() * m._scale_view())
                m.w_int = torch.empty(0, dtype=torch.int8, device=m.w_scale.device)
            if "w_scale" in m._buffers:
                _to_parameter(m, "w_scale", log_step_sizes)
        for q in act_quantizers(model):
            if not isinstance(q, Log2Quantizer) and "scale" in q._buffers:
                _to_parameter(q, "scale", log_step_sizes)
    return model


def qat_parameters(model: nn.Module, learn: str = "all") -> list[nn.Parameter]:
    """Of what :func:`start_qat` made trainable, what ``learn`` names.

    Args:
        learn: ``all`` (latent weights and step sizes), ``weights`` (latent weights and
            weight step sizes) or ``step-sizes`` (weight and activation step sizes).
    """
    params = []
    for m in weight_modules(model):
        if learn != "step-sizes":
            params.append(m.float_weight)
        if (w_scale := _learned(m, "w_scale")) is not None:
            params.append(w_scale)
    if learn != "weights":
        params += [p for q in act_quantizers(model) if (p := _learned(q, "scale")) is not None]
    return params


@torch.no_grad()
def clamp_step_sizes(model: nn.Module) -> None:
    """Keep learned step sizes positive after an optimiser step."""
    for module, name in [(m, "w_scale") for m in weight_modules(model)] + [(q, "scale") for q in act_quantizers(model)]:
        if not parametrize.is_parametrized(module, name):  # exp() of a log step size is positive already
            getattr(module, name).clamp_(min=1e-8)


def end_qat(model: nn.Module) -> nn.Module:
    """Fix the integer codes from the latent weights and turn step sizes back into buffers,
    so :func:`sparseinv.quant.save_quantized` writes what the model computed. A model not
    training is returned as it is (re-rounding its float weights would undo its codes)."""
    if not in_qat(model):
        return model
    for m in weight_modules(model):
        if _learned(m, "w_scale") is not None:
            _to_buffer(m, "w_scale")
        m.freeze_weight()
    for q in act_quantizers(model):
        if _learned(q, "scale") is not None:
            _to_buffer(q, "scale")
    return model
