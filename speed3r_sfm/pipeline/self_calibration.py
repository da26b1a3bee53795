"""The cameras' focal length from the matches, before bundle adjustment (self-calibration).

Bundle adjustment's first round holds the intrinsics fixed at the model's (``bundle.py``), and the model's
focal length can be several percent off (4.6 % low on the hard held-out orbit, where 2 of 4 depth-noise runs
then lost 3 views; up to 14 % on others). The matches say more: for a view pair's fundamental matrix F
(``x_b^T F x_a = 0``) and the right calibrations, ``E = K_b^T F K_a`` is an essential matrix, whose two
non-zero singular values are equal (Mendonça & Cipolla 1999). Every camera's focal length is scaled by one
common factor ``s``, the one that minimises the inlier-weighted mean of ``(σ1 - σ2) / (σ1 + σ2)`` over the
view pairs with the most matches: a global search on a log grid, refined by a parabola through the best
three grid points. pycolmap estimates each F (LO-RANSAC, fixed seed: the same matches give the same focal).

Motion without rotation leaves the cost flat (any focal length makes a pure translation's F an essential
matrix): the estimate is kept only where the minimum is distinct (``min_contrast``) and inside the searched
range; else the model's focal length stays.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pycolmap


@dataclass
class SelfCalibrationOptions:
    """Self-calibration settings (pixels are original pixels at full-resolution work copies, scaled by
    original / work size otherwise)."""

    enabled: bool = True
    min_matches: int = 30  # matches (and F inliers) a view pair needs
    max_pairs: int = 40  # the view pairs with the most matches
    max_error: float = 1.0  # RANSAC threshold of F (Sampson distance)
    ransac_trials: int = 100  # at most; the matches are verified already, inlier ratios are high
    min_pairs: int = 8
    scale_range: tuple[float, float] = (0.25, 4.0)  # focal-length factors searched
    grid_size: int = 321  # log-spaced factors over scale_range (0.87 % apart by default)
    # the cost at 10 % from the minimum must exceed the minimum by this factor of it
    min_contrast: float = 0.25


@dataclass
class FocalEstimate:
    """The common focal-length factor the matches support, and why it is (not) used."""

    scale: float  # nan if not estimated
    used: bool
    why: str
    pairs: int
    cost_at_scale: float = math.nan
    cost_at_model: float = math.nan
    contrast: float = math.nan

    def as_dict(self) -> dict:
        return asdict(self)


def fundamental_matrices(
    points2d: list[np.ndarray],
    pair_matches: dict[tuple[int, int], np.ndarray],
    options: SelfCalibrationOptions,
    pixel_scale: float = 1.0,
) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """(view pairs, F (P, 3, 3) with ``x_b^T F x_a = 0``, inlier counts (P,)) of the ``max_pairs`` pairs
    (a, b) with the most matches, in the pixels of ``points2d``; ``pair_matches`` as
    :meth:`~.tracks.Tracks.pairwise_matches` (rows of point indices into view a and view b)."""
    ransac = pycolmap.RANSACOptions()
    ransac.max_error = options.max_error * pixel_scale
    ransac.max_num_trials = options.ransac_trials
    ransac.min_num_trials = min(ransac.min_num_trials, options.ransac_trials)
    ransac.random_seed = 0
    ransac.num_threads = 1
    ranked = sorted(
        ((pair, m) for pair, m in pair_matches.items() if len(m) >= options.min_matches),
        key=lambda item: (-len(item[1]), item[0]),
    )[: options.max_pairs]
    pairs, fs, inliers = [], [], []
    for (a, b), m in ranked:
        found = pycolmap.estimate_fundamental_matrix(
            np.asarray(points2d[a][m[:, 0]], dtype=np.float64),
            np.asarray(points2d[b][m[:, 1]], dtype=np.float64),
            ransac,
        )
        if found is None or found["num_inliers"] < options.min_matches:
            continue
        pairs.append((a, b))
        fs.append(found["F"])
        inliers.append(found["num_inliers"])
    return pairs, np.asarray(fs, dtype=np.float64).reshape(-1, 3, 3), np.asarray(inliers, dtype=np.float64)


def essential_cost(
    fundamentals: np.ndarray,
    weights: np.ndarray,
    k_first: np.ndarray,
    k_second: np.ndarray,
    scales: np.ndarray,
) -> np.ndarray:
    """(G,) weighted mean over pairs of ``(σ1 - σ2) / (σ1 + σ2)`` of ``E = K_b(s)^T F K_a(s)``, for focal
    factors ``scales`` (G,); ``k_first`` / ``k_second`` (P, 3, 3): the pairs' calibrations at factor 1."""
    focal_scale = np.ones((scales.size, 3, 3))
    focal_scale[:, :2, :2] = scales[:, None, None]  # K(s) = K with fx, fy (and skew) times s
    ka = k_first[:, None] * focal_scale[None]  # (P, G, 3, 3)
    kb = k_second[:, None] * focal_scale[None]
    essential = np.swapaxes(kb, -1, -2) @ fundamentals[:, None] @ ka
    singular = np.linalg.svd(essential, compute_uv=False)  # (P, G, 3), descending
    ratio = (singular[..., 0] - singular[..., 1]) / (singular[..., 0] + singular[..., 1])
    return (weights[:, None] * ratio).sum(axis=0) / weights.sum()


