"""Scale-out: images per second with 1 and 2 processes, and what ImageNet-sized inversion would take.

    python benchmarks/scaling.py

1. Scaling. ``sparseinv invert`` on DeiT-Tiny (real weights), run as one process and
   as two under ``torchrun`` (gloo), one CPU thread per process, on the same 16 images
   (batch 4, 100 steps; sparse: stops 20/40/60/80 at 0.2, dense: none). Images per
   second come from each run's own clock (``elapsed_seconds`` in run.json: from the
   start of inversion to the merged pool, model loading and process start-up left
   out; the command's whole wall time is recorded beside it). Efficiency = (2-process
   images/s) / (2 x 1-process images/s). Scaled down: the reference schedule is 4000
   steps at batch 32.
2. Estimate for 1,000 images per ImageNet class (1.28M) with DeiT-Base at the reference
   schedule (4000 steps, stops 50/100/200/300 at 0.3). Measured here: each phase's
   step time on this CPU (batch 8, random weights, 1 thread and all threads) and each
   phase's FLOPs (torch's FlopCounterMode on one step). Not measured (no GPU was lent
   to this task): GPU time, which is estimated as FLOPs / an assumed sustained rate
   (``GPU_TFLOPS``, said in the output).

Writes ``benchmarks/results/scaling.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import torch
from common import CACHE, DEIT_TINY, DEIT_TINY_CKPT, machine, write_results
from torch.utils.flop_counter import FlopCounterMode

from sparseinv import InversionConfig, PruneSchedule, invert_batch, load_model
from sparseinv.models import vit_info
from sparseinv.vit.forward import sparse_forward

IMAGES, BATCH, STEPS = 16, 4, 100
SPARSE = ["--prune-at", "20", "40", "60", "80", "--prune-ratio", "0.2", "0.2", "0.2", "0.2"]
# Assumed sustained bf16 rate of one H100 on this workload: about 20% of its 989 TFLOP/s
# dense peak, roughly what ViT-B training reaches without hand-tuned kernels. An assumption, not a measurement.
GPU_TFLOPS = 200.0
IMAGENET_IMAGES = 1_281_167
REFERENCE = PruneSchedule.reference()
REFERENCE_STEPS = 4000


def run_pool(kind: str, processes: int) -> dict:
    out = CACHE / "scaling" / f"{kind}_{processes}"
    shutil.rmtree(out, ignore_errors=True)
    args = ["invert", "--model", DEIT_TINY, "--checkpoint", str(DEIT_TINY_CKPT), "--num-images", str(IMAGES),
            "--batch-size", str(BATCH), "--iterations", str(STEPS), "--seed", "3", "--out", str(out), "--quiet",
            *(SPARSE if kind == "sparse" else [])]
    if processes == 1:
        command = [sys.executable, "-m", "sparseinv", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), "-m", "sparseinv", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    outer = time.perf_counter() - start
    run = json.loads((out / "run.json").read_text())
    elapsed = run.get("elapsed_seconds", run["wall_seconds"])
    return {"processes": processes, "images": run["num_images"], "elapsed_seconds": elapsed, "command_seconds": outer,
            "images_per_second": run["num_images"] / elapsed, "per_rank_seconds": run.get("per_rank_seconds"),
            "success_rate": run["success_rate"]}


def phase_costs(model, batch: int, steps: int = 3) -> list[dict]:
    """Per phase of the reference schedule, per image: seconds of one step of the real loop
    (pixel work included) and FLOPs of its forward and backward."""
    info = vit_info(model)
    for param in model.parameters():  # as in inversion: gradients to the pixels only
        param.requires_grad_(False)
    counts = REFERENCE.keep_counts(info.num_patches)
    # The reference's stops at every ``steps`` steps: the same token counts, ``steps`` steps each.
    short = PruneSchedule(tuple(steps * (i + 1) for i in range(len(counts) - 1)), REFERENCE.ratios)
    labels = torch.arange(batch) * 97
    invert_batch(model, labels, InversionConfig(iterations=2), seed=0, progress=False)  # warm-up
    timed = invert_batch(model, labels, InversionConfig(iterations=steps * len(counts), schedule=short), seed=0, progress=False)
    x = torch.randn(batch, *info.input_size, requires_grad=True)
    out = []
    for tokens, seconds in zip(counts, timed.seconds_per_phase):
        keep = None if tokens == info.num_patches else torch.stack([torch.randperm(info.num_patches)[:tokens].sort().values for _ in range(batch)])
        with FlopCounterMode(display=False) as counter:
            sparse_forward(model, x, keep).logits.logsumexp(1).sum().backward()
        out.append({"tokens": tokens, "seconds_per_image_step": seconds / steps / batch, "flops_per_image_step": counter.get_total_flops() / batch})
        print(f"  {tokens} tokens: {seconds / steps / batch * 1e3:.0f} ms and {counter.get_total_flops() / batch / 1e9:.1f} GFLOP per image-step", flush=True)
    return out


def per_image(costs: list[dict], key: str, dense: bool) -> float:
    """A reference-schedule image's total of ``key`` (dense: every step at all patches)."""
    bounds = REFERENCE.phase_bounds(REFERENCE_STEPS)
    if dense:
        return costs[0][key] * REFERENCE_STEPS
    return sum(c[key] * (end - start) for c, (start, end) in zip(costs, bounds))


