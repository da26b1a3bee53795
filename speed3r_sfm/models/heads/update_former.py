"""EfficientUpdateFormer (CoTracker2): alternating attention over time and, through virtual tracks, space.

Tokens are (B, N tracks, T frames, C). Time blocks attend along T for every track; space attention is
factorised through ``num_virtual_tracks`` learned tokens: virtual ← points (cross), virtual ↔ virtual
(self), points ← virtual (cross). Module names follow the VGGT checkpoint, including the misspelled
``virual_tracks`` parameter and the ``nn.MultiheadAttention`` key layout (``in_proj_weight``, ``out_proj``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.block import Mlp


class AttnBlock(nn.Module):
    """Self-attention block. The residual is taken *after* ``norm1`` (upstream's layout, kept because the
    released weights depend on it): x ← norm1(x); x ← x + attn(x); x ← x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """Cross-attention block, residual after ``norm1`` as in :class:`AttnBlock`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        context = self.norm_context(context)
        x = x + self.cross_attn(x, context, context, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class EfficientUpdateFormer(nn.Module):
    """Maps (B, N, T, input_dim) track tokens to (B, N, T, output_dim) updates."""

    def __init__(
        self,
        input_dim: int,
        hidden_size: int = 384,
        output_dim: int = 130,
        time_depth: int = 6,
        space_depth: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        num_virtual_tracks: int = 64,
    ) -> None:
        super().__init__()
        if space_depth < 1 or time_depth % space_depth:
            raise ValueError(f"time_depth ({time_depth}) must be a multiple of space_depth ({space_depth})")
        self.num_virtual_tracks = num_virtual_tracks
        self.space_every = time_depth // space_depth
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.flow_head = nn.Linear(hidden_size, output_dim)
        self.virual_tracks = nn.Parameter(torch.randn(1, num_virtual_tracks, 1, hidden_size))
        self.time_blocks = nn.ModuleList(
            AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(time_depth)
        )
        self.space_virtual_blocks = nn.ModuleList(
            AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)
        )
        self.space_point2virtual_blocks = nn.ModuleList(
            CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)
        )
        self.space_virtual2point_blocks = nn.ModuleList(
            CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.flow_head.weight, std=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.input_transform(self.input_norm(x))
        initial = tokens
        batch, num_points, frames, dim = tokens.shape
        virtual = self.virual_tracks.expand(batch, -1, frames, -1).to(tokens.dtype)
        tokens = torch.cat([tokens, virtual], dim=1)
        num_all = tokens.shape[1]
        for i, time_block in enumerate(self.time_blocks):
            tokens = time_block(tokens.reshape(batch * num_all, frames, dim)).reshape(
                batch, num_all, frames, dim
            )
            if i % self.space_every:
                continue
            j = i // self.space_every
            space = tokens.permute(0, 2, 1, 3).reshape(batch * frames, num_all, dim)
            points, virtual = space[:, :num_points], space[:, num_points:]
            virtual = self.space_virtual2point_blocks[j](virtual, points)
            virtual = self.space_virtual_blocks[j](virtual)
            points = self.space_point2virtual_blocks[j](points, virtual)
            space = torch.cat([points, virtual], dim=1)
            tokens = space.reshape(batch, frames, num_all, dim).permute(0, 2, 1, 3)
        tokens = tokens[:, :num_points] + initial
        return self.flow_head(self.output_norm(tokens))
