"""Global attention over all views' tokens: dense (SDPA) and Global Sparse Attention (GSA)."""

from __future__ import annotations

from torch import nn

from .config import AttentionConfig
from .dense import DenseAttention
from .gsa import GlobalSparseAttention
from .layout import ViewLayout

__all__ = [
    "GSA_PARAMETER_SUFFIXES",
    "AttentionConfig",
    "DenseAttention",
    "GlobalSparseAttention",
    "ViewLayout",
    "build_global_attention",
    "is_gsa_parameter",
    "reset_gsa_parameters",
]

# Suffixes of GSA state-dict keys, e.g. "aggregator.global_blocks.3.attn.attend.gate.weight".
GSA_PARAMETER_SUFFIXES = ("attend.gate.weight", "attend.gate.bias")


def build_global_attention(
    config: AttentionConfig | None, *, dim: int, num_heads: int, layer_index: int
) -> nn.Module:
    """The attention module of global block ``layer_index``: called as ``attend(q, k, v, layout)``.

    q, k, v are (B, heads, N, head_dim) after qk-norm and RoPE; the result has the shape of q. GSA modules
    are built at their training-free init.
    """
    if config is None or not config.uses_gsa(layer_index):
        return DenseAttention()
    return GlobalSparseAttention(
        config, num_heads=num_heads, head_dim=dim // num_heads, layer_index=layer_index
    )


def is_gsa_parameter(key: str) -> bool:
    """Whether a state-dict key belongs to a GSA module (may be missing from a dense checkpoint)."""
    return key.endswith(GSA_PARAMETER_SUFFIXES)


def reset_gsa_parameters(model: nn.Module) -> int:
    """Put every GSA module of ``model`` back to its training-free init; returns how many were reset.

    Needed after building a model on the meta device and materialising it with ``to_empty``.
    """
    modules = [m for m in model.modules() if isinstance(m, GlobalSparseAttention)]
    for module in modules:
        module.reset_parameters()
    return len(modules)
