"""Undistorted images and PINHOLE cameras for Gaussian splatting and NeRF tools (``--undistort``).

3D Gaussian splatting, gsplat and nerfstudio read a folder with ``images/`` and ``sparse/0/`` whose cameras
are undistorted pinholes; the project's cameras have distortion (SIMPLE_RADIAL by default). COLMAP's image
undistorter (``pycolmap.undistort_images``) resamples the registered images and writes the matching
reconstruction; its output is rearranged into that layout::

    OUT/undistorted/images/...           undistorted images, same names as the originals
    OUT/undistorted/sparse/0/*.bin       PINHOLE cameras, the same poses and 3D points
    OUT/undistorted/sparse/1, ...        the same for the further models (``sparse/1``, ...)

COLMAP reads the stored pixels and ignores EXIF orientation, while the project's coordinates are those of
the upright image: rotated images are given to it as upright copies (JPEG at quality 95). Formats its image
library cannot read or write (WebP) go through it as PNG copies and come back in their own format
(lossless). Cameras without distortion, which COLMAP passes through unchanged, are written as PINHOLE, so
that every camera of ``sparse/0`` is a pinhole, as the splatting tools require.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pycolmap
from PIL import Image, ImageOps

from speed3r_sfm.data.images import open_image

from .colmap_log import colmap_log_level
from .inputs import InputError

JPEG_QUALITY = 95  # upright copies of EXIF-rotated JPEGs
COLMAP_UNSUPPORTED = (".webp",)  # suffixes COLMAP's image library (OpenImageIO here) neither reads nor writes


def staged_names(names: list[str]) -> dict[str, str]:
    """The name COLMAP's undistorter sees for each image of ``names``: its own, or for formats it cannot
    read a PNG copy's (``a.webp.png``, numbered where another image has that name)."""
    taken = set(names)
    staged = {}
    for name in names:
        if Path(name).suffix.lower() not in COLMAP_UNSUPPORTED:
            staged[name] = name
            continue
        candidate, number = f"{name}.png", 1
        while candidate in taken:
            candidate, number = f"{name}.{number}.png", number + 1
        taken.add(candidate)
        staged[name] = candidate
    return staged


def _stage_upright_inputs(
    folder: Path, sources: Mapping[str, tuple[Path, int]], staged: dict[str, str]
) -> None:
    """``folder`` holds every image of ``staged`` under its staged name (:func:`staged_names`): a link to
    the original, or an upright copy where its EXIF orientation is not 1 (a PNG copy for unsupported
    formats)."""
    for name, staged_name in staged.items():
        path, orientation = sources[name]
        target = folder / staged_name
        target.parent.mkdir(parents=True, exist_ok=True)
        if orientation == 1 and target.name == Path(name).name:
            try:
                os.symlink(Path(path).resolve(), target)
            except OSError:  # a file system without symbolic links
                shutil.copyfile(path, target)
            continue
        with open_image(path) as image:
            image.load()  # Pillow turns a TIFF upright on loading and drops its tag: not twice
            upright = ImageOps.exif_transpose(image)
        jpeg = target.suffix.lower() in (".jpg", ".jpeg")
        upright.save(target, **({"quality": JPEG_QUALITY} if jpeg else {}))


def _check_sizes(
    folder: Path,
    rec: pycolmap.Reconstruction,
    staged: dict[str, str],
    sources: Mapping[str, tuple[Path, int]],
) -> None:
    """Every staged image has its camera's size (COLMAP's undistorter aborts the process on a mismatch, e.g.
    an image file replaced during the run)."""
    for i in rec.reg_image_ids():
        image = rec.images[i]
        camera = rec.cameras[image.camera_id]
        try:
            with Image.open(folder / staged[image.name]) as staged_image:
                size = staged_image.size
        except OSError as error:  # PIL's UnidentifiedImageError included
            raise InputError(
                f"cannot read image {sources[image.name][0]} any more ({error}): it changed during the run; "
                "run again"
            ) from error
        if size != (camera.width, camera.height):
            raise InputError(
                f"image {sources[image.name][0]} is {size[0]}x{size[1]} pixels (upright) but was "
                f"{camera.width}x{camera.height} when it was reconstructed: it changed during the run; "
                "run again"
            )


