"""DINOv2 ViT with register tokens (the image encoder of VGGT and π³), returning normalised patch tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .block import Block


@dataclass
class DinoConfig:
    """ViT-L/14-reg is the official encoder: 1024 wide, 24 blocks, 16 heads, 4 registers, 518 px grid."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    init_values: float = 1.0
    with_mask_token: bool = True


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoVisionTransformer(nn.Module):
    """Tokens [cls, registers, patches]; absolute position embedding resized bicubically (antialiased)."""

    def __init__(self, config: DinoConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_size = config.patch_size
        self.num_register_tokens = config.num_register_tokens
        grid = config.img_size // config.patch_size
        self.patch_embed = PatchEmbed(config.patch_size, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, dim))
        if config.with_mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, init_values=config.init_values, norm_eps=1e-6)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)

    def interpolated_pos_embed(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """(1, 1 + rows*cols, dim): the cls embedding and the patch grid resized to rows × cols."""
        num_stored = self.pos_embed.shape[1] - 1
        side = int(math.sqrt(num_stored))
        if rows == side and cols == side:
            return self.pos_embed.to(dtype)
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=True)
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W), normalised. Returns (N, (H/p)·(W/p), dim) patch tokens after the norm."""
        n, _, height, width = images.shape
        rows, cols = height // self.patch_size, width // self.patch_size
        # The residual stream stays in the parameter dtype under autocast (float32 for float32 weights), as
        # upstream where concatenating the float32 cls token promotes the bf16 patch embedding.
        x = self.patch_embed(images).to(self.cls_token.dtype)
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
        x = x + self.interpolated_pos_embed(rows, cols, x.dtype)
        x = torch.cat([x[:, :1], self.register_tokens.expand(n, -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        inplace = not torch.is_grad_enabled()  # x is this call's own tensor: update it in place
        for block in self.blocks:
            x = block(x, inplace=inplace)
        x = self.norm(x)
        return x[:, 1 + self.num_register_tokens :]
