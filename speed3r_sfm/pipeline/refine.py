"""Photometric refinement of predicted correspondences: coarse-to-fine NCC search, sub-pixel peak.

For a keypoint ``x`` of a source image, a predicted location ``y`` in a target image and the predicted
local affine map ``A`` (source pixels -> target pixels, from depth and poses), the target is sampled on
the grid ``y + A (s + u)``, i.e. warped into the source frame, and the source patch (u in a P x P grid
around ``x``) is correlated with it over offsets ``s``. The search starts on the coarsest level of a
Gaussian pyramid that makes the search radius at most ``level_radius`` pixels, and each finer level
searches ``fine_radius`` pixels around the doubled previous offset. At level 0 a separable parabola
through the NCC peak gives the sub-pixel offset. Everything is batched over matches with ``grid_sample``
and a grouped convolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d


@dataclass
class RefineOptions:
    """Photometric refinement settings (pixels of the work images unless stated)."""

    patch_size: int = 11  # odd, at every pyramid level
    level_radius: int = 6  # integer search radius on the coarsest level
    fine_radius: int = 2  # search radius on the finer levels
    recentre: int = 0  # finer levels: search again around a peak found on the search border (times)
    min_ncc: float = 0.8  # at level 0
    min_margin: float = 0.02  # coarsest level: best NCC minus the second-highest local maximum
    min_texture: float = 0.01  # minimum std of the (0-1 gray) source patch
    chunk: int = 16384  # matches per batch


def build_pyramid(gray: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[(1, 1, h, w), (1, 1, h/2, w/2), ...]: ``levels + 1`` levels, each blurred (σ = 1) and 2x2-averaged
    from the previous one. Level-l pixel coordinates are ``(x + 0.5) / 2^l - 0.5`` (integer centres)."""
    pyramid = [gray[None, None].float()]
    for _ in range(levels):
        previous = pyramid[-1]
        if min(previous.shape[-2:]) < 8:
            break
        blurred = gaussian_blur2d(previous, (5, 5), (1.0, 1.0), border_type="replicate")
        pyramid.append(F.avg_pool2d(blurred, 2))
    return pyramid


def num_levels(radius: float, level_radius: int) -> int:
    """Pyramid levels needed so that ``radius`` (level-0 pixels) is at most ``level_radius`` on top."""
    return max(0, math.ceil(math.log2(max(radius, 1.0) / level_radius)))


def _warped_grid(
    centre: torch.Tensor,
    affine: torch.Tensor,
    radius: int,
    scale: tuple[float, float] = (1.0, 1.0),
    offset: float = 0.0,
) -> torch.Tensor:
    """(M, n, n, 2) points ``(centre + affine @ v) * scale + offset`` for the integer offsets v of an
    n = 2 radius + 1 grid (float32, row-major over v_y then v_x)."""
    m, n = centre.shape[0], 2 * radius + 1
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    a = affine.float()
    out = torch.empty(m, n, n, 2)
    for k in range(2):
        row = a[:, k] * scale[k]
        base = centre[:, k].float() * scale[k] + offset
        torch.add(
            base[:, None, None] + row[:, 0, None, None] * r[None, None, :],
            row[:, 1, None, None] * r[None, :, None],
            out=out[..., k],
        )
    return out


def _sample_grid(
    image: torch.Tensor, centre: torch.Tensor, affine: torch.Tensor, radius: int
) -> torch.Tensor:
    """Bilinear samples of ``image`` (1, 1, h, w) at ``centre + affine @ v`` for the integer offsets v of a
    (2 radius + 1)^2 grid: (M, 2 radius + 1, 2 radius + 1). Border values repeat outside the image."""
    h, w = image.shape[-2:]
    m, n = centre.shape[0], 2 * radius + 1
    grid = _warped_grid(centre, affine, radius, (2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)), -1.0)
    samples = F.grid_sample(
        image, grid.view(1, m * n, n, 2), mode="bilinear", padding_mode="border", align_corners=True
    )
    return samples.view(m, n, n)


def _inside(image: torch.Tensor, centre: torch.Tensor, affine: torch.Tensor, radius: float) -> torch.Tensor:
    """(M,) whether the parallelograms ``centre + affine @ [-radius, radius]^2`` lie inside ``image``."""
    h, w = image.shape[-2:]
    extent = radius * affine.abs().sum(dim=-1)  # (M, 2) half-extent along x and y
    low, high = centre - extent, centre + extent
    return (low[:, 0] >= 0) & (low[:, 1] >= 0) & (high[:, 0] <= w - 1) & (high[:, 1] <= h - 1)


