"""Image reading (EXIF, 16-bit, gray, alpha), natural order, preprocessing sizes, exact mapping back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from speed3r_sfm.data.images import (
    ImageReadError,
    ImageTransform,
    _decode_plain_png,
    list_images,
    pixel_limit_size,
    preprocess_images,
    read_image,
    read_image_upright,
)


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # stored 40 wide, 20 high
    stored[:5, :5] = (255, 0, 0)  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90° clockwise
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = read_image(tmp_path / "rotated.jpg")
    assert image.mode == "RGB" and image.size == (20, 40)
    pixels = np.asarray(image).astype(int)
    assert pixels[1, 18, 0] > 200 and pixels[1, 18, 1:].max() < 60  # now in the top-right corner
    assert pixels[38, 1].max() < 60
    _, transforms = preprocess_images([tmp_path / "rotated.jpg"], mode="pad", target_size=28)
    assert transforms[0].exif_orientation == 6 and transforms[0].original_size == (20, 40)


@pytest.mark.parametrize("suffix", [".tif", ".jpg", ".webp", ".png"])
@pytest.mark.parametrize("orientation,turn", [(6, -1), (8, 1), (3, 2)])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_format_reports_its_files_orientation(tmp_path, suffix, orientation, turn, channels):
    """Pillow turns a TIFF upright itself and drops its tag on load (not an uncompressed gray one that it
    maps from the file): the file's orientation is reported, with the upright size and pixels, as for the
    other formats."""
    upright = np.zeros((20, 40, 3), dtype=np.uint8)
    upright[:5, :5] = (255, 0, 0)
    if channels == 1:
        upright = np.ascontiguousarray(upright[..., 0])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(np.rot90(upright, k=-turn))  # what the tag turns upright
    path = tmp_path / f"rotated{suffix}"
    Image.fromarray(stored).save(path, exif=exif, **({"lossless": True} if suffix == ".webp" else {}))
    image, got, size = read_image_upright(path)
    assert got == orientation and size == (40, 20) and image.size == (40, 20)
    pixels = np.asarray(image).astype(int)
    assert pixels[1, 1, 0] > 200 and pixels[18, 38].max() < 60
    assert channels == 1 or pixels[1, 1, 1:].max() < 60  # red


def test_sixteen_bit_png_is_scaled_to_eight_bit(tmp_path):
    values = np.array([[0, 65535, 128 * 257, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "depth16.png")
    assert Image.open(tmp_path / "depth16.png").mode.startswith("I")
    pixels = np.asarray(read_image(tmp_path / "depth16.png"))
    assert pixels.shape == (1, 4, 3)
    assert pixels[0, :, 0].tolist() == [0, 255, 128, 4]
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_grayscale_and_float_images_become_rgb(tmp_path):
    Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8)).save(tmp_path / "gray.png")
    assert np.asarray(read_image(tmp_path / "gray.png"))[0].tolist() == [[0] * 3, [77] * 3, [255] * 3]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "float.tif")
    assert np.asarray(read_image(tmp_path / "float.tif"))[0, :, 0].tolist() == [0, 128, 255]


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    pixels = np.asarray(read_image(tmp_path / "alpha.png")).astype(int)
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[0, 1].tolist() == [0, 0, 255]
    assert np.abs(pixels[0, 2] - 127).max() <= 1
    gray_alpha = Image.fromarray(np.array([[[10, 0], [10, 255]]], dtype=np.uint8), "LA")
    gray_alpha.save(tmp_path / "la.png")
    assert np.asarray(read_image(tmp_path / "la.png"))[0].tolist() == [[255] * 3, [10] * 3]
    palette = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    palette.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)
    palette.save(tmp_path / "palette.png", transparency=0)
    assert np.asarray(read_image(tmp_path / "palette.png"))[0].tolist() == [[255] * 3, [0, 0, 255]]


def test_plain_png_fast_decode_matches_pil_and_leaves_the_rest_to_it(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    assert np.array_equal(_decode_plain_png(tmp_path / "plain.png"), pixels)  # kornia-rs, same pixels
    assert np.array_equal(np.asarray(read_image(tmp_path / "plain.png")), pixels)
    # a transparency key and an EXIF orientation: PIL's path (the key is ignored for RGB, EXIF rotates)
    Image.fromarray(pixels).save(tmp_path / "keyed.png", transparency=tuple(int(v) for v in pixels[0, 0]))
    assert _decode_plain_png(tmp_path / "keyed.png") is None
    assert np.array_equal(np.asarray(read_image(tmp_path / "keyed.png")), pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "rotated.png", exif=exif)
    assert _decode_plain_png(tmp_path / "rotated.png") is None
    image, orientation, size = read_image_upright(tmp_path / "rotated.png")
    assert orientation == 6 and size == (37, 53) and image.size == (37, 53)
    assert np.array_equal(np.asarray(image), np.rot90(pixels, k=-1))
    data = (tmp_path / "plain.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    assert _decode_plain_png(tmp_path / "truncated.png") is None
    with pytest.raises(ImageReadError, match="truncated.png"):
        read_image(tmp_path / "truncated.png")


def test_unreadable_files_raise_naming_the_file(tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="garbage.jpg"):
        read_image(tmp_path / "garbage.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "t.jpg"
    )
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated.jpg"):
        preprocess_images([tmp_path / "truncated.jpg"])
    with pytest.raises(ImageReadError, match="missing.png does not exist"):
        read_image(tmp_path / "missing.png")


def test_list_images_natural_order_case_insensitive(tmp_path):
    for name in (
        "img10.png",
        "img2.png",
        "IMG1.JPG",
        "img1b.jpeg",
        "notes.txt",
        ".hidden.png",
        "frame_001.TIF",
    ):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "img3.png").write_bytes(b"")
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["frame_001.TIF", "IMG1.JPG", "img1b.jpeg", "img2.png", "img10.png"]
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)][
        -1
    ] == "sub/img3.png"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nope")


def blank(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (40, 80, 120))


def test_crop_mode_sizes_follow_the_official_loader():
    images, transforms = preprocess_images([blank(1000, 750)], mode="crop")
    assert images.shape == (1, 3, 392, 518)  # 750·518/1000 = 388.5 → 28 patches
    assert transforms[0].crop == (0, 0) and transforms[0].pad == (0, 0)
    images, transforms = preprocess_images([blank(750, 1000)], mode="crop")
    assert images.shape == (1, 3, 518, 518)  # 686 high, centre 518 rows kept
    assert transforms[0].resized_size == (518, 686) and transforms[0].crop == (0, 84)
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1


def test_pad_mode_pads_white_to_a_square():
    images, transforms = preprocess_images([blank(750, 1000)], mode="pad")
    assert images.shape == (1, 3, 518, 518)
    assert transforms[0].resized_size == (392, 518) and transforms[0].pad == (63, 0)
    assert transforms[0].content_box == (63, 0, 455, 518)
    assert (images[0, :, :, :63] == 1).all() and (images[0, :, :, 455:] == 1).all()
    assert abs(float(images[0, 2, 259, 259]) - 120 / 255) < 1e-6


def test_crop_mode_crops_taller_views_to_the_most_common_height():
    """A portrait among landscape photos is centre-cropped to their height: no white band on every view."""
    landscape, portrait, wide = blank(1000, 750), blank(750, 1000), blank(1000, 500)
    images, transforms = preprocess_images([landscape, portrait, landscape], mode="crop")
    assert images.shape == (3, 3, 392, 518) and not (images == 1).any()  # white: padding
    assert transforms[0].crop == (0, 0) and transforms[0].model_size == (518, 392)
    resized_height = transforms[1].resized_size[1]  # 518 rows kept by the crop mode, then 392 of them
    assert transforms[1].crop == (0, (resized_height - 518) // 2 + (518 - 392) // 2)
    assert transforms[1].pad == (0, 0) and transforms[1].model_size == (518, 392)
    # shorter views are still padded with white, with a warning
    with pytest.warns(UserWarning, match="different sizes"):
        images, transforms = preprocess_images([landscape, portrait, wide, landscape], mode="crop")
    top = (392 - transforms[2].resized_size[1]) // 2
    assert images.shape == (4, 3, 392, 518) and transforms[2].pad == (0, top)
    assert (images[2, :, :top] == 1).all() and not (images[0] == 1).any()
    # a tie crops to the lower height
    images, _ = preprocess_images([landscape, portrait], mode="crop")
    assert images.shape == (2, 3, 392, 518)


def test_images_resized_in_threads_keep_their_order_and_values(tmp_path):
    """Images are read and resized one per thread; each comes out as it does alone, in the given order."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (90 + 7 * i, 120, 3), dtype=np.uint8)) for i in range(5)]
    images[1].save(tmp_path / "one.png")
    inputs = [images[0], tmp_path / "one.png", *images[2:]]
    together, transforms = preprocess_images(inputs, mode="pad", target_size=56)  # all padded to 56 x 56
    for i, item in enumerate(inputs):
        alone, (transform,) = preprocess_images([item], mode="pad", target_size=56)
        assert transform.original_size == transforms[i].original_size == (120, 90 + 7 * i)
        assert transform.resized_size == transforms[i].resized_size
        assert torch.equal(alone[0], together[i])
    assert transforms[1].path == str(tmp_path / "one.png") and transforms[0].path is None


