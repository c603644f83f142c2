"""Where a sparse inversion step's time goes: the gradient through the fed patches or the whole image, and bf16's attention.

    python benchmarks/sparse_step_profile.py

DeiT-Tiny (real weights), batch 32: the reference schedule's five token counts reached
in four steps (stops at steps 1-4, ratio 0.3), then ``STEPS`` steps at 46 tokens. Each
variant runs once untimed, once timed (the last phase's seconds per step) and once
under ``torch.profiler`` (the top operators by self CPU time, whole run).
"whole image": the gradient flows through the whole augmented image, the roll and flip
and the patch convolution (the path kept for patch embeddings that are not per-patch
projections); "fed patches": through the kept pixels each fed cell shows, as one matrix
product (the default). Both optimise the kept patches only (``KeptPixels``) and take
TV-L2's gradient from them. "bf16 fused" and "bf16 explicit": the fed-patch step under
``--precision bf16`` with the attention probe's verdict forced each way (torch's fused
attention, or timm's explicit one). The same script at commit bc7f934 compared the
original loop (Adam, clamp and copies over the whole image) with the first half of the
kept-patch change, and at commit c6f2a1a (before TV-L2 was taken from the kept patches)
measured the two fp32 variants. Writes ``benchmarks/results/sparse_step_profile.json``.
"""

from __future__ import annotations

import sys

import torch
from common import DEIT_TINY, DEIT_TINY_CKPT, machine, write_results
from torch.profiler import ProfilerActivity, profile

from sparseinv import InversionConfig, PruneSchedule, invert_batch, load_model

STEPS = 20
forward_module = sys.modules["sparseinv.vit.forward"]
inversion_module = sys.modules["sparseinv.inversion.loop"]
precision_module = sys.modules["sparseinv.inversion.precision"]


def run(model, labels, config) -> float:
    result = invert_batch(model, labels, config, seed=0, progress=False)
    return result.seconds_per_phase[-1] / STEPS


def main() -> None:
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    labels = torch.arange(32) * 31
    payload = {"command": "python benchmarks/sparse_step_profile.py", "machine": machine(), "scaled_down": True, "variants": {}}
    original, probe = forward_module._patch_projection, precision_module.fused_attention_slowdown
    whole_image = lambda model: None  # noqa: E731
    variants = (  # name, patch projection, precision, fused attention's measured slowdown (forced)
        ("whole image", whole_image, "fp32", probe),
        ("fed patches", original, "fp32", probe),
        ("bf16 fused", original, "bf16", lambda device: 1.0),
        ("bf16 explicit", original, "bf16", lambda device: 10.0),
    )
    for name, projection, precision, slowdown in variants:
        config = InversionConfig(iterations=4 + STEPS, schedule=PruneSchedule((1, 2, 3, 4), (0.3,) * 4), precision=precision)
        forward_module._patch_projection = inversion_module._patch_projection = projection
        precision_module.fused_attention_slowdown = slowdown
        try:
            run(model, labels, config)  # warm-up
            seconds = run(model, labels, config)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run(model, labels, config)
        finally:
            forward_module._patch_projection = inversion_module._patch_projection = original
            precision_module.fused_attention_slowdown = probe
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        payload["variants"][name] = {
            "seconds_per_46_token_step": seconds,
            "top_ops_self_ms_per_step": {e.key: e.self_cpu_time_total / 1e3 / (4 + STEPS) for e in ops},
        }
        print(f"{name}: {seconds * 1e3:.0f} ms per 46-token step; top: "
              + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3 / (4 + STEPS):.0f}" for e in ops[:6]), flush=True)
    step = {k: v["seconds_per_46_token_step"] for k, v in payload["variants"].items()}
    payload["speedup"] = step["whole image"] / step["fed patches"]
    payload["bf16_explicit_vs_fused"] = step["bf16 fused"] / step["bf16 explicit"]
    print(f"46-token step: fed patches {payload['speedup']:.2f}x faster than whole image; "
          f"bf16 explicit attention {payload['bf16_explicit_vs_fused']:.2f}x faster than fused", flush=True)
    write_results("sparse_step_profile", payload)


if __name__ == "__main__":
    main()
