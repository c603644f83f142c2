"""The model layer, at the bottom of the house: what every part of sparseinv does with a timm ViT.

* :mod:`~sparseinv.vit.forward`: the one sparse forward pass (a ViT on a subset of its
  patch tokens), the class-token attention it can return, and :func:`~sparseinv.vit.forward.logits`.
* :mod:`~sparseinv.vit.views`: rolls and mirrors whose kept patches follow the pixels.

Loading models by name and reading their facts (:mod:`sparseinv.models`) sit beside it.
Nothing here imports inversion, quantization, distillation or pools.
"""
