"""Inversion loss terms, each per image, summed by weights the user sets.

The inversion loop only sees :meth:`InversionLoss.__call__`; it does not know which
terms it sums. Per-image values let the loop keep each image's best pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn


# The four neighbour directions: where pixel b of each pair lies from pixel a, as
# (rows, columns): horizontal, vertical and the two diagonals.
_OFFSETS = ((0, 1), (1, 0), (-1, 1), (1, 1))


def _pair_slices(offset: int) -> tuple[slice, slice]:
    """Along one axis, the slices of the a and b ends of every pair ``offset`` apart (-1, 0 or 1)."""
    if offset == 0:
        return slice(None), slice(None)
    head, tail = slice(None, -1), slice(1, None)
    return (head, tail) if offset > 0 else (tail, head)


# (minuend, subtrahend) index pairs of the neighbour differences of a (..., H, W) tensor, by _OFFSETS.
_NEIGHBOURS = tuple(
    ((..., rows[0], cols[0]), (..., rows[1], cols[1])) for rows, cols in ((_pair_slices(dy), _pair_slices(dx)) for dy, dx in _OFFSETS)
)


def _neighbour_diffs(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Horizontal, vertical and both diagonal neighbour differences of (B, C, H, W)."""
    return tuple(x[a] - x[b] for a, b in _NEIGHBOURS)


def _direction_norms(x: torch.Tensor) -> torch.Tensor:
    """(4, B): per direction and image, the L2 norm of the neighbour differences of (B, C, H, W)."""
    return torch.stack([torch.linalg.vector_norm(x[a] - x[b], dim=(1, 2, 3)) for a, b in _NEIGHBOURS])


