"""Make ``import torchvision`` work beside a CPU-only torch.

The pinned ``torchvision==0.28.0`` wheel is a CUDA build: beside the CPU torch its
compiled ops cannot load and its import fails with ``operator torchvision::nms does
not exist`` when it registers fake kernels for them. Declaring the two operator
schemas first lets the pure-Python parts (the transforms timm uses) import; the
compiled ops stay unavailable, which is why images are read with PIL.
"""

from __future__ import annotations

import sys

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: torch.library.Library | None = None


def ensure_torchvision_importable() -> None:
    """Import torchvision, declaring its missing op schemas only if the import needs it."""
    global _library
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    # The failed import left half-initialised modules behind; drop them and retry.
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    import torchvision  # noqa: F401
