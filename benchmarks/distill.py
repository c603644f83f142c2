"""Data-free knowledge transfer: the paper's protocol, compression and quantized students.

    python benchmarks/distill.py [--steps 400] [--protocols paper compression quantized]

Three protocols, each taught from sparse inverted images against Gaussian noise (floor),
dense inversion at equal images and at equal inversion time, and real images (ceiling).
Pools are inverted with 400 steps (the reference stops scaled to them), ``precision=auto``
and last-phase masks, over all of the teacher's classes; the first N images of a pool are
the N-image pool, since batches are seeded by index. Every cell of a protocol trains the
same number of steps, so rows differ only by their images.

* paper: a 10-class Imagenette teacher fine-tuned end to end from the ImageNet DeiT-Tiny
  on train100 (``make_teacher.py``); the student is the ImageNet DeiT-Tiny with its
  backbone frozen under a fresh 10-way head (linear probe); 10-way top-1 on val. Its own
  pools: sparse (up to dense 128's inversion time), dense 128, held-out sparse 64.
* compression: teacher the ImageNet DeiT-Tiny (1000 classes); the student its 6-block copy
  (blocks 0, 2, ..., 10, initialised from the teacher), trained with AdamW on the
  teacher's online soft labels; 1000-way top-1;
* quantized: the student is the default W4/A4 (and W4/A8) ``recon`` model calibrated on
  the pool's first 32 images, then trained against the teacher (straight-through weights,
  learned step sizes). Compression and quantized share the ImageNet teacher's pools:
  sparse 512 (cells of 32, 128, 512), a second seed of 128, dense 128, held-out 64.

Real images are train100's, which cover exactly the ten evaluated classes and so flatter
the 1000-way protocols. Reported per cell: top-1 on the first ``--per-class`` val images of
each Imagenette class, the student's top-1 agreement with the teacher on fresh held-out
inverted images of all the teacher's classes (another seed, never trained on), training
seconds, and for the compression student its images/s against the teacher's. Cells are
cached in ``benchmarks/cache/distill_cells/``; a rerun measures only what is missing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import CACHE, DEIT_TINY, DEIT_TINY_CKPT, RESULTS, SYNSETS, TRAIN100, commit, ensure_pool, pool_config, scaled_schedule, write_results
from PIL import Image
from quantization import val_subset

from sparseinv import load_model, sparse_forward
from sparseinv.data import ImageFolder, evaluate_tensors, read_class_index
from sparseinv.distill import DistillConfig, Images, distill, folder_sources, shallow_copy, spread_blocks
from sparseinv.distill.config import QAT_LEARN, SHALLOW_FEATURES, SHALLOW_LR, SHALLOW_MIX
from sparseinv.distill.data import Source
from sparseinv.models import vit_info
from sparseinv.pool import open_pool, read_pool
from sparseinv.quant import QuantConfig, pool_batches, quantize_

SIZES = (32, 128, 512)
BATCH = 32
TRAINED_ON_32 = 32  # calibration images of the post-training start
QAT_LRS = (2e-5, 1e-4)  # candidate learning rates of the quantized student
# Dense inversion's batches took 3.1x sparse's on this benchmark's ImageNet pools (medians of
# 195 s and 62 s per 32), so 384 sparse images cover dense 128's time; the cell takes as many
# of them as the 10-class pools' own timings allow.
PAPER_SPARSE = 384


def _config(sparse: bool, n: int, seed: int):
    base = pool_config(sparse=sparse, num_images=n, batch_size=32, seed=seed)
    return replace(base, schedule=scaled_schedule(400) if sparse else base.schedule, precision="auto", final_mask="last-phase")


def cached_pools(wanted: dict[str, tuple[str, object]], checkpoint: Path) -> dict[str, Path]:
    """Make (or reuse, resumably) each pool; a cached pool is reused only if made with the same settings."""
    model = load_model(DEIT_TINY, checkpoint)
    return {key: ensure_pool(name, DEIT_TINY, checkpoint, config, model) for key, (name, config) in wanted.items()}


def pools(*keys: str) -> dict[str, Path]:
    """The ImageNet teacher's pools every compression and quantized cell draws from (only ``keys`` if given)."""
    wanted = {"sparse": ("kt_sparse_512_s0", _config(True, 512, 0)), "sparse_s1": ("kt_sparse_128_s1", _config(True, 128, 1)),
              "dense": ("kt_dense_128_s0", _config(False, 128, 0)), "heldout": ("kt_sparse_64_s7", _config(True, 64, 7))}
    return cached_pools({k: v for k, v in wanted.items() if not keys or k in keys}, DEIT_TINY_CKPT)


