"""``reconstruct(image_dir)``: images -> feed-forward prediction -> GSA keypoints and matches -> tracks ->
pycolmap reconstruction -> bundle adjustment -> COLMAP project.

Read top to bottom, :func:`run_pipeline` does:

1. list and read the images (skipping unreadable files and duplicates), preprocess them for the backbone;
2. run the backbone once: cameras, depth, confidences and, with GSA, the attention records; or, for long
   sequences (``chunk_size``), once per overlapping chunk of views composed into one frame by robust Sim(3)
   (``chunked.py``), with the records of each chunk merged into one summary (``records.py``); a model
   that exports match descriptors (the shipped default) gets its poses from them and its depth instead of
   from its camera head (token poses, ``token_poses.py``; in chunks, per chunk before composing);
3. detect keypoints in the most-selected token blocks of each view (``keypoints.py``);
4. match them in the views their query blocks selected, verify with the predicted geometry (and the
   track head, when the model has one: ``track_verification.py``) and refine photometrically
   (``matching.py``, ``refine.py``);
5. link matches into tracks (``tracks.py``) and build the pycolmap reconstruction at the predicted poses,
   with points initialised from the predicted depth (``colmap_model.py``);
6. bundle-adjust, filter and re-triangulate with pycolmap, then de-register views that too few points
   link to the rest (``bundle.py``); if some of those can be re-posed by PnP on the points they do see,
   repeat 4-6 from the adjusted poses, keeping their earlier matches (``rescue.py``); then
   (``BundleOptions.readjust``) repeat 5-6 once more with the same matches from the adjusted poses, every
   observation back (a wrong join that the first adjustment's filter locked in comes undone);
7. write the project atomically (``export.py``): sparse/0, database.db, points.ply, report.json.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pycolmap
import torch
from tqdm.auto import tqdm

from speed3r_sfm.eval.metrics import rotation_angle_deg
from speed3r_sfm.models.prediction import Prediction

from .backbone import AttentionKind, Backbone, ModelSpec, load_backbone
from .bundle import (
    BundleOptions,
    contradicted_pairs,
    correspondence_graph,
    drop_hinged_images,
    drop_weakly_linked_images,
    hinged_links,
    matched_rotation,
    mean_reprojection_error,
    refine_reconstruction,
    weakly_linked_images,
)
from .checks import require_at_least, require_integer, require_positive
from .chunked import predict_chunked, stored_plan
from .chunking import default_chunk_size, group_views_by_similarity, plan_chunks
from .colmap_model import (
    CAMERA_MODELS,
    CameraSharing,
    add_points,
    adjusted_shared_camera,
    build_reconstruction,
    keep_adjusted_cameras,
    known_camera,
    parse_camera_params,
    points_from_depth,
    points_in_original,
    track_colors,
    triangulate_tracks,
)
from .export import check_output, write_project
from .frames import SceneGeometry
from .inputs import LOW_COLOUR_SCORE, ImageList, Preprocessing, View, load_views, select_images
from .keypoints import KeypointOptions, confidence_thresholds, detect_keypoints
from .loop_closure import LoopClosure, LoopOptions, close_loops
from .matching import (
    Matches,
    MatchOptions,
    keep_matches,
    match_views,
    matching_pyramids,
    refinement_device,
)
from .model_ids import in_first_model_ids, matches_in_first_model_ids
from .records import AttentionSummary, merge_chunk_summaries, summarize_records
from .refine import PyramidStack
from .report import build_report
from .rescue import RescueOptions, adjusted_geometry, rescued_geometry
from .sift_rescue import SiftFeatures
from .token_poses import TokenPoseOptions, apply_token_poses, posed_by_tokens
from .tracks import Tracks, build_tracks
from .view_features import thumbnail_descriptors, token_descriptors, token_encoder

logger = logging.getLogger(__name__)

STAGES = ("read images", "model", "keypoints", "matching", "tracks", "bundle adjustment", "write")
SPECIAL_TOKENS = 5  # camera / register tokens per view of VGGT and π³ (for the automatic chunk size)


@dataclass
class PipelineOptions:
    """Settings of every stage (defaults are the documented ones).

    Attributes:
        keypoints: Keypoint detection settings (distances in model pixels unless stated).
        matching: Matching settings (distances in model pixels unless stated).
        bundle: Bundle adjustment settings (loss scales in work pixels, error thresholds in original pixels).
        token_poses: Token poses: camera poses from the model's own patch descriptors and depth.
        loops: Loop closure of ordered chunks (sequences that return to a place seen chunks before).
        rescue: Second chance for views that bundle adjustment de-registered as weakly linked.
        merge_radius: a match location this close (work pixels) to a keypoint of its view reuses that
            keypoint instead of adding a 2D point; 0: no merging.
        max_image_size: long side (pixels) of the work copies used for keypoints and matching; larger is
            more precise on big photos, and slower.
        min_work_scale: the work copies keep at least this fraction of the original resolution, whatever
            max_image_size says (0: max_image_size only).
        no_ba_max_reproj_error: without bundle adjustment (ba false), 3D points with a larger reprojection
            error (work pixels) are filtered out.
        max_models: most models written (sparse/0, sparse/1, ...): views left unregistered are
            reconstructed on their own as further models; 1: the first model only.
        min_model_views: a further model is tried only while at least this many views are unregistered,
            and kept only if it registers that many.
    """

    keypoints: KeypointOptions = field(default_factory=KeypointOptions)
    matching: MatchOptions = field(default_factory=MatchOptions)
    bundle: BundleOptions = field(default_factory=BundleOptions)
    token_poses: TokenPoseOptions = field(default_factory=TokenPoseOptions)
    loops: LoopOptions = field(default_factory=LoopOptions)
    rescue: RescueOptions = field(default_factory=RescueOptions)
    merge_radius: float = 1.0  # work pixels: match locations this close to a keypoint reuse it
    max_image_size: int = 1600  # long side of the work copies (keypoints, refinement)...
    # ...but at least this fraction of the original's: 0.45 px of sub-pixel error on the work copy stays
    # within 1 px of the original (a 4144 x 3136 photo: 1.1-1.4 px mean reprojection error at 1600)
    min_work_scale: float = 0.5
    no_ba_max_reproj_error: float = 16.0  # work pixels, point filter when ba=False
    # views that did not register are reconstructed on their own, as further models (sparse/1, sparse/2,
    # ...), while at least ``min_model_views`` of them are left and such a run registers that many, up to
    # ``max_models`` models in all, as COLMAP's mapper starts new models (its min_model_size is 10). A folder
    # of two scenes left the second one unregistered (mixed_scenes_cpu.jsonl). 1: the first model only
    max_models: int = 5
    min_model_views: int = 10

    def __post_init__(self) -> None:
        for name, kind in (
            ("keypoints", KeypointOptions),
            ("matching", MatchOptions),
            ("bundle", BundleOptions),
            ("token_poses", TokenPoseOptions),
            ("loops", LoopOptions),
            ("rescue", RescueOptions),
        ):
            if not isinstance(getattr(self, name), kind):
                got = type(getattr(self, name)).__name__
                raise TypeError(f"PipelineOptions.{name} must be a {kind.__name__}, got {got}")
        require_at_least(self, max_image_size=1, merge_radius=0.0)
        require_integer(self, max_models=1, min_model_views=2)
        require_positive(self, "no_ba_max_reproj_error")
        if not 0.0 <= self.min_work_scale <= 1.0:
            raise ValueError(f"min_work_scale must lie in [0, 1], got {self.min_work_scale}")


class ReconstructionError(RuntimeError):
    """The images ran through the pipeline but gave no reconstruction (no 3D point, or fewer than two
    registered images); ``report`` holds what the run found (counts, timings), as report.json would."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` produced."""

    reconstruction: pycolmap.Reconstruction
    report: dict
    output_dir: Path | None
    image_names: list[str]
    feedforward_cam_from_world: torch.Tensor  # (S, 3, 4) float64, the poses BA started from (model frame)
    head_cam_from_world: torch.Tensor  # (S, 3, 4) float64, the camera head's poses (same as above unless
    # token poses replaced them, see report["poses"]; in chunks, token-posed chunks are composed as they are)
    # the views this run did not register, reconstructed on their own (PipelineOptions.max_models); their
    # reconstruction and pair_matches have this run's image and camera ids (as in the project;
    # ``model_ids.py``), their image_names, poses and report their own run's order
    further_models: list[PipelineResult] = field(default_factory=list)
    # per pair of image ids less one, the indices of the 2D points matched between them (database.db holds
    # them, but for the views a further model registers: that model's)
    pair_matches: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)


