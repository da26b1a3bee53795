"""absT_quaR_FoV pose encoding against textbook float64 formulas."""

from __future__ import annotations

import math

import torch

from speed3r_sfm.models.vggt.pose_encoding import (
    extrinsics_intrinsics_to_pose_encoding,
    matrix_to_quaternion_xyzw,
    pose_encoding_to_extrinsics_intrinsics,
    quaternion_xyzw_to_matrix,
)


def textbook_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of a unit-normalised scalar-last quaternion (x, y, z, w)."""
    x, y, z, w = (q / q.norm()).tolist()
    return torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ],
        dtype=torch.float64,
    )


def random_quaternions(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    q[0] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # identity
    q[1] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # half turn about x (trace -1)
    axis = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64) / math.sqrt(14)
    q[2] = torch.cat([axis * math.sin(math.radians(85)), torch.tensor([math.cos(math.radians(85))])])
    return torch.where(q[:, 3:] < 0, -q, q)


def test_quaternion_to_matrix_matches_textbook_formula():
    q = random_quaternions(32)
    scaled = q * torch.linspace(0.5, 3.0, 32, dtype=torch.float64)[:, None]  # any norm
    ours = quaternion_xyzw_to_matrix(scaled)
    reference = torch.stack([textbook_matrix(x) for x in q])
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)


def test_matrix_to_quaternion_inverts_and_is_scalar_last_with_positive_w():
    q = random_quaternions(32, seed=1)
    recovered = matrix_to_quaternion_xyzw(torch.stack([textbook_matrix(x) for x in q]))
    assert (recovered[:, 3] >= 0).all()
    torch.testing.assert_close(recovered, q, rtol=0, atol=1e-9)
    # the negated quaternion is the same rotation and encodes to the same (w >= 0) value
    torch.testing.assert_close(matrix_to_quaternion_xyzw(quaternion_xyzw_to_matrix(-q)), q, rtol=0, atol=1e-9)


def test_pose_encoding_round_trip_and_fov_formula():
    height, width = 392, 518
    q = random_quaternions(8, seed=2)
    rotation = torch.stack([textbook_matrix(x) for x in q])
    translation = torch.randn(8, 3, dtype=torch.float64)
    cam_from_world = torch.cat([rotation, translation[:, :, None]], dim=-1).reshape(2, 4, 3, 4)
    fx = torch.linspace(300, 700, 8, dtype=torch.float64)
    fy = fx * 1.05
    intrinsics = torch.zeros(8, 3, 3, dtype=torch.float64)
    intrinsics[:, 0, 0], intrinsics[:, 1, 1] = fx, fy
    intrinsics[:, 0, 2], intrinsics[:, 1, 2], intrinsics[:, 2, 2] = width / 2, height / 2, 1
    intrinsics = intrinsics.reshape(2, 4, 3, 3)

    encoding = extrinsics_intrinsics_to_pose_encoding(cam_from_world, intrinsics, (height, width))
    assert encoding.shape == (2, 4, 9)
    flat = encoding.reshape(8, 9)
    torch.testing.assert_close(flat[:, :3], translation)
    torch.testing.assert_close(flat[:, 3:7], q, rtol=0, atol=1e-9)
    fov_h = torch.tensor([2 * math.atan(height / 2 / f) for f in fy.tolist()], dtype=torch.float64)
    fov_w = torch.tensor([2 * math.atan(width / 2 / f) for f in fx.tolist()], dtype=torch.float64)
    torch.testing.assert_close(flat[:, 7], fov_h)  # height first
    torch.testing.assert_close(flat[:, 8], fov_w)

    decoded_extrinsics, decoded_intrinsics = pose_encoding_to_extrinsics_intrinsics(encoding, (height, width))
    torch.testing.assert_close(decoded_extrinsics, cam_from_world, rtol=0, atol=1e-9)
    torch.testing.assert_close(decoded_intrinsics, intrinsics, rtol=0, atol=1e-9)


def test_decoding_puts_principal_point_at_image_centre_in_float32():
    encoding = torch.tensor([[0.0, 0, 0, 0, 0, 0, 1, math.pi / 2, math.pi / 2]])
    cam_from_world, intrinsics = pose_encoding_to_extrinsics_intrinsics(encoding, (280, 518))
    assert cam_from_world.dtype == torch.float32
    torch.testing.assert_close(cam_from_world[0], torch.eye(3, 4))
    expected = torch.tensor([[259.0, 0, 259], [0, 140, 140], [0, 0, 1]])
    torch.testing.assert_close(intrinsics[0], expected)
