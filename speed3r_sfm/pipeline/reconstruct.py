"""``reconstruct(image_dir)``: images -> feed-forward prediction -> GSA keypoints and matches -> tracks ->
pycolmap reconstruction -> bundle adjustment -> COLMAP project.

Read top to bottom, :func:`run_pipeline` does:

1. list and read the images (skipping unreadable files and duplicates), preprocess them for the backbone;
2. run the backbone once: cameras, depth, confidences and, with GSA, the attention records;
3. detect keypoints in the most-selected token blocks of each view (``keypoints.py``);
4. match them in the views their query blocks selected, verify with the predicted geometry and refine
   photometrically (``matching.py``, ``refine.py``);
5. link matches into tracks (``tracks.py``) and build the pycolmap reconstruction at the predicted poses,
   with points initialised from the predicted depth (``colmap_model.py``);
6. bundle-adjust, filter and re-triangulate with pycolmap (``bundle.py``);
7. write the project atomically (``export.py``): sparse/0, database.db, points.ply, report.json.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pycolmap
import torch
from tqdm.auto import tqdm

from .backbone import AttentionKind, ModelSpec, load_backbone
from .bundle import BundleOptions, correspondence_graph, mean_reprojection_error, refine_reconstruction
from .colmap_model import (
    CAMERA_MODELS,
    add_points,
    build_reconstruction,
    points_from_depth,
    points_in_original,
    track_colors,
)
from .export import check_output, write_project
from .frames import SceneGeometry
from .inputs import Preprocessing, find_images, load_views
from .keypoints import KeypointOptions, confidence_thresholds, detect_keypoints
from .matching import MatchOptions, match_views
from .records import summarize_records
from .report import build_report
from .tracks import build_tracks

logger = logging.getLogger(__name__)

STAGES = ("read images", "model", "keypoints", "matching", "tracks", "bundle adjustment", "write")


@dataclass
class PipelineOptions:
    """Settings of every stage (defaults are the documented ones)."""

    keypoints: KeypointOptions = field(default_factory=KeypointOptions)
    matching: MatchOptions = field(default_factory=MatchOptions)
    bundle: BundleOptions = field(default_factory=BundleOptions)
    merge_radius: float = 1.0  # work pixels: match locations this close to a keypoint reuse it
    max_image_size: int = 1600  # long side of the work copies (keypoints, refinement)
    no_ba_max_reproj_error: float = 16.0  # pixels, point filter when ba=False


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` produced."""

    reconstruction: pycolmap.Reconstruction
    report: dict
    output_dir: Path | None
    image_names: list[str]
    feedforward_cam_from_world: torch.Tensor  # (S, 3, 4) float64, the backbone's poses (its world frame)


def reconstruct(
    image_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    model: ModelSpec = "default",
    attention: AttentionKind = "gsa",
    device: str = "auto",
    ba: bool = True,
    camera_model: str = "SIMPLE_RADIAL",
    shared_camera: bool = False,
    overwrite: bool = False,
    preprocessing: Preprocessing | None = None,
    options: PipelineOptions | None = None,
    progress: bool = False,
) -> pycolmap.Reconstruction:
    """Reconstruct the images of ``image_dir``; writes a COLMAP project to ``output_dir`` if given.

    ``model``: "default" (the shipped weights), a Hub id, a checkpoint path, a built backbone module or a
    callable returning a ``Prediction``; ``attention``: "gsa" (keypoints and matches from GSA records) or
    "dense" (texture-based fallback); ``ba``: bundle-adjust; ``camera_model``: one of ``CAMERA_MODELS``
    (distortion starts at zero and is refined in BA); ``shared_camera``: one camera for all images (they
    must have one size). See :func:`run_pipeline` for the rest; returns the pycolmap Reconstruction.
    """
    return run_pipeline(
        image_dir,
        output_dir,
        model,
        attention,
        device,
        ba,
        camera_model,
        shared_camera,
        overwrite,
        preprocessing,
        options,
        progress,
    ).reconstruction


