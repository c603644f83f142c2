"""Which inverted images calibrate a W4/A4 model well: stop steps, length, precision, soft targets.

    python benchmarks/calibration_images.py [--only ROW ...] [--seeds 0 1]

The results file was made by two processes, one per core:
``--only calib_reference_fp32 calib_scaled_fp32 calib_reference_fp32_s1 calib_scaled_fp32_s1 kt_sparse_512_s0``
and ``--only calib_reference_bf16 calib_reference_1600_bf16 calib_smooth_0.3 calib_boundary_0.4 --seeds 0``;
the reconstruction rows by ``--only recon_iters_100 recon_drop_0.75 recon_steps_frozen --seeds 0`` and
``... --seeds 1`` (one per core), then the same with no ``--seeds`` to gather both (all cached);
``--only all_patches --seeds 0``; ``--only filled_mean filled_blur --seeds 0``; ``--only calib_tv_1e-3``,
``--only calib_energy_0.3``, ``--only calib_energy_early_1``, ``--only calib_energy_early_3`` (one process per core);
``--only mixed_plain_64 --seeds 0`` and ``--only mixed_aimed_64 --seeds 0`` (one per core);
``--only contrast_0.8`` and ``--only contrast_0.6`` (one per core); ``--only calib_reference_4000_bf16`` and
``--only calib_reference_4000_bf16_s1`` (one per core).

Each row inverts 32 sparse DeiT-Tiny images (400 steps, seed 0 unless the row says otherwise,
fp32, rescored masks: ``benchmarks/make_pools.py``'s pools) with one setting changed, quantizes the model W4/A4 with
``--method recon`` on them (reconstruction seeds 0 and 1 by default: one reconstruction
moves by several points with its seed), and scores it on train100's first 20 images per class (200 real
images no data-free run sees: the yardstick defaults are chosen on) and on val's first 100
per class (1000 images, the reported figure). Also recorded: the teacher's mean top
probability on the 32 images it was inverted towards.

Rows:

* reference stops: the paper's stop steps 50/100/200/300 kept as they are in a 400-step
  run (the dense phase lasts 50 steps, the last 100 steps run on 46 patches);
* scaled stops: the same steps scaled to the run's length (5/10/20/30, what
  ``sparseinv invert --iterations 400`` does and what ``benchmarks/distill.py``'s pools use);
* bf16: reference stops with ``--precision auto`` (bf16 on this CPU);
* 1600 steps: reference stops in a 1600-step run, bf16;
* 4000 steps: reference stops in a 4000-step run (``sparseinv invert``'s default length), bf16, pool seeds 0 and 1;
* label smoothing 0.3: cross-entropy against a smoothed target (teacher no longer pushed to
  certainty);
* boundary 0.4: cross-entropy against 0.6 of the class and 0.4 of a partner class (a fixed
  random pairing), images near a decision boundary (Qimera's boundary-supporting samples);
* TV 1e-3: ten times the default TV-L2 weight (smoother images);
* activation energy: a term (:class:`ActivationEnergy`) that lowers the energy of the attention
  projection's and fc2's inputs, over every block (0.3) or blocks 0-5 (1 and 3), where sparse
  images give far more than photographs (``calibration_gap.py energy``);
* distill.py's pool: the first 32 images of ``kt_sparse_512_s0`` (scaled stops, bf16,
  last-phase masks), the knowledge-transfer benchmarks' post-training start.

Reconstruction rows keep the images (the two reference-stop pools, seeds 0 and 1, reconstruction
seeds 0 and 1: four runs, like the reference-stops rows together) and make the reconstruction fit them less:
100 steps per unit instead of 300, QDrop probability 0.75 instead of 0.5, activation step sizes
left where calibration put them; or feed the same images whole (``all_patches``: every patch, the
stopped ones black as the pool stores them, instead of the kept ones only; ``filled_mean``: the stopped
patches set to the normalisation mean, flat grey; ``filled_blur``: the stopped patches taken from the
kept patches' colours smoothed over the patch grid, a smooth background), or feed the kept patches with
lower contrast (``contrast_0.8``, ``contrast_0.6``: normalised pixels times 0.8 or 0.6, toward the
mean colour; the energy of the first blocks falls with it, no inversion needed).

Rows on 64 images: the reference-stop pool of seed 0 with the plain pool of seed 1
(``mixed_plain_64``), or with 32 images (pool seed 2) inverted against the W4/A4 model calibrated on
pool seed 0, the teacher-student disagreement term at weight 1 beside the cross-entropy
(``mixed_aimed_64``: images where that model and the teacher disagree).

Pools are cached under ``benchmarks/cache/pools/calib_*`` and checked against their recorded
settings. Results: ``benchmarks/results/calibration_images.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from common import CACHE, RESULTS, DEIT_TINY, DEIT_TINY_CKPT, TRAIN100, commit, ensure_pool, image_subset, pool_config, scaled_schedule, write_results
from quantization import val_subset

from sparseinv import load_model
from sparseinv.data import evaluate_tensors
from sparseinv.inversion.losses import InversionLoss, StudentDisagreement
from sparseinv.quant import QuantConfig, pool_batches, quantize_
from sparseinv.quant.io import load_quantized
from sparseinv.vit.forward import logits

NUM = 32
# The partner class of each class for the boundary targets: a fixed random pairing.
PARTNER = torch.randperm(1000, generator=torch.Generator().manual_seed(123))


class SoftCE:
    """Cross-entropy against a soft target: ``smooth`` (label smoothing) or ``boundary``
    (1 - eps on the class, eps on its partner class). Per image, shape (B,)."""

    def __init__(self, kind: str, eps: float) -> None:
        self.kind, self.eps = kind, eps

    def __call__(self, inputs) -> torch.Tensor:
        z, y = inputs.logits, inputs.targets
        if self.kind == "smooth":
            return F.cross_entropy(z, y, reduction="none", label_smoothing=self.eps)
        logp = z.log_softmax(-1)
        partner = PARTNER.to(y.device)[y]
        return -(1 - self.eps) * logp.gather(1, y[:, None]).squeeze(1) - self.eps * logp.gather(1, partner[:, None]).squeeze(1)


def soft(kind: str, eps: float):
    return replace(pool_config(True, NUM), loss=InversionLoss(ce=0.0, extra=[(1.0, SoftCE(kind, eps))]))


class ActivationEnergy:
    """Per image: the log mean square of each block's attention-projection input and post-GELU
    activation (the fc2 input), averaged over those places in ``blocks`` (all by default). Shape (B,).

    Inverted texture drives both wider than photographs do (2-4x the energy in the first
    blocks), and W4/A4 calibration then learns coarser steps there. Hooks on ``model``'s
    ``attn.proj`` and ``mlp.fc2`` inputs record the last forward (the fed tokens); call
    :meth:`remove` when the pool is made.
    """

    def __init__(self, model, blocks: slice = slice(None)) -> None:
        self.values: dict[int, torch.Tensor] = {}
        layers = [m for block in list(model.blocks)[blocks] for m in (block.attn.proj, block.mlp.fc2)]
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(layers)]

    def _hook(self, position: int):
        def hook(module, inputs) -> None:
            self.values[position] = inputs[0]
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __call__(self, inputs) -> torch.Tensor:
        return torch.stack([x.float().square().mean(dim=(1, 2)).log() for x in self.values.values()]).mean(0)


def energy(model, weight: float, blocks: slice = slice(None)):
    return replace(pool_config(True, NUM), loss=InversionLoss(extra=[(weight, ActivationEnergy(model, blocks))]))


# row: (pool folder, what it is, its settings); the pool folder is also the row's name.
# Each row's settings are made from the teacher (a term may hook it).
ROWS = {
    "calib_reference_fp32": ("reference stops (50/100/200/300), fp32", lambda _: pool_config(True, NUM)),
    "calib_scaled_fp32": ("scaled stops (5/10/20/30), fp32", lambda _: replace(pool_config(True, NUM), schedule=scaled_schedule(400))),
    "calib_reference_fp32_s1": ("reference stops, fp32, pool seed 1", lambda _: pool_config(True, NUM, seed=1)),
    "calib_scaled_fp32_s1": ("scaled stops, fp32, pool seed 1",
                             lambda _: replace(pool_config(True, NUM, seed=1), schedule=scaled_schedule(400))),
    "calib_reference_bf16": ("reference stops, bf16", lambda _: replace(pool_config(True, NUM), precision="auto")),
    "calib_reference_1600_bf16": ("reference stops, 1600 steps, bf16",
                                  lambda _: replace(pool_config(True, NUM, iterations=1600), precision="auto")),
    # The length `sparseinv invert` runs by default (its stops are these as they are), pool seeds 0 and 1.
    "calib_reference_4000_bf16": ("reference stops, 4000 steps (invert's default length), bf16",
                                  lambda _: replace(pool_config(True, NUM, iterations=4000), precision="auto")),
    "calib_reference_4000_bf16_s1": ("reference stops, 4000 steps, bf16, pool seed 1",
                                     lambda _: replace(pool_config(True, NUM, iterations=4000, seed=1), precision="auto")),
    "calib_smooth_0.3": ("label smoothing 0.3", lambda _: soft("smooth", 0.3)),
    "calib_boundary_0.4": ("boundary 0.4", lambda _: soft("boundary", 0.4)),
    "calib_tv_1e-3": ("TV-L2 weight 1e-3 (default 1e-4)", lambda _: replace(pool_config(True, NUM), loss=InversionLoss(tv_l2=1e-3))),
    "calib_energy_0.3": ("activation energy 0.3 (attention-projection and fc2 inputs)", lambda m: energy(m, 0.3)),
    # The term at 0.3 lowered the last blocks' energy, not the first blocks' (where it is 2-4x the real images'):
    "calib_energy_early_1": ("activation energy 1.0, blocks 0-5 only", lambda m: energy(m, 1.0, slice(0, 6))),
    "calib_energy_early_3": ("activation energy 3.0, blocks 0-5 only", lambda m: energy(m, 3.0, slice(0, 6))),
}
DISTILL_POOL = "kt_sparse_512_s0"  # distill.py's pool: scaled stops, bf16, last-phase masks (its first 32 images)
# Rows on the same images (the two reference-stop pools, seeds 0 and 1), reconstructed or fed
# otherwise; name -> (what, ReconConfig fields changed, what fills the stopped patches when the images
# are fed whole: None feeds the kept patches only; a number feeds them with their normalised pixels scaled by it).
RECON_POOLS = ("calib_reference_fp32", "calib_reference_fp32_s1")
RECON_ROWS = {
    "recon_iters_100": ("100 reconstruction steps per unit (default 300)", {"iters": 100}, None),
    "recon_drop_0.75": ("QDrop probability 0.75 (default 0.5)", {"drop_prob": 0.75}, None),
    "recon_steps_frozen": ("activation step sizes not learned (lr_scale 0)", {"lr_scale": 0.0}, None),
    "all_patches": ("fed with all 196 patches, the stopped ones black as the pool stores them", {}, "stopped"),
    # Sparse feeding drives the attention output wider than whole photographs (calibration_gap.py energy):
    # whole images whose stopped patches are a plain background.
    "filled_mean": ("fed whole, the stopped patches flat at the normalisation mean", {}, "mean"),
    "filled_blur": ("fed whole, the stopped patches from the kept patches' colours smoothed over the patch grid", {}, "blur"),
    # Lower contrast lowers that energy without another inversion: the kept patches' normalised
    # pixels scaled toward the mean colour (0.6 brings block 0's projection input from 3.8 to 2.0
    # times the real images').
    "contrast_0.8": ("kept patches, normalised pixels scaled by 0.8 (toward the mean colour)", {}, 0.8),
    "contrast_0.6": ("kept patches, normalised pixels scaled by 0.6 (toward the mean colour)", {}, 0.6),
}


# Rows calibrated on 64 images: the reference-stop pool of seed 0 and a second pool of 32 beside it;
# name -> (what, the second pool).
AIMED_POOL = "calib_aimed_w4a4"
MIXED_ROWS = {
    "mixed_plain_64": ("pool seed 0 and the plain pool of seed 1 (64 images)", "calib_reference_fp32_s1"),
    "mixed_aimed_64": ("pool seed 0 and 32 images aimed at the W4/A4 model calibrated on it (pool seed 2, teacher-student "
                       "disagreement weight 1)", AIMED_POOL),
}


def aimed_pool(teacher):
    """32 images inverted against the W4/A4 model calibrated on pool seed 0 (reconstruction seed 0):
    Adaptive DeepInversion's competition term keeps the teacher sure while that model disagrees,
    so they show what the calibration got wrong."""
    cached = CACHE / "calibration_gap" / "w4a4_sparse.safetensors"  # calibration_gap.py's: the same reconstruction
    if cached.is_file():
        model = load_quantized(copy.deepcopy(teacher), cached, DEIT_TINY)
    else:
        batches = pool_batches(teacher, CACHE / "pools" / "calib_reference_fp32", DEIT_TINY, NUM, NUM)
        model = quantize_(copy.deepcopy(teacher), QuantConfig.for_method("recon", 4, 4), batches, progress=False)
    loss = InversionLoss(extra=[(1.0, StudentDisagreement(model.eval().requires_grad_(False)))])
    return make_pool(AIMED_POOL, replace(pool_config(True, NUM, seed=2), loss=loss), teacher)  # ensure_pool checks a cached pool's settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[*ROWS, DISTILL_POOL, *RECON_ROWS, *MIXED_ROWS], help="rows to run (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="reconstruction seeds per row (default 0 1)")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = load_model(DEIT_TINY, DEIT_TINY_CKPT).eval()
    yardstick, val = image_subset(teacher, TRAIN100, 20, "train100"), val_subset(teacher, 100)
    pools = {name: (lambda n=name, c=make: make_pool(n, c(teacher), teacher)) for name, (_, make) in ROWS.items()}
    pools[DISTILL_POOL] = lambda: CACHE / "pools" / DISTILL_POOL
    pools[AIMED_POOL] = lambda: aimed_pool(teacher)
    rows = {}
    for name, pool in pools.items():
        if name == AIMED_POOL:
            continue  # made for its mixed row only
        if args.only and name not in args.only:
            continue
        path = pool()
        run = json.loads((path / "run.json").read_text())
        batches = pool_batches(teacher, path, DEIT_TINY, NUM, NUM)
        confidence = teacher_confidence(teacher, batches)
        seeds = {seed: reconstruction(f"{name}-seed{seed}", teacher, batches, {"seed": seed}, yardstick, val) for seed in args.seeds}
        rows[name] = row(name, seeds, what=ROWS[name][0] if name in ROWS else "distill.py's pool: scaled stops, bf16, last-phase masks",
                         inversion_seconds=run["batches"][0]["wall_seconds"], teacher_confidence=confidence)
        save(rows)
    for name, (what, changes, fill) in RECON_ROWS.items():
        if args.only and name not in args.only:
            continue
        runs, confidences = {}, []
        for pool in RECON_POOLS:
            batches = pool_batches(teacher, pools[pool](), DEIT_TINY, NUM, NUM)
            if isinstance(fill, float):
                batches = [(images * fill, keep) for images, keep in batches]
                confidences.append(teacher_confidence(teacher, batches))  # does the teacher still see the class?
            elif fill is not None:
                batches = [(filled(images, keep, fill, teacher.patch_embed.patch_size), None) for images, keep in batches]
            for seed in args.seeds:
                runs[f"{pool}, seed {seed}"] = reconstruction(f"{name}-{pool}-seed{seed}", teacher, batches, {**changes, "seed": seed}, yardstick, val)
        fed = ({"contrast": fill, "teacher_confidence": statistics.mean(confidences)} if isinstance(fill, float)
               else {"all_patches": fill is not None, "fill": fill})
        rows[name] = row(name, runs, what=what, pools=list(RECON_POOLS), recon_changes=changes, **fed)
        save(rows)
    for name, (what, second) in MIXED_ROWS.items():
        if args.only and name not in args.only:
            continue
        batches = [batch for pool in ("calib_reference_fp32", second) for batch in pool_batches(teacher, pools[pool](), DEIT_TINY, NUM, NUM)]
        seeds = {seed: reconstruction(f"{name}-seed{seed}", teacher, batches, {"seed": seed}, yardstick, val) for seed in args.seeds}
        rows[name] = row(name, seeds, what=what, images=NUM * 2)
        save(rows)


@torch.no_grad()
def teacher_confidence(teacher, batches) -> float:
    """The teacher's mean top probability on the images of ``batches``."""
    return torch.cat([logits(teacher, x, k).softmax(-1).amax(-1) for x, k in batches]).mean().item()


