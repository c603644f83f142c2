"""Mixed views for the compression student: mixup and CutMix against plain views, equal steps.

    python benchmarks/distill_mix.py [--steps 400] [--with-512]

The compression protocol of ``distill.py`` (teacher: the ImageNet DeiT-Tiny; student: its
6-block copy, AdamW, token matching at every block as ``sparseinv distill --depth``
does) on the 128-image sparse pool of seed 1 from ``distill.py``'s cache, one cell per
way of drawing views: whole-patch shifts and mirrors (the default), then each sample
mixed with another pool image (mixup: a blend; CutMix: a pasted box), the teacher
labelling the mixed view. A mixed view is an image no inversion made: if mixing helps,
the student learns more per inverted image. Reported per cell: 1000-way top-1 on the
Imagenette val subset (measures only) and agreement with the teacher on held-out inverted
images of all classes (seed 7, never trained on; the data-free yardstick). ``--with-512``
adds the default, mixup, and mixup at a quarter of the learning rate on ``distill.py``'s
512-image pool (seed 0; made if missing).
"""

from __future__ import annotations

import argparse

import torch
from common import DEIT_TINY, DEIT_TINY_CKPT, write_results
from distill import agreement, pools, run_cell, sparse_images
from quantization import val_subset

from sparseinv import load_model
from sparseinv.data import evaluate_tensors
from sparseinv.distill import shallow_copy, spread_blocks

FEATURES = dict(feature_weight=1.0, feature_layers="blocks")  # the CLI's default for shallower students
MIXES = {"shifts + mirrors (default)": {}, "+ mixup": dict(mix="mixup"), "+ CutMix": dict(mix="cutmix")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps of 32 images per cell")
    parser.add_argument("--per-class", type=int, default=100, help="val images per Imagenette class")
    parser.add_argument("--with-512", action="store_true", help="also train on the 512-image sparse pool (default and mixup)")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    val = val_subset(teacher, args.per_class)
    p = pools("sparse_s1", "heldout", *(["sparse"] if args.with_512 else []))
    images = sparse_images(p["sparse_s1"], 128)
    six = shallow_copy(teacher, spread_blocks(len(teacher.blocks), 6))
    start = {"top1": evaluate_tensors(six, *val, progress=False)["top1"], "agreement": agreement(six, teacher, p["heldout"])}
    rows = {name: run_cell("sparse 128 seed 1", "compression", images, teacher, p, val, args.steps, **FEATURES, **extra)
            for name, extra in MIXES.items()}
    if args.with_512:
        images = sparse_images(p["sparse"], 512)
        for name in ("shifts + mirrors (default)", "+ mixup"):
            rows[f"512 images: {name}"] = run_cell("sparse 512", "compression", images, teacher, p, val, args.steps, **FEATURES,
                                                   **MIXES[name])
        # A next idea for the real-image top-1: a gentler rate keeps more of what the copy already knows.
        for label, lr in (("5e-5", 5e-5), ("2e-5", 2e-5)):
            rows[f"512 images: + mixup, lr {label}"] = run_cell("sparse 512", "compression", images, teacher, p, val, args.steps,
                                                              **FEATURES, **MIXES["+ mixup"], lr=lr)
    write_results("distill_mix", {"steps": args.steps, "with_512": args.with_512, "val_images": len(val[1]), "start": start, "rows": rows,
                                  "scaled_down": "128 (with --with-512 also 512) inverted images of 400 steps; 400 training steps of 32"})


if __name__ == "__main__":
    main()
