"""π³ heads: per-view transformer decoders, pixel-shuffle point/confidence heads and the camera head."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...attention import ViewLayout
from ..layers.block import Block
from ..layers.rope import RopeTable, RotaryPositionEmbedding2D


def run_block(
    block: nn.Module,
    x: torch.Tensor,
    positions: torch.Tensor | None,
    layout: ViewLayout | None = None,
    checkpointing: bool = False,
    rope_table: RopeTable | None = None,
) -> torch.Tensor:
    """``block(x, positions, layout, rope_table=rope_table)``, optionally with non-reentrant activation
    checkpointing.

    Under checkpointing the block runs again during backward; attention records are only collected on the
    first (forward) run so that they are not duplicated.
    """
    if not (checkpointing and torch.is_grad_enabled()):
        return block(x, positions, layout, rope_table=rope_table)
    calls = 0

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 1 and layout is not None and layout.records is not None:
            return block(tokens, positions, dataclasses.replace(layout, records=None), rope_table=rope_table)
        return block(tokens, positions, layout, rope_table=rope_table)

    return checkpoint(forward, x, use_reentrant=False)


class TransformerDecoder(nn.Module):
    """Linear projection, RoPE blocks without LayerScale or qk-norm, linear output; applied per view."""

    def __init__(
        self,
        in_dim: int,
        embed_dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        rope: RotaryPositionEmbedding2D,
    ) -> None:
        super().__init__()
        self.projects = nn.Linear(in_dim, embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, init_values=None, norm_eps=1e-6, rope=rope)
            for _ in range(depth)
        )
        self.linear_out = nn.Linear(embed_dim, out_dim)
        self.gradient_checkpointing = False

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, rope_table: RopeTable | None = None
    ) -> torch.Tensor:
        """tokens: (views, T, in_dim); positions: (views, T, 2), optionally also as the RoPE table of one
        view's positions. Returns (views, T, out_dim). Without autograd the blocks run in place."""
        x = self.projects(tokens)
        inplace = not torch.is_grad_enabled() and rope_table is not None
        checkpointing = self.gradient_checkpointing and self.training
        for block in self.blocks:
            if inplace:
                block(x, positions, rope_table=rope_table, inplace=True)
            else:
                x = run_block(block, x, positions, checkpointing=checkpointing, rope_table=rope_table)
        return self.linear_out(x)


class LinearPts3d(nn.Module):
    """One linear layer per patch token to a patch × patch × channels tile, assembled by pixel shuffle."""

    def __init__(self, patch_size: int, dim: int, out_channels: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(dim, out_channels * patch_size**2)

    def forward(self, patch_tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """patch_tokens: (views, rows*cols, dim) → channels-last (views, rows*p, cols*p, out_channels)."""
        views = patch_tokens.shape[0]
        tiles = self.proj(patch_tokens).transpose(1, 2).reshape(views, -1, rows, cols)
        return F.pixel_shuffle(tiles, self.patch_size).permute(0, 2, 3, 1)


class ResConvBlock(nn.Module):
    """x + relu(L3(relu(L2(relu(L1(x)))))): three per-token linear layers with an identity skip."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.res_conv1 = nn.Linear(dim, dim)
        self.res_conv2 = nn.Linear(dim, dim)
        self.res_conv3 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.res_conv1(x))
        y = F.relu(self.res_conv2(y))
        return x + F.relu(self.res_conv3(y))


def svd_orthogonalize(m: torch.Tensor) -> torch.Tensor:
    """(..., 9) → (..., 3, 3) rotations: the closest rotation to the 3×3 matrix with L2-normalised rows.

    With M = U S Vᵀ, R = U diag(1, 1, det(U Vᵀ)) Vᵀ, so det(R) = +1 even when M is a reflection.
    """
    rows = F.normalize(m.reshape(*m.shape[:-1], 3, 3), p=2, dim=-1)
    compute = torch.promote_types(rows.dtype, torch.float32)  # no SVD in half precision
    u, _, vh = torch.linalg.svd(rows.to(compute))
    det = torch.det(u @ vh)
    flip = torch.ones_like(u[..., 0, :])
    flip = torch.cat([flip[..., :2], det.unsqueeze(-1)], dim=-1)
    return ((u * flip.unsqueeze(-2)) @ vh).to(m.dtype)


class CameraHead(nn.Module):
    """Pose per view from its patch tokens: residual MLPs, average pooling, MLPs, translation and rotation.

    Returns (views, 4, 4) camera-to-world matrices (OpenCV). The model runs it in float32 with autocast off.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.res_conv = nn.ModuleList(ResConvBlock(dim) for _ in range(2))
        self.more_mlps = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.fc_t = nn.Linear(dim, 3)
        self.fc_rot = nn.Linear(dim, 9)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        x = patch_tokens
        for block in self.res_conv:
            x = block(x)
        x = self.more_mlps(x.mean(dim=1))  # average pooling over the patch grid
        rotation = svd_orthogonalize(self.fc_rot(x))
        translation = self.fc_t(x)
        pose = torch.zeros(x.shape[0], 4, 4, device=x.device, dtype=translation.dtype)
        pose[:, :3, :3] = rotation
        pose[:, :3, 3] = translation
        pose[:, 3, 3] = 1.0
        return pose
