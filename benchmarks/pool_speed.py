"""End to end: a whole pool written by ``sparseinv.invert``, seconds in the loop against seconds in all.

    python benchmarks/pool_speed.py [--device cuda] [--num-images 8192 --batch-size 1024 --iterations 400 --precision bf16] [--cuda-graphs]

The pool is made twice from scratch, with commits overlapped with the next batch's
inversion (what ``invert`` does) and with each commit awaited before the next batch
(the writer's ``wait`` after every batch, as before commits moved to a thread), so
the ratio of the two is measured in one run. Reported per mode: seconds inside the
inversion loop (the batches' own wall times), seconds for the whole call, images/s.
Pools go to benchmarks/scratch/ and are deleted; results to results/pool_speed[_cuda].json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

import torch

from common import DEIT_TINY, DEIT_TINY_CKPT, ROOT, machine, scaled_schedule, write_results

from sparseinv import InversionConfig, invert, load_model
from sparseinv.pool import PoolWriter

SCRATCH = ROOT / "benchmarks" / "scratch" / "pool_speed"


def make_pool(model, config: InversionConfig, serial: bool, cuda_graphs: bool = False) -> dict:
    out = SCRATCH / ("serial" if serial else "overlapped")
    shutil.rmtree(out, ignore_errors=True)
    real_add = PoolWriter.add_batch

    def add_and_wait(self, *args, **kwargs):
        real_add(self, *args, **kwargs)
        self.wait()

    if serial:
        PoolWriter.add_batch = add_and_wait
    try:
        start = time.perf_counter()
        invert(model, config, str(out), model_name=DEIT_TINY, cuda_graphs=cuda_graphs)
        total = time.perf_counter() - start
    finally:
        PoolWriter.add_batch = real_add
    run = json.loads((out / "run.json").read_text())
    shutil.rmtree(out)
    return {
        "loop_seconds": run["wall_seconds"],
        "total_seconds": total,
        "outside_loop_seconds": total - run["wall_seconds"],
        "images_per_second": config.num_images / total,
        "success_rate": run["success_rate"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--no-serial", action="store_true", help="time the overlapped mode alone (half the time)")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay each phase's step as a captured CUDA graph (invert's --cuda-graphs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT).to(device)
    config = InversionConfig(num_images=args.num_images, batch_size=args.batch_size, iterations=args.iterations,
                             schedule=scaled_schedule(args.iterations), precision=args.precision)
    # A warm-up batch, so neither mode pays for first kernels and allocations.
    invert(model, InversionConfig(num_images=args.batch_size, batch_size=args.batch_size, iterations=10,
                                  schedule=scaled_schedule(10), precision=args.precision), progress=False, cuda_graphs=args.cuda_graphs)
    modes = {"overlapped": make_pool(model, config, serial=False, cuda_graphs=args.cuda_graphs)}
    if not args.no_serial:
        modes["serial"] = make_pool(model, config, serial=True, cuda_graphs=args.cuda_graphs)
    name = "pool_speed" if device.type == "cpu" else f"pool_speed_{device.type}" + ("_graphs" if args.cuda_graphs else "")
    path = write_results(name, {
        "command": "python benchmarks/pool_speed.py " + " ".join(sys.argv[1:]),
        "machine": machine(device),
        "settings": {"model": DEIT_TINY, "num_images": args.num_images, "batch_size": args.batch_size,
                     "iterations": args.iterations, "schedule": "reference stops scaled", "precision": args.precision,
                     "device": str(device), "cuda_graphs": args.cuda_graphs},
        "modes": modes,
        "overlapped_vs_serial_speedup": modes["serial"]["total_seconds"] / modes["overlapped"]["total_seconds"] if "serial" in modes else None,
    })
    for mode, r in modes.items():
        print(f"{mode:>10}: loop {r['loop_seconds']:.1f} s, total {r['total_seconds']:.1f} s, {r['images_per_second']:.1f} images/s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