def row(name: str, runs: dict, **fields) -> dict:
    """A row of the results file: ``fields``, the mean scores over its reconstructions ``runs``, and them."""
    means = {f"{k}_mean": statistics.mean(r[k] for r in runs.values()) for k in ("train100_top1", "val_top1")}
    print(f"{name}: train100 {means['train100_top1_mean']:.1f}, val {means['val_top1_mean']:.1f}"
          + (f", teacher confidence {fields['teacher_confidence']:.2f}" if "teacher_confidence" in fields else ""), flush=True)
    return {**fields, **means, "seeds": runs, "command": "python benchmarks/calibration_images.py " + " ".join(sys.argv[1:]), "commit": commit()}


def filled(images: torch.Tensor, keep: torch.Tensor, fill: str, patch: tuple[int, int]) -> torch.Tensor:
    """Whole images whose patches outside ``keep`` are as the pool stores them, black (``stopped``),
    zero in normalised space, i.e. the mean colour (``mean``), or the kept patches' mean colours
    smoothed over the patch grid (a 5x5 normalised box filter, zero where no kept patch is near)
    and upsampled bilinearly (``blur``)."""
    if fill == "stopped":
        return images
    b, _, h, w = images.shape
    rows, cols = h // patch[0], w // patch[1]
    cells = torch.zeros(b, rows * cols)
    cells[torch.arange(b)[:, None], keep] = 1.0
    cells = cells.view(b, 1, rows, cols)  # 1 at kept cells
    if fill == "mean":
        background = torch.zeros_like(images)
    else:
        smooth = F.avg_pool2d(F.avg_pool2d(images, patch) * cells, 5, 1, 2) / F.avg_pool2d(cells, 5, 1, 2).clamp_min(1e-6)
        background = F.interpolate(smooth, size=(h, w), mode="bilinear", align_corners=False)
    kept = cells.bool().repeat_interleave(patch[0], 2).repeat_interleave(patch[1], 3)
    return torch.where(kept, images, background)


