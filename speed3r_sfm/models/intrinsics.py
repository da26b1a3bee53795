"""Pinhole intrinsics recovered from camera-frame point maps, for backbones that predict none (π³).

Pixel convention (the one of ``Prediction.intrinsics``): pixel (u, v) = (column, row) has its centre at
integer coordinates (u, v), so the pixels of a W × H image span u ∈ [0, W−1], v ∈ [0, H−1] and the image
centre is ((W − 1)/2, (H − 1)/2). A camera-frame point (x, y, z) is seen at u = fx·x/z + cx, v = fy·y/z + cy.
(COLMAP puts pixel centres at integer + 0.5: add 0.5 to cx and cy when exporting.)
"""

from __future__ import annotations

import torch


def image_center(height: int, width: int) -> tuple[float, float]:
    """(cx, cy) of the image centre in the integer-pixel-centre convention."""
    return (width - 1) / 2, (height - 1) / 2


def pixel_grid(
    height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(H, W, 2) pixel coordinates (u, v) = (column, row) of every pixel centre."""
    v, u = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype),
        torch.arange(width, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1)


def _fit_line(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, offset: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares y ≈ slope·x + offset over the last dimension (offset fixed when given).

    The free fit uses weighted-centred sums, which stay accurate in float32. A fit without enough
    weighted, non-constant samples gives NaN.
    """
    if offset is None:
        total = w.sum(-1, keepdim=True)
        x_mean = (w * x).sum(-1, keepdim=True) / total
        y_mean = (w * y).sum(-1, keepdim=True) / total
        dx = x - x_mean
        numerator = (w * dx * (y - y_mean)).sum(-1)
        denominator = (w * dx * dx).sum(-1)
        slope = numerator / denominator
        slope = torch.where(denominator > 0, slope, torch.full_like(slope, float("nan")))
        return slope, y_mean.squeeze(-1) - slope * x_mean.squeeze(-1)
    numerator = (w * x * (y - offset)).sum(-1)
    denominator = (w * x * x).sum(-1)
    slope = numerator / denominator
    slope = torch.where(denominator > 0, slope, torch.full_like(slope, float("nan")))
    return slope, torch.full_like(slope, offset)


def intrinsics_from_local_points(
    local_points: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    fix_principal_point: bool = False,
    min_depth: float = 1e-6,
) -> torch.Tensor:
    """Pinhole K (..., 3, 3) fitted to a camera-frame point map (..., H, W, 3) by weighted least squares.

    Solves u ≈ fx·(x/z) + cx and v ≈ fy·(y/z) + cy independently over all pixels, each pixel weighted by
    ``weights`` (..., H, W) (e.g. a confidence; default 1). Pixels with z ≤ ``min_depth`` or non-finite
    points get weight 0. With ``fix_principal_point`` only fx and fy are fitted and (cx, cy) is the image
    centre. Computed in float32 (float64 for float64 input); views without a usable fit get NaN entries.
    """
    if local_points.shape[-1] != 3 or local_points.dim() < 3:
        raise ValueError(f"local_points must be (..., H, W, 3), got {tuple(local_points.shape)}")
    height, width = local_points.shape[-3:-1]
    dtype = torch.promote_types(local_points.dtype, torch.float32)
    points = local_points.to(dtype)
    z = points[..., 2]
    valid = (z > min_depth) & torch.isfinite(points).all(dim=-1)
    w = torch.ones_like(z) if weights is None else weights.to(dtype).clamp(min=0).expand_as(z)
    w = torch.where(valid, w, torch.zeros_like(w))
    safe_z = torch.where(valid, z, torch.ones_like(z))
    x_over_z = torch.where(valid, points[..., 0] / safe_z, torch.zeros_like(z)).flatten(-2)
    y_over_z = torch.where(valid, points[..., 1] / safe_z, torch.zeros_like(z)).flatten(-2)
    w = w.flatten(-2)
    grid = pixel_grid(height, width, device=points.device, dtype=dtype).reshape(-1, 2)
    center = image_center(height, width) if fix_principal_point else (None, None)
    fx, cx = _fit_line(x_over_z, grid[:, 0], w, center[0])
    fy, cy = _fit_line(y_over_z, grid[:, 1], w, center[1])
    intrinsics = torch.zeros(*fx.shape, 3, 3, device=points.device, dtype=dtype)
    intrinsics[..., 0, 0] = fx
    intrinsics[..., 0, 2] = cx
    intrinsics[..., 1, 1] = fy
    intrinsics[..., 1, 2] = cy
    intrinsics[..., 2, 2] = 1.0
    return intrinsics
