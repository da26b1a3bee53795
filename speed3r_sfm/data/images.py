"""Reading images robustly and preprocessing them for VGGT / π³, with an exact map back to the original.

Coordinates of :class:`ImageTransform` are continuous pixel coordinates (x = column direction, y = row
direction). With ``convention="colmap"`` (the default) the top-left pixel's centre is (0.5, 0.5) and an
image of W × H pixels spans [0, W] × [0, H]; with ``convention="integer"`` (the convention of
``Prediction.intrinsics``, VGGT and kornia) the top-left pixel's centre is (0, 0). The "original" image is
the upright one, after applying its EXIF orientation.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import kornia_rs
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
_EXIF_ORIENTATION_TAG = 0x0112

Convention = Literal["colmap", "integer"]
ImageInput = str | os.PathLike | Image.Image


class ImageReadError(OSError):
    """An image file is missing, unreadable, corrupt or not an image."""


def natural_sort_key(text: str) -> tuple:
    """Sort key that orders digit runs by value ("img2" < "img10"), case-insensitively."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), text


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files of ``folder`` (extensions in ``IMAGE_EXTENSIONS``, any case; broken links too), in
    natural order of their path relative to ``folder``; hidden files are skipped. Raises
    ``FileNotFoundError`` when the folder does not exist or holds no image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    images = [
        p
        for p in candidates
        if (p.is_file() or _broken_link(p))
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not p.name.startswith(".")
    ]
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return sorted(images, key=lambda p: natural_sort_key(p.relative_to(folder).as_posix()))


def _broken_link(path: Path) -> bool:
    """A symbolic link whose target is missing: listed, so that reading it reports the problem."""
    return path.is_symlink() and not path.exists()


def read_image(path: str | os.PathLike) -> Image.Image:
    """The image at ``path`` as an upright 8-bit RGB PIL image.

    Applies the EXIF orientation; grayscale, palette and CMYK become RGB; 16-bit (and 32-bit integer)
    grayscale is scaled from [0, 65535] to [0, 255]; float images are taken as [0, 1] when their maximum
    is ≤ 1; transparency (RGBA, LA, palette with transparency) is composited on white. Raises
    :class:`ImageReadError` naming the file when it cannot be read.
    """
    return read_image_upright(path)[0]


def work_long_side(long_side: int, max_size: int, min_scale: float = 0.0) -> int:
    """Long side of a downscaled working copy of an image with ``long_side`` pixels: ``max_size``, but at
    least ``min_scale`` of the original, and never more than the original."""
    return min(long_side, max(max_size, math.ceil(min_scale * long_side)))


