"""Saving and loading a quantized model's parameters (safetensors + JSON header).

The file holds, keyed by module name, every activation scale and zero point (learned
ones included), every weight's per-channel scale and int8 codes (so learned rounding
survives), and the factors of each LayerNorm folded into its Linear; its metadata
holds the format, the model name, the :class:`QuantConfig`, a fingerprint of the
full-precision weights it was made from and a sha256 of its own tensors (a damaged
value that still looks like a step size or a code is refused, not run). Those float weights come from the model
(``--checkpoint``), as they did when it was quantized (LayerNorms and biases are
re-folded from them); the fingerprint refuses any other weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sparseinv.errors import UsageError, first_line
from sparseinv.files import atomic_save
from sparseinv.models import fingerprint_tensors
from sparseinv.quant.config import QuantConfig
from sparseinv.quant.model import OPTIONAL, fingerprint, prepare_, quant_modules, quantization, set_quant_mode
from sparseinv.quant.quantizers import ActQuantizer, QuantWeight, SignedLog2Quantizer, weight_qrange
from sparseinv.quant.reparam import refold_layernorms

FORMAT = "sparseinv-quant/2"
# First match wins: a subclass before its base.
REQUIRED = {SignedLog2Quantizer: ("scale", "zero_point", "low"), ActQuantizer: ("scale", "zero_point"), QuantWeight: ("w_scale", "w_int")}
def _required(module: nn.Module) -> tuple[str, ...]:
    return next(names for kind, names in REQUIRED.items() if isinstance(module, kind))


def quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every scale, zero point, weight code and fold factor of a quantized model, keyed ``module.buffer``."""
    state = {}
    for name, module in quant_modules(model):
        for buffer in (*_required(module), *OPTIONAL):
            tensor = module._buffers.get(buffer)
            if tensor is not None and tensor.numel():
                state[f"{name}.{buffer}"] = tensor.detach().cpu().contiguous()
    return state


