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


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (..., N, head_dim) of the angles of (..., N, 2) integer (y, x) positions.

    Channels [0, head_dim/2) carry y and the rest x; within each half of width d, channels i and i + d/2
    share the angle pos · base^(−2i/d). The angles are computed in float32 and rounded to ``dtype`` before
    cos/sin, as both upstreams do (a no-op in float32; under bf16 it is part of what the released weights
    were trained with).
    """
    half = head_dim // 2
    inv_freq = 1.0 / base ** (torch.arange(0, half, 2, device=positions.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., N, 2, half/2)
    angles = torch.cat([angles, angles], dim=-1).flatten(-2).to(dtype)  # (..., N, head_dim)
    return angles.cos(), angles.sin()


def _quarters(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (..., 2, d/4) of the first and second quarter of each axis half of the last dimension."""
    first, second = x.unflatten(-1, (2, 2, -1)).unbind(-2)
    return first, second


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Rotate-half within each axis half: (x1, x2) → (−x2, x1)."""
    first, second = _quarters(x)
    return torch.stack([-second, first], dim=-2).flatten(-3)


class RopeTable:
    """cos/sin of the positions of one view, computed once per dtype and shared by every block of a pass.

    ``positions``: (P, 2) integer (y, x) positions of the P tokens of one view. A sequence of k·P tokens
    (k views one after another, as in global attention) repeats them.
    """

    def __init__(self, positions: torch.Tensor, base: float) -> None:
        if positions.dim() != 2 or positions.shape[-1] != 2:
            raise ValueError(f"RopeTable takes (P, 2) positions of one view, got {tuple(positions.shape)}")
        self.positions = positions
        self.base = base
        self._cache: dict[tuple[torch.dtype, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def period(self) -> int:
        return self.positions.shape[0]

    def cos_sin(self, dtype: torch.dtype, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, head_dim) cos and sin in ``dtype``."""
        key = (dtype, head_dim)
        if key not in self._cache:
            self._cache[key] = rope_cos_sin(self.positions, head_dim, self.base, dtype)
        return self._cache[key]


class RotaryPositionEmbedding2D(nn.Module):
    """Rotates the first half of each head's channels by the y position and the second half by x.

    Within each half of d channels, angle_i = pos · base^(-2i/d) for i < d/2, duplicated as cat(θ, θ), and
    channels are rotated with the rotate-half convention (x1, x2) → (x1 cos − x2 sin, x2 cos + x1 sin).
    Stateless: it has no parameters or buffers, so it never appears in a state_dict.
    """

    def __init__(self, base: float = 100.0) -> None:
        super().__init__()
        self.base = base

    def table(self, positions: torch.Tensor) -> RopeTable:
        """A :class:`RopeTable` of one view's (P, 2) positions, to pass instead of per-call positions."""
        return RopeTable(positions, self.base)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | RopeTable) -> torch.Tensor:
        """x: (B, heads, N, head_dim); positions: (B, N, 2) integer (y, x), or a :class:`RopeTable` of one
        view's positions (N a multiple of its period)."""
        if isinstance(positions, RopeTable):
            cos, sin = positions.cos_sin(x.dtype, x.shape[-1])
            views = x.unflatten(-2, (-1, positions.period))  # (B, heads, k, P, head_dim)
            return (views * cos + rotate_pairs(views) * sin).flatten(-3, -2)
        cos, sin = rope_cos_sin(positions, x.shape[-1], self.base, x.dtype)
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # (B, 1, N, head_dim)
        return x * cos + rotate_pairs(x) * sin

    @torch.no_grad()
    def rotate_into(self, x: torch.Tensor, table: RopeTable, out: torch.Tensor) -> torch.Tensor:
        """``forward(x, table)`` written into ``out`` (same shape, any strides, its own dtype) without
        materialising the rotated copy of x, for inference. Computed in x's dtype and rounded once to out's.
        """
        cos, sin = table.cos_sin(x.dtype, x.shape[-1])
        views = x.unflatten(-2, (-1, table.period))  # (B, heads, k, P, head_dim)
        scaled = views * cos
        (x1, x2), (s1, s2) = _quarters(views), _quarters(sin)
        (c1, c2), (o1, o2) = _quarters(scaled), _quarters(out.unflatten(-2, (-1, table.period)))
        torch.addcmul(c1, x2, s1, value=-1, out=o1)  # x1 cos − x2 sin
        torch.addcmul(c2, x1, s2, out=o2)  # x2 cos + x1 sin
        return out
