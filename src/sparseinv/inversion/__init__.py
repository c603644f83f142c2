"""Dense and sparse model inversion of timm ViTs: everything that makes a pool's images
(the sparse forward pass they run is the model layer's, :mod:`sparseinv.vit`).

* :mod:`~sparseinv.inversion.config`: :class:`InversionConfig`, every setting of a run.
* :mod:`~sparseinv.inversion.loop`: :func:`invert_batch`, one batch of labels in, its
  images and kept patches out (many batches into a pool: :mod:`sparseinv.runs.inversion`).
* :mod:`~sparseinv.inversion.kept_pixels`: what a sparse phase optimises.
* :mod:`~sparseinv.inversion.losses`: the per-image loss terms.
* :mod:`~sparseinv.inversion.augment`: the colour shift (roll/flip views: :mod:`sparseinv.vit.views`).
* :mod:`~sparseinv.inversion.schedule`: stop steps and ratios.
* :mod:`~sparseinv.inversion.precision`: fp32 or bf16 for the model, and the probes behind ``auto``.
"""

from typing import TYPE_CHECKING

from sparseinv._lazy import lazy_exports

if TYPE_CHECKING:
    from sparseinv.inversion.config import FINAL_MASKS, InversionConfig
    from sparseinv.inversion.loop import BatchResult, invert_batch

_EXPORTS = {
    "FINAL_MASKS": "sparseinv.inversion.config",
    "InversionConfig": "sparseinv.inversion.config",
    "BatchResult": "sparseinv.inversion.loop",
    "invert_batch": "sparseinv.inversion.loop",
    # The older import path of the runs layer's names (sparseinv.runs.inversion). Named only
    # here, resolved on first use and never imported by this package, so the engine stays
    # below pools, pictures and ranks.
    "InversionResult": "sparseinv.runs.inversion",
    "assign_labels": "sparseinv.runs.inversion",
    "invert": "sparseinv.runs.inversion",
    "run_record": "sparseinv.runs.inversion",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["FINAL_MASKS", "BatchResult", "InversionConfig", "InversionResult", "assign_labels", "invert", "invert_batch", "run_record"]
