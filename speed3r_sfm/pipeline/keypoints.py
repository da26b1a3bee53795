"""Keypoints where GSA looks: corners inside the most-selected token blocks of each view.

Per view: the Shi–Tomasi response (kornia's ``gftt_response``, with Sobel gradients by shifted
differences) of the work image, non-maximum suppression, sub-pixel refinement by a quadratic fit of the
response, and a mask of pixels with valid, confident predicted depth. With GSA records the candidates
are grouped by the token block they fall in; the ``block_fraction`` most important blocks
(``block_importance`` averaged over layers) get keypoints, each a quota proportional to its importance,
filled with its strongest corners. Without records (dense attention, or a predictor that exports none)
the same allocation runs over a uniform grid of cells with equal weights: texture + confidence keypoints
over the whole image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d

from .checks import require_at_least, require_between
from .frames import SceneGeometry, work_pixels_per_model_pixel, work_to_model
from .inputs import View
from .records import AttentionSummary


@dataclass
class KeypointOptions:
    """Keypoint detection settings (distances in model pixels unless stated).

    Attributes:
        max_keypoints: keypoints per view; more gives more matches and 3D points, and takes longer to
            match.
        nms_radius: radius (model pixels) of the non-maximum suppression of corners; larger spreads the
            keypoints further apart.
        block_fraction: with GSA records, share (0-1) of each view's token blocks, most attended first,
            that get keypoints.
        grid_cells: without GSA records (dense attention), cells per image side that share the keypoints
            equally.
        confidence_quantile: keypoints and matches use only pixels whose predicted depth confidence is
            above this quantile (0-1) of their view; higher is stricter.
        border: margin (work pixels) at the image border kept free of keypoints.
        min_response: smallest corner (Shi-Tomasi) response of a keypoint, for gray values in 0-1; weaker
            corners are not used (nor those below 1e-3 of the view's strongest, which usually decides).
    """

    max_keypoints: int = 1024  # per view
    nms_radius: float = 3.0
    block_fraction: float = 0.5  # GSA: share of each view's blocks (most important first) given keypoints
    grid_cells: int = 8  # dense fallback: cells per image side
    # keep pixels whose depth confidence is above this quantile of the view (keypoints and matches). 0.05
    # rather than 0.2: more matches where views overlap weakly (hinge_forward1000001.md)
    confidence_quantile: float = 0.05
    border: int = 8  # work pixels kept free at the image border
    min_response: float = 1e-6

    def __post_init__(self) -> None:
        require_at_least(self, max_keypoints=1, nms_radius=0.0, grid_cells=1, border=0, min_response=0.0)
        require_between(self, block_fraction=(0.0, 1.0), confidence_quantile=(0.0, 1.0))


@dataclass
class Keypoints:
    """Keypoints of one view in work pixels (integer centres)."""

    xy: torch.Tensor  # (N, 2) float64
    score: torch.Tensor  # (N,) float32 corner response
    region: torch.Tensor  # (N,) int64: GSA block within the view, or grid cell for the fallback


def confidence_thresholds(geometry: SceneGeometry, quantile: float) -> torch.Tensor:
    """(S,) per-view threshold: the ``quantile`` of each confidence map (subsampled)."""
    flat = geometry.confidence.flatten(1)
    step = max(1, flat.shape[1] // 65536)
    return torch.quantile(flat[:, ::step], quantile, dim=1)


def window_max(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Maximum of ``x`` over the window [i - radius, i + radius] along ``dim`` (outside counts as -inf), as
    ``max_pool`` with stride 1 and padding ``radius`` computes it, by doubling spans: O(log radius) passes."""
    size = 2 * radius + 1
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [radius, radius]
    spans = F.pad(x, pad, value=-math.inf)  # spans[i]: max over [i, i + span) of the padded x
    span = 1
    while 2 * span <= size:
        length = spans.shape[dim] - span
        spans = torch.maximum(spans.narrow(dim, 0, length), spans.narrow(dim, span, length))
        span *= 2
    length = x.shape[dim]
    return torch.maximum(spans.narrow(dim, 0, length), spans.narrow(dim, size - span, length))


def sobel_gradients(image: torch.Tensor) -> torch.Tensor:
    """(B, C, 2, H, W) normalised Sobel derivatives d/dx, d/dy of ``image`` (B, C, H, W), replicate
    border: kornia's ``spatial_gradient(image, "sobel")`` by shifted differences (oneDNN's convolution
    with this 3 x 3, one-channel kernel is several times slower)."""
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    across = padded[..., :, 2:] - padded[..., :, :-2]  # (.., H + 2, W)
    down = padded[..., 2:, :] - padded[..., :-2, :]  # (.., H, W + 2)
    dx = (across[..., :-2, :] + 2 * across[..., 1:-1, :] + across[..., 2:, :]) / 8
    dy = (down[..., :, :-2] + 2 * down[..., :, 1:-1] + down[..., :, 2:]) / 8
    return torch.stack([dx, dy], dim=2)


def shi_tomasi_response(image: torch.Tensor) -> torch.Tensor:
    """kornia's ``gftt_response`` (the smaller eigenvalue of the structure tensor, Sobel gradients, 7 x 7
    Gaussian window of σ = 1) of ``image`` (B, C, H, W), with :func:`sobel_gradients`."""
    gradients = sobel_gradients(image)
    dx, dy = gradients[:, :, 0], gradients[:, :, 1]
    dx2 = gaussian_blur2d(dx**2, (7, 7), (1.0, 1.0))
    dy2 = gaussian_blur2d(dy**2, (7, 7), (1.0, 1.0))
    dxy = gaussian_blur2d(dx * dy, (7, 7), (1.0, 1.0))
    disc = (dx2 - dy2) ** 2 + 4.0 * dxy * dxy
    positive = disc > 0
    root = torch.where(positive, torch.where(positive, disc, torch.ones_like(disc)).sqrt(), 0.0)
    return 0.5 * (dx2 + dy2 - root)


def corner_candidates(gray: torch.Tensor, nms_radius: int, border: int, min_response: float):
    """Local maxima of the Shi–Tomasi response of ``gray`` (h, w): sub-pixel (N, 2) xy and (N,) response."""
    response = shi_tomasi_response(gray[None, None].float())[0, 0]
    pooled = window_max(window_max(response, nms_radius, 0), nms_radius, 1)  # square max, separably
    floor = max(min_response, 1e-3 * float(response.max()))
    peak = (response == pooled) & (response > floor)
    h, w = gray.shape
    peak[: max(border, 1)] = False
    peak[h - max(border, 1) :] = False
    peak[:, : max(border, 1)] = False
    peak[:, w - max(border, 1) :] = False
    rows, cols = peak.nonzero(as_tuple=True)
    centre = response[rows, cols]
    offsets = []
    for d_row, d_col, pos in ((0, 1, cols), (1, 0, rows)):
        before = response[rows - d_row, cols - d_col]
        after = response[rows + d_row, cols + d_col]
        curvature = before - 2 * centre + after
        step = torch.where(curvature < 0, 0.5 * (before - after) / curvature.clamp_max(-1e-12), 0.0)
        offsets.append(pos.double() + step.clamp(-0.5, 0.5).double())
    return torch.stack(offsets, -1), centre


def detect_keypoints(
    view: View,
    gray: torch.Tensor,
    view_index: int,
    geometry: SceneGeometry,
    summary: AttentionSummary | None,
    options: KeypointOptions,
    confidence_threshold: float,
) -> Keypoints:
    """Keypoints of one view (see the module docstring); ``gray`` is its work image (``view.gray()``)."""
    scale = max(work_pixels_per_model_pixel(view))
    nms = max(1, round(options.nms_radius * scale))
    xy, response = corner_candidates(gray, nms, options.border, options.min_response)
    model_xy = work_to_model(view, xy)
    depth = geometry.sample(geometry.depth, view_index, model_xy)
    confidence = geometry.sample(geometry.confidence, view_index, model_xy)
    keep = torch.isfinite(depth) & (depth > 0) & (confidence >= confidence_threshold)
    xy, response, model_xy = xy[keep], response[keep], model_xy[keep]
    if summary is not None:
        patch = summary.patch_of_model_xy(model_xy, geometry.image_size)
        inside = patch >= 0
        xy, response, patch = xy[inside], response[inside], patch[inside]
        region = summary.block_of_patch(patch)
        weights = summary.importance[view_index].clone()
        num_chosen = max(1, round(options.block_fraction * weights.numel()))
        chosen = torch.zeros_like(weights, dtype=torch.bool)
        chosen[torch.argsort(weights, descending=True)[:num_chosen]] = True
        weights = torch.where(chosen, weights, torch.zeros_like(weights))
    else:
        w, h = view.work_size
        cells = options.grid_cells
        col = (xy[:, 0] * cells / w).long().clamp(0, cells - 1)
        row = (xy[:, 1] * cells / h).long().clamp(0, cells - 1)
        region = row * cells + col
        weights = torch.ones(cells * cells)
    selected = allocate(region, response, weights, options.max_keypoints)
    return Keypoints(xy[selected], response[selected].float(), region[selected])


def allocate(region: torch.Tensor, score: torch.Tensor, weights: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the candidates to keep: region r gets ``ceil(budget * w_r / sum w)`` of its best-scoring
    candidates (regions with weight 0 none); the result is capped at ``budget`` by score."""
    if region.numel() == 0 or float(weights.sum()) <= 0:
        return torch.zeros(0, dtype=torch.long)
    quota = torch.ceil(budget * weights / weights.sum()).long()
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(region[order], stable=True)]  # by region, best first inside each
    sorted_region = region[order]
    first = torch.searchsorted(sorted_region, sorted_region, right=False)
    rank = torch.arange(order.numel()) - first
    keep = order[rank < quota[sorted_region]]
    if keep.numel() > budget:
        keep = keep[torch.argsort(score[keep], descending=True)[:budget]]
    return keep.sort().values