def _box_sum(x: torch.Tensor, size: int) -> torch.Tensor:
    """Sums of ``x`` (M, n, n) over every size x size box -> (M, n - size + 1, n - size + 1)."""
    c = F.pad(x, (1, 0, 1, 0)).cumsum(1).cumsum(2)
    return c[:, size:, size:] - c[:, :-size, size:] - c[:, size:, :-size] + c[:, :-size, :-size]


def ncc_map(patch: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """NCC of patches (M, P, P) at every placement inside windows (M, P + 2r, P + 2r) -> (M, 2r+1, 2r+1)."""
    m, p, _ = patch.shape
    centred = patch - patch.mean(dim=(1, 2), keepdim=True)
    centred = centred / centred.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
    numerator = F.conv2d(window[None], centred[:, None], groups=m)[0]
    shifted = window - window.mean(dim=(1, 2), keepdim=True)  # better conditioned sums of squares
    total = _box_sum(shifted, p)
    variance = (_box_sum(shifted.square(), p) - total.square() / (p * p)).clamp_min(1e-12)
    return numerator / variance.sqrt()


def _scores(
    image: torch.Tensor,
    patch: torch.Tensor,
    y_l: torch.Tensor,
    centre: torch.Tensor,
    affine: torch.Tensor,
    half: int,
    r: int,
) -> torch.Tensor:
    """NCC (M, 2r+1, 2r+1) of source patches against the target ``image`` warped into the source frame
    around ``y_l + affine @ centre``; placements whose patch leaves the image score -2."""
    y_c = y_l + (centre[:, None, :] * affine).sum(-1)
    window = _sample_grid(image, y_c, affine, half + r)
    scores = ncc_map(patch, window)
    h, w = image.shape[-2:]
    placement = _warped_grid(y_c, affine, r)  # centres of the candidate placements
    px, py = placement[..., 0], placement[..., 1]
    extent = (half * affine.abs().sum(dim=-1)).float()[:, :, None, None]
    inside = (
        (px >= extent[:, 0])
        & (py >= extent[:, 1])
        & (px <= w - 1 - extent[:, 0])
        & (py <= h - 1 - extent[:, 1])
    )
    return torch.where(inside & torch.isfinite(scores), scores, torch.full_like(scores, -2.0))


def _second_peak(scores: torch.Tensor, best_row: torch.Tensor, best_col: torch.Tensor) -> torch.Tensor:
    """(M,) the highest local maximum (3 x 3) of score maps (M, n, n) other than the peak at
    (best_row, best_col) and its 8 neighbours; -2 if there is none."""
    n = scores.shape[-1]
    pooled = F.max_pool2d(scores[:, None], 3, stride=1, padding=1)[:, 0]
    peaks = (scores >= pooled) & (scores > -1.5)
    span = torch.arange(n)
    near = ((span[None, :, None] - best_row[:, None, None]).abs() <= 1) & (
        (span[None, None, :] - best_col[:, None, None]).abs() <= 1
    )
    return torch.where(peaks & ~near, scores, torch.full_like(scores, -2.0)).flatten(1).amax(dim=1)


def _on_border(scores: torch.Tensor) -> torch.Tensor:
    """(M,) whether the maximum of each (M, n, n) score map lies on the map's border."""
    n = scores.shape[-1]
    best = scores.flatten(1).argmax(dim=1)
    row, col = best // n, best % n
    return (row == 0) | (row == n - 1) | (col == 0) | (col == n - 1)


def _parabola_peak(before: torch.Tensor, centre: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    curvature = before - 2 * centre + after
    step = (
        0.5 * (before - after) / torch.where(curvature < -1e-9, curvature, torch.full_like(curvature, -1e9))
    )
    return torch.nan_to_num(step, nan=0.0).clamp(-0.5, 0.5)


# why a match was rejected (``refine_pair``'s reason codes)
REASONS = {
    0: "ok",
    1: "source patch",
    2: "outside target",
    3: "peak on search border",
    4: "ambiguous",
    5: "low NCC",
    6: "moved too far",
}


def refine_pair(
    source: list[torch.Tensor],
    target: list[torch.Tensor],
    x_source: torch.Tensor,
    y_predicted: torch.Tensor,
    affine: torch.Tensor,
    radius: float,
    options: RefineOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Refine matches from one source image to one target image (see the module docstring).

    ``source``/``target``: pyramids of :func:`build_pyramid`; ``x_source``, ``y_predicted``: (M, 2) level-0
    pixels; ``affine``: (M, 2, 2) d(target)/d(source); ``radius``: search radius in source pixels.
    Returns refined target pixels (M, 2) float64, NCC (M,) and a reason code (M,) int64 (0 = accepted,
    see ``REASONS``).
    """
    levels = min(num_levels(radius, options.level_radius), len(source) - 1, len(target) - 1)
    out_xy, out_ncc, out_reason = [], [], []
    for start in range(0, x_source.shape[0], options.chunk):
        part = slice(start, start + options.chunk)
        xy, ncc, reason = _refine_chunk(
            source,
            target,
            x_source[part].double(),
            y_predicted[part].double(),
            affine[part].double(),
            radius,
            levels,
            options,
        )
        out_xy.append(xy)
        out_ncc.append(ncc)
        out_reason.append(reason)
    if not out_xy:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty.view(0, 2), empty.float(), torch.zeros(0, dtype=torch.long)
    return torch.cat(out_xy), torch.cat(out_ncc), torch.cat(out_reason)


def _reject_at(reason: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, code: int) -> None:
    """Set ``reason[index[mask]]`` to ``code`` where not rejected yet."""
    chosen = index[mask]
    reason[chosen[reason[chosen] == 0]] = code


def _refine_chunk(source, target, x, y, affine, radius, levels, options):
    m = x.shape[0]
    half = options.patch_size // 2
    centre = torch.zeros(m, 2, dtype=torch.float64)  # current offset, source pixels of the current level
    reason = torch.zeros(m, dtype=torch.long)
    ncc_best = torch.full((m,), -2.0)
    for level in range(levels, -1, -1):
        act = (reason == 0).nonzero()[:, 0]  # only matches not rejected yet
        if act.numel() == 0:
            break
        factor = 2.0**level
        top = level == levels
        r = (
            min(max(math.ceil(radius / factor), 1), max(options.level_radius, 1))
            if top
            else options.fine_radius
        )
        x_l = (x[act] + 0.5) / factor - 0.5
        y_l = (y[act] + 0.5) / factor - 0.5
        a = affine[act]
        identity = torch.eye(2, dtype=torch.float64).expand(act.numel(), 2, 2)
        patch = _sample_grid(source[level], x_l, identity, half)  # (m', P, P)
        if level == 0:
            texture = patch.flatten(1).std(dim=1) >= options.min_texture
            _reject_at(reason, act, ~(_inside(source[0], x_l, identity, half) & texture), 1)
        c = centre[act]
        scores = _scores(target[level], patch, y_l, c, a, half, r)
        for _ in range(0 if top else options.recentre):
            # a fine-level peak on the search border: move there and search again
            moved = _on_border(scores).nonzero()[:, 0]
            if moved.numel() == 0:
                break
            peak = scores[moved].flatten(1).argmax(dim=1)
            c[moved] += torch.stack([peak % (2 * r + 1) - r, peak // (2 * r + 1) - r], -1).double()
            scores[moved] = _scores(target[level], patch[moved], y_l[moved], c[moved], a[moved], half, r)
        flat = scores.flatten(1)
        best = flat.argmax(dim=1)
        best_row, best_col = best // (2 * r + 1), best % (2 * r + 1)
        ncc = flat.gather(1, best[:, None])[:, 0]
        ncc_best[act] = ncc
        _reject_at(reason, act, ncc <= -1.5, 2)
        _reject_at(reason, act, _on_border(scores), 3)
        if top and options.min_margin > 0 and r >= 2:
            second = _second_peak(scores, best_row, best_col)
            _reject_at(reason, act, ncc - second < options.min_margin, 4)
        step = torch.stack([best_col - r, best_row - r], -1).double()
        if level > 0:
            centre[act] = 2.0 * (c + step)
            continue
        rows = torch.arange(act.numel())
        row_c, col_c = best_row.clamp(1, 2 * r - 1), best_col.clamp(1, 2 * r - 1)
        sub_x = _parabola_peak(
            scores[rows, row_c, col_c - 1], scores[rows, row_c, col_c], scores[rows, row_c, col_c + 1]
        )
        sub_y = _parabola_peak(
            scores[rows, row_c - 1, col_c], scores[rows, row_c, col_c], scores[rows, row_c + 1, col_c]
        )
        centre[act] = c + step + torch.stack([sub_x, sub_y], -1).double()
    refined = y + (centre[:, None, :] * affine).sum(-1)
    everyone = torch.arange(m)
    _reject_at(reason, everyone, ncc_best < options.min_ncc, 5)
    _reject_at(reason, everyone, centre.norm(dim=1) > radius * 1.5 + options.fine_radius, 6)
    return refined, ncc_best, reason
