"""Are bf16 pools as useful as fp32 ones? W4/A8 and W4/A4 (recon) calibrated on each.

    python benchmarks/recon_settings.py   # makes the fp32 64-image sparse pool, if missing
    python benchmarks/bf16_quant.py [--seed N]

The fp32 pool is the first 32 images of ``imagenet_sparse_64``; the bf16 pool inverts the
same 32 labels and seeds (they depend on the image index only) with ``precision=bf16``
(attention fused or explicit as the probe finds faster: explicit on this project's CPU;
the pool's run.json says which).
Both are 400-iteration sparse pools (not 4000). Top-1 on 1000 imagenette val images.
Writes ``benchmarks/results/bf16_quant.json``. ``--seed N`` (N > 0) repeats it with other
labels and starting pixels: both 32-image pools made afresh with seed N, in this run's
code; writes ``bf16_quant_seedN.json``.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace

from common import DEIT_TINY, DEIT_TINY_CKPT, ensure_pool, machine, pool_config, write_results
from quantization import val_subset

from sparseinv import load_model
from sparseinv.data import evaluate_tensors
from sparseinv.pool import read_pool
from sparseinv.quant import QuantConfig, pool_batches, quantize_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="0: the first comparison (cached 64-image fp32 pool); N > 0: fresh pools with seed N")
    seed = parser.parse_args().seed
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    images, labels = val_subset(model, 100)
    config = pool_config(sparse=True, num_images=32, seed=seed)
    if seed == 0:
        fp32 = ensure_pool("imagenet_sparse_64", DEIT_TINY, DEIT_TINY_CKPT, pool_config(sparse=True, num_images=64), model)
    else:
        fp32 = ensure_pool(f"imagenet_sparse_32_fp32_seed{seed}", DEIT_TINY, DEIT_TINY_CKPT, config, model)
    suffix = f"_seed{seed}" if seed else ""
    bf16 = ensure_pool(f"imagenet_sparse_32_bf16{suffix}", DEIT_TINY, DEIT_TINY_CKPT, replace(config, precision="bf16"), model)
    payload = {"command": "python benchmarks/bf16_quant.py" + (f" --seed {seed}" if seed else ""), "machine": machine(),
               "scaled_down": True, "seed": seed,
               "note": "32-image sparse pools, 400 iterations; top-1 on 1000 val images", "pools": {}, "cells": {}}
    for name, path in (("fp32", fp32), ("bf16", bf16)):
        pool = read_pool(path)
        payload["pools"][name] = {"seconds_first_32": pool.run["batches"][0]["wall_seconds"],
                                  "success_rate_first_32": pool.run["batches"][0]["num_correct"] / 32,
                                  "precision": pool.run.get("precision")}
        batches = pool_batches(model, path, DEIT_TINY, 32, 32)
        for w, a in ((4, 8), (4, 4)):
            start = time.perf_counter()
            qmodel = quantize_(copy.deepcopy(model), QuantConfig.for_method("recon", w, a), batches, progress=False)
            fit = time.perf_counter() - start
            top1 = evaluate_tensors(qmodel, images, labels, progress=False)["top1"]
            payload["cells"][f"W{w}/A{a} {name}"] = {"top1": top1, "fit_seconds": fit}
            print(name, w, a, top1, flush=True)
            write_results("bf16_quant" + suffix, payload)


if __name__ == "__main__":
    main()
