"""Where W4/A4 calibrated on inverted images loses to real-image calibration: swap parts.

    python benchmarks/calibration_gap.py make sparse|real|real2     # one reconstruction each (a core each)
    python benchmarks/calibration_gap.py swap [--base sparse|real2] [--shard I/N]    # the hybrids, then the results file
    python benchmarks/calibration_gap.py energy [--pools NAME ...] [--contrast C ...]  # activation energy of the calibration images
    python benchmarks/calibration_gap.py --bits 3 make sparse|real; ... --bits 3 swap    # the same at W3/A3 (no control)

A diagnostic, not a data-free result: it reads real images to say where inverted ones fall short.
Two W4/A4 ``recon`` models of DeiT-Tiny (reconstruction seed 0), one calibrated on the 32 sparse images
of ``calib_reference_fp32`` (``calibration_images.py``'s first row), one on 32 real train100 images
(as ``quantization.py``'s real column). Each hybrid is the sparse-calibrated model with one part's
quantization parameters (step sizes, zero points, weight codes and scales, LayerNorm folds) taken from
the real-calibrated one: a block, a prefix of blocks, or one kind of layer in every block. Parts are cut
so that what travels together stays together (a folded LayerNorm goes with the Linear it is folded
into and that Linear's input step sizes). Scored on val's first 100 per class (1000 images).
Also recorded: how far the first LayerNorm's per-channel fold factors and each activation
quantizer's step size differ from the real-calibrated model's, for the sparse model and the control.

The control (``--base real2``): the same swaps of each kind of layer into a model calibrated on 32
other real train100 images (each class's 21st to 24th), so what a swap costs or gains between two
real calibrations is known beside what it does for the inverted one.

``energy`` records, per block, the mean square of the two inputs whose steps differ most (the attention
projection's and the post-GELU fc2 input) on the sparse images as calibration feeds them (their kept
patches), over the same on the 32 real images fed whole and fed only the 47 patches the teacher's last
block attends to most from the class token (as many as the sparse images keep): how much of the
difference is the images and how much is feeding fewer, more salient patches.

``--bits 3`` does the same at W3/A3, where sparse calibration lands near Gaussian noise's (its own models,
cells and results file, ``calibration_gap_w3a3.json``).

Results: ``benchmarks/results/calibration_gap.json`` (``calibration_energy.json`` from ``energy``); models and hybrid scores cached under
``benchmarks/cache/calibration_gap``.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from calibration_images import ActivationEnergy
from common import CACHE, DEIT_TINY, DEIT_TINY_CKPT, TRAIN100, commit, image_subset, write_results
from quantization import batches_for, val_subset
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparseinv import load_model
from sparseinv.data import evaluate_tensors
from sparseinv.quant import QuantConfig, pool_batches, quantize_
from sparseinv.quant.io import load_quantized, save_quantized
from sparseinv.vit.forward import logits, sparse_forward

DIR = CACHE / "calibration_gap"
POOL = CACHE / "pools" / "calib_reference_fp32"
NUM = 32
DEPTH = 12

# Kinds of layer: module-name patterns (a module's parameters travel whole).
KINDS = {
    "qkv (LayerNorm 1 fold, weights, input steps)": r"blocks\.\d+\.attn\.qkv(\..*)?$",
    "query and key steps, softmax grid": r"blocks\.\d+\.attn\.(q_quant|k_quant|attn_quant)$",
    "value steps": r"blocks\.\d+\.attn\.v_quant$",
    "attention projection (weights, input steps)": r"blocks\.\d+\.attn\.proj(\..*)?$",
    "fc1 (LayerNorm 2 fold, weights, input steps)": r"blocks\.\d+\.mlp\.fc1(\..*)?$",
    "fc2 (weights, post-GELU input steps)": r"blocks\.\d+\.mlp\.fc2(\..*)?$",
    "every activation step outside folds (q, k, v, softmax, proj and fc2 inputs)":
        r"blocks\.\d+\.(attn\.(q_quant|k_quant|v_quant|attn_quant|proj\.input_quant)|mlp\.fc2\.input_quant)$",
    "weights outside folds (proj and fc2 codes)": r"blocks\.\d+\.(attn\.proj|mlp\.fc2)$",
    "patch embedding and head": r"(patch_embed\..*|head(\..*)?)$",
}


def hybrids() -> dict[str, str]:
    """name -> the pattern of module names whose parameters come from the real-calibrated model."""
    parts = {"none": r"(?!)", "real": r".*"}
    parts.update({f"block {i}": rf"blocks\.{i}\..*" for i in range(DEPTH)})
    parts.update({f"blocks 0-{k - 1}": rf"blocks\.({'|'.join(map(str, range(k)))})\..*" for k in (3, 6, 9)})
    parts.update({f"blocks {k}-{DEPTH - 1}": rf"blocks\.({'|'.join(map(str, range(k, DEPTH)))})\..*" for k in (3, 6, 9)})
    parts.update(KINDS)
    return parts


def model_path(source: str, bits: int = 4) -> Path:
    return DIR / f"w{bits}a{bits}_{source}.safetensors"


def other_real_images(teacher) -> list:
    """32 train100 images none of ``real``'s: each class's 21st, 22nd, ... image in turn."""
    images, labels = image_subset(teacher, TRAIN100, 30, "train100")
    per_class = 30  # image_subset keeps each class's images together, in order
    order = [c * per_class + rank for rank in range(20, 30) for c in range(len(labels) // per_class)][:NUM]
    return [(images[order], None)]


def make(source: str, teacher, bits: int) -> None:
    path = model_path(source, bits)
    if path.is_file():
        print(f"{path} exists")
        return
    if source == "sparse":
        batches = pool_batches(teacher, POOL, DEIT_TINY, NUM, NUM)
    elif source == "real":
        batches = batches_for(teacher, "real", NUM)  # quantization.py's real column
    else:
        batches = other_real_images(teacher)
    start = time.perf_counter()
    model = quantize_(copy.deepcopy(teacher), QuantConfig.for_method("recon", bits, bits), batches, progress=False)
    DIR.mkdir(parents=True, exist_ok=True)
    save_quantized(model, path, DEIT_TINY)
    print(f"{source}: {time.perf_counter() - start:.0f} s -> {path}")


def hybrid(teacher, pattern: str, base: dict, real: dict, metadata: dict):
    """The ``base`` model with the parameters of modules matching ``pattern`` from the real one,
    and how many tensors came from the real one."""
    from_real = {key for key in base if re.match(pattern, key.rpartition(".")[0])}
    mixed = {key: (real if key in from_real else base)[key] for key in base}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hybrid.safetensors"
        # Without the checksum the loader skips it (the mixed tensors are not the ones it was written for).
        save_file(mixed, path, metadata={k: v for k, v in metadata.items() if k != "tensors_sha256"})
        return load_quantized(copy.deepcopy(teacher), path, DEIT_TINY).eval(), len(from_real)


def cells_of(base: str, bits: int = 4) -> dict[str, tuple[str, Path]]:
    """name -> (pattern, cell file) of every hybrid of ``base``: all of them for the sparse model,
    none, all and the kinds of layer for the control."""
    parts = hybrids() if base == "sparse" else {k: v for k, v in hybrids().items() if k in ("none", "real") or k in KINDS}
    prefix = ("" if base == "sparse" else f"{base}-") + ("" if bits == 4 else f"w{bits}a{bits}-")
    return {name: (pattern, DIR / f"{prefix}{re.sub(r'[^A-Za-z0-9]+', '_', name)}.json") for name, pattern in parts.items()}


def swap(teacher, base: str, shard: tuple[int, int], bits: int) -> None:
    models = {s: load_file(model_path(s, bits)) for s in ("sparse", "real", "real2") if model_path(s, bits).is_file()}
    with safe_open(str(model_path(base, bits)), framework="pt") as f:
        metadata = f.metadata()
    val = val_subset(teacher, 100)
    index, count = shard
    for i, (name, (pattern, cell)) in enumerate(cells_of(base, bits).items()):
        if i % count != index or cell.is_file():
            continue
        model, moved = hybrid(teacher, pattern, models[base], models["real"], metadata)
        result = {"val_top1": evaluate_tensors(model, *val, progress=False)["top1"], "tensors_from_real": moved, "commit": commit()}
        cell.write_text(json.dumps(result))
        print(f"{name}: {result}", flush=True)
    done = {b: {name: json.loads(cell.read_text()) for name, (_, cell) in cells_of(b, bits).items()}
            for b in ("sparse", "real2") if b in models and all(cell.is_file() for _, cell in cells_of(b, bits).values())}
    if "sparse" in done:
        payload = {"what": f"W{bits}/A{bits} recon (seed 0) calibrated on 32 sparse inverted images, with one part's quantization "
                           "parameters taken from the same reconstruction on 32 real train100 images; val first 100/class",
                   "sparse_pool": POOL.name, "rows": done["sparse"], "qkv_fold_ratio": fold_ratios(models["sparse"], models["real"]),
                   "step_ratio": step_ratios(models["sparse"], models["real"])}
        if "real2" in done:
            payload.update(control="the same swaps into a model calibrated on 32 other real train100 images (each class's 21st-24th)",
                           control_rows=done["real2"], qkv_fold_ratio_control=fold_ratios(models["real2"], models["real"]),
                           step_ratio_control=step_ratios(models["real2"], models["real"]))
        print(f"wrote {write_results('calibration_gap' if bits == 4 else f'calibration_gap_w{bits}a{bits}', payload)}")


def fold_ratios(other: dict, real: dict) -> dict[str, list[float]]:
    """Per block: the 10th percentile, median and 90th percentile over channels of the first
    LayerNorm's fold factor (its per-channel range) of ``other`` over that of ``real``."""
    ratios = {}
    for i in range(DEPTH):
        key = f"blocks.{i}.attn.qkv.fold_r1"
        ratio = other[key] / real[key]
        ratios[f"block {i}"] = [round(float(ratio.quantile(q)), 3) for q in (0.1, 0.5, 0.9)]
    return ratios