def reconstruct(
    image_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    model: ModelSpec = "default",
    attention: AttentionKind = "auto",
    device: str = "auto",
    ba: bool = True,
    camera_model: str = "SIMPLE_RADIAL",
    shared_camera: CameraSharing = False,
    camera_params: str | Sequence[float] | None = None,
    overwrite: bool = False,
    preprocessing: Preprocessing | None = None,
    options: PipelineOptions | None = None,
    progress: bool = False,
    chunk_size: int | None = None,
    chunk_overlap: int | None = None,
    ordered: bool = True,
    chunk_h5: str | os.PathLike | None = None,
    undistort: bool = False,
    image_list: ImageList | None = None,
    recursive: bool = False,
) -> pycolmap.Reconstruction:
    """Reconstruct the images of ``image_dir``; writes a COLMAP project to ``output_dir`` if given.

    ``model``: "default" (the shipped weights), a Hub id, a checkpoint path, a built backbone module or a
    callable returning a ``Prediction``; ``attention``: "gsa" (keypoints and matches from GSA records,
    unless the model declares its selection unfit to guide: ``Backbone.guided``), "dense" (texture
    keypoints, view pairs from the predicted geometry) or "auto" (the model's own choice: GSA for official
    checkpoints (dense below 256 views per pass on CUDA); the shipped default, whose selection is untrained
    and does not guide, dense below 64 views per pass on the CPU and 128 on CUDA, GSA from there);
    ``ba``: bundle-adjust; ``camera_model``: one of ``CAMERA_MODELS`` (distortion starts at zero and is
    refined in BA); ``shared_camera``: one camera for all images (they must have one size), or
    ``"per_folder"``: one camera per folder of the image names (``recursive`` or ``image_list``; a rig, or
    several phones), as COLMAP's ``CameraMode.PER_FOLDER``;
    ``camera_params``: known intrinsics of every image, in ``camera_model``'s COLMAP parameter order and
    original pixels (a list or ``"f,cx,cy,k"``, as COLMAP's ``--ImageReader.camera_params``; the images
    must have one size): the COLMAP cameras carry them and bundle adjustment holds them fixed; token poses
    and matching keep the predicted intrinsics, which the predicted depth is consistent with. Long
    sequences: ``chunk_size`` views per backbone pass (None: one pass on CPU, on CUDA as many as fit in
    free memory), consecutive chunks sharing ``chunk_overlap`` views (None: a quarter of the chunk);
    ``ordered=False`` groups an unordered collection into chunks by the similarity of the backbone's own
    tokens; ``chunk_h5`` stores each chunk's output so that an interrupted run
    resumes. ``undistort``: also write ``output_dir/undistorted`` (undistorted images and PINHOLE cameras
    in ``images/`` and ``sparse/0/``, what Gaussian-splatting and NeRF tools read). The images: every
    image file of ``image_dir`` (``recursive``: and of its subfolders), or ``image_list``, names relative to
    ``image_dir`` in the order given (a list, or a text file with one name per line as COLMAP's
    ``image_list_path``); COLMAP names the images by those relative paths. See
    :func:`run_pipeline` for the rest; returns the pycolmap Reconstruction. It holds every input image,
    those left unregistered without a pose (``has_pose`` False: loop over ``rec.reg_image_ids()``);
    ``output_dir/sparse/0`` holds the registered ones, as COLMAP's mapper writes them. Views it did not
    register go on to further models (``PipelineOptions.max_models``), written to ``sparse/1``, ... and
    returned by :func:`run_pipeline` (``PipelineResult.further_models``). Errors the caller can fix are
    exported at the top level (``speed3r_sfm.InputError``, ``ReconstructionError``, ...).
    """
    return run_pipeline(
        image_dir,
        output_dir,
        model=model,
        attention=attention,
        device=device,
        ba=ba,
        camera_model=camera_model,
        shared_camera=shared_camera,
        camera_params=camera_params,
        overwrite=overwrite,
        preprocessing=preprocessing,
        options=options,
        progress=progress,
        chunk_size=chunk_size,
        chunk_overlap=chunk_overlap,
        ordered=ordered,
        chunk_h5=chunk_h5,
        undistort=undistort,
        image_list=image_list,
        recursive=recursive,
    ).reconstruction


# the re-check (_recheck_weak_views) adjusts again only where SIFT turns a view by more than this from its
# adjusted pose: the SIFT poses were within 0.4-1.1 deg of the truth on the hard orbit, and a new adjustment
# of right views moves the others a little (hinge_and_robustness_experiments.md)
RECHECK_MIN_TURN_DEG = 3.0
LOGGED_UNREGISTERED = 5  # views left unregistered that are logged one by one
MANY_UNREGISTERED = 0.25  # share of the views left unregistered from which the run warns (below)
UNRELATED_VIEWS_HINT = (
    "%d of %d views registered in no model. If they show another scene, reconstruct each scene on its own (a "
    "project's unregistered_images.txt lists them for --image_list): the model sees all views at once, and "
    "unrelated views degrade its predictions for the others (a scene kept from two mixed in one folder was "
    "5 deg off, alone 0.8 deg)"
)


