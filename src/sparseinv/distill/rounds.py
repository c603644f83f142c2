"""The older path of :mod:`sparseinv.runs.rounds` (growing the pool while distilling is a run: it calls the inverter)."""

from sparseinv._lazy import moved_to

__getattr__ = moved_to("sparseinv.runs.rounds")
