"""Dense vs sparse inversion speed, in one process, on the same batch and settings.

    python benchmarks/inversion_speed.py [--iterations 200] [--models tiny base] [--device cuda]

For each model it measures:
  * the per-step cost of a bare step (sparse forward + cross-entropy + backward to
    the input) at each token count of the reference schedule, and of a plain timm
    ``model(x)`` step, which predict the ideal sparse/dense ratio;
  * end-to-end ``invert_batch`` wall time, dense and sparse, over ``--iterations``
    steps with the reference stop steps scaled by ``iterations / 4000`` (so each phase
    keeps its share of the run), which gives the achieved ratio.
The achieved/ideal ratio shows what the loop's overheads (augmentation, TV loss,
Adam over the kept patches, scoring passes, best-pixel copies) cost.
  * the same dense and sparse runs under ``--precision bf16`` (bf16 autocast for the
    model, attention fused or explicit as the probe finds faster), with the probes'
    verdicts for this device: the bf16 columns;
  * per run, images per second and (on CUDA) peak memory, and the last phase's step
    against its ideal, the dense step scaled by the tokens it keeps: a fixed cost per
    step (launches, host waits) shows as a last-phase step far above that ideal.
On CUDA each precision is warmed up with a short run first, batches default to
256 (Tiny) and 64 (Base), and every run is made twice, eagerly and with each phase's step
replayed as a captured CUDA graph (``cuda_graphs=True``): the graph runs' times, their
ratios, and how far their images are from the eager run's (the same draws, so only
float rounding apart) are the ``graphs`` columns; results go to inversion_speed_cuda.json/.md.
Results: benchmarks/results/inversion_speed.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from common import DEIT_TINY, DEIT_TINY_CKPT, RESULTS, machine, scaled_schedule, write_results

from sparseinv import InversionConfig, PruneSchedule, invert_batch, load_model, sparse_forward, vit_info
from sparseinv.inversion.precision import resolve_precision

MODELS = {
    # key: (timm name, checkpoint or None for random weights, batch on a CPU, batch on a GPU)
    "tiny": (DEIT_TINY, DEIT_TINY_CKPT, 32, 256),
    "base": ("deit_base_patch16_224", None, 8, 64),
}
REFERENCE = PruneSchedule.reference()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, repeats: int, device: torch.device) -> float:
    step()  # warm-up: allocator, kernels
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    return (time.perf_counter() - start) / repeats


def per_step_seconds(model, batch: int, counts: list[int], repeats: int, device: torch.device) -> dict:
    info = vit_info(model)
    x = torch.randn(batch, *info.input_size, device=device, requires_grad=True)
    labels = torch.randint(0, info.num_classes, (batch,), device=device)

    def bare(keep):
        def step():
            F.cross_entropy(sparse_forward(model, x, keep).logits, labels).backward()
            x.grad = None
        return step

    def plain():
        F.cross_entropy(model(x), labels).backward()
        x.grad = None

    out = {"plain_timm": time_steps(plain, repeats, device)}
    for n in counts:
        keep = None if n == info.num_patches else torch.rand(batch, info.num_patches).argsort(1)[:, :n].sort(1).values.to(device)
        out[str(n)] = time_steps(bare(keep), repeats, device)
    return out


def ideal_seconds(step_seconds: dict, schedule: PruneSchedule, iterations: int, num_patches: int) -> float:
    counts = schedule.keep_counts(num_patches)
    return sum((end - start) * step_seconds[str(n)] for (start, end), n in zip(schedule.phase_bounds(iterations), counts))


def bench_model(key: str, iterations: int, repeats: int, device: torch.device, batch: int | None = None) -> dict:
    name, checkpoint, cpu_batch, gpu_batch = MODELS[key]
    batch = batch or (gpu_batch if device.type == "cuda" else cpu_batch)
    model = load_model(name, checkpoint, pretrained=False).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    info = vit_info(model)
    schedule = scaled_schedule(iterations)
    counts = schedule.keep_counts(info.num_patches)
    steps = per_step_seconds(model, batch, counts, repeats, device)
    labels = (torch.arange(batch) * max(1, info.num_classes // batch) % info.num_classes).to(device)
    runs, images = {}, {}
    graph_modes = (False, True) if device.type == "cuda" else (False,)
    for precision, suffix in (("fp32", ""), ("bf16", " bf16")):
        if device.type == "cuda":  # kernels chosen, memory pooled: timed runs start warm
            invert_batch(model, labels, InversionConfig(iterations=20, batch_size=batch, schedule=scaled_schedule(20),
                                                        precision=precision), seed=1, progress=False)
        for kind, sched in (("dense", PruneSchedule()), ("sparse", schedule)):
            for graphs in graph_modes:
                name = kind + suffix + (" graphs" if graphs else "")
                config = InversionConfig(iterations=iterations, batch_size=batch, schedule=sched, precision=precision)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                result = invert_batch(model, labels, config, seed=0, desc=f"{key} {name}", cuda_graphs=graphs)
                last_steps = iterations - (sched.steps[-1] if sched.steps else 0)
                images[name] = result.images
                runs[name] = {
                    "wall_seconds": result.wall_seconds,
                    "seconds_per_phase": result.seconds_per_phase,
                    "tokens_per_phase": result.tokens_per_phase,
                    "final_seconds": result.final_seconds,
                    "success_rate": float(result.correct.float().mean()),
                    "images_per_second": batch / result.wall_seconds,
                    "last_phase_step_seconds": result.seconds_per_phase[-1] / last_steps,
                    "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                }
    graphs = None
    if device.type == "cuda":
        graphs = {}
        for suffix in ("", " bf16"):
            label = "fp32" if not suffix else "bf16"
            eager_dense, eager_sparse = runs["dense" + suffix], runs["sparse" + suffix]
            dense, sparse = runs["dense" + suffix + " graphs"], runs["sparse" + suffix + " graphs"]
            graphs[label] = {
                "dense_graphs_vs_eager": eager_dense["wall_seconds"] / dense["wall_seconds"],
                "sparse_graphs_vs_eager": eager_sparse["wall_seconds"] / sparse["wall_seconds"],
                "sparse_vs_dense_with_graphs": dense["wall_seconds"] / sparse["wall_seconds"],
                "sparse_graphs_vs_dense_fp32_eager": runs["dense"]["wall_seconds"] / sparse["wall_seconds"],
                "last_phase_step_vs_ideal_graphs": sparse["last_phase_step_seconds"] / (
                    runs["dense" + suffix]["wall_seconds"] / iterations * counts[-1] / info.num_patches),
                # 8-bit images: one level is 1/255; the same draws, so only float rounding parts them.
                "max_image_difference_vs_eager": {kind: float((images[f"{kind}{suffix} graphs"] - images[kind + suffix]).abs().max())
                                                  for kind in ("dense", "sparse")},
            }
    ideal_ratio = ideal_seconds(steps, PruneSchedule(), iterations, info.num_patches) / ideal_seconds(
        steps, schedule, iterations, info.num_patches
    )
    achieved = runs["dense"]["wall_seconds"] / runs["sparse"]["wall_seconds"]
    full_counts = REFERENCE.keep_counts(info.num_patches)
    full_ideal = None
    if full_counts == counts:
        full_ideal = ideal_seconds(steps, PruneSchedule(), 4000, info.num_patches) / ideal_seconds(
            steps, REFERENCE, 4000, info.num_patches
        )
    dense_step = runs["dense"]["wall_seconds"] / iterations
    # The last phase's ideal: the dense step's cost scaled by the tokens it keeps.
    last_ideal = {suffix: runs["dense" + suffix]["wall_seconds"] / iterations * counts[-1] / info.num_patches for suffix in ("", " bf16")}
    bf16 = {
        "probe": resolve_precision("auto", device).record(),
        "dense_bf16_vs_fp32": runs["dense"]["wall_seconds"] / runs["dense bf16"]["wall_seconds"],
        "sparse_bf16_vs_fp32": runs["sparse"]["wall_seconds"] / runs["sparse bf16"]["wall_seconds"],
        "sparse_bf16_vs_dense_fp32": runs["dense"]["wall_seconds"] / runs["sparse bf16"]["wall_seconds"],
    }
    return {
        "model": name,
        "device": str(device),
        "weights": "real" if checkpoint else "random (speed does not depend on weights)",
        "batch": batch,
        "iterations": iterations,
        "schedule": {"steps": list(schedule.steps), "ratios": list(schedule.ratios)},
        "per_step_seconds": steps,
        "runs": runs,
        "ideal_ratio": ideal_ratio,
        "achieved_ratio": achieved,
        "efficiency": achieved / ideal_ratio,
        "ideal_ratio_4000_steps_reference": full_ideal,
        "our_dense_step_seconds": dense_step,
        "our_dense_step_vs_plain_timm": dense_step / steps["plain_timm"],
        "last_phase_step_vs_ideal": {("fp32" if not k else "bf16"): runs["sparse" + k]["last_phase_step_seconds"] / v
                                     for k, v in last_ideal.items()},
        "bf16": bf16,
        "graphs": graphs,
    }


def markdown(results: dict) -> str:
    lines = [
        "| model, batch | steps | per-step s at 196/137/95/66/46 tokens | plain timm step s | our dense step s | dense s | sparse s | sparse/dense speed-up | ideal | achieved/ideal | ideal, 4000 steps | dense bf16 s | sparse bf16 s | dense bf16 vs fp32 | sparse bf16 vs bf16 dense | sparse bf16 vs dense fp32 | last-phase step vs ideal, fp32 / bf16 | sparse images/s, fp32 / bf16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results.values():
        per = " / ".join(f"{r['per_step_seconds'][str(n)]:.2f}" for n in r["runs"]["sparse"]["tokens_per_phase"])
        full = f"{r['ideal_ratio_4000_steps_reference']:.2f}x" if r["ideal_ratio_4000_steps_reference"] else "n/a"
        lines.append(
            f"| {r['model']}, {r['batch']} | {r['iterations']} | {per} | {r['per_step_seconds']['plain_timm']:.2f} | "
            f"{r['our_dense_step_seconds']:.2f} | {r['runs']['dense']['wall_seconds']:.0f} | {r['runs']['sparse']['wall_seconds']:.0f} | "
            f"{r['achieved_ratio']:.2f}x | {r['ideal_ratio']:.2f}x | {100 * r['efficiency']:.0f}% | {full} | "
            f"{r['runs']['dense bf16']['wall_seconds']:.0f} | {r['runs']['sparse bf16']['wall_seconds']:.0f} | "
            f"{r['bf16']['dense_bf16_vs_fp32']:.2f}x | "
            f"{r['runs']['dense bf16']['wall_seconds'] / r['runs']['sparse bf16']['wall_seconds']:.2f}x | "
            f"{r['bf16']['sparse_bf16_vs_dense_fp32']:.2f}x | "
            f"{r['last_phase_step_vs_ideal']['fp32']:.2f}x / {r['last_phase_step_vs_ideal']['bf16']:.2f}x | "
            f"{r['runs']['sparse']['images_per_second']:.1f} / {r['runs']['sparse bf16']['images_per_second']:.1f} |"
        )
    graphed = [r for r in results.values() if r.get("graphs")]
    if graphed:
        lines += ["", "CUDA graphs (each phase's step captured once, replayed per step) against the eager loop:", "",
                  "| model, batch | precision | dense graphs s | sparse graphs s | dense: graphs vs eager | sparse: graphs vs eager | "
                  "sparse/dense with graphs | sparse graphs vs dense fp32 eager | last-phase step vs ideal | largest pixel difference vs eager, dense / sparse |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in graphed:
            for label, g in r["graphs"].items():
                suffix = "" if label == "fp32" else " bf16"
                diff = g["max_image_difference_vs_eager"]
                lines.append(
                    f"| {r['model']}, {r['batch']} | {label} | {r['runs']['dense' + suffix + ' graphs']['wall_seconds']:.1f} | "
                    f"{r['runs']['sparse' + suffix + ' graphs']['wall_seconds']:.1f} | {g['dense_graphs_vs_eager']:.2f}x | "
                    f"{g['sparse_graphs_vs_eager']:.2f}x | {g['sparse_vs_dense_with_graphs']:.2f}x | "
                    f"{g['sparse_graphs_vs_dense_fp32_eager']:.2f}x | {g['last_phase_step_vs_ideal_graphs']:.2f}x | "
                    f"{diff['dense']:.3f} / {diff['sparse']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200, help="inversion steps (the protocol's 4000 scaled down)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="timed bare steps per token count")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--batch", type=int, default=None, help="images per batch for every model (default: by model and device)")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {key: bench_model(key, args.iterations, args.repeats, device, args.batch) for key in args.models}
    table = markdown(results)
    name = "inversion_speed" if device.type == "cpu" else f"inversion_speed_{device.type}"
    write_results(
        name,
        {
            "scaled_down": args.iterations < 4000,
            "command": "python benchmarks/inversion_speed.py " + " ".join(sys.argv[1:]),
            "machine": machine(device),
            "protocol": f"{args.iterations} steps instead of 4000; stop steps scaled by iterations/4000 so each phase keeps its share",
            "results": results,
            "table": table,
        },
    )
    (RESULTS / f"{name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
