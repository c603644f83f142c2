"""How the reconstruction defaults were chosen, and how much a W4/A4 result varies.

    python benchmarks/recon_settings.py

Inverts (or reuses) a 64-image sparse DeiT-Tiny pool, reconstructs W4/A4 (method
``recon``) on its first 32 images with the default settings under three seeds, and with
more views or more iterations, and reports for each:

- ``heldout_kl``: KL(full precision || quantized) on the pool's other 32 images, never
  used to fit. This is the data-free yardstick the defaults are chosen by;
- ``top1``: 1000-way top-1 on 1000 imagenette val images (reported, not chosen by).

Then, at W4/A8, W8/A8 and W6/A6, the held-out KL with and without LayerNorm folding
(and the log2 softmax grid that goes with it), which decides what ``recon`` does at
8-bit activations.

Writes ``benchmarks/results/recon_settings.json``. Takes about 40 minutes on 2 CPU cores.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace

from common import DEIT_TINY, DEIT_TINY_CKPT, ensure_pool, machine, pool_config, write_results
from quantization import heldout_kl, val_subset

from sparseinv import load_model
from sparseinv.data import evaluate_tensors
from sparseinv.quant import QuantConfig, pool_batches, quantize_

VARIANTS = {
    "default, seed 0": {},
    "default, seed 1": {"seed": 1},
    "default, seed 2": {"seed": 2},
    "views 4": {"views": 4},
    "views 8": {"views": 8},
    "iters 1000": {"iters": 1000},
}


def main() -> None:
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    start = time.perf_counter()
    pool = ensure_pool("imagenet_sparse_64", DEIT_TINY, DEIT_TINY_CKPT, pool_config(sparse=True, num_images=64), model)
    pool_seconds = time.perf_counter() - start
    batches = pool_batches(model, pool, DEIT_TINY, 64, 32)
    calib, heldout = batches[:1], batches[1:]
    images, labels = val_subset(model, 100)
    rows = {}
    for name, recon in VARIANTS.items():
        config = QuantConfig.for_method("recon", 4, 4)
        config = replace(config, recon=replace(config.recon, **recon))
        start = time.perf_counter()
        qmodel = quantize_(copy.deepcopy(model), config, calib, progress=False)
        fit = time.perf_counter() - start
        rows[name] = {"recon": recon, "fit_seconds": fit, "heldout_kl": heldout_kl(qmodel, model, heldout),
                      "top1": evaluate_tensors(qmodel, images, labels, progress=False)["top1"]}
        print(name, rows[name], flush=True)
    # At each bit-width: LayerNorm folding with the log2 softmax grid, or neither (held-out KL only).
    folding = {}
    for w, a in ((4, 8), (8, 8), (6, 6)):
        for folded in (True, False):
            config = replace(QuantConfig.for_method("recon", w, a), ln_reparam=folded, softmax_quantizer="log2" if folded else "uniform")
            qmodel = quantize_(copy.deepcopy(model), config, calib, progress=False)
            folding[f"W{w}/A{a} {'folded + log2' if folded else 'unfolded + uniform'}"] = heldout_kl(qmodel, model, heldout)
            print(w, a, folded, folding, flush=True)
    write_results("recon_settings", {
        "command": "python benchmarks/recon_settings.py", "machine": machine(), "scaled_down": True,
        "note": "W4/A4 recon on 32 sparse images (400-iteration pool), KL on 32 held-out sparse images, top-1 on 1000 val images",
        "pool_seconds": pool_seconds, "rows": rows, "folding_heldout_kl": folding,
    })


if __name__ == "__main__":
    main()
