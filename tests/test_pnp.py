"""Absolute pose of one view (pipeline/pnp.py), with and without estimating its focal length, and the camera
the rescue re-poses a view with (pipeline/rescue.py)."""

import numpy as np
import pycolmap
import pytest
import torch
from PIL import Image

from speed3r_sfm.geometry import intrinsics_from_fov
from speed3r_sfm.pipeline.colmap_model import build_reconstruction
from speed3r_sfm.pipeline.frames import SceneGeometry, intrinsics_to_original
from speed3r_sfm.pipeline.inputs import Preprocessing, find_images, load_views
from speed3r_sfm.pipeline.pnp import absolute_pose, has_own_camera
from speed3r_sfm.pipeline.rescue import pnp_camera


def _observations(focal: float) -> tuple[np.ndarray, np.ndarray, pycolmap.Rigid3d]:
    rng = np.random.default_rng(0)
    points = np.column_stack([rng.uniform(-2, 2, 60), rng.uniform(-1.5, 1.5, 60), rng.uniform(4, 8, 60)])
    pose = pycolmap.Rigid3d(pycolmap.Rotation3d(np.array([0.05, -0.1, 0.02])), np.array([0.3, -0.2, 0.5]))
    camera = pycolmap.Camera(model="SIMPLE_RADIAL", width=640, height=480, params=[focal, 320.0, 240.0, 0.0])
    xy = camera.img_from_cam(pose * points)
    world = np.asarray(pose.inverse() * (pose * points))  # the same points, through pycolmap's own maps
    return xy, world, pose


def test_focal_length_is_estimated_only_when_asked_and_the_given_camera_is_kept():
    xy, xyz, truth = _observations(focal=650.0)
    guess = pycolmap.Camera(model="SIMPLE_RADIAL", width=640, height=480, params=[500.0, 320.0, 240.0, 0.0])
    result, camera = absolute_pose(xy, xyz, guess, max_error=2.0, estimate_focal=True)
    assert abs(camera.mean_focal_length() - 650.0) < 1e-3 and guess.mean_focal_length() == 500.0
    assert int(result["num_inliers"]) == len(xy)
    error = result["cam_from_world"] * truth.inverse()
    assert error.rotation.angle() < 1e-5 and np.linalg.norm(error.translation) < 1e-5

    result, camera = absolute_pose(xy, xyz, guess, max_error=2.0, estimate_focal=False)
    # the 23 % wrong focal length stays: fewer than half the points fit, the pose is degrees off
    assert camera.mean_focal_length() == 500.0 and int(result["num_inliers"]) < len(xy) // 2
    assert np.degrees((result["cam_from_world"] * truth.inverse()).rotation.angle()) > 1.0


def test_own_camera_means_no_other_image_uses_it():
    rec = pycolmap.Reconstruction()
    for camera_id in (1, 2):
        camera = pycolmap.Camera(model="PINHOLE", width=64, height=48, params=[50.0, 50.0, 32.0, 24.0])
        camera.camera_id = camera_id
        rec.add_camera_with_trivial_rig(camera)
    for image_id, camera_id in ((1, 1), (2, 1), (3, 2)):
        image = pycolmap.Image(name=f"{image_id}.png", camera_id=camera_id, image_id=image_id)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d())
    assert [has_own_camera(rec, image_id) for image_id in (1, 2, 3)] == [False, False, True]


def _scene(tmp_path, shared_camera: bool):
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    views, images, _ = load_views(find_images(tmp_path), tmp_path, Preprocessing("crop", 56))
    s, _, height, width = images.shape
    geometry = SceneGeometry(
        intrinsics_from_fov(60.0, height, width, dtype=torch.float64).expand(s, 3, 3).clone(),
        torch.eye(3, 4, dtype=torch.float64).expand(s, 3, 4).clone(),
        torch.ones(s, height, width),
        torch.ones(s, height, width),
    )
    points = [np.zeros((0, 2))] * s
    return views, geometry, build_reconstruction(views, geometry, points, "SIMPLE_RADIAL", shared_camera)


@pytest.mark.parametrize("shared_camera", [False, True])
def test_a_dropped_view_is_reposed_with_the_predicted_camera_unless_it_is_shared(tmp_path, shared_camera):
    """Bundle adjustment fitted a weakly linked view's own camera to a handful of points (here: focal length
    40 % off, strong distortion); PnP starts from the model's camera instead. A shared camera is the one
    every registered view refined, and is kept."""
    views, geometry, rec = _scene(tmp_path, shared_camera)
    camera_id = rec.image(2).camera_id
    predicted = list(rec.cameras[camera_id].params)
    rec.cameras[camera_id].params = [1.4 * predicted[0], predicted[1], predicted[2], -1.04]
    camera = pnp_camera(rec, views, geometry, 1)
    if shared_camera:
        assert camera.camera_id == camera_id and camera.params[3] == -1.04
    else:
        k = intrinsics_to_original(views[1], geometry.intrinsics[1]).numpy()
        assert np.allclose(camera.params, [k[0, 0], k[0, 2], k[1, 2], 0.0]) and predicted[3] == 0.0
        assert np.allclose(camera.params, predicted) and (camera.width, camera.height) == (64, 48)
        assert rec.cameras[camera_id].params[3] == -1.04  # the reconstruction is not touched