def paper_pools(checkpoint: Path) -> dict[str, Path]:
    """The 10-class teacher's pools: sparse up to dense 128's inversion time, dense 128, held-out 64."""
    return cached_pools({"dense": ("kt10_dense_128_s0", _config(False, 128, 0)),
                         "sparse": (f"kt10_sparse_{PAPER_SPARSE}_s0", _config(True, PAPER_SPARSE, 0)),
                         "heldout": ("kt10_sparse_64_s7", _config(True, 64, 7))}, checkpoint)


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


def cells(p: dict[str, Path], sizes=SIZES, seed1: bool = True) -> dict[str, tuple[Images, float | None]]:
    """name -> (training images, their inversion seconds)."""
    dense_seconds = inversion_seconds(p["dense"], 128)
    available = len(open_pool(p["sparse"]).entries)
    per_sparse = inversion_seconds(p["sparse"], available) / available
    equal_time = min(available, int(dense_seconds / per_sparse) // 32 * 32)
    out = {f"sparse {n}": (sparse_images(p["sparse"], n), inversion_seconds(p["sparse"], n)) for n in sizes}
    out["dense 128"] = (Images.from_pools([open_pool(p["dense"])]), dense_seconds)
    out[f"sparse {equal_time} (= dense 128's time)"] = (sparse_images(p["sparse"], equal_time), inversion_seconds(p["sparse"], equal_time))
    if seed1:
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


# `sparseinv distill --depth N` trains the shallower copy this way unless told otherwise.
DEPTH_DEFAULTS = dict(feature_weight=SHALLOW_FEATURES[0], feature_layers=SHALLOW_FEATURES[1], mix=SHALLOW_MIX, lr=SHALLOW_LR)
# ...and `sparseinv distill --quantized FILE` trained the quantized student before attention distillation became its
# default (benchmarks/qat_attention.py; QAT_LRS[0] is its rate, checked in main).
QUANTIZED_DEFAULTS = dict(feature_weight=SHALLOW_FEATURES[0], feature_layers=SHALLOW_FEATURES[1], lr=QAT_LRS[0],
                          qat_learn=DistillConfig.qat_learn)
# Settings a protocol's cells train with unless a cell says otherwise (not part of the cache key):
# the quantized protocol trains latent weights and step sizes, data-free QAT as usually done.
PROTOCOL_BASE = {"quantized": {"qat_learn": "all"}}


def flags(settings: dict) -> str:
    """Cell settings as the command's options: ``--feature-layers blocks --lr 5e-05``."""
    return " ".join(f"--{k.replace('_', '-')} {format(v, 'g') if isinstance(v, float) else v}" for k, v in sorted(settings.items()))

# Every cell lists its images up to this many entries (a 32-image pool 16 times), so every
# cell has the same epochs and schedule; a repeated image gets a fresh crop at each entry.
ENTRIES = 512


def repeated(images: Images) -> Images:
    n = len(images.sources)
    return replace(images, sources=(images.sources * math.ceil(ENTRIES / n))[: max(ENTRIES, n)])


def train_config(steps: int, entries: int, mode: str = "full", **overrides) -> DistillConfig:
    epochs = max(1, round(steps * BATCH / entries))
    return DistillConfig(mode=mode, epochs=epochs, batch_size=BATCH, **overrides)


def quantized_start(teacher, p: dict[str, Path], w_bits: int, a_bits: int):
    """The default post-training model from the sparse pool's first 32 images, cached as a file
    (named by the pool unless it is the knowledge-transfer pool every earlier cell started from)."""
    from sparseinv.quant import load_quantized, save_quantized

    pool = Path(p["sparse"]).name
    path = CACHE / "distill_cells" / f"ptq_w{w_bits}a{a_bits}{'' if pool == 'kt_sparse_512_s0' else '_' + pool}.safetensors"
    model = copy.deepcopy(teacher)
    if path.is_file():
        return load_quantized(model, path, DEIT_TINY)
    quantize_(model, QuantConfig.for_method("recon", w_bits, a_bits), pool_batches(model, str(p["sparse"]), DEIT_TINY, TRAINED_ON_32, 32))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_quantized(model, path, DEIT_TINY)
    return model


def cell_key(name: str, protocol: str, bits=(4, 4), **overrides) -> str:
    """The cache name of a cell: its protocol, bit widths (quantized), images and settings that differ from the default."""
    tag = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    key = f"{protocol}-{'w%da%d-' % bits if protocol == 'quantized' else ''}{name}{tag}"
    return key.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "eq").replace("'", "")


