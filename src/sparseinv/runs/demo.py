"""The main job end to end on a real model: ``sparseinv demo``.

On DeiT-Tiny with real weights: invert the ten Imagenette classes densely and
sparsely with the same settings; quantize the model to W4/A8 and W4/A4 with the
default method from each pool and from Gaussian noise; distill a student from each
pool; evaluate everything on real Imagenette val images; write ``report.md`` with a
table, both pools' image grids and plots, and ``report.json`` with every number.

The student is the ImageNet DeiT-Tiny backbone with a fresh, random head, taught by
DeiT-Tiny's soft labels on the pool only: everything its head knows comes through the
pool's images.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseinv.data import ImageFolder, evaluate_tensors, read_class_index, topk_accuracy, transform_folder
from sparseinv.distill import DistillConfig, distill
from sparseinv.errors import UsageError
from sparseinv.files import atomic_write, atomic_write_json, check_writable
from sparseinv.inversion.config import InversionConfig
from sparseinv.models import load_model, timm, vit_info
from sparseinv.pool import read_pool
from sparseinv.quant import QuantConfig, calibration_batches, pool_batches, quantize_
from sparseinv.inversion.schedule import PruneSchedule
from sparseinv.runs.inversion import invert

MODEL = "deit_tiny_patch16_224"
# ImageNet indices of the ten Imagenette classes, in synset order (the val folders' sorted order).
IMAGENETTE = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)
# W8/A8 is left out: every source calibrates it within a few points of full precision (a
# 2-core run without AMX: sparse 69.0, dense 66.5, noise 65.0, full precision 68.5), so it
# tells nothing W4/A8 does not, and its three cells took a quarter of the demo's time.
BITS = ((4, 8), (4, 4))
SOURCES = ("sparse", "dense", "noise")
# The estimate printed before a run, in units of one fp32 forward and backward (weights
# and input) of the model on a pool-sized batch, timed first on the machine itself. Fitted
# to two default-size runs on 2 cores with AMX switched off (one step 0.68 s; 60 and 30
# reconstruction steps, 753 s and 405 s): an inversion step at full tokens costs 0.54 units,
# a reconstruction step per block 1.8 at full tokens (a sparse pool's fewer tokens cost
# less), one evaluated image 0.02, one image-epoch of a linear-probe student 0.045, and
# reading the val images, writing pools, grids and plots about 85.
INVERSION_COST, RECON_COST, EVAL_COST, DISTILL_COST, FIXED_COST = 0.54, 1.8, 0.02, 0.045, 85.0


@dataclass
class DemoConfig:
    """What the demo runs. :meth:`quick` and :meth:`full` are the other presets.

    Attributes:
        shared: The fixtures folder (``assets/`` weights and synsets, ``data/imagenette/val``).
        checkpoint: DeiT-Tiny weights; ``None`` looks in ``shared/assets``, then the hub.
        images: Images per pool (one per class, cycling through the ten classes).
        iterations: Inversion steps per image.
        prune_at: Sparse inversion's stop steps (dense inversion uses none).
        prune_ratio: Fraction of the remaining patches stopped at each.
        recon_iters: Reconstruction steps per block when quantizing (the method's own
            default is 300; fewer keep the demo within minutes: at 30 its conclusions
            were those of 60, see ``docs/cli.md``).
        val_per_class: Real val images per class every model is evaluated on.
        distill_epochs: Linear-probe epochs of the students.
        device: ``cpu`` or ``cuda``.
        scaled_down: What differs from the paper's protocol, said in the report.
    """

    shared: str = "../shared"
    checkpoint: str | None = None
    images: int = 10
    iterations: int = 200
    # Chosen by the success rate of the sparse images (the model's own verdict, no real
    # data) among six schedules of 200 steps: the paper's ratio 0.3 left 2-3 of 10 images
    # off their label at every stop pattern tried; 0.2 from step 20 missed none.
    prune_at: tuple[int, ...] = (20, 40, 60, 80)
    prune_ratio: tuple[float, ...] = (0.2, 0.2, 0.2, 0.2)
    recon_iters: int = 30
    val_per_class: int = 20
    distill_epochs: int = 60
    device: str = "cpu"
    scaled_down: str = (
        "10 images (one per class) x 200 steps instead of 32 x 4000; stops at 20/40/60/80 stopping 20% each "
        "(196 -> 79 patches) instead of 50/100/200/300 of 4000 stopping 30% (196 -> 46); reconstruction 30 steps per block "
        "instead of 300; 20 val images per class"
    )
    bits: tuple[tuple[int, int], ...] = field(default=BITS)

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """A few images and steps: checks the whole pipeline in about a minute (the tests use it)."""
        # 30 steps put every image, dense and sparse, on its label (6 left them all off): the report shows real images.
        base = dict(images=2, iterations=30, prune_at=(10, 20), prune_ratio=(0.3, 0.3), recon_iters=2, val_per_class=1,
                    distill_epochs=2, scaled_down="--quick: 2 images x 30 steps, 2 reconstruction steps, 1 val image per class")
        return cls(**{**base, **overrides})

    @classmethod
    def full(cls, **overrides) -> "DemoConfig":
        """The paper's reference protocol: 32 images x 4000 steps, stops at 50/100/200/300 (hours on a CPU)."""
        ref = PruneSchedule.reference()
        base = dict(images=32, iterations=4000, prune_at=ref.steps, prune_ratio=ref.ratios,
                    recon_iters=300, val_per_class=10_000, scaled_down="none: the reference protocol (--full)")
        return cls(**{**base, **overrides})