def run_pipeline(
    image_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    model: ModelSpec = "default",
    attention: AttentionKind = "gsa",
    device: str = "auto",
    ba: bool = True,
    camera_model: str = "SIMPLE_RADIAL",
    shared_camera: bool = False,
    overwrite: bool = False,
    preprocessing: Preprocessing | None = None,
    options: PipelineOptions | None = None,
    progress: bool = False,
) -> PipelineResult:
    """:func:`reconstruct` with everything it computed (report, feed-forward poses)."""
    options = options or PipelineOptions()
    if camera_model not in CAMERA_MODELS:
        raise ValueError(f"unsupported camera model {camera_model!r}; choose one of {CAMERA_MODELS}")
    if output_dir is not None:
        check_output(output_dir, overwrite)  # fail before any work
    stages = _Stages(len(STAGES) - (output_dir is None), progress)
    try:
        # 1. images
        stages.start("reading images")
        paths = find_images(image_dir)
        backbone = load_backbone(model, attention, device, preprocessing)
        views, model_images, skipped = load_views(
            paths, image_dir, backbone.preprocessing, options.max_image_size
        )
        grays = [v.gray() for v in views]
        stages.done("read images")

        # 2. backbone: cameras, depth, confidence and (GSA) attention records, in one call
        stages.start("running the model")
        prediction = backbone.predict(model_images[None].to(backbone.device))
        geometry = SceneGeometry.from_prediction(prediction)
        _check_prediction(geometry, model_images)
        summary = summarize_records(prediction.attention, len(views)) if attention == "gsa" else None
        if attention == "gsa" and summary is None:
            logger.warning("the model exported no GSA records: texture-based keypoints, geometric view pairs")
        del prediction
        stages.done("model")

        # 3. keypoints where GSA looks
        stages.start("keypoints")
        thresholds = confidence_thresholds(geometry, options.keypoints.confidence_quantile)
        keypoints = [
            detect_keypoints(v, grays[i], i, geometry, summary, options.keypoints, float(thresholds[i]))
            for i, v in enumerate(views)
        ]
        stages.done("keypoints")

        # 4. matches: GSA-selected views, verified by the predicted geometry, refined photometrically
        stages.start("matching")
        matches = match_views(views, grays, keypoints, geometry, summary, thresholds, options.matching)
        stages.done("matching")

        # 5. tracks and the pycolmap reconstruction at the predicted poses
        stages.start("tracks")
        tracks = build_tracks(keypoints, matches, options.merge_radius)
        points2d = points_in_original(views, tracks)
        rec = build_reconstruction(views, geometry, points2d, camera_model, shared_camera)
        pair_matches = tracks.pairwise_matches()
        graph = correspondence_graph([len(p) for p in points2d], pair_matches)
        manager = pycolmap.ObservationManager(rec, graph)
        xyz, valid = points_from_depth(views, geometry, tracks)
        add_points(manager, tracks, xyz, valid, track_colors(views, tracks))
        manager.filter_observations_with_negative_depth()
        initial_error, initial_points = mean_reprojection_error(rec), rec.num_points3D()
        stages.done("tracks")

        # 6. bundle adjustment, filtering, re-triangulation
        stages.start("bundle adjustment")
        pixel_scale = max(
            max(o / w for o, w in zip(v.original_size, v.work_size, strict=True)) for v in views
        )
        ba_rounds: list[dict] = []
        if ba:
            triangulator = pycolmap.IncrementalTriangulator(graph, rec, manager)
            ba_rounds = refine_reconstruction(rec, manager, triangulator, options.bundle, pixel_scale)
        else:
            error = options.no_ba_max_reproj_error * pixel_scale
            manager.filter_all_points3D(error, options.bundle.min_tri_angle)
        stages.done("bundle adjustment")
        stages.timings["total"] = stages.elapsed()

        report = build_report(
            views=views,
            skipped=skipped,
            backbone=backbone,
            attention=attention,
            summary=summary,
            keypoints=keypoints,
            matches=matches,
            tracks=tracks,
            rec=rec,
            settings={
                "camera_model": camera_model,
                "shared_camera": shared_camera,
                "bundle_adjustment": ba,
                "options": asdict(options),
            },
            initial_error=initial_error,
            initial_points=initial_points,
            ba_rounds=ba_rounds,
            timings=stages.timings,
        )

        # 7. the project folder, atomically
        output = None
        if output_dir is not None:
            stages.start("writing")
            output = write_project(output_dir, rec, points2d, pair_matches, report, overwrite)
            stages.done("write")
    finally:
        stages.close()
    return PipelineResult(rec, report, output, [v.name for v in views], geometry.cam_from_world.clone())


class _Stages:
    """Stage timings and the tqdm progress bar."""

    def __init__(self, total: int, progress: bool) -> None:
        self.timings: dict[str, float] = {}
        self.bar = tqdm(total=total, desc="reconstruct", unit="stage", disable=not progress, leave=False)
        self.progress = progress
        self.begin = self.last = time.perf_counter()

    def start(self, description: str) -> None:
        self.bar.set_description(description)
        self.last = time.perf_counter()

    def done(self, name: str) -> None:
        self.timings[name] = time.perf_counter() - self.last
        self.bar.update(1)
        if self.progress:
            self.bar.set_postfix_str(f"{name} {self.timings[name]:.1f}s")

    def elapsed(self) -> float:
        return time.perf_counter() - self.begin

    def close(self) -> None:
        self.bar.close()


def _check_prediction(geometry: SceneGeometry, model_images: torch.Tensor) -> None:
    s, _, h, w = model_images.shape
    if geometry.num_views != s or geometry.image_size != (h, w):
        raise ValueError(
            f"the model returned {geometry.num_views} views of {geometry.image_size} "
            f"for {s} inputs of {(h, w)}"
        )
    if not torch.isfinite(geometry.cam_from_world).all():
        raise ValueError("the model returned non-finite camera poses; check the model and its weights")
    fixed = geometry.sanitize_intrinsics()
    if fixed:
        logger.warning(
            "the model's intrinsics of %d view(s) (e.g. view %d) were unusable and were replaced by "
            "a default focal length / centred principal point",
            len(fixed),
            fixed[0],
        )
