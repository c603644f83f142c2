"""Dense vs sparse inversion speed, in one process, on the same batch and settings.

    python benchmarks/inversion_speed.py [--iterations 200] [--models tiny base]

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
    verdicts for this device: the bf16 columns.
Results: benchmarks/results/inversion_speed.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from common import DEIT_TINY, DEIT_TINY_CKPT, RESULTS, machine, scaled_schedule, write_results

from sparseinv import InversionConfig, PruneSchedule, invert_batch, load_model, sparse_forward, vit_info
from sparseinv.inversion.precision import resolve_precision

MODELS = {
    # key: (timm name, checkpoint or None for random weights, batch)
    "tiny": (DEIT_TINY, DEIT_TINY_CKPT, 32),
    "base": ("deit_base_patch16_224", None, 8),
}
REFERENCE = PruneSchedule.reference()


def time_steps(step, repeats: int) -> float:
    step()  # warm-up: allocator, kernels
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def per_step_seconds(model, batch: int, counts: list[int], repeats: int) -> dict:
    info = vit_info(model)
    x = torch.randn(batch, *info.input_size, requires_grad=True)
    labels = torch.randint(0, info.num_classes, (batch,))

    def bare(keep):
        def step():
            F.cross_entropy(sparse_forward(model, x, keep).logits, labels).backward()
            x.grad = None
        return step

    def plain():
        F.cross_entropy(model(x), labels).backward()
        x.grad = None

    out = {"plain_timm": time_steps(plain, repeats)}
    for n in counts:
        keep = None if n == info.num_patches else torch.rand(batch, info.num_patches).argsort(1)[:, :n].sort(1).values
        out[str(n)] = time_steps(bare(keep), repeats)
    return out


def ideal_seconds(step_seconds: dict, schedule: PruneSchedule, iterations: int, num_patches: int) -> float:
    counts = schedule.keep_counts(num_patches)
    return sum((end - start) * step_seconds[str(n)] for (start, end), n in zip(schedule.phase_bounds(iterations), counts))


def bench_model(key: str, iterations: int, repeats: int) -> dict:
    name, checkpoint, batch = MODELS[key]
    model = load_model(name, checkpoint, pretrained=False)
    for p in model.parameters():
        p.requires_grad_(False)
    info = vit_info(model)
    schedule = scaled_schedule(iterations)
    counts = schedule.keep_counts(info.num_patches)
    steps = per_step_seconds(model, batch, counts, repeats)
    labels = torch.arange(batch) * (info.num_classes // batch)
    runs = {}
    for precision, suffix in (("fp32", ""), ("bf16", " bf16")):
        for kind, sched in (("dense", PruneSchedule()), ("sparse", schedule)):
            config = InversionConfig(iterations=iterations, batch_size=batch, schedule=sched, precision=precision)
            result = invert_batch(model, labels, config, seed=0, desc=f"{key} {kind}{suffix}")
            runs[kind + suffix] = {
                "wall_seconds": result.wall_seconds,
                "seconds_per_phase": result.seconds_per_phase,
                "tokens_per_phase": result.tokens_per_phase,
                "final_seconds": result.final_seconds,
                "success_rate": float(result.correct.float().mean()),
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
    bf16 = {
        "probe": resolve_precision("auto", torch.device("cpu")).record(),
        "dense_bf16_vs_fp32": runs["dense"]["wall_seconds"] / runs["dense bf16"]["wall_seconds"],
        "sparse_bf16_vs_fp32": runs["sparse"]["wall_seconds"] / runs["sparse bf16"]["wall_seconds"],
        "sparse_bf16_vs_dense_fp32": runs["dense"]["wall_seconds"] / runs["sparse bf16"]["wall_seconds"],
    }
    return {
        "model": name,
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
        "bf16": bf16,
    }


def markdown(results: dict) -> str:
    lines = [
        "| model, batch | steps | per-step s at 196/137/95/66/46 tokens | plain timm step s | our dense step s | dense s | sparse s | sparse/dense speed-up | ideal | achieved/ideal | ideal, 4000 steps | dense bf16 s | sparse bf16 s | dense bf16 vs fp32 | sparse bf16 vs dense fp32 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results.values():
        per = " / ".join(f"{r['per_step_seconds'][str(n)]:.2f}" for n in r["runs"]["sparse"]["tokens_per_phase"])
        full = f"{r['ideal_ratio_4000_steps_reference']:.2f}x" if r["ideal_ratio_4000_steps_reference"] else "n/a"
        lines.append(
            f"| {r['model']}, {r['batch']} | {r['iterations']} | {per} | {r['per_step_seconds']['plain_timm']:.2f} | "
            f"{r['our_dense_step_seconds']:.2f} | {r['runs']['dense']['wall_seconds']:.0f} | {r['runs']['sparse']['wall_seconds']:.0f} | "
            f"{r['achieved_ratio']:.2f}x | {r['ideal_ratio']:.2f}x | {100 * r['efficiency']:.0f}% | {full} | "
            f"{r['runs']['dense bf16']['wall_seconds']:.0f} | {r['runs']['sparse bf16']['wall_seconds']:.0f} | "
            f"{r['bf16']['dense_bf16_vs_fp32']:.2f}x | {r['bf16']['sparse_bf16_vs_dense_fp32']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200, help="inversion steps (the protocol's 4000 scaled down)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="timed bare steps per token count")
    args = parser.parse_args()
    results = {key: bench_model(key, args.iterations, args.repeats) for key in args.models}
    table = markdown(results)
    write_results(
        "inversion_speed",
        {
            "scaled_down": args.iterations < 4000,
            "command": "python benchmarks/inversion_speed.py " + " ".join(sys.argv[1:]),
            "machine": machine(),
            "protocol": f"{args.iterations} steps instead of 4000; stop steps scaled by iterations/4000 so each phase keeps its share",
            "results": results,
            "table": table,
        },
    )
    (RESULTS / "inversion_speed.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
