"""Does ``torch.compile`` speed up the inversion step on this device? Eager and compiled, interleaved.

    python benchmarks/compile_step.py [--device cuda] [--batch 32] [--tokens 196 46] [--mode default]

For each token count the bare inversion step (the sparse forward, cross-entropy, backward
to the input) runs eager and compiled (``torch.compile`` of the forward and loss, the
backward through AOTAutograd), alternating one step of each so both see the same load;
reported: the compile time, the median step of each, and their ratio. The measurement
runs in a child process, so a compiler that crashes it (on the project's 2-core x86 CPU,
torch 2.13.0: heap corruption in the compiled backward) is recorded, not lost. Results go
to benchmarks/results/compile_step[_cuda].json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from common import DEIT_TINY, DEIT_TINY_CKPT, machine, write_results

from sparseinv import load_model, sparse_forward, vit_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, nargs="+", default=[196, 46])
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind per token count")
    parser.add_argument("--mode", default="default", help="torch.compile mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.child:
        return parent(args)
    device = torch.device(args.device)
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    info = vit_info(model)

    def loss(x, keep, labels):
        return F.cross_entropy(sparse_forward(model, x, keep).logits, labels)

    compiled = torch.compile(loss, mode=args.mode, dynamic=False)
    rows = {}
    for n in args.tokens:
        x = torch.randn(args.batch, *info.input_size, device=device, requires_grad=True)
        labels = torch.randint(0, info.num_classes, (args.batch,), device=device)
        keep = None if n == info.num_patches else torch.rand(args.batch, info.num_patches).argsort(1)[:, :n].sort(1).values.to(device)

        def step(fn):
            start = time.perf_counter()
            fn(x, keep, labels).backward()
            x.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        step(loss)
        first = step(compiled)  # the compilation, and the first run
        times = {"eager": [], "compiled": []}
        for _ in range(args.steps):
            times["eager"].append(step(loss))
            times["compiled"].append(step(compiled))
        eager, comp = statistics.median(times["eager"]), statistics.median(times["compiled"])
        rows[str(n)] = {"compile_and_first_step_seconds": first, "eager_step_seconds": eager,
                        "compiled_step_seconds": comp, "compiled_speedup": eager / comp}
        print(f"{n} tokens: compile {first:.1f} s; eager {eager:.3f} s, compiled {comp:.3f} s: {eager / comp:.2f}x", flush=True)
        print("ROW " + json.dumps({str(n): rows[str(n)]}), flush=True)


def parent(args) -> None:
    """Run the measurement in a child; keep what it printed, and how it ended."""
    done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child"], capture_output=True, text=True)
    rows = {}
    for line in done.stdout.splitlines():
        if line.startswith("ROW "):
            rows.update(json.loads(line[4:]))
        else:
            print(line)
    device = torch.device(args.device)
    name = "compile_step" if device.type == "cpu" else f"compile_step_{device.type}"
    write_results(name, {"command": "python benchmarks/compile_step.py " + " ".join(sys.argv[1:]), "machine": machine(device),
                         "settings": {"model": DEIT_TINY, "batch": args.batch, "mode": args.mode, "steps": args.steps,
                                      "tokens": args.tokens},
                         "exit_code": done.returncode,
                         "failure": None if done.returncode == 0 else done.stderr.strip().splitlines()[:1] + done.stderr.strip().splitlines()[-3:],
                         "rows": rows})
    print(f"exit code {done.returncode}; rows for {', '.join(rows) or 'no token count'}")


if __name__ == "__main__":
    main()
