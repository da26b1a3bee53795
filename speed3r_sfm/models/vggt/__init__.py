"""Clean-room VGGT backbone, loadable from the official checkpoint."""

from .aggregator import Aggregator
from .config import VGGTConfig
from .model import VGGT
from .pose_encoding import (
    extrinsics_intrinsics_to_pose_encoding,
    matrix_to_quaternion_xyzw,
    pose_encoding_to_extrinsics_intrinsics,
    quaternion_xyzw_to_matrix,
)

__all__ = [
    "VGGT",
    "Aggregator",
    "VGGTConfig",
    "extrinsics_intrinsics_to_pose_encoding",
    "matrix_to_quaternion_xyzw",
    "pose_encoding_to_extrinsics_intrinsics",
    "quaternion_xyzw_to_matrix",
]