def _flag(name: str, value: object) -> bool:
    """A yes/no argument as a bool (numpy's too); TypeError for anything else: "false" from a config file
    is truthy (overwrite="false" had replaced a project)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def run_pipeline(
    image_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    model: ModelSpec = "default",
    attention: AttentionKind = "auto",
    device: str = "auto",
    ba: bool = True,
    camera_model: str = "SIMPLE_RADIAL",
    shared_camera: CameraSharing = False,
    camera_params: str | Sequence[float] | None = None,
    overwrite: bool = False,
    preprocessing: Preprocessing | None = None,
    options: PipelineOptions | None = None,
    progress: bool = False,
    chunk_size: int | None = None,
    chunk_overlap: int | None = None,
    ordered: bool = True,
    chunk_h5: str | os.PathLike | None = None,
    undistort: bool = False,
    image_list: ImageList | None = None,
    recursive: bool = False,
    *,
    _further: bool = False,
) -> PipelineResult:
    """:func:`reconstruct` with everything it computed (report, feed-forward poses, further models).
    ``_further``: this run makes a further model of another run (which gives the hints)."""
    ba, overwrite, progress = _flag("ba", ba), _flag("overwrite", overwrite), _flag("progress", progress)
    ordered, undistort = _flag("ordered", ordered), _flag("undistort", undistort)
    recursive = _flag("recursive", recursive)
    requested_attention = attention  # further models resolve "auto" for their own number of views
    if not isinstance(shared_camera, bool | np.bool_ | str) or shared_camera not in (
        True,
        False,
        "per_folder",
    ):
        raise TypeError(f"shared_camera must be True, False or 'per_folder', got {shared_camera!r}")
    shared_camera = str(shared_camera) if isinstance(shared_camera, str) else bool(shared_camera)
    options = PipelineOptions() if options is None else options
    if not isinstance(options, PipelineOptions):
        raise TypeError(
            f"options must be a PipelineOptions, got {type(options).__name__}; e.g. "
            "PipelineOptions(keypoints=KeypointOptions(max_keypoints=512))"
        )
    if preprocessing is not None and not isinstance(preprocessing, Preprocessing):
        raise TypeError(
            f"preprocessing must be a Preprocessing, got {type(preprocessing).__name__}; e.g. "
            "Preprocessing('pad', 518)"
        )
    if not isinstance(image_dir, str | os.PathLike):
        raise TypeError(
            f"image_dir must be a folder path, got {type(image_dir).__name__}; to reconstruct chosen images "
            "pass their folder and image_list=[names relative to it]"
        )
    if camera_model not in CAMERA_MODELS:
        raise ValueError(f"unsupported camera model {camera_model!r}; choose one of {CAMERA_MODELS}")
    known_params = None if camera_params is None else parse_camera_params(camera_model, camera_params)
    check_chunk_arguments(chunk_size, chunk_overlap, chunk_h5, output_dir)
    if undistort and output_dir is None:
        raise ValueError("undistort=True writes output_dir/undistorted: give an output_dir")
    paths = select_images(image_dir, image_list, recursive)  # listed (not read) before any work
    if output_dir is not None:
        output_dir = check_output(output_dir, overwrite, image_dir, recursive, inputs=paths)
    readjusting = ba and options.bundle.readjust  # a stage known in advance (the rescue is not)
    stages = _Stages(len(STAGES) - (output_dir is None) + readjusting, progress)
    try:
        # 1. images
        stages.start("reading images")
        per_pass = len(paths) if chunk_size is None else min(len(paths), chunk_size)
        backbone = load_backbone(model, attention, device, preprocessing, num_views=per_pass)
        attention = backbone.attention  # "auto" resolved
        views, model_images, skipped = load_views(
            paths, image_dir, backbone.preprocessing, options.max_image_size, options.min_work_scale
        )
        input_warnings = _input_warnings(backbone, views)
        calibration = None if known_params is None else known_camera(camera_model, known_params, views)
        grays = [v.gray() for v in views]
        # original pixels per work pixel: losses are in work pixels, COLMAP's thresholds in original ones
        pixel_scale = max(o / w for v in views for o, w in zip(v.original_size, v.work_size, strict=True))
        stages.done("read images")

        # 2. backbone: cameras, depth, confidence and (GSA) attention records, in one call or per chunk
        stages.start("running the model")
        prediction, summary, chunking = _run_backbone(
            backbone,
            model_images,
            [v.name for v in views],
            _ChunkOptions(chunk_size, chunk_overlap, ordered, chunk_h5),
            with_tracker=options.matching.track_verification,
            token_poses=options.token_poses,
            loops=options.loops,
        )
        geometry = SceneGeometry.from_prediction(prediction)
        _check_prediction(geometry, model_images)
        head_poses = geometry.cam_from_world.clone()
        pose_source = apply_token_poses(geometry, prediction, options.token_poses)
        tracker = prediction.extras.get("tracker")
        if backbone.guided and summary is None:
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

        # 4-6. matches, tracks, bundle adjustment; once more from the adjusted poses if views hung on too
        # few points and some of them could be re-posed by PnP (``rescue.py``)
        adjust = partial(
            _match_and_adjust,
            views=views,
            grays=grays,
            keypoints=keypoints,
            summary=summary,
            thresholds=thresholds,
            tracker=tracker,
            options=options,
            ba=ba,
            camera_model=camera_model,
            shared_camera=shared_camera,
            calibration=calibration,
            pixel_scale=pixel_scale,
            pyramids={},  # built by the first pass, reused by the rescue's
            device=backbone.device,  # photometric refinement on the model's GPU if it has one
        )
        tree_edges = pose_source.get("tree_edges", [])
        passes = partial(
            _adjust_rescue_readjust,
            geometry=geometry,
            views=views,
            options=options,
            pixel_scale=pixel_scale,
            tree_edges=tree_edges,
            readjusting=readjusting,
            rechecking=ba and options.bundle.recheck_min_shared_points > 0,
        )
        chosen = passes(adjust, stages=stages)
        fixed_camera_pass: dict[str, Any] = {"ran": False}
        camera = None
        one_camera = shared_camera is True  # the pass holds one adjusted camera for every view
        fixed_pass = ba and one_camera and calibration is None and options.bundle.fixed_camera_pass
        if fixed_pass and chosen.adjusted.dropped:
            camera = adjusted_shared_camera(chosen.adjusted.rec, views, camera_model)
        if camera is not None:  # 4-6 again, the adjusted camera held fixed (BundleOptions.fixed_camera_pass)
            stages.add_stage("adjusting again with the adjusted camera held fixed")
            second = passes(partial(adjust, calibration=camera), matches=chosen.first_matches)
            before, after = chosen.adjusted.rec.num_reg_images(), second.adjusted.rec.num_reg_images()
            fixed_camera_pass = {
                "ran": True,
                "camera_params": list(camera.params),
                "registered_before": before,
                "registered_after": after,
                "kept": after > before,
            }
            if after > before:
                chosen = second
            stages.done("fixed-camera pass")
        adjusted, rescue, readjustment = chosen.adjusted, chosen.rescue, chosen.readjustment
        recheck = chosen.recheck
        contradicted, hinged = chosen.contradicted, chosen.hinged
        del tracker, adjust
        rec, matches, tracks, points2d = adjusted.rec, adjusted.matches, adjusted.tracks, adjusted.points2d
        pair_matches, ba_rounds, dropped = adjusted.pair_matches, adjusted.ba_rounds, adjusted.dropped
        # links cut in any pass (one cut in the first pass may be re-joined by the rescue); [] when none
        pose_source["contradicted_links"] = [list(pair) for pair in sorted(contradicted)]
        weak = (
            f"shares fewer than {options.bundle.min_shared_points} 3D points with the main group of views "
            "through view pairs that agree with the feed-forward poses (its pose is not checked by enough "
            "points)"
        )
        hinge = (
            "bundle adjustment joined it to the rest at an angle that its own matches contradict (a hinge), "
            "and the rescue could not re-pose it"
        )
        unregistered = [
            {"name": views[image_id - 1].name, "why": hinge if image_id in hinged else weak}
            for image_id in sorted(dropped)  # in file order (a further model's image_list)
        ]
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
                "camera_params": known_params,
                "bundle_adjustment": ba,
                "input_warnings": input_warnings,
                "options": asdict(options),
                "chunking": chunking,
                "poses": pose_source,
                "unregistered_images": unregistered,
                "rescue": rescue,
                "readjustment": readjustment,
                "recheck": recheck,
                "fixed_camera_pass": fixed_camera_pass,
            },
            initial_error=adjusted.initial_error,
            initial_points=adjusted.initial_points,
            ba_rounds=ba_rounds,
            timings=stages.timings,
        )

        if rec.num_points3D() == 0 or rec.num_reg_images() < 2:
            _log_unregistered(unregistered, _further)
            # many matches and still no point: rays that do not cross (no baseline)
            why = (
                "the camera may not have moved between the views (a still camera, or a pure rotation): "
                "matches without a baseline give no 3D point"
                if rec.num_reg_images() >= 2 and len(matches) >= 10 * len(views)
                else "the images may be too small, without texture or without overlap"
            )
            raise ReconstructionError(
                f"no reconstruction from the {len(views)} images of {image_dir}: {rec.num_reg_images()} "
                f"registered, {rec.num_points3D()} 3D points ({sum(len(k.xy) for k in keypoints)} keypoints, "
                f"{len(matches)} matches); {why}" + (", and nothing was written" if output_dir else ""),
                report,
            )

        # 7. the views that did not register, reconstructed on their own as further models
        if options.max_models > 1 and len(unregistered) >= options.min_model_views:
            backbone = model_images = grays = keypoints = None  # one model in memory at a time
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        further, left = further_models(
            lambda names: _in_ids_of(
                rec,
                run_pipeline(
                    image_dir,
                    None,
                    image_list=names,
                    _further=True,
                    model=model,
                    attention=requested_attention,
                    device=device,
                    ba=ba,
                    camera_model=camera_model,
                    shared_camera=shared_camera,
                    camera_params=camera_params,
                    preprocessing=preprocessing,
                    options=replace(options, max_models=1),
                    chunk_size=chunk_size,
                    chunk_overlap=chunk_overlap,
                    ordered=ordered,
                ),
            ),
            [entry["name"] for entry in unregistered],
            options,
        )
        report["further_models"] = [_model_entry(k + 1, result) for k, result in enumerate(further)]
        report["registered_in_no_model"] = left
        # a further run's views in no model: the run that made it tells of them
        _log_unregistered([entry for entry in unregistered if entry["name"] in left], _further)
        if len(left) >= max(2, MANY_UNREGISTERED * len(views)) and not _further:
            logger.warning(UNRELATED_VIEWS_HINT, len(left), len(views))
        if further:
            stages.timings["further models"] = sum(r.report["timings_s"]["total"] for r in further)
            stages.timings["total"] = stages.elapsed()

        # 8. the project folder, atomically
        output = None
        if output_dir is not None:
            stages.start("writing")
            sources = {v.name: (v.path, v.exif_orientation) for v in views} if undistort else None
            others = [(r.reconstruction, r.pair_matches) for r in further]
            output = write_project(
                output_dir, rec, points2d, pair_matches, report, overwrite, sources, further=others
            )
            stages.done("write")
    finally:
        stages.close()
    names = [v.name for v in views]
    return PipelineResult(
        rec,
        report,
        output,
        names,
        geometry.cam_from_world.clone(),
        head_poses,
        further_models=further,
        pair_matches=pair_matches,
    )


def _in_ids_of(first: pycolmap.Reconstruction, result: PipelineResult) -> PipelineResult:
    """A further model's ``result`` with its reconstruction and matches in ``first``'s ids, as COLMAP's
    models of one database (``model_ids.py``)."""
    result.reconstruction = in_first_model_ids(result.reconstruction, first)
    result.pair_matches = matches_in_first_model_ids(result.pair_matches, result.image_names, first)
    return result


def _log_unregistered(entries: list[dict], further: bool) -> None:
    """One line per view left unregistered, the first :data:`LOGGED_UNREGISTERED` (then one line for the
    rest; report.json lists them all): a warning, or INFO in a further model's run (the run that made it
    tells of the views in no model)."""
    level = logging.INFO if further else logging.WARNING
    for entry in entries[:LOGGED_UNREGISTERED]:
        logger.log(level, "not registered: %s: %s", entry["name"], entry["why"])
    if len(entries) > LOGGED_UNREGISTERED:
        rest = len(entries) - LOGGED_UNREGISTERED
        logger.log(level, "not registered: %d more (report.json unregistered_images)", rest)


def further_models(
    run: Callable[[list[str]], PipelineResult], unregistered: list[str], options: PipelineOptions
) -> tuple[list[PipelineResult], list[str]]:
    """Reconstruct the ``unregistered`` image names on their own (``run(names)``), then those that run left
    unregistered, and so on, while ``options.min_model_views`` or more are left and a run registers that
    many, up to ``options.max_models`` models with the first. Returns the further models and the names
    registered in none."""
    models: list[PipelineResult] = []
    left = list(unregistered)
    while len(models) + 1 < options.max_models and len(left) >= options.min_model_views:
        logger.info("reconstructing the %d views that did not register as a model of their own", len(left))
        try:
            result = run(left)
        except ReconstructionError as error:
            logger.info("no further model from them: %s", error)
            break
        except Exception as error:  # the first model is done: keep it whatever befalls a further one
            logger.warning("no further model from them: %s: %s", type(error).__name__, error)
            break
        if result.reconstruction.num_reg_images() < options.min_model_views:
            logger.info(
                "no further model from them: %d registered, fewer than min_model_views (%d)",
                result.reconstruction.num_reg_images(),
                options.min_model_views,
            )
            break
        models.append(result)
        left = [entry["name"] for entry in result.report["unregistered_images"]]
    return models, left


def _model_entry(index: int, result: PipelineResult) -> dict:
    """report.json's entry of further model ``index`` (written to sparse/index)."""
    rec = result.reconstruction
    return {
        "path": f"sparse/{index}",
        "images": [
            image.name for image in sorted(rec.images.values(), key=lambda im: im.name) if image.has_pose
        ],
        "registered_images": rec.num_reg_images(),
        "points3D": rec.num_points3D(),
        "reprojection_error_px": result.report["reprojection_error_px"]["final"],
        "time_s": result.report["timings_s"]["total"],
    }


