"""Undistorted images and PINHOLE cameras for splatting / NeRF tools (``undistort.py``)."""

from __future__ import annotations

import numpy as np
import pycolmap
import pytest
from PIL import Image

from speed3r_sfm.pipeline.inputs import InputError
from speed3r_sfm.pipeline.undistort import write_undistorted

WIDTH, HEIGHT = 96, 72


def _pattern(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth intensity of normalised (undistorted) camera coordinates."""
    return 128 + 90 * np.sin(7 * x) * np.cos(5 * y)


def _project(tmp_path, k: float = 0.12, name: str = "view.png") -> tuple[pycolmap.Reconstruction, np.ndarray]:
    """One SIMPLE_RADIAL camera with strong distortion and one image whose pixel (u, v) shows
    ``_pattern`` at the undistorted camera coordinates of its centre (COLMAP: centres at +0.5)."""
    camera = pycolmap.Camera(
        camera_id=1, model="SIMPLE_RADIAL", width=WIDTH, height=HEIGHT, params=[80.0, 48.0, 36.0, k]
    )
    u, v = np.meshgrid(np.arange(WIDTH) + 0.5, np.arange(HEIGHT) + 0.5)
    rays = camera.cam_from_img(np.stack([u.ravel(), v.ravel()], axis=1))
    image = _pattern(rays[:, 0], rays[:, 1]).reshape(HEIGHT, WIDTH)
    rec = pycolmap.Reconstruction()
    rec.add_camera_with_trivial_rig(camera)
    rec.add_image_with_trivial_frame(pycolmap.Image(name=name, camera_id=1, image_id=1), pycolmap.Rigid3d())
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    rec.write(sparse)
    return rec, np.round(image).astype(np.uint8)


def _expected(camera: pycolmap.Camera) -> np.ndarray:
    u, v = np.meshgrid(np.arange(camera.width) + 0.5, np.arange(camera.height) + 0.5)
    fx, fy, cx, cy = camera.params
    return _pattern((u - cx) / fx, (v - cy) / fy)


def test_undistorted_image_shows_the_scene_through_the_pinhole_camera(tmp_path, capfd):
    rec, image = _project(tmp_path)
    Image.fromarray(image).save(tmp_path / "view.png")
    entry = write_undistorted(
        tmp_path / "undistorted", rec, tmp_path / "sparse", {"view.png": (tmp_path / "view.png", 1)}
    )
    assert entry["images"] == 1 and entry["camera_models"] == ["PINHOLE"]
    assert "Undistorting image" not in capfd.readouterr().err  # COLMAP's INFO log stays quiet
    out = tmp_path / "undistorted"
    assert sorted(p.name for p in out.iterdir()) == ["images", "sparse"]  # no MVS workspace left
    rec = pycolmap.Reconstruction(out / "sparse" / "0")
    camera = rec.cameras[1]
    got = np.asarray(Image.open(out / "images" / "view.png").convert("L"), dtype=np.float64)
    assert got.shape == (camera.height, camera.width)
    inner = (slice(2, -2), slice(2, -2))
    error = np.abs(got - _expected(camera))[inner]
    assert np.median(error) < 0.6 and error.max() < 2.5  # bilinear resampling, 8-bit rounding
    # the distorted image read as if it were a pinhole is clearly off: the check can fail
    h, w = min(got.shape[0], HEIGHT), min(got.shape[1], WIDTH)
    raw = np.abs(image[:h, :w].astype(np.float64) - _expected(camera)[:h, :w])
    assert np.median(raw[2:-2, 2:-2]) > 5 * np.median(error)


def test_exif_rotated_images_are_undistorted_upright(tmp_path):
    """COLMAP reads stored pixels; an image stored rotated with an EXIF orientation is given to it
    upright, as the project's coordinates are."""
    rec, image = _project(tmp_path)
    upright = Image.fromarray(image)
    upright.save(tmp_path / "upright.png")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # EXIF 6: rotate 270 (90 clockwise) to show
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "stored.png", exif=exif.tobytes())
    first = write_undistorted(
        tmp_path / "a", rec, tmp_path / "sparse", {"view.png": (tmp_path / "upright.png", 1)}
    )
    second = write_undistorted(
        tmp_path / "b", rec, tmp_path / "sparse", {"view.png": (tmp_path / "stored.png", 6)}
    )
    assert first["images"] == second["images"] == 1
    a = np.asarray(Image.open(tmp_path / "a" / "images" / "view.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "images" / "view.png"))
    assert np.array_equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # inputs removed


def test_a_missing_image_is_an_error(tmp_path):
    rec, _ = _project(tmp_path)
    (tmp_path / "other.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image .*other.png any more"):
        write_undistorted(
            tmp_path / "out", rec, tmp_path / "sparse", {"view.png": (tmp_path / "other.png", 1)}
        )


def test_images_are_copied_where_links_cannot_be_made(tmp_path, monkeypatch):
    rec, image = _project(tmp_path)
    Image.fromarray(image).save(tmp_path / "view.png")

    def no_links(*args, **kwargs):
        raise OSError("operation not permitted (simulated)")

    monkeypatch.setattr("speed3r_sfm.pipeline.undistort.os.symlink", no_links)
    entry = write_undistorted(
        tmp_path / "out", rec, tmp_path / "sparse", {"view.png": (tmp_path / "view.png", 1)}
    )
    assert entry["images"] == 1 and (tmp_path / "out" / "images" / "view.png").is_file()


def test_webp_goes_through_as_png_and_comes_back_as_webp(tmp_path):
    """COLMAP's image library reads and writes no WebP: the undistorter gets a PNG copy, the output is a
    lossless WebP under the original name, resampled as the PNG path resamples it."""
    rec, image = _project(tmp_path, name="sub/view.webp")
    (tmp_path / "sub").mkdir()
    Image.fromarray(image).save(tmp_path / "sub" / "view.webp", lossless=True)
    Image.fromarray(image).save(tmp_path / "view.png")
    entry = write_undistorted(
        tmp_path / "out", rec, tmp_path / "sparse", {"sub/view.webp": (tmp_path / "sub" / "view.webp", 1)}
    )
    assert entry["images"] == 1 and entry["camera_models"] == ["PINHOLE"]
    out = tmp_path / "out"
    assert [p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*.*")] == [
        "sub/view.webp"
    ]
    undistorted = pycolmap.Reconstruction(out / "sparse" / "0")
    assert [im.name for im in undistorted.images.values()] == ["sub/view.webp"]
    with Image.open(out / "images" / "sub" / "view.webp") as webp:
        assert webp.format == "WEBP"
        got = np.asarray(webp.convert("L"))
    (tmp_path / "png").mkdir()
    rec_png, _ = _project(tmp_path / "png")
    source = {"view.png": (tmp_path / "view.png", 1)}
    write_undistorted(tmp_path / "ref", rec_png, tmp_path / "png" / "sparse", source)
    reference = np.asarray(Image.open(tmp_path / "ref" / "images" / "view.png").convert("L"))
    assert np.array_equal(got, reference)


def test_cameras_without_distortion_come_out_as_pinholes(tmp_path):
    """COLMAP passes a camera with zero distortion through unchanged (here SIMPLE_RADIAL, k = 0); the
    splatting tools take pinholes only."""
    rec, image = _project(tmp_path, k=0.0)
    Image.fromarray(image).save(tmp_path / "view.png")
    entry = write_undistorted(
        tmp_path / "out", rec, tmp_path / "sparse", {"view.png": (tmp_path / "view.png", 1)}
    )
    assert entry["camera_models"] == ["PINHOLE"]
    camera = pycolmap.Reconstruction(tmp_path / "out" / "sparse" / "0").cameras[1]
    assert camera.model.name == "PINHOLE"
    np.testing.assert_allclose(camera.params, [80.0, 80.0, 48.0, 36.0])


@pytest.mark.parametrize("orientation,turn", [(6, -1), (3, 2)])
def test_a_rotated_tiff_is_undistorted_upright(tmp_path, orientation, turn):
    """Pillow turns TIFFs upright on reading, COLMAP does not: the undistorter gets an upright copy (a
    quarter turn had aborted the process, a half turn came out upside down under upright poses)."""
    from speed3r_sfm.data.images import read_image_upright

    rec, image = _project(tmp_path, name="view.tif")
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(np.rot90(image, k=-turn))).save(tmp_path / "view.tif", exif=exif)
    Image.fromarray(image).save(tmp_path / "upright.tif")
    _, read_orientation, size = read_image_upright(tmp_path / "view.tif")
    assert read_orientation == orientation and size == (WIDTH, HEIGHT)
    write_undistorted(tmp_path / "a", rec, tmp_path / "sparse", {"view.tif": (tmp_path / "upright.tif", 1)})
    write_undistorted(
        tmp_path / "b", rec, tmp_path / "sparse", {"view.tif": (tmp_path / "view.tif", orientation)}
    )
    expected = pycolmap.Bitmap.read(str(tmp_path / "a" / "images" / "view.tif"), as_rgb=False).to_array()
    got = pycolmap.Bitmap.read(str(tmp_path / "b" / "images" / "view.tif"), as_rgb=False).to_array()
    assert np.array_equal(got, expected)  # as COLMAP reads them: stored pixels, no tag applied


def test_a_webp_staged_as_png_does_not_clash_with_a_png_of_that_name(tmp_path):
    rec, image = _project(tmp_path, name="v.webp")
    camera = next(iter(rec.cameras.values()))
    rec.add_image_with_trivial_frame(
        pycolmap.Image(name="v.webp.png", camera_id=camera.camera_id, image_id=2), pycolmap.Rigid3d()
    )
    rec.write(tmp_path / "sparse")
    Image.fromarray(image).save(tmp_path / "v.webp", lossless=True)
    Image.fromarray(255 - image).save(tmp_path / "v.webp.png")
    sources = {"v.webp": (tmp_path / "v.webp", 1), "v.webp.png": (tmp_path / "v.webp.png", 1)}
    entry = write_undistorted(tmp_path / "out", rec, tmp_path / "sparse", sources)
    assert entry["images"] == 2
    images = tmp_path / "out" / "images"
    assert sorted(p.name for p in images.iterdir()) == ["v.webp", "v.webp.png"]
    webp = np.asarray(Image.open(images / "v.webp").convert("L"), dtype=int)
    png = np.asarray(Image.open(images / "v.webp.png").convert("L"), dtype=int)
    assert np.abs(webp + png - 255)[2:-2, 2:-2].max() <= 2  # each image kept its own content


def test_an_image_changed_during_the_run_is_an_error_not_an_abort(tmp_path):
    rec, image = _project(tmp_path)
    Image.fromarray(image[:, : WIDTH // 2]).save(tmp_path / "view.png")  # not the camera's size any more
    with pytest.raises(
        InputError, match=r"view.png is 48x72 pixels .* but was 96x72 .* changed during the run"
    ):
        write_undistorted(
            tmp_path / "out", rec, tmp_path / "sparse", {"view.png": (tmp_path / "view.png", 1)}
        )
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out-inputs").exists()
