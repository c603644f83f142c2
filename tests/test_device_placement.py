"""Every tensor a quantizer holds lives on the model's device and moves with it.

CPU stand-in for a GPU: the ``meta`` device. A buffer born on the CPU beside a model on
another device is what crashed ``quantize --device cuda`` (``x / scale`` across devices);
on ``meta`` the same mistake shows as a tensor that is not on ``meta``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseinv.models import load_model
from sparseinv.quant import METHODS, QuantConfig, noise_batches, prepare_, quantize_
from sparseinv.quant.config import ReconConfig


def _off_device(model: nn.Module, device: torch.device) -> list[str]:
    """Names of the parameters, buffers and plain tensor attributes of ``model`` not on ``device``."""
    found = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device != device]
    for name, module in model.named_modules():
        found += [f"{name}.{k}" for k, v in vars(module).items() if isinstance(v, torch.Tensor) and v.device != device]
    return found


@pytest.mark.parametrize("method", sorted(METHODS))
def test_prepare_makes_every_quantizer_tensor_on_the_models_device(method):
    model = load_model("test_vit", pretrained=False).to("meta")
    prepare_(model, QuantConfig.for_method(method, w_bits=4, a_bits=4))
    assert _off_device(model, torch.device("meta")) == []


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_quantized_model_moved_with_to_keeps_every_tensor_with_it(method):
    torch.manual_seed(0)
    model = load_model("test_vit", pretrained=False)
    config = QuantConfig.for_method(method, w_bits=4, a_bits=4)
    if config.recon is not None:
        config = QuantConfig.for_method(method, w_bits=4, a_bits=4, recon=ReconConfig(iters=2, batch_size=2))
    quantize_(model, config, noise_batches(model, num=4, batch_size=4), progress=False)
    x = torch.randn(2, 3, 160, 160)
    model.to("meta")
    assert _off_device(model, torch.device("meta")) == []
    assert model(x.to("meta")).shape == (2, model.num_classes)  # a stray CPU tensor would meet a meta one here
