"""Listing and reading the input images: skip what cannot be used, keep what the pipeline needs.

Every readable, distinct image becomes a :class:`View`: its name (path relative to the image folder, the
COLMAP image name), its original (upright, EXIF-applied) size, an RGB "work" copy downscaled to
``max_image_size`` pixels on its long side, or to ``min_work_scale`` of the original if that is larger
(keypoints and photometric refinement run on it: their sub-pixel accuracy, ~0.4 work pixels, becomes
``1 / scale`` times that in original pixels), and the :class:`~speed3r_sfm.data.images.ImageTransform`
from the original image to the model input. Corrupt or non-image files, images smaller than
``MIN_IMAGE_SIDE`` pixels on a side and exact duplicates (same bytes) are skipped with a warning; fewer than
two usable images is an :class:`InputError`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from speed3r_sfm.data.images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    ImageTransform,
    list_images,
    preprocess_images,
    read_image_upright,
    work_long_side,
)

logger = logging.getLogger(__name__)

PreprocessMode = Literal["crop", "pad", "pixel_limit"]


GRAY_COLOUR_SHARE = 0.005  # a grayscale image may have this share of coloured pixels (View.grayscale)
# a run whose median view has a colour score (colour_score) below this has little colour. The shipped default
# failed two or three of six held-out scenes at 2.2 and less (gray, sepia, 10 % of the colour), forward
# 1000001 hinged at 2.8-3.9 (25-35 %) in one of two sets of copies, the others held at 4.8-5.5 but the hard
# orbit in 2 of 5 runs (grayscale_input.md); its held-out renders score 11-22, real photographs 2.3-28
LOW_COLOUR_SCORE = 4.5
MIN_IMAGE_SIDE = 32  # pixels: smaller images are skipped (a handful of 14-pixel patches, no keypoints)
LOGGED_SKIPS = 5  # skipped files logged one by one (then one line for the rest)


class InputError(ValueError):
    """The input images cannot be reconstructed (missing folder, too few usable images, ...)."""


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone wants its input: ``preprocess_images(mode, target_size, pixel_limit, patch_size)``."""

    mode: PreprocessMode = "crop"
    target_size: int = 518
    pixel_limit: int = 255_000
    patch_size: int = 14


@dataclass
class View:
    """One usable input image."""

    name: str
    path: Path
    original_size: tuple[int, int]  # (W, H) of the upright original
    work_rgb: np.ndarray  # (h, w, 3) uint8, the original downscaled to at most max_image_size
    transform: ImageTransform  # original image -> model input
    exif_orientation: int = 1

    @property
    def work_size(self) -> tuple[int, int]:
        """(w, h) of ``work_rgb``."""
        return self.work_rgb.shape[1], self.work_rgb.shape[0]

    @property
    def work_scale(self) -> tuple[float, float]:
        """(sx, sy) = work size / original size (a pure scale in COLMAP's pixel convention)."""
        return self.work_size[0] / self.original_size[0], self.work_size[1] / self.original_size[1]

    @property
    def grayscale(self) -> bool:
        """A grayscale image read as RGB: its channels equal within 2 levels (JPEG's chroma rounding) at all
        but ``GRAY_COLOUR_SHARE`` of its pixels (a coloured time stamp); every 4th pixel of each axis."""
        rgb = self.work_rgb[::4, ::4].astype(np.int16)
        coloured = np.abs(rgb[..., 1:] - rgb[..., :1]).max(axis=-1) > 2
        return bool(coloured.mean() <= GRAY_COLOUR_SHARE) if coloured.size else True

    @property
    def colour_score(self) -> float:
        """:func:`colour_score` of the work image."""
        return colour_score(self.work_rgb)

    def gray(self) -> torch.Tensor:
        """(h, w) float32 luminance in [0, 1] of the work image."""
        rgb = torch.from_numpy(self.work_rgb).float() / 255.0
        return rgb @ torch.tensor([0.299, 0.587, 0.114])


def colour_score(rgb: np.ndarray, max_pixels: int = 16384) -> float:
    """How much colour an (h, w, 3) uint8 image has beyond what its brightness tells: the mean distance (8-bit
    levels) of each pixel's chroma (B - Y, R - Y) from the mean chroma of the pixels of its luminance level
    (Y rounded), on every k-th pixel of each axis (about ``max_pixels`` of them). 0 for gray and for any tint
    that is a function of brightness (sepia), in proportion to the saturation otherwise (half the saturation,
    half the score)."""
    step = max(1, int((rgb.shape[0] * rgb.shape[1] / max_pixels) ** 0.5))
    pixels = rgb[::step, ::step].reshape(-1, 3).astype(np.float64)
    if not len(pixels):
        return 0.0
    luminance = pixels @ np.array([0.299, 0.587, 0.114])
    chroma = np.stack([pixels[:, 2] - luminance, pixels[:, 0] - luminance], axis=1)
    level = np.clip(np.rint(luminance), 0, 255).astype(np.int64)
    counts = np.maximum(np.bincount(level, minlength=256), 1)
    sums = np.stack([np.bincount(level, chroma[:, c], minlength=256) for c in range(2)], axis=1)
    return float(np.linalg.norm(chroma - (sums / counts[:, None])[level], axis=1).mean())


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def image_folder(image_dir: str | os.PathLike) -> Path:
    """``image_dir`` as a Path; :class:`InputError` naming it when it is not a folder."""
    folder = Path(image_dir)
    if not folder.is_dir():
        raise InputError(
            f"image folder {folder} does not exist (or is not a folder); pass a folder of images"
        )
    return folder


