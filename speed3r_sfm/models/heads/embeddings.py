"""Fixed sinusoidal embeddings used by the dense and track heads."""

from __future__ import annotations

import torch


def sincos_embed_1d(positions: torch.Tensor, channels: int, omega_0: float = 100.0) -> torch.Tensor:
    """(M, channels) embedding [sin(p·ω_k), cos(p·ω_k)] with ω_k = omega_0^(−k/(channels/2)), k < channels/2.

    Computed in float64 and returned in float32 (the heads add it to float32 features).
    """
    if channels % 2:
        raise ValueError(f"channels must be even, got {channels}")
    half = channels // 2
    omega = 1.0 / omega_0 ** (torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    angles = positions.reshape(-1, 1).to(torch.float64) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_embed_2d(grid: torch.Tensor, channels: int, omega_0: float = 100.0) -> torch.Tensor:
    """(H, W, channels) embedding of an (H, W, 2) grid of (x, y): x in the first half, y in the second."""
    height, width, _ = grid.shape
    flat = grid.reshape(-1, 2)
    emb_x = sincos_embed_1d(flat[:, 0], channels // 2, omega_0)
    emb_y = sincos_embed_1d(flat[:, 1], channels // 2, omega_0)
    return torch.cat([emb_x, emb_y], dim=-1).reshape(height, width, channels)


def aspect_uv_grid(
    width: int,
    height: int,
    aspect_ratio: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(height, width, 2) MoGe-style view-plane UV grid that keeps the aspect ratio on the unit diagonal.

    The grid spans ±a/√(a²+1) in x and ±1/√(a²+1) in y (a = ``aspect_ratio``), sampled at the centres of
    ``width`` × ``height`` cells, i.e. from −span·(n−1)/n to +span·(n−1)/n.
    """
    diagonal = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diagonal, 1.0 / diagonal
    xs = torch.linspace(
        -span_x * (width - 1) / width, span_x * (width - 1) / width, width, dtype=dtype, device=device
    )
    ys = torch.linspace(
        -span_y * (height - 1) / height, span_y * (height - 1) / height, height, dtype=dtype, device=device
    )
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)


def pixel_sincos_table(
    channels: int,
    height: int,
    width: int,
    omega_0: float = 10000.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(1, channels, height, width) embedding of integer pixel positions: column index in the first half of
    the channels, row index in the second (each half sin then cos), as in MAE/CoTracker."""
    rows = torch.arange(height, dtype=torch.float32, device=device)
    cols = torch.arange(width, dtype=torch.float32, device=device)
    grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
    table = sincos_embed_2d(torch.stack([grid_x, grid_y], dim=-1), channels, omega_0)
    return table.permute(2, 0, 1).unsqueeze(0)
