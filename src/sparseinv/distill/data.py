"""Training images for distillation, streamed from disk with fresh random augmentation every epoch.

A run holds file names and kept-patch lists, never the pixels of the whole set: each
step reads its batch from disk, so memory does not grow with the pool. Every image is
shifted and maybe mirrored at random (optionally first cropped, area and aspect ratio as
timm's training transform draws them), drawn anew each epoch from a generator seeded by
(seed, epoch, index): a resumed run, or one split over processes, sees exactly the views
an uninterrupted single process would.

A sparse image's stopped patches are black and carry nothing the teacher put there.
A shift or a crop moves the kept patches off the patch grid, so each model is fed the
``num_keep`` grid cells most covered by kept pixels (the same count for every image, so
batches stack), and nothing else.

Optionally a sample is mixed with a second image of the set (its partner drawn from the
same seeded generator): blended (mixup) or with a random box pasted from it (CutMix).
The teacher labels the mixed view itself, so no label is mixed; a sparse sample keeps
its own kept cells (the partner shows only where they lie).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sparseinv._torchvision_compat import ensure_torchvision_importable
from sparseinv.data import ImageFolder
from sparseinv.distill.config import MIXES
from sparseinv.errors import UsageError
from sparseinv.pool import PoolIndex, read_image

RATIO = (3 / 4, 4 / 3)  # timm's (and torchvision's) aspect ratio range for random-resized crops


@dataclass(frozen=True)
class Source:
    """One training image on disk.

    Attributes:
        path: The image file.
        keep: Its kept patches (a sparse pool image), or ``None`` (every pixel counts).
        grid: The patch grid ``keep`` indexes (rows, columns).
    """

    path: Path
    keep: tuple[int, ...] | None = None
    grid: tuple[int, int] | None = None


def pool_sources(pools: Sequence[PoolIndex]) -> list[Source]:
    """Every image of ``pools``, in order, with its kept patches if the pool is sparse.

    Raises:
        UsageError: sparse and dense pools mixed (a dense image has no kept patches to feed
            as tokens, a sparse one has black holes a dense feed would show).
    """
    if len({p.is_sparse for p in pools}) > 1:
        raise UsageError("cannot train on sparse and dense pools together: give pools of one kind.")
    out = []
    for pool in pools:
        grid = pool.record.grid_size
        for entry in pool.entries:
            keep = tuple(entry["kept_patches"]) if pool.is_sparse else None
            out.append(Source(pool.root / entry["file"], keep, grid if keep else None))
    return out


def folder_sources(folder: ImageFolder) -> list[Source]:
    """Real images of a folder (a reference to compare data-free images against)."""
    return [Source(Path(p)) for p in folder.files]


def crop_box(generator: torch.Generator, height: int, width: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized crop, drawn as torchvision's
    ``RandomResizedCrop.get_params`` draws it, from ``generator``."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        ratio = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
    # Fallback, as torchvision: the whole image cropped to the nearest allowed ratio.
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif in_ratio > RATIO[1]:
        h, w = height, round(height * RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def kept_pixel_mask(keep: Sequence[int], grid: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """(1, H, W) ones where the kept patches lie, zeros elsewhere."""
    cells = torch.zeros(grid[0] * grid[1])
    cells[list(keep)] = 1.0
    return F.interpolate(cells.view(1, 1, *grid), size=(height, width), mode="nearest")[0]


class TrainImages(torch.utils.data.Dataset):
    """``sources`` as (image, kept cells, index) samples, freshly augmented every epoch.

    Each draw: a random-resized crop (if ``crop_scale`` is given), a random circular shift
    by a whole number of patches, up to ``shift_patches`` each way, and a mirror with
    probability one half. Whole patches, because inverted images are made on the patch
    grid: the teacher keeps its label on its images shifted by whole patches, not always
    on images shifted by a few pixels (``benchmarks/results/distill_augment.json``).

    Args:
        sources: The images (see :func:`pool_sources`, :func:`folder_sources`).
        size: (height, width) the models take.
        patch_size: The models' patch size, which the kept cells index.
        num_keep: Cells to feed per sparse image (``None``: images are fed whole).
        crop_scale: Area range of the random crop (``None``: no cropping, the image resized whole).
        shift_patches: Largest shift, in patches (0: none).
        flip: Mirror half of the samples.
        seed: With the epoch (:meth:`set_epoch`) and the index, decides every draw.
        mix: ``mixup`` (blend with a partner image, weight uniform in [0, 1]), ``cutmix``
            (paste a partner's box of uniform area fraction) or ``none``.
        mix_prob: Fraction of the samples mixed.
    """

    def __init__(self, sources: Sequence[Source], size: tuple[int, int], patch_size: tuple[int, int], num_keep: int | None,
                 crop_scale: tuple[float, float] | None = None, shift_patches: int = 2, flip: bool = True, seed: int = 0,
                 mix: str = "none", mix_prob: float = 1.0) -> None:
        ensure_torchvision_importable()
        if mix not in MIXES:
            raise UsageError(f"unknown mix '{mix}': use {', '.join(MIXES)}.")
        self.sources, self.size, self.patch_size, self.num_keep = list(sources), tuple(size), tuple(patch_size), num_keep
        self.crop_scale = None if crop_scale is None else tuple(crop_scale)
        self.shift_patches, self.flip, self.seed = shift_patches, flip, seed
        self.mix, self.mix_prob = mix, mix_prob
        self.epoch = 0

    @property
    def augment(self) -> bool:
        return self.crop_scale is not None or self.shift_patches > 0 or self.flip

    @property
    def mixes(self) -> bool:
        return self.mix != "none" and self.mix_prob > 0 and len(self.sources) > 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _seed_of(self, i: int) -> int:
        """The seed of image ``i``'s draws this epoch."""
        return (self.seed * 1_000_003 + self.epoch) * 1_000_003 + i

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, mask = self.view(i)
        if self.mixes:
            generator = torch.Generator().manual_seed(self._seed_of(i) * 7 + 1)  # a stream apart from the view's
            if float(torch.rand(1, generator=generator)) < self.mix_prob:
                j = int(torch.randint(len(self.sources) - 1, (1,), generator=generator))
                other, _ = self.view(j + (j >= i))  # any image but this one
                image = mix_images(image, other, self.mix, generator)
        return image, self.kept_cells(mask), i

    def view(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image ``i`` augmented as this epoch draws it, and its kept-pixel mask (``None``: whole)."""
        from torchvision.transforms.v2 import functional as TF

        source = self.sources[i]
        image = read_image(source.path)
        height, width = image.shape[1:]
        mask = kept_pixel_mask(source.keep, source.grid, height, width) if source.keep is not None else None
        top, left, h, w, shift, mirror = 0, 0, height, width, (0, 0), False
        if self.augment:
            generator = torch.Generator().manual_seed(self._seed_of(i))
            if self.crop_scale is not None:
                top, left, h, w = crop_box(generator, height, width, self.crop_scale)
            r = self.shift_patches
            shift = tuple(int(torch.randint(-r, r + 1, (1,), generator=generator)) * p for p in self.patch_size)
            mirror = self.flip and bool(torch.randint(0, 2, (1,), generator=generator))
        if (top, left, h, w) != (0, 0, height, width) or (height, width) != self.size:
            image = TF.resized_crop(image, top, left, h, w, list(self.size), antialias=True).clamp(0, 1)
            if mask is not None:
                mask = TF.resized_crop(mask, top, left, h, w, list(self.size), antialias=True)
        if shift != (0, 0):
            image = torch.roll(image, shift, dims=(1, 2))
            mask = torch.roll(mask, shift, dims=(1, 2)) if mask is not None else None
        if mirror:
            image = image.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
        return image, mask

    def kept_cells(self, mask: torch.Tensor | None) -> torch.Tensor:
        """The ``num_keep`` cells most covered by kept pixels, sorted; empty when fed whole."""
        if self.num_keep is None or mask is None:
            return torch.empty(0, dtype=torch.long)
        coverage = F.avg_pool2d(mask[None], self.patch_size).flatten()
        # Ties (cells equally covered) go to the lower index, on every machine.
        order = torch.argsort(-coverage, stable=True)
        return order[: self.num_keep].sort().values


def mix_images(image: torch.Tensor, other: torch.Tensor, mix: str, generator: torch.Generator) -> torch.Tensor:
    """``image`` blended with ``other`` (``mixup``) or with a box of ``other`` pasted in (``cutmix``).

    The weight (mixup) or the box's area fraction (CutMix) is uniform in [0, 1], as
    Beta(1, 1) draws it in both papers; the box has the image's aspect ratio and a
    uniformly drawn centre, clipped at the border.
    """
    lam = float(torch.rand(1, generator=generator))
    if mix == "mixup":
        return lam * image + (1 - lam) * other
    height, width = image.shape[1:]
    cy, cx = (float(v) for v in torch.rand(2, generator=generator))
    h, w = height * math.sqrt(lam), width * math.sqrt(lam)
    top, bottom = max(0, round(cy * height - h / 2)), min(height, round(cy * height + h / 2))
    left, right = max(0, round(cx * width - w / 2)), min(width, round(cx * width + w / 2))
    out = image.clone()
    out[:, top:bottom, left:right] = other[:, top:bottom, left:right]
    return out


def loader(images: TrainImages, order: Sequence[int], batch_size: int, workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches of ``images`` in ``order`` (this process's share of the epoch's permutation)."""
    return torch.utils.data.DataLoader(images, batch_size=batch_size, sampler=list(order), num_workers=workers,
                                       persistent_workers=False)
