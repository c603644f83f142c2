"""Calibration: where the images come from, and running them through the model.

A calibration source yields ``(images, keep)`` batches: normalised images and, for
a sparse pool, the kept patch indices (``None`` feeds every patch). Everything is
fed through :func:`sparseinv.vit.forward`, so a sparse synthetic image enters as
its kept tokens only, never as a picture with black squares.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseinv.data import ImageFolder, transform_folder
from sparseinv.errors import UsageError
from sparseinv.models import vit_info
from sparseinv.pool import open_pools, read_run
from sparseinv.quant.model import act_quantizers, quant_modules, set_quant_mode, weight_modules
from sparseinv.quant.quantizers import ActQuantizer, QuantLinear
from sparseinv.quant.reconstruct import reconstruct
from sparseinv.quant.reparam import fold_layernorms
from sparseinv.vit.forward import logits

Batch = tuple[torch.Tensor, torch.Tensor | None]


def _normalise(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    mean, std = vit_info(model).norm_tensors()
    return (images - mean) / std


def _split(images: torch.Tensor, keep: torch.Tensor | None, batch_size: int) -> list[Batch]:
    """Consecutive batches of ``images`` and, if any, their kept patches."""
    return [
        (images[i : i + batch_size], None if keep is None else keep[i : i + batch_size])
        for i in range(0, images.shape[0], batch_size)
    ]


def pool_batches(model: nn.Module, root: str | os.PathLike, model_name: str, num: int = 32, batch_size: int = 32,
                 allow_other_weights: bool = False) -> list[Batch]:
    """The first ``num`` images of a pool, normalised for ``model``, with their kept patches.

    Raises:
        UsageError: a pool :func:`~sparseinv.pool.open_pools` refuses for ``model``: from
            another model, or from other weights (unless ``allow_other_weights``).
    """
    pool = open_pools(root, model_name, model, role="model being quantized", allow_other_weights=allow_other_weights)[0]
    count = min(num, len(pool))
    images = _normalise(model, torch.stack([pool.read(i) for i in range(count)]))
    keep = torch.tensor([e["kept_patches"] for e in pool.entries[:count]]) if pool.is_sparse else None
    return _split(images, keep, batch_size)


def noise_batches(model: nn.Module, num: int = 32, batch_size: int = 32, seed: int = 0) -> list[Batch]:
    """Gaussian noise N(0, 1) in normalised space: the data-free floor."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num, *vit_info(model).input_size, generator=generator)
    return _split(images, None, batch_size)


def folder_batches(model: nn.Module, root: str | os.PathLike, num: int = 32, batch_size: int = 32) -> list[Batch]:
    """``num`` real images through timm's eval transform, spread over the classes.

    Takes the first image of every class, then the second, and so on (names sorted),
    so 32 images from 10 classes are 3 or 4 per class.

    Raises:
        UsageError: the folder holds no images in class sub-folders.
    """
    folder = ImageFolder.scan(root)
    by_class: dict[int, list[tuple[Path, int]]] = {}
    for path, label in zip(folder.files, folder.labels):
        by_class.setdefault(label, []).append((path, label))
    rounds = max(map(len, by_class.values()))
    order = [items[i] for i in range(rounds) for items in by_class.values() if i < len(items)][:num]
    chosen = replace(folder, files=[p for p, _ in order], labels=[c for _, c in order])
    images, _ = transform_folder(chosen, model, batch_size)
    return _split(images, None, batch_size)


def calibration_batches(model: nn.Module, source: str, model_name: str, num: int = 32, batch_size: int = 32, seed: int = 0,
                        allow_other_weights: bool = False) -> list[Batch]:
    """Resolve ``--calib``: ``noise``, a pool folder, or a folder of real images in class sub-folders."""
    if num < 1:
        raise UsageError(f"--num-calib {num} must be at least 1.")
    if source == "noise":
        return noise_batches(model, num, batch_size, seed)
    path = Path(source)
    if not path.is_dir():
        raise UsageError(f"--calib '{source}' is neither 'noise' nor a folder.")
    # A manifest without a run record is a damaged pool, not a folder of real images.
    if read_run(path) is not None or (path / "manifest.jsonl").exists():
        return pool_batches(model, path, model_name, num, batch_size, allow_other_weights)
    return folder_batches(model, path, num, batch_size)


def _one_batch(batches: list[Batch]) -> list[Batch]:
    """All batches as one, so a sequential calibration sees every image (they share a token count)."""
    keeps = [keep for _, keep in batches]
    counts = {None if k is None else k.shape[1] for k in keeps}
    if len(counts) > 1:
        raise UsageError("sequential calibration needs calibration images that all feed the same number of patches.")
    images = torch.cat([images for images, _ in batches])
    return [(images, None if keeps[0] is None else torch.cat(keeps))]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Batch], *, progress: bool = True) -> nn.Module:
    """Set every activation range of a :func:`quantize_`-d model from ``batches``.

    All batches are observed with the model in full precision, then each quantizer
    turns what it saw into its scale and zero point; with ``ln_reparam`` the
    per-channel post-LayerNorm ranges are folded into per-tensor ones. Weights are
    rounded to nearest, and the model is switched to fake-quantized inference.

    Args:
        model: A model prepared by :func:`sparseinv.quant.quantize_`.
        batches: ``(images, keep)`` pairs; ``keep`` (B, K) or ``None``.
        progress: Show a tqdm bar.
    """
    if any(m.fold_r1.numel() for m in weight_modules(model) if isinstance(m, QuantLinear)):
        raise RuntimeError("the model's LayerNorms are already folded: calibrate a freshly quantized copy")
    was_training = model.training
    model.eval()
    quantizers = act_quantizers(model)
    for q in quantizers:
        q.reset()
    sequential = model.quantization.config.sequential
    set_quant_mode(model, "init" if sequential else "observe")
    try:
        batches = _one_batch(list(batches)) if sequential else list(batches)
        for images, keep in tqdm(batches, desc="calibrate", disable=not progress, leave=False):
            logits(model, images, keep)
        missed = [name for name, m in quant_modules(model) if isinstance(m, ActQuantizer) and m.min_val is None and not m.calibrated]
        if missed:
            raise RuntimeError(f"calibration never reached these quantizers: {', '.join(missed[:5])}")
        if not sequential:
            for q in quantizers:
                q.finalize()
        if model.quantization.config.ln_reparam:
            fold_layernorms(model)
        for m in weight_modules(model):
            m.freeze_weight()
    except BaseException:
        set_quant_mode(model, "off")
        raise
    set_quant_mode(model, "quant")
    model.train(was_training)
    return model


def fit(model: nn.Module, batches: Iterable[Batch], *, progress: bool = True) -> nn.Module:
    """Everything the model's config asks for: :func:`calibrate`, then block reconstruction if any.

    The reconstruction losses per unit are kept in ``model.recon_report``.
    """
    batches = list(batches)
    calibrate(model, batches, progress=progress)
    recon = model.quantization.config.recon
    if recon is not None:
        model.recon_report = reconstruct(model, batches, recon, progress=progress)
    set_quant_mode(model, "quant")
    return model
