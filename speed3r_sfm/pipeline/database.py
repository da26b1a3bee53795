"""The COLMAP database of a project: cameras, rigs, frames, images, keypoints, matches, two-view geometry.

Keypoints of image i are all of its 2D points in original pixels (point2D index = keypoint index, as in
the reconstruction). ``matches`` holds every pair of observations of every track (before filtering);
``two_view_geometries`` holds, per image pair, the matches whose two observations still belong to one 3D
point of the final reconstruction (inliers), with the relative pose and the E / F matrices of the final
cameras (configuration CALIBRATED; no homography is estimated). Pairs left without inliers have matches but
no two-view geometry (COLMAP's geometric verification can still be run on them). There are no descriptors:
COLMAP's matchers cannot match other images against these keypoints.

Further models (``sparse/1``, ...) share the database's ids, as the models of COLMAP's mapper do: the
images they register have their 2D points as keypoints, and matches among themselves (``write_database``).

COLMAP's mappers take the file as it is: the incremental mapper continues from ``sparse/0``
(``input_path``; ``colmap mapper --input_path OUT/sparse/0``) and the global mapper starts from scratch
with their default options. The incremental mapper from scratch needs :func:`mapper_options`: the
database holds a few hundred keypoints per image, all of them matched, where COLMAP's defaults expect
thousands of SIFT features (100 inliers for the initial pair, 30 to register an image).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pycolmap


def point3d_ids(rec: pycolmap.Reconstruction) -> dict[int, np.ndarray]:
    """Per image id, the 3D point id of every 2D point (INVALID_POINT3D_ID where none)."""
    return {
        image_id: np.array([p.point3D_id for p in image.points2D], dtype=np.uint64)
        for image_id, image in rec.images.items()
    }


def inlier_matches(ids1: np.ndarray, ids2: np.ndarray, matches: np.ndarray) -> np.ndarray:
    """Rows of ``matches`` (m, 2) whose two points belong to the same 3D point (``ids``: point3d_ids)."""
    a, b = ids1[matches[:, 0]], ids2[matches[:, 1]]
    return matches[(a == b) & (a != np.uint64(pycolmap.INVALID_POINT3D_ID))]


def two_view_geometry(
    rec: pycolmap.Reconstruction, id1: int, id2: int, inliers: np.ndarray
) -> pycolmap.TwoViewGeometry:
    """TwoViewGeometry of an image pair from the reconstruction's cameras and poses."""
    geometry = pycolmap.TwoViewGeometry()
    geometry.inlier_matches = np.ascontiguousarray(inliers, dtype=np.uint32)
    image1, image2 = rec.image(id1), rec.image(id2)
    cam2_from_cam1 = image2.cam_from_world() * image1.cam_from_world().inverse()
    essential = pycolmap.essential_matrix_from_pose(cam2_from_cam1)
    k1 = image1.camera.calibration_matrix()
    k2 = image2.camera.calibration_matrix()
    geometry.cam2_from_cam1 = cam2_from_cam1
    geometry.E = essential
    geometry.F = np.linalg.inv(k2).T @ essential @ np.linalg.inv(k1)  # pinhole part of the cameras
    geometry.config = pycolmap.TwoViewGeometryConfiguration.CALIBRATED
    return geometry


def write_database(
    path: str | os.PathLike,
    rec: pycolmap.Reconstruction,
    keypoints: Sequence[np.ndarray],
    pair_matches: dict[tuple[int, int], np.ndarray],
    further: Sequence[tuple[pycolmap.Reconstruction, dict[tuple[int, int], np.ndarray]]] = (),
) -> dict[str, int]:
    """Write ``path`` (a new file) from the reconstruction and all matches; returns counts.

    ``further``: further models in ``rec``'s ids (``model_ids.py``) with their matches. An image one of them
    registers has that model's 2D points as keypoints and that model's matches with the other images it
    registers (its matches with ``rec``'s keypoints are dropped); a camera only such images use has that
    model's parameters."""
    if os.path.exists(path):
        raise FileExistsError(f"database {path} already exists")
    models = [(rec, pair_matches), *further]
    owner = {image_id: k for k, (model, _) in enumerate(models) if k for image_id in model.reg_image_ids()}
    counts = {
        "images": 0,
        "keypoints": 0,
        "matched_pairs": 0,
        "matches": 0,
        "verified_pairs": 0,
        "inliers": 0,
    }
    users: dict[int, set[int]] = {}  # per camera, the models that register its images (0: rec or none)
    for image_id, image in rec.images.items():
        users.setdefault(image.camera_id, set()).add(owner.get(image_id, 0))
    with pycolmap.Database.open(path) as db:
        for camera_id in sorted(rec.cameras):
            only = users.get(camera_id, {0})
            source = models[next(iter(only))][0] if len(only) == 1 else rec
            db.write_camera(source.cameras[camera_id], use_camera_id=True)
        for rig_id in sorted(rec.rigs):
            db.write_rig(rec.rigs[rig_id], use_rig_id=True)
        for frame_id in sorted(rec.frames):
            db.write_frame(rec.frames[frame_id], use_frame_id=True)
        for image_id in sorted(rec.images):
            image = rec.images[image_id]
            db.write_image(
                pycolmap.Image(name=image.name, camera_id=image.camera_id, image_id=image_id),
                use_image_id=True,
            )
            if image_id in owner:
                points = models[owner[image_id]][0].images[image_id].points2D
                image_keypoints = np.array([point.xy for point in points], dtype=np.float32).reshape(-1, 2)
            else:
                image_keypoints = np.asarray(keypoints[image_id - 1], dtype=np.float32)
            db.write_keypoints(image_id, np.ascontiguousarray(image_keypoints))
            counts["images"] += 1
            counts["keypoints"] += len(image_keypoints)
        for k, (model, matches_of_model) in enumerate(models):
            ids = point3d_ids(model)
            for (a, b), matches in matches_of_model.items():
                id1, id2 = a + 1, b + 1
                if owner.get(id1, 0) != k or owner.get(id2, 0) != k:
                    continue  # another model's keypoints
                matches = np.ascontiguousarray(matches, dtype=np.uint32)
                db.write_matches(id1, id2, matches)
                counts["matched_pairs"] += 1
                counts["matches"] += len(matches)
                if id1 not in ids or id2 not in ids:
                    continue
                inliers = inlier_matches(ids[id1], ids[id2], matches.astype(np.int64))
                if len(inliers) and model.image(id1).has_pose and model.image(id2).has_pose:
                    db.write_two_view_geometry(id1, id2, two_view_geometry(model, id1, id2, inliers))
                    counts["verified_pairs"] += 1
                    counts["inliers"] += len(inliers)
    return counts


def mapper_options() -> pycolmap.IncrementalPipelineOptions:
    """COLMAP's incremental mapper options for reconstructing a project's ``database.db`` from scratch
    (module docstring): the thresholds on matches and inliers scaled to its keypoints, two-view tracks
    triangulated. As COLMAP flags: ``--Mapper.min_num_matches 5 --Mapper.init_min_num_inliers 30
    --Mapper.abs_pose_min_num_inliers 10 --Mapper.tri_ignore_two_view_tracks 0``."""
    options = pycolmap.IncrementalPipelineOptions()
    options.min_num_matches = 5
    options.mapper.init_min_num_inliers = 30
    options.mapper.abs_pose_min_num_inliers = 10
    options.triangulation.ignore_two_view_tracks = False
    return options