def save_quantized(model: nn.Module, path: str | os.PathLike, model_name: str, fp_fingerprint: str | None = None) -> Path:
    """Write a calibrated quantized model's scales and zero points to ``path``.

    Args:
        model: A model after :func:`quantize_` and :func:`calibrate`.
        path: The ``.safetensors`` file to write.
        model_name: The timm name to rebuild it from.
        fp_fingerprint: :func:`fingerprint` of the full-precision model; by default the one
            :func:`~sparseinv.quant.model.prepare_` recorded.
    """
    state_of = quantization(model)
    if state_of is None:
        raise ValueError("the model is not quantized")
    config = state_of.config
    missing = [f"{n}.{b}" for n, m in quant_modules(model) for b in _required(m) if not m._buffers[b].numel()]
    if missing:
        raise ValueError(f"the model is not calibrated ({missing[0]} is not set)")
    metadata = {
        "format": FORMAT,
        "model": model_name,
        "config": json.dumps(config.record()),
        "fingerprint": fp_fingerprint or state_of.fp_fingerprint or fingerprint(model),
    }
    state = quant_state(model)
    metadata["tensors_sha256"] = _tensors_checksum(state)
    return atomic_save(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def _tensors_checksum(state: dict[str, torch.Tensor]) -> str:
    return fingerprint_tensors(sorted(state.items()))


def read_header(path: str | os.PathLike) -> dict:
    """The metadata of a quantized file, with ``config`` parsed."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"quantized file '{path}' does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UsageError(f"'{path}' is not a safetensors file ({type(err).__name__}).") from None
    if str(metadata.get("format", "")).startswith("sparseinv-quant/") and metadata["format"] != FORMAT:
        raise UsageError(f"'{path}' was written in the older format {metadata['format']}: quantize the model again.")
    if metadata.get("format") != FORMAT:
        raise UsageError(f"'{path}' is not a sparseinv quantized model (no {FORMAT} header).")
    try:
        config = json.loads(metadata["config"])
        if not isinstance(config, dict) or not metadata["model"] or not metadata["fingerprint"]:
            raise ValueError
    except (KeyError, ValueError):
        raise UsageError(f"quantized file '{path}' is damaged: its header lacks a valid model, config or fingerprint.") from None
    return {**metadata, "config": config}


def load_quantized(model: nn.Module, path: str | os.PathLike, model_name: str) -> nn.Module:
    """Quantize a full-precision ``model`` in place exactly as recorded in ``path``.

    Raises:
        UsageError: the file is not a quantized model, or was made for another
            model name or other weights.
    """
    header = read_header(path)
    if header["model"] != model_name:
        raise UsageError(f"quantized file '{path}' was made for {header['model']}, not for {model_name}.")
    fp = fingerprint(model)
    if header["fingerprint"] != fp:
        raise UsageError(f"quantized file '{path}' does not match the weights of {model_name} (another checkpoint?).")
    try:
        config = QuantConfig.from_record(header["config"]).validate()
        state = load_file(str(path))
    except UsageError as err:
        raise UsageError(f"quantized file '{path}' records settings that cannot be used: {err}") from None
    except (TypeError, KeyError, ValueError, SafetensorError, OSError) as err:
        raise UsageError(f"quantized file '{path}' is damaged ({type(err).__name__}).") from None
    prepare_(model, config, fp_fingerprint=fp)
    required = {f"{n}.{b}" for n, m in quant_modules(model) for b in _required(m)}
    optional = {f"{n}.{b}" for n, m in quant_modules(model) for b in OPTIONAL}
    if not required <= set(state) <= required | optional:
        raise UsageError(f"quantized file '{path}' does not match the modules of {model_name}.")
    device = next(model.parameters()).device
    for key, tensor in state.items():
        module_name, _, buffer = key.rpartition(".")
        module = model.get_submodule(module_name)
        _check_buffer(path, key, module, buffer, tensor)
        module.register_buffer(buffer, tensor.to(device))
    _finish_loading(model, path)
    # Last, so damage the checks above name is named by them. Files written before the
    # checksum existed have none and load without it.
    if "tensors_sha256" in header and header["tensors_sha256"] != _tensors_checksum(state):
        raise UsageError(f"quantized file '{path}' is damaged: its tensors do not match the checksum written with them.")
    return model


def _check_buffer(path, key: str, module: nn.Module, buffer: str, tensor: torch.Tensor) -> None:
    """Refuse values no quantizer could have written: a damaged file must not run silently."""
    integer = buffer in ("zero_point", "w_int")
    problem = None
    if tensor.is_floating_point() == integer:
        problem = f"has dtype {tensor.dtype}, not {'an integer' if integer else 'a float'} type"
    elif not integer and not bool(torch.isfinite(tensor).all()):
        problem = "holds values that are not finite"
    elif buffer in ("scale", "w_scale") and not bool((tensor > 0).all()):
        problem = "holds step sizes that are not positive"
    elif buffer == "w_int":
        qmin, qmax = weight_qrange(module.w_bits)
        shape = tuple(module.float_weight.shape)
        if tuple(tensor.shape) != shape:
            problem = f"has shape {tuple(tensor.shape)}, not the weight's {shape}"
        elif int(tensor.min()) < qmin or int(tensor.max()) > qmax:
            problem = f"holds codes outside the {module.w_bits}-bit range"
    elif buffer == "w_scale" and tensor.numel() != module.float_weight.shape[0]:
        problem = f"has {tensor.numel()} scales for {module.float_weight.shape[0]} output channels"
    if problem:
        raise UsageError(f"quantized file '{path}' is damaged: '{key}' {problem}.")


def _finish_loading(model: nn.Module, path) -> None:
    """Refold the LayerNorms, switch quantization on and run one blank image, so that
    parameters that do not fit one another fail here, not later."""
    from sparseinv.models import vit_info

    device = next(model.parameters()).device
    try:
        refold_layernorms(model)
        set_quant_mode(model, "quant")
        with torch.no_grad():
            model(torch.zeros(1, *vit_info(model).input_size, device=device))
    except (RuntimeError, IndexError, ValueError) as err:
        first = first_line(err)
        raise UsageError(f"quantized file '{path}' is damaged: its parameters do not fit the model ({first}).") from None