class _TVL2(torch.autograd.Function):
    """TV-L2 with a hand-written backward.

    Autograd's backward of eight slices allocates a full-size zero tensor per slice;
    on the CPU that made TV-L2 cost about a sixth of a 46-token inversion step. This
    backward accumulates all eight into one buffer and is 2x faster, same numbers.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        norms = _direction_norms(x)
        ctx.save_for_backward(x, norms)
        return norms.sum(0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        x, norms = ctx.saved_tensors
        # d||d||/dd = d/||d||, and 0 where the difference is all zero (as torch.norm does).
        scale = torch.where(norms > 0, grad_out / norms, torch.zeros_like(norms))
        grad = torch.zeros_like(x)
        for (a, b), s in zip(_NEIGHBOURS, scale):
            d = (x[a] - x[b]).mul_(s.view(-1, *([1] * (x.dim() - 1))))
            grad[a] += d
            grad[b] -= d
        return grad


def tv_l2(x: torch.Tensor) -> torch.Tensor:
    """Per image: the sum of the L2 norms of the four neighbour differences. Shape (B,)."""
    return _TVL2.apply(x)


class _TVL2Patches(torch.autograd.Function):
    """TV-L2 of whole images, with the gradient for some of their patches only.

    The value is the whole image's. The gradient at a pixel p is, per direction d,
    ``(n_d(p) x_p - sum of its neighbours along d) / ||D_d||`` (``n_d(p)``: how many
    pairs along d it is in, 2 inside the image); for a patch that is one 3x3 depthwise
    convolution of its halo'd copy (zero outside the image) plus a per-pixel multiple
    of the patch, one pass whatever the number of patches.
    """

    @staticmethod
    def forward(ctx, kept, image, halos, pairs):
        norms = _direction_norms(image)
        ctx.save_for_backward(norms, halos, pairs)
        return norms.sum(0)

    @staticmethod
    def backward(ctx, grad_out):
        norms, halos, pairs = ctx.saved_tensors
        scale = torch.where(norms > 0, grad_out / norms, torch.zeros_like(norms))  # (4, B)
        count, batch = pairs.shape[1], scale.shape[1]
        channels = halos.shape[1] // batch
        kernel = scale.new_zeros(batch, 3, 3)
        for (dy, dx), s in zip(_OFFSETS, scale):
            kernel[:, 1 + dy, 1 + dx] -= s
            kernel[:, 1 - dy, 1 - dx] -= s
        kernel = kernel.repeat_interleave(channels, 0)[:, None]  # one 3x3 filter per image and channel
        grad = F.conv2d(halos, kernel, groups=batch * channels)  # (K, B * C, ph, pw)
        centre = (scale.view(4, 1, batch, 1, 1, 1) * pairs).sum(0)  # (K, B, 1, ph, pw)
        shape = (count, batch, channels, *grad.shape[2:])
        grad = grad.view(shape).addcmul_(halos[..., 1:-1, 1:-1].reshape(shape), centre)
        return grad.permute(1, 2, 0, 3, 4).contiguous(), None, None, None


def tv_l2_patches(kept: torch.Tensor, image: torch.Tensor, halos: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """:func:`tv_l2` of whole images, differentiable in some of their patches only. Shape (B,).

    Args:
        kept: (B, C, K, ph, pw) the patches the gradient flows to.
        image: (B, C, H, W) the whole images, holding ``kept`` in its patches.
        halos: (K, B * C, ph + 2, pw + 2) the same patches, each with the one-pixel
            ring around it in the image, zero outside the image.
        pairs: (4, K, B, 1, ph, pw) per direction of ``_NEIGHBOURS``, how many pairs
            each pixel of ``kept`` is in (2, fewer on the image's edge).

    See :class:`sparseinv.inversion.kept_pixels.KeptPixels`, which lays these out.
    """
    return _TVL2Patches.apply(kept, image, halos, pairs)


def tv_l1(x: torch.Tensor) -> torch.Tensor:
    """Per image: the sum of the mean absolute neighbour differences. Shape (B,)."""
    return sum(d.abs().flatten(1).mean(dim=1) for d in _neighbour_diffs(x))


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    """Per image L2 norm of the pixels. Shape (B,)."""
    return x.flatten(1).norm(dim=1)


def patch_similarity_entropy(tokens: torch.Tensor, num_prefix: int, max_pairs: int = 256) -> torch.Tensor:
    """Per image: the entropy of the cosine similarities between its patch tokens. Shape (B,).

    PSAQ-ViT's patch-similarity prior: real images give a ViT's patch tokens a wide
    spread of similarities (parts of one object alike, background different), while
    inverted texture makes them all alike or all different. The similarities of at most
    ``max_pairs`` token pairs per image (evenly spaced over all pairs) are turned into a
    density by a Gaussian kernel (Silverman's bandwidth), and its differential entropy
    ``-mean(log p)`` estimated at the same values. Only the tokens fed are compared, so
    in sparse inversion the prior sees the kept patches.
    """
    f = F.normalize(tokens[:, num_prefix:].float(), dim=-1)
    sim = f @ f.transpose(1, 2)
    k = sim.shape[1]
    rows, cols = torch.triu_indices(k, k, offset=1, device=sim.device)
    values = sim[:, rows, cols]
    if values.shape[1] > max_pairs:
        values = values[:, :: values.shape[1] // max_pairs][:, :max_pairs]
    n = values.shape[1]
    bandwidth = (1.06 * values.detach().std(dim=1, keepdim=True) * n ** -0.2).clamp_min(1e-3)
    z = (values.unsqueeze(2) - values.unsqueeze(1)) / bandwidth.unsqueeze(2)
    density = torch.exp(-0.5 * z.square()).mean(dim=2) / (bandwidth * math.sqrt(2 * math.pi))
    return -density.clamp_min(1e-12).log().mean(dim=1)


def gaussian_attention_priors(generator: torch.Generator, batch: int, grid: tuple[int, int]) -> torch.Tensor:
    """One random attention prior per image: a 2D Gaussian over the patch grid, shape (B, rows * cols), each summing to 1.

    An attention prior in the spirit of SARDFQ's: real photographs draw a ViT's class
    token to one region (the object), inverted texture spreads it everywhere. Each image
    gets its own region: a centre uniform in the middle half of each side and a width
    (standard deviation) uniform in 15-30% of the side.
    """
    rows, cols = grid
    u = torch.rand(batch, 4, generator=generator)
    cy, cx = (0.25 + 0.5 * u[:, 0]) * rows, (0.25 + 0.5 * u[:, 1]) * cols
    sy, sx = (0.15 + 0.15 * u[:, 2]) * rows, (0.15 + 0.15 * u[:, 3]) * cols
    y = torch.arange(rows, dtype=torch.float32) + 0.5
    x = torch.arange(cols, dtype=torch.float32) + 0.5
    g = torch.exp(-0.5 * (((y[None, :, None] - cy[:, None, None]) / sy[:, None, None]) ** 2
                          + ((x[None, None, :] - cx[:, None, None]) / sx[:, None, None]) ** 2))
    g = g.flatten(1)
    return g / g.sum(1, keepdim=True)


def attention_prior_kl(cls_attn: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Per image ``KL(prior || attention)`` over the fed patches, both renormalised to sum 1. Shape (B,).

    Args:
        cls_attn: (B, K) the class token's attention to the fed patches.
        prior: (B, K) the prior at the same patches (any positive scale).
    """
    p = prior.float() / prior.float().sum(1, keepdim=True).clamp_min(1e-12)
    q = cls_attn.float() / cls_attn.float().sum(1, keepdim=True).clamp_min(1e-12)
    return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(1)


def head_dissimilarity(maps: torch.Tensor) -> torch.Tensor:
    """Per image: how far a block's heads disagree about where each query looks. Shape (B,).

    MimiQ's observation: on real images the heads of a ViT block attend alike (their
    attention rows for one query point at the same places), on inverted images they
    scatter. The measure is ``1 - cos(row of head h, mean row over heads)``, averaged
    over heads and query tokens: 0 when every head draws the same map.

    Args:
        maps: (B, H, N, N) one block's softmax attention over the fed tokens.
    """
    rows = maps.float()
    return (1 - F.cosine_similarity(rows, rows.mean(1, keepdim=True), dim=-1)).mean(dim=(1, 2))


class Pixels(Protocol):
    """The optimised pixels, in whatever layout the optimiser keeps them."""

    def image(self) -> torch.Tensor:
        """(B, C, H, W) the whole images, differentiable in the optimised pixels."""
        ...

    def tv_l2(self) -> torch.Tensor:
        """:func:`tv_l2` of :meth:`image`, shape (B,), perhaps without composing it."""
        ...


class LossInputs:
    """What a loss term may look at on one step.

    Attributes:
        images: (B, C, H, W) the optimised images, un-augmented, normalised. Given
            ``pixels`` instead, composed the first time a term asks for them: sparse
            inversion optimises kept patches and needs no whole image for its own loss.
        logits: (B, classes) the model's output on the augmented, sparse input.
        targets: (B,) the class each image is inverted towards.
        attention: Each block's attention output on the fed tokens, when a term asked
            for them (:attr:`InversionLoss.needs_attention`); else ``None``.
        num_prefix: How many of those tokens are class/register tokens.
        cls_attn: (B, K) the last block's class-token attention to the fed patches, and
        attention_target: (B, K) the attention prior at the same patches, when the
            attention prior is on (:attr:`InversionLoss.needs_cls_attention`); else ``None``.
        attention_maps: Each block's softmax attention (B, H, N, N) over the fed tokens,
            when a term asked for them (:attr:`InversionLoss.needs_attention_maps`).
        fed: ``fed(other)`` is another model's logits on exactly what the model was fed
            this step (the same augmented pixels; a ViT on the same patch grid gets the
            same tokens), differentiable in the optimised pixels; ``None`` where the
            caller cannot replay the step.
    """

    def __init__(
        self,
        images: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        *,
        pixels: Pixels | None = None,
        attention: list[torch.Tensor] | None = None,
        num_prefix: int = 1,
        cls_attn: torch.Tensor | None = None,
        attention_target: torch.Tensor | None = None,
        attention_maps: list[torch.Tensor] | None = None,
        fed: Callable[[nn.Module], torch.Tensor] | None = None,
    ) -> None:
        if (images is None) == (pixels is None) or logits is None or targets is None:
            raise ValueError("LossInputs needs logits, targets and one of images or pixels")
        self.logits, self.targets = logits, targets
        self.attention, self.num_prefix = attention, num_prefix
        self.cls_attn, self.attention_target = cls_attn, attention_target
        self.attention_maps, self.fed = attention_maps, fed
        self._images, self._pixels = images, pixels

    @property
    def images(self) -> torch.Tensor:
        if self._images is None:
            self._images = self._pixels.image()
        return self._images

    def tv_l2(self) -> torch.Tensor:
        """Per image :func:`tv_l2` of :attr:`images`, shape (B,)."""
        return tv_l2(self.images) if self._pixels is None else self._pixels.tv_l2()


class LossTerm(Protocol):
    """An extra loss term: returns a (B,) tensor, one value per image."""

    def __call__(self, inputs: LossInputs) -> torch.Tensor: ...


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between the two rows' softmaxes, in nats, shape (B,); in [0, ln 2]."""
    log_p, log_q = logits_p.float().log_softmax(1), logits_q.float().log_softmax(1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2)
    return 0.5 * ((log_p.exp() * (log_p - log_m)).sum(1) + (log_q.exp() * (log_q - log_m)).sum(1))


class StudentDisagreement:
    """Images the student gets wrong: ``1 - JS(teacher, student) / ln 2`` per image, in [0, 1].

    Adaptive DeepInversion's competition term (Yin et al., CVPR 2020): minimised beside the
    cross-entropy, it keeps the teacher confident in the label while the student's
    prediction moves away from it, so the next images teach what the student has not
    learned. The student is fed exactly what the teacher was (:attr:`LossInputs.fed`) and
    is not changed: pass a frozen copy (eval mode, no gradients to its parameters).
    """

    def __init__(self, student: nn.Module) -> None:
        self.student = student

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        if inputs.fed is None:
            raise ValueError("the student-disagreement term needs LossInputs.fed")
        return 1 - js_divergence(inputs.logits, inputs.fed(self.student)) / math.log(2)


@dataclass
class InversionLoss:
    """The inversion objective, ``sum_k weight_k * term_k`` per image.

    Defaults are the paper's: cross-entropy plus ``1e-4 * TV_L2``; the other built-in
    terms are off. ``patch_entropy`` subtracts the weighted mean over blocks of
    :func:`patch_similarity_entropy` (more diverse patch tokens). ``attention_prior``
    adds the weighted :func:`attention_prior_kl` between the last block's class-token
    attention and a random Gaussian region per image. ``head_similarity`` adds the
    weighted mean over blocks of :func:`head_dissimilarity` (MimiQ's inter-head
    attention similarity: heads that look at the same places). ``extra`` takes any
    (weight, term) pairs, e.g. a feature-statistics prior or an adversarial term
    against a student.
    """

    ce: float = 1.0
    tv_l2: float = 1e-4
    tv_l1: float = 0.0
    l2: float = 0.0
    patch_entropy: float = 0.0
    attention_prior: float = 0.0
    head_similarity: float = 0.0
    extra: list[tuple[float, LossTerm]] = field(default_factory=list)

    @property
    def needs_attention(self) -> bool:
        """Whether a term reads the blocks' attention outputs (the loop then records them)."""
        return bool(self.patch_entropy)

    @property
    def needs_cls_attention(self) -> bool:
        """Whether a term reads the class-token attention and an attention prior (the loop then provides them)."""
        return bool(self.attention_prior)

    @property
    def needs_attention_maps(self) -> bool:
        """Whether a term reads every block's softmax attention (the loop then records them, unfused)."""
        return bool(self.head_similarity)

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        """Per-image loss, shape (B,)."""
        loss = self.ce * F.cross_entropy(inputs.logits, inputs.targets, reduction="none")
        if self.tv_l2:
            loss = loss + self.tv_l2 * inputs.tv_l2()
        for weight, term in ((self.tv_l1, tv_l1), (self.l2, l2_norm)):
            if weight:
                loss = loss + weight * term(inputs.images)
        if self.patch_entropy:
            if inputs.attention is None:
                raise ValueError("the patch-similarity prior needs LossInputs.attention")
            entropy = torch.stack([patch_similarity_entropy(t, inputs.num_prefix) for t in inputs.attention]).mean(0)
            loss = loss - self.patch_entropy * entropy
        if self.attention_prior:
            if inputs.cls_attn is None or inputs.attention_target is None:
                raise ValueError("the attention prior needs LossInputs.cls_attn and attention_target")
            loss = loss + self.attention_prior * attention_prior_kl(inputs.cls_attn, inputs.attention_target)
        if self.head_similarity:
            if inputs.attention_maps is None:
                raise ValueError("the head-similarity prior needs LossInputs.attention_maps")
            loss = loss + self.head_similarity * torch.stack([head_dissimilarity(m) for m in inputs.attention_maps]).mean(0)
        for weight, term in self.extra:
            loss = loss + weight * term(inputs)
        return loss

    def describe(self) -> dict:
        """The weights, for the run record (extra terms by class name)."""
        out = {"ce": self.ce, "tv_l2": self.tv_l2, "tv_l1": self.tv_l1, "l2": self.l2}
        if self.patch_entropy:  # left out when off, so records written before it existed still match
            out["patch_entropy"] = self.patch_entropy
        if self.attention_prior:
            out["attention_prior"] = self.attention_prior
        if self.head_similarity:
            out["head_similarity"] = self.head_similarity
        return {**out, "extra": [[w, type(t).__name__] for w, t in self.extra]}
