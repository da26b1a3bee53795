"""``reconstruct(image_dir)``: images -> feed-forward prediction -> GSA keypoints and matches -> tracks ->
pycolmap reconstruction -> bundle adjustment -> COLMAP project.

Read top to bottom, :func:`run_pipeline` does:

1. list and read the images (skipping unreadable files and duplicates), preprocess them for the backbone;
2. run the backbone (``inference.py``) once: cameras, depth, confidences and, with GSA, the attention
   records; or, for long sequences (``chunk_size``), once per overlapping chunk of views composed into one
   frame by robust Sim(3) (``chunked.py``), with the records of each chunk merged into one summary
   (``records.py``); a model that exports match descriptors (the shipped default) gets its poses from them
   and its depth instead of from its camera head (token poses, ``token_poses.py``; in chunks, per chunk
   before composing);
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
   observation back (a wrong join that the first adjustment's filter locked in comes undone); steps 4-6
   and these passes are ``passes.py``;
7. reconstruct the views left unregistered on their own, as further models (``PipelineOptions.max_models``);
8. write the project atomically (``export.py``): sparse/N, database.db, points.ply, report.json.

Settings: :class:`~.options.PipelineOptions`; stage timings and the progress bar: ``stages.py``.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap
import torch

from .backbone import AttentionKind, Backbone, ModelSpec, load_backbone
from .colmap_model import (
    CAMERA_MODELS,
    CameraSharing,
    adjusted_shared_camera,
    known_camera,
    parse_camera_params,
)
from .export import check_output, write_project
from .frames import SceneGeometry
from .inference import ChunkOptions, check_chunk_arguments, check_prediction, run_backbone
from .inputs import LOW_COLOUR_SCORE, ImageList, Preprocessing, View, load_views, select_images
from .keypoints import confidence_thresholds, detect_keypoints
from .model_ids import in_first_model_ids, matches_in_first_model_ids
from .options import PipelineOptions
from .passes import adjust_rescue_readjust, match_and_adjust
from .report import build_report
from .stages import STAGES, Stages
from .token_poses import apply_token_poses

logger = logging.getLogger(__name__)


class ReconstructionError(RuntimeError):
    """The images ran through the pipeline but gave no reconstruction (no 3D point, or fewer than two
    registered images); ``report`` holds what the run found (counts, timings), as report.json would."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` produced.

    Attributes:
        reconstruction: the pycolmap Reconstruction (every input image; the unregistered without a pose).
        report: what report.json holds (counts, timings, reprojection errors, settings, warnings).
        output_dir: the project folder written, or None.
        image_names: the images' names, in the order of the poses below (image id - 1; for a further model,
            in its own run's order, as are its poses and report).
        feedforward_cam_from_world: (N, 3, 4) float64, the poses bundle adjustment started from, in the
            model's frame.
        head_cam_from_world: (N, 3, 4) float64, the camera head's poses (the same as above unless token
            poses replaced them: ``report["poses"]``).
        further_models: the views this run did not register, reconstructed on their own
            (``PipelineOptions.max_models``), with this run's image and camera ids.
        pair_matches: per pair of image ids less one, ``(i, j)``, the (M, 2) indices of the 2D points of
            image i + 1 and image j + 1 matched between them (as database.db holds them, but for the views a
            further model registers: that model's).
    """

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

    Args:
        image_dir: folder of images (jpg, png, tif, bmp, webp); unreadable files and duplicates are skipped
            with a logged warning. COLMAP names the images by their paths relative to it.
        output_dir: project folder to create (``sparse/0``, ``database.db``, ``points.ply``, ``report.json``),
            written to a temporary folder and moved into place; None: nothing is written.
        model: "default" (the shipped weights), a Hugging Face Hub id (``facebook/VGGT-1B``,
            ``yyfz233/Pi3``), a checkpoint path (.pt, .safetensors, a Lightning .ckpt), a built backbone
            module, or a callable returning a ``Prediction``.
        attention: "gsa" (keypoints and matches from GSA records, unless the model declares its selection
            unfit to guide: ``Backbone.guided``), "dense" (texture keypoints, view pairs from the predicted
            geometry) or "auto" (the model's own choice: GSA for official checkpoints, dense below 256 views
            per pass on CUDA; the shipped default dense below 64 views per pass on the CPU and 128 on CUDA).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        ba: bundle-adjust (without it the poses are the feed-forward ones, degrees off).
        camera_model: one of :data:`~speed3r_sfm.pipeline.CAMERA_MODELS`; distortion starts at zero and is
            refined by bundle adjustment.
        shared_camera: True: one camera for all images (they must have one size); ``"per_folder"``: one
            camera per folder of the image names (with ``recursive`` or ``image_list``; a rig, several
            phones), as COLMAP's ``CameraMode.PER_FOLDER``; False: one camera per image.
        camera_params: known intrinsics of every image in ``camera_model``'s COLMAP parameter order and
            original pixels (a list or ``"f,cx,cy,k"``, as COLMAP's ``--ImageReader.camera_params``; images
            of one size); the COLMAP cameras carry them and bundle adjustment holds them fixed.
        overwrite: replace an existing project at ``output_dir``.
        preprocessing: how images are resized for the model (default: the model's own).
        options: every stage's settings (:class:`~speed3r_sfm.pipeline.PipelineOptions`).
        progress: show a progress bar of the stages.
        chunk_size: views per model pass for long sequences (None: one pass on the CPU, on CUDA as many as
            fit in free memory); chunks are composed into one frame by robust Sim(3).
        chunk_overlap: views shared by consecutive chunks (None: a quarter of the chunk).
        ordered: the images are a sequence in name order, or ``image_list``'s (video); False: an unordered
            collection, grouped into chunks by the similarity of the model's own tokens.
        chunk_h5: HDF5 file keeping each chunk's output, so that an interrupted run resumes.
        undistort: also write ``output_dir/undistorted`` (undistorted images and PINHOLE cameras in
            ``images/`` and ``sparse/0/``, what Gaussian-splatting and NeRF tools read).
        image_list: the images to use, names relative to ``image_dir`` in the order given (a list, or a text
            file with one name per line, as COLMAP's ``image_list_path``).
        recursive: also read the images of ``image_dir``'s subfolders.

    Returns:
        The pycolmap Reconstruction. It holds every input image, those left unregistered without a pose
        (``has_pose`` False: loop over ``rec.reg_image_ids()``); ``output_dir/sparse/0`` holds the
        registered ones, as COLMAP's mapper writes them. Views it did not register go on to further models
        (``PipelineOptions.max_models``), written to ``sparse/1``, ...; :func:`run_pipeline` returns them
        too, with the report and the feed-forward poses (:class:`PipelineResult`).

    Raises:
        InputError: unusable input (an empty folder, one image, a bad image list, ...).
        OutputExistsError: ``output_dir`` cannot take the project: it holds one and ``overwrite`` is False,
            or it is a file, holds the input images or holds folders a project would not have.
        OutputPathError: ``output_dir`` cannot be written (e.g. a symbolic link).
        ReconstructionError: the images gave no reconstruction (its ``report`` says what the run found).
        ModelNotAvailableError, DeviceNotAvailableError: the model or the device cannot be loaded.
        CheckpointError: the weights do not fit the model they declare.
        ChunkFileError: ``chunk_h5`` holds another run's chunks.
        ValueError, TypeError: an argument of the wrong kind (e.g. an unknown ``camera_model``).

        All but the last are exported at the top level (``speed3r_sfm.InputError``, ...) except
        ``ChunkFileError`` (``speed3r_sfm.pipeline.chunked``).
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


LOGGED_UNREGISTERED = 5  # views left unregistered that are logged one by one
MANY_UNREGISTERED = 0.25  # share of the views left unregistered from which the run warns (below)
UNRELATED_VIEWS_HINT = (
    "%d of %d views registered in no model. If they show another scene, reconstruct each scene on its own (a "
    "project's unregistered_images.txt lists them for --image_list): the model sees all views at once, and "
    "unrelated views degrade its predictions for the others (a scene kept from two mixed in one folder was "
    "5 deg off, alone 0.8 deg)"
)


_MAKING_FURTHER_MODEL = contextvars.ContextVar("making_further_model", default=False)


def _further_model(image_dir: str | os.PathLike, names: list[str], **arguments: Any) -> PipelineResult:
    """A further model of the views ``names`` of another run (not written; that run tells of its views)."""
    token = _MAKING_FURTHER_MODEL.set(True)
    try:
        return run_pipeline(image_dir, None, image_list=names, **arguments)
    finally:
        _MAKING_FURTHER_MODEL.reset(token)


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
) -> PipelineResult:
    """:func:`reconstruct` with everything it computed (report, feed-forward poses, further models)."""
    in_further = _MAKING_FURTHER_MODEL.get()  # the run this one makes a further model of gives the hints
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
    stages = Stages(len(STAGES) - (output_dir is None) + readjusting, progress, log=not in_further)
    try:
        # 1. images
        stages.start("reading images")
        per_pass = len(paths) if chunk_size is None else min(len(paths), chunk_size)
        backbone = load_backbone(model, attention, device, preprocessing, num_views=per_pass)
        attention = backbone.attention  # "auto" resolved
        views, model_images, skipped = load_views(
            paths, image_dir, backbone.preprocessing, options.max_image_size, options.min_work_scale
        )
        read_per_pass = len(views) if chunk_size is None else min(len(views), chunk_size)
        choose = backbone.attention_for_views if requested_attention == "auto" else None
        again = choose(read_per_pass) if choose is not None and read_per_pass != per_pass else attention
        if again != attention:  # files were skipped: "auto" for the views read
            spec, backbone = backbone.preprocessing, None  # one model in memory at a time
            backbone = load_backbone(model, again, device, spec, num_views=read_per_pass)
            attention = backbone.attention
        input_warnings = _input_warnings(backbone, views)
        if shared_camera == "per_folder" and not in_further and all("/" not in v.name for v in views):
            logger.warning(
                "shared_camera='per_folder' with every image in one folder: one camera for all; pass "
                "recursive=True (or an image_list naming subfolders) for a camera per subfolder"
            )
        calibration = None if known_params is None else known_camera(camera_model, known_params, views)
        grays = [v.gray() for v in views]
        # original pixels per work pixel: losses are in work pixels, COLMAP's thresholds in original ones
        pixel_scale = max(o / w for v in views for o, w in zip(v.original_size, v.work_size, strict=True))
        stages.done("read images")

        # 2. backbone: cameras, depth, confidence and (GSA) attention records, in one call or per chunk
        stages.start("running the model")
        prediction, summary, chunking = run_backbone(
            backbone,
            model_images,
            [v.name for v in views],
            ChunkOptions(chunk_size, chunk_overlap, ordered, chunk_h5),
            with_tracker=options.matching.track_verification,
            token_poses=options.token_poses,
            loops=options.loops,
        )
        geometry = SceneGeometry.from_prediction(prediction)
        check_prediction(geometry, model_images)
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
            match_and_adjust,
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
            adjust_rescue_readjust,
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
        tried = set(rescue.get("tried", []))
        by = "PnP on the points it sees, then SIFT" if options.rescue.sift else "PnP on the points it sees"
        not_rescued = f"; the rescue ({by}) could not re-pose it"
        unregistered = []
        for image_id in sorted(dropped):  # in file order (a further model's image_list)
            name = views[image_id - 1].name
            why = hinge if image_id in hinged else weak + (not_rescued if name in tried else "")
            unregistered.append({"name": name, "why": why})
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
            _log_unregistered(unregistered, in_further)
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
                _further_model(
                    image_dir,
                    names,
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
        _log_unregistered([entry for entry in unregistered if entry["name"] in left], in_further)
        if len(left) >= max(2, MANY_UNREGISTERED * len(views)) and not in_further:
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