def run_cell(name: str, protocol: str, images: Images, teacher, p, val, steps: int, bits=(4, 4), yardstick=None, **overrides) -> dict:
    """Train one cell (or read it from the cache). ``yardstick``: real images to also score it on (train100,
    never reported as a result: defaults are chosen on it); ``p`` without ``heldout`` skips the agreement."""
    base = PROTOCOL_BASE.get(protocol, {})
    overrides = {k: v for k, v in overrides.items() if base.get(k) != v}
    tag = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    key = cell_key(name, protocol, bits, **overrides)
    cache = CACHE / "distill_cells" / f"{key}-steps{steps}.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if (yardstick is None or "train100_top1" in cached) and ("heldout" not in p or cached.get("agreement") is not None):
            return cached
    if protocol == "compression":
        student = shallow_copy(teacher, spread_blocks(len(teacher.blocks), 6))
    elif protocol == "paper":
        student = load_model(DEIT_TINY, DEIT_TINY_CKPT)  # the ImageNet backbone, frozen, under a fresh head
    else:
        student = quantized_start(teacher, p, *bits)
    out = CACHE / "distill_cells" / key / "student.safetensors"
    for stale in out.parent.glob("student.*"):
        stale.unlink()
    data = repeated(images)
    config = train_config(steps, len(data.sources), "linear-probe" if protocol == "paper" else "full", **{**base, **overrides})
    start = time.perf_counter()
    summary = distill(teacher, student, data, config, out, teacher_name=DEIT_TINY, student_name=DEIT_TINY, progress=False)
    seconds = time.perf_counter() - start
    result = {"cell": name + tag, "protocol": protocol, "images": len(images.sources), "steps": steps, "train_seconds": seconds,
              "top1": evaluate_tensors(student, *val, progress=False)["top1"],
              "agreement": agreement(student, teacher, p["heldout"]) if "heldout" in p else None,
              "final_loss": summary["history"][-1]["loss"], "config": summary["settings"]["config"], "commit": commit()}
    if yardstick is not None:
        result["train100_top1"] = evaluate_tensors(student, *yardstick, progress=False)["top1"]
    if protocol == "quantized":
        result["bits"] = list(bits)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=2))
    print(f"{protocol} {key}: top-1 {result['top1']:.1f}, agreement {result['agreement']}, train100 {result.get('train100_top1')} "
          f"({seconds:.0f} s)", flush=True)
    return result


def paper_protocol(imagenet_teacher, val, steps: int) -> dict:
    """(a): a 10-class teacher fine-tuned end to end; the ImageNet backbone frozen under a fresh 10-way head."""
    import make_teacher

    meta = make_teacher.main(val)
    teacher = load_model(DEIT_TINY, make_teacher.TEACHER_CKPT)
    p = paper_pools(make_teacher.TEACHER_CKPT)
    val10 = (val[0], make_teacher.ten_way(val[1], meta["classes"]))
    # Reference: the ImageNet model's own head restricted to the ten classes (no training at all).
    rows = torch.tensor([read_class_index(SYNSETS)[c] for c in meta["classes"]])
    with torch.no_grad():
        own = torch.cat([imagenet_teacher(val[0][i : i + 100])[:, rows].argmax(1) for i in range(0, len(val[0]), 100)])
    out = {"teacher": meta, "imagenet_head_ten_rows_top1": 100.0 * float((own == val10[1]).float().mean()), "rows": []}
    for name, (images, seconds) in cells(p, sizes=(128,), seed1=False).items():
        out["rows"].append({**run_cell(name, "paper", images, teacher, p, val10, steps), "inversion_seconds": seconds})
    return out


