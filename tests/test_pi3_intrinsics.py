"""Intrinsics recovery from camera-frame point maps (used by π³'s ``predict``)."""

from __future__ import annotations

import torch

from speed3r_sfm.models.intrinsics import image_center, intrinsics_from_local_points, pixel_grid

HEIGHT, WIDTH = 36, 50


def camera_matrix(fx: float, fy: float, cx: float, cy: float, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=dtype)


def unproject(k: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) camera-frame points seen at every pixel centre (u, v) of K at the given depth."""
    grid = pixel_grid(HEIGHT, WIDTH, dtype=k.dtype)
    homogeneous = torch.cat([grid, torch.ones(HEIGHT, WIDTH, 1, dtype=k.dtype)], dim=-1)
    rays = homogeneous @ torch.linalg.inv(k).T
    return rays * depth.unsqueeze(-1)


def test_pixel_grid_convention():
    grid = pixel_grid(3, 4)
    assert grid.shape == (3, 4, 2)
    assert grid[0, 0].tolist() == [0, 0] and grid[2, 3].tolist() == [3, 2]  # (u, v) = (column, row)
    assert image_center(3, 4) == (1.5, 1.0)


def test_recovers_known_camera_with_noise_and_outliers():
    generator = torch.Generator().manual_seed(0)
    k = camera_matrix(61.0, 57.5, 26.3, 16.8)
    depth = 1 + 4 * torch.rand(HEIGHT, WIDTH, generator=generator, dtype=torch.float64)
    points = unproject(k, depth)
    points = points + 1e-3 * torch.randn(points.shape, generator=generator, dtype=torch.float64)
    outliers = torch.rand(HEIGHT, WIDTH, generator=generator) < 0.15
    points[outliers] = 3 * torch.randn(int(outliers.sum()), 3, generator=generator, dtype=torch.float64)
    weights = torch.where(outliers, 0.0, 0.5 + torch.rand(HEIGHT, WIDTH, generator=generator)).float()

    fitted = intrinsics_from_local_points(points.float(), weights)
    assert fitted.dtype == torch.float32
    torch.testing.assert_close(fitted.double(), k, atol=0.05, rtol=2e-3)
    # Without the weights the outliers spoil the fit: the weights are what make it right.
    unweighted = intrinsics_from_local_points(points.float())
    assert (unweighted.double() - k).abs().max() > 1.0


def test_fixed_principal_point_at_image_center():
    cx, cy = image_center(HEIGHT, WIDTH)
    k = camera_matrix(40.0, 42.0, cx, cy)
    depth = torch.linspace(1, 3, HEIGHT * WIDTH, dtype=torch.float64).reshape(HEIGHT, WIDTH)
    fitted = intrinsics_from_local_points(unproject(k, depth), fix_principal_point=True)
    assert fitted.dtype == torch.float64
    torch.testing.assert_close(fitted, k, atol=1e-9, rtol=0)
    # With an off-centre camera, the principal point stays at the centre and only the focals are fitted.
    off_centre = intrinsics_from_local_points(
        unproject(camera_matrix(40.0, 42.0, 30.0, 10.0), depth), fix_principal_point=True
    )
    assert off_centre[0, 2].item() == cx and off_centre[1, 2].item() == cy


def _weighted_lstsq(design: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    root = weights.sqrt().unsqueeze(-1)
    return torch.linalg.lstsq(design * root, (target * weights.sqrt()).unsqueeze(-1)).solution.squeeze(-1)


def test_matches_float64_least_squares_reference():
    generator = torch.Generator().manual_seed(1)
    batch = (2, 3)
    points = torch.randn(*batch, HEIGHT, WIDTH, 3, generator=generator, dtype=torch.float64)
    points[..., 2] = 0.5 + torch.rand(*batch, HEIGHT, WIDTH, generator=generator, dtype=torch.float64)
    weights = torch.rand(*batch, HEIGHT, WIDTH, generator=generator, dtype=torch.float64)
    fitted = intrinsics_from_local_points(points.float(), weights.float())
    fitted_fixed = intrinsics_from_local_points(points.float(), weights.float(), fix_principal_point=True)
    assert fitted.shape == (*batch, 3, 3)

    grid = pixel_grid(HEIGHT, WIDTH, dtype=torch.float64).reshape(-1, 2)
    center = image_center(HEIGHT, WIDTH)
    flat_points, flat_weights = points.reshape(-1, HEIGHT * WIDTH, 3), weights.reshape(-1, HEIGHT * WIDTH)
    for index in range(flat_points.shape[0]):
        w = flat_weights[index]
        for axis, (focal, principal) in enumerate([(0, 0), (1, 1)]):
            ratio = flat_points[index, :, axis] / flat_points[index, :, 2]
            design = torch.stack([ratio, torch.ones_like(ratio)], dim=-1)
            f, c = _weighted_lstsq(design, grid[:, axis], w)
            got = fitted.reshape(-1, 3, 3)[index].double()
            torch.testing.assert_close(got[focal, focal], f, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(got[principal, 2], c, atol=1e-3, rtol=1e-5)
            (f_fixed,) = _weighted_lstsq(ratio.unsqueeze(-1), grid[:, axis] - center[axis], w)
            torch.testing.assert_close(
                fitted_fixed.reshape(-1, 3, 3)[index, focal, focal].double(), f_fixed, rtol=1e-5, atol=1e-4
            )


def test_invalid_points_are_ignored_and_empty_fits_are_nan():
    k = camera_matrix(30.0, 31.0, 20.0, 15.0)
    points = unproject(k, torch.full((HEIGHT, WIDTH), 2.0, dtype=torch.float64))
    points[0, :5] = float("nan")
    points[1, :5, 2] = -1.0  # behind the camera
    points[2, :5, 2] = 0.0
    fitted = intrinsics_from_local_points(points)
    torch.testing.assert_close(fitted, k, atol=1e-9, rtol=0)
    empty = intrinsics_from_local_points(points, torch.zeros(HEIGHT, WIDTH, dtype=torch.float64))
    assert torch.isnan(empty[0, 0]) and torch.isnan(empty[1, 1]) and torch.isnan(empty[0, 2])
    assert empty[2, 2] == 1