def find_weights(config: DemoConfig) -> str | None:
    """The checkpoint to use: ``--checkpoint``, else the copy in ``shared/assets``, else ``None`` (the hub)."""
    if config.checkpoint:
        return config.checkpoint
    local = Path(config.shared) / "assets" / f"{MODEL}.safetensors"
    return str(local) if local.is_file() else None


def _val(config: DemoConfig, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    shared = Path(config.shared)
    val, synsets = shared / "data" / "imagenette" / "val", shared / "assets" / "imagenet_synsets.txt"
    if not val.is_dir() or not synsets.is_file():
        raise UsageError(f"the demo evaluates on '{val}' with '{synsets}': pass --shared FOLDER holding them.")
    folder = ImageFolder.scan(val, read_class_index(synsets), limit_per_class=config.val_per_class)
    return transform_folder(folder, model)


def step_seconds(model: nn.Module, batch: int, device: torch.device, repeats: int = 2) -> float:
    """Seconds of one fp32 forward and backward of ``model`` on ``batch`` random images (the best of ``repeats``)."""
    from sparseinv.inversion.precision import wall_seconds

    x = torch.randn(batch, *vit_info(model).input_size, device=device, requires_grad=True)
    step = lambda: model(x).sum().backward()  # noqa: E731
    best = min(wall_seconds(step, device, warmup=0 if i else 1, repeats=1) for i in range(repeats))  # the first call warms up
    model.zero_grad(set_to_none=True)
    return best


def estimate_seconds(config: DemoConfig, step: float, val_images: int, num_patches: int) -> float:
    """What a run of ``config`` should take, given :func:`step_seconds` of this machine."""
    schedule = PruneSchedule(config.prune_at, config.prune_ratio)
    counts = schedule.keep_counts(num_patches)
    sparse = sum((end - start) * counts[i] for i, (start, end) in enumerate(schedule.phase_bounds(config.iterations)))
    sparse_fraction = sparse / (config.iterations * num_patches)
    last_fraction = counts[-1] / num_patches
    inversion = config.iterations * (1 + sparse_fraction) * INVERSION_COST
    quantization = len(config.bits) * config.recon_iters * RECON_COST * (2 + last_fraction)
    evaluations = 2 + len(config.bits) * len(SOURCES) + 2  # full precision, teacher, quantized models, students
    evaluation = evaluations * val_images * EVAL_COST
    distillation = config.distill_epochs * config.images * DISTILL_COST * (1 + last_fraction)
    return step * (inversion + quantization + evaluation + distillation + FIXED_COST)


def run_demo(config: DemoConfig, out: str | Path, *, progress: bool = True, log=print) -> dict:
    """Run everything, write ``out/report.md`` and ``out/report.json``, return the report's numbers."""
    out = Path(out)
    check_writable(out, "--out", folder=True)
    device = torch.device(config.device)
    checkpoint = find_weights(config)
    try:
        model = load_model(MODEL, checkpoint, device=device)
    except UsageError as err:
        if checkpoint is None:
            raise UsageError(f"no weights for {MODEL}: pass --checkpoint FILE or --shared FOLDER with assets/{MODEL}.safetensors "
                             "(offline, the hub cannot be reached).") from None
        raise err
    started = time.perf_counter()
    images, labels = _val(config, model)
    step = step_seconds(model, config.images, device)
    estimate = estimate_seconds(config, step, int(images.shape[0]), vit_info(model).num_patches)
    log(f"estimated time on this machine: about {max(1, round(estimate / 60))} minutes")
    report: dict = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
                    "checkpoint": checkpoint, "val_images": int(images.shape[0]), "estimated_seconds": estimate, "step_seconds": step, "inversion": {}, "quantization": {}, "distillation": {}}

    log("== 1/4 inversion: the same classes and settings, dense then sparse ==")
    pools = {}
    for kind in ("dense", "sparse"):
        schedule = PruneSchedule() if kind == "dense" else PruneSchedule(config.prune_at, config.prune_ratio)
        inv = InversionConfig(num_images=config.images, batch_size=config.images, iterations=config.iterations,
                              schedule=schedule, classes=IMAGENETTE)
        result = invert(model, inv, str(out / "pools" / kind), model_name=MODEL, checkpoint=checkpoint, progress=progress)
        pools[kind] = out / "pools" / kind
        run = result.run
        report["inversion"][kind] = {"seconds": run["wall_seconds"], "success_rate": run["success_rate"],
                                     "tokens_per_phase": run["tokens_per_phase"], "patches_kept": int(result.kept_patches.shape[1]),
                                     "phase_bounds": [list(b) for b in schedule.phase_bounds(config.iterations)]}
        log(f"{kind}: {run['wall_seconds']:.1f} s, success rate {run['success_rate']:.2f}")
    inv = report["inversion"]
    inv["speedup"] = inv["dense"]["seconds"] / inv["sparse"]["seconds"]

    log("== 2/4 full precision on real val images ==")
    report["full_precision"] = evaluate_tensors(model, images, labels, progress=False)["top1"]

    log("== 3/4 data-free quantization (default method) from each pool and from noise ==")
    sources = {kind: pool_batches(model, pools[kind], MODEL, config.images, config.images) for kind in ("sparse", "dense")}
    sources["noise"] = calibration_batches(model, "noise", MODEL, config.images, config.images)
    cells = [(s, w, a) for w, a in config.bits for s in SOURCES]
    for source, w, a in tqdm(cells, desc="quantize + evaluate", disable=not progress):
        qconfig = QuantConfig.for_method("recon", w, a)
        qconfig = replace(qconfig, recon=replace(qconfig.recon, iters=config.recon_iters))
        start = time.perf_counter()
        qmodel = quantize_(copy.deepcopy(model), qconfig, sources[source], progress=False)
        seconds = time.perf_counter() - start
        top1 = evaluate_tensors(qmodel, images, labels, progress=False)["top1"]
        report["quantization"][f"W{w}/A{a} {source}"] = {"w_bits": w, "a_bits": a, "source": source, "top1": top1, "fit_seconds": seconds}
        log(f"W{w}/A{a} from {source}: top-1 {top1:.1f} (fit {seconds:.0f} s)")
        del qmodel

    log("== 4/4 data-free knowledge transfer: a fresh head on the ImageNet backbone, taught by DeiT-Tiny ==")
    report["teacher_top1"] = ten_way_top1(model, images, labels)
    for kind in ("sparse", "dense"):
        student = load_model(MODEL, checkpoint, device=device)
        dconfig = DistillConfig(epochs=config.distill_epochs, batch_size=config.images)
        student_out = out / "students" / f"{kind}.safetensors"
        for stale in student_out.parent.glob(f"{kind}.*"):  # a student is cheap: always trained afresh
            stale.unlink()
        summary = distill(model, student, read_pool(pools[kind]), dconfig, student_out, teacher_name=MODEL, student_name=MODEL,
                          progress=False)
        top1 = ten_way_top1(student, images, labels)
        report["distillation"][kind] = {"top1": top1, "train_seconds": summary["train_seconds"]}
        log(f"student from the {kind} pool: 10-way top-1 {top1:.1f}")
        del student
    shutil.rmtree(out / "students", ignore_errors=True)  # the numbers are the point; the weights are not kept
    report["total_seconds"] = time.perf_counter() - started
    _plots(report, out)
    atomic_write_json(out / "report.json", report)
    atomic_write(out / "report.md", markdown(report))
    return report