def find_images(image_dir: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files of ``image_dir`` in natural order; raises :class:`InputError` naming the folder when it
    does not exist or holds no image."""
    folder = image_folder(image_dir)
    try:
        return list_images(folder, recursive=recursive)
    except FileNotFoundError as error:
        message = (
            f"no images in {folder}: expected files with one of the extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
        if not recursive:
            message += _images_in_subfolders(folder)
        raise InputError(message) from error


def _images_in_subfolders(folder: Path) -> str:
    """A hint naming the subfolders of ``folder`` that hold images (only the folder itself is read)."""
    try:
        nested = list_images(folder, recursive=True)
    except FileNotFoundError:
        return ""
    counts: dict[Path, int] = {}
    for path in nested:
        counts[path.parent] = counts.get(path.parent, 0) + 1
    shown = ", ".join(f"{sub} ({n})" for sub, n in sorted(counts.items())[:3])
    more = f" and {len(counts) - 3} more" if len(counts) > 3 else ""
    return (
        f"; only the folder itself is read, and its subfolders hold images: {shown}{more}: pass one of them, "
        "or read the subfolders too with recursive=True (CLI: --recursive true)"
    )


ImageList = str | os.PathLike | Sequence[str | os.PathLike]


def select_images(
    image_dir: str | os.PathLike, image_list: ImageList | None = None, recursive: bool = False
) -> list[Path]:
    """The images to reconstruct: those named by ``image_list`` (names relative to ``image_dir``, in the
    list's order; a sequence of names or the path of a text file with one name per line, as COLMAP's
    ``image_list_path``: blank lines and ``#`` comments are ignored), else every image of ``image_dir``
    (and of its subfolders if ``recursive``) in natural order. Raises :class:`InputError` naming the list
    or the folder when an entry is missing, repeated or outside the folder."""
    if image_list is None:
        paths = find_images(image_dir, recursive=recursive)
        return _outside_projects(paths, Path(image_dir)) if recursive else paths
    folder = image_folder(image_dir)
    names, source = _read_image_list(image_list)
    if not names:
        raise InputError(f"{source} names no image; give at least 2 image names relative to {folder}")
    paths, seen, missing = [], set(), []
    for name in names:
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise InputError(
                f"{source}: {name!r} is not a path inside the image folder {folder}; "
                "give names relative to it (as COLMAP names images), without '..'"
            )
        key = relative.as_posix()
        if key in seen:
            raise InputError(f"{source} names {key} twice; list every image once")
        seen.add(key)
        path = folder / relative
        if not path.is_file():
            missing.append(key)
        paths.append(path)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InputError(
            f"{source}: {len(missing)} of {len(names)} listed images are not files in {folder}: {shown}; "
            "names are relative to the image folder"
        )
    return paths


def _outside_projects(paths: list[Path], folder: Path) -> list[Path]:
    """``paths`` less those inside a project folder under ``folder`` (one holding report.json and sparse/,
    e.g. an earlier run's OUT with its undistorted images), each project skipped with a warning."""
    subfolders = {parent for path in paths for parent in path.parents if parent != folder}
    subfolders = {sub for sub in subfolders if sub.is_relative_to(folder)}  # each checked once below
    projects = sorted(
        sub for sub in subfolders if (sub / "report.json").is_file() and (sub / "sparse").is_dir()
    )
    for project in projects:
        logger.warning("skipped the images of %s: a reconstruction project inside the image folder", project)
    kept = [p for p in paths if not any(p.is_relative_to(project) for project in projects)]
    if not kept:
        raise InputError(f"no images in {folder} outside the reconstruction projects it holds")
    return kept


def _read_image_list(image_list: ImageList) -> tuple[list[str], str]:
    """(names, how to call the list in messages) of a list of names or of a text file of names."""
    if isinstance(image_list, (str, os.PathLike)):
        path = Path(image_list)
        if not path.is_file():
            raise InputError(
                f"image list {path} does not exist (or is not a file); pass a text file with one image "
                "name per line, relative to the image folder"
            )
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not a name
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"cannot read the image list {path} ({error}); it must be UTF-8 text") from error
        names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return names, f"image list {path}"
    return [Path(name).as_posix() for name in image_list], "image_list"


def _work_copy(image: Image.Image, original_size: tuple[int, int], long_side: int) -> Image.Image:
    """``image`` (the original, or the original decoded at a reduced scale) resized to the original's size
    scaled to ``long_side`` pixels on the long side."""
    width, height = original_size
    scale = long_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale))) if scale < 1.0 else original_size
    if image.size == size:
        return image
    # antialiased bilinear (a triangle filter as wide as the scale): half the time of Lanczos
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def _read_one(
    path: Path, max_image_size: int, min_work_scale: float
) -> tuple[str | None, tuple[tuple[int, int], Image.Image, np.ndarray, int] | None, str | None]:
    """(digest, (original size, work copy, its pixels, EXIF orientation), problem) of one file; ``problem``
    says why it cannot be used (then the rest is None). Only the work copy is kept: huge originals are
    never held together, and large JPEGs are decoded at a reduced scale."""
    try:
        digest = file_digest(path)
    except OSError as error:
        return None, None, f"cannot read the file ({error})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image, orientation, size = read_image_upright(path, max_image_size, min_work_scale)
    except ImageReadError as error:
        return digest, None, f"not a readable image ({error})"
    if min(size) < MIN_IMAGE_SIDE:
        return digest, None, f"too small ({size[0]}x{size[1]} pixels; at least {MIN_IMAGE_SIDE} per side)"
    long_side = work_long_side(max(size), max_image_size, min_work_scale)
    work = _work_copy(image, size, long_side)
    return digest, (size, work, np.array(work), orientation), None


