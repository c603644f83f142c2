"""RepQ-ViT's scale reparameterisation: per-channel LayerNorm-output ranges, one per-tensor scale.

A LayerNorm's output has a few channels with ranges tens of times wider than the
rest; one per-tensor scale cannot serve them at 4 or 6 bits. Calibrated per channel
(scale ``s_c``, zero point ``z_c``), the quantizer is made per-tensor exactly: with
``s = mean(s_c)``, ``z = round(mean(z_c))``, ``r1 = s_c / s`` and ``r2 = z_c - z``,
quantizing ``x' = (x + s_c r2) / r1`` with ``(s, z)`` gives the same integers as
quantizing ``x`` with ``(s_c, z_c)``. ``x'`` is what the LayerNorm produces after
``gamma' = gamma / r1``, ``beta' = (beta + s_c r2) / r1``, and the next Linear computes
the same output from it with ``W' = W diag(r1)``, ``b' = b - W (s_c r2)``. In full
precision the model is unchanged; quantized, it runs with per-tensor scales only.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from sparseinv.quant.quantizers import QuantLinear, act_qrange


def ln_linear_pairs(model: nn.Module) -> Iterator[tuple[nn.LayerNorm, QuantLinear]]:
    """Each LayerNorm whose output feeds exactly one quantized Linear, with that Linear.

    Pre-norm blocks (``norm1 -> attn.qkv``, ``norm2 -> mlp.fc1``) and the classifier
    (``fc_norm`` or, when that is absent, the final ``norm``, then token or average
    pooling, then ``head``): pooling is linear per channel, so the fold survives it.
    """
    for block in getattr(model, "blocks", []):
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if isinstance(getattr(block, "norm1", None), nn.LayerNorm) and isinstance(getattr(attn, "qkv", None), QuantLinear):
            yield block.norm1, attn.qkv
        if isinstance(getattr(block, "norm2", None), nn.LayerNorm) and isinstance(getattr(mlp, "fc1", None), QuantLinear):
            yield block.norm2, mlp.fc1
    head = getattr(model, "head", None)
    if not isinstance(head, QuantLinear) or getattr(model, "attn_pool", None) is not None:
        return
    if getattr(model, "head_dist", None) is not None:  # a second head reads the same norm: no fold serves both
        return
    if getattr(model, "global_pool", "token") not in ("token", "avg"):
        return
    fc_norm = getattr(model, "fc_norm", None)
    if isinstance(fc_norm, nn.LayerNorm):
        yield fc_norm, head
    elif isinstance(fc_norm, nn.Identity) and isinstance(getattr(model, "norm", None), nn.LayerNorm):
        yield model.norm, head


def foldable(norm: nn.LayerNorm, linear: QuantLinear) -> bool:
    return norm.weight is not None and norm.bias is not None and linear.input_quant.per_channel


@torch.no_grad()
def apply_fold(norm: nn.LayerNorm, linear: QuantLinear, r1: torch.Tensor, shift: torch.Tensor) -> None:
    """Fold ``x -> (x + shift) / r1`` into ``norm`` and its inverse into ``linear``; record both on ``linear``."""
    w = linear.linear.weight
    if linear.linear.bias is None:
        linear.linear.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))
    linear.linear.bias.sub_(w @ shift)
    w.mul_(r1)
    norm.bias.add_(shift).div_(r1)
    norm.weight.div_(r1)
    linear.fold_r1, linear.fold_shift = r1.clone(), shift.clone()


@torch.no_grad()
def fold_layernorms(model: nn.Module) -> int:
    """Fold every calibrated per-channel post-LayerNorm quantizer into per-tensor; returns how many.

    Each folded Linear's weight scales are recomputed from its new weight.
    """
    count = 0
    for norm, linear in ln_linear_pairs(model):
        quant = linear.input_quant
        if not foldable(norm, linear) or not quant.calibrated:
            continue
        _, qmax = act_qrange(quant.bits)
        s_c, z_c = quant.scale.float(), quant.zero_point.float()
        s = s_c.mean()
        z = torch.round(z_c.mean()).clamp(0, qmax)
        r1, shift = s_c / s, s_c * (z_c - z)
        apply_fold(norm, linear, r1, shift)
        quant.per_channel = False
        quant.scale, quant.zero_point = s.reshape(1), z.to(torch.int32).reshape(1)
        linear.reset_weight_scale()
        count += 1
    return count


@torch.no_grad()
def refold_layernorms(model: nn.Module) -> None:
    """Re-apply recorded folds to a freshly prepared model (loading a quantized file)."""
    for norm, linear in ln_linear_pairs(model):
        if linear.fold_r1.numel():
            apply_fold(norm, linear, linear.fold_r1, linear.fold_shift)
            linear.input_quant.per_channel = False
