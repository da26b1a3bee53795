"""Further models in the ids of the first, as the models of one COLMAP database share them.

A further model (``PipelineOptions.max_models``) comes from a run of its own, which numbers its images,
cameras, rigs and frames from 1. COLMAP's mapper writes every model of a database with the database's
ids: image, frame and camera of a view are the same in ``sparse/0`` and ``sparse/1`` (each model keeps its
own estimate of a camera's parameters). :func:`in_first_model_ids` renumbers a further model that way; its
2D points stay its own (database.db holds them as the keypoints of its images, see ``database.py``).
"""

from __future__ import annotations

import copy

import numpy as np
import pycolmap


def in_first_model_ids(
    model: pycolmap.Reconstruction, first: pycolmap.Reconstruction
) -> pycolmap.Reconstruction:
    """The registered images of ``model`` with the image, frame, camera and rig ids their names have in
    ``first`` (trivial rigs and frames, as the pipeline builds them), their 2D points and the 3D points
    they observe. ``first`` must hold every image of ``model`` (registered or not)."""
    image_ids = {image.name: image_id for image_id, image in first.images.items()}
    missing = [model.images[i].name for i in model.reg_image_ids() if model.images[i].name not in image_ids]
    if missing:
        raise ValueError(f"the first model has no image named {missing[0]!r} ({len(missing)} in all)")
    camera_ids: dict[int, int] = {}
    for image_id in model.reg_image_ids():
        image = model.images[image_id]
        target = first.images[image_ids[image.name]].camera_id
        if camera_ids.setdefault(image.camera_id, target) != target:
            raise ValueError(
                f"camera {image.camera_id} of the further model is two cameras of the first "
                f"({camera_ids[image.camera_id]} and {target}): the runs grouped cameras differently"
            )
    renumbered = pycolmap.Reconstruction()
    for old, new in sorted(camera_ids.items(), key=lambda item: item[1]):
        camera = copy.copy(model.cameras[old])
        camera.camera_id = new
        renumbered.add_camera_with_trivial_rig(camera)
    new_image_id = {i: image_ids[model.images[i].name] for i in model.reg_image_ids()}
    for old in sorted(new_image_id, key=new_image_id.get):
        image = model.images[old]
        keypoints = np.array([point.xy for point in image.points2D], dtype=np.float64).reshape(-1, 2)
        renumbered.add_image_with_trivial_frame(
            pycolmap.Image(
                name=image.name,
                keypoints=keypoints,
                camera_id=camera_ids[image.camera_id],
                image_id=new_image_id[old],
            ),
            image.cam_from_world(),
        )
    for point in model.points3D.values():
        track = pycolmap.Track()
        for element in point.track.elements:
            track.add_element(new_image_id[element.image_id], element.point2D_idx)
        point_id = renumbered.add_point3D(point.xyz, track, point.color)
        renumbered.points3D[point_id].error = point.error
    return renumbered


def matches_in_first_model_ids(
    pair_matches: dict[tuple[int, int], np.ndarray], names: list[str], first: pycolmap.Reconstruction
) -> dict[tuple[int, int], np.ndarray]:
    """A further run's matches (keyed by its view indices, ``names`` in its order) keyed by the first
    model's image ids less one (the pipeline's view indices), the smaller first."""
    index = {image.name: image_id - 1 for image_id, image in first.images.items()}
    renumbered = {}
    for (a, b), matches in pair_matches.items():
        i, j = index[names[a]], index[names[b]]
        renumbered[(i, j) if i < j else (j, i)] = matches if i < j else matches[:, ::-1]
    return renumbered
