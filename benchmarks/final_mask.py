"""The output mask of sparse images: re-scored densely (the paper's rule) or the last phase's patches.

    python benchmarks/recon_settings.py   # makes the 64-image sparse pool (rescore rule), if missing
    python benchmarks/final_mask.py [--seed N]

1. Success rate at the demo's size (10 Imagenette classes, 200 steps) with the paper's
   ratio 0.3 at stops 20/40/60/80, both rules, same seeds.
2. W4/A8 (recon) from 32 sparse images, 400 steps, same labels and seeds: the first 32
   images of ``imagenet_sparse_64`` (rescore) against a pool made with ``last-phase``.
   Top-1 on 1000 imagenette val images. Writes ``benchmarks/results/final_mask.json``.

``--seed N`` (N > 0) repeats both parts with other labels and starting pixels: both
32-image pools are made afresh with seed N; writes ``final_mask_seedN.json``.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import replace

from common import DEIT_TINY, DEIT_TINY_CKPT, ensure_pool, machine, pool_config, write_results
from quantization import val_subset

from sparseinv import InversionConfig, PruneSchedule, invert, load_model
from sparseinv.data import evaluate_tensors
from sparseinv.runs.demo import IMAGENETTE
from sparseinv.pool import read_pool
from sparseinv.quant import QuantConfig, pool_batches, quantize_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="0: the first comparison (cached 64-image pool); N > 0: fresh pools with seed N")
    seed = parser.parse_args().seed
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    command = "python benchmarks/final_mask.py" + (f" --seed {seed}" if seed else "")
    payload = {"command": command, "machine": machine(), "scaled_down": True, "seed": seed, "demo_size": {}, "w4a8": {}}
    for rule in ("rescore", "last-phase"):
        config = InversionConfig(num_images=10, batch_size=10, iterations=200, schedule=PruneSchedule((20, 40, 60, 80), (0.3,) * 4),
                                 classes=IMAGENETTE, final_mask=rule, seed=seed)
        run = invert(model, config, progress=False).run
        payload["demo_size"][rule] = {"success_rate": run["success_rate"], "seconds": run["wall_seconds"]}
        print(rule, payload["demo_size"][rule], flush=True)
    images, labels = val_subset(model, 100)
    if seed == 0:
        pools = {"rescore": ensure_pool("imagenet_sparse_64", DEIT_TINY, DEIT_TINY_CKPT, pool_config(sparse=True, num_images=64), model),
                 "last-phase": ensure_pool("imagenet_sparse_32_last_phase", DEIT_TINY, DEIT_TINY_CKPT,
                                           replace(pool_config(sparse=True, num_images=32), final_mask="last-phase"), model)}
    else:
        pools = {rule: ensure_pool(f"imagenet_sparse_32_{rule.replace('-', '_')}_seed{seed}", DEIT_TINY, DEIT_TINY_CKPT,
                                   replace(pool_config(sparse=True, num_images=32, seed=seed), final_mask=rule), model)
                 for rule in ("rescore", "last-phase")}
    for rule, path in pools.items():
        first = read_pool(path).run["batches"][0]
        qmodel = quantize_(copy.deepcopy(model), QuantConfig.for_method("recon", 4, 8), pool_batches(model, path, DEIT_TINY, 32, 32), progress=False)
        payload["w4a8"][rule] = {"top1": evaluate_tensors(qmodel, images, labels, progress=False)["top1"],
                                 "success_rate_first_32": first["num_correct"] / 32}
        print(rule, payload["w4a8"][rule], flush=True)
        write_results("final_mask" + (f"_seed{seed}" if seed else ""), payload)


if __name__ == "__main__":
    main()