def make_pool(name: str, config, teacher):
    """The row's pool (made unless cached), with any hooks its loss terms put on the teacher removed."""
    try:
        return ensure_pool(name, DEIT_TINY, DEIT_TINY_CKPT, config, teacher)
    finally:
        for _, term in config.loss.extra:
            if hasattr(term, "remove"):
                term.remove()


def reconstruction(cell_name: str, teacher, batches, recon_changes: dict, yardstick, val, *, folder: str = "calibration_images",
                   measures=None) -> dict:
    """One W4/A4 reconstruction (the default ReconConfig with ``recon_changes``), scored; cached as it finishes
    under ``benchmarks/cache/<folder>``. ``measures(model)``: more fields to record (taken without gradients)."""
    cell = CACHE / folder / f"{cell_name}.json"
    if not cell.is_file():
        start = time.perf_counter()
        config = QuantConfig.for_method("recon", 4, 4)
        model = quantize_(copy.deepcopy(teacher), replace(config, recon=replace(config.recon, **recon_changes)), batches, progress=False)
        with torch.no_grad():
            extra = measures(model) if measures else {}
        result = {**extra, "fit_seconds": time.perf_counter() - start,
                  "train100_top1": evaluate_tensors(model, *yardstick, progress=False)["top1"],
                  "val_top1": evaluate_tensors(model, *val, progress=False)["top1"], "commit": commit()}
        cell.parent.mkdir(parents=True, exist_ok=True)
        cell.write_text(json.dumps(result))
    result = json.loads(cell.read_text())
    print(f"{cell_name}: {result}", flush=True)
    return result


def save(rows: dict) -> None:
    """Write the rows run so far beside those the file holds (other rows may come from another process's --only)."""
    path = RESULTS / "calibration_images.json"
    held = json.loads(path.read_text()).get("rows", {}) if path.is_file() else {}
    payload = {"command": "python benchmarks/calibration_images.py " + " ".join(sys.argv[1:]), "commit": commit(),
               "calibration": f"{NUM} images per row, W4/A4 recon", "yardstick": "train100, first 20 per class (200 images)",
               "reported": "val, first 100 per class (1000 images)", "rows": {**held, **rows}}
    print(f"wrote {write_results('calibration_images', payload)}")


if __name__ == "__main__":
    main()
