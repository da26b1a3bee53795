"""Multi-head self-attention with optional qk-norm and 2D RoPE, and a swappable attention kernel."""

from __future__ import annotations

import torch
from torch import nn

from ...attention import DenseAttention, ViewLayout
from .rope import RotaryPositionEmbedding2D


class Attention(nn.Module):
    """Fused-qkv attention. ``attend`` computes softmax attention from (q, k, v) and may be sparse (GSA)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        qk_norm_eps: float = 1e-5,
        rope: RotaryPositionEmbedding2D | None = None,
        attend: nn.Module | None = None,
        cast_qk_before_rope: bool = True,
    ) -> None:
        """``cast_qk_before_rope``: cast the normed q/k to v's dtype before RoPE (π³) or after it (VGGT).

        Under autocast the qk-norm output is float32; VGGT rotates it in float32, π³ in the autocast dtype.
        """
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=qk_norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=qk_norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope
        self.attend = attend if attend is not None else DenseAttention()
        self.cast_qk_before_rope = cast_qk_before_rope

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, layout: ViewLayout | None = None
    ) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.cast_qk_before_rope:
            q, k = q.to(v.dtype), k.to(v.dtype)
        if self.rope is not None and positions is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        q, k = q.to(v.dtype), k.to(v.dtype)
        out = self.attend(q, k, v, layout)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
