"""The same eight seeds inverted under each inversion prior, one row per setting: a picture.

    python benchmarks/priors_grid.py

Eight ImageNet DeiT-Tiny images (seed 0, the same labels and starting noise in every row)
with the settings of ``inversion_priors.py``: the default, PSAQ-ViT's patch-similarity
prior (``--patch-entropy 0.05``), Plug-In Inversion's colour shift (``--color-shift 0.5``)
and a schedule twice as long (800 steps). Stopped patches are black. Writes
``docs/inversion_priors.png``; the pools stay in the benchmark cache.
"""

from __future__ import annotations

from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from common import DEIT_TINY, DEIT_TINY_CKPT, ROOT, ensure_pool
from distill import _config

from sparseinv import load_model
from sparseinv.inversion.losses import InversionLoss
from sparseinv.inversion.schedule import PruneSchedule
from sparseinv.pool import read_pool
from sparseinv.viz import class_namer

N = 8


def main() -> None:
    base = _config(True, N, 0)
    base = replace(base, batch_size=N)
    rows = {
        "default": base,
        "--patch-entropy 0.05": replace(base, loss=InversionLoss(patch_entropy=0.05)),
        "--color-shift 0.5": replace(base, color_shift=0.5),
        "800 steps": replace(base, iterations=800, schedule=PruneSchedule.reference(800)),
    }
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    name = class_namer(model)
    fig, axes = plt.subplots(len(rows), N, figsize=(N * 1.5, len(rows) * 1.65), squeeze=False)
    for r, (label, config) in enumerate(rows.items()):
        slug = label.strip("-").replace(" ", "_").replace(".", "")
        pool = read_pool(ensure_pool(f"grid_{slug}", DEIT_TINY, DEIT_TINY_CKPT, config, model))
        for c in range(N):
            ax = axes[r, c]
            ax.imshow(pool.images[c].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name(pool.labels[c])[:16], fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    out = ROOT / "docs" / "inversion_priors.png"
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
