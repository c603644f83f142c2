"""Data-free knowledge transfer from the ImageNet DeiT-Tiny: compression and quantized students.

    python benchmarks/distill.py [--steps 400] [--protocols compression quantized]

Teacher: the real ImageNet DeiT-Tiny (1000 classes). Two protocols share one set of pools,
inverted from it over all 1000 classes (400 steps, the reference stops scaled to them,
``precision=auto``, last-phase masks; the first N images of the 512-image pool are the
N-image pool, since batches are seeded by index):

* compression: the student is the teacher's 6-block copy (blocks 1, 3, ..., 11,
  initialised from the teacher), trained with AdamW on the teacher's online soft labels;
* quantized: the student is the default W4/A4 (and W4/A8) ``recon`` model calibrated on
  the pool's first 32 images, then trained against the teacher (straight-through
  weights, learned step sizes).

Each is taught from: sparse pools of 32, 128 and 512 images; a dense pool of 128 images
(equal images); as many sparse images as dense inversion's 128 took time to make (equal
inversion time); Gaussian noise (floor); and train100's real images (a reference that
covers exactly the ten evaluated classes, so it flatters itself). Every cell trains the
same number of steps, so rows differ only by their images.

Reported per cell: 1000-way top-1 on the first ``--per-class`` val images of each
Imagenette class, the student's top-1 agreement with the teacher on 64 fresh inverted
images of all classes (another seed, never trained on), training seconds, and for the
compression student its images/s against the teacher's. Cells are cached in
``benchmarks/cache/distill_cells/``; a rerun measures only what is missing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import CACHE, DEIT_TINY, DEIT_TINY_CKPT, RESULTS, TRAIN100, ensure_pool, pool_config, scaled_schedule, write_results
from PIL import Image
from quantization import val_subset

from sparseinv import load_model, sparse_forward
from sparseinv.data import ImageFolder, evaluate_tensors
from sparseinv.distill import DistillConfig, Images, distill, folder_sources, shallow_copy, spread_blocks
from sparseinv.distill.data import Source
from sparseinv.models import vit_info
from sparseinv.pool import open_pool, read_pool
from sparseinv.quant import QuantConfig, pool_batches, quantize_

SIZES = (32, 128, 512)
BATCH = 32
TRAINED_ON_32 = 32  # calibration images of the post-training start
QAT_LRS = (2e-5, 1e-4)  # candidate learning rates of the quantized student


def pools() -> dict[str, Path]:
    """The cached pools every cell draws from (made here if missing; resumable)."""
    def cfg(sparse: bool, n: int, seed: int):
        base = pool_config(sparse=sparse, num_images=n, batch_size=32, seed=seed)
        return replace(base, schedule=scaled_schedule(400) if sparse else base.schedule, precision="auto", final_mask="last-phase")

    model = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    wanted = {"sparse": ("kt_sparse_512_s0", cfg(True, 512, 0)), "sparse_s1": ("kt_sparse_128_s1", cfg(True, 128, 1)),
              "dense": ("kt_dense_128_s0", cfg(False, 128, 0)), "heldout": ("kt_sparse_64_s7", cfg(True, 64, 7))}
    out = {}
    for key, (name, config) in wanted.items():
        path = CACHE / "pools" / name
        run_file = path / "run.json"
        if run_file.is_file():  # a cached pool is reused only if it was made with these settings
            recorded = json.loads(run_file.read_text())["settings"]
            if recorded != config.record():
                raise SystemExit(f"cached pool {path} was made with other settings; delete it to remake it.")
        out[key] = ensure_pool(name, DEIT_TINY, DEIT_TINY_CKPT, config, model)
    return out


def noise_images(n: int) -> Path:
    """N(0, 1) in DeiT-Tiny's normalised space (inversion's starting point) as PNGs, cached."""
    folder = CACHE / f"noise_{n}"
    if len(list(folder.glob("*.png"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    mean, std = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1), torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        x = (torch.randn(3, 224, 224, generator=g) * std + mean).clamp(0, 1)
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i:06d}.png")
    return folder


def sparse_images(pool: Path, n: int) -> Images:
    images = Images.from_pools([open_pool(pool)])
    return replace(images, sources=images.sources[:n], names=[f"{pool}[:{n}]"])


def dense_sources(sources: list[Source], name: str) -> Images:
    return Images(sources, (224, 224), (16, 16), None, [name])


def inversion_seconds(pool: Path, n: int) -> float:
    """Seconds to invert ``n`` images: the pool's median batch time per batch of 32 (a median, so a
    batch slowed by another process on a shared machine does not move the equal-time comparison)."""
    times = [b["wall_seconds"] for b in json.loads((pool / "run.json").read_text())["batches"]]
    return statistics.median(times) * math.ceil(n / 32)


def cells(p: dict[str, Path]) -> dict[str, tuple[Images, float | None]]:
    """name -> (training images, their inversion seconds)."""
    dense_seconds = inversion_seconds(p["dense"], 128)
    per_sparse = inversion_seconds(p["sparse"], 512) / 512
    equal_time = min(512, int(dense_seconds / per_sparse) // 32 * 32)
    out = {f"sparse {n}": (sparse_images(p["sparse"], n), inversion_seconds(p["sparse"], n)) for n in SIZES}
    out["dense 128"] = (Images.from_pools([open_pool(p["dense"])]), dense_seconds)
    out[f"sparse {equal_time} (= dense 128's time)"] = (sparse_images(p["sparse"], equal_time), inversion_seconds(p["sparse"], equal_time))
    out["sparse 128 seed 1"] = (sparse_images(p["sparse_s1"], 128), inversion_seconds(p["sparse_s1"], 128))
    out["noise 128"] = (dense_sources([Source(f) for f in sorted(noise_images(128).glob("*.png"))], "gaussian noise"), None)
    out["real train100 (1000)"] = (dense_sources(folder_sources(ImageFolder.scan(TRAIN100)), "train100"), None)
    return out


@torch.no_grad()
def agreement(student, teacher, heldout: Path) -> float:
    """Top-1 agreement (percent) on held-out sparse images, fed as their kept tokens."""
    pool = read_pool(heldout)
    info = vit_info(teacher)
    mean, std = info.norm_tensors()
    x = (pool.images - mean) / std
    same = 0
    for i in range(0, len(x), 32):
        keep = pool.kept_patches[i : i + 32]
        t = sparse_forward(teacher, x[i : i + 32], keep).logits.argmax(1)
        s = sparse_forward(student, x[i : i + 32], keep).logits.argmax(1)
        same += int((t == s).sum())
    return 100.0 * same / len(x)


@torch.no_grad()
def images_per_second(model, batch: int = 64, repeats: int = 3) -> float:
    x = torch.randn(batch, 3, 224, 224)
    model(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        best = min(best, time.perf_counter() - start)
    return batch / best


# Every cell lists its images up to this many entries (a 32-image pool 16 times), so every
# cell has the same epochs and schedule; a repeated image gets a fresh crop at each entry.
ENTRIES = 512


def repeated(images: Images) -> Images:
    n = len(images.sources)
    return replace(images, sources=(images.sources * math.ceil(ENTRIES / n))[: max(ENTRIES, n)])


def train_config(steps: int, entries: int, **overrides) -> DistillConfig:
    epochs = max(1, round(steps * BATCH / entries))
    return DistillConfig(mode="full", epochs=epochs, batch_size=BATCH, **overrides)


def quantized_start(teacher, p: dict[str, Path], w_bits: int, a_bits: int):
    """The default post-training model from the sparse pool's first 32 images, cached as a file."""
    from sparseinv.quant import load_quantized, save_quantized

    path = CACHE / "distill_cells" / f"ptq_w{w_bits}a{a_bits}.safetensors"
    model = copy.deepcopy(teacher)
    if path.is_file():
        return load_quantized(model, path, DEIT_TINY)
    quantize_(model, QuantConfig.for_method("recon", w_bits, a_bits), pool_batches(model, str(p["sparse"]), DEIT_TINY, TRAINED_ON_32, 32))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_quantized(model, path, DEIT_TINY)
    return model