def _input_warnings(backbone: Backbone, views: list[View]) -> list[str]:
    """The model's own warnings (``Backbone.input_warnings``) that apply to these images, each logged; the
    pipeline knows two kinds of input: ``"low_colour"`` (the median view's :func:`~.inputs.colour_score`
    below ``LOW_COLOUR_SCORE``: gray, tinted or washed out) and ``"grayscale"`` (any grayscale view)."""
    declared, found = backbone.input_warnings, []
    if "low_colour" in declared:
        scores = np.array([view.colour_score for view in views])
        if (median := float(np.median(scores))) < LOW_COLOUR_SCORE:
            found.append(
                f"{int((scores < LOW_COLOUR_SCORE).sum())} of {len(views)} images have little colour (median"
                f" colour score {median:.1f}, below {LOW_COLOUR_SCORE}): {declared['low_colour']}"
            )
    if "grayscale" in declared and (gray := sum(view.grayscale for view in views)):
        found.append(f"{gray} of {len(views)} images are grayscale: {declared['grayscale']}")
    for message in found:
        logger.warning(message)
    return found


@dataclass
class _Adjusted:
    """Matches, tracks and the bundle-adjusted reconstruction of one pass of steps 4-6."""

    rec: pycolmap.Reconstruction
    matches: Matches
    tracks: Tracks
    points2d: list
    pair_matches: dict
    initial_error: float | None
    initial_points: int
    ba_rounds: list[dict]
    dropped: list[int]  # image ids de-registered as weakly linked (or hinged)
    distrusted: list[tuple[int, int]]  # image-id pairs whose link contradicted the feed-forward poses
    hinged: list[int] = field(default_factory=list)  # of ``dropped``: beyond a hinge (bundle.hinged_links)


