"""Input handling of the pipeline: listing, skipping, duplicates, mixed and huge sizes, pixel frames."""

from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, JpegImagePlugin

from speed3r_sfm.geometry import intrinsics_from_fov
from speed3r_sfm.pipeline.colmap_model import camera_groups, make_cameras
from speed3r_sfm.pipeline.export import write_image_list
from speed3r_sfm.pipeline.frames import (
    SceneGeometry,
    intrinsics_to_original,
    model_to_work,
    original_to_work,
    work_to_model,
    work_to_original,
)
from speed3r_sfm.pipeline.inputs import (
    LOW_COLOUR_SCORE,
    InputError,
    Preprocessing,
    colour_score,
    find_images,
    load_views,
    select_images,
)


def _image(path, width, height, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


def test_missing_and_empty_folders_name_the_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match=f"no images in {tmp_path}"):
        find_images(tmp_path)
    (tmp_path / "cam0").mkdir()
    _image(tmp_path / "cam0" / "0001.png", 64, 48)
    _image(tmp_path / "cam0" / "0002.png", 64, 48)
    with pytest.raises(
        InputError, match=r"subfolders hold images: .*cam0 \(2\): pass one of them.*--recursive"
    ):
        find_images(tmp_path)


def test_recursive_listing_and_image_lists_in_their_order(tmp_path):
    for i, sub in enumerate(("cam1", "cam0")):
        (tmp_path / sub).mkdir()
        for j, name in enumerate(("2.png", "10.png")):
            _image(tmp_path / sub / name, 64, 48, seed=2 * i + j)
    _image(tmp_path / "top.png", 64, 48, seed=9)
    names = [p.relative_to(tmp_path).as_posix() for p in select_images(tmp_path, recursive=True)]
    assert names == ["cam0/2.png", "cam0/10.png", "cam1/2.png", "cam1/10.png", "top.png"]
    assert [p.name for p in select_images(tmp_path)] == ["top.png"]
    listed = ["cam1/10.png", "top.png", "cam0/2.png"]
    assert select_images(tmp_path, listed) == [tmp_path / n for n in listed]
    text = tmp_path.parent / "list.txt"
    text.write_text("\ufeff# chosen views\r\n  cam1/10.png\r\n\r\ntop.png\n./cam0/2.png\n", encoding="utf-8")
    assert select_images(tmp_path, text) == [tmp_path / n for n in listed]
    views, _, _ = load_views(select_images(tmp_path, text), tmp_path, Preprocessing("crop", 56))
    assert [v.name for v in views] == listed  # COLMAP names: relative paths


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            ["a.png", "gone.png", "cam0/b.png"],
            r"image_list: 2 of 3 listed images are not files in .*: gone.png, cam0/b.png",
        ),
        (["a.png", "./a.png"], "names a.png twice"),
        (["../a.png"], "not a path inside the image folder"),
        ([], "names no image"),
    ],
)
def test_bad_image_lists_name_the_entry(tmp_path, entries, message):
    _image(tmp_path / "a.png", 64, 48)
    with pytest.raises(InputError, match=message):
        select_images(tmp_path, entries)


def test_a_written_image_list_reads_back_names_that_look_like_comments(tmp_path):
    names = ["#1.png", "a.png", "sub/#2.png"]
    for seed, name in enumerate(names):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        _image(tmp_path / name, 64, 48, seed=seed)
    write_image_list(tmp_path / "list.txt", names)
    assert select_images(tmp_path, tmp_path / "list.txt") == [tmp_path / name for name in names]
    views, _, _ = load_views(
        select_images(tmp_path, tmp_path / "list.txt"), tmp_path, Preprocessing("crop", 56)
    )
    assert [v.name for v in views] == names


