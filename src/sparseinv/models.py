"""Loading timm ViTs and reading what inversion needs to know about them.

Everything model-specific (normalisation, input size, patch grid, prefix tokens) is
read from the model itself, never from constants or its name.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparseinv._torchvision_compat import ensure_torchvision_importable
from sparseinv.errors import UsageError, first_line

ensure_torchvision_importable()
import timm  # noqa: E402  (needs the torchvision shim above)


@dataclass(frozen=True)
class ViTInfo:
    """Facts about a ViT that inversion and sparse feeding rely on.

    Attributes:
        mean: Per-channel normalisation mean of the model's input.
        std: Per-channel normalisation std.
        input_size: (channels, height, width) the model expects.
        patch_size: (height, width) of one patch in pixels.
        grid_size: (rows, cols) of the patch grid.
        num_prefix_tokens: CLS plus any distillation/register tokens, always kept.
        num_classes: Size of the classifier output.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int, int]
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]
    num_prefix_tokens: int
    num_classes: int

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def norm_tensors(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean`` and ``std`` as (1, 3, 1, 1) tensors: ``(pixels - mean) / std`` is the model's input."""
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return mean, std


def is_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a token-sequence ViT that the sparse forward pass can feed (:func:`vit_info` reads it)."""
    try:
        vit_info(model)
    except UsageError:
        return False
    return True


def vit_info(model: nn.Module) -> ViTInfo:
    """Read normalisation, geometry and prefix tokens from a timm ViT.

    Raises:
        UsageError: if the model is not a token-sequence ViT with a class token.
    """
    name = type(model).__name__
    needed = ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head")
    if not all(hasattr(model, attr) for attr in needed) or not hasattr(model.patch_embed, "grid_size"):
        raise UsageError(f"{name} is not a token-sequence ViT (patch embedding, blocks, head), so it cannot be inverted sparsely.")
    if getattr(model, "cls_token", None) is None:
        raise UsageError(f"{name} has no class token, so its patches cannot be scored by class-token attention.")
    if not hasattr(model.blocks[-1], "attn") or not hasattr(model.blocks[-1].attn, "attn_drop"):
        raise UsageError(f"{name}'s last block has no standard attention module, so its class-token attention cannot be read.")
    if not getattr(model, "num_classes", 0):
        raise UsageError(f"{name} has no classifier (num_classes is 0): inversion needs class logits; use a model with a head.")
    if hasattr(model, "rope"):  # timm's EVA family
        why = "uses rotary position embeddings" if model.rope is not None else "returns its positional embeddings with the tokens"
        raise UsageError(f"{name} (EVA family) {why}, which the sparse forward cannot give each kept token yet; it is not supported.")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN))
    std = tuple(float(v) for v in cfg.get("std", timm.data.IMAGENET_DEFAULT_STD))
    pe = model.patch_embed
    img_h, img_w = (int(v) for v in pe.img_size)
    patch = tuple(int(v) for v in pe.patch_size)
    if img_h % patch[0] or img_w % patch[1]:
        raise UsageError(f"image size {img_h}x{img_w} is not divisible by the patch size {patch[0]}x{patch[1]}.")
    return ViTInfo(
        mean=mean,
        std=std,
        input_size=(3, img_h, img_w),
        patch_size=patch,
        grid_size=tuple(int(v) for v in pe.grid_size),
        num_prefix_tokens=int(model.num_prefix_tokens),
        num_classes=int(model.num_classes),
    )


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    # timm training checkpoints: the EMA weights where there are some (what timm's validate.py prefers).
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            return state[key]
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights in a ``.safetensors`` or ``.pth`` file (a ``state_dict``/``model`` entry is unwrapped).

    Raises:
        UsageError: the file is missing, unreadable, or holds no dictionary of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint '{path}' does not exist.")
    try:
        state = _load_state_dict(path)
    except Exception as err:  # safetensors, pickle and zip readers each fail in their own way
        raise UsageError(f"checkpoint '{path}' is not a weights file ({first_line(err)}).") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"checkpoint '{path}' holds no dictionary of weight tensors.")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_model(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    pretrained: bool = True,
) -> nn.Module:
    """Create a timm ViT by name, load its weights, and put it in eval mode.

    Args:
        name: A timm model name, e.g. ``deit_tiny_patch16_224``.
        checkpoint: A ``.safetensors`` or ``.pth`` file with timm key names. ``None``
            loads timm's pretrained weights from the hub (needs a network).
        device: Where to put the model.
        num_classes: The classifier size; by default the checkpoint's own (a fine-tuned
            head loads as it is). A checkpoint with fewer blocks than the named model
            (a shallower student from ``sparseinv distill --depth``) loads at its depth.
        pretrained: With no checkpoint, ``False`` keeps random weights (speed tests).

    Raises:
        UsageError: unknown model, missing checkpoint, or weights that do not match.
    """
    check_model_name(name)
    state = read_state_dict(checkpoint) if checkpoint is not None else None
    shape = checkpoint_shape(state) if state is not None else {}
    kwargs = {}
    if num_classes is not None or "num_classes" in shape:
        kwargs["num_classes"] = num_classes if num_classes is not None else shape["num_classes"]

    def create(**extra) -> nn.Module:
        # Random weights are seeded, so every process of a run (and every run) gets the same model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return timm.create_model(name, pretrained=checkpoint is None and pretrained, **kwargs, **extra)

    try:
        model = create()
    except Exception as err:  # hub errors come in many types; all mean "no weights"
        if checkpoint is None and pretrained:
            raise UsageError(f"could not fetch pretrained weights for '{name}' ({type(err).__name__}); pass --checkpoint FILE.") from None
        raise
    blocks = getattr(model, "blocks", None)
    if "depth" in shape and isinstance(blocks, nn.Sequential) and len(blocks) != shape["depth"]:
        model = create(depth=shape["depth"])  # a shallower copy (sparseinv distill --depth)
    if state is not None:
        mismatch = state_mismatch(model, state)
        if mismatch:
            raise UsageError(f"checkpoint '{checkpoint}' does not match model '{name}': {mismatch}.")
        model.load_state_dict(state, strict=True)
    vit_info(model)  # refuse models we cannot invert before anyone spends time on them
    return model.to(device).eval()


def check_model_name(name: str) -> None:
    """Refuse a name timm cannot create: a model name, a pretrained tag (``name.tag``) or ``hf-hub:org/repo``."""
    if name.startswith("hf-hub:"):
        if "/" not in name[len("hf-hub:"):]:
            raise UsageError(f"'{name}' is not a hub name: write hf-hub:ORGANISATION/REPOSITORY.")
        return
    if name not in timm.list_models() and name not in timm.list_pretrained():
        raise UsageError(f"unknown model '{name}': not a timm model name or pretrained tag (see timm.list_models()).")


def state_mismatch(model: nn.Module, state: dict[str, torch.Tensor], limit: int = 3) -> str | None:
    """What keeps ``state`` from loading into ``model``: the tensors and shapes that differ, or ``None``."""
    own = model.state_dict()
    shapes = [f"{k} is {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
              for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    parts = shapes[:limit] + ([f"{len(shapes) - limit} more shapes differ"] if len(shapes) > limit else [])
    for what, keys in (("missing from the file", missing), ("not in the model", unexpected)):
        if keys:
            shown = ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
            parts.append(f"{len(keys)} {'tensor' if len(keys) == 1 else 'tensors'} {what} ({shown})")
    return "; ".join(parts) or None


def fingerprint_tensors(items) -> str:
    """sha256 of (name, tensor) pairs, in the order given: names, shapes, dtypes and values."""
    digest = hashlib.sha256()
    for name, tensor in items:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """The identity of a model's weights (every parameter and buffer), for records that must
    tell one checkpoint from another: a pool says which weights it was inverted from."""
    return fingerprint_tensors(sorted(model.state_dict().items()))


def checkpoint_shape(state: dict[str, torch.Tensor], classifier: str = "head") -> dict[str, int]:
    """What a checkpoint says about the model it fits: its class count and block count.

    Args:
        state: timm key names to tensors.
        classifier: The classifier's module path (``head`` for timm ViTs).

    Returns:
        ``num_classes`` (rows of ``<classifier>.weight``) and ``depth`` (blocks in
        ``blocks.N.``), each where the checkpoint has it.
    """
    out = {}
    weight = state.get(f"{classifier}.weight")
    if weight is not None and weight.dim() >= 1:
        out["num_classes"] = int(weight.shape[0])
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if blocks:
        out["depth"] = max(blocks) + 1
    return out
