"""Data-free quantization of DeiT-Tiny: methods x bit-widths x calibration sources.

    python benchmarks/make_pools.py && python benchmarks/quantization.py [--per-class 100]

Top-1 (1000-way) on a fixed balanced subset of imagenette val (the first N images of
each class, transformed once and cached), after quantizing the real DeiT-Tiny with
each method from 32 images of: the sparse and the dense inversion pools of
``make_pools.py`` (400 iterations, not 4000), Gaussian noise, and real train100 images
(upper bound only). Cells run in order of importance and each is written to
``benchmarks/results/quantization.json`` as soon as it is measured; a later run keeps
them and measures only what is missing (a pool still inverting is skipped).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from common import CACHE, DEIT_TINY, DEIT_TINY_CKPT, POOL_ITERATIONS, RESULTS, TRAIN100, VAL, commit, image_subset, write_results
from make_pools import POOLS

from sparseinv import load_model, sparse_forward
from sparseinv.data import evaluate_tensors
from sparseinv.pool import read_pool, read_run
from sparseinv.quant import QuantConfig, calibration_batches, pool_batches, quantize_

METHODS = ("psaq", "calib", "repq", "recon")
BITS = ((4, 4), (6, 6), (4, 8), (8, 8))
SOURCES = ("sparse", "dense", "noise", "real")
NUM_CALIB = 32


def cells() -> list[tuple[str, int, int, str, int]]:
    """(method, w_bits, a_bits, source, images): the cells the targets need first, then the rest of the grid."""
    first = [
        ("recon", 4, 4, "sparse"), ("recon", 4, 4, "noise"), ("recon", 4, 4, "dense"),
        ("recon", 6, 6, "sparse"), ("recon", 6, 6, "noise"),
        ("psaq", 4, 4, "sparse"), ("psaq", 6, 6, "sparse"), ("repq", 6, 6, "sparse"),
        ("recon", 4, 8, "sparse"), ("recon", 8, 8, "sparse"),
    ]
    order = [(*cell, NUM_CALIB) for cell in first]
    order += [("recon", 4, 4, "sparse", 128), ("recon", 4, 4, "sparse", 64)]
    order += [(m, w, a, "sparse", NUM_CALIB) for m in ("psaq", "repq") for w, a in BITS]
    order += [("recon", 4, 4, "real", NUM_CALIB)]
    for method in ("repq", "psaq", "calib"):
        for w, a in BITS:
            for source in SOURCES:
                if (method, w, a, source, NUM_CALIB) not in order and not (method == "recon" and source != "sparse"):
                    order.append((method, w, a, source, NUM_CALIB))
    return order


def val_subset(model, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` val images of each class, eval-transformed, cached on disk."""
    return image_subset(model, VAL, per_class, "val")


def pool_path(source: str, num: int = NUM_CALIB) -> str | None:
    """The pool folder of ``source`` once make_pools.py has committed ``num`` images to it (never inverts)."""
    name, _ = POOLS[source]
    path = CACHE / "pools" / name
    if read_run(path) is None:
        return None
    manifest = path / "manifest.jsonl"
    done = len(manifest.read_text().splitlines()) if manifest.is_file() else 0
    return str(path) if done >= num else None


def batches_for(model, source: str, num: int):
    if source == "noise":
        return calibration_batches(model, "noise", DEIT_TINY, num)
    if source == "real":
        return calibration_batches(model, str(TRAIN100), DEIT_TINY, num)
    path = pool_path(source, num)
    return None if path is None else pool_batches(model, path, DEIT_TINY, num, 32)


