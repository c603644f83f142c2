"""Which augmentations of inverted images keep the teacher's label: the basis of distill's default views.

    python benchmarks/distill_augment.py

The first 128 images of the cached 512-image sparse DeiT-Tiny pool (``distill.py``), each
augmented once per kind; the share the teacher still assigns to the image's own label,
fed as the cells most covered by kept pixels (tokens) and as the whole image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import CACHE, DEIT_TINY, DEIT_TINY_CKPT, write_results

from sparseinv import load_model
from sparseinv.distill import TrainImages, pool_sources
from sparseinv.distill.students import Feeder
from sparseinv.pool import open_pool

N = 128


def pixel_shifts(images: torch.Tensor, keep: torch.Tensor, reach: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Circular shifts by up to ``reach`` pixels each way, kept cells by coverage (not a distill option)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(len(images), 196)
    masks[torch.arange(len(images))[:, None], keep] = 1
    masks = F.interpolate(masks.view(-1, 1, 14, 14), size=(224, 224), mode="nearest")
    out, cells = [], []
    for x, m in zip(images, masks):
        shift = tuple(int(torch.randint(-reach, reach + 1, (1,), generator=g)) for _ in range(2))
        out.append(torch.roll(x, shift, (1, 2)))
        coverage = F.avg_pool2d(torch.roll(m, shift, (1, 2))[None], 16).flatten()
        cells.append(torch.argsort(-coverage, stable=True)[: keep.shape[1]].sort().values)
    return torch.stack(out), torch.stack(cells)


def main() -> None:
    teacher = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    pool = open_pool(CACHE / "pools" / "kt_sparse_512_s0")
    labels = torch.tensor([e["label"] for e in pool.entries[:N]])
    feed = Feeder(teacher, (224, 224), (16, 16))
    sources = pool_sources([pool])[:N]
    kinds = {
        "none": dict(crop_scale=None, shift_patches=0, flip=False),
        "mirror": dict(crop_scale=None, shift_patches=0, flip=True),
        "whole-patch shifts (up to 2 patches) + mirror (the default)": dict(crop_scale=None, shift_patches=2, flip=True),
        "random-resized crop 0.6-1 + mirror": dict(crop_scale=(0.6, 1.0), shift_patches=0, flip=True),
        "random-resized crop 0.25-1 + mirror": dict(crop_scale=(0.25, 1.0), shift_patches=0, flip=True),
        "random-resized crop 0.08-1 + mirror (timm's)": dict(crop_scale=(0.08, 1.0), shift_patches=0, flip=True),
    }
    rows = {}
    plain = None
    for name, kwargs in kinds.items():
        data = TrainImages(sources, (224, 224), (16, 16), pool.num_kept, seed=0, **kwargs)
        samples = [data[i] for i in range(N)]
        x, keep = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
        plain = (x, keep) if plain is None else plain
        with torch.no_grad():
            rows[name] = {"tokens": 100.0 * float((feed.logits(x, keep).argmax(1) == labels).float().mean()),
                          "whole image": 100.0 * float((feed.logits(x, None).argmax(1) == labels).float().mean())}
        print(name, rows[name], flush=True)
    for reach in (8, 28):
        x, keep = pixel_shifts(*plain, reach)
        with torch.no_grad():
            rows[f"pixel shifts up to {reach} px (coverage cells)"] = {
                "tokens": 100.0 * float((feed.logits(x, keep).argmax(1) == labels).float().mean()),
                "whole image": 100.0 * float((feed.logits(x, None).argmax(1) == labels).float().mean())}
        print(reach, rows[f"pixel shifts up to {reach} px (coverage cells)"], flush=True)
    write_results("distill_augment", {"images": N, "pool": "kt_sparse_512_s0 (first 128)", "label_kept_percent": rows})


if __name__ == "__main__":
    main()
