"""``prepare_``: turn a timm ViT into a fake-quantized one, in place (no data yet).

Nothing of timm is rewritten: Linears (chosen by a filter) and the patch-embedding
conv are wrapped, each attention module of a known kind is swapped for a wrapper that
reuses its submodules and materialises q.k^T so its inputs can be quantized, and, for
the ``psaq`` scheme, forward hooks quantize the embeddings and every block output.
Anything that stays in full precision is named in a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from sparseinv.errors import UsageError
from sparseinv.models import fingerprint_tensors, timm
from sparseinv.quant.config import QuantConfig
from sparseinv.quant.quantizers import MODES, ActQuantizer, Log2Quantizer, QuantConv2d, QuantLinear, QuantWeight, SignedLog2Quantizer

# Buffers a quantized model adds: the quantizers' and the LayerNorm folding's.
OPTIONAL = ("fold_r1", "fold_shift")
QUANT_BUFFERS = ("scale", "zero_point", "w_scale", "w_int", *OPTIONAL)

# Linears whose input is a LayerNorm output (attention qkv, MLP fc1, the classifier).
POST_NORM_LINEARS = ("attn.qkv", "mlp.fc1", "head")
# The Linear whose input is the post-GELU activation.
POST_GELU_LINEARS = ("mlp.fc2",)


class QuantAttention(nn.Module):
    """timm ``Attention`` with the inputs of its two matrix products fake-quantized.

    Scheme ``int``: q and k before ``q @ k^T``, the softmax output and v before
    ``attn @ v`` (the Linears quantize their own inputs). Scheme ``psaq``: the
    pre-softmax scores and the ``attn @ v`` product. Reuses the original module's
    qkv, q_norm, k_norm, attn_drop, norm, proj, proj_drop (and gate), so the weights
    are shared, not copied. The softmax weights pass through ``attn_drop`` as in timm,
    so :class:`AttentionRecorder` still works.
    """

    fused_attn = False  # the scores must exist to be quantized

    def __init__(self, attn: nn.Module, config: QuantConfig) -> None:
        super().__init__()
        self.scheme = config.scheme
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            setattr(self, name, getattr(attn, name))
        self.gate = getattr(attn, "gate", None)
        device = next(attn.parameters()).device
        if self.scheme == "int":
            self.q_quant, self.k_quant, self.v_quant = (_act(config, device) for _ in range(3))
            self.attn_quant = Log2Quantizer(config.a_bits, device) if config.softmax_quantizer == "log2" else _act(config, device)
        else:
            # The pre-softmax scores keep min/max: softmax is decided by the largest
            # scores, exactly what a clipping calibrator would cut.
            self.score_quant = _act(config, device, calibrator="minmax")
            self.av_quant = _act(config, device)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if is_causal:
            raise NotImplementedError("QuantAttention does not support causal attention")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        int_scheme = self.scheme == "int"
        if int_scheme:
            q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        if int_scheme and self.q_quant.exporting:
            # Scaling after the product lets an integer engine take q and k straight from their quantizers.
            attn = (q @ k.transpose(-2, -1)) * self.scale
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
        if not int_scheme:
            attn = self.score_quant(attn)
        attn = self.attn_drop(attn.softmax(dim=-1))
        if int_scheme:
            x = self.attn_quant(attn) @ v
        else:
            x = self.av_quant(attn @ v)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


# One wrapper per attention kind we know; any other attention stays in float, with a warning.
ATTENTION_WRAPPERS: dict[type, type] = {timm.models.vision_transformer.Attention: QuantAttention}


def _act(config: QuantConfig, device: torch.device, per_channel: bool = False, calibrator: str | None = None) -> ActQuantizer:
    return ActQuantizer(config.a_bits, calibrator or config.calibrator, config.percentile, per_channel, device)


def _output_hook(quantizer: ActQuantizer):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return quantizer(output)

    return hook


def default_filter(module: nn.Module, name: str) -> bool:
    """Which modules :func:`quantize_` wraps: every ``nn.Linear`` (subclasses included)."""
    return isinstance(module, nn.Linear)


@dataclass
class Quantization:
    """What :func:`prepare_` registers on a model it quantizes, as ``model.quantization``.

    Attributes:
        config: The scheme, bit widths and quantizers.
        fp_fingerprint: :func:`fingerprint` of the full-precision weights it started from: what
            a quantized file is checked against (folding LayerNorms changes the weights later);
            ``None`` for weights that hold no data (the ``meta`` device).
        hooks: The forward hooks it added (the ``psaq`` scheme's), to remove them.
    """

    config: QuantConfig
    fp_fingerprint: str | None
    hooks: list = field(default_factory=list)


def quantization(model: nn.Module) -> Quantization | None:
    """The :class:`Quantization` :func:`prepare_` registered on ``model``; ``None`` for a full-precision model."""
    state = getattr(model, "quantization", None)
    return state if isinstance(state, Quantization) else None


def is_quantized(model: nn.Module) -> bool:
    return quantization(model) is not None


def fingerprint(model: nn.Module) -> str:
    """sha256 of the model's full-precision parameters and buffers (names, shapes, values)."""
    quantized = is_quantized(model)
    # Wrapped modules add ".linear"/".conv" to their parameter names; hash the original names.
    return fingerprint_tensors((name.replace(".linear.", ".").replace(".conv.", "."), tensor)
                               for name, tensor in sorted(model.state_dict().items())
                               if not (quantized and name.rpartition(".")[2] in QUANT_BUFFERS))


def prepare_(
    model: nn.Module,
    config: QuantConfig,
    *,
    filter_fn: Callable[[nn.Module, str], bool] = default_filter,
    fp_fingerprint: str | None = None,
) -> nn.Module:
    """Wrap ``model``'s layers with the quantizers ``config`` asks for, in place.

    Weight scales need no data; activation quantizers stay off until
    :func:`sparseinv.quant.calibrate.fit` or :func:`sparseinv.quant.io.load_quantized`
    sets them. :func:`sparseinv.quant.quantize_` is this plus the fitting.

    Args:
        model: A timm ViT.
        config: Scheme, bit-widths, quantizers.
        filter_fn: ``(module, name) -> bool``: which Linear-like modules to wrap.
        fp_fingerprint: :func:`fingerprint` of ``model`` where the caller has taken it already.
    """
    config.validate()
    if is_quantized(model):
        raise UsageError("the model is already quantized.")
    if fp_fingerprint is None and not any(t.is_meta for t in model.state_dict().values()):
        fp_fingerprint = fingerprint(model)
    # Wrap every chosen Linear first, so the attention swap below picks up the wrapped qkv and proj.
    linears = [(n, m) for n, m in model.named_modules() if n and filter_fn(m, n)]
    for name, linear in linears:
        if type(linear) is not nn.Linear:
            warnings.warn(f"quantizing {name} ({type(linear).__name__}) as a plain nn.Linear", stacklevel=2)
        per_channel = name.endswith(POST_NORM_LINEARS) and (config.channelwise_ln or config.ln_reparam)
        post_gelu = name.endswith(POST_GELU_LINEARS)
        calibrator = config.gelu_calibrator if post_gelu and config.gelu_calibrator else None
        if post_gelu and config.gelu_quantizer == "log2":
            input_quant = SignedLog2Quantizer(config.a_bits, linear.weight.device)
        else:
            input_quant = _act(config, linear.weight.device, per_channel, calibrator)
        wrapped = QuantLinear(linear, config.w_bits, input_quant, config.weight_calibrator_name)
        _set_submodule(model, name, wrapped)
    proj = getattr(model.patch_embed, "proj", None)
    if isinstance(proj, nn.Conv2d):
        model.patch_embed.proj = QuantConv2d(proj, config.w_bits, config.weight_calibrator_name)
    left = []
    for name, module in list(model.named_modules()):
        wrapper = ATTENTION_WRAPPERS.get(type(module))
        if wrapper is not None:
            _set_submodule(model, name, wrapper(module, config))
        elif "attention" in type(module).__name__.lower() and not isinstance(module, QuantAttention):
            left.append(f"{name} ({type(module).__name__})")
    if left:
        warnings.warn("these attention modules are of a kind sparseinv cannot quantize inside and stay in full "
                      f"precision between their Linears: {', '.join(left)}", stacklevel=2)
    handles = []
    device = next(model.parameters()).device
    if config.scheme == "psaq":
        for block in model.blocks:
            # The residual stream keeps its full min/max range whatever the calibrator:
            # a few of its channels carry activations tens of times larger than the rest.
            block.out_quant = _act(config, device, calibrator="minmax")
            handles.append(block.register_forward_hook(_output_hook(block.out_quant)))
        # norm_pre runs after positional embedding and after sparse gathering, so
        # only the fed tokens reach this observer.
        model.embed_quant = _act(config, device, calibrator="minmax")
        handles.append(model.norm_pre.register_forward_hook(_output_hook(model.embed_quant)))
    model.quantization = Quantization(config, fp_fingerprint, handles)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quant_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every quantizer-carrying module of ``model`` with its name."""
    for name, module in model.named_modules():
        if isinstance(module, (ActQuantizer, QuantWeight)):
            yield name, module


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for _, m in quant_modules(model) if isinstance(m, ActQuantizer)]


def weight_modules(model: nn.Module) -> list[QuantWeight]:
    return [m for _, m in quant_modules(model) if isinstance(m, QuantWeight)]


def set_quant_mode(model: nn.Module, mode: str) -> None:
    """Switch every quantizer to ``off``, ``observe`` or ``quant``.

    In ``observe`` weights stay full precision too, so activation ranges are those
    of the full-precision model (PSAQ-ViT's calibration).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    for _, module in quant_modules(model):
        module.mode = mode