def _match_and_adjust(
    geometry: SceneGeometry,
    *,
    views: list,
    grays: list[torch.Tensor],
    keypoints: list,
    summary: AttentionSummary | None,
    thresholds: torch.Tensor,
    tracker: Any,
    options: PipelineOptions,
    ba: bool,
    camera_model: str,
    shared_camera: CameraSharing,
    calibration: pycolmap.Camera | None,
    pixel_scale: float,
    feedforward: tuple[torch.Tensor, list],
    stages: _Stages | None = None,
    carried: tuple[Matches, list[int]] | None = None,
    matches: Matches | None = None,
    from_adjusted: pycolmap.Reconstruction | None = None,
    pyramids: dict[str, PyramidStack] | None = None,
    device: torch.device | None = None,
) -> _Adjusted:
    """Steps 4-6 of :func:`run_pipeline` on ``geometry`` (``stages``: time them, or None); ``feedforward``:
    the view pairs of the feed-forward pose tree and the cam_from_world they are checked against (the
    feed-forward poses; the rescue's for the views it re-posed); ``carried``: earlier matches kept
    where they touch the given views (image ids); ``matches``: use these instead of matching (step 4);
    ``from_adjusted``: an adjusted reconstruction whose registered images' cameras are kept, and the 3D
    points are triangulated at ``geometry``'s poses where that is well conditioned (else from depth, as
    without it); ``pyramids``: a cache for the refinement's image pyramids, kept between passes;
    ``device``: where the photometric refinement runs if its image pyramids fit (:func:`refinement_device`;
    the CPU if None)."""
    start = stages.start if stages else (lambda name: None)
    done = stages.done if stages else (lambda name: None)
    if matches is None:
        # 4. matches: GSA-selected views, verified by the predicted geometry, refined photometrically
        start("matching")
        pyramids = {} if pyramids is None else pyramids
        if "stack" not in pyramids:
            device = refinement_device(device, grays)
            pyramids["stack"] = matching_pyramids(views, grays, options.matching, device)
        matches = match_views(
            views,
            grays,
            keypoints,
            geometry,
            summary,
            thresholds,
            options.matching,
            tracker,
            pyramids["stack"],
        )
        if carried is not None:
            matches = keep_matches(carried[0], [image_id - 1 for image_id in carried[1]], matches)
        done("matching")

    # 5. tracks and the pycolmap reconstruction at the predicted poses
    start("tracks")
    tracks = build_tracks(keypoints, matches, options.merge_radius)
    points2d = points_in_original(views, tracks)
    rec = build_reconstruction(views, geometry, points2d, camera_model, shared_camera, calibration)
    if from_adjusted is not None:
        keep_adjusted_cameras(rec, from_adjusted)
    pair_matches = tracks.pairwise_matches()
    graph = correspondence_graph([len(p) for p in points2d], pair_matches)
    manager = pycolmap.ObservationManager(rec, graph)
    xyz, valid = points_from_depth(views, geometry, tracks)
    if from_adjusted is not None:
        triangulated, reliable = triangulate_tracks(rec, tracks, points2d, options.bundle.min_tri_angle)
        xyz, valid = np.where(reliable[:, None], triangulated, xyz), valid | reliable
    add_points(manager, tracks, xyz, valid, track_colors(views, tracks))
    manager.filter_observations_with_negative_depth()
    initial_error, initial_points = mean_reprojection_error(rec), rec.num_points3D()
    done("tracks")

    # 6. bundle adjustment, filtering, re-triangulation (without BA: filtering at the feed-forward poses)
    stage = "bundle adjustment" if ba else "filtering"
    start(stage)
    ba_rounds: list[dict] = []
    if ba:
        triangulator = pycolmap.IncrementalTriangulator(graph, rec, manager)
        ba_rounds = refine_reconstruction(rec, manager, triangulator, options.bundle, pixel_scale)
    else:
        error = options.no_ba_max_reproj_error * pixel_scale
        manager.filter_all_points3D(error, options.bundle.min_tri_angle)
    dropped: list[int] = []
    distrusted: list[tuple[int, int]] = []
    bent: list[int] = []
    if ba and rec.num_points3D():  # views whose pose BA fitted to a handful of points or a wrong join
        poses, tree_pairs = feedforward
        distrusted = contradicted_pairs(rec, poses, tree_pairs, options.bundle.max_link_disagreement)
        dropped = drop_weakly_linked_images(rec, manager, options.bundle.min_shared_points, distrusted)
        if options.bundle.drop_hinged:
            own = partial(matched_rotation, rec, points2d, pair_matches)
            bent = drop_hinged_images(rec, manager, tree_pairs, hinged_links(rec, poses, distrusted, own))
        dropped = dropped + bent
    done(stage)
    return _Adjusted(
        rec,
        matches,
        tracks,
        points2d,
        pair_matches,
        initial_error,
        initial_points,
        ba_rounds,
        dropped,
        distrusted,
        bent,
    )


