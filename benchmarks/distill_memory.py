"""Peak memory of a distillation run does not grow with the pool.

    python benchmarks/distill_memory.py

Trains DeiT-Tiny's 6-block copy against DeiT-Tiny for one epoch (batch 32) on 512 and
on 2,048 sparse images (the cached 512-image pool of ``distill.py``, listed four
times for 2,048: memory is decided by how many images a run holds, not by which), each
in a fresh process, and records each process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, DEIT_TINY, DEIT_TINY_CKPT, write_results  # noqa: E402


def child(images: int) -> None:
    from sparseinv import load_model
    from sparseinv.distill import DistillConfig, Images, distill, shallow_copy, spread_blocks
    from sparseinv.pool import open_pool

    pool = open_pool(CACHE / "pools" / "kt_sparse_512_s0")
    data = Images.from_pools([pool])
    data = replace(data, sources=(data.sources * (images // len(data.sources) + 1))[:images], names=[f"{images} images"])
    teacher = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    student = shallow_copy(teacher, spread_blocks(12, 6))
    out = CACHE / "distill_memory" / f"{images}" / "student.safetensors"
    for stale in out.parent.glob("student.*"):
        stale.unlink()
    start = time.perf_counter()
    distill(teacher, student, data, DistillConfig(mode="full", epochs=1, batch_size=32), out, progress=False)
    print(json.dumps({"images": images, "seconds": time.perf_counter() - start,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    rows = []
    for images in (512, 2048):
        done = subprocess.run([sys.executable, __file__, "--child", str(images)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    ratio = rows[1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    write_results("distill_memory", {"rows": rows, "peak_ratio_2048_vs_512": ratio, "scaled_down": "one epoch per run"})
    print(f"peak memory 2048 vs 512 images: {ratio:.3f}x")


if __name__ == "__main__":
    main()