def test_pixel_limit_mode_uses_the_first_image_size():
    assert pixel_limit_size(1920, 1080) == (672, 378)
    images, transforms = preprocess_images([blank(1920, 1080), blank(800, 800)], mode="pixel_limit")
    assert images.shape == (2, 3, 378, 672)
    assert transforms[1].scale == (672 / 800, 378 / 800)
    w, h = pixel_limit_size(4000, 1000)
    assert w % 14 == 0 and h % 14 == 0 and w * h <= 255_000


def test_mapping_round_trip_and_conventions():
    transform = ImageTransform(
        original_size=(750, 1000), resized_size=(518, 686), crop=(0, 84), pad=(0, 0), model_size=(518, 518)
    )
    centre = torch.tensor([375.0, 500.0])
    torch.testing.assert_close(transform.from_original(centre), torch.tensor([259.0, 259.0]))
    corner = transform.from_original(torch.tensor([0.0, 0.0]), convention="colmap")
    torch.testing.assert_close(corner, torch.tensor([0.0, -84.0]))
    # integer convention: the first pixel centre is 0 in both images
    first = transform.from_original(torch.tensor([0.0, 0.0]), convention="integer")
    torch.testing.assert_close(first, torch.tensor([0.5 * 518 / 750 - 0.5, 0.5 * 0.686 - 84 - 0.5]))
    points = torch.rand(10, 2, dtype=torch.float64) * 700
    for convention in ("colmap", "integer"):
        back = transform.to_original(transform.from_original(points, convention), convention)
        torch.testing.assert_close(back, points, rtol=0, atol=1e-10)