def read_image_upright(
    path: str | os.PathLike, max_size: int | None = None, min_scale: float = 0.0
) -> tuple[Image.Image, int, tuple[int, int]]:
    """(:func:`read_image` of ``path``, the file's EXIF orientation 1–8 (its stored pixels are upright
    where 1), the upright full size (W, H)),
    from one read of the file.

    With ``max_size``, for callers that only need a copy whose long side is :func:`work_long_side`
    (``max_size``, ``min_scale``), a JPEG at least twice as large is decoded at 1/2, 1/4 or 1/8 of its
    size by libjpeg's DCT scaling (several times faster than a full decode), as long as the result keeps
    that long side and the factor divides both sides, so that the smaller image covers the same area, pixel
    for pixel.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image file {path} does not exist")
    if path.suffix.lower() == ".png":
        pixels = _decode_plain_png(path)
        if pixels is not None:
            return Image.fromarray(pixels), 1, (pixels.shape[1], pixels.shape[0])
    try:
        with open_image(path) as image:
            width, height = image.size
            if max_size is not None and image.format == "JPEG":
                wanted = work_long_side(max(width, height), max_size, min_scale)
                factor = _dct_scale_factor(width, height, wanted)
                if factor > 1:
                    image.draft("RGB", (width // factor, height // factor))
                    if image.size != (width // factor, height // factor):
                        raise ImageReadError(f"cannot decode {path} at 1/{factor} scale")
            # the file's own tag: Pillow turns TIFFs upright itself (their size, then their pixels on load,
            # which drops the tag), other formats through exif_transpose
            orientation = _orientation(image)
            image.load()
            if _orientation(image) in (5, 6, 7, 8):
                width, height = height, width
            rgb = to_rgb(ImageOps.exif_transpose(image))
            return (rgb.copy() if rgb is image else rgb), orientation, (width, height)  # ``image`` closes
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from error


def open_image(path: str | os.PathLike) -> Image.Image:
    """``Image.open(path)``; a TIFF is read from memory: Pillow turns TIFFs upright as it loads them, except
    (Pillow 13) an uncompressed one it maps from the file, which stays as stored."""
    image = Image.open(path)
    if image.format != "TIFF":
        return image
    image.close()
    return Image.open(io.BytesIO(Path(path).read_bytes()))


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) ``image`` carries, 1 if none."""
    return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _decode_plain_png(path: Path) -> np.ndarray | None:
    """(H, W, 3) uint8 pixels of an 8-bit RGB PNG without transparency or EXIF data, decoded by kornia-rs
    (same pixels as PIL, 3-4x faster); None for any other file, which PIL then reads (and explains)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    bit_depth, colour_type = data[24], data[25]
    limit = Image.MAX_IMAGE_PIXELS  # above it PIL warns or refuses: leave those files to PIL
    if bit_depth != 8 or colour_type != 2 or width * height == 0 or (limit and width * height > limit):
        return None
    offset = len(_PNG_SIGNATURE)
    while offset + 8 <= len(data):  # chunks: length, type, data, CRC
        length, kind = int.from_bytes(data[offset : offset + 4], "big"), data[offset + 4 : offset + 8]
        if kind in (b"tRNS", b"eXIf"):  # a transparency key, an orientation: PIL's way
            return None
        if kind == b"IEND":
            break
        offset += 12 + length
    try:
        return kornia_rs.io.decode_image_png_u8(data, (height, width), "rgb")
    except Exception:  # corrupt or truncated: PIL reports it
        return None


def _dct_scale_factor(width: int, height: int, max_size: int) -> int:
    """The largest of 8, 4, 2 that divides ``width`` and ``height`` and keeps the long side >= ``max_size``;
    1 if none does."""
    for factor in (8, 4, 2):
        if width % factor == 0 and height % factor == 0 and max(width, height) // factor >= max_size:
            return factor
    return 1


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB version of a PIL image of any mode (see :func:`read_image`)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode == "F" and values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        elif mode != "F" or (values.size and np.nanmax(values) > 255.0):
            values = values / 257.0  # 65535 -> 255
        gray = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """How one original image became its model-input image: resize, then crop, then pad.

    A point maps as ``model = original · scale − crop + pad`` (per axis, in the ``"colmap"`` convention).
    Sizes are (width, height); ``crop`` and ``pad`` are the pixels removed / added at the left and top.
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop: tuple[int, int]
    pad: tuple[int, int]
    model_size: tuple[int, int]
    exif_orientation: int = 1
    path: str | None = None

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): resized size / original size."""
        return (
            self.resized_size[0] / self.original_size[0],
            self.resized_size[1] / self.original_size[1],
        )

    @property
    def content_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) pixel box of the model image that holds image content (not padding)."""
        x0, y0 = self.pad
        width = min(self.resized_size[0] - self.crop[0], self.model_size[0] - x0)
        height = min(self.resized_size[1] - self.crop[1], self.model_size[1] - y0)
        return x0, y0, x0 + width, y0 + height

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.tensor(self.scale, dtype=torch.float64)
        offset = torch.tensor([self.pad[0] - self.crop[0], self.pad[1] - self.crop[1]], dtype=torch.float64)
        return scale, offset

    def from_original(self, xy: torch.Tensor, convention: Convention = "colmap") -> torch.Tensor:
        """(..., 2) points of the original image → model-input image."""
        scale, offset = self._affine()
        shift = _centre_shift(convention)
        out = (xy.to(torch.float64) + shift) * scale + offset - shift
        return out.to(xy.dtype) if xy.is_floating_point() else out

    def to_original(self, xy: torch.Tensor, convention: Convention = "colmap") -> torch.Tensor:
        """(..., 2) points of the model-input image → original image."""
        scale, offset = self._affine()
        shift = _centre_shift(convention)
        out = (xy.to(torch.float64) + shift - offset) / scale - shift
        return out.to(xy.dtype) if xy.is_floating_point() else out

    def intrinsics_to_original(
        self, intrinsics: torch.Tensor, convention: Convention = "colmap"
    ) -> torch.Tensor:
        """(..., 3, 3) pinhole K of the model-input image → K of the original image (same convention)."""
        scale, _ = self._affine()
        out = intrinsics.to(torch.float64).clone()
        out[..., 0, 0] /= scale[0]
        out[..., 1, 1] /= scale[1]
        out[..., 0, 1] /= scale[0]  # skew scales with x
        out[..., :2, 2] = self.to_original(intrinsics[..., :2, 2].to(torch.float64), convention)
        return out.to(intrinsics.dtype)

    def intrinsics_from_original(
        self, intrinsics: torch.Tensor, convention: Convention = "colmap"
    ) -> torch.Tensor:
        """(..., 3, 3) pinhole K of the original image → K of the model-input image (same convention);
        the inverse of :meth:`intrinsics_to_original`."""
        scale, _ = self._affine()
        out = intrinsics.to(torch.float64).clone()
        out[..., 0, 0] *= scale[0]
        out[..., 1, 1] *= scale[1]
        out[..., 0, 1] *= scale[0]
        out[..., :2, 2] = self.from_original(intrinsics[..., :2, 2].to(torch.float64), convention)
        return out.to(intrinsics.dtype)


