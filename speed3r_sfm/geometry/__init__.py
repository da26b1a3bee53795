"""Camera and pose math. Pixel, pose and depth conventions are documented in ``camera.py``."""

from __future__ import annotations

from .camera import (
    camera_centers,
    compose_poses,
    depth_to_camera_points,
    depth_to_world_points,
    intrinsics_from_colmap,
    intrinsics_from_fov,
    intrinsics_to_colmap,
    invert_pose,
    look_at,
    patch_centres,
    project_points,
    resize_intrinsics,
    transform_points,
)
from .sim3 import (
    apply_sim3,
    compose_sim3,
    identity_sim3,
    invert_sim3,
    sim3_cam_from_world,
    umeyama_sim3,
    umeyama_sim3_batched,
)

__all__ = [
    "apply_sim3",
    "camera_centers",
    "compose_sim3",
    "compose_poses",
    "depth_to_camera_points",
    "depth_to_world_points",
    "intrinsics_from_colmap",
    "intrinsics_from_fov",
    "identity_sim3",
    "intrinsics_to_colmap",
    "invert_sim3",
    "invert_pose",
    "look_at",
    "patch_centres",
    "project_points",
    "resize_intrinsics",
    "sim3_cam_from_world",
    "transform_points",
    "umeyama_sim3",
    "umeyama_sim3_batched",
]
