"""Pinhole cameras and poses.

Conventions used by every function here (and by ``speed3r_sfm.models.prediction.Prediction``):

- **Pixels, "integer centres"**: the pixel in row ``i``, column ``j`` has its centre at ``(u, v) = (j, i)``;
  the top-left pixel covers ``[-0.5, 0.5)^2`` and the image centre is ``((W - 1) / 2, (H - 1) / 2)``.
  This is the convention of VGGT and of kornia. COLMAP puts pixel centres at ``+0.5`` (top-left centre
  ``(0.5, 0.5)``); convert with :func:`intrinsics_to_colmap` / :func:`intrinsics_from_colmap`.
- **Poses**: ``cam_from_world`` is a ``(..., 3, 4)`` OpenCV ``[R | t]`` with ``x_cam = R @ x_world + t``;
  camera axes x right, y down, z forward.
- **Depth**: z-depth, the camera-frame ``z`` of the surface point (not the ray length); ``0`` marks pixels
  without valid depth.
"""

from __future__ import annotations

import math

import torch
from kornia.geometry.camera import project_points as _kornia_project_points
from kornia.geometry.depth import depth_to_3d_v2


def intrinsics_from_fov(fov_x_deg: float, height: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """(3, 3) K with square pixels, horizontal field of view ``fov_x_deg`` and the principal point at the
    image centre ``((W - 1) / 2, (H - 1) / 2)`` (integer-centre convention)."""
    focal = 0.5 * width / math.tan(math.radians(fov_x_deg) / 2)
    return torch.tensor(
        [[focal, 0.0, (width - 1) / 2], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]], dtype=dtype
    )


def intrinsics_to_colmap(intrinsics: torch.Tensor) -> torch.Tensor:
    """K in the integer-centre convention -> K in COLMAP's convention (principal point + 0.5)."""
    out = intrinsics.clone()
    out[..., 0, 2] += 0.5
    out[..., 1, 2] += 0.5
    return out


def intrinsics_from_colmap(intrinsics: torch.Tensor) -> torch.Tensor:
    """K in COLMAP's convention (pixel centres at +0.5) -> K in the integer-centre convention."""
    out = intrinsics.clone()
    out[..., 0, 2] -= 0.5
    out[..., 1, 2] -= 0.5
    return out


def resize_intrinsics(
    intrinsics: torch.Tensor, old_size: tuple[int, int], new_size: tuple[int, int]
) -> torch.Tensor:
    """K for an image resized from ``old_size`` (H, W) to ``new_size`` (H, W), integer-centre convention.

    Resizing maps pixel edges to edges: ``u_new + 0.5 = s_x (u_old + 0.5)``.
    """
    sy = new_size[0] / old_size[0]
    sx = new_size[1] / old_size[1]
    out = intrinsics.clone()
    out[..., 0, 0] *= sx
    out[..., 0, 1] *= sx
    out[..., 0, 2] = sx * (intrinsics[..., 0, 2] + 0.5) - 0.5
    out[..., 1, 1] *= sy
    out[..., 1, 2] = sy * (intrinsics[..., 1, 2] + 0.5) - 0.5
    return out


def invert_pose(pose: torch.Tensor) -> torch.Tensor:
    """Inverse of a rigid ``(..., 3, 4)`` [R | t] (e.g. cam_from_world -> world_from_cam)."""
    rot_t = pose[..., :3, :3].transpose(-1, -2)
    return torch.cat([rot_t, -rot_t @ pose[..., :3, 3:]], dim=-1)


def compose_poses(a_from_b: torch.Tensor, b_from_c: torch.Tensor) -> torch.Tensor:
    """``a_from_c = a_from_b ∘ b_from_c`` for ``(..., 3, 4)`` rigid transforms."""
    rot = a_from_b[..., :3, :3] @ b_from_c[..., :3, :3]
    trans = a_from_b[..., :3, :3] @ b_from_c[..., :3, 3:] + a_from_b[..., :3, 3:]
    return torch.cat([rot, trans], dim=-1)


def camera_centers(cam_from_world: torch.Tensor) -> torch.Tensor:
    """World positions ``-R^T t`` of the cameras, ``(..., 3)``."""
    return invert_pose(cam_from_world)[..., :3, 3]


def transform_points(pose: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply ``(..., 3, 4)`` [R | t] to points ``(..., N, 3)``."""
    return points @ pose[..., :3, :3].transpose(-1, -2) + pose[..., None, :3, 3]


def look_at(
    eye: torch.Tensor,
    target: torch.Tensor,
    up: torch.Tensor | None = None,
    roll_rad: torch.Tensor | None = None,
) -> torch.Tensor:
    """OpenCV cam_from_world ``(..., 3, 4)`` of cameras at ``eye`` looking at ``target``.

    ``up`` is the world up direction (default +z); the image y axis points along -up. ``roll_rad`` rotates
    the camera about its optical axis. Raises if the viewing direction is parallel to ``up``.
    """
    if up is None:
        up = torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype, device=eye.device)
    up = up.expand_as(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.linalg.cross(forward, up, dim=-1)
    if (right.norm(dim=-1) < 1e-6).any():
        raise ValueError("look_at: viewing direction is parallel to the up vector; pick another target.")
    right = torch.nn.functional.normalize(right, dim=-1)
    down = torch.linalg.cross(forward, right, dim=-1)
    if roll_rad is not None:
        c, s = torch.cos(roll_rad)[..., None], torch.sin(roll_rad)[..., None]
        right, down = c * right + s * down, -s * right + c * down
    rot = torch.stack([right, down, forward], dim=-2)
    trans = -(rot @ eye[..., None])
    return torch.cat([rot, trans], dim=-1)


def depth_to_camera_points(depth: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Camera-frame points ``(..., H, W, 3)`` from z-depth ``(..., H, W)`` and K ``(..., 3, 3)``."""
    lead = depth.shape[:-2]
    h, w = depth.shape[-2:]
    k = intrinsics.expand(*lead, 3, 3).reshape(-1, 3, 3)
    pts = depth_to_3d_v2(depth.reshape(-1, h, w), k).reshape(*lead, h, w, 3)
    return pts


def depth_to_world_points(
    depth: torch.Tensor, intrinsics: torch.Tensor, cam_from_world: torch.Tensor
) -> torch.Tensor:
    """World points ``(..., H, W, 3)`` of every pixel from z-depth, K and cam_from_world."""
    lead = depth.shape[:-2]
    h, w = depth.shape[-2:]
    cam_pts = depth_to_camera_points(depth, intrinsics).reshape(*lead, h * w, 3)
    return transform_points(invert_pose(cam_from_world), cam_pts).reshape(*lead, h, w, 3)


def project_points(
    points_world: torch.Tensor, intrinsics: torch.Tensor, cam_from_world: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates ``(..., N, 2)`` (integer-centre convention) and z-depth ``(..., N)`` of world points.

    Points behind the camera get meaningless pixel coordinates; mask them with ``z > 0``.
    """
    cam = transform_points(cam_from_world, points_world)
    uv = _kornia_project_points(cam, intrinsics[..., None, :, :].expand(*cam.shape[:-1], 3, 3))
    return uv, cam[..., 2]


def patch_centres(height: int, width: int, patch: int, device: torch.device | None = None) -> torch.Tensor:
    """(rows, cols) integer pixel (y, x) at the centre of each patch, row-major: (P, 2) long."""
    rows, cols = height // patch, width // patch
    y = torch.arange(rows, device=device) * patch + patch // 2
    x = torch.arange(cols, device=device) * patch + patch // 2
    return torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1).reshape(-1, 2)