# Activation quantizers whose step sizes are compared, by where they sit in a block.
STEPS = {"qkv input": "attn.qkv.input_quant", "query": "attn.q_quant", "key": "attn.k_quant", "value": "attn.v_quant",
         "softmax": "attn.attn_quant", "projection input": "attn.proj.input_quant", "fc1 input": "mlp.fc1.input_quant",
         "fc2 input (post-GELU)": "mlp.fc2.input_quant"}


def step_ratios(other: dict, real: dict) -> dict[str, list[float]]:
    """Per kind of activation quantizer, block by block: its step size in ``other`` over that in ``real``."""
    return {kind: [round(float((other[key] / real[key]).mean()), 3) for key in (f"blocks.{i}.{name}.scale" for i in range(DEPTH))]
            for kind, name in STEPS.items()}


def mean_squares(teacher, batches) -> dict[str, list[float]]:
    """Per block, the mean square of the attention projection's input and of fc2's input over ``batches``
    (recorded by the hooks of calibration_images.py's inversion term)."""
    sums: dict[str, list[float]] = {"projection input": [0.0] * DEPTH, "fc2 input (post-GELU)": [0.0] * DEPTH}
    recorded = ActivationEnergy(teacher)  # records [proj 0, fc2 0, proj 1, ...] inputs
    try:
        with torch.no_grad():
            for images, keep in batches:
                logits(teacher, images, keep)
                for position, x in recorded.values.items():
                    sums[list(sums)[position % 2]][position // 2] += x.float().square().mean().item() / len(batches)
    finally:
        recorded.remove()
    return sums


def energy(teacher, others: list[str], contrasts: list[float]) -> None:
    sparse = pool_batches(teacher, POOL, DEIT_TINY, NUM, NUM)
    kept = sparse[0][1].shape[1]
    real = batches_for(teacher, "real", NUM)
    with torch.no_grad():
        salient = [(x, sparse_forward(teacher, x, None, return_cls_attn=True).cls_attn.topk(kept, dim=1).indices.sort(1).values) for x, _ in real]
    sums = {name: mean_squares(teacher, b) for name, b in (("sparse", sparse), ("real", real), ("real_salient", salient))}
    sums.update({pool: mean_squares(teacher, pool_batches(teacher, CACHE / "pools" / pool, DEIT_TINY, NUM, NUM)) for pool in others})
    sums.update({f"sparse_contrast_{c}": mean_squares(teacher, [(x * c, k) for x, k in sparse]) for c in contrasts})
    extra = [*others, *(f"sparse_contrast_{c}" for c in contrasts)]
    pairs = [("sparse", "real"), ("real_salient", "real"), ("sparse", "real_salient"), *((name, "real") for name in extra)]
    ratio = {f"{a}/{b}": {kind: [round(x / y, 3) for x, y in zip(sums[a][kind], sums[b][kind])] for kind in sums[a]} for a, b in pairs}
    write_results("calibration_energy", {
        "what": f"per block, mean square of the input over the calibration images; real_salient: the real images fed the {kept} "
                f"patches the teacher's last block attends to most from the class token; other pools (their first {NUM} images, "
                "kept patches) by name; sparse_contrast_C: the sparse images' normalised pixels times C", "sparse_pool": POOL.name, "mean_square": sums, "ratio": ratio})
    for name, r in ratio.items():
        print(name, {kind: [round(v, 2) for v in values] for kind, values in r.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, choices=[4, 3], default=4, help="weight and activation bits (default 4)")
    sub = parser.add_subparsers(dest="stage", required=True)
    sub.add_parser("make").add_argument("source", choices=["sparse", "real", "real2"])
    swap_parser = sub.add_parser("swap")
    swap_parser.add_argument("--base", choices=["sparse", "real2"], default="sparse", help="the model parts are swapped into")
    swap_parser.add_argument("--shard", default="0/1", help="I/N: evaluate every N-th hybrid from the I-th (one process per core)")
    energy_parser = sub.add_parser("energy")
    energy_parser.add_argument("--pools", nargs="*", default=[], help="other cached pools to measure the same way")
    energy_parser.add_argument("--contrast", nargs="*", type=float, default=[], help="also the sparse images with their normalised pixels times these")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = load_model(DEIT_TINY, DEIT_TINY_CKPT).eval()
    if args.stage == "make":
        make(args.source, teacher, args.bits)
    elif args.stage == "energy":
        energy(teacher, args.pools, args.contrast)
    else:
        index, count = map(int, args.shard.split("/"))
        swap(teacher, args.base, (index, count), args.bits)


if __name__ == "__main__":
    sys.exit(main())