def onnx_check(teacher, quantized_file: Path, val) -> dict:
    """The W4/A8 quantized student exported to integer ONNX, its top-1 in ONNX Runtime beside PyTorch's."""
    from sparseinv.quant.export import export_onnx, onnx_logits, onnx_session
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
             f"{payload['teacher_images_per_second']:.1f} images/s. Every cell trains {payload['steps']} steps of {BATCH} "
             f"({payload['protocols']['paper'][0]['steps'] if payload['protocols'].get('paper') else payload['steps']} in the paper "
             "protocol).", ""]
    for protocol, rows in payload["protocols"].items():
        lines += [f"## {protocol}", "", "| images | inversion s | top-1 | agreement | train s |", "| --- | --- | --- | --- | --- |"]
        for row in rows:
            inv = "" if row.get("inversion_seconds") is None else f"{row['inversion_seconds']:.0f}"
            lines.append(f"| {row['cell']} | {inv} | {row['top1']:.1f} | {row['agreement']:.1f} | {row['train_seconds']:.0f} |")
        if protocol == "paper" and "paper" in payload:
            a = payload["paper"]
            lines += ["", f"10-way top-1. Teacher (fine-tuned end to end on train100): {a['teacher'].get('val_top1', float('nan')):.1f}; "
                          f"the ImageNet model's own head restricted to the ten classes, untrained: {a['imagenet_head_ten_rows_top1']:.1f}."]
        if protocol == "compression":
            lines += ["", f"Trained as `sparseinv distill --depth 6` trains by default: `{flags(DEPTH_DEFAULTS)}`."]
        extra = (payload.get("start") or {}).get(protocol)
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
    matching = "token matching at every block (--feature-layers blocks --feature-weight 1) against logits only"
    for key, label in (("features", f"Compression student, sparse 512, {matching}"),
                       ("quantized_features", f"W4/A4 quantized student, sparse 512, {matching}"),
                       ("quantized_mix", "W4/A4 quantized student, sparse 512, mixed views"),
                       ("quantized_learn", "W4/A4 quantized student, sparse 512, what it learns (--qat-learn; the command's other "
                                           "defaults)"),
                       ("quantized_cli", "W4/A4 quantized student, sparse 512, as `sparseinv distill --quantized` trains by default "
                                         f"(`{flags(QUANTIZED_DEFAULTS)}`)")):
        if key in choices:
            lines.append(f"{label}: " + "; ".join(f"{k}: top-1 {r['top1']:.1f}, agreement {r['agreement']:.1f}"
                                                  for k, r in choices[key].items()) + ".")
    if "onnx" in payload:
        o = payload["onnx"]
        lines.append(f"W4/A8 quantized student exported to integer ONNX: top-1 {o['onnx_top1']:.1f} in ONNX Runtime, "
                     f"{o['pytorch_top1']:.1f} in PyTorch.")
    return "\n".join(lines) + "\n"


