"""How the demo's sparse schedule was chosen: success rate of 200-step schedules.

    python benchmarks/demo_schedule.py

DeiT-Tiny, the ten Imagenette classes (one image each), 200 steps: dense, then six
sparse schedules; wall time and success rate (the model's own verdict on its images:
no real data). Writes ``benchmarks/results/demo_schedule.json``.
"""

from __future__ import annotations

from common import DEIT_TINY, DEIT_TINY_CKPT, machine, write_results

from sparseinv import InversionConfig, PruneSchedule, invert, load_model
from sparseinv.runs.demo import IMAGENETTE

SCHEDULES = [
    ((), 0.0), ((40, 60, 80, 100), 0.3), ((20, 40, 60, 80), 0.3), ((60, 80, 100, 120), 0.3),
    ((40, 60, 80, 100), 0.2), ((20, 40, 60, 80), 0.2), ((40, 60, 80, 100), 0.25),
]


def main() -> None:
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    rows = []
    for steps, ratio in SCHEDULES:
        config = InversionConfig(num_images=10, batch_size=10, iterations=200, schedule=PruneSchedule(steps, (ratio,) * len(steps)),
                                 classes=IMAGENETTE)
        result = invert(model, config, progress=False)
        rows.append({"stops": list(steps), "ratio": ratio, "seconds": result.run["wall_seconds"], "success_rate": result.run["success_rate"],
                     "patches_kept": int(result.kept_patches.shape[1])})
        print(rows[-1], flush=True)
    write_results("demo_schedule", {"command": "python benchmarks/demo_schedule.py", "machine": machine(), "scaled_down": True, "rows": rows})


if __name__ == "__main__":
    main()