def inversion_seconds(source: str, num: int) -> float | None:
    """Wall time the pool spent inverting its first ``num`` images (whole batches of 32)."""
    path = pool_path(source, num) if source in POOLS else None
    if path is None:
        return None
    batches = read_pool(path).run["batches"]
    return sum(b["wall_seconds"] for b in batches[: max(1, num // 32)])


@torch.no_grad()
def heldout_kl(qmodel, model, batches) -> float:
    """KL(full precision || quantized) on held-out synthetic images: the data-free yardstick."""
    total, count = 0.0, 0
    for images, keep in batches:
        fp = sparse_forward(model, images, keep).logits.log_softmax(-1)
        q = sparse_forward(qmodel, images, keep).logits.log_softmax(-1)
        total += float(torch.nn.functional.kl_div(q, fp, log_target=True, reduction="sum"))
        count += images.shape[0]
    return total / count


def markdown(payload: dict) -> str:
    fp = payload["full_precision"]["top1"]
    lines = [
        f"DeiT-Tiny, top-1 (1000-way) on {payload['eval_images']} imagenette val images (first {payload['per_class']} "
        f"per class; scaled down from 3925), {NUM_CALIB} calibration images; pools inverted with {POOL_ITERATIONS} "
        f"iterations (not 4000). Full precision {fp:.1f}. Cell: top-1 (fit seconds).",
        "",
        "| method | bits | " + " | ".join(SOURCES) + " |",
        "| --- | --- | " + " | ".join("---" for _ in SOURCES) + " |",
    ]
    results = payload["cells"]
    for method in METHODS:
        for w, a in BITS:
            row = []
            for source in SOURCES:
                cell = results.get(f"{method} W{w}/A{a} {source} {NUM_CALIB}")
                row.append("-" if cell is None else f"{cell['top1']:.1f} ({cell['fit_seconds']:.0f} s)")
            lines.append(f"| {method} | W{w}/A{a} | " + " | ".join(row) + " |")
    extra = [(k, v) for k, v in results.items() if not k.endswith(f" {NUM_CALIB}")]
    if extra:
        lines += ["", "More sparse images (W4/A4, recon): accuracy against inversion wall time.", "",
                  "| cell | top-1 | inversion s | fit s |", "| --- | --- | --- | --- |"]
        for key, cell in sorted(extra + [(k, v) for k, v in results.items() if k.startswith("recon W4/A4 ") and k.endswith(f" {NUM_CALIB}")]):
            inv = cell.get("inversion_seconds")
            lines.append(f"| {key} | {cell['top1']:.1f} | {'-' if inv is None else f'{inv:.0f}'} | {cell['fit_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(payload: dict) -> None:
    """``quantization.png``: top-1 per method and source at each bit-width, full precision dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BITS), figsize=(4 * len(BITS), 3.6), sharey=True)
    width = 0.8 / len(SOURCES)
    for ax, (w, a) in zip(axes, BITS):
        for i, source in enumerate(SOURCES):
            values = [payload["cells"].get(f"{m} W{w}/A{a} {source} {NUM_CALIB}", {}).get("top1", 0) for m in METHODS]
            ax.bar([j + i * width for j in range(len(METHODS))], values, width, label=source)
        ax.axhline(payload["full_precision"]["top1"], color="k", ls="--", lw=1)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(METHODS))], METHODS)
        ax.set_title(f"W{w}/A{a}")
    axes[0].set_ylabel("top-1 (%), 1000 imagenette val images")
    axes[-1].legend(title="32 calibration images", fontsize=8)
    fig.suptitle("DeiT-Tiny data-free quantization (0 = not measured)")
    fig.tight_layout()
    fig.savefig(RESULTS / "quantization.png", dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100, help="val images per class (default 100: 1000 images)")
    parser.add_argument("--only", nargs="*", help="measure only cells whose key starts with one of these, e.g. 'recon W4/A4'")
    parser.add_argument("--table-only", action="store_true", help="only rewrite quantization.md from quantization.json")
    args = parser.parse_args()
    previous = RESULTS / "quantization.json"
    old = json.loads(previous.read_text()) if previous.is_file() else {}
    if args.table_only:
        (RESULTS / "quantization.md").write_text(markdown(old))
        plot(old)
        return
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    images, labels = val_subset(model, args.per_class)
    keep_old = old.get("per_class") == args.per_class and "cells" in old
    payload = {
        "scaled_down": True,
        "note": (f"scaled down: evaluated on the first {args.per_class} images per class of imagenette val "
                 f"({images.shape[0]} images, not 3925); pools use {POOL_ITERATIONS} inversion iterations, not 4000; "
                 "'heldout_kl' is KL(full precision || quantized) on sparse-pool images 96..127, never used for calibration"),
        "model": DEIT_TINY,
        "per_class": args.per_class,
        "eval_images": int(images.shape[0]),
        "num_calib": NUM_CALIB,
        "pool_iterations": POOL_ITERATIONS,
        "full_precision": (old.get("full_precision") if keep_old else None) or evaluate_tensors(model, images, labels, desc="full precision"),
        "cells": old.get("cells", {}) if keep_old else {},
    }
    sparse = pool_path("sparse", 128)
    heldout = None if sparse is None else pool_batches(model, sparse, DEIT_TINY, 128, 32)[3:]
    for method, w, a, source, num in cells():
        key = f"{method} W{w}/A{a} {source} {num}"
        if key in payload["cells"] or (args.only and not any(key.startswith(p) for p in args.only)):
            continue
        batches = batches_for(model, source, num)
        if batches is None:
            print(f"{key}: pool not ready, skipped", flush=True)
            continue
        config = QuantConfig.for_method(method, w, a)
        start = time.perf_counter()
        qmodel = quantize_(copy.deepcopy(model), config, batches)
        fit_seconds = time.perf_counter() - start
        result = evaluate_tensors(qmodel, images, labels, desc=key)
        payload["cells"][key] = {
            "method": method, "w_bits": w, "a_bits": a, "source": source, "num_calib": num, "config": config.record(),
            "top1": result["top1"], "top5": result["top5"], "fit_seconds": fit_seconds,
            "heldout_kl": None if heldout is None or num > 96 else heldout_kl(qmodel, model, heldout),
            "inversion_seconds": inversion_seconds(source, num),
            "recon_report": getattr(qmodel, "recon_report", None),
            # Cells outlive the run that measured them (a later run keeps them): each says its own run.
            "command": "python " + " ".join(sys.argv), "commit": commit(),
        }
        print(f"{key:<28} top-1 {result['top1']:6.2f}  fit {fit_seconds:6.1f} s", flush=True)
        write_results("quantization", payload)
        (RESULTS / "quantization.md").write_text(markdown(payload))
    write_results("quantization", payload)
    (RESULTS / "quantization.md").write_text(markdown(payload))
    plot(payload)
    print(markdown(payload))


if __name__ == "__main__":
    main()