def write_undistorted(
    folder: str | os.PathLike,
    rec: pycolmap.Reconstruction,
    sparse: str | os.PathLike,
    sources: Mapping[str, tuple[Path, int]],
    num_threads: int = -1,
) -> dict:
    """Undistort the registered images of ``rec``, written to ``sparse``, into ``folder`` (a new folder;
    module docstring); ``sources``: per image name, its file and EXIF orientation. Returns the report
    entry (counts, camera models, time)."""
    start = time.perf_counter()
    folder = Path(folder)
    names = sorted(rec.images[i].name for i in rec.reg_image_ids())
    if not names:
        raise ValueError("no registered image to undistort")
    staged = staged_names(names)
    renamed = {s: n for n, s in staged.items() if s != n}
    work = folder.parent / f".{folder.name}-inputs"
    inputs = work / "images"
    inputs.mkdir(parents=True)
    try:
        _stage_upright_inputs(inputs, sources, staged)
        _check_sizes(inputs, rec, staged, sources)
        if renamed:  # the model as COLMAP sees it: the PNG copies' names
            as_staged = pycolmap.Reconstruction(rec)
            for image in as_staged.images.values():
                image.name = staged.get(image.name, image.name)
            sparse = work / "sparse"
            sparse.mkdir()
            as_staged.write(sparse)
        with colmap_log_level():  # no per-image "Undistorting image [k/N]" lines in the user's terminal
            pycolmap.undistort_images(folder, sparse, inputs, num_threads=num_threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    images = folder / "images"
    for png, name in renamed.items():  # back to the original format and name
        if (images / png).is_file():
            with Image.open(images / png) as image:
                image.save(images / name, lossless=True)
            (images / png).unlink()
    written = sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file())
    missing = sorted(set(names) - set(written))
    if missing:
        raise RuntimeError(f"COLMAP's undistorter wrote no image for {missing[:3]} ({len(missing)} in all)")
    # COLMAP's layout for its own MVS (sparse/*.bin, stereo/, scripts) -> the splatting tools' sparse/0
    model = folder / "sparse" / "0"
    model.mkdir()
    for path in (folder / "sparse").glob("*.bin"):
        path.rename(model / path.name)
    shutil.rmtree(folder / "stereo", ignore_errors=True)
    for script in folder.glob("run-colmap-*.sh"):
        script.unlink()
    undistorted = pycolmap.Reconstruction(model)
    for image in undistorted.images.values():
        image.name = renamed.get(image.name, image.name)
    for camera in undistorted.cameras.values():
        as_pinhole(camera)
    undistorted.write(model)
    used = {undistorted.image(i).camera_id for i in undistorted.reg_image_ids()}
    return {
        "path": "undistorted",
        "images": undistorted.num_reg_images(),
        "camera_models": sorted({undistorted.camera(c).model.name for c in used}),
        "time_s": time.perf_counter() - start,
    }


def write_undistorted_models(
    folder: str | os.PathLike,
    models: Sequence[pycolmap.Reconstruction],
    sparse: str | os.PathLike,
    sources: Mapping[str, tuple[Path, int]],
) -> dict:
    """:func:`write_undistorted` for every model of a project (``models`` written to ``sparse``/0,
    ``sparse``/1, ...): their images in one ``folder/images`` (a view is registered in one model only),
    model k's cameras in ``folder/sparse/k``. Returns the report entry (counts summed)."""
    folder = Path(folder)
    entry = write_undistorted(folder, models[0], Path(sparse) / "0", sources)
    camera_models = set(entry["camera_models"])
    for index, rec in enumerate(models[1:], start=1):
        side = folder.parent / f".{folder.name}-{index}"
        try:
            more = write_undistorted(side, rec, Path(sparse) / str(index), sources)
            for path in sorted((side / "images").rglob("*")):
                if path.is_file():
                    moved = folder / "images" / path.relative_to(side / "images")
                    moved.parent.mkdir(parents=True, exist_ok=True)
                    path.rename(moved)
            (side / "sparse" / "0").rename(folder / "sparse" / str(index))
        finally:
            shutil.rmtree(side, ignore_errors=True)
        entry["images"] += more["images"]
        entry["time_s"] += more["time_s"]
        camera_models |= set(more["camera_models"])
    entry["camera_models"] = sorted(camera_models)
    entry["models"] = len(models)
    return entry


def as_pinhole(camera: pycolmap.Camera) -> None:
    """Make ``camera`` a PINHOLE camera, in place, if its distortion parameters are all zero (the same
    projection)."""
    if camera.model.name == "PINHOLE" or any(camera.params[i] != 0.0 for i in camera.extra_params_idxs()):
        return
    fx, fy = camera.focal_length_x, camera.focal_length_y
    cx, cy = camera.principal_point_x, camera.principal_point_y
    camera.model = pycolmap.CameraModelId.PINHOLE
    camera.params = [fx, fy, cx, cy]
