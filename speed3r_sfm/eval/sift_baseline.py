"""The classical baseline: pycolmap SIFT features, exhaustive matching and incremental mapping."""

from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap
import torch
from PIL import Image

from speed3r_sfm.data.colmap_dataset import to_uint8_image
from speed3r_sfm.data.synthetic import RenderedViews
from speed3r_sfm.geometry import intrinsics_from_colmap
from speed3r_sfm.pipeline.colmap_log import colmap_log_level

from .evaluate import SceneResult, evaluate_reconstruction


@dataclass
class SfmResult:
    """Poses of the largest reconstructed model; unregistered views have ``registered == False`` and
    NaN poses/intrinsics. ``points`` are the model's 3D points (N, 3), ``reprojection_error_px`` their
    mean reprojection error (NaN without a model). ``time_s`` covers feature extraction, matching and
    mapping (not writing the images)."""

    cam_from_world: torch.Tensor  # (S, 3, 4) float64
    intrinsics: torch.Tensor  # (S, 3, 3) float64, integer-centre convention
    registered: torch.Tensor  # (S,) bool
    points: torch.Tensor  # (N, 3) float64
    num_models: int
    time_s: float
    reprojection_error_px: float = math.nan


def run_sift_baseline(
    images: torch.Tensor,
    workdir: str | os.PathLike | None = None,
    camera_model: str = "SIMPLE_RADIAL",
    single_camera: bool = True,
    num_threads: int = -1,
    seed: int = 0,
    log_level: int = 2,
    camera_params: str | None = None,
) -> SfmResult:
    """Reconstruct views (S, 3, H, W) in [0, 1] with COLMAP defaults and unknown intrinsics.

    ``single_camera`` shares one camera (all synthetic views of a scene have the same intrinsics);
    ``camera_model`` is COLMAP's default; the other options are COLMAP's defaults too, except that models
    of 3+ images are kept (COLMAP drops models under 10 images, which would fail every small test).
    Files go to ``workdir`` (a temporary folder if None). COLMAP logs at ``log_level`` and above
    (0 info, 1 warning, 2 error) while it runs. ``camera_params``: known intrinsics
    (``--ImageReader.camera_params``), then held fixed by the mapper's bundle adjustments.
    """
    s = images.shape[0]
    scratch = (
        tempfile.TemporaryDirectory(prefix="sift-baseline-") if workdir is None else nullcontext(workdir)
    )
    with scratch as folder:
        root = Path(folder)
        image_dir = root / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        names = [f"{i:05d}.png" for i in range(s)]
        for i, name in enumerate(names):
            Image.fromarray(to_uint8_image(images[i])).save(image_dir / name)
        database = root / "database.db"
        if database.exists():
            database.unlink()
        pycolmap.set_random_seed(seed)
        extraction = pycolmap.FeatureExtractionOptions(num_threads=num_threads)
        reader = pycolmap.ImageReaderOptions(camera_model=camera_model)
        mode = pycolmap.CameraMode.SINGLE if single_camera else pycolmap.CameraMode.PER_IMAGE
        mapping = pycolmap.IncrementalPipelineOptions(
            num_threads=num_threads, random_seed=seed, min_model_size=3
        )
        if camera_params is not None:
            reader.camera_params = camera_params
            mapping.ba_refine_focal_length = False
            mapping.ba_refine_extra_params = False
        with colmap_log_level(log_level):
            start = time.perf_counter()
            pycolmap.extract_features(
                database, image_dir, image_names=names, camera_mode=mode, reader_options=reader,
                extraction_options=extraction, device=pycolmap.Device.cpu,
            )  # fmt: skip
            matching = pycolmap.FeatureMatchingOptions(num_threads=num_threads)
            pycolmap.match_exhaustive(database, matching_options=matching, device=pycolmap.Device.cpu)
            (root / "sparse").mkdir(exist_ok=True)
            models = pycolmap.incremental_mapping(database, image_dir, root / "sparse", options=mapping)
            elapsed = time.perf_counter() - start

    poses = torch.full((s, 3, 4), math.nan, dtype=torch.float64)
    ks = torch.full((s, 3, 3), math.nan, dtype=torch.float64)
    registered = torch.zeros(s, dtype=torch.bool)
    points = torch.zeros(0, 3, dtype=torch.float64)
    reprojection_error = math.nan
    if models:
        best = max(models.values(), key=lambda rec: rec.num_reg_images())
        index = {name: i for i, name in enumerate(names)}
        for image in best.images.values():
            if not image.has_pose:
                continue
            i = index[image.name]
            registered[i] = True
            poses[i] = torch.from_numpy(image.cam_from_world().matrix())
            ks[i] = torch.from_numpy(best.cameras[image.camera_id].calibration_matrix())
        if best.num_points3D():
            points = torch.from_numpy(np.stack([p.xyz for p in best.points3D.values()]))
            reprojection_error = best.compute_mean_reprojection_error()
    return SfmResult(
        poses, intrinsics_from_colmap(ks), registered, points, len(models), elapsed, reprojection_error
    )


def evaluate_sift_baseline(gt: RenderedViews, seed: int = -1, **kwargs) -> SceneResult:
    """Run the SIFT baseline on the rendered images and score it (no depth maps: AbsRel/δ are NaN)."""
    sfm = run_sift_baseline(gt.images.cpu(), **kwargs)
    metrics, rre, rte = evaluate_reconstruction(gt, sfm.cam_from_world, sfm.registered, points=sfm.points)
    extras = {"num_models": sfm.num_models, "num_points": int(sfm.points.shape[0])}
    return SceneResult(seed, metrics, rre, rte, sfm.time_s, extras)
