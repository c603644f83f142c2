"""Block-wise reconstruction of a calibrated quantized ViT (BRECQ, with QDrop's dropping).

Units are the transformer blocks in order, then the classifier (final norm, pooling,
head). For each unit, the weight rounding of its quantized Linears (AdaRound) and the
step sizes of its activation quantizers (LSQ) are learned so that the quantized
unit, fed the tokens the already quantized units before it produce, reproduces the
full-precision unit's output on the full-precision tokens. As in QDrop, each input
element is the full-precision one with probability ``drop_prob`` and each activation
quantizer inside keeps an element in full precision with the same probability, which
makes the learned parameters hold up when the real (fully quantized) inputs arrive.
With ``views > 1`` every calibration image is also shown as whole-patch rolls and
mirrors (kept patches follow their pixels), more samples for the same images.

Tokens are what :func:`sparseinv.vit.forward.input_tokens` feeds: a sparse pool's
images enter as their kept tokens only, so reconstructing on them is cheaper too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseinv.vit.views import whole_patch_views
from sparseinv.models import vit_info
from sparseinv.quant.config import ReconConfig
from sparseinv.quant.model import set_quant_mode
from sparseinv.quant.quantizers import ActQuantizer, Log2Quantizer, QuantWeight
from sparseinv.vit.forward import head_logits, input_tokens

Batch = tuple[torch.Tensor, torch.Tensor | None]


def _units(model: nn.Module) -> list[tuple[str, nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
    """(name, module holding the unit's quantizers, function tokens -> output)."""
    units = [(f"block {i}", block, block) for i, block in enumerate(model.blocks)]
    head = nn.ModuleList([m for m in (getattr(model, "norm", None), getattr(model, "fc_norm", None), getattr(model, "head", None)) if m is not None])
    units.append(("head", head, lambda tokens: head_logits(model, tokens)))
    return units


def _unit_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's reconstruction error: squared error summed over channels, averaged over tokens."""
    return (out - target).pow(2).sum(dim=-1).mean()


class _TokenSet:
    """Per-batch token tensors (a batch's images share a token count), sampled in minibatches."""

    def __init__(self, fp: list[torch.Tensor], q: list[torch.Tensor]) -> None:
        self.fp, self.q = fp, q
        self.sizes = torch.tensor([t.shape[0] for t in fp], dtype=torch.float)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[int, torch.Tensor]:
        """A batch index and a random subset of its rows."""
        b = int(torch.multinomial(self.sizes, 1, generator=generator))
        n = self.fp[b].shape[0]
        return b, torch.randperm(n, generator=generator)[: min(batch_size, n)].to(self.fp[b].device)


@torch.no_grad()
def _run(fn: Callable, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    return [fn(t) for t in tokens]


def reconstruct(model: nn.Module, batches: Sequence[Batch], config: ReconConfig, *, progress: bool = True) -> list[dict]:
    """Reconstruct every unit of a calibrated quantized ``model`` in place.

    Leaves the model in ``quant`` mode with every weight's integer codes frozen.

    Args:
        model: A model after :func:`quantize_` and calibration.
        batches: ``(images, keep)`` pairs, as for calibration.
        config: Iterations, learning rates, QDrop probability.
        progress: Show a tqdm bar (unit, iteration, loss).

    Returns:
        One record per unit: its name and reconstruction loss before and after.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(config.seed)
    requires_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    if config.views > 1:
        info = vit_info(model)
        views = whole_patch_views(config.views, info.patch_size, config.seed)
        batches = [(view.apply(x), None if k is None else view.remap(k, info.grid_size, info.patch_size))
                   for view in views for x, k in batches]
    with torch.no_grad():
        set_quant_mode(model, "off")
        fp = [input_tokens(model, x.to(device), None if k is None else k.to(device)) for x, k in batches]
        set_quant_mode(model, "quant")
        q = [input_tokens(model, x.to(device), None if k is None else k.to(device)) for x, k in batches]
    units = _units(model)
    # QDrop's masks come from the global generator: fork it, so a run is reproducible and leaves the caller's state alone.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        records = _reconstruct_units(model, units, fp, q, config, generator, progress)
    for p, flag in zip(model.parameters(), requires_grad):
        p.requires_grad_(flag)
    model.train(was_training)
    return records


def _reconstruct_units(model, units, fp, q, config, generator, progress) -> list[dict]:
    bar = tqdm(total=len(units) * config.iters, desc="reconstruct", disable=not progress, leave=False)
    records = []
    for name, holder, fn in units:
        set_quant_mode(model, "off")
        target = _run(fn, fp)
        set_quant_mode(model, "quant")
        tokens = _TokenSet(fp, q)
        before = sum(float(_unit_loss(o, t)) for o, t in zip(_run(fn, q), target)) / len(q)
        _fit_unit(holder, fn, tokens, target, config, generator, bar, name)
        q_out = _run(fn, q)
        after = sum(float(_unit_loss(o, t)) for o, t in zip(q_out, target)) / len(q)
        records.append({"unit": name, "loss_before": before, "loss_after": after})
        fp, q = target, q_out
    bar.close()
    return records


def _fit_unit(holder: nn.Module, fn: Callable, tokens: _TokenSet, target: list[torch.Tensor], config: ReconConfig,
              generator: torch.Generator, bar, name: str) -> None:
    weights = [m for m in holder.modules() if isinstance(m, QuantWeight)]
    acts = [m for m in holder.modules() if isinstance(m, ActQuantizer) and not isinstance(m, Log2Quantizer)]
    logits = [m.start_learned_rounding() for m in weights]
    # Step sizes are learned on a log scale: one learning rate serves ranges from 1e-3 to 10.
    log_scales = [nn.Parameter(m.scale.detach().log()) for m in acts]
    groups = [{"params": logits, "lr": config.lr_round}]
    if log_scales and config.lr_scale > 0:
        groups.append({"params": log_scales, "lr": config.lr_scale})
    optimizer = torch.optim.Adam(groups)
    drop_quantizers = [m for m in holder.modules() if isinstance(m, ActQuantizer)]
    for m in drop_quantizers:
        m.drop_prob = config.drop_prob
    warm = int(config.warmup * config.iters)
    try:
        with torch.enable_grad():
            for it in range(config.iters):
                for m, log_scale in zip(acts, log_scales):
                    m.scale = log_scale.exp()
                b, idx = tokens.sample(config.batch_size, generator)
                x = tokens.q[b][idx]
                if config.drop_prob > 0:
                    keep_fp = torch.rand(x.shape, generator=generator).to(x.device) < config.drop_prob
                    x = torch.where(keep_fp, tokens.fp[b][idx], x)
                loss = _unit_loss(fn(x), target[b][idx])
                if it >= warm and weights and config.round_weight > 0:
                    progress = (it - warm) / max(1, config.iters - warm)
                    beta = config.beta[0] + (config.beta[1] - config.beta[0]) * progress
                    loss = loss + config.round_weight * sum(m.round_penalty(beta) for m in weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update(1)
                if it % 20 == 0 or it == config.iters - 1:
                    bar.set_postfix_str(f"{name} loss {loss.item():.4g}")
    finally:
        with torch.no_grad():
            for m, log_scale in zip(acts, log_scales):
                m.scale = log_scale.detach().exp()
            for m in drop_quantizers:
                m.drop_prob = 0.0
            for m in weights:
                m.freeze_weight()