@dataclass
class _Pass:
    """Steps 4-6, the rescue and the readjustment of one calibration (:func:`_adjust_rescue_readjust`)."""

    adjusted: _Adjusted
    rescue: dict[str, Any]
    readjustment: dict[str, Any]
    recheck: dict[str, Any]  # views on few shared points posed again (bundle.recheck_min_shared_points)
    contradicted: set[tuple[int, int]]  # view pairs whose link contradicted the feed-forward poses, any pass
    hinged: set[int]  # image ids de-registered beyond a hinge in any pass (bundle.hinged_links)
    first_matches: Matches  # the matches of its first adjustment


def _adjust_rescue_readjust(
    adjust: Callable[..., _Adjusted],
    *,
    geometry: SceneGeometry,
    views: list,
    options: PipelineOptions,
    pixel_scale: float,
    tree_edges: list,
    readjusting: bool,
    rechecking: bool = False,
    stages: _Stages | None = None,
    matches: Matches | None = None,
) -> _Pass:
    """Steps 4-6 (``adjust``; with ``matches`` instead of matching), then the rescue of weakly linked views
    and the readjustment; ``stages``: time them (or None)."""
    # the poses the view pairs of the feed-forward pose tree are checked against (``contradicted_pairs``)
    reference = geometry.cam_from_world.clone()
    adjusted = adjust(geometry, feedforward=(reference, tree_edges), stages=stages, matches=matches)
    first_matches = adjusted.matches
    contradicted = {(i - 1, j - 1) for i, j in adjusted.distrusted}
    hinged = set(adjusted.hinged)
    rescue: dict[str, Any] = {"rounds": []}
    if adjusted.dropped and options.rescue.enabled:
        if stages:
            stages.add_stage("rescuing weakly linked views")
        adjusted, rescue, reference = _rescue_weak_views(
            adjusted, geometry, adjust, views, options.rescue, pixel_scale, tree_edges, reference
        )
        if stages:
            stages.done("rescue")
        contradicted.update(tuple(pair) for r in rescue["rounds"] for pair in r["contradicted_links"])
        hinged.update(view + 1 for r in rescue["rounds"] for view in r["hinged_views"])
    readjustment: dict[str, Any] = {"ran": False}
    if readjusting and adjusted.rec.num_reg_images() >= 2:
        if stages:
            stages.start("adjusting again from the adjusted poses")
        again = partial(adjust, feedforward=(reference, tree_edges), options=_readjust_options(options))
        adjusted, readjustment = _readjust(adjusted, geometry, again, views)
        contradicted.update(tuple(pair) for pair in readjustment["contradicted_links"])
        if stages:
            stages.done("readjustment")
    rechecked: dict[str, Any] = {"views": []}
    suspects = []
    if rechecking and options.rescue.enabled and options.rescue.sift and adjusted.rec.num_reg_images() >= 2:
        bound = options.bundle.recheck_min_shared_points
        suspects = weakly_linked_images(adjusted.rec, bound, adjusted.distrusted)
    if suspects:
        if stages:
            stages.add_stage("posing views on few shared points again")
        near_solution = partial(adjust, options=_readjust_options(options))
        adjusted, rechecked = _recheck_weak_views(
            adjusted, suspects, geometry, near_solution, views, options.rescue, pixel_scale, tree_edges
        )
        contradicted.update(tuple(pair) for pair in rechecked.get("contradicted_links", []))
        if stages:
            stages.done("re-check")
    return _Pass(adjusted, rescue, readjustment, rechecked, contradicted, hinged, first_matches)


def _recheck_weak_views(
    adjusted: _Adjusted,
    suspects: list[int],
    geometry: SceneGeometry,
    adjust: Callable[..., _Adjusted],
    views: list,
    options: RescueOptions,
    pixel_scale: float,
    tree_edges: list,
) -> tuple[_Adjusted, dict[str, Any]]:
    """The ``suspects`` (image ids of registered views linked by few shared points, ``BundleOptions.
    recheck_min_shared_points``) posed again by SIFT alone: their own matches were found around their
    feed-forward pose and may agree with a wrong one. Where a SIFT pose turns a view by more than
    :data:`RECHECK_MIN_TURN_DEG` from its adjusted pose, every view is matched again from those poses and
    adjusted (``adjust``), kept if as many views register; else ``adjusted`` stays as it is."""
    rec = pycolmap.Reconstruction(adjusted.rec)
    manager = pycolmap.ObservationManager(rec)
    for image_id in suspects:
        manager.deregister_frame(rec.image(image_id).frame_id)
    start = adjusted_geometry(rec, views, geometry)
    entry: dict[str, Any] = {"views": [views[i - 1].name for i in suspects], "kept": False, "turned_deg": {}}
    rescued = rescued_geometry(
        rec, views, start, adjusted.pair_matches, adjusted.points2d, suspects, options, pixel_scale,
        tree_edges, pnp=False,
    )  # fmt: skip
    if rescued is None:
        return adjusted, entry
    posed, placed = rescued
    for image_id, view in zip(suspects, placed, strict=True):
        if view["how"] == "sift":
            was = torch.from_numpy(adjusted.rec.image(image_id).cam_from_world().rotation.matrix())
            turn = rotation_angle_deg(posed.cam_from_world[image_id - 1, :, :3], was)
            entry["turned_deg"][view["name"]] = round(float(turn), 2)
    if max(entry["turned_deg"].values(), default=0.0) <= RECHECK_MIN_TURN_DEG:
        return adjusted, entry  # SIFT agrees with the adjusted poses
    # the suspects' earlier matches are carried: without them view 23 of the hard orbit did not register
    # again (a new matching from its SIFT pose alone finds too few); the adjustment filters the wrong ones
    again = adjust(
        posed, carried=(adjusted.matches, suspects), feedforward=(posed.cam_from_world.clone(), tree_edges)
    )
    entry["kept"] = again.rec.num_reg_images() >= adjusted.rec.num_reg_images()
    entry["contradicted_links"] = [[i - 1, j - 1] for i, j in again.distrusted] if entry["kept"] else []
    return (again if entry["kept"] else adjusted), entry