def estimate_focal_scale(
    rec: pycolmap.Reconstruction,
    points2d: list[np.ndarray],
    pair_matches: dict[tuple[int, int], np.ndarray],
    options: SelfCalibrationOptions,
    pixel_scale: float = 1.0,
) -> FocalEstimate:
    """The common factor of every camera's focal length that the matches' fundamental matrices support
    (module docstring); image id = view index + 1, as :func:`~.colmap_model.build_reconstruction`."""
    pairs, fundamentals, weights = fundamental_matrices(points2d, pair_matches, options, pixel_scale)
    if len(pairs) < options.min_pairs:
        why = f"{len(pairs)} view pairs with {options.min_matches}+ matches (needs {options.min_pairs})"
        return FocalEstimate(math.nan, False, why, len(pairs))
    calibration = {i: rec.image(i).camera.calibration_matrix() for i in {v + 1 for p in pairs for v in p}}
    k_first = np.stack([calibration[a + 1] for a, _ in pairs])
    k_second = np.stack([calibration[b + 1] for _, b in pairs])
    low, high = options.scale_range
    grid = np.exp(np.linspace(math.log(low), math.log(high), options.grid_size))
    cost = essential_cost(fundamentals, weights, k_first, k_second, grid)
    best = int(np.argmin(cost))
    if best in (0, grid.size - 1):
        why = f"the cost is lowest at the end of the searched range ({grid[best]:.2f}x the model's)"
        return FocalEstimate(float(grid[best]), False, why, len(pairs))
    log_grid = np.log(grid)
    step = log_grid[1] - log_grid[0]
    c0, c1, c2 = cost[best - 1 : best + 2]
    curvature = c0 - 2 * c1 + c2
    offset = 0.5 * (c0 - c2) / curvature if curvature > 0 else 0.0
    scale = float(np.exp(log_grid[best] + float(np.clip(offset, -1.0, 1.0)) * step))
    probes = np.array([scale, scale / 1.1, scale * 1.1, 1.0])
    at = essential_cost(fundamentals, weights, k_first, k_second, probes)
    contrast = float(min(at[1], at[2]) / max(at[0], 1e-12) - 1.0)
    estimate = FocalEstimate(scale, False, "", len(pairs), float(at[0]), float(at[3]), contrast)
    if contrast < options.min_contrast:
        estimate.why = (
            f"the cost is nearly flat (10 % off the minimum it is {contrast:.0%} higher, needs "
            f"{options.min_contrast:.0%}): too little rotation between the views"
        )
        return estimate
    estimate.used = True
    estimate.why = "distinct minimum"
    return estimate


def scale_focal_lengths(rec: pycolmap.Reconstruction, scale: float) -> None:
    """Multiply, in place, the focal length(s) of every camera of ``rec`` by ``scale``."""
    for camera in rec.cameras.values():
        params = np.array(camera.params)
        params[list(camera.focal_length_idxs())] *= scale
        camera.params = params
