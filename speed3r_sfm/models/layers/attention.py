"""Multi-head self-attention with optional qk-norm and 2D RoPE, and a swappable attention kernel."""

from __future__ import annotations

import torch
from torch import nn

from ...attention import DenseAttention, ViewLayout
from .rope import RopeTable, RotaryPositionEmbedding2D


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
        self,
        x: torch.Tensor,
        positions: torch.Tensor | RopeTable | None = None,
        layout: ViewLayout | None = None,
    ) -> torch.Tensor:
        """x: (B, N, dim); positions: (B, N, 2) integer (y, x) RoPE positions or a :class:`RopeTable`."""
        batch, tokens, dim = x.shape
        out = self.attend(*self.qkv_heads(x, positions), layout)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def qkv_heads(
        self, x: torch.Tensor, positions: torch.Tensor | RopeTable | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (B, heads, N, head_dim) q, k, v that ``attend`` gets: qkv projection, qk-norm, RoPE, q and k
        in v's dtype."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.cast_qk_before_rope:
            q, k = q.to(v.dtype), k.to(v.dtype)
        if self.rope is not None and positions is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        return q.to(v.dtype), k.to(v.dtype), v

    @torch.no_grad()
    def project_qkv(
        self,
        x: torch.Tensor,
        rope_table: RopeTable | None = None,
        out: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(no autograd) ``qkv_heads`` with RoPE from ``rope_table`` (T a multiple of its period; None: no
        RoPE), for tokens x (B, T, dim), in fewer passes over memory.

        q, k, v are (B, heads, T, head_dim) in the attention dtype. Those with a tensor in ``out`` (any
        strides, e.g. a token range of whole-sequence buffers) are written there; the others are returned as
        new tensors (v and, without qk-norm and RoPE, q and k as views of the qkv projection). The rotated
        q/k are rounded once to the attention dtype.
        """
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        rotate = self.rope is not None and rope_table is not None
        q_out, k_out, v_out = out if out is not None else (None, None, None)
        if v_out is not None:
            v = v_out.copy_(v)
        if isinstance(self.q_norm, nn.Identity) and not rotate and q_out is None and k_out is None:
            return q, k, v
        results = []
        for raw, norm, dest in ((q, self.q_norm, q_out), (k, self.k_norm, k_out)):
            if dest is None:
                dest = torch.empty_like(raw, memory_format=torch.contiguous_format)
            normed = norm(raw)
            if self.cast_qk_before_rope:
                normed = normed.to(v.dtype)
            if rotate:
                self.rope.rotate_into(normed, rope_table, dest)
            else:
                dest.copy_(normed)
            results.append(dest)
        return results[0], results[1], v
