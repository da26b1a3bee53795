"""Global attention over all views' tokens: dense (SDPA) and Global Sparse Attention (GSA)."""

from __future__ import annotations

from torch import nn

from .config import AttentionConfig
from .dense import DenseAttention
from .layout import ViewLayout

__all__ = ["AttentionConfig", "DenseAttention", "ViewLayout", "build_global_attention"]


def build_global_attention(
    config: AttentionConfig | None, *, dim: int, num_heads: int, layer_index: int
) -> nn.Module:
    """The attention module of global block ``layer_index``: called as ``attend(q, k, v, layout)``.

    q, k, v are (B, heads, N, head_dim) after qk-norm and RoPE; the result has the shape of q.
    """
    if config is None or not config.uses_gsa(layer_index):
        return DenseAttention()
    raise NotImplementedError("GSA is being implemented (issue 3)")
