"""``quantize_``: turn a timm ViT into a fake-quantized one, in place.

Nothing of timm is rewritten: Linears and the patch-embedding conv are wrapped,
each block's timm ``Attention`` is swapped for :class:`QuantAttention` (which reuses
its submodules and materialises q.k^T so it can be quantized), and forward hooks
quantize the embeddings (the token sequence entering the first block, after any
sparse gathering) and every block output (the residual stream).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from sparseinv.errors import UsageError
from sparseinv.models import timm
from sparseinv.quant.config import QuantConfig
from sparseinv.quant.quantizers import MODES, ActQuantizer, QuantConv2d, QuantLinear

# Linears whose input is a LayerNorm output (attention qkv, MLP fc1, the classifier).
POST_NORM_LINEARS = ("attn.qkv", "mlp.fc1", "head")


class QuantAttention(nn.Module):
    """timm ``Attention`` with the pre-softmax scores and attn @ v fake-quantized.

    Reuses the original module's qkv, q_norm, k_norm, attn_drop, norm, proj,
    proj_drop (and gate), so the weights are shared, not copied. The softmax weights
    pass through ``attn_drop`` as in timm, so :class:`AttentionRecorder` still works.
    """

    fused_attn = False  # the scores must exist to be quantized

    def __init__(self, attn: nn.Module, config: QuantConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            setattr(self, name, getattr(attn, name))
        self.gate = getattr(attn, "gate", None)
        # The pre-softmax scores keep min/max: softmax is decided by the largest scores,
        # exactly what a clipping calibrator would cut.
        self.score_quant = _act(config, calibrator="minmax")
        self.av_quant = _act(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if is_causal:
            raise NotImplementedError("QuantAttention does not support causal attention")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
        attn = self.score_quant(attn)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.av_quant(attn @ v)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _act(config: QuantConfig, per_channel: bool = False, calibrator: str | None = None) -> ActQuantizer:
    return ActQuantizer(config.a_bits, calibrator or config.calibrator, config.percentile, per_channel)


def _output_hook(quantizer: ActQuantizer):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return quantizer(output)

    return hook


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quant_config", None) is not None


def quantize_(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Make ``model`` fake-quantized in place; returns it for chaining.

    Weight scales are set here (they need no data); activation quantizers stay off
    until :func:`sparseinv.quant.calibrate` (or :func:`load_quantized`) sets them.

    Args:
        model: A timm ViT (blocks with timm ``Attention``, a ``patch_embed.proj`` conv).
        config: Bit-widths and calibrator.
    """
    config.validate()
    if is_quantized(model):
        raise UsageError("the model is already quantized.")
    # Wrap every Linear (blocks, head, attention-pool heads) first, so the attention
    # swap below picks up the wrapped qkv and proj.
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in linears:
        per_channel = config.channelwise_ln and name.endswith(POST_NORM_LINEARS)
        wrapped = QuantLinear(linear, config.w_bits, _act(config, per_channel), config.weight_calibrator_name)
        _set_submodule(model, name, wrapped)
    proj = getattr(model.patch_embed, "proj", None)
    if isinstance(proj, nn.Conv2d):
        model.patch_embed.proj = QuantConv2d(proj, config.w_bits, config.weight_calibrator_name)
    handles = []
    for block in model.blocks:
        if type(getattr(block, "attn", None)) is timm.models.vision_transformer.Attention:
            block.attn = QuantAttention(block.attn, config)
        # The residual stream keeps its full min/max range whatever the calibrator: a
        # few of its channels carry activations tens of times larger than the rest,
        # the model depends on them, and a clipping calibrator (percentile, MSE) cut
        # them off (W8/A8 MSE everywhere: 65.6% vs 66.8% for min/max on one pool).
        block.out_quant = _act(config, calibrator="minmax")
        handles.append(block.register_forward_hook(_output_hook(block.out_quant)))
    # norm_pre runs after positional embedding and after sparse gathering, so only
    # the fed tokens reach this observer.
    model.embed_quant = _act(config, calibrator="minmax")
    handles.append(model.norm_pre.register_forward_hook(_output_hook(model.embed_quant)))
    model.quant_config = config
    model._quant_hooks = handles
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quant_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every quantizer-carrying module of ``model`` with its name."""
    for name, module in model.named_modules():
        if isinstance(module, (ActQuantizer, QuantLinear, QuantConv2d)):
            yield name, module


def set_quant_mode(model: nn.Module, mode: str) -> None:
    """Switch every quantizer to ``off``, ``observe`` or ``quant``.

    In ``observe`` weights stay full precision too, so activation ranges are those
    of the full-precision model (PSAQ-ViT's calibration).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    for _, module in quant_modules(model):
        module.mode = mode