def _centre_shift(convention: Convention) -> float:
    """Offset that turns ``convention`` coordinates into COLMAP ones."""
    if convention == "colmap":
        return 0.0
    if convention == "integer":
        return 0.5
    raise ValueError(f"unknown pixel convention {convention!r}; use 'colmap' or 'integer'")


def _round_to_patch(value: float, patch_size: int) -> int:
    return max(patch_size, round(value / patch_size) * patch_size)


def pixel_limit_size(
    width: int, height: int, pixel_limit: int = 255_000, patch_size: int = 14
) -> tuple[int, int]:
    """π³'s target (width, height): the patch-multiple size closest to the aspect ratio with at most
    ``pixel_limit`` pixels."""
    scale = math.sqrt(pixel_limit / (width * height))
    target_w, target_h = width * scale, height * scale
    cols, rows = max(1, round(target_w / patch_size)), max(1, round(target_h / patch_size))
    while cols * rows * patch_size**2 > pixel_limit and (cols > 1 or rows > 1):
        if (cols / rows > target_w / target_h and cols > 1) or rows == 1:
            cols -= 1
        else:
            rows -= 1
    return cols * patch_size, rows * patch_size


def _crop_to_common_height(tensors: list[torch.Tensor], transforms: list[ImageTransform]) -> None:
    """Centre-crop, in place, the model images taller than the most common height to it (ties: the lower
    height), updating their transforms' crop."""
    counts = Counter(t.shape[1] for t in tensors)
    common = min(counts, key=lambda h: (-counts[h], h))
    for i, (tensor, transform) in enumerate(zip(tensors, transforms, strict=True)):
        extra = tensor.shape[1] - common
        if extra <= 0:
            continue
        top = extra // 2
        tensors[i] = tensor[:, top : top + common]
        transforms[i] = replace(
            transform,
            crop=(transform.crop[0], transform.crop[1] + top),
            model_size=(tensor.shape[2], common),
        )


