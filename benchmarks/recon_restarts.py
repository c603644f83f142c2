"""Can a data-free yardstick pick the better of several W4/A4 reconstructions of the same images?

    python benchmarks/recon_restarts.py [--pool NAME ...] [--seeds 0 1 ...] [--shard I/N]

One W4/A4 ``recon`` reconstruction of DeiT-Tiny moves by several points with its seed alone
(``calibration_images.py``: 48.0 to 57.5 on the yardstick over two pools and two seeds). If a
data-free measure ranks the seeds as real images do, running N reconstructions and keeping the
best is a cheap way up. Each reconstruction seed of one calibration pool (32 sparse images,
``calibration_images.py``'s ``calib_reference_fp32`` pools) is scored by:

* ``heldout_kl``: KL(full precision || quantized) on 64 held-out inverted images (pool
  ``kt_sparse_64_s7``, made by ``distill.py``; never used to calibrate): data-free;
* ``recon_loss``: the reconstruction's own final loss, summed over its units: free, data-free;
* top-1 on train100's first 20 per class (the yardstick) and val's first 100 per class.

Then, for N = 2 and 4, the mean over every N-subset of seeds of the top-1 of the seed each
data-free measure picks, beside the subsets' mean (one reconstruction) and best (an oracle).
Each seed is cached as it finishes (``benchmarks/cache/recon_restarts``); run ``--shard 0/2`` and
``--shard 1/2`` (one process per core: every other seed), then no ``--shard`` to gather and write the file.
Results: ``benchmarks/results/recon_restarts.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys

import torch
from calibration_images import reconstruction
from common import CACHE, DEIT_TINY, DEIT_TINY_CKPT, TRAIN100, image_subset, write_results
from quantization import heldout_kl, val_subset

from sparseinv import load_model
from sparseinv.quant import pool_batches

NUM = 32
HELDOUT = "kt_sparse_64_s7"
MEASURES = ("heldout_kl", "recon_loss")  # lower is better


def cell(teacher, pool: str, seed: int, batches, heldout, yardstick, val) -> dict:
    def measures(model) -> dict:
        return {"heldout_kl": heldout_kl(model, teacher, heldout), "recon_loss": sum(r["loss_after"] for r in model.recon_report)}
    return reconstruction(f"{pool}-seed{seed}", teacher, batches, {"seed": seed}, yardstick, val, folder="recon_restarts", measures=measures)


def picks(seeds: dict[int, dict], n: int) -> dict:
    """Mean top-1 over every n-subset of seeds: of the seed each measure picks, of the subset, of its best."""
    subsets = list(itertools.combinations(seeds, n))
    out = {}
    for score in ("train100_top1", "val_top1"):
        row = {"one reconstruction": statistics.mean(seeds[s][score] for s in seeds),
               "oracle": statistics.mean(max(seeds[s][score] for s in sub) for sub in subsets)}
        for measure in MEASURES:
            row[f"lowest {measure}"] = statistics.mean(seeds[min(sub, key=lambda s: seeds[s][measure])][score] for sub in subsets)
        out[score] = {k: round(v, 2) for k, v in row.items()}
    return out


def rank_correlation(xs: list[float], ys: list[float]) -> float:
    """Spearman's rho (average ranks for ties)."""
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        r = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", nargs="+", default=["calib_reference_fp32", "calib_reference_fp32_s1"], help="calibration pools")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(8)), help="reconstruction seeds (default 0-7)")
    parser.add_argument("--shard", default="0/1", help="I/N: reconstruct every N-th seed from the I-th and write no results (one process per core)")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = load_model(DEIT_TINY, DEIT_TINY_CKPT).eval()
    yardstick, val = image_subset(teacher, TRAIN100, 20, "train100"), val_subset(teacher, 100)
    heldout = pool_batches(teacher, CACHE / "pools" / HELDOUT, DEIT_TINY, 64, 32)
    index, count = map(int, args.shard.split("/"))
    pools = {}
    for pool in args.pool:
        batches = pool_batches(teacher, CACHE / "pools" / pool, DEIT_TINY, NUM, NUM)
        seeds = {seed: cell(teacher, pool, seed, batches, heldout, yardstick, val) for seed in args.seeds[index::count]}
        if count > 1:
            continue  # a shard: its cells are cached, the gathering run writes the file
        pools[pool] = {
            "seeds": seeds,
            "spearman": {f"{m} vs {s}": round(rank_correlation([-r[m] for r in seeds.values()], [r[s] for r in seeds.values()]), 3)
                         for m in MEASURES for s in ("train100_top1", "val_top1")},
            "best_of": {n: picks(seeds, n) for n in (2, 4)},
        }
        print(pool, json.dumps({k: v for k, v in pools[pool].items() if k != "seeds"}, indent=1), flush=True)
    if pools:
        write_results("recon_restarts", {
            "command": "python benchmarks/recon_restarts.py " + " ".join(sys.argv[1:]),
            "what": f"W4/A4 recon of DeiT-Tiny from {NUM} sparse images, one reconstruction per seed; heldout_kl on 64 images "
                    f"of pool {HELDOUT}; spearman: of the measure's negative against top-1; best_of: mean top-1 over every "
                    "N-subset of seeds of the seed picked", "yardstick": "train100, first 20 per class",
            "reported": "val, first 100 per class", "pools": pools})


if __name__ == "__main__":
    main()
