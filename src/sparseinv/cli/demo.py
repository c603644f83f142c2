"""``sparseinv demo``: the main job end to end on the real DeiT-Tiny, with a report."""

from __future__ import annotations

import argparse

from sparseinv.cli.common import add_device, add_quiet, resolve_device


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="invert, quantize and distill DeiT-Tiny end to end and write a report (about 7 minutes on 2 CPU cores)",
        description=(
            "On DeiT-Tiny with real weights: invert the ten Imagenette classes densely and sparsely with the same settings; "
            "quantize to W4/A8 and W4/A4 (default method) from each pool and from Gaussian noise; distill a student "
            "(ImageNet backbone, fresh 10-way head) from each pool; evaluate everything on real Imagenette val images; "
            "write OUT/report.md (table, image grids, plots) and OUT/report.json. About 7 minutes on 2 CPU cores (an estimate for the machine is printed first) "
            "(--quick: about a minute; --full: the paper's protocol, hours)."
        ),
    )
    p.add_argument("--shared", default="../shared", help="fixtures folder with assets/ (weights, synsets) and data/imagenette/val (default: ../shared)")
    p.add_argument("--checkpoint", help="DeiT-Tiny weights (default: SHARED/assets/deit_tiny_patch16_224.safetensors, else timm's hub)")
    p.add_argument("--out", default="demo-output", help="report folder (default: demo-output)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2 images x 30 steps: checks the pipeline in about a minute")
    size.add_argument("--full", action="store_true", help="the paper's reference protocol: 32 images x 4000 steps (hours on a CPU)")
    add_quiet(p)
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparseinv.runs.demo import DemoConfig, run_demo, table

    device = resolve_device(args)
    preset = DemoConfig.quick if args.quick else DemoConfig.full if args.full else DemoConfig
    config = preset(shared=args.shared, checkpoint=args.checkpoint, device=str(device))
    report = run_demo(config, args.out, progress=not args.quiet)
    print()
    print(table(report))
    print(f"\nsparse inversion {report['inversion']['speedup']:.2f}x faster than dense; report: {args.out}/report.md")
    return 0