def main() -> None:
    payload = {"command": "python benchmarks/scaling.py", "machine": machine(), "scaled_down": True,
               "protocol": f"DeiT-Tiny, {IMAGES} images, batch {BATCH}, {STEPS} steps, 1 thread per process, gloo",
               "gpu": "none lent to this task: no GPU run", "scaling": {}}
    for kind in ("sparse", "dense"):
        one, two = run_pool(kind, 1), run_pool(kind, 2)
        efficiency = two["images_per_second"] / (2 * one["images_per_second"])
        payload["scaling"][kind] = {"one_process": one, "two_processes": two, "efficiency": efficiency}
        print(f"{kind}: {one['images_per_second']:.3f} img/s with 1 process, {two['images_per_second']:.3f} with 2: "
              f"efficiency {efficiency:.2f}", flush=True)

    threads = torch.get_num_threads()
    model = load_model("deit_base_patch16_224", pretrained=False)
    estimate = {"model": "deit_base_patch16_224", "images": IMAGENET_IMAGES, "steps": REFERENCE_STEPS,
                "schedule": {"steps": list(REFERENCE.steps), "ratios": list(REFERENCE.ratios)}, "gpu_tflops_assumed": GPU_TFLOPS}
    for label, n in (("1 thread", 1), (f"{threads} threads", threads)):
        torch.set_num_threads(n)
        print(f"DeiT-Base, batch 8, {label}:", flush=True)
        estimate[label] = phase_costs(model, batch=8)
    torch.set_num_threads(threads)
    for kind in ("dense", "sparse"):
        dense = kind == "dense"
        flops = per_image(estimate["1 thread"], "flops_per_image_step", dense)
        cpu_seconds = per_image(estimate["1 thread"], "seconds_per_image_step", dense)
        gpu_hours = IMAGENET_IMAGES * flops / (GPU_TFLOPS * 1e12) / 3600
        estimate[kind] = {
            "tflop_per_image": flops / 1e12,
            "cpu_core_seconds_per_image": cpu_seconds,
            "cpu_core_years_for_imagenet": IMAGENET_IMAGES * cpu_seconds / 3600 / 24 / 365,
            "gpu_hours_for_imagenet": gpu_hours,
            "gpus_for_one_day": gpu_hours / 24,
            "gpus_for_one_week": gpu_hours / 24 / 7,
        }
        print(f"{kind}: {flops / 1e12:.0f} TFLOP and {cpu_seconds / 60:.0f} CPU-core-minutes per image; 1.28M images: "
              f"{gpu_hours:,.0f} H100-hours at {GPU_TFLOPS:.0f} TFLOP/s ({gpu_hours / 24:,.0f} GPUs for a day)", flush=True)
    estimate["sparse_vs_dense_flops"] = estimate["dense"]["tflop_per_image"] / estimate["sparse"]["tflop_per_image"]
    estimate["sparse_vs_dense_cpu_time"] = estimate["dense"]["cpu_core_seconds_per_image"] / estimate["sparse"]["cpu_core_seconds_per_image"]
    payload["imagenet_estimate"] = estimate
    write_results("scaling", payload)


if __name__ == "__main__":
    main()
