"""Dense, sparse (Sparse Model Inversion, the default) and Patch Rebirth inversion of DeiT-Tiny on one harness.

    python benchmarks/strategies.py [--per-class 30] [--only sparse rebirth]

Each strategy inverts 32 images at the scaled protocol (400 iterations), with the
command line's defaults: sparse = the reference stops scaled to the run (5/10/20/30,
last-phase mask), rebirth = ``--schedule rebirth`` (detach 25% of all patches at
40/80/160, the last quarter at the end; see docs/rebirth.md), dense = every patch every
step. ``rebirth-harvest`` takes the first 8 rebirth trajectories and makes each
detachment a sample of its own (4 x 8 = 32 sparse images of 49 patches), so it costs a
quarter of the rebirth pool's inversion time; ``rebirth-harvest-time`` harvests as many
trajectories as fit in the sparse source's inversion time (equal time: every sample calibrates).

For each source: seconds of inversion per image, and W4/A8 and W4/A4 post-training
top-1 (``quantize``'s default method, 32 calibration images) evaluated on the first
``--per-class`` images per class of imagenette val (reported) and of train100 (the
yardstick that chooses defaults). Cells are written to
``benchmarks/results/strategies.json`` as they are measured; a later run keeps them.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from common import DEIT_TINY, DEIT_TINY_CKPT, POOL_ITERATIONS, RESULTS, TRAIN100, VAL, ensure_pool, image_subset, write_results

from sparseinv import InversionConfig, PruneSchedule, load_model, read_pool, vit_info
from sparseinv.data import evaluate_tensors
from sparseinv.quant import QuantConfig, pool_batches, quantize_
from sparseinv.quant.config import DEFAULT_METHOD

NUM_CALIB = 32
BITS = ((4, 8), (4, 4))
SOURCES = ("sparse", "rebirth", "rebirth-harvest", "dense", "rebirth-harvest-time")


def config(strategy: str, seed: int = 0) -> InversionConfig:
    schedules = {"dense": PruneSchedule(), "sparse": PruneSchedule.reference(POOL_ITERATIONS),
                 "rebirth": PruneSchedule.rebirth(POOL_ITERATIONS)}
    return InversionConfig(num_images=NUM_CALIB, batch_size=NUM_CALIB, iterations=POOL_ITERATIONS, schedule=schedules[strategy],
                           strategy="rebirth" if strategy == "rebirth" else "stop", seed=seed)


def pool_name(strategy: str, seed: int = 0) -> str:
    return f"strategies-{strategy}-{NUM_CALIB}-it{POOL_ITERATIONS}" + (f"-s{seed}" if seed else "")


def harvest_samples(model, root, trajectories: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each detachment of the first ``trajectories`` rebirth images as a sample: (pixels in [0, 1], its
    patches only, the rest black; the patch indices it holds)."""
    pool = read_pool(root)
    info = vit_info(model)
    rows, cols = info.grid_size
    (ph, pw) = info.patch_size
    samples = []
    for image, steps in zip(pool.images[:trajectories], pool.detached_at[:trajectories]):
        for step in sorted(set(steps.tolist())):
            keep = torch.nonzero(steps == step).flatten()
            cells = torch.zeros(rows * cols, dtype=torch.bool)
            cells[keep] = True
            mask = cells.view(rows, cols).repeat_interleave(ph, 0).repeat_interleave(pw, 1)
            samples.append((image * mask, keep))
    if len({len(k) for _, k in samples}) > 1:
        raise SystemExit("harvested detachments differ in size; the schedule must detach equal shares")
    return samples


