"""Absolute pose (PnP) of one view, the way an incremental mapper registers the next image."""

from __future__ import annotations

import copy

import numpy as np
import pycolmap


def absolute_pose(
    xy: np.ndarray, xyz: np.ndarray, camera: pycolmap.Camera, max_error: float, estimate_focal: bool
) -> tuple[dict, pycolmap.Camera] | None:
    """pycolmap LO-RANSAC PnP (seed 0, ``max_error`` pixels) and refinement of 2D points ``xy`` (N, 2) seeing
    3D points ``xyz`` (N, 3): (pycolmap's result dict, the camera), or None without a pose.

    ``estimate_focal``: also estimate and refine the focal length, as COLMAP's mapper does for a camera no
    registered image shares; the returned camera then carries it (``camera`` itself is never changed).
    """
    estimation = pycolmap.AbsolutePoseEstimationOptions()
    estimation.ransac.max_error = max_error
    estimation.ransac.random_seed = 0
    estimation.estimate_focal_length = estimate_focal
    refinement = pycolmap.AbsolutePoseRefinementOptions()
    refinement.refine_focal_length = estimate_focal
    camera = copy.copy(camera)  # pycolmap writes the estimated focal length into the camera it is given
    result = pycolmap.estimate_and_refine_absolute_pose(xy, xyz, camera, estimation, refinement)
    return None if result is None else (result, camera)


def has_own_camera(rec: pycolmap.Reconstruction, image_id: int) -> bool:
    """Whether no other image of ``rec`` uses ``image_id``'s camera."""
    camera_id = rec.image(image_id).camera_id
    return all(image.camera_id != camera_id for other, image in rec.images.items() if other != image_id)