def test_intrinsics_to_original_projects_consistently():
    transform = ImageTransform(
        original_size=(1000, 750), resized_size=(518, 392), crop=(0, 0), pad=(0, 63), model_size=(518, 518)
    )
    k_model = torch.tensor([[400.0, 0, 259], [0, 410, 259], [0, 0, 1]], dtype=torch.float64)
    points = torch.tensor([[0.3, -0.2, 2.0], [-1.0, 0.5, 4.0]], dtype=torch.float64)
    for convention in ("colmap", "integer"):
        k_original = transform.intrinsics_to_original(k_model, convention)
        in_model = (points @ k_model.T)[:, :2] / points[:, 2:]
        in_original = (points @ k_original.T)[:, :2] / points[:, 2:]
        torch.testing.assert_close(transform.to_original(in_model, convention), in_original)
        torch.testing.assert_close(transform.intrinsics_from_original(k_original, convention), k_model)
    colmap = transform.intrinsics_to_original(k_model)
    torch.testing.assert_close(colmap[:2, 2], torch.tensor([500.0, 375.0], dtype=torch.float64))


@pytest.mark.parametrize("mode", ["crop", "pad", "pixel_limit"])
def test_mapping_finds_image_content_again(mode):
    """A blob at a known original position is found where ``to_original`` says after resampling."""
    height, width = 300, 420
    ys, xs = np.mgrid[0:height, 0:width]
    cx, cy = 137.3, 201.6  # integer-convention centre of the blob in the original
    blob = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 12.0**2))
    image = Image.fromarray((255 * (1 - blob)).astype(np.uint8)).convert("RGB")
    images, transforms = preprocess_images([image], mode=mode, target_size=224, pixel_limit=40_000)
    darkness = (1 - images[0, 0]).double()
    rows, cols = torch.meshgrid(
        torch.arange(darkness.shape[0], dtype=torch.float64),
        torch.arange(darkness.shape[1], dtype=torch.float64),
        indexing="ij",
    )
    found = torch.stack([(darkness * cols).sum(), (darkness * rows).sum()]) / darkness.sum()
    original = transforms[0].to_original(found, convention="integer")
    assert (original - torch.tensor([cx, cy], dtype=torch.float64)).abs().max() < 0.3
