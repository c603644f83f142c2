"""Runs: the engines put to work, with everything around them.

The engines (:mod:`sparseinv.inversion`, :mod:`sparseinv.quant`, :mod:`sparseinv.distill`)
take tensors and models; a run adds what a command needs: pools on disk, processes under
``torchrun``, pictures, several engines in turn.

* :mod:`~sparseinv.runs.inversion`: :func:`invert`, many batches of the inverter into a pool.
* :mod:`~sparseinv.runs.rounds`: distillation that grows its pool by inverting between epochs.
* :mod:`~sparseinv.runs.demo`: ``sparseinv demo``, the main job end to end and its report.
"""

from typing import TYPE_CHECKING

from sparseinv._lazy import lazy_exports

if TYPE_CHECKING:
    from sparseinv.runs.inversion import InversionResult, assign_labels, invert, run_record
    from sparseinv.runs.rounds import RoundsConfig, distill_with_rounds, round_folder

_EXPORTS = {
    "InversionResult": "sparseinv.runs.inversion",
    "assign_labels": "sparseinv.runs.inversion",
    "invert": "sparseinv.runs.inversion",
    "run_record": "sparseinv.runs.inversion",
    "RoundsConfig": "sparseinv.runs.rounds",
    "distill_with_rounds": "sparseinv.runs.rounds",
    "round_folder": "sparseinv.runs.rounds",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["InversionResult", "RoundsConfig", "assign_labels", "distill_with_rounds", "invert", "round_folder", "run_record"]
