"""Make (or reuse) the ImageNet DeiT-Tiny pools the quantization benchmark calibrates on.

    python benchmarks/make_pools.py

Sparse inversion of 128 images (its first 32 are the 32-image pool: labels and seeds
depend on the image index only) and dense inversion of 32 images, the shared
scaled-down protocol in common.py.
"""

from common import DEIT_TINY, DEIT_TINY_CKPT, ensure_pool, pool_config

from sparseinv import load_model

POOLS = {"sparse": ("imagenet_sparse_128", 128), "dense": ("imagenet_dense_32", 32)}


def quantization_pools() -> dict[str, str]:
    model = load_model(DEIT_TINY, DEIT_TINY_CKPT)
    return {
        kind: str(ensure_pool(name, DEIT_TINY, DEIT_TINY_CKPT, pool_config(sparse=kind == "sparse", num_images=num), model))
        for kind, (name, num) in POOLS.items()
    }


if __name__ == "__main__":
    print(quantization_pools())