def old_paper_steps() -> int | None:
    """The paper protocol's steps as the kept rows record them (each row has its own ``steps``)."""
    path = RESULTS / "distill.json"
    rows = json.loads(path.read_text()).get("protocols", {}).get("paper", []) if path.is_file() else []
    return rows[0]["steps"] if rows else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps of 32 images per compression and quantized cell")
    parser.add_argument("--paper-steps", type=int, default=200,
                        help="training steps of 32 images per paper-protocol cell (a linear probe: one layer to fit)")
    parser.add_argument("--per-class", type=int, default=100, help="val images per Imagenette class")
    parser.add_argument("--protocols", nargs="+", default=["paper", "compression", "quantized"], choices=["paper", "compression", "quantized"])
    parser.add_argument("--quantized-cells", nargs="*", help="the quantized protocol's cells (by name; default: every cell)")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    val = val_subset(teacher, args.per_class)
    payload = {"steps": args.steps, "paper_steps": args.paper_steps if "paper" in args.protocols else old_paper_steps(), "val_images": len(val[1]), "teacher_top1": evaluate_tensors(teacher, *val, progress=False)["top1"],
               "teacher_images_per_second": images_per_second(teacher), "protocols": {}, "start": {},
               "scaled_down": "400 inversion steps instead of 4000; pools of at most 512 images; a fixed number of training steps per cell"}
    payload["choices"] = {}
    old = json.loads((RESULTS / "distill.json").read_text()) if (RESULTS / "distill.json").is_file() else {}
    for kept in ("paper", "compression", "quantized"):  # protocols not measured this run keep their rows
        if kept not in args.protocols and kept in old.get("protocols", {}):
            payload["protocols"][kept] = old["protocols"][kept]
            payload["start"][kept] = old.get("start", {}).get(kept)
    if "paper" not in args.protocols and "paper" in old:  # the paper protocol's teacher, kept with its rows
        payload["paper"] = old["paper"]
    if "paper" in args.protocols:
        payload["paper"] = paper_protocol(teacher, val, args.paper_steps)
        payload["protocols"]["paper"] = payload["paper"].pop("rows")
    if not {"compression", "quantized"} & set(args.protocols):
        kept = {k: v for k, v in old.items() if k not in ("command", "machine", "commit", "steps")}  # this run's own
        write_results("distill", {**kept, **payload, "steps": old.get("steps", args.steps)})
        (RESULTS / "distill.md").write_text(markdown({**kept, **payload, "steps": old.get("steps", args.steps),
                                                      "command": "python benchmarks/distill.py"}))
        return
    p = pools()
    all_cells = cells(p)
    chosen = all_cells
    if "compression" in args.protocols:
        six = shallow_copy(teacher, spread_blocks(len(teacher.blocks), 6))
        payload["start"]["compression"] = {"6-block copy": {"top1": evaluate_tensors(six, *val, progress=False)["top1"],
                                                            "agreement": agreement(six, teacher, p["heldout"])}}
        payload["student_images_per_second"] = images_per_second(six)
        for protocol, overrides in (("compression", DEPTH_DEFAULTS), ("compression, logits alone (plain views, lr 2e-4)", {})):
            payload["protocols"][protocol] = [
                {**run_cell(name, "compression", images, teacher, p, val, args.steps, **overrides), "cell": name, "inversion_seconds": seconds}
                for name, (images, seconds) in chosen.items()]
        # Online teacher targets (each crop labelled) against cached ones (each image once), equal steps.
        images, _ = all_cells["sparse 512"]
        payload["choices"]["targets"] = {"online": run_cell("sparse 512", "compression", images, teacher, p, val, args.steps),
                                         "cached": run_cell("sparse 512", "compression", images, teacher, p, val, args.steps,
                                                            targets="cached")}
        # A second approach to real-image accuracy: match every student block's tokens to the teacher's at the same depth.
        payload["choices"]["features"] = {
            "logits only": payload["choices"]["targets"]["online"],
            "blocks, weight 1": run_cell("sparse 512", "compression", images, teacher, p, val, args.steps, feature_weight=1.0,
                                         feature_layers="blocks")}
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
        images, _ = all_cells["sparse 512"]
        payload["choices"]["quantized_features"] = {
            "logits only": next(r for r in rows if r["cell"] == "W4/A4 sparse 512"),
            "blocks, weight 1": run_cell("sparse 512", "quantized", images, teacher, p, val, args.steps, (4, 4), lr=lr,
                                         feature_weight=1.0, feature_layers="blocks")}
        # A next idea for real-image accuracy: mixed views, the compression student's default (mixup; online targets).
        payload["choices"]["quantized_mix"] = {
            "shifts + mirrors": payload["choices"]["quantized_features"]["logits only"],
            "+ mixup": run_cell("sparse 512", "quantized", images, teacher, p, val, args.steps, (4, 4), lr=lr, mix="mixup")}
        # What a quantized student learns, at the command's other defaults.
        payload["choices"]["quantized_learn"] = {
            learn: run_cell("sparse 512", "quantized", images, teacher, p, val, args.steps, (4, 4), **{**QUANTIZED_DEFAULTS, "qat_learn": learn})
            for learn in QAT_LEARN}
        # What 'sparseinv distill --quantized' does by default, plain and mixed.
        assert math.isclose(QUANTIZED_DEFAULTS["lr"], DistillConfig(mode="full").learning_rate(quantized=True))  # the command's rate
        payload["choices"]["quantized_cli"] = {
            "shifts + mirrors": run_cell("sparse 512", "quantized", images, teacher, p, val, args.steps, (4, 4), **QUANTIZED_DEFAULTS),
            "+ mixup": run_cell("sparse 512", "quantized", images, teacher, p, val, args.steps, (4, 4), **QUANTIZED_DEFAULTS,
                                mix="mixup")}
        w4a8 = CACHE / "distill_cells" / f"quantized-w4a8-sparse_512-lr{lr}" / "student.safetensors"
        if w4a8.is_file():
            payload["onnx"] = onnx_check(teacher, w4a8, val)
        elif "onnx" in old:  # the student file is gone from the cache: keep the check made with it
            payload["onnx"] = old["onnx"]
    path = write_results("distill", payload)
    (RESULTS / "distill.md").write_text(markdown({**payload, "command": "python benchmarks/distill.py"}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