def run_cell(name: str, protocol: str, images: Images, teacher, p, val, steps: int, bits=(4, 4), **overrides) -> dict:
    tag = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    key = f"{protocol}-{'w%da%d-' % bits if protocol == 'quantized' else ''}{name}{tag}"
    key = key.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "eq").replace("'", "")
    cache = CACHE / "distill_cells" / f"{key}-steps{steps}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    if protocol == "compression":
        student = shallow_copy(teacher, spread_blocks(len(teacher.blocks), 6))
    else:
        student = quantized_start(teacher, p, *bits)
    out = CACHE / "distill_cells" / key / "student.safetensors"
    for stale in out.parent.glob("student.*"):
        stale.unlink()
    data = repeated(images)
    config = train_config(steps, len(data.sources), **overrides)
    start = time.perf_counter()
    summary = distill(teacher, student, data, config, out, teacher_name=DEIT_TINY, student_name=DEIT_TINY, progress=False)
    seconds = time.perf_counter() - start
    result = {"cell": name + tag, "protocol": protocol, "images": len(images.sources), "steps": steps, "train_seconds": seconds,
              "top1": evaluate_tensors(student, *val, progress=False)["top1"], "agreement": agreement(student, teacher, p["heldout"]),
              "final_loss": summary["history"][-1]["loss"], "config": summary["settings"]["config"]}
    if protocol == "quantized":
        result["bits"] = list(bits)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=2))
    print(f"{protocol} {name}: top-1 {result['top1']:.1f}, agreement {result['agreement']:.1f} ({seconds:.0f} s)", flush=True)
    return result