def harvest(model, root, trajectories: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`harvest_samples` as normalised calibration batches of ``NUM_CALIB``."""
    samples = harvest_samples(model, root, trajectories)
    mean, std = vit_info(model).norm_tensors()
    images = (torch.stack([image for image, _ in samples]) - mean) / std
    keeps = torch.stack([keep for _, keep in samples])
    return [(images[i : i + NUM_CALIB], keeps[i : i + NUM_CALIB]) for i in range(0, len(keeps), NUM_CALIB)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=30, help="val and train100 images per class to evaluate on (default 30)")
    parser.add_argument("--only", nargs="*", choices=SOURCES, help="measure only these sources")
    parser.add_argument("--bits", nargs="*", default=[f"{w}/{a}" for w, a in BITS], metavar="W/A",
                        help="bit-widths to measure, in this order (default 4/8 4/4)")
    parser.add_argument("--seed", type=int, default=0, help="pools' seed (labels, pixels); other seeds write strategies_seed<N>.json")
    args = parser.parse_args()
    name = "strategies" + (f"_seed{args.seed}" if args.seed else "")
    previous = RESULTS / f"{name}.json"
    old = json.loads(previous.read_text()) if previous.is_file() else {}
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    sets = {"val": image_subset(model, VAL, args.per_class, "val"), "train100": image_subset(model, TRAIN100, args.per_class, "train100")}
    keep_old = old.get("per_class") == args.per_class
    payload = {
        "scaled_down": True,
        "note": (f"DeiT-Tiny, {NUM_CALIB} calibration images, {POOL_ITERATIONS} inversion iterations (not 4000), top-1 (1000-way) "
                 f"on the first {args.per_class} images per class of imagenette val (report) and train100 (chooses defaults); "
                 "seconds per image = the pool's inversion wall time / its images (for rebirth-harvest: 8 trajectories' time / 32)"),
        "model": DEIT_TINY, "per_class": args.per_class, "num_calib": NUM_CALIB, "pool_iterations": POOL_ITERATIONS,
        "quant_method": DEFAULT_METHOD,
        "seed": args.seed,
        "settings": {s: config(s, args.seed).record() for s in ("dense", "sparse", "rebirth")},
        "full_precision": (old.get("full_precision") if keep_old else None)
        or {name: evaluate_tensors(model, *data, desc=f"full precision {name}")["top1"] for name, data in sets.items()},
        "sources": old.get("sources", {}) if keep_old else {},
        "cells": old.get("cells", {}) if keep_old else {},
    }
    write_results(name, payload)
    for source in SOURCES:
        if args.only and source not in args.only:
            continue
        strategy = "rebirth" if source.startswith("rebirth") else source
        path = ensure_pool(pool_name(strategy, args.seed), DEIT_TINY, DEIT_TINY_CKPT, config(strategy, args.seed), model=model)
        run = json.loads((path / "run.json").read_text())
        per_image = run["wall_seconds"] / run["num_images"]
        if source.startswith("rebirth-harvest"):
            trajectories = NUM_CALIB // 4
            if source == "rebirth-harvest-time":  # the trajectories that fit in the sparse images' inversion time
                trajectories = int(payload["sources"]["sparse"]["inversion_seconds_for_calib"] // per_image)
            batches = harvest(model, path, trajectories)
            per_image = per_image / 4  # a trajectory's time over its four samples
        else:
            batches = pool_batches(model, path, DEIT_TINY, NUM_CALIB, NUM_CALIB)
        kept = batches[0][1].shape[1] if batches[0][1] is not None else vit_info(model).num_patches
        # Patch tokens fed over the run, per output image: the cost without the machine's load in it.
        cfg = config(strategy, args.seed)
        token_steps = sum(n * (end - start) for n, (start, end) in
                          zip(run["tokens_per_phase"], cfg.schedule.phase_bounds(cfg.iterations)))
        if source.startswith("rebirth-harvest"):
            token_steps /= 4
        num_calib = sum(len(images) for images, _ in batches)
        payload["sources"][source] = {"pool": path.name, "seconds_per_image": per_image, "inversion_seconds_for_calib": per_image * num_calib,
                                      "num_calib": num_calib,
                                      "token_steps_per_image": token_steps,
                                      "patches_fed": kept, "success_rate": run["success_rate"], "tokens_per_phase": run["tokens_per_phase"]}
        write_results(name, payload)
        for w, a in (tuple(int(b) for b in bits.split("/")) for bits in args.bits):
            key = f"{source} W{w}/A{a}"
            if key in payload["cells"]:
                continue
            qconfig = QuantConfig.for_method(DEFAULT_METHOD, w, a)
            torch.manual_seed(0)
            start = time.perf_counter()
            qmodel = quantize_(copy.deepcopy(model), qconfig, batches)
            fit = time.perf_counter() - start
            top1 = {name: evaluate_tensors(qmodel, *data, desc=f"{key} {name}")["top1"] for name, data in sets.items()}
            payload["cells"][key] = {"source": source, "w_bits": w, "a_bits": a, "top1_val": top1["val"], "top1_train100": top1["train100"],
                                     "fit_seconds": fit, "inversion_seconds": per_image * num_calib, "num_calib": num_calib}
            print(f"{key:<26} val {top1['val']:6.2f}  train100 {top1['train100']:6.2f}  fit {fit:5.0f} s  "
                  f"inversion {per_image * num_calib:5.0f} s", flush=True)
            write_results(name, payload)
    write_results(name, payload)


if __name__ == "__main__":
    main()