def load_views(
    paths: list[Path],
    root: str | os.PathLike,
    preprocessing: Preprocessing,
    max_image_size: int = 1600,
    min_work_scale: float = 0.0,
) -> tuple[list[View], torch.Tensor, list[str]]:
    """Read the images at ``paths`` (names relative to ``root``) for the model and the matcher; work copies
    as the module docstring says.

    Returns the usable views, the model input (S, 3, H, W) float32 in [0, 1] and the skip messages.
    Raises :class:`InputError` when fewer than two images are usable.
    """
    root = Path(root)
    loaded: list[tuple[str, Path, tuple[int, int], Image.Image, np.ndarray, int]] = []
    skipped: list[str] = []
    seen: dict[str, str] = {}
    workers = min(len(paths), max(1, torch.get_num_threads())) or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:  # decoding and resizing release the GIL
        reads = pool.map(lambda path: _read_one(path, max_image_size, min_work_scale), paths)
        for path, (digest, read, problem) in zip(paths, reads, strict=True):
            name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
            if problem is not None:
                skipped.append(f"skipped {path}: {problem}")
                continue
            if digest in seen:
                skipped.append(f"skipped {path}: exact duplicate of {seen[digest]}")
                continue
            seen[digest] = name
            loaded.append((name, path, *read))
    for message in skipped[:LOGGED_SKIPS]:
        logger.warning(message)
    if len(skipped) > LOGGED_SKIPS:
        logger.warning(
            "skipped %d more files (the run's report lists every skipped file)", len(skipped) - LOGGED_SKIPS
        )
    if len(loaded) < 2:
        found = f"{len(loaded)} usable image" + ("" if len(loaded) == 1 else "s")
        detail = f" ({len(skipped)} skipped: " + "; ".join(skipped) + ")" if skipped else ""
        raise InputError(
            f"{found} in {root}{detail}; a reconstruction needs at least 2 distinct readable images"
        )
    rotated = [name for name, *_, orientation in loaded if orientation != 1]
    if rotated:
        logger.warning(
            "%d image(s) have an EXIF orientation (e.g. %s): the project uses the upright images' pixel "
            "coordinates; tools that ignore EXIF orientation will disagree with them",
            len(rotated),
            rotated[0],
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # mixed sizes are padded: expected, handled below
        model_images, work_transforms = preprocess_images(
            [item[3] for item in loaded],
            mode=preprocessing.mode,
            target_size=preprocessing.target_size,
            pixel_limit=preprocessing.pixel_limit,
            patch_size=preprocessing.patch_size,
        )
    views = []
    for (name, path, original_size, _, pixels, orientation), t in zip(loaded, work_transforms, strict=True):
        # work = original * (work size / original size) exactly (a resize maps image edges to edges), so
        # the original -> model map has the same resize, crop and pad as the work -> model one.
        transform = ImageTransform(
            original_size=original_size,
            resized_size=t.resized_size,
            crop=t.crop,
            pad=t.pad,
            model_size=t.model_size,
            exif_orientation=orientation,
            path=str(path),
        )
        views.append(View(name, path, original_size, pixels, transform, orientation))
    return views, model_images, skipped
