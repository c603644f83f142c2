"""Pictures a person would rather look at than read."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from sparseinv.models import timm  # noqa: E402  (timm behind the torchvision shim)


def class_namer(model: nn.Module):
    """``index -> short name`` for the model's classes (ImageNet names when it has them)."""
    subset = timm.data.infer_imagenet_subset(model)
    if subset:
        info = timm.data.ImageNetInfo(subset)
        return lambda i: info.index_to_description(int(i)).split(",")[0]
    return lambda i: f"class {int(i)}"


def image_grid_png(images: torch.Tensor, titles: list[str], max_images: int = 64) -> bytes:
    """A PNG of up to ``max_images`` (N, 3, H, W) images in [0, 1], each titled."""
    count = min(len(titles), max_images)
    cols = min(8, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(count):
        ax = axes.flat[i]
        ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(titles[i][:18], fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
