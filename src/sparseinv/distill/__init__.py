"""Data-free knowledge transfer: train a student on inverted images with a teacher's soft labels.

    loss = T^2 * KL(softmax(teacher / T) || softmax(student / T))

* :mod:`~sparseinv.distill.config`: :class:`DistillConfig` and :func:`kd_loss`.
* :mod:`~sparseinv.distill.data`: pool images streamed from disk, freshly cropped each epoch.
* :mod:`~sparseinv.distill.students`: the students (any timm classifier, a shallower copy
  of the teacher, a quantized model) and how pixels reach them.
* :mod:`~sparseinv.distill.train`: one epoch, evaluation, the checkpoint, :func:`distill`.
* growing the pool between epochs calls the inverter, so it is a run above this package
  (:mod:`sparseinv.runs.rounds`); its names are still exported here.
"""

from typing import TYPE_CHECKING

from sparseinv._lazy import lazy_exports

if TYPE_CHECKING:
    from sparseinv.distill.config import MODES, DistillConfig, kd_loss
    from sparseinv.distill.data import Source, TrainImages, folder_sources, pool_sources
    from sparseinv.distill.students import classifiers, prepare_student, shallow_copy, spread_blocks
    from sparseinv.models import is_vit
    from sparseinv.quant.qat import end_qat, start_qat
    from sparseinv.distill.train import Images, distill, evaluate_student, sibling

_EXPORTS = {
    "MODES": "sparseinv.distill.config",
    "DistillConfig": "sparseinv.distill.config",
    "kd_loss": "sparseinv.distill.config",
    "Source": "sparseinv.distill.data",
    "TrainImages": "sparseinv.distill.data",
    "folder_sources": "sparseinv.distill.data",
    "pool_sources": "sparseinv.distill.data",
    # The older import path of the runs layer's rounds; named, never imported, by this package.
    "RoundsConfig": "sparseinv.runs.rounds",
    "distill_with_rounds": "sparseinv.runs.rounds",
    "round_folder": "sparseinv.runs.rounds",
    "classifiers": "sparseinv.distill.students",
    "end_qat": "sparseinv.quant.qat",
    "is_vit": "sparseinv.models",
    "prepare_student": "sparseinv.distill.students",
    "shallow_copy": "sparseinv.distill.students",
    "spread_blocks": "sparseinv.distill.students",
    "start_qat": "sparseinv.quant.qat",
    "Images": "sparseinv.distill.train",
    "distill": "sparseinv.distill.train",
    "evaluate_student": "sparseinv.distill.train",
    "sibling": "sparseinv.distill.train",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "MODES",
    "DistillConfig",
    "Images",
    "RoundsConfig",
    "Source",
    "TrainImages",
    "classifiers",
    "distill",
    "distill_with_rounds",
    "end_qat",
    "evaluate_student",
    "folder_sources",
    "is_vit",
    "kd_loss",
    "pool_sources",
    "prepare_student",
    "round_folder",
    "shallow_copy",
    "sibling",
    "spread_blocks",
    "start_qat",
]
