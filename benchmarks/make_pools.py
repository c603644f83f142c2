"""Make (or reuse) the ImageNet DeiT-Tiny pools the quantization benchmark calibrates on.

    python benchmarks/make_pools.py

Dense and sparse inversion, 32 images, the shared scaled-down protocol in common.py.
"""

from common import DEIT_TINY, DEIT_TINY_CKPT, ensure_pool, pool_config

from sparseinv import load_model


def quantization_pools() -> dict[str, str]:
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    return {
        kind: str(ensure_pool(f"imagenet_{kind}_32", DEIT_TINY, DEIT_TINY_CKPT, pool_config(sparse=kind == "sparse"), model))
        for kind in ("sparse", "dense")
    }


if __name__ == "__main__":
    print(quantization_pools())
