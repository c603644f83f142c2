"""Real labelled image folders, timm's eval transform, and top-k evaluation.

Real images only ever *measure* data-free results (or make baselines and fixtures);
nothing here feeds a synthetic pool.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseinv.errors import UsageError, first_line
from sparseinv.models import timm
from sparseinv.vit.forward import logits

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def read_class_index(path: str | os.PathLike) -> dict[str, int]:
    """``folder name -> class index`` from a file whose line i starts with class i's folder name.

    ``imagenet_synsets.txt`` (``n01440764 tench``) is such a file.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"class index '{path}' does not exist.")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"class index '{path}' cannot be read as text ({type(err).__name__}).") from None
    names = [line.split()[0] for line in lines if line.strip()]
    if not names:
        raise UsageError(f"class index '{path}' is empty.")
    repeated = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if repeated is not None:
        raise UsageError(f"class index '{path}' names '{repeated}' twice.")
    return {name: i for i, name in enumerate(names)}


@dataclass
class ImageFolder:
    """Images in ``root/<class folder>/*`` with their class indices.

    Args:
        root: The folder of class sub-folders.
        class_index: ``folder name -> class index``; ``None`` numbers the sorted folders 0..C-1.
        limit_per_class: Keep only the first N images (sorted by name) of each class.
    """

    root: Path
    files: list[Path]
    labels: list[int]
    classes: list[str]

    @staticmethod
    def class_folders(root: str | os.PathLike) -> list[str]:
        """The class sub-folders' names, sorted."""
        root = Path(root)
        if not root.is_dir():
            raise UsageError(f"image folder '{root}' does not exist.")
        return sorted(d.name for d in root.iterdir() if d.is_dir())

    @classmethod
    def scan(cls, root: str | os.PathLike, class_index: dict[str, int] | None = None, limit_per_class: int | None = None) -> "ImageFolder":
        root = Path(root)
        classes = cls.class_folders(root)
        if class_index is None:
            class_index = {name: i for i, name in enumerate(classes)}
        missing = [c for c in classes if c not in class_index]
        if missing:
            raise UsageError(f"class folder '{missing[0]}' of '{root}' is not in the class map.")
        files, labels, skipped = [], [], 0
        for name in classes:
            entries = [p for p in (root / name).iterdir() if p.is_file() and not p.name.startswith(".")]
            found = sorted(p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES)
            skipped += len(entries) - len(found)
            found = found[:limit_per_class] if limit_per_class else found
            files += found
            labels += [class_index[name]] * len(found)
        if not files:
            raise UsageError(f"image folder '{root}' holds no images in class sub-folders.")
        if skipped:
            warnings.warn(f"skipped {skipped} file(s) in '{root}' that are not images ({', '.join(sorted(IMAGE_SUFFIXES))}).", stacklevel=2)
        return cls(root=root, files=files, labels=labels, classes=classes)

    def __len__(self) -> int:
        return len(self.files)


def eval_transform(model: nn.Module):
    """timm's evaluation transform for ``model`` (resize, center crop, normalise)."""
    config = timm.data.resolve_data_config(model=model)
    return timm.data.create_transform(**config, is_training=False)


class _TransformedFolder(torch.utils.data.Dataset):
    def __init__(self, folder: ImageFolder, transform) -> None:
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        from PIL import Image

        path = self.folder.files[i]
        try:
            with Image.open(path) as img:
                return self.transform(img.convert("RGB")), self.folder.labels[i]
        except (OSError, ValueError, SyntaxError) as err:  # PIL reports damage as any of these
            raise UsageError(f"image '{path}' cannot be read ({first_line(err)}).") from None


def load_images(folder: ImageFolder, model: nn.Module, batch_size: int = 64, workers: int = 0):
    """Yield (images, labels) batches of ``folder`` through timm's eval transform."""
    dataset = _TransformedFolder(folder, eval_transform(model))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


@torch.no_grad()
def topk_accuracy(logits_of, batches, *, total: int, progress: bool = True, desc: str = "evaluate") -> dict:
    """Top-1 and top-5 accuracy (percent) over (images, labels) batches.

    Args:
        logits_of: ``images -> logits`` (a model fed densely, an ONNX session, ...).
        batches: (images, labels) pairs.
        total: Number of batches, for the progress bar.
    """
    correct1 = correct5 = seen = 0
    for images, labels in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
        logits = logits_of(images)
        labels = labels.to(logits.device)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top5[:, 0] == labels).sum())
        correct5 += int((top5 == labels[:, None]).any(dim=1).sum())
        seen += labels.shape[0]
    return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen, "num_images": seen}


def _model_logits(model: nn.Module):
    model.eval()
    return lambda images: logits(model, images)


def evaluate(
    model: nn.Module,
    folder: ImageFolder,
    *,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict:
    """Top-1 and top-5 accuracy (percent) of ``model`` on ``folder``."""
    loader = load_images(folder, model, batch_size)
    return topk_accuracy(_model_logits(model), loader, total=len(loader), progress=progress, desc=desc)


def transform_folder(folder: ImageFolder, model: nn.Module, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``folder`` through timm's eval transform, as one (N, 3, H, W) tensor and (N,) labels.

    For evaluating many models on one small set: transform once, cache, reuse.
    """
    images, labels = zip(*load_images(folder, model, batch_size))
    return torch.cat(images), torch.cat(labels)


def evaluate_tensors(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict:
    """Top-1 and top-5 accuracy (percent) of ``model`` on already transformed ``images``."""
    batches = [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    return topk_accuracy(_model_logits(model), batches, total=len(batches), progress=progress, desc=desc)
