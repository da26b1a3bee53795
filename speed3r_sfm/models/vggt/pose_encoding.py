"""VGGT's 9-D camera encoding ``absT_quaR_FoV`` ↔ OpenCV extrinsics and pinhole intrinsics.

Encoding: [tx, ty, tz, qx, qy, qz, qw, fov_h, fov_w] where [R | t] is camera-from-world (OpenCV: x right,
y down, z forward), the quaternion of R is scalar-last (XYZW) with qw ≥ 0, and
fov_h = 2·atan((H/2)/fy), fov_w = 2·atan((W/2)/fx) for an image of H × W pixels. Decoding puts the
principal point at (W/2, H/2) with no skew, as upstream. Quaternion maths goes through kornia, whose
quaternions are scalar-first (WXYZ); the functions here convert.
"""

from __future__ import annotations

import torch
from kornia.geometry.conversions import quaternion_to_rotation_matrix, rotation_matrix_to_quaternion


def quaternion_xyzw_to_matrix(quaternion: torch.Tensor) -> torch.Tensor:
    """(..., 4) XYZW quaternions (any norm) → (..., 3, 3) rotation matrices."""
    return quaternion_to_rotation_matrix(quaternion[..., [3, 0, 1, 2]])


def matrix_to_quaternion_xyzw(rotation: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation matrices → (..., 4) unit XYZW quaternions with qw ≥ 0."""
    wxyz = rotation_matrix_to_quaternion(rotation.contiguous())
    wxyz = torch.where(wxyz[..., :1] < 0, -wxyz, wxyz)
    return wxyz[..., [1, 2, 3, 0]]


def extrinsics_intrinsics_to_pose_encoding(
    cam_from_world: torch.Tensor, intrinsics: torch.Tensor, image_size: tuple[int, int]
) -> torch.Tensor:
    """(..., 3, 4) cam_from_world and (..., 3, 3) K of an image of ``image_size`` = (H, W) → (..., 9)."""
    height, width = image_size
    translation = cam_from_world[..., :3, 3]
    quaternion = matrix_to_quaternion_xyzw(cam_from_world[..., :3, :3])
    fov_h = 2 * torch.atan((height / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((width / 2) / intrinsics[..., 0, 0])
    return torch.cat([translation, quaternion, fov_h[..., None], fov_w[..., None]], dim=-1)


def pose_encoding_to_extrinsics_intrinsics(
    pose_encoding: torch.Tensor, image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 9) encodings → (..., 3, 4) cam_from_world and (..., 3, 3) K for an image of (H, W)."""
    height, width = image_size
    rotation = quaternion_xyzw_to_matrix(pose_encoding[..., 3:7])
    cam_from_world = torch.cat([rotation, pose_encoding[..., :3, None]], dim=-1)
    fy = (height / 2) / torch.tan(pose_encoding[..., 7] / 2)
    fx = (width / 2) / torch.tan(pose_encoding[..., 8] / 2)
    intrinsics = torch.zeros(
        *pose_encoding.shape[:-1], 3, 3, dtype=pose_encoding.dtype, device=pose_encoding.device
    )
    intrinsics[..., 0, 0] = fx
    intrinsics[..., 1, 1] = fy
    intrinsics[..., 0, 2] = width / 2
    intrinsics[..., 1, 2] = height / 2
    intrinsics[..., 2, 2] = 1.0
    return cam_from_world, intrinsics
