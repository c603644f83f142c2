"""Quantized students that learn: attention distillation and the inter-head similarity prior.

    python benchmarks/qat_attention.py [--steps 400] [--stages choose report w3a3 prior compression rounds reference-stops]

Every cell is ``benchmarks/distill.py``'s quantized protocol (DeiT-Tiny teacher, the
default ``recon`` post-training model calibrated on the sparse pool's first 32 images,
400 training steps of 32 as ``sparseinv distill --quantized`` trains by default) with one
change. Stages:

* choose: the attention term's weight and form on 128 sparse images, chosen by top-1 on
  the first 20 train100 images per class (real images that no data-free run sees and no
  table reports);
* report: the chosen setting against the command's defaults on 512 sparse images, and on
  dense images at equal inversion time (dense 128), top-1 on val (first 100 per class);
* w3a3: W3/A3 post-training and trained, beside Gaussian noise and real-image calibration;
* compression: the 6-block copy of the teacher from 512 sparse images, with and without the term;
* prior: post-training W4/A4 (and W4/A8, W6/A6) from 32 images inverted with the
  inter-head attention-similarity prior, against the same 32 without it;
* rounds: images that keep up with the student. From 64 sparse images (the held-out pool,
  seed 7) the W4/A4 student trains ~400 steps as ``distill --quantized`` does by default;
  halfway a round inverts 64 more from the teacher, plain or with the teacher-student
  disagreement term against the student of that moment (``--round-disagreement``),
  beside the same 128 images (the plain round's) as a fixed pool from the start: the
  plain round and the fixed pool cost the same inversion time.
* reference-stops: the W4/A4 and W3/A3 post-training starts (32 images) and the trained W4/A4
  student (attention heads 1; ``--trained`` adds W3/A3) from 512 images inverted with the
  reference stop steps kept whole in the 400-step run (50/100/200/300, not scaled to
  5/10/20/30 as distill.py's pool is), the best calibration images on the yardstick of
  ``benchmarks/calibration_images.py``.

Results: ``benchmarks/results/qat_attention.json``. Cells are cached as distill.py's.
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

import torch
from common import CACHE, DEIT_TINY, DEIT_TINY_CKPT, RESULTS, TRAIN100, commit, ensure_pool, image_subset, pool_config, write_results
from distill import (
    QUANTIZED_DEFAULTS,
    _config,
    cells,
    quantized_start,
    run_cell,
    sparse_images,
)
from quantization import heldout_kl, val_subset

from sparseinv import load_model
from sparseinv.data import evaluate_tensors
from sparseinv.distill import Images
from sparseinv.inversion.losses import InversionLoss
from sparseinv.quant import QuantConfig, pool_batches, quantize_
from sparseinv.quant.calibrate import folder_batches, noise_batches

YARDSTICK_PER_CLASS = 20
PRIOR_WEIGHTS = (1.0,)
PRIOR_BITS = ((4, 4), (4, 8), (6, 6))


def scores(model, val, yardstick) -> dict:
    """Top-1 on val (reported) and on the train100 yardstick (choices are made on it)."""
    return {"top1": evaluate_tensors(model, *val, progress=False)["top1"],
            "train100_top1": evaluate_tensors(model, *yardstick, progress=False)["top1"]}


def cell(name, images, teacher, p, val, steps, bits=(4, 4), yardstick=None, **overrides) -> dict:
    return run_cell(name, "quantized", images, teacher, p, val, steps, bits, yardstick=yardstick, **{**QUANTIZED_DEFAULTS, **overrides})


def sparse(p, n: int):
    images = sparse_images(p["sparse"], n)
    if len(images.sources) < n:  # the pool is still being made: never train on fewer images under its name
        raise SystemExit(f"{p['sparse']} holds {len(images.sources)} images, not yet {n}")
    return images


# The trials of the choice: the command's defaults, each attention form, a heavier weight, and a
# gentler rate (the second approach: the W4/A4 student falls below its start with or without the term).
TRIALS = {
    "defaults": {},
    "heads 1": {"attention_weight": 1.0, "attention_form": "heads"},
    "foreground 1": {"attention_weight": 1.0, "attention_form": "foreground"},
    "heads 10": {"attention_weight": 10.0, "attention_form": "heads"},
    "heads 1, lr 2e-6": {"attention_weight": 1.0, "attention_form": "heads", "lr": 2e-6},
    # A third approach: step sizes learned in log space (each moves by a fraction of itself) at a rate
    # that moves a median weight step size about as far per step as 2e-5 does in linear space.
    "log step sizes, lr 1e-3": {"qat_log_step_sizes": True, "lr": 1e-3},
}


def choose(teacher, p, val, yardstick, steps, only: list[str] | None = None) -> dict:
    images = sparse(p, 128)
    trials = {name: cell("sparse 128", images, teacher, p, val, steps, yardstick=yardstick, **extra)
              for name, extra in TRIALS.items() if not only or name in only}
    chosen = max(trials, key=lambda k: trials[k]["train100_top1"])
    return {"trials": trials, "chosen": chosen, "by": f"train100 top-1 (first {YARDSTICK_PER_CLASS} per class)"}


def setting(chosen_name: str) -> dict:
    return TRIALS[chosen_name]


def report(teacher, p, val, yardstick, steps, chosen: dict, also: list[str] = ()) -> dict:
    all_cells = {"sparse 512": (sparse(p, 512), None)} if "dense" not in p else cells(p, sizes=(512,), seed1=False)
    rows = {}
    equal_time = next((k for k in all_cells if "= dense 128's time" in k), None)
    # The command's defaults and the chosen setting on 512 sparse images; the chosen setting on dense
    # images and on sparse ones at dense 128's inversion time.
    wanted = [("sparse 512", "defaults", {}), ("sparse 512", "attention", chosen)] + [("sparse 512", name, TRIALS[name]) for name in also]
    if "dense" in p:
        wanted += [("dense 128", "attention", chosen), (equal_time, "attention", chosen)]
    for name, label, extra in wanted:
        images, seconds = all_cells[name]
        rows[f"{name}, {label}"] = {**cell(name, images, teacher, p, val, steps, yardstick=yardstick, **extra), "inversion_seconds": seconds}
    return rows


def compression(teacher, p, val, yardstick, steps) -> dict:
    """The 6-block copy from 512 sparse images as `sparseinv distill --depth 6` trains it, with and without the attention term."""
    from distill import DEPTH_DEFAULTS
    from sparseinv.distill import shallow_copy, spread_blocks

    six = shallow_copy(teacher, spread_blocks(len(teacher.blocks), 6))
    out = {"start": scores(six, val, yardstick)}
    images = sparse(p, 512)
    for label, extra in (("defaults", {}), ("heads 1", TRIALS["heads 1"])):
        out[label] = run_cell("sparse 512", "compression", images, teacher, p, val, steps, yardstick=yardstick, **{**DEPTH_DEFAULTS, **extra})
    return out


def w3a3(teacher, p, val, yardstick, steps, setting: dict) -> dict:
    """W3/A3: post-training from 32 sparse, noise and real train100 images (``recon``), then trained from 512 sparse."""
    sources = {"sparse 32": None, "noise 32": noise_batches(teacher, 32, 32), "real train100 32": folder_batches(teacher, TRAIN100, 32, 32)}
    out = {}
    for name, batches in sources.items():
        if batches is None:
            model = quantized_start(teacher, p, 3, 3)  # cached: the trained row starts from it
        else:
            model = copy.deepcopy(teacher)
            quantize_(model, QuantConfig.for_method("recon", 3, 3), batches, progress=False)
        out[f"post-training {name}"] = scores(model, val, yardstick)
        print(f"W3/A3 post-training {name}: {out[f'post-training {name}']}", flush=True)
    out["trained sparse 512, attention heads 1"] = cell("sparse 512", sparse(p, 512), teacher, p, val, steps, (3, 3), yardstick, **setting)
    return out


def prior(teacher, p, val, yardstick) -> dict:
    """Post-training from 32 images inverted with the head-similarity prior (pools cached)."""
    heldout = pool_batches(teacher, p["heldout"], DEIT_TINY, 64, 32) if "heldout" in p else None
    variants = {"baseline": p["sparse"]}
    for w in PRIOR_WEIGHTS:
        config = replace(_config(True, 32, 0), loss=InversionLoss(head_similarity=w))
        variants[f"head similarity {w:g}"] = ensure_pool(f"prior_head_similarity_{w:g}_32", DEIT_TINY, DEIT_TINY_CKPT, config, teacher)
    out = {}
    for name, pool in variants.items():
        run = json.loads((Path(pool) / "run.json").read_text())
        out[name] = {"seconds_per_image": statistics.median(b["wall_seconds"] for b in run["batches"][:1]) / 32}
        batches = pool_batches(teacher, pool, DEIT_TINY, 32, 32)
        for bits in PRIOR_BITS:
            model = copy.deepcopy(teacher)
            quantize_(model, QuantConfig.for_method("recon", *bits), batches, progress=False)
            out[name][f"W{bits[0]}/A{bits[1]}"] = {**scores(model, val, yardstick),
                                                   "heldout_kl": None if heldout is None else heldout_kl(model, teacher, heldout)}
            print(name, bits, out[name][f"W{bits[0]}/A{bits[1]}"], flush=True)
    return out


# 64 images for 67 epochs (134 steps of 32), then ~266 steps over the grown pool: ~400 steps in all, as the other cells.
ROUND_EVERY, ROUND_STEPS, FIXED_EPOCHS = 67, 400, 100
# variant: (disagreement weight, images per round); None: the plain round's 128 images as a fixed pool from the start.
# "plain rounds 192" inverts as long as "disagreement 1" does (its round costs ~2.7x a plain one per image).
ROUND_VARIANTS = {"plain rounds": (0.0, 64), "disagreement 1": (1.0, 64), "disagreement 10": (10.0, 64),
                  "plain rounds 192": (0.0, 192), "fixed 128": None}


def round_epochs(images_per_round: int, first: int = 64, batch: int = 32) -> int:
    """Epochs in all so that the run takes ~ROUND_STEPS steps: ROUND_EVERY on the first pool, the rest on the grown one."""
    after = ROUND_STEPS - ROUND_EVERY * -(-first // batch)
    return ROUND_EVERY + math.ceil(after / -(-(first + images_per_round) // batch))


def rounds(teacher, p, val, yardstick, which: list[str]) -> dict:
    """Each variant's W4/A4 student (cached per variant); ``fixed 128`` needs the plain round's pool."""
    from sparseinv.distill import DistillConfig, distill
    from sparseinv.runs.rounds import RoundsConfig, distill_with_rounds, round_folder

    first = CACHE / "pools" / "kt_sparse_64_s7"
    plain_round = round_folder(CACHE / "distill_cells" / "rounds-plain_rounds" / "student.safetensors", 1)
    out = {}
    for label in which:
        folder = CACHE / "distill_cells" / f"rounds-{label.replace(' ', '_')}"
        if folder.with_suffix(".json").is_file():
            out[label] = json.loads(folder.with_suffix(".json").read_text())
            continue
        student, started = quantized_start(teacher, p, 4, 4), time.perf_counter()
        names = dict(teacher_name=DEIT_TINY, student_name=DEIT_TINY, progress=False)
        if ROUND_VARIANTS[label] is None:
            if not _complete(plain_round):
                raise SystemExit(f"'fixed 128' trains on the plain round's images: run the 'plain rounds' variant first ({plain_round}).")
            config = DistillConfig.for_student("quantized", epochs=FIXED_EPOCHS, batch_size=32)
            summary = distill(teacher, student, [first, plain_round], config, folder / "student.safetensors", **names)
            inverted = [first, plain_round]
        else:
            weight, per_round = ROUND_VARIANTS[label]
            config = DistillConfig.for_student("quantized", epochs=round_epochs(per_round), batch_size=32)
            grow = RoundsConfig(ROUND_EVERY, per_round, weight)
            summary = distill_with_rounds(teacher, student, first, config, grow, folder / "student.safetensors",
                                          teacher_checkpoint=str(DEIT_TINY_CKPT), **names)
            inverted = [first, round_folder(folder / "student.safetensors", 1)]
        seconds = [json.loads((f / "run.json").read_text())["wall_seconds"] for f in inverted]
        out[label] = {**scores(student, val, yardstick),
                      "steps": sum(-(-r["num_images"] // 32) for r in summary["history"]),
                      "images": summary["history"][-1]["num_images"], "inversion_seconds": sum(seconds),
                      "round_inversion_seconds": seconds[1], "seconds": time.perf_counter() - started,
                      "disagreement": None if ROUND_VARIANTS[label] is None else ROUND_VARIANTS[label][0], "config": summary["settings"]["config"], "commit": commit()}
        folder.with_suffix(".json").write_text(json.dumps(out[label], indent=2))
        print(f"rounds {label}: {out[label]}", flush=True)
    return out


# 512 images inverted with the reference stop steps kept as they are (50/100/200/300 of 400, bf16,
# rescored masks): on the yardstick of benchmarks/calibration_images.py 32 of them calibrated W4/A4
# best, ahead of the scaled stops of distill.py's pool. Two pools of 256, seeds 0 and 1, so both
# cores can make them.
REFERENCE_STOP_POOLS = ("kt_late_256_s0", "kt_late_256_s1")


def reference_stops(teacher, val, yardstick, steps, setting: dict, trained: list[str]) -> dict:
    """Post-training W4/A4 and W3/A3 (and the ``trained`` ones: W4/A4, W3/A3) from images inverted with the reference stop steps."""
    pools = [ensure_pool(name, DEIT_TINY, DEIT_TINY_CKPT, replace(pool_config(True, 256, seed=seed), precision="auto"), teacher)
             for seed, name in enumerate(REFERENCE_STOP_POOLS)]
    p, images = {"sparse": pools[0]}, Images.from_pools(pools, DEIT_TINY, teacher)
    out = {}
    for bits in ((4, 4), (3, 3)):
        tag = f"W{bits[0]}/A{bits[1]}"
        start = quantized_start(teacher, p, *bits)
        out[f"{tag} post-training sparse 32"] = scores(start, val, yardstick)
        print(f"reference stops {tag}: {out[f'{tag} post-training sparse 32']}", flush=True)
        if tag in trained:
            out[f"{tag} trained sparse 512, attention heads 1"] = cell("reference stops 512", images, teacher, p, val, steps, bits,
                                                                       yardstick, **setting)
    return out


def _complete(pool: Path) -> bool:
    run = pool / "run.json"
    return run.is_file() and bool(json.loads(run.read_text()).get("complete"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--stages", nargs="+", default=["choose", "report", "w3a3", "prior"])
    parser.add_argument("--trials", nargs="+", choices=list(TRIALS), help="run only these trials of the choice (cells are cached: "
                                                                          "a later run with every trial chooses among them all)")
    parser.add_argument("--report-also", nargs="*", default=[], choices=list(TRIALS), help="more trials to report on 512 images")
    parser.add_argument("--rounds", nargs="+", default=["plain rounds", "disagreement 1", "fixed 128"], choices=list(ROUND_VARIANTS),
                        help="the rounds stage's variants (each cached; run them one process each to use both cores)")
    parser.add_argument("--trained", nargs="*", default=["W4/A4"], choices=["W4/A4", "W3/A3"],
                        help="the reference-stops stage's trained students (post-training ones are always measured)")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    val = val_subset(teacher, 100)
    yardstick = image_subset(teacher, TRAIN100, YARDSTICK_PER_CLASS, "train100")
    # distill.py's pools, made there (`python benchmarks/distill.py` or `distill.pools()`); the yardstick
    # here is train100, so the held-out agreement is not computed.
    p = {"sparse": CACHE / "pools" / "kt_sparse_512_s0"}
    for key, name in (("dense", "kt_dense_128_s0"), ("heldout", "kt_sparse_64_s7")):
        if _complete(CACHE / "pools" / name) and (key != "heldout" or "prior" in args.stages):
            p[key] = CACHE / "pools" / name
    path = RESULTS / "qat_attention.json"
    payload = {"steps": args.steps, "val_images": len(val[1]), "yardstick_images": len(yardstick[1])}
    old = json.loads(path.read_text()) if path.is_file() else {}
    if "choose" in old:
        payload["choose"] = old["choose"]
    started = time.time()
    if "choose" in args.stages:
        payload["choose"] = choose(teacher, p, val, yardstick, args.steps, args.trials)
    chosen = setting(payload["choose"]["chosen"]) if "choose" in payload else {}
    if "report" in args.stages:
        start = quantized_start(teacher, p, 4, 4)
        payload["start"] = {"W4/A4 post-training sparse 32": scores(start, val, yardstick)}
        payload["report"] = report(teacher, p, val, yardstick, args.steps, chosen, args.report_also)
    if "compression" in args.stages:
        payload["compression"] = compression(teacher, p, val, yardstick, args.steps)
    if "w3a3" in args.stages:
        # MimiQ's form at weight 1, not the choice above: W3/A3 is measured beside the choice, not after it.
        payload["w3a3"] = w3a3(teacher, p, val, yardstick, args.steps, {"attention_weight": 1.0, "attention_form": "heads"})
    if "prior" in args.stages:
        payload["prior"] = prior(teacher, p, val, yardstick)
    if "reference-stops" in args.stages:
        payload["reference_stops"] = {**old.get("reference_stops", {}), **reference_stops(
            teacher, val, yardstick, args.steps, {"attention_weight": 1.0, "attention_form": "heads"}, args.trained)}
    if "rounds" in args.stages:
        payload["rounds"] = {**old.get("rounds", {}), **rounds(teacher, p, val, yardstick, args.rounds)}
    payload[f"seconds_{'_'.join(args.stages)}"] = time.time() - started
    # Stages may run in separate processes: keep what the file holds now of the stages not run here.
    now = json.loads(path.read_text()) if path.is_file() else {}
    kept = {k: v for k, v in now.items() if k not in payload and k not in ("command", "machine", "commit")}
    print(f"wrote {write_results('qat_attention', {**kept, **payload})}")


if __name__ == "__main__":
    main()
