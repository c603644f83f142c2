"""The one sparse forward: a ViT run on a subset of its patch tokens.

Every part of the project that feeds kept patches to a model (inversion, scoring,
calibration, distillation, evaluation) goes through :func:`sparse_forward`; nothing
else gathers tokens. It uses the model's own public pieces (patch embedding,
positional embedding, blocks, norm, head), so LayerScale, fused attention, register
and distillation tokens behave exactly as in ``model(x)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SparseOutput:
    """Result of :func:`sparse_forward`.

    Attributes:
        logits: (B, num_classes) classifier output.
        cls_attn: (B, K) last-block attention from the CLS token to each fed patch,
            averaged over heads, in the order of ``keep``; ``None`` unless asked for.
    """

    logits: torch.Tensor
    cls_attn: torch.Tensor | None = None


class AttentionRecorder:
    """Capture one attention module's softmax weights for the duration of a ``with``.

    timm's fused attention never materialises the weights, so while recording the
    module is switched to its own unfused path and a forward hook on its
    ``attn_drop`` (which receives the post-softmax weights) keeps them. Outside the
    ``with`` block the module is exactly as it was: register, read, remove.
    """

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn
        self.weights: torch.Tensor | None = None
        self._handle = None
        self._was_fused = False

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.weights = output

    def __enter__(self) -> "AttentionRecorder":
        self._was_fused = bool(getattr(self.attn, "fused_attn", False))
        self.attn.fused_attn = False
        self._handle = self.attn.attn_drop.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self.attn.fused_attn = self._was_fused


class AttentionMaps:
    """Every (or some) block's softmax attention weights, (B, heads, N, N) each, for a ``with``.

    One :class:`AttentionRecorder` per block: the head-wise maps that attention
    distillation and the inter-head similarity prior compare. ``maps`` holds the
    last forward's weights, in block order, with their autograd history.
    """

    def __init__(self, model: nn.Module, indices: Sequence[int] | None = None) -> None:
        blocks = list(model.blocks)
        chosen = blocks if indices is None else [blocks[i] for i in indices]
        self.recorders = [AttentionRecorder(block.attn) for block in chosen]

    @property
    def maps(self) -> list[torch.Tensor]:
        return [r.weights for r in self.recorders]

    def __enter__(self) -> "AttentionMaps":
        for r in self.recorders:
            r.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for r in self.recorders:
            r.__exit__(*exc)


class OutputRecorder:
    """Records the outputs of some modules of a ViT with forward hooks (register, read, remove).

    ``values`` holds one tensor per module, in the order given, from the last forward
    (whatever tokens it was fed: under :func:`sparse_forward`, the kept ones).
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules, self.values, self._handles = list(modules), [None] * len(modules), []

    @classmethod
    def final(cls, model: nn.Module) -> "OutputRecorder":
        """The final norm's output: every fed token."""
        return cls([model.norm])

    @classmethod
    def blocks(cls, model: nn.Module, indices: Sequence[int] | None = None) -> "OutputRecorder":
        """The residual stream after each block (or after the blocks ``indices``)."""
        blocks = list(model.blocks)
        return cls(blocks if indices is None else [blocks[i] for i in indices])

    @classmethod
    def attention(cls, model: nn.Module) -> "OutputRecorder":
        """Each block's attention output (before the residual sum)."""
        return cls([block.attn for block in model.blocks])

    def _hook(self, position: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.values[position] = output
        return hook

    def __enter__(self) -> "OutputRecorder":
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def embed_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch-embed ``x`` and add positional embeddings: (B, prefix + N, C).

    Positional embeddings are added before any token is dropped, so every kept
    token carries the embedding of its own grid cell.
    """
    return model._pos_embed(model.patch_embed(x))


def gather_tokens(tokens: torch.Tensor, keep: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Keep the prefix tokens and the patch tokens at ``keep`` (B, K), in that order."""
    prefix, patches = tokens[:, :num_prefix_tokens], tokens[:, num_prefix_tokens:]
    index = keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
    return torch.cat([prefix, torch.gather(patches, 1, index)], dim=1)


def _patch_projection(model: nn.Module) -> nn.Conv2d | None:
    """The patch embedding's convolution if it is a per-patch linear map (kernel = stride, no padding)."""
    proj = getattr(model.patch_embed, "proj", None)
    if type(proj) is not nn.Conv2d or getattr(model.patch_embed, "dynamic_img_pad", False):
        return None
    if proj.kernel_size != proj.stride or proj.padding != (0, 0) or proj.dilation != (1, 1) or proj.groups != 1:
        return None
    return proj


def _pixels_only(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether gradients are wanted for the pixels and for nothing in the model (inversion)."""
    return x.requires_grad and torch.is_grad_enabled() and not any(p.requires_grad for p in model.parameters())


def _tokens_with_patch_gradient(
    model: nn.Module, proj: nn.Conv2d, x: torch.Tensor, keep: torch.Tensor | None, picked: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`embed_tokens` then :func:`gather_tokens`, with the gradient to the pixels of the fed patches only.

    The values are the model's own, computed without a graph; the gradient comes from
    the same projection applied, as one matrix product, to the fed patches' pixels
    (``y + (z - z.detach())`` has the value of ``y`` and the gradient of ``z``), taken
    from ``x`` or given as ``picked`` (B, K, C, ph, pw). The convolution's backward over
    the whole image cost more than a 46-token DeiT-Tiny step's attention; this costs
    what the fed patches do. Exact because the projection acts on each patch alone and
    the positional embedding is added to the tokens.
    """
    with torch.no_grad():
        tokens = embed_tokens(model, x.detach())
    batch, channels = x.shape[:2]
    ph, pw = proj.kernel_size
    cells = x.unfold(2, ph, ph).unfold(3, pw, pw)  # (B, C, rows, cols, ph, pw), a view
    rows, cols = cells.shape[2:4]
    if keep is None:
        keep = torch.arange(rows * cols, device=x.device).expand(batch, -1)
    else:
        tokens = gather_tokens(tokens, keep, model.num_prefix_tokens)
    if picked is None:
        picked = cells[torch.arange(batch, device=x.device)[:, None], :, keep // cols, keep % cols]  # (B, K, C, ph, pw)
    linear = picked.reshape(*keep.shape, channels * ph * pw) @ proj.weight.reshape(proj.out_channels, -1).t()
    if proj.bias is not None:
        linear = linear + proj.bias
    linear = model.patch_embed.norm(linear)
    prefix = model.num_prefix_tokens
    return torch.cat([tokens[:, :prefix], tokens[:, prefix:] + (linear - linear.detach())], dim=1)


def input_tokens(
    model: nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None, pixel_grad: torch.Tensor | None = None
) -> torch.Tensor:
    """The token sequence entering the first block: prefix tokens, then the patches at ``keep`` (all if ``None``).

    ``pixel_grad`` (B, K, C, ph, pw), given, carries the gradient of the fed patches'
    pixels instead of ``x`` (see :func:`sparse_forward`).
    """
    proj = _patch_projection(model) if pixel_grad is not None or _pixels_only(model, x) else None
    if pixel_grad is not None and proj is None:
        raise ValueError("pixel_grad needs a patch embedding that is a per-patch projection")
    if proj is not None:
        tokens = _tokens_with_patch_gradient(model, proj, x, keep, pixel_grad)
    else:
        tokens = embed_tokens(model, x)
        if keep is not None:
            tokens = gather_tokens(tokens, keep, model.num_prefix_tokens)
    return model.norm_pre(model.patch_drop(tokens))


def head_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The classifier on the last block's output tokens: final norm, pooling, head."""
    return model.forward_head(model.norm(tokens))


def sparse_forward(
    model: nn.Module,
    x: torch.Tensor,
    keep: torch.Tensor | None = None,
    *,
    return_cls_attn: bool = False,
    pixel_grad: torch.Tensor | None = None,
) -> SparseOutput:
    """Run ``model`` on the patch tokens of ``x`` listed in ``keep``.

    Args:
        model: A timm ViT with a class token (see :func:`sparseinv.models.vit_info`).
        x: (B, 3, H, W) normalised images.
        keep: (B, K) long tensor of 0-based row-major patch indices to feed, per
            image; ``None`` feeds every patch (then the logits equal ``model(x)``).
        return_cls_attn: Also return the last block's CLS-to-patch attention,
            head-averaged. Costs an unfused attention in the last block only.
        pixel_grad: (B, K, C, ph, pw) tensors through which the gradient of the fed
            patches' pixels flows, in the order of ``keep``; their values are not used
            (the logits are those of ``x``). Inversion passes the kept pixels the fed
            cells show, so that it never needs a gradient for the whole image.

    Returns:
        SparseOutput with logits and, if asked, the CLS attention over fed patches.
    """
    num_prefix = model.num_prefix_tokens
    tokens = input_tokens(model, x, keep, pixel_grad)
    recorder = None
    blocks = list(model.blocks)
    for block in blocks[:-1]:
        tokens = block(tokens)
    if return_cls_attn:
        with AttentionRecorder(blocks[-1].attn) as recorder:
            tokens = blocks[-1](tokens)
    else:
        tokens = blocks[-1](tokens)
    logits = head_logits(model, tokens)
    cls_attn = None
    if recorder is not None:
        cls_attn = recorder.weights[:, :, 0, num_prefix:].mean(dim=1)
    return SparseOutput(logits=logits, cls_attn=cls_attn)


def logits(model: nn.Module, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``model``'s logits for normalised ``images``, fed the patches at ``keep`` (all if ``None``).

    The images and indices are moved to the model's device; the one way evaluation,
    calibration, distillation and the demo get a model's logits.
    """
    device = next(model.parameters()).device
    return sparse_forward(model, images.to(device), None if keep is None else keep.to(device)).logits
