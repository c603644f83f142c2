"""The older path of :mod:`sparseinv.runs.demo` (``sparseinv demo``, the main job end to end)."""

from sparseinv._lazy import moved_to

__getattr__ = moved_to("sparseinv.runs.demo")
