"""Does W4/A4 reconstruction improve with more calibration images, real or inverted?

    python benchmarks/calibration_curve.py [--iters-per-image 0]

The default ``recon`` W4/A4 quantization of the ImageNet DeiT-Tiny, calibrated on 32, 128
and 512 images of: real photos (``train100``, spread over its ten classes) and sparse
inverted images (the first N of the 512-image pool of ``benchmarks/distill.py``; a second
seed at 32 and 128 from its 128-image pool). Top-1 (1000-way) on the first 100 val images
of each class, and the data-free yardstick: KL(full precision || quantized) on 64 held-out
inverted images of another seed.

If the real curve rises while the inverted one does not, the inverted images lack what the
real ones have; if neither rises, the reconstruction recipe is the limit. With
``--iters-per-image K`` the reconstruction takes ``max(300, K * N)`` steps per block, so a
larger set is visited as often as a small one (a second curve, cached separately).
Cells are cached in ``benchmarks/results/calibration_curve.json``; a rerun measures only
what is missing.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace

from common import DEIT_TINY, DEIT_TINY_CKPT, RESULTS, TRAIN100, write_results
from distill import pools
from quantization import heldout_kl, val_subset

from sparseinv import load_model
from sparseinv.data import evaluate_tensors
from sparseinv.quant import QuantConfig, calibration_batches, pool_batches, quantize_

SIZES = (32, 128, 512)


def cells(p) -> list[tuple[str, object, int]]:
    """(name, source, images) in the order that answers the question soonest."""
    out = []
    for n in SIZES:
        out += [(f"real {n}", str(TRAIN100), n), (f"sparse {n}", p["sparse"], n)]
    out += [(f"sparse seed 1 {n}", p["sparse_s1"], n) for n in (32, 128)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters-per-image", type=int, default=0,
                        help="reconstruction steps per block per calibration image (0: the default 300 steps whatever N)")
    parser.add_argument("--only", nargs="*", help="measure only these cells (e.g. 'sparse 128')")
    args = parser.parse_args()
    name = "calibration_curve" if args.iters_per_image == 0 else f"calibration_curve_ipi{args.iters_per_image}"
    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    p = pools()
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    images, labels = val_subset(model, 100)
    heldout = pool_batches(model, p["heldout"], DEIT_TINY, 64, 32)
    payload = {
        "scaled_down": True,
        "note": ("recon W4/A4 on the first 100 val images per class (1000 images); pools inverted with 400 steps, "
                 "precision auto, last-phase masks; real images are train100's (the ten evaluated classes); "
                 "heldout_kl on 64 inverted images of seed 7"),
        "iters_per_image": args.iters_per_image,
        "cells": old.get("cells", {}),
    }
    for key, source, n in cells(p):
        if key in payload["cells"] or (args.only and key not in args.only):
            continue
        config = QuantConfig.for_method("recon", 4, 4)
        if args.iters_per_image:
            config = replace(config, recon=replace(config.recon, iters=max(300, args.iters_per_image * n)))
        batches = calibration_batches(model, str(source), DEIT_TINY, n)
        start = time.perf_counter()
        qmodel = quantize_(copy.deepcopy(model), config, batches)
        fit = time.perf_counter() - start
        result = evaluate_tensors(qmodel, images, labels, desc=key)
        payload["cells"][key] = {"source": "real" if "real" in key else "sparse", "images": n, "top1": result["top1"],
                                 "heldout_kl": heldout_kl(qmodel, model, heldout), "fit_seconds": fit,
                                 "recon_iters": config.recon.iters}
        print(f"{key:<20} top-1 {result['top1']:5.1f}  KL {payload['cells'][key]['heldout_kl']:.3f}  fit {fit:5.0f} s", flush=True)
        write_results(name, payload)
    write_results(name, payload)


if __name__ == "__main__":
    main()
