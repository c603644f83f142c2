"""Where W4/A4 calibrated on inverted images loses to real-image calibration: swap parts.

    python benchmarks/calibration_gap.py make sparse|real     # one reconstruction each (a core each)
    python benchmarks/calibration_gap.py swap [--shard I/N]    # the hybrids, then the results file

A diagnostic, not a data-free result: it reads real images to say where inverted ones fall short.
Two W4/A4 ``recon`` models of DeiT-Tiny (reconstruction seed 0), one calibrated on the 32 sparse images
of ``calib_reference_fp32`` (``calibration_images.py``'s first row), one on 32 real train100 images
(as ``quantization.py``'s real column). Each hybrid is the sparse-calibrated model with one part's
quantization parameters (step sizes, zero points, weight codes and scales, LayerNorm folds) taken from
the real-calibrated one: a block, a prefix of blocks, or one kind of layer in every block. Parts are cut
so that what travels together stays together (a folded LayerNorm goes with the Linear it is folded
into and that Linear's input step sizes). Scored on val's first 100 per class (1000 images).
Also recorded: how far the first LayerNorm's per-channel fold factors of the two models differ.

Results: ``benchmarks/results/calibration_gap.json``; models and hybrid scores cached under
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
from common import CACHE, DEIT_TINY, DEIT_TINY_CKPT, TRAIN100, commit, write_results
from quantization import val_subset
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparseinv import load_model
from sparseinv.data import evaluate_tensors
from sparseinv.quant import QuantConfig, calibration_batches, pool_batches, quantize_
from sparseinv.quant.io import load_quantized, save_quantized

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
    parts = {"sparse": r"(?!)", "real": r".*"}
    parts.update({f"block {i}": rf"blocks\.{i}\..*" for i in range(DEPTH)})
    parts.update({f"blocks 0-{k - 1}": rf"blocks\.({'|'.join(map(str, range(k)))})\..*" for k in (3, 6, 9)})
    parts.update({f"blocks {k}-{DEPTH - 1}": rf"blocks\.({'|'.join(map(str, range(k, DEPTH)))})\..*" for k in (3, 6, 9)})
    parts.update(KINDS)
    return parts


def model_path(source: str) -> Path:
    return DIR / f"w4a4_{source}.safetensors"


def make(source: str, teacher) -> None:
    path = model_path(source)
    if path.is_file():
        print(f"{path} exists")
        return
    if source == "sparse":
        batches = pool_batches(teacher, POOL, DEIT_TINY, NUM, NUM)
    else:
        batches = calibration_batches(teacher, str(TRAIN100), DEIT_TINY, NUM)
    start = time.perf_counter()
    model = quantize_(copy.deepcopy(teacher), QuantConfig.for_method("recon", 4, 4), batches, progress=False)
    DIR.mkdir(parents=True, exist_ok=True)
    save_quantized(model, path, DEIT_TINY)
    print(f"{source}: {time.perf_counter() - start:.0f} s -> {path}")


def hybrid(teacher, pattern: str, sparse: dict, real: dict, metadata: dict):
    """The sparse-calibrated model with the parameters of modules matching ``pattern`` from the real one,
    and how many tensors came from the real one."""
    from_real = {key for key in sparse if re.match(pattern, key.rpartition(".")[0])}
    mixed = {key: (real if key in from_real else sparse)[key] for key in sparse}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hybrid.safetensors"
        # Without the checksum the loader skips it (the mixed tensors are not the ones it was written for).
        save_file(mixed, path, metadata={k: v for k, v in metadata.items() if k != "tensors_sha256"})
        return load_quantized(copy.deepcopy(teacher), path, DEIT_TINY).eval(), len(from_real)


def swap(teacher, shard: tuple[int, int]) -> None:
    sparse, real = (load_file(model_path(s)) for s in ("sparse", "real"))
    assert sparse.keys() == real.keys()
    with safe_open(str(model_path("sparse")), framework="pt") as f:
        metadata = f.metadata()
    val = val_subset(teacher, 100)
    parts = hybrids()
    cells = {name: DIR / f"{re.sub(r'[^A-Za-z0-9]+', '_', name)}.json" for name in parts}
    index, count = shard
    for i, (name, pattern) in enumerate(parts.items()):
        if i % count != index or cells[name].is_file():
            continue
        model, moved = hybrid(teacher, pattern, sparse, real, metadata)
        result = {"val_top1": evaluate_tensors(model, *val, progress=False)["top1"], "tensors_from_real": moved, "commit": commit()}
        cells[name].write_text(json.dumps(result))
        print(f"{name}: {result}", flush=True)
    if all(c.is_file() for c in cells.values()):
        rows = {name: json.loads(c.read_text()) for name, c in cells.items()}
        payload = {"what": "W4/A4 recon (seed 0) calibrated on 32 sparse inverted images, with one part's quantization "
                           "parameters taken from the same reconstruction on 32 real train100 images; val first 100/class",
                   "sparse_pool": POOL.name, "rows": rows, "qkv_fold_ratio": fold_ratios(sparse, real)}
        print(f"wrote {write_results('calibration_gap', payload)}")


def fold_ratios(sparse: dict, real: dict) -> dict[str, list[float]]:
    """Per block: the 10th percentile, median and 90th percentile over channels of the first
    LayerNorm's fold factor (its per-channel range) calibrated on sparse images over real ones."""
    ratios = {}
    for i in range(DEPTH):
        key = f"blocks.{i}.attn.qkv.fold_r1"
        ratio = sparse[key] / real[key]
        ratios[f"block {i}"] = [round(float(ratio.quantile(q)), 3) for q in (0.1, 0.5, 0.9)]
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    sub.add_parser("make").add_argument("source", choices=["sparse", "real"])
    swap_parser = sub.add_parser("swap")
    swap_parser.add_argument("--shard", default="0/1", help="I/N: evaluate every N-th hybrid from the I-th (one process per core)")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = load_model(DEIT_TINY, DEIT_TINY_CKPT).eval()
    if args.stage == "make":
        make(args.source, teacher)
    else:
        index, count = map(int, args.shard.split("/"))
        swap(teacher, (index, count))


if __name__ == "__main__":
    sys.exit(main())