def ten_way_top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 50) -> float:
    """Top-1 (percent) among the ten Imagenette classes' logits only.

    A student taught on ten classes' images learns little about the other 990 rows of
    its fresh head, so a 1000-way score would flatter it; teacher and students are
    compared on the same ten-way footing.
    """
    from sparseinv.vit.forward import logits

    device = next(model.parameters()).device
    classes = torch.tensor(IMAGENETTE, device=device)
    position = {c: i for i, c in enumerate(IMAGENETTE)}
    ten_way = torch.tensor([position[int(c)] for c in labels])
    batches = [(images[i : i + batch_size], ten_way[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    model.eval()
    logits_of = lambda x: logits(model, x)[:, classes]  # noqa: E731
    return topk_accuracy(logits_of, batches, total=len(batches), progress=False)["top1"]


def table(report: dict) -> str:
    """The headline table: inversion, then every model's top-1 on the real val images."""
    inv, q = report["inversion"], report["quantization"]
    lines = ["| | sparse pool | dense pool | Gaussian noise |", "| --- | --- | --- | --- |",
             f"| inversion wall time (s) | {inv['sparse']['seconds']:.1f} | {inv['dense']['seconds']:.1f} | 0 |",
             f"| success rate (images the model classifies as their label) | {inv['sparse']['success_rate']:.2f} | {inv['dense']['success_rate']:.2f} | - |"]
    for w, a in (tuple(b) for b in report["config"]["bits"]):
        cells = [f"{q[f'W{w}/A{a} {s}']['top1']:.1f}" for s in SOURCES]
        lines.append(f"| W{w}/A{a} top-1, 1000-way (full precision {report['full_precision']:.1f}) | " + " | ".join(cells) + " |")
    d = report["distillation"]
    lines.append(f"| student top-1, 10-way (teacher {report['teacher_top1']:.1f}) | {d['sparse']['top1']:.1f} | {d['dense']['top1']:.1f} | - |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    inv = report["inversion"]
    cfg = report["config"]
    return f"""# sparseinv demo report

DeiT-Tiny (`{MODEL}`, weights `{report['checkpoint']}`), the ten Imagenette classes.
Every accuracy is measured on {report['val_images']} real Imagenette val images; no real
image fed any model below. Sparse inversion was **{inv['speedup']:.2f}x faster** than dense
with the same settings ({inv['sparse']['seconds']:.1f} s vs {inv['dense']['seconds']:.1f} s).

{table(report)}

Quantization: the default method (every matrix-product input quantized, RepQ-style
quantizers, block reconstruction) calibrated on {cfg['images']} images of each source.
Distillation: teacher = DeiT-Tiny; student = the ImageNet DeiT-Tiny backbone with a
fresh, randomly initialised head (linear probe, {cfg['distill_epochs']} epochs of fresh random crops and
flips, each labelled by the teacher), so everything its head knows comes through the
pool's images.

Scaled down from the paper's protocol: {cfg['scaled_down']}. Total time {report['total_seconds']:.0f} s (estimated before the start: {report['estimated_seconds']:.0f} s).

## The images

Sparse pool (stopped patches are black: the model stopped attending to them):

![sparse pool](pools/sparse/grid.png)

Dense pool:

![dense pool](pools/dense/grid.png)

## Where the time goes

![tokens kept](tokens.png)

![accuracy against inversion time](accuracy_vs_time.png)
"""


def _plots(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inv = report["inversion"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for kind in ("dense", "sparse"):
        xs, ys = [], []
        for (start, end), tokens in zip(inv[kind]["phase_bounds"], inv[kind]["tokens_per_phase"]):
            xs += [start, end]
            ys += [tokens, tokens]
        ax.plot(xs, ys, label=f"{kind} ({inv[kind]['seconds']:.0f} s)")
    ax.set_xlabel("inversion step")
    ax.set_ylabel("patch tokens fed")
    ax.set_ylim(0, None)
    ax.legend()
    ax.set_title("Tokens per step")
    fig.tight_layout()
    fig.savefig(out / "tokens.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    q = report["quantization"]
    worst = min(report["config"]["bits"], key=lambda b: b[0] + b[1])
    colours = {"noise": "tab:gray", "dense": "tab:blue", "sparse": "tab:orange"}
    for source, seconds in (("noise", 0.0), ("dense", inv["dense"]["seconds"]), ("sparse", inv["sparse"]["seconds"])):
        ax.scatter([seconds], [q[f"W{worst[0]}/A{worst[1]} {source}"]["top1"]], color=colours[source], marker="o",
                   label=f"W{worst[0]}/A{worst[1]} from {source} (1000-way)")
        if source in report["distillation"]:
            ax.scatter([seconds], [report["distillation"][source]["top1"]], color=colours[source], marker="^",
                       label=f"student from {source} (10-way)")
    ax.set_xlabel("inversion wall time (s)")
    ax.set_ylabel("top-1 on real val images (%)")
    ax.legend(fontsize=7)
    ax.set_title("Accuracy against inversion time")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_time.png", dpi=90)
    plt.close(fig)
