"""COLMAP-format datasets: write rendered scenes, read synthetic or real COLMAP models with one loader.

Layout (the layout ``colmap image_undistorter`` and most tools produce)::

    root/images/<name>        RGB images (PNG when written here)
    root/sparse/0/            COLMAP model (cameras, images, rigs, frames, points3D; binary or text)
    root/depths.h5            optional: one float32 (H, W) dataset per image name, z-depth in metres,
                              0 = invalid

Intrinsics returned by the loader use the integer-centre pixel convention of ``speed3r_sfm.geometry``
(COLMAP's principal point minus 0.5). Poses are COLMAP's cam_from_world (OpenCV axes).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pycolmap
import torch
from PIL import Image

from speed3r_sfm.fileio import normal_permissions
from speed3r_sfm.geometry import intrinsics_from_colmap, intrinsics_to_colmap

from .images import to_uint8_image

DEPTH_FILE = "depths.h5"
# Models whose projection is a pinhole once their distortion parameters are zero.
_PERSPECTIVE_MODELS = {"SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV"}


def _atomic_replace(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` folder to ``target``; an old target is removed only after the move (an
    empty folder is replaced at once)."""
    if target.is_dir() and not any(target.iterdir()):
        os.replace(tmp, target)  # renaming onto an empty folder replaces it
    elif target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, trash)
        os.replace(tmp, target)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, target)


def build_reconstruction(
    intrinsics: torch.Tensor,
    cam_from_world: torch.Tensor,
    image_size: tuple[int, int],
    image_names: Sequence[str],
) -> pycolmap.Reconstruction:
    """A pycolmap model with one PINHOLE camera per distinct K and every image registered at its pose.

    ``intrinsics`` (S, 3, 3) are in the integer-centre convention; ``image_size`` is (H, W).
    """
    h, w = image_size
    k_colmap = intrinsics_to_colmap(intrinsics.detach().double().cpu()).numpy()
    poses = cam_from_world.detach().double().cpu().numpy()
    rec = pycolmap.Reconstruction()
    camera_of: dict[tuple, int] = {}
    for i, name in enumerate(image_names):
        params = (k_colmap[i, 0, 0], k_colmap[i, 1, 1], k_colmap[i, 0, 2], k_colmap[i, 1, 2])
        if params not in camera_of:
            camera_of[params] = len(camera_of) + 1
            cam = pycolmap.Camera(
                camera_id=camera_of[params], model="PINHOLE", width=w, height=h, params=list(params)
            )
            rec.add_camera_with_trivial_rig(cam)
        image = pycolmap.Image(name=name, camera_id=camera_of[params], image_id=i + 1)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(poses[i]))
    return rec