def _rescue_weak_views(
    adjusted: _Adjusted,
    geometry: SceneGeometry,
    adjust: Callable[..., _Adjusted],
    views: list,
    options: RescueOptions,
    pixel_scale: float,
    tree_edges: list,
    reference: torch.Tensor,
) -> tuple[_Adjusted, dict[str, Any], torch.Tensor]:
    """Rounds of :func:`~.rescue.rescued_geometry` and steps 4-6 again (``adjust``), keeping the weak views'
    earlier matches, while that registers more views; the best result, the report entry and the poses the
    pose tree's links are checked against from then on (``reference``, the feed-forward poses, until a
    round is kept). A round checks them against the poses it starts from (adjusted, re-posed by the
    rescue, else feed-forward): checked against a re-posed view's feed-forward pose, the wrong one, its
    now right links would be cut, and the rescue's poses are in the adjusted poses' frame."""
    rounds = []
    features = SiftFeatures(views, options.sift_image_size, options.sift_ratio)  # kept between rounds
    for _ in range(options.max_rounds):
        rescued = rescued_geometry(
            adjusted.rec,
            views,
            geometry,
            adjusted.pair_matches,
            adjusted.points2d,
            adjusted.dropped,
            options,
            pixel_scale,
            tree_edges,
            features,
        )
        if rescued is None:
            break
        geometry, placed = rescued
        checked = geometry.cam_from_world.clone()
        again = adjust(
            geometry, carried=(adjusted.matches, adjusted.dropped), feedforward=(checked, tree_edges)
        )
        before, after = adjusted.rec.num_reg_images(), again.rec.num_reg_images()
        rounds.append(
            {
                "views": placed,
                "registered_before": before,
                "registered_after": after,
                "contradicted_links": [[i - 1, j - 1] for i, j in again.distrusted],
                "hinged_views": [image_id - 1 for image_id in again.hinged],
            }
        )
        if after <= before:
            break
        adjusted, reference = again, checked
        if not adjusted.dropped:
            break
    return adjusted, {"rounds": rounds}, reference


def _readjust(
    adjusted: _Adjusted, geometry: SceneGeometry, adjust: Callable[..., _Adjusted], views: list
) -> tuple[_Adjusted, dict[str, Any]]:
    """Steps 5-6 once more with the same matches, from the adjusted poses (depth rescaled to them) with every
    observation back; kept when it registers at least as many views. The first adjustment starts several
    degrees off and its filter drops the observations that disagree with where it then is, which can lock
    in a wrong join of two groups of views (a hinge); from poses near the solution the right ones win. It
    keeps the adjusted cameras and triangulates the points at the adjusted poses: from the model's intrinsics
    and depth-unprojected points its solve took 35 Levenberg-Marquardt iterations on average over 15
    held-out runs, from these 23 (``benchmarks/results/readjust_start.md``)."""
    again = adjust(
        adjusted_geometry(adjusted.rec, views, geometry), matches=adjusted.matches, from_adjusted=adjusted.rec
    )
    before, after = adjusted.rec.num_reg_images(), again.rec.num_reg_images()
    kept = after >= before
    entry = {
        "ran": True,
        "registered_before": before,
        "registered_after": after,
        "kept": kept,
        "contradicted_links": [[i - 1, j - 1] for i, j in again.distrusted],
    }
    return (again if kept else adjusted), entry


def _readjust_options(options: PipelineOptions) -> PipelineOptions:
    """The readjustment's settings: ``BundleOptions.readjust_rounds`` rounds, every one at ``loss_scale`` (it
    starts from the adjusted poses, not several degrees off), no hinge drops (``drop_hinged``)."""
    bundle = options.bundle
    return replace(
        options,
        bundle=replace(
            bundle, rounds=bundle.readjust_rounds, initial_loss_scale=bundle.loss_scale, drop_hinged=False
        ),
    )


