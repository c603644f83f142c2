"""bf16 autocast against fp32 for inversion on this machine: step time, and demo-sized pools.

    python benchmarks/bf16_step.py

DeiT-Tiny (real weights): the bf16/fp32 probe behind ``--precision auto``; the time of
a dense step at batch 32 (12 steps, twice each, interleaved); then the demo's setting
(10 Imagenette classes, 200 steps, dense and sparse with stops 20/40/60/80 at 0.2) in
both precisions: wall time, success rate and mean target probability. Not measured
here: whether bf16 pools calibrate quantization as well as fp32 ones (the default stays
fp32 until that is shown). Writes ``benchmarks/results/bf16_step.json``.
"""

from __future__ import annotations

import time

import torch
from common import DEIT_TINY, DEIT_TINY_CKPT, machine, write_results

from sparseinv import InversionConfig, PruneSchedule, invert, invert_batch, load_model
from sparseinv.runs.demo import IMAGENETTE
from sparseinv.inversion.precision import bf16_speedup


def main() -> None:
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    payload = {"command": "python benchmarks/bf16_step.py", "machine": machine(), "scaled_down": True,
               "probe_bf16_speedup": bf16_speedup(torch.device("cpu")), "dense_step_seconds": {"fp32": [], "bf16": []}, "pools": {}}
    labels = torch.arange(32) * 31
    for precision in ("fp32", "bf16", "fp32", "bf16"):
        start = time.perf_counter()
        invert_batch(model, labels, InversionConfig(iterations=12, precision=precision), seed=0, progress=False)
        payload["dense_step_seconds"][precision].append((time.perf_counter() - start) / 12)
        print(precision, payload["dense_step_seconds"][precision][-1], flush=True)
    for precision in ("fp32", "bf16"):
        for kind, schedule in (("dense", PruneSchedule()), ("sparse", PruneSchedule((20, 40, 60, 80), (0.2,) * 4))):
            config = InversionConfig(num_images=10, batch_size=10, iterations=200, schedule=schedule, classes=IMAGENETTE, precision=precision)
            result = invert(model, config, progress=False)
            payload["pools"][f"{precision} {kind}"] = {"seconds": result.run["wall_seconds"], "success_rate": result.run["success_rate"],
                                                      "mean_target_prob": float(result.target_prob.mean())}
            print(precision, kind, payload["pools"][f"{precision} {kind}"], flush=True)
    write_results("bf16_step", payload)


if __name__ == "__main__":
    main()