def write_colmap_dataset(
    path: str | os.PathLike,
    images: torch.Tensor,
    intrinsics: torch.Tensor,
    cam_from_world: torch.Tensor,
    depth: torch.Tensor | None = None,
    image_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write views as a COLMAP dataset at ``path`` (see module docstring); returns the path.

    ``images`` (S, 3, H, W) float in [0, 1] or uint8; ``intrinsics`` (S, 3, 3) integer-centre convention;
    ``cam_from_world`` (S, 3, 4); ``depth`` optional (S, H, W) z-depth. Everything is written to a temporary
    sibling folder first and moved into place at the end, so ``path`` never holds a partial dataset.
    """
    target = Path(path)
    s, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    names = list(image_names) if image_names is not None else [f"{i:05d}.png" for i in range(s)]
    if len(names) != s or len(set(names)) != s:
        raise ValueError(f"need {s} distinct image names, got {len(names)} ({len(set(names))} distinct)")
    if intrinsics.shape != (s, 3, 3) or cam_from_world.shape != (s, 3, 4):
        raise ValueError(
            f"intrinsics must be ({s}, 3, 3) and cam_from_world ({s}, 3, 4); got "
            f"{tuple(intrinsics.shape)} and {tuple(cam_from_world.shape)}"
        )
    if depth is not None and depth.shape != (s, h, w):
        raise ValueError(f"depth must be ({s}, {h}, {w}), got {tuple(depth.shape)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        normal_permissions(tmp, folder=True)
        for i, name in enumerate(names):
            out = tmp / "images" / name
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_uint8_image(images[i])).save(out)
        sparse = tmp / "sparse" / "0"
        sparse.mkdir(parents=True)
        build_reconstruction(intrinsics, cam_from_world, (h, w), names).write(str(sparse))
        if depth is not None:
            with h5py.File(tmp / DEPTH_FILE, "w") as f:
                f.attrs["description"] = "z-depth in metres along the optical axis; 0 = invalid"
                for i, name in enumerate(names):
                    f.create_dataset(name, data=depth[i].detach().cpu().numpy().astype(np.float32))
        _atomic_replace(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@dataclass
class ColmapDataset:
    """Registered images of a COLMAP model, sorted by name. K: integer-centre convention, pinhole part
    only (see ``distortion_free``); cam_from_world: OpenCV."""

    root: Path
    image_names: list[str]
    image_paths: list[Path]
    intrinsics: torch.Tensor  # (S, 3, 3) float64
    cam_from_world: torch.Tensor  # (S, 3, 4) float64
    image_sizes: torch.Tensor  # (S, 2) int64 (H, W) from the camera model
    camera_models: list[str]
    distortion_free: list[bool]  # False where the camera model has non-zero distortion (K alone is inexact)
    depth_file: Path | None

    def __len__(self) -> int:
        return len(self.image_names)

    def load_image(self, index: int) -> torch.Tensor:
        """(3, H, W) float32 RGB in [0, 1]."""
        with Image.open(self.image_paths[index]) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def load_depth(self, index: int) -> torch.Tensor:
        """(H, W) float32 z-depth (0 = invalid) from ``depths.h5``."""
        if self.depth_file is None:
            raise FileNotFoundError(
                f"{self.root / DEPTH_FILE} does not exist: this dataset has no depth maps"
            )
        name = self.image_names[index]
        with h5py.File(self.depth_file, "r") as f:
            if name not in f:
                raise ColmapDatasetError(
                    f"{self.depth_file} has no depth map for image {name!r}: add one, or remove the file "
                    "to train without depth"
                )
            depth = torch.from_numpy(f[name][()].astype(np.float32))
        expected = tuple(self.image_sizes[index].tolist())
        if tuple(depth.shape) != expected:
            raise ColmapDatasetError(
                f"{self.depth_file}: the depth map of {name!r} is {tuple(depth.shape)} (H, W), its image "
                f"{expected}: write it at the image's size"
            )
        return depth


class ColmapDatasetError(ValueError):
    """A COLMAP-format dataset that cannot be used as asked (no registered image, distorted cameras)."""


def _find_model(root: Path) -> Path:
    for candidate in (root / "sparse" / "0", root / "sparse", root):
        if (candidate / "cameras.bin").exists() or (candidate / "cameras.txt").exists():
            return candidate
    raise FileNotFoundError(
        f"no COLMAP model under {root}: expected cameras.bin or cameras.txt in "
        f"{root / 'sparse' / '0'}, {root / 'sparse'} or {root}"
    )


def load_colmap_dataset(
    path: str | os.PathLike, image_dir: str = "images", require_pinhole: bool = False
) -> ColmapDataset:
    """Read a COLMAP dataset: the model in sparse/0 (or sparse/, or the root), images in ``image_dir``,
    and ``depths.h5`` if present. Works for any camera model; K is the pinhole part (focal lengths and
    principal point). ``require_pinhole=True`` (what training needs) raises for cameras with distortion:
    undistort the dataset first (``colmap image_undistorter``). Unregistered images are skipped.
    """
    root = Path(path)
    model_dir = _find_model(root)
    rec = pycolmap.Reconstruction(str(model_dir))
    images = sorted((im for im in rec.images.values() if im.has_pose), key=lambda im: im.name)
    if not images:
        raise ColmapDatasetError(f"the COLMAP model in {model_dir} has no registered images")
    names, paths, ks, poses, sizes, models, undistorted = [], [], [], [], [], [], []
    for im in images:
        cam = rec.cameras[im.camera_id]
        free = cam.model_name in _PERSPECTIVE_MODELS and cam.is_undistorted()
        if require_pinhole and not free:
            params = ", ".join(f"{float(p):.6g}" for p in cam.params)
            raise ColmapDatasetError(
                f"{model_dir}: image {im.name!r} uses camera model {cam.model_name} (parameters [{params}]); "
                "training needs undistorted pinhole cameras: undistort first (`colmap image_undistorter`, or "
                "`speed3r-sfm reconstruct ... --undistort true` and its OUT/undistorted)"
            )
        image_path = root / image_dir / im.name
        if not image_path.exists():
            raise FileNotFoundError(
                f"{image_path} is listed in {model_dir} but missing; check image_dir={image_dir!r}"
            )
        names.append(im.name)
        paths.append(image_path)
        ks.append(cam.calibration_matrix())
        poses.append(im.cam_from_world().matrix())
        sizes.append((cam.height, cam.width))
        models.append(cam.model_name)
        undistorted.append(free)
    depth_file = root / DEPTH_FILE
    return ColmapDataset(
        root=root,
        image_names=names,
        image_paths=paths,
        intrinsics=intrinsics_from_colmap(torch.from_numpy(np.stack(ks))),
        cam_from_world=torch.from_numpy(np.stack(poses)),
        image_sizes=torch.tensor(sizes, dtype=torch.long),
        camera_models=models,
        distortion_free=undistorted,
        depth_file=depth_file if depth_file.exists() else None,
    )