def check_chunk_arguments(
    chunk_size: int | None,
    chunk_overlap: int | None,
    chunk_h5: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
) -> None:
    """Raise ValueError, saying why, for a chunk size, overlap or chunk file that cannot work."""
    for name, value in (("chunk_size", chunk_size), ("chunk_overlap", chunk_overlap)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be a whole number of views, got {value!r}")
    if chunk_h5 is not None:
        h5 = Path(chunk_h5).resolve()
        if h5.is_dir():
            raise ValueError(
                f"chunk_h5 {chunk_h5} is a folder; give a file path, e.g. {Path(chunk_h5) / 'chunks.h5'}"
            )
        if output_dir is not None and h5.is_relative_to(Path(output_dir).resolve()):
            raise ValueError(
                f"chunk_h5 {chunk_h5} lies in the output folder {output_dir}, which is written anew when the "
                "project is done: keep the chunk file outside it"
            )
        if h5.is_file():
            _check_chunk_file(h5)
    if chunk_size is not None and chunk_size < 2:
        raise ValueError(
            f"chunk_size must be at least 2 (chunks share views to be aligned), got {chunk_size}"
        )
    if chunk_overlap is not None and chunk_overlap < 1:
        raise ValueError(
            f"chunk_overlap must be at least 1 (chunks are aligned on shared views), got {chunk_overlap}"
        )
    if chunk_size is not None and chunk_overlap is not None and chunk_overlap >= chunk_size:
        raise ValueError(f"chunk_overlap ({chunk_overlap}) must be smaller than chunk_size ({chunk_size})")


def _check_chunk_file(path: Path) -> None:
    """Raise ValueError unless the existing file ``path`` is a chunk file (or an empty HDF5 file): chunks
    are never written into another HDF5 file (a dataset's depths.h5) or over a file of another kind."""
    try:
        with h5py.File(path, "r") as file:
            foreign = "plan" not in file.attrs and (len(file.keys()) or len(file.attrs))
    except OSError as error:
        raise ValueError(f"chunk_h5 {path} exists and is not an HDF5 file; give a new path") from error
    if foreign:
        raise ValueError(
            f"chunk_h5 {path} is an HDF5 file but not a chunk file of an earlier run; give a new path"
        )


def _chunk_size(chunk_size: int | None, backbone: Backbone, model_images: torch.Tensor) -> int | None:
    """The views per pass: ``chunk_size`` if given; else on CUDA what fits in free memory; else None (one
    pass)."""
    if chunk_size is not None:
        return chunk_size
    if backbone.device.type != "cuda":
        return None
    patch = backbone.preprocessing.patch_size
    height, width = model_images.shape[-2:]
    return default_chunk_size(backbone.device, (height // patch) * (width // patch) + SPECIAL_TOKENS)


@dataclass
class _ChunkOptions:
    size: int | None
    overlap: int | None
    ordered: bool
    h5: str | os.PathLike | None


def _run_backbone(
    backbone: Backbone,
    model_images: torch.Tensor,
    names: list[str],
    chunk: _ChunkOptions,
    with_tracker: bool = False,
    token_poses: TokenPoseOptions | None = None,
    loops: LoopOptions | None = None,
) -> tuple[Prediction, AttentionSummary | None, dict[str, Any] | None]:
    """The prediction of all views, their GSA summary (None without records) and the chunk plan for the
    report (None for a single pass). In chunks, each chunk is posed by ``token_poses`` (if enabled and the
    model exports descriptors) before the chunks are composed; a single pass is posed by the caller."""
    size = _chunk_size(chunk.size, backbone, model_images)
    if size is None or size >= len(names):
        unused = [
            name
            for name, given in (
                ("chunk_size", chunk.size is not None),
                ("chunk_h5", chunk.h5 is not None),
                ("chunk_overlap", chunk.overlap is not None),
                ("ordered=False", not chunk.ordered),
            )
            if given
        ]
        if unused:
            why = "no chunk_size on this device" if size is None else f"{len(names)} views fit in one pass"
            logger.warning("%s not used: one pass over all views (%s)", ", ".join(unused), why)
        predict = (with_tracker and backbone.predict_with_tracker) or backbone.predict
        prediction = predict(model_images[None].to(backbone.device))
        summary = summarize_records(prediction.attention, len(names)) if backbone.guided else None
        return prediction, summary, None
    overlap = chunk.overlap if chunk.overlap is not None else max(1, size // 4)
    if overlap >= size:
        raise ValueError(f"chunk_overlap ({overlap}) must be smaller than the chunk size ({size})")
    return _predict_in_chunks(backbone, model_images, names, size, overlap, chunk, token_poses, loops)


def _chunk_plan(
    backbone: Backbone,
    model_images: torch.Tensor,
    size: int,
    overlap: int,
    chunk: _ChunkOptions,
) -> tuple[list[list[int]], str]:
    """The chunks and how they were made: ordered windows; for an unordered collection the plan of an
    earlier run stored in the chunk file, else views grouped by their token (or thumbnail) descriptors."""
    num_views = model_images.shape[0]
    if chunk.ordered:
        return plan_chunks(num_views, size, overlap), "ordered"
    stored = stored_plan(chunk.h5) if chunk.h5 is not None else None
    if stored is not None and sorted(v for c in stored for v in c) == list(range(num_views)):
        return stored, "stored in the chunk file"
    features, source = _view_descriptors(backbone, model_images)
    if source == "image thumbnails":
        logger.warning("the model has no known token encoder: unordered views are grouped by thumbnails")
    return group_views_by_similarity(features, size, overlap), source


def _view_descriptors(backbone: Backbone, model_images: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Per-view descriptors (S, D) from the backbone's own image encoder ("backbone tokens"), else from
    grey thumbnails ("image thumbnails"), and which of the two."""
    module = backbone.module
    if module is not None and token_encoder(module) is not None:
        patch = backbone.preprocessing.patch_size
        features = token_descriptors(module, model_images, patch_size=patch, device=backbone.device)
        return features, "backbone tokens"
    return thumbnail_descriptors(model_images), "image thumbnails"


def _predict_in_chunks(
    backbone: Backbone,
    model_images: torch.Tensor,
    names: list[str],
    size: int,
    overlap: int,
    chunk: _ChunkOptions,
    token_poses: TokenPoseOptions | None = None,
    loops: LoopOptions | None = None,
) -> tuple[Prediction, AttentionSummary | None, dict[str, Any]]:
    """The composed prediction of overlapping chunks, the merged GSA summary (or None) and the chunk plan
    for the report. Only one chunk of images is on the device at a time."""
    start = time.perf_counter()
    chunks, grouping = _chunk_plan(backbone, model_images, size, overlap, chunk)
    grouping_s = time.perf_counter() - start
    logger.info(
        "%d views in %d chunks of %d (overlap %d, %s)", len(names), len(chunks), size, overlap, grouping
    )
    if chunk.h5 is not None:
        Path(chunk.h5).parent.mkdir(parents=True, exist_ok=True)

    def predict(images: torch.Tensor) -> Prediction:
        prediction = backbone.predict(images)
        if token_poses is None:
            return prediction
        prediction, report = posed_by_tokens(prediction, token_poses)
        prediction.extras["chunk_report"] = report  # kept in the chunk file with the chunk
        return prediction

    def load(indices: list[int]) -> torch.Tensor:
        return model_images[indices].to(backbone.device)

    prediction = predict_chunked(
        predict,
        load,
        size,
        overlap,
        h5_path=chunk.h5,
        num_views=len(names),
        chunks=chunks,
        keep_maps=("depth", "depth_conf"),  # what SceneGeometry uses
        keep_attention=backbone.guided,
        view_names=names,
        view_digests=[hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in model_images],
        model=f"{backbone.name}, {backbone.attention} attention, token poses {token_poses is not None}",
    )
    extras = prediction.extras
    if token_poses is not None:
        reports = enumerate(extras["chunk_reports"])
        extras["chunk_token_poses"] = {k: report for k, report in reports if report is not None}
    closure = LoopClosure.skipped("unordered chunks")
    if chunk.ordered:
        loops = loops or LoopOptions()
        descriptors = None
        if loops.enabled and len(chunks) > 2:
            descriptors, _ = _view_descriptors(backbone, model_images)
        closure = close_loops(
            prediction, predict, load, descriptors, chunks, loops, backbone.guided, h5_path=chunk.h5
        )
    summary = None
    if backbone.guided:
        summary = merge_chunk_summaries(
            extras["chunk_attention"] + closure.summaries, chunks + closure.loop_chunks, len(names)
        )
    report = {
        "chunk_size": size,
        "overlap": overlap,
        "ordered": chunk.ordered,
        "grouping": grouping,
        "grouping_s": grouping_s,
        "num_chunks": len(chunks),
        "chunks": chunks,
        # views each chunk shares with the one before (the last ordered chunk is shifted back to stay full)
        "shared_views": [len(set(a) & set(b)) for a, b in zip(chunks, chunks[1:], strict=False)],
        "sim3_scale": [float(sim3[0]) for sim3 in extras["chunk_sim3"]],
        "sim3_inlier_fraction": extras["chunk_inlier_fraction"],
        "computed_chunks": extras["computed_chunks"],
        "h5": None if chunk.h5 is None else str(chunk.h5),
        "loop_closure": closure.report,
    }
    return prediction, summary, report


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

    def add_stage(self, description: str) -> None:
        """Start a stage that was not counted in the total."""
        self.bar.total += 1
        self.bar.refresh()
        self.start(description)

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
