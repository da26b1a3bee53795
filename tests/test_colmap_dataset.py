"""COLMAP dataset writing and loading (synthetic and real-style models)."""

from __future__ import annotations

import numpy as np
import pycolmap
import pytest
import torch
from PIL import Image

import speed3r_sfm.data.colmap_dataset as cd
from speed3r_sfm.data.colmap_dataset import load_colmap_dataset, write_colmap_dataset
from speed3r_sfm.data.synthetic import render_scene


@pytest.fixture(scope="module")
def views():
    return render_scene(21, 3, 24, 32, "random")


def test_round_trip_preserves_poses_intrinsics_depth_and_images(tmp_path, views):
    root = write_colmap_dataset(
        tmp_path / "scene", views.images, views.intrinsics, views.cam_from_world, views.depth
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene"], "no temporary folders may remain"
    ds = load_colmap_dataset(root)
    assert ds.image_names == ["00000.png", "00001.png", "00002.png"]
    assert torch.allclose(ds.intrinsics, views.intrinsics.double(), atol=1e-4)
    assert torch.allclose(ds.cam_from_world, views.cam_from_world.double(), atol=1e-6)
    assert ds.image_sizes.tolist() == [[24, 32]] * 3
    assert all(ds.distortion_free) and ds.camera_models == ["PINHOLE"] * 3
    for i in range(3):
        assert torch.equal(ds.load_depth(i), views.depth[i])
        assert (ds.load_image(i) - views.images[i]).abs().max() <= 0.5 / 255 + 1e-6

    # Read the model with pycolmap directly: COLMAP's principal point is ours + 0.5.
    rec = pycolmap.Reconstruction(str(root / "sparse" / "0"))
    assert rec.num_reg_images() == 3 and rec.num_cameras() == 1, "identical K share one camera"
    cam = next(iter(rec.cameras.values()))
    k = views.intrinsics[0].double()
    assert np.allclose(cam.params, [k[0, 0], k[1, 1], k[0, 2] + 0.5, k[1, 2] + 0.5], atol=1e-4)


def test_existing_output_is_kept_unless_overwrite(tmp_path, views):
    target = tmp_path / "scene"
    write_colmap_dataset(target, views.images, views.intrinsics, views.cam_from_world)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_colmap_dataset(target, views.images, views.intrinsics, views.cam_from_world)
    assert load_colmap_dataset(target).depth_file is None
    write_colmap_dataset(
        target, views.images, views.intrinsics, views.cam_from_world, views.depth, overwrite=True
    )
    assert load_colmap_dataset(target).depth_file is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene"]


def test_failed_write_leaves_nothing_behind(tmp_path, views, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cd, "build_reconstruction", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_colmap_dataset(
            tmp_path / "scene", views.images, views.intrinsics, views.cam_from_world, views.depth
        )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="depth must be"):
        write_colmap_dataset(
            tmp_path / "scene", views.images, views.intrinsics, views.cam_from_world, views.depth[:2]
        )


def _real_style_model(root, model: str, params: list[float]):
    """A model as COLMAP writes it (sparse/ without 0/): one distorted camera, one unregistered image."""
    (root / "images").mkdir(parents=True)
    rec = pycolmap.Reconstruction()
    rec.add_camera_with_trivial_rig(
        pycolmap.Camera(camera_id=1, model=model, width=40, height=30, params=params)
    )
    pose = np.hstack([np.eye(3), np.array([[0.1], [0.2], [0.3]])])
    for i, name in enumerate(["b.jpg", "a.jpg"]):
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "images" / name)
        rec.add_image_with_trivial_frame(
            pycolmap.Image(name=name, camera_id=1, image_id=i + 1), pycolmap.Rigid3d(pose)
        )
    rec.add_image_with_trivial_frame(pycolmap.Image(name="c.jpg", camera_id=1, image_id=3))
    (root / "sparse").mkdir()
    rec.write(str(root / "sparse"))


def test_loads_real_colmap_models_with_any_camera_model(tmp_path):
    _real_style_model(tmp_path, "SIMPLE_RADIAL", [50.0, 20.0, 15.0, 0.05])
    ds = load_colmap_dataset(tmp_path)
    assert ds.image_names == ["a.jpg", "b.jpg"], "registered images only, sorted by name"
    expected_k = torch.tensor([[50.0, 0.0, 19.5], [0.0, 50.0, 14.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(ds.intrinsics[0], expected_k)
    assert ds.distortion_free == [False, False]
    assert torch.allclose(ds.cam_from_world[0, :, 3], torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    plain = r"SIMPLE_RADIAL \(parameters \[50, 20, 15, 0.05\]\).*image_undistorter"
    with pytest.raises(ValueError, match=plain):
        load_colmap_dataset(tmp_path, require_pinhole=True)
    with pytest.raises(FileNotFoundError, match="no depth maps"):
        ds.load_depth(0)


def test_a_missing_or_misshapen_depth_map_is_a_dataset_error(tmp_path, views):
    """A depth map missing for one image was a KeyError traceback in fit; one of another size (a crop, the
    transpose) was stretched to the image and trained on silently."""
    import h5py

    root = write_colmap_dataset(
        tmp_path / "scene", views.images, views.intrinsics, views.cam_from_world, views.depth
    )
    with h5py.File(root / cd.DEPTH_FILE, "a") as f:
        del f["00001.png"]
        depth = f["00002.png"][()]
        del f["00002.png"]
        f["00002.png"] = depth.T
    ds = load_colmap_dataset(root)
    assert torch.equal(ds.load_depth(0), views.depth[0])
    with pytest.raises(cd.ColmapDatasetError, match="has no depth map for image '00001.png'"):
        ds.load_depth(1)
    with pytest.raises(cd.ColmapDatasetError, match=r"depth map of '00002.png' is \(32, 24\) .* \(24, 32\)"):
        ds.load_depth(2)


def test_clear_errors_for_missing_pieces(tmp_path):
    with pytest.raises(FileNotFoundError, match="no COLMAP model"):
        load_colmap_dataset(tmp_path)
    _real_style_model(tmp_path, "PINHOLE", [50.0, 50.0, 20.0, 15.0])
    assert load_colmap_dataset(tmp_path, require_pinhole=True).distortion_free == [True, True]
    (tmp_path / "images" / "a.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="a.jpg"):
        load_colmap_dataset(tmp_path)


def test_written_dataset_and_weights_get_normal_permissions(tmp_path, views):
    """mkdtemp (the staging folder) and safetensors make private files; what is written is not."""
    import os

    from speed3r_sfm.models.checkpoint import save_checkpoint

    previous = os.umask(0o022)
    try:
        root = write_colmap_dataset(tmp_path / "scene", views.images, views.intrinsics, views.cam_from_world)
        weights = save_checkpoint({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(previous)
    assert root.stat().st_mode & 0o777 == 0o755
    assert weights.stat().st_mode & 0o777 == 0o644