def preprocess_images(
    images: Sequence[ImageInput],
    mode: Literal["crop", "pad", "pixel_limit"] = "crop",
    target_size: int = 518,
    pixel_limit: int = 255_000,
    patch_size: int = 14,
) -> tuple[torch.Tensor, list[ImageTransform]]:
    """Load (paths) or take (PIL images, assumed upright) and resize images for the model.

    - ``crop`` (VGGT's default): width → ``target_size``, height → nearest multiple of ``patch_size``
      (aspect kept), then the centre ``target_size`` rows if taller. Bicubic.
    - ``pad``: the long side → ``target_size``, the short side → nearest multiple of ``patch_size``, then
      centred white padding to ``target_size`` × ``target_size``. Bicubic.
    - ``pixel_limit`` (π³): every image resized (aspect may change) to one size computed from the first
      image by :func:`pixel_limit_size`. Lanczos.

    Images that end up with different sizes are centre-padded with white to the largest height and width
    (with a warning), as upstream, except that in ``crop`` mode images taller than the most common height
    are first centre-cropped to it (ties: the lower height), so that a few portrait photos among landscape
    ones do not put white bands on every view. Returns (S, 3, H, W) float32 in [0, 1] and one
    :class:`ImageTransform` per image.
    """
    if not images:
        raise ValueError("no images to preprocess")
    if mode not in ("crop", "pad", "pixel_limit"):
        raise ValueError(f"unknown mode {mode!r}; use 'crop', 'pad' or 'pixel_limit'")
    if mode != "pixel_limit" and target_size % patch_size:
        raise ValueError(f"target_size {target_size} is not a multiple of the patch size {patch_size}")

    with ThreadPoolExecutor(max_workers=max(1, min(len(images), torch.get_num_threads()))) as pool:
        # decoding and resizing release the GIL: one image per thread
        loaded = list(pool.map(_upright, images))
        fixed_size = None  # pixel_limit: every image gets the size computed from the first one
        if mode == "pixel_limit":
            fixed_size = pixel_limit_size(*loaded[0][0].size, pixel_limit, patch_size)
        plans = [
            _resize_plan(image.size, mode, target_size, patch_size, fixed_size) for image, _, _ in loaded
        ]
        resized = pool.map(
            lambda pair: _to_tensor(pair[0][0].resize(*pair[1])), zip(loaded, plans, strict=True)
        )
        tensors, transforms = [], []
        for (image, orientation, path), (new_size, _), tensor in zip(loaded, plans, resized, strict=True):
            crop_y = 0
            if mode == "crop" and new_size[1] > target_size:
                crop_y = (new_size[1] - target_size) // 2
                tensor = tensor[:, crop_y : crop_y + target_size]
            pad = (0, 0)
            if mode == "pad":
                tensor, pad = _pad_white(tensor, target_size, target_size)
            tensors.append(tensor)
            transforms.append(
                ImageTransform(
                    original_size=image.size,
                    resized_size=new_size,
                    crop=(0, crop_y),
                    pad=pad,
                    model_size=(tensor.shape[2], tensor.shape[1]),
                    exif_orientation=orientation,
                    path=path,
                )
            )

    if mode == "crop":
        _crop_to_common_height(tensors, transforms)
    max_h = max(t.shape[1] for t in tensors)
    max_w = max(t.shape[2] for t in tensors)
    if any(t.shape[1:] != (max_h, max_w) for t in tensors):
        warnings.warn(
            f"images have different sizes; padding them with white to {max_w}x{max_h}", stacklevel=2
        )
        for i, (tensor, transform) in enumerate(zip(tensors, transforms, strict=True)):
            tensors[i], (left, top) = _pad_white(tensor, max_h, max_w)
            transforms[i] = ImageTransform(
                original_size=transform.original_size,
                resized_size=transform.resized_size,
                crop=transform.crop,
                pad=(transform.pad[0] + left, transform.pad[1] + top),
                model_size=(max_w, max_h),
                exif_orientation=transform.exif_orientation,
                path=transform.path,
            )
    return torch.stack(tensors), transforms


def _resize_plan(
    size: tuple[int, int], mode: str, target_size: int, patch_size: int, fixed_size: tuple[int, int] | None
) -> tuple[tuple[int, int], Image.Resampling]:
    """(new size, resampling filter) of an image of ``size`` (W, H) for :func:`preprocess_images`."""
    width, height = size
    if fixed_size is not None:
        return fixed_size, Image.Resampling.LANCZOS
    if mode == "crop" or width >= height:
        return (
            target_size,
            _round_to_patch(height * (target_size / width), patch_size),
        ), Image.Resampling.BICUBIC
    return (
        _round_to_patch(width * (target_size / height), patch_size),
        target_size,
    ), Image.Resampling.BICUBIC


def _upright(item: ImageInput) -> tuple[Image.Image, int, str | None]:
    """(RGB image, EXIF orientation, path or None) of a PIL image (taken as upright) or an image path."""
    if isinstance(item, Image.Image):
        return to_rgb(item), 1, None
    image, orientation, _ = read_image_upright(item)
    return image, orientation, os.fspath(item)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _pad_white(tensor: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Centre-pad (3, h, w) with 1.0 to (3, height, width); returns it and the (left, top) padding."""
    pad_h, pad_w = height - tensor.shape[1], width - tensor.shape[2]
    if pad_h <= 0 and pad_w <= 0:
        return tensor, (0, 0)
    top, left = pad_h // 2, pad_w // 2
    padded = F.pad(tensor, (left, pad_w - left, top, pad_h - top), value=1.0)
    return padded, (left, top)


def to_uint8_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 from a (3, H, W) or (H, W, 3) float image in [0, 1] (or uint8)."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return arr