def onnx_check(teacher, quantized_file: Path, val) -> dict:
    """The W4/A8 quantized student exported to integer ONNX, its top-1 in ONNX Runtime beside PyTorch's."""
    from sparseinv.export import export_onnx, onnx_logits, onnx_session
    from sparseinv.quant import load_quantized

    model = load_quantized(copy.deepcopy(teacher), quantized_file, DEIT_TINY)
    path = quantized_file.with_suffix(".onnx")
    export_onnx(model, path)
    logits = onnx_logits(onnx_session(path), val[0])
    onnx_top1 = 100.0 * float((logits.argmax(1) == val[1]).float().mean())
    return {"file": str(quantized_file), "pytorch_top1": evaluate_tensors(model, *val, progress=False)["top1"], "onnx_top1": onnx_top1}


def markdown(payload: dict) -> str:
    lines = [f"# Data-free knowledge transfer (`{payload['command']}`)", "",
             f"Teacher DeiT-Tiny: top-1 {payload['teacher_top1']:.1f} on {payload['val_images']} val images (1000-way), "
             f"{payload['teacher_images_per_second']:.1f} images/s. Every cell trains {payload['steps']} steps of {BATCH}.", ""]
    for protocol, rows in payload["protocols"].items():
        lines += [f"## {protocol}", "", "| images | inversion s | top-1 | agreement | train s |", "| --- | --- | --- | --- | --- |"]
        for row in rows:
            inv = "" if row.get("inversion_seconds") is None else f"{row['inversion_seconds']:.0f}"
            lines.append(f"| {row['cell']} | {inv} | {row['top1']:.1f} | {row['agreement']:.1f} | {row['train_seconds']:.0f} |")
        extra = payload.get("start", {}).get(protocol)
        if extra:
            lines += ["", "Starting points: " + ", ".join(f"{k} top-1 {v['top1']:.1f}, agreement {v['agreement']:.1f}" for k, v in extra.items())]
        lines.append("")
    if "student_images_per_second" in payload:
        lines.append(f"6-block student: {payload['student_images_per_second']:.1f} images/s, "
                     f"{payload['student_images_per_second'] / payload['teacher_images_per_second']:.2f}x the teacher's (batch 64).")
    choices = payload.get("choices", {})
    if "targets" in choices:
        t = choices["targets"]
        lines.append(f"Teacher targets (compression, sparse 512): online top-1 {t['online']['top1']:.1f}, agreement "
                     f"{t['online']['agreement']:.1f}, {t['online']['train_seconds']:.0f} s; cached {t['cached']['top1']:.1f}, "
                     f"{t['cached']['agreement']:.1f}, {t['cached']['train_seconds']:.0f} s.")
    if "quantized_lr" in choices:
        q = choices["quantized_lr"]
        trials = ", ".join(f"lr {r['config']['lr']:g}: agreement {r['agreement']:.1f} (top-1 {r['top1']:.1f})" for r in q["trials"])
        lines.append(f"Quantized student's learning rate, chosen by held-out synthetic agreement: {trials}; chosen {q['chosen']:g}.")
    if "onnx" in payload:
        o = payload["onnx"]
        lines.append(f"W4/A8 quantized student exported to integer ONNX: top-1 {o['onnx_top1']:.1f} in ONNX Runtime, "
                     f"{o['pytorch_top1']:.1f} in PyTorch.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps of 32 images per cell")
    parser.add_argument("--per-class", type=int, default=100, help="val images per Imagenette class")
    parser.add_argument("--protocols", nargs="+", default=["compression", "quantized"], choices=["compression", "quantized"])
    parser.add_argument("--quantized-cells", nargs="*", help="the quantized protocol's cells (by name; default: every cell)")
    args = parser.parse_args()
    torch.manual_seed(0)
    p = pools()
    teacher = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    val = val_subset(teacher, args.per_class)
    payload = {"steps": args.steps, "val_images": len(val[1]), "teacher_top1": evaluate_tensors(teacher, *val, progress=False)["top1"],
               "teacher_images_per_second": images_per_second(teacher), "protocols": {}, "start": {},
               "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
               "scaled_down": "400 inversion steps instead of 4000; pools of at most 512 images; a fixed number of training steps per cell"}
    all_cells = cells(p)
    chosen = all_cells
    payload["choices"] = {}
    if "compression" in args.protocols:
        six = shallow_copy(teacher, spread_blocks(len(teacher.blocks), 6))
        payload["start"]["compression"] = {"6-block copy": {"top1": evaluate_tensors(six, *val, progress=False)["top1"],
                                                            "agreement": agreement(six, teacher, p["heldout"])}}
        payload["student_images_per_second"] = images_per_second(six)
        rows = []
        for name, (images, seconds) in chosen.items():
            rows.append({**run_cell(name, "compression", images, teacher, p, val, args.steps), "inversion_seconds": seconds})
        payload["protocols"]["compression"] = rows
        # Online teacher targets (each crop labelled) against cached ones (each image once), equal steps.
        images, _ = all_cells["sparse 512"]
        payload["choices"]["targets"] = {"online": run_cell("sparse 512", "compression", images, teacher, p, val, args.steps),
                                         "cached": run_cell("sparse 512", "compression", images, teacher, p, val, args.steps,
                                                            targets="cached")}
    if "quantized" in args.protocols:
        payload["start"]["quantized"] = {}
        # The quantized student's learning rate, chosen by held-out synthetic agreement (no real image involved).
        images, _ = all_cells["sparse 128"]
        trials = [run_cell("sparse 128", "quantized", images, teacher, p, val, args.steps, lr=lr) for lr in QAT_LRS]
        lr = max(trials, key=lambda r: r["agreement"])["config"]["lr"]
        payload["choices"]["quantized_lr"] = {"trials": trials, "chosen": lr}
        rows = []
        for bits in ((4, 4), (4, 8)):
            start = quantized_start(teacher, p, *bits)
            payload["start"]["quantized"][f"W{bits[0]}/A{bits[1]} post-training"] = {
                "top1": evaluate_tensors(start, *val, progress=False)["top1"], "agreement": agreement(start, teacher, p["heldout"])}
            names = [n for n in chosen if not args.quantized_cells or n in args.quantized_cells] if bits == (4, 4) else ["sparse 512"]
            for name in names:
                images, seconds = chosen[name]
                row = run_cell(name, "quantized", images, teacher, p, val, args.steps, bits, lr=lr)
                rows.append({**row, "cell": f"W{bits[0]}/A{bits[1]} {name}", "inversion_seconds": seconds})
        payload["protocols"]["quantized"] = rows
        w4a8 = CACHE / "distill_cells" / f"quantized-w4a8-sparse_512-lr{lr}" / "student.safetensors"
        if w4a8.is_file():
            payload["onnx"] = onnx_check(teacher, w4a8, val)
    path = write_results("distill", payload)
    (RESULTS / "distill.md").write_text(markdown({**payload, "command": "python benchmarks/distill.py"}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
