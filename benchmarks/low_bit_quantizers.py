"""Which activation grids hold up below 4 bits: the post-GELU grid, with and without reconstruction.

    python benchmarks/low_bit_quantizers.py

DeiT-Tiny quantized from the first 32 images of the knowledge-transfer sparse pool
(``kt_sparse_512_s0``, made by ``benchmarks/distill.py``), scored on train100's first 20
images per class (200 real images no data-free run sees; the yardstick defaults are chosen
on, never a reported result). Each cell is one ``--method`` at one bit-width with fc2's
input on the uniform grid or the signed log2 grid (``gelu_quantizer``): calibration only
(the ``repq`` quantizers) and with block reconstruction (``recon``). Results:
benchmarks/results/low_bit_quantizers.json.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import replace

import torch
from common import CACHE, DEIT_TINY, DEIT_TINY_CKPT, TRAIN100, commit, image_subset, write_results

from sparseinv import load_model
from sparseinv.data import evaluate_tensors
from sparseinv.quant import QuantConfig, pool_batches, quantize_

# (weight bits, activation bits, reconstruction)
CELLS = ((8, 4, False), (8, 3, False), (4, 4, False), (4, 4, True), (3, 3, True))


def main() -> None:
    torch.manual_seed(0)
    teacher = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    yardstick = image_subset(teacher, TRAIN100, 20, "train100")
    batches = pool_batches(teacher, CACHE / "pools" / "kt_sparse_512_s0", DEIT_TINY, 32, 32)
    rows = {}
    for w_bits, a_bits, recon in CELLS:
        for grid in ("uniform", "log2"):
            start = time.perf_counter()
            config = QuantConfig.for_method("recon", w_bits, a_bits, gelu_quantizer=grid)
            if not recon:
                config = replace(config, recon=None)  # the repq quantizers, calibration only
            model = quantize_(copy.deepcopy(teacher), config, batches, progress=False)
            name = f"W{w_bits}/A{a_bits} {'recon' if recon else 'repq'}, post-GELU {grid}"
            rows[name] = {"train100_top1": evaluate_tensors(model, *yardstick, progress=False)["top1"],
                          "seconds": time.perf_counter() - start}
            print(f"{name}: {rows[name]['train100_top1']:.1f}", flush=True)
    print(f"wrote {write_results('low_bit_quantizers', {'command': 'python benchmarks/low_bit_quantizers.py ' + ' '.join(sys.argv[1:]), 'commit': commit(), 'calibration': '32 images of kt_sparse_512_s0', 'yardstick': 'train100, first 20 per class (200 images)', 'rows': rows})}")


if __name__ == "__main__":
    main()
