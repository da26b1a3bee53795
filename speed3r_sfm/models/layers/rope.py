"""2D rotary position embedding (RoPE) as used by VGGT and π³ (base 100, y/x halves, rotate-half)."""

from __future__ import annotations

import torch
from torch import nn


def patch_positions(
    batch: int, rows: int, cols: int, num_special: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(batch, num_special + rows*cols, 2) integer (y, x) positions.

    Patch (i, j) gets (i + 1, j + 1) in row-major order; special tokens get (0, 0).
    """
    ys, xs = torch.meshgrid(
        torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij"
    )
    grid = torch.stack([ys, xs], dim=-1).reshape(-1, 2) + 1
    special = torch.zeros(num_special, 2, dtype=grid.dtype, device=device)
    return torch.cat([special, grid], dim=0).unsqueeze(0).expand(batch, -1, -1)


class RotaryPositionEmbedding2D(nn.Module):
    """Rotates the first half of each head's channels by the y position and the second half by x.

    Within each half of d channels, angle_i = pos · base^(-2i/d) for i < d/2, duplicated as cat(θ, θ), and
    channels are rotated with the rotate-half convention (x1, x2) → (x1 cos − x2 sin, x2 cos + x1 sin).
    Stateless: it has no parameters or buffers, so it never appears in a state_dict.
    """

    def __init__(self, base: float = 100.0) -> None:
        super().__init__()
        self.base = base

    def _rotate_1d(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        dim = x.shape[-1]
        inv_freq = 1.0 / self.base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
        angles = pos.to(torch.float32).unsqueeze(-1) * inv_freq  # (B, N, dim/2)
        # Both upstreams round the angles to the token dtype before cos/sin (a no-op in float32); under bf16
        # autocast this rounding is part of what the released weights were trained with.
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1).to(x.dtype)  # (B, 1, N, dim)
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return x * cos + rotated * sin

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, heads, N, head_dim); positions: (B, N, 2) integer (y, x)."""
        y_half, x_half = x.chunk(2, dim=-1)
        return torch.cat(
            [self._rotate_1d(y_half, positions[..., 0]), self._rotate_1d(x_half, positions[..., 1])], dim=-1
        )
