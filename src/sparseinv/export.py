"""The older path of :mod:`sparseinv.quant.export` (integer ONNX export and ONNX Runtime)."""

from sparseinv._lazy import moved_to

__getattr__ = moved_to("sparseinv.quant.export")
