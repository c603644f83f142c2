"""Which timm ViT-like families sparseinv supports, refuses, or gets wrong.

    python benchmarks/families.py

For one small model of each family (random weights): is it accepted by ``vit_info``
(a token-sequence ViT with a class token and class logits)? If it is, do the sparse
forward's logits with every patch kept equal ``model(x)`` (to 1e-4), and does it run
with half the patches dropped? Every family must end in "supported" or "refused";
"wrong" or "crash" is a bug. Writes ``benchmarks/results/families.json`` and prints a
markdown table for the README.
"""

from __future__ import annotations

import time

import torch
from common import machine, write_results

from sparseinv import UsageError, sparse_forward, vit_info
from sparseinv.models import timm

# (family, timm name, kwargs that keep it small). One model per family.
FAMILIES = [
    ("ViT", "vit_small_patch16_224", {"depth": 2}),
    ("ViT + registers (DINOv2 reg)", "vit_small_patch14_reg4_dinov2", {"depth": 2, "img_size": 112, "num_classes": 10}),
    ("DINOv2 backbone (no head)", "vit_small_patch14_dinov2", {"depth": 2, "img_size": 112}),
    ("DeiT", "deit_tiny_patch16_224", {"depth": 2}),
    ("DeiT distilled", "deit_tiny_distilled_patch16_224", {"depth": 2}),
    ("DeiT-3 (LayerScale)", "deit3_small_patch16_224", {"depth": 2}),
    ("CLIP ViT (OpenAI, pre-norm)", "vit_base_patch16_clip_224", {"depth": 2, "num_classes": 10}),
    ("CLIP ViT quickgelu", "vit_base_patch32_clip_quickgelu_224", {"depth": 2, "num_classes": 10}),
    ("SigLIP ViT (attention pooling, no class token)", "vit_base_patch16_siglip_224", {"depth": 2, "num_classes": 10}),
    ("FlexiViT", "flexivit_small", {"depth": 2}),
    ("ViT relative position", "vit_relpos_small_patch16_224", {"depth": 2}),
    ("ViT, global average pooling, no class token", "vit_medium_patch16_gap_256", {"depth": 2}),
    ("EVA-02 (rotary)", "eva02_tiny_patch14_224", {"depth": 2, "num_classes": 10}),
    ("EVA (absolute position)", "eva_giant_patch14_224", {"depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2.0}),
    ("BEiT (relative position bias)", "beit_base_patch16_224", {"depth": 2}),
    ("BEiT v2", "beitv2_base_patch16_224", {"depth": 2}),
    ("CaiT (class attention)", "cait_xxs24_224", {"depth": 2}),
    ("XCiT", "xcit_nano_12_p16_224", {"depth": 2}),
    ("ConViT", "convit_tiny", {"depth": 2}),
    ("CrossViT", "crossvit_tiny_240", {}),
    ("TNT", "tnt_s_patch16_224", {"depth": 2}),
    ("PiT", "pit_ti_224", {}),
    ("LeViT", "levit_128s", {}),
    ("Swin (no class token)", "swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1)}),
    ("NaFlexViT", "naflexvit_base_patch16_gap", {"depth": 2}),
    ("AIMv2", "aimv2_large_patch14_224", {"depth": 2, "num_classes": 10}),
]


def check(name: str, kwargs: dict) -> dict:
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
    except Exception as err:  # noqa: BLE001  (a survey: any failure is recorded)
        return {"status": "not built", "detail": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    try:
        info = vit_info(model)
    except UsageError as err:
        return {"status": "refused", "detail": str(err)}
    x = torch.randn(2, *info.input_size)
    try:
        with torch.no_grad():
            expected = model(x)
            full = sparse_forward(model, x).logits
            keep = torch.stack([torch.randperm(info.num_patches)[: info.num_patches // 2].sort().values for _ in range(2)])
            half = sparse_forward(model, x, keep).logits
    except Exception as err:  # noqa: BLE001
        return {"status": "crash", "detail": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    diff = float((full - expected).abs().max())
    ok = diff <= 1e-4 and bool(torch.isfinite(half).all())
    return {"status": "supported" if ok else "wrong", "detail": f"all-token logits within {diff:.1e} of model(x)"}


def main() -> None:
    rows = []
    for family, name, kwargs in FAMILIES:
        start = time.perf_counter()
        result = check(name, kwargs)
        rows.append({"family": family, "model": name, "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
                     **result, "seconds": round(time.perf_counter() - start, 1)})
        print(f"{family:<48} {name:<40} {result['status']:<10} {result['detail']}", flush=True)
    write_results("families", {"command": "python benchmarks/families.py", "machine": machine(), "scaled_down": False,
                               "note": "random weights, depth cut to 2 where the model allows; one model per family", "rows": rows})
    print("\n| family | timm model | status | why |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['family']} | `{r['model']}` | {r['status']} | {r['detail']} |")


if __name__ == "__main__":
    main()