def test_missing_image_list_file_is_named(tmp_path):
    _image(tmp_path / "a.png", 64, 48)
    with pytest.raises(InputError, match=r"image list .*nope.txt does not exist"):
        select_images(tmp_path, tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(InputError, match=r"image list .*empty.txt names no image"):
        select_images(tmp_path, tmp_path / "empty.txt")


def test_one_image_is_an_error(tmp_path):
    _image(tmp_path / "a.png", 64, 48)
    with pytest.raises(InputError, match="at least 2"):
        load_views(find_images(tmp_path), tmp_path, Preprocessing("crop", 56))


def test_corrupt_and_duplicate_files_are_skipped_with_a_warning(tmp_path, caplog):
    _image(tmp_path / "a.png", 64, 48, seed=1)
    _image(tmp_path / "b.png", 64, 48, seed=2)
    shutil.copy(tmp_path / "a.png", tmp_path / "c.png")  # exact duplicate
    (tmp_path / "d.jpg").write_bytes(b"this is not a jpeg")  # corrupt
    _image(tmp_path / "e.png", 10, 8)  # too small
    _image(tmp_path / "f.png", 2000, 31)
    (tmp_path / "g.png").symlink_to(tmp_path / "gone.png")  # a broken link
    with caplog.at_level(logging.WARNING):
        views, images, skipped = load_views(find_images(tmp_path), tmp_path, Preprocessing("crop", 56))
    assert [v.name for v in views] == ["a.png", "b.png"]
    assert images.shape == (2, 3, 42, 56)
    assert any("c.png" in s and "duplicate of a.png" in s for s in skipped)
    assert any("d.jpg" in s and "not a readable image" in s for s in skipped)
    assert any("e.png" in s and "too small (10x8 pixels; at least 32 per side)" in s for s in skipped)
    assert any("f.png" in s and "too small (2000x31 pixels" in s for s in skipped)
    assert any("g.png" in s and "cannot read the file" in s for s in skipped)
    assert "d.jpg" in caplog.text and "c.png" in caplog.text
    for k in range(4):  # past LOGGED_SKIPS, one line for the rest; the returned list keeps them all
        shutil.copy(tmp_path / "b.png", tmp_path / f"h{k}.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, _, skipped = load_views(find_images(tmp_path), tmp_path, Preprocessing("crop", 56))
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 9 and lines[:5] == skipped[:5]
    assert lines[5:] == ["skipped 4 more files (the run's report lists every skipped file)"]


def test_only_bad_files_left_is_an_error_listing_them(tmp_path):
    _image(tmp_path / "a.png", 64, 48)
    (tmp_path / "b.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(InputError, match="b.png"):
        load_views(find_images(tmp_path), tmp_path, Preprocessing("crop", 56))


def test_huge_images_are_read_downscaled_but_map_to_original_pixels(tmp_path):
    _image(tmp_path / "big.png", 2400, 1800, seed=3)
    _image(tmp_path / "small.png", 320, 240, seed=4)
    views, images, _ = load_views(
        find_images(tmp_path), tmp_path, Preprocessing("crop", 112), max_image_size=600
    )
    big = views[0]
    assert big.name == "big.png" and big.original_size == (2400, 1800)
    assert big.work_size == (600, 450)
    assert big.transform.original_size == (2400, 1800) and big.transform.model_size == (112, 84)
    # the image centre and corners map consistently through every frame
    corners = torch.tensor([[0.0, 0.0], [2400.0, 1800.0], [1200.0, 900.0]], dtype=torch.float64)
    work = original_to_work(big, corners)
    assert torch.allclose(work_to_original(big, work), corners)
    assert torch.allclose(
        work, torch.tensor([[-0.5, -0.5], [599.5, 449.5], [299.5, 224.5]], dtype=torch.float64)
    )
    model = work_to_model(big, work)
    assert torch.allclose(
        model, torch.tensor([[-0.5, -0.5], [111.5, 83.5], [55.5, 41.5]], dtype=torch.float64)
    )
    assert torch.allclose(model_to_work(big, model), work)


def _smooth_jpeg(path, width, height, orientation=1):
    """A smooth colour gradient with some texture as a JPEG (quality 95), optionally EXIF-rotated."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack([x / width, y / height, 0.5 + 0.25 * np.sin(x / 37.0) * np.cos(y / 23.0)], -1)
    image = Image.fromarray((255 * rgb).round().astype(np.uint8))
    exif = image.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif)


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpegs_are_decoded_at_a_reduced_scale_with_the_same_pixels(tmp_path, orientation, monkeypatch):
    """A 3200 x 2400 JPEG with a 600-pixel work copy decodes at 1/4 (DCT scaling) and gives the work copy
    a full decode would, within JPEG rounding; sizes and EXIF orientation stay those of the original. A
    size the factors do not divide is decoded in full."""
    _smooth_jpeg(tmp_path / "big.jpg", 3200, 2400, orientation)
    _smooth_jpeg(tmp_path / "odd.jpg", 3201, 2401)
    requested = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size, *args, **kwargs):
        requested.append(size)
        return draft(self, mode, size, *args, **kwargs)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    views, _, _ = load_views(find_images(tmp_path), tmp_path, Preprocessing("crop", 112), max_image_size=600)
    big, odd = views
    assert requested == [(800, 600)]  # 1/4 scale for big.jpg; odd.jpg decoded in full
    upright = (2400, 3200) if orientation == 6 else (3200, 2400)
    assert big.original_size == upright and big.transform.original_size == upright
    assert big.work_size == ((450, 600) if orientation == 6 else (600, 450))
    assert big.exif_orientation == orientation and odd.original_size == (3201, 2401)
    full = ImageOps.exif_transpose(Image.open(tmp_path / "big.jpg").convert("RGB"))
    reference = np.asarray(full.resize(big.work_size, Image.Resampling.BILINEAR), dtype=np.float64)
    difference = np.abs(big.work_rgb.astype(np.float64) - reference)
    assert difference.mean() < 1.0 and difference.max() <= 6


@pytest.mark.parametrize("mode", ["crop", "pad", "pixel_limit"])
def test_intrinsics_and_points_map_back_to_each_original_image(tmp_path, mode):
    """Reference check: projecting with K mapped to the original equals projecting in the model image and
    mapping the pixel back, for mixed sizes and every preprocessing mode."""
    sizes = [(320, 240), (200, 300), (640, 360)]
    for i, (w, h) in enumerate(sizes):
        _image(tmp_path / f"{i}.png", w, h, seed=i)
    views, images, _ = load_views(
        find_images(tmp_path), tmp_path, Preprocessing(mode, 112, pixel_limit=12_000), max_image_size=400
    )
    s, _, height, width = images.shape
    k_model = intrinsics_from_fov(60.0, height, width, dtype=torch.float64).expand(s, 3, 3).clone()
    k_model[1, 1, 1] *= 1.1  # fx != fy
    geometry = SceneGeometry(
        k_model,
        torch.eye(3, 4, dtype=torch.float64).expand(s, 3, 4),
        torch.ones(s, height, width),
        torch.ones(s, height, width),
    )
    points = torch.tensor([[0.1, -0.2, 2.0], [-0.4, 0.3, 3.0], [0.0, 0.0, 1.5]], dtype=torch.float64)
    for i, view in enumerate(views):
        uv_model, _ = geometry.project(i, points)
        via_model = work_to_original(view, model_to_work(view, uv_model))
        k = intrinsics_to_original(view, k_model[i])
        projected = points @ k.T
        direct = projected[:, :2] / projected[:, 2:]
        assert torch.allclose(via_model, direct, atol=1e-9), (mode, view.name)


def test_shared_camera_needs_one_image_size(tmp_path):
    _image(tmp_path / "a.png", 64, 48)
    _image(tmp_path / "b.png", 48, 64)
    views, images, _ = load_views(find_images(tmp_path), tmp_path, Preprocessing("pad", 56))
    s, _, h, w = images.shape
    geometry = SceneGeometry(
        intrinsics_from_fov(60.0, h, w, dtype=torch.float64).expand(s, 3, 3).clone(),
        torch.eye(3, 4, dtype=torch.float64).expand(s, 3, 4),
        torch.ones(s, h, w),
        torch.ones(s, h, w),
    )
    with pytest.raises(
        InputError, match=r"shared_camera=True needs images of one size, got 2: 64x48 \(1 image, e.g. a.png\)"
    ):
        make_cameras(views, geometry, "PINHOLE", shared_camera=True)
    with pytest.raises(InputError, match=r"shared_camera='per_folder' \(folder '.'\) needs images of one"):
        make_cameras(views, geometry, "PINHOLE", shared_camera="per_folder")
    with pytest.raises(ValueError, match="True, False or 'per_folder'"):
        make_cameras(views, geometry, "PINHOLE", shared_camera="yes")
    cameras, ids = make_cameras(views, geometry, "PINHOLE", shared_camera=False)
    assert ids == [1, 2] and [(c.width, c.height) for c in cameras] == [(64, 48), (48, 64)]


def test_exif_rotated_images_use_upright_pixels(tmp_path, caplog):
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))  # stored 60 x 40
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    _image(tmp_path / "plain.png", 60, 40)
    with caplog.at_level(logging.WARNING):
        views, _, _ = load_views(find_images(tmp_path), tmp_path, Preprocessing("pad", 56))
    rotated = next(v for v in views if v.name == "rotated.jpg")
    assert rotated.original_size == (40, 60) and rotated.exif_orientation == 6
    assert rotated.transform.original_size == (40, 60)
    assert "EXIF orientation" in caplog.text


def test_initial_points_come_from_the_predicted_depth(tmp_path):
    from speed3r_sfm.geometry import look_at
    from speed3r_sfm.pipeline.colmap_model import points_from_depth
    from speed3r_sfm.pipeline.tracks import Tracks

    for i in range(2):
        _image(tmp_path / f"{i}.png", 56, 42, seed=i)
    views, images, _ = load_views(find_images(tmp_path), tmp_path, Preprocessing("crop", 56))
    k = intrinsics_from_fov(60.0, 42, 56, dtype=torch.float64).expand(2, 3, 3).clone()
    poses = look_at(
        torch.tensor([[0.0, -3.0, 0.0], [0.5, -3.0, 0.0]], dtype=torch.float64),
        torch.zeros(2, 3, dtype=torch.float64),
    )
    depth = torch.stack([torch.full((42, 56), 3.0), torch.full((42, 56), 2.0)])
    geometry = SceneGeometry(k, poses, depth, torch.ones(2, 42, 56))
    points = [
        torch.tensor([[10.0, 20.0], [30.0, 5.0]], dtype=torch.float64),
        torch.tensor([[40.0, 30.0]], dtype=torch.float64),
    ]
    # track 0: view 0 point 0 and view 1 point 0; track 1: view 0 point 1 only (depth of view 0)
    tracks = Tracks(points, [2, 1], np.array([0, 2, 3]), np.array([0, 1, 0]), np.array([0, 0, 1]))
    xyz, valid = points_from_depth(views, geometry, tracks)
    assert valid.all()
    expected1 = geometry.unproject(0, points[0][1:2], torch.tensor([3.0], dtype=torch.float64))[0]
    assert torch.allclose(torch.from_numpy(xyz[1]), expected1)
    a = geometry.unproject(0, points[0][0:1], torch.tensor([3.0], dtype=torch.float64))[0]
    b = geometry.unproject(1, points[1][0:1], torch.tensor([2.0], dtype=torch.float64))[0]
    assert torch.allclose(torch.from_numpy(xyz[0]), torch.minimum(a, b))  # torch's nanmedian of 2 = the lower
    uv, z = geometry.project(0, torch.from_numpy(xyz[1:2]))
    assert torch.allclose(uv[0], points[0][1]) and torch.allclose(z, torch.tensor([3.0], dtype=torch.float64))


def test_work_copies_keep_a_minimum_fraction_of_the_original_resolution(tmp_path):
    """min_work_scale=0.5: a 3200 x 2400 JPEG gets a 1600-pixel work copy (not 600), decoded at 1/2 scale;
    a 320-pixel image is never enlarged."""
    _smooth_jpeg(tmp_path / "big.jpg", 3200, 2400)
    _image(tmp_path / "small.png", 320, 240)
    views, _, _ = load_views(
        find_images(tmp_path), tmp_path, Preprocessing("crop", 112), max_image_size=600, min_work_scale=0.5
    )
    big, small = views
    assert big.work_size == (1600, 1200) and big.original_size == (3200, 2400)
    assert small.work_size == (320, 240)
    corner = torch.tensor([[3200.0, 2400.0]], dtype=torch.float64)
    assert torch.allclose(
        original_to_work(big, corner), torch.tensor([[1599.5, 1199.5]], dtype=torch.float64)
    )


def test_camera_groups_follow_colmap_camera_modes():
    views = [SimpleNamespace(name=n) for n in ("cam1/a.png", "cam0/b.png", "cam1/c.png", "top.png")]
    assert camera_groups(views, False) == [1, 2, 3, 4]
    assert camera_groups(views, True) == [1, 1, 1, 1]
    assert camera_groups(views, "per_folder") == [1, 2, 1, 3]  # in order of appearance


def test_recursive_listing_skips_earlier_projects_inside_the_folder(tmp_path, caplog):
    """An earlier run's OUT inside the image folder (report.json, sparse/, undistorted/images) is not
    read as input."""
    _image(tmp_path / "a.png", 64, 48, seed=1)
    (tmp_path / "cam0").mkdir()
    _image(tmp_path / "cam0" / "b.png", 64, 48, seed=2)
    project = tmp_path / "out"
    (project / "sparse" / "0").mkdir(parents=True)
    (project / "report.json").write_text("{}")
    (project / "undistorted" / "images").mkdir(parents=True)
    _image(project / "undistorted" / "images" / "a.png", 60, 44, seed=3)
    with caplog.at_level(logging.WARNING):
        paths = select_images(tmp_path, recursive=True)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["a.png", "cam0/b.png"]
    assert f"skipped the images of {project}" in caplog.text


def test_grayscale_views_are_recognised_in_any_file_mode(tmp_path):
    """L, LA and 16-bit grayscale PNGs, gray saved as an RGB JPEG, gray with channels 2 levels apart and gray
    with a small coloured time stamp read as grayscale; a colour image, channels 3 levels apart and a gray
    image with a larger coloured corner do not (``GRAY_COLOUR_SHARE``)."""
    rng = np.random.default_rng(0)
    gray = (rng.random((64, 80)) * 200 + 20).astype(np.uint8)
    as_rgb = np.repeat(gray[..., None], 3, axis=2)

    def shifted(levels: int) -> np.ndarray:
        rgb = as_rgb.astype(np.int16)
        rgb[..., 0] += levels
        return rgb.astype(np.uint8)

    def corner(size: int) -> np.ndarray:  # a red square in the top-left corner
        rgb = as_rgb.copy()
        rgb[:size, :size] = (230, 20, 20)
        return rgb

    Image.fromarray(gray).save(tmp_path / "a_l.png")
    Image.fromarray(gray).convert("LA").save(tmp_path / "b_la.png")
    Image.fromarray(as_rgb).save(tmp_path / "c_rgb.jpg", quality=90)
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "d_16bit.png")
    Image.fromarray(shifted(2)).save(tmp_path / "e_two_levels.png")
    Image.fromarray(corner(4)).save(tmp_path / "f_time_stamp.png")  # 16 of 5120 pixels
    Image.fromarray((rng.random((64, 80, 3)) * 255).astype(np.uint8)).save(tmp_path / "g_colour.png")
    Image.fromarray(shifted(3)).save(tmp_path / "h_three_levels.png")
    Image.fromarray(corner(12)).save(tmp_path / "i_coloured_corner.png")  # 144 of 5120 pixels
    views, _, _ = load_views(select_images(tmp_path), tmp_path, Preprocessing("crop", 56), 1600, 0.5)
    found = {v.name: v.grayscale for v in views}
    assert found == {
        "a_l.png": True,
        "b_la.png": True,
        "c_rgb.jpg": True,
        "d_16bit.png": True,
        "e_two_levels.png": True,
        "f_time_stamp.png": True,
        "g_colour.png": False,
        "h_three_levels.png": False,
        "i_coloured_corner.png": False,
    }


def _colour_score_reference(rgb: np.ndarray, step: int) -> float:
    """colour_score on every ``step``-th pixel, one luminance level at a time, in float64."""
    by_level: dict[int, list[tuple[float, float]]] = {}
    for y in range(0, rgb.shape[0], step):
        for x in range(0, rgb.shape[1], step):
            r, g, b = (float(c) for c in rgb[y, x])
            luminance = 0.299 * r + 0.587 * g + 0.114 * b
            by_level.setdefault(min(255, max(0, round(luminance))), []).append((b - luminance, r - luminance))
    distances = []
    for chroma in by_level.values():
        mean = np.mean(chroma, axis=0)
        distances += [float(np.hypot(*(np.array(c) - mean))) for c in chroma]
    return float(np.mean(distances))


def test_colour_score_measures_colour_that_brightness_does_not_explain():
    """Against a per-level float64 reference (every pixel of a small image, every 2nd of one with 4x
    ``max_pixels``); 0 for gray and for a tint that is a function of brightness (sepia), half for half the
    saturation, and a coloured image well above ``LOW_COLOUR_SCORE``."""
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    assert colour_score(small) == pytest.approx(_colour_score_reference(small, step=1), rel=1e-9)
    large = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert colour_score(large) == pytest.approx(_colour_score_reference(large, step=2), rel=1e-9)

    smooth = np.stack(np.meshgrid(np.linspace(0, 255, 64), np.linspace(0, 255, 48)), axis=-1)
    colour = np.concatenate([smooth, smooth[..., :1][:, ::-1]], axis=-1).round().astype(np.uint8)
    luminance = colour.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    gray = np.repeat(luminance.round()[..., None], 3, axis=2).astype(np.uint8)
    sepia = np.clip(luminance[..., None] * np.array([1.07, 0.95, 0.74]), 0, 255).round().astype(np.uint8)
    half = (luminance[..., None] + 0.5 * (colour - luminance[..., None])).round().astype(np.uint8)
    assert colour_score(colour) > 10 * LOW_COLOUR_SCORE
    assert colour_score(gray) == 0.0
    assert colour_score(sepia) < 0.5
    assert colour_score(half) == pytest.approx(colour_score(colour) / 2, rel=0.02)
    assert colour_score(colour[:0]) == 0.0
