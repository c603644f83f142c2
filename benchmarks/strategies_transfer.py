"""Dense, sparse (SMI) and Patch Rebirth images as knowledge-transfer data, on one harness.

    python benchmarks/strategies_transfer.py --protocol compression|quantized|paper [--seed 1]

The knowledge-transfer yardsticks of ``benchmarks/distill.py``, fed the images of each
inversion strategy of ``benchmarks/strategies.py`` (32 images or trajectories, 400
iterations, the command line's defaults for each strategy):

* compression: the ImageNet DeiT-Tiny teaches its 6-block copy, trained as
  ``sparseinv distill --depth 6`` trains by default (400 steps of 32); the very pools
  ``strategies.py`` calibrates quantizers on. 1000-way top-1 on the first 100 val images
  per Imagenette class (reported), on the first 30 train100 images per class (the
  yardstick that chooses defaults), and agreement with the teacher on held-out sparse
  images (``distill.py``'s 64-image pool, another seed).
* quantized: the same pools teach the W4/A4 post-training model (``recon``, calibrated on
  32 sparse images of ``distill.py``'s pool), trained as ``sparseinv distill --quantized``
  trains by default (400 steps of 32); same evaluation as compression.
* paper: the 10-class Imagenette teacher of ``make_teacher.py`` inverts its own pools of
  each strategy; the ImageNet backbone, frozen, learns a fresh 10-way head from them
  (200 steps of 32, a linear probe). 10-way top-1 on val; train100 is the teacher's own
  training set, so it is printed but chooses nothing here.

Sources: ``sparse`` (SMI's 46-patch images), ``rebirth`` (one composite image per
trajectory, every patch), ``rebirth-harvest`` (the first 8 trajectories, each detachment
group a 49-patch sample of its own: 32 samples), ``rebirth-harvest-time`` (as many
trajectories as fit in the sparse images' inversion time) and ``dense``. ``--seed 1``
uses ``strategies.py --seed 1``'s pools (sparse and rebirth; ImageNet teacher only). Every cell trains
the same number of steps, so rows differ only by their images. Cells are cached
(``benchmarks/cache/distill_cells/``) and collected in
``benchmarks/results/strategies_<protocol>[_seed<N>].json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from common import CACHE, DEIT_TINY, DEIT_TINY_CKPT, RESULTS, TRAIN100, ensure_pool, image_subset, write_results
from distill import DEPTH_DEFAULTS, QUANTIZED_DEFAULTS, agreement, pools, quantized_start, run_cell
from PIL import Image
from quantization import val_subset
from strategies import NUM_CALIB, config, harvest_samples

from sparseinv import load_model, vit_info
from sparseinv.data import evaluate_tensors
from sparseinv.distill import DistillConfig, Images, shallow_copy, spread_blocks
from sparseinv.distill.config import QUANTIZED_ATTENTION
from sparseinv.distill.data import Source
from sparseinv.pool import open_pool

SOURCES = ("sparse", "rebirth-harvest", "rebirth-harvest-time", "rebirth", "dense")
STEPS = {"compression": 400, "quantized": 400, "paper": 200}
# What `sparseinv distill --quantized` trains with by default (DistillConfig.for_student("quantized")).
QUANTIZED_CLI = {**QUANTIZED_DEFAULTS, "attention_weight": QUANTIZED_ATTENTION, "attention_form": DistillConfig.attention_form}


def pool_path(protocol: str, strategy: str, teacher, checkpoint: Path, seed: int = 0) -> Path:
    """The strategy's 32-image pool of this protocol's teacher (the ImageNet one's is strategies.py's own)."""
    name = f"strategies{'10' if protocol == 'paper' else ''}-{strategy}-{NUM_CALIB}-it400" + (f"-s{seed}" if seed else "")
    return ensure_pool(name, DEIT_TINY, checkpoint, config(strategy, seed), model=teacher)


def seconds_per_image(pool: Path) -> float:
    run = json.loads((pool / "run.json").read_text())
    return run["wall_seconds"] / run["num_images"]


def harvested_images(model, pool: Path, trajectories: int) -> Images:
    """The harvested samples as sparse training images, written once as PNGs beside the pool."""
    folder = CACHE / "harvest" / f"{pool.name}-{trajectories}"
    samples = harvest_samples(model, pool, trajectories)
    info = vit_info(model)
    sources = []
    for i, (image, keep) in enumerate(samples):
        path = folder / f"{i:06d}.png"
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(path)
        sources.append(Source(path, tuple(keep.tolist()), tuple(info.grid_size)))
    return Images(sources, tuple(info.input_size[1:]), tuple(info.patch_size), len(samples[0][1]), [str(folder)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=tuple(STEPS), required=True)
    parser.add_argument("--only", nargs="*", choices=SOURCES, help="measure only these sources")
    parser.add_argument("--seed", type=int, default=0, help="the pools' seed (strategies.py --seed N's pools)")
    args = parser.parse_args()
    if args.seed and args.protocol == "paper":
        parser.error("--seed is for the ImageNet teacher's protocols (compression, quantized)")
    torch.manual_seed(0)
    imagenet = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    val = val_subset(imagenet, 100)
    yardstick = image_subset(imagenet, TRAIN100, 30, "train100")
    steps = STEPS[args.protocol]
    name = f"strategies_{args.protocol}" + (f"_seed{args.seed}" if args.seed else "")
    old_path = RESULTS / f"{name}.json"
    old = json.loads(old_path.read_text()) if old_path.is_file() else {}
    payload = {"protocol": args.protocol, "seed": args.seed, "steps": steps, "batch_size": 32, "val_images": len(val[1]),
               "train100_images": len(yardstick[1]), "num_trajectories": NUM_CALIB, "rows": old.get("rows", {})}
    if args.protocol in ("compression", "quantized"):
        teacher, checkpoint = imagenet, DEIT_TINY_CKPT
        p = pools("heldout")
        if args.protocol == "compression":
            overrides, start = DEPTH_DEFAULTS, shallow_copy(teacher, spread_blocks(len(teacher.blocks), 6))
        else:
            p["sparse"] = CACHE / "pools" / "kt_sparse_512_s0"  # the post-training start's calibration images
            overrides, start = QUANTIZED_CLI, quantized_start(teacher, p, 4, 4)
        payload["start"] = {"top1": evaluate_tensors(start, *val, progress=False)["top1"],
                            "train100_top1": evaluate_tensors(start, *yardstick, progress=False)["top1"],
                            "agreement": agreement(start, teacher, p["heldout"])}
        payload["trained_as"] = f"sparseinv distill --{'depth 6' if args.protocol == 'compression' else 'quantized'} defaults: " + json.dumps(overrides)
    else:
        import make_teacher

        meta = make_teacher.main(val)
        checkpoint = make_teacher.TEACHER_CKPT
        teacher = load_model(DEIT_TINY, checkpoint)
        ten = lambda data: (data[0], make_teacher.ten_way(data[1], meta["classes"]))  # noqa: E731
        val, yardstick = ten(val), ten(yardstick)
        p, overrides = {}, {}
        payload["teacher"] = {k: meta.get(k) for k in ("val_top1", "seconds", "recipe")}
        payload["trained_as"] = "linear probe: the ImageNet backbone frozen under a fresh 10-way head"
    write_results(name, payload)
    paths = {s: pool_path(args.protocol, s, teacher, checkpoint, args.seed) for s in ("sparse", "rebirth", "dense")
             if not args.only or any(o.startswith(s) for o in args.only)}
    for source in SOURCES:
        if args.only and source not in args.only:
            continue
        strategy = "rebirth" if source.startswith("rebirth") else source
        path = paths[strategy]
        per_image = seconds_per_image(path)
        if source.startswith("rebirth-harvest"):
            trajectories = NUM_CALIB // 4
            if source == "rebirth-harvest-time":
                trajectories = int(seconds_per_image(pool_path(args.protocol, "sparse", teacher, checkpoint, args.seed)) * NUM_CALIB // per_image)
            images = harvested_images(teacher, path, trajectories)
            inversion = per_image * trajectories
        else:
            images = Images.from_pools([open_pool(path)])
            inversion = per_image * len(images.sources)
        cell = f"strategies {source} {len(images.sources)}" + (f" seed {args.seed}" if args.seed else "")
        bits = {"bits": (4, 4)} if args.protocol == "quantized" else {}
        row = run_cell(cell, args.protocol, images, teacher, p, val, steps, yardstick=yardstick, **bits, **overrides)
        payload["rows"][source] = {**row, "source": source, "pool": path.name, "inversion_seconds": inversion,
                                   "patches_fed": images.num_keep or vit_info(teacher).num_patches}
        print(f"{args.protocol} {source:<22} images {len(images.sources):3d}  val {row['top1']:5.1f}  "
              f"train100 {row['train100_top1']:5.1f}  inversion {inversion:5.0f} s", flush=True)
        write_results(name, payload)


if __name__ == "__main__":
    main()
