"""The SIFT fallback's helpers (the end-to-end rescue is in test_pipeline_end_to_end.py)."""

from pathlib import Path

import numpy as np
import pycolmap
import pytest

from speed3r_sfm.data.images import ImageTransform
from speed3r_sfm.pipeline.colmap_log import colmap_log_level
from speed3r_sfm.pipeline.inputs import View
from speed3r_sfm.pipeline.sift_rescue import SiftFeatures, nearest_registered, triangulated


def test_nearest_registered_follows_the_pose_tree_else_the_image_order():
    registered = [0, 1, 2, 6, 7]
    # tree: 3-6-7 and 3-4-5-0-1-2: view 3 is one hop from 6, two from 7, four from 0
    tree = [(3, 6), (6, 7), (3, 4), (4, 5), (5, 0), (0, 1), (1, 2)]
    assert nearest_registered(3, registered, 8, tree, 3) == [6, 7, 0]
    assert nearest_registered(3, registered, 8, [], 3) == [2, 1, 0]  # |3 - v|; 0 and 6 tie: the lower
    assert nearest_registered(3, [0, 1], 8, [(3, 4)], 3) == []  # not reachable through the tree


def _two_view_reconstruction() -> pycolmap.Reconstruction:
    rec = pycolmap.Reconstruction()
    camera = pycolmap.Camera(model="PINHOLE", width=640, height=480, params=[500.0, 500.0, 320.0, 240.0])
    camera.camera_id = 1
    rec.add_camera_with_trivial_rig(camera)
    for image_id, x in ((1, 0.0), (2, -0.5)):  # camera 2 sits 0.5 to the right of camera 1
        image = pycolmap.Image(name=f"{image_id}.png", camera_id=1, image_id=image_id)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(pycolmap.Rotation3d(), [x, 0.0, 0.0]))
    return rec


def test_triangulated_points_are_kept_where_both_views_agree():
    rec = _two_view_reconstruction()
    rng = np.random.default_rng(0)
    points = np.column_stack([rng.uniform(-1, 1, 40), rng.uniform(-1, 1, 40), rng.uniform(3, 6, 40)])
    xy = [rec.cameras[1].img_from_cam(rec.image(i).cam_from_world() * points) for i in (1, 2)]
    xy_b = xy[1].copy()
    xy_b[:5, 1] += 25.0  # five wrong matches: 25 px across the (horizontal) epipolar lines
    far = np.array([[0.0, 0.0, 500.0]])  # seen under 0.06 degrees
    far_xy = [rec.cameras[1].img_from_cam(rec.image(i).cam_from_world() * far) for i in (1, 2)]
    xyz, kept = triangulated(rec, 0, 1, np.vstack([xy[0], far_xy[0]]), np.vstack([xy_b, far_xy[1]]), 4.0, 1.5)
    assert kept.tolist() == list(range(5, 40))
    assert np.abs(xyz - points[5:]).max() < 1e-6


def test_sift_features_keep_colmap_quiet_and_restore_its_log_level(capfd):
    """The extractor's INFO line stays out of the user's terminal; the caller's level comes back."""
    rng = np.random.default_rng(0)
    work = (rng.random((120, 160, 3)) * 255).astype(np.uint8)
    transform = ImageTransform((160, 120), (160, 120), (0, 0), (0, 0), (160, 120))
    view = View("a.png", Path("a.png"), (160, 120), work, transform)
    previous = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = pycolmap.logging.INFO
    try:
        xy, descriptors = SiftFeatures([view], 160, 0.8)(0)
        assert pycolmap.logging.minloglevel == int(pycolmap.logging.INFO)
    finally:
        pycolmap.logging.minloglevel = previous
    assert len(xy) == len(descriptors) > 0
    assert "Creating SIFT" not in capfd.readouterr().err
    with pytest.raises(RuntimeError), colmap_log_level(pycolmap.logging.ERROR):
        assert pycolmap.logging.minloglevel == int(pycolmap.logging.ERROR)
        raise RuntimeError
    assert pycolmap.logging.minloglevel == previous
