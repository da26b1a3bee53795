"""Further models renumbered into the first model's ids (speed3r_sfm.pipeline.model_ids)."""

from __future__ import annotations

import numpy as np
import pycolmap
import pytest

from speed3r_sfm.pipeline.model_ids import in_first_model_ids, matches_in_first_model_ids


def _model(names: list[str], camera_of: list[int], focal: float, registered: set[str] | None = None):
    """Images ``names`` (ids 1..n) with cameras ``camera_of`` (ids), 3 keypoints each, posed unless not in
    ``registered``; one 3D point seen by the first keypoint of every registered image."""
    rec = pycolmap.Reconstruction()
    for camera_id in sorted(set(camera_of)):
        rec.add_camera_with_trivial_rig(
            pycolmap.Camera(
                camera_id=camera_id, model="SIMPLE_PINHOLE", width=64, height=48, params=[focal, 32, 24]
            )
        )
    for k, (name, camera_id) in enumerate(zip(names, camera_of, strict=True)):
        keypoints = np.array([[k + 1.0, 2.0], [3.0, k + 4.0], [5.0, 6.0]])
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(), np.array([float(k), 0.0, 0.0]))
        rec.add_image_with_trivial_frame(
            pycolmap.Image(name=name, keypoints=keypoints, camera_id=camera_id, image_id=k + 1), pose
        )
        if registered is not None and name not in registered:
            rec.deregister_frame(rec.image(k + 1).frame_id)
    track = pycolmap.Track()
    for image_id in rec.reg_image_ids():
        track.add_element(image_id, 0)
    point_id = rec.add_point3D(np.array([0.0, 0.0, 5.0]), track, np.array([10, 20, 30], dtype=np.uint8))
    rec.points3D[point_id].error = 0.25
    return rec


@pytest.mark.parametrize("shared", [False, True])
def test_a_further_model_takes_the_first_models_image_camera_rig_and_frame_ids(shared):
    names = ["a.png", "b.png", "c.png", "d.png", "e.png"]
    first = _model(names, [1] * 5 if shared else [1, 2, 3, 4, 5], focal=50.0, registered={"a.png", "b.png"})
    further = _model(["c.png", "d.png", "e.png"], [1] * 3 if shared else [1, 2, 3], 70.0, {"c.png", "e.png"})
    renumbered = in_first_model_ids(further, first)

    assert sorted(renumbered.images) == [3, 5] and renumbered.num_reg_images() == 2
    for image_id in (3, 5):
        image, old = renumbered.image(image_id), further.find_image_with_name(names[image_id - 1])
        assert image.name == names[image_id - 1] and image.camera_id == first.image(image_id).camera_id
        assert image.frame_id == image_id and renumbered.frame(image_id).rig_id == image.camera_id
        assert image.camera.params == pytest.approx([70.0, 32, 24])  # the further model's own estimate
        assert np.allclose(image.cam_from_world().matrix(), old.cam_from_world().matrix())
        assert np.allclose([p.xy for p in image.points2D], [p.xy for p in old.points2D])
    assert sorted(renumbered.cameras) == ([1] if shared else [3, 5])
    [point] = renumbered.points3D.values()
    assert sorted((e.image_id, e.point2D_idx) for e in point.track.elements) == [(3, 0), (5, 0)]
    assert point.error == 0.25 and list(point.color) == [10, 20, 30]
    assert renumbered.image(3).points2D[0].point3D_id == renumbered.image(5).points2D[0].point3D_id


def test_cameras_grouped_otherwise_or_unknown_images_are_refused():
    first = _model(["a.png", "b.png", "c.png"], [1, 2, 3], focal=50.0, registered={"a.png"})
    with pytest.raises(ValueError, match="two cameras of the first"):
        in_first_model_ids(_model(["b.png", "c.png"], [1, 1], focal=70.0), first)
    with pytest.raises(ValueError, match="no image named 'x.png'"):
        in_first_model_ids(_model(["b.png", "x.png"], [1, 2], focal=70.0), first)


def test_matches_are_keyed_by_the_first_models_ids_smaller_first():
    first = _model(["a.png", "b.png", "c.png", "d.png"], [1, 2, 3, 4], focal=50.0)
    matches = np.array([[0, 2], [1, 1]])
    renumbered = matches_in_first_model_ids({(0, 1): matches}, ["d.png", "b.png"], first)
    assert list(renumbered) == [(1, 3)]
    assert np.array_equal(renumbered[(1, 3)], matches[:, ::-1])
    kept = matches_in_first_model_ids({(0, 1): matches}, ["b.png", "d.png"], first)
    assert np.array_equal(kept[(1, 3)], matches)
