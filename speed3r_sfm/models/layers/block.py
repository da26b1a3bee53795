"""Pre-norm transformer block with LayerScale, as in DINOv2, VGGT and π³."""

from __future__ import annotations

import torch
from torch import nn

from ...attention import ViewLayout
from .attention import Attention
from .rope import RotaryPositionEmbedding2D


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))). ``init_values=None`` drops LayerScale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = None,
        norm_eps: float = 1e-5,
        qk_norm: bool = False,
        qk_norm_eps: float = 1e-5,
        rope: RotaryPositionEmbedding2D | None = None,
        attend: nn.Module | None = None,
        cast_qk_before_rope: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim, num_heads, qkv_bias, proj_bias, qk_norm, qk_norm_eps, rope, attend, cast_qk_before_rope
        )
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, layout: ViewLayout | None = None
    ) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), positions, layout))
        return x + self.ls2(self.mlp(self.norm2(x)))
