"""Self-calibration of the focal length from the matches' fundamental matrices (``self_calibration.py``)."""

from __future__ import annotations

import numpy as np
import pycolmap
import pytest

from speed3r_sfm.pipeline.self_calibration import (
    SelfCalibrationOptions,
    essential_cost,
    estimate_focal_scale,
    scale_focal_lengths,
)

WIDTH, HEIGHT, FOCAL = 640, 480, 500.0


def _look_at(centre: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(3, 3) world-to-camera rotation of a camera at ``centre`` looking at ``target`` (y down)."""
    forward = (target - centre) / np.linalg.norm(target - centre)
    right = np.cross(forward, [0.0, -1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward])


def _scene(rotations: list[np.ndarray], centres: list[np.ndarray], noise_px: float, seed: int = 0):
    """Points seen by every camera: (2D points per view in pixels, pair matches of every view pair)."""
    rng = np.random.default_rng(seed)
    points = rng.uniform([-2, -1.5, 4], [2, 1.5, 8], size=(400, 3))
    k = np.array([[FOCAL, 0, WIDTH / 2], [0, FOCAL, HEIGHT / 2], [0, 0, 1]])
    points2d = []
    for r, c in zip(rotations, centres, strict=True):
        cam = (points - c) @ r.T
        assert (cam[:, 2] > 0).all()
        uv = cam @ k.T
        points2d.append(uv[:, :2] / uv[:, 2:] + rng.normal(0, noise_px, size=(len(points), 2)))
    index = np.arange(len(points))
    pairs = {
        (a, b): np.stack([index, index], axis=1)
        for a in range(len(centres))
        for b in range(a + 1, len(centres))
    }
    return points2d, pairs


def _reconstruction(views: int, focal: float, model: str = "SIMPLE_RADIAL") -> pycolmap.Reconstruction:
    """One shared camera at ``focal`` and ``views`` images (poses do not matter here)."""
    rec = pycolmap.Reconstruction()
    params = (
        [focal, WIDTH / 2, HEIGHT / 2, 0.0]
        if model == "SIMPLE_RADIAL"
        else [focal, focal, WIDTH / 2, HEIGHT / 2]
    )
    rec.add_camera_with_trivial_rig(
        pycolmap.Camera(camera_id=1, model=model, width=WIDTH, height=HEIGHT, params=params)
    )
    for i in range(views):
        image = pycolmap.Image(name=f"{i}.png", camera_id=1, image_id=i + 1)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d())
    return rec


def _rotating_cameras(views: int = 6, seed: int = 1):
    """Cameras on a wobbly arc, each looking at its own point of the scene: the rotations differ and the
    optical axes do not meet in one point."""
    rng = np.random.default_rng(seed)
    centres = [
        np.array([1.2 * np.sin(a), 0.3 * rng.normal(), -1.0 + 0.5 * np.cos(a)])
        for a in np.linspace(-0.6, 0.6, views)
    ]
    targets = [np.array([0.0, 0.0, 6.0]) + rng.normal(0, 0.8, size=3) for _ in range(views)]
    return [_look_at(c, t) for c, t in zip(centres, targets, strict=True)], centres


def test_essential_cost_matches_a_per_pair_reference():
    rng = np.random.default_rng(0)
    pairs, scales = 5, np.array([0.7, 1.0, 1.3])
    fundamentals = rng.normal(size=(pairs, 3, 3))
    weights = rng.uniform(10, 100, size=pairs)
    k_first = np.array([[[f, 0.2, 300], [0, 1.1 * f, 200], [0, 0, 1]] for f in rng.uniform(300, 600, pairs)])
    k_second = np.array([[[f, 0.0, 310], [0, f, 190], [0, 0, 1]] for f in rng.uniform(300, 600, pairs)])
    got = essential_cost(fundamentals, weights, k_first, k_second, scales)
    for g, s in enumerate(scales):
        total = 0.0
        for p in range(pairs):
            ka, kb = k_first[p].copy(), k_second[p].copy()
            ka[:2, :2] *= s
            kb[:2, :2] *= s
            sigma = np.linalg.svd(kb.T @ fundamentals[p] @ ka, compute_uv=False)
            total += weights[p] * (sigma[0] - sigma[1]) / (sigma[0] + sigma[1])
        assert got[g] == pytest.approx(total / weights.sum(), rel=1e-10)


def test_essential_cost_is_zero_at_the_true_calibration():
    rotations, centres = _rotating_cameras(2)
    k = np.array([[FOCAL, 0, WIDTH / 2], [0, FOCAL, HEIGHT / 2], [0, 0, 1]])
    relative = rotations[1] @ rotations[0].T
    t = -rotations[1] @ centres[1] + relative @ rotations[0] @ centres[0]
    skew = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    fundamental = np.linalg.inv(k).T @ skew @ relative @ np.linalg.inv(k)
    cost = essential_cost(fundamental[None], np.ones(1), k[None], k[None], np.array([0.9, 1.0, 1.1]))
    assert cost[1] < 1e-9
    assert cost[0] > 1e-3 and cost[2] > 1e-3


@pytest.mark.parametrize("start", [0.85, 1.15])
def test_focal_length_is_recovered_from_noisy_matches(start):
    rotations, centres = _rotating_cameras()
    points2d, pairs = _scene(rotations, centres, noise_px=0.3)
    rec = _reconstruction(len(centres), start * FOCAL)
    estimate = estimate_focal_scale(rec, points2d, pairs, SelfCalibrationOptions(min_pairs=5))
    assert estimate.used, estimate.why
    assert estimate.pairs == 15
    assert start * FOCAL * estimate.scale == pytest.approx(FOCAL, rel=0.01)
    assert estimate.cost_at_scale < estimate.cost_at_model
    scale_focal_lengths(rec, estimate.scale)
    assert rec.cameras[1].focal_length == pytest.approx(FOCAL, rel=0.01)


def test_motion_without_rotation_leaves_the_model_focal_length():
    rotation = _look_at(np.zeros(3), np.array([0.0, 0.0, 6.0]))
    centres = [np.array([0.3 * i, 0.05 * i * i, 0.2 * i]) for i in range(6)]
    points2d, pairs = _scene([rotation] * 6, centres, noise_px=0.3)
    estimate = estimate_focal_scale(
        _reconstruction(6, 0.9 * FOCAL), points2d, pairs, SelfCalibrationOptions(min_pairs=5)
    )
    assert not estimate.used
    assert "flat" in estimate.why or "end of the searched range" in estimate.why


def test_cameras_that_all_look_at_one_point_leave_the_model_focal_length():
    """Optical axes that meet in one point (an orbit around a fixated centre) are a critical configuration
    of focal-length self-calibration from fundamental matrices: the cost is flat near the minimum."""
    rng = np.random.default_rng(0)
    centres = [
        np.array([3 * np.sin(a), 0.3 * rng.normal(), 6 - 3 * np.cos(a)]) for a in np.linspace(-0.5, 0.5, 6)
    ]
    rotations = [_look_at(c, np.array([0.0, 0.0, 6.0])) for c in centres]
    points2d, pairs = _scene(rotations, centres, noise_px=0.3)
    estimate = estimate_focal_scale(
        _reconstruction(6, 0.9 * FOCAL), points2d, pairs, SelfCalibrationOptions(min_pairs=5)
    )
    assert not estimate.used
    assert "flat" in estimate.why


def test_too_few_view_pairs_leave_the_model_focal_length():
    rotations, centres = _rotating_cameras(3)
    points2d, pairs = _scene(rotations, centres, noise_px=0.3)
    estimate = estimate_focal_scale(_reconstruction(3, FOCAL), points2d, pairs, SelfCalibrationOptions())
    assert not estimate.used
    assert estimate.pairs == 3
    assert "needs 8" in estimate.why


def test_same_matches_give_the_same_estimate():
    rotations, centres = _rotating_cameras()
    points2d, pairs = _scene(rotations, centres, noise_px=1.0)
    options = SelfCalibrationOptions(min_pairs=5)
    first = estimate_focal_scale(_reconstruction(6, FOCAL), points2d, pairs, options)
    second = estimate_focal_scale(_reconstruction(6, FOCAL), points2d, pairs, options)
    assert first.scale == second.scale


def test_scale_focal_lengths_scales_both_focal_lengths_of_a_pinhole_camera():
    rec = _reconstruction(2, FOCAL, model="PINHOLE")
    rec.cameras[1].params = [400.0, 420.0, 320.0, 240.0]
    scale_focal_lengths(rec, 1.25)
    assert list(rec.cameras[1].params) == pytest.approx([500.0, 525.0, 320.0, 240.0])
