"""Which inversion settings make images worth more per inversion second?

    python benchmarks/inversion_priors.py

Each variant inverts 32 ImageNet DeiT-Tiny images (seed 0, labels over all 1000 classes)
with the settings of ``benchmarks/distill.py``'s pools (400 steps, the reference stops
scaled to them, ``precision=auto``, last-phase masks) plus one change, then quantizes the
model with the default ``recon`` W4/A4 on them. Reported: seconds per image, the success
rate, the data-free yardstick (KL(full precision || quantized) on 64 held-out inverted
images of seed 7) and top-1 on the first 100 val images of each Imagenette class. The
baseline row is the first 32 images of the 512-image pool (same settings, same seeds).

Variants: PSAQ-ViT's patch-similarity prior (``--patch-entropy``), Plug-In Inversion's
colour shift (``--color-shift``), an attention prior after SARDFQ (``--attention-prior``)
and a schedule twice as long. A default is chosen
by the yardstick, then confirmed on val. Results: ``benchmarks/results/inversion_priors.json``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import replace

from common import DEIT_TINY, DEIT_TINY_CKPT, RESULTS, ensure_pool, write_results
from distill import _config, pools
from quantization import heldout_kl, val_subset

from sparseinv import load_model
from sparseinv.data import evaluate_tensors
from sparseinv.inversion.losses import InversionLoss
from sparseinv.inversion.schedule import PruneSchedule
from sparseinv.quant import QuantConfig, pool_batches, quantize_

N = 32


def variants() -> dict[str, object]:
    base = _config(True, N, 0)
    return {
        "baseline": None,  # the first 32 images of the shared 512-image pool
        "patch entropy 0.05": replace(base, loss=InversionLoss(patch_entropy=0.05)),
        "patch entropy 0.5": replace(base, loss=InversionLoss(patch_entropy=0.5)),
        "colour shift 0.5": replace(base, color_shift=0.5),
        "colour shift 1.0": replace(base, color_shift=1.0),
        "800 steps": replace(base, iterations=800, schedule=PruneSchedule.reference(800)),
        "attention prior 0.3": replace(base, loss=InversionLoss(attention_prior=0.3)),
        "attention prior 1.0": replace(base, loss=InversionLoss(attention_prior=1.0)),
    }


def main() -> None:
    path = RESULTS / "inversion_priors.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    p = pools("sparse", "heldout")  # distill.py's: the baseline's pool and the held-out images
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    images, labels = val_subset(model, 100)
    heldout = pool_batches(model, p["heldout"], DEIT_TINY, 64, 32)
    payload = {"scaled_down": True,
               "note": "32 images per variant, 400-step pools (not 4000), recon W4/A4, 1000 val images (first 100 per class)",
               "rows": old.get("rows", {})}
    # Rows measured on another day ran on another machine: the baseline's seconds per image as this
    # run's copy of its pool recorded them, for ratios within one machine.
    first = json.loads((p["sparse"] / "run.json").read_text())["batches"][: N // 32]
    payload["baseline_seconds_per_image_this_machine"] = sum(b["wall_seconds"] for b in first) / N
    for name, config in variants().items():
        if name in payload["rows"]:
            continue
        if config is None:
            pool = p["sparse"]
        else:
            tag = name.replace(" ", "_").replace(".", "p")
            pool = ensure_pool(f"prior_{tag}_{N}_s0", DEIT_TINY, DEIT_TINY_CKPT, config, model)
        run = json.loads((pool / "run.json").read_text())
        inv_seconds = sum(b["wall_seconds"] for b in run["batches"][: N // 32])
        success = sum(b["num_correct"] for b in run["batches"][: N // 32]) / N
        start = time.perf_counter()
        qmodel = quantize_(copy.deepcopy(model), QuantConfig.for_method("recon", 4, 4), pool_batches(model, str(pool), DEIT_TINY, N, 32))
        fit = time.perf_counter() - start
        row = {"settings": run["settings"], "seconds_per_image": inv_seconds / N, "success_rate": success,
               "heldout_kl": heldout_kl(qmodel, model, heldout), "top1": evaluate_tensors(qmodel, images, labels, progress=False)["top1"],
               "fit_seconds": fit}
        payload["rows"][name] = row
        print(f"{name:<20} {row['seconds_per_image']:5.2f} s/img  KL {row['heldout_kl']:.3f}  top-1 {row['top1']:5.1f}", flush=True)
        write_results("inversion_priors", payload)
    write_results("inversion_priors", payload)


if __name__ == "__main__":
    main()
