"""Moved to :mod:`sparseinv.vit.forward`; this name keeps older imports working."""

from sparseinv.vit.forward import (  # noqa: F401
    AttentionRecorder,
    OutputRecorder,
    SparseOutput,
    _patch_projection,
    embed_tokens,
    gather_tokens,
    head_logits,
    input_tokens,
    sparse_forward,
)
