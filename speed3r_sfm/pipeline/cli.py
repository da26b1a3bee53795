"""``speed3r-sfm reconstruct IMAGE_DIR -o OUT``: the command-line face of :func:`run_pipeline`.

:func:`reconstruct_command` has plain, typed arguments so that the package CLI (jsonargparse) can expose
it directly; it shows a tqdm progress bar, logs skipped inputs, prints a summary and returns the exit
code (0 on success, 1 when the input or the output folder is unusable, with the reason printed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any, Literal

from tqdm.contrib.logging import logging_redirect_tqdm

from speed3r_sfm.models.checkpoint import CheckpointError

from .backbone import ModelNotAvailableError, resolve_device
from .chunked import ChunkFileError
from .colmap_model import parse_camera_params
from .export import UNREGISTERED_LIST, OutputExistsError, OutputPathError
from .inference import check_chunk_arguments
from .inputs import InputError
from .options import PipelineOptions
from .reconstruct import PipelineResult, ReconstructionError, run_pipeline

SHOWN_UNREGISTERED = 5  # views in no model the summary names one by one (report.json has them all)
# what a user can fix (bad input, an existing output, a missing or unreadable model, a chunk file of
# another run, images that give no reconstruction): one line, no traceback
USER_ERRORS = (
    InputError,
    OutputExistsError,
    OutputPathError,
    ModelNotAvailableError,
    CheckpointError,
    ChunkFileError,
    ReconstructionError,
    FileNotFoundError,
)


def reconstruct_command(
    image_dir: str,
    output: str | None = None,
    model: str = "default",
    attention: Literal["auto", "gsa", "dense"] = "auto",
    device: str = "auto",
    ba: bool = True,
    camera_model: Literal["SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV"] = "SIMPLE_RADIAL",
    shared_camera: bool | Literal["per_folder"] = False,
    camera_params: str | None = None,
    overwrite: bool = False,
    max_keypoints: int | None = None,
    max_image_size: int | None = None,
    min_work_scale: float | None = None,
    track_verification: bool | None = None,
    readjust: bool | None = None,
    deterministic: bool = False,
    chunk_size: int | None = None,
    chunk_overlap: int | None = None,
    ordered: bool = True,
    loop_closure: bool | None = None,
    chunk_h5: str | None = None,
    undistort: bool = False,
    image_list: str | None = None,
    recursive: bool = False,
    options: PipelineOptions | None = None,
    quiet: bool = False,
) -> int:
    """Reconstruct the images in IMAGE_DIR into the COLMAP project OUT.

    Every setting of every stage is an ``--options.*`` argument (``--options.bundle.max_reproj_error 2``;
    ``speed3r_sfm.pipeline.PipelineOptions``, report.json's ``options``); a ``--config`` YAML file holds any
    of them (``pipelines/reconstruct_*.yaml``). The shortcuts below (max_keypoints, ...) set one of them
    each and win over ``options`` when given.

    Args:
        image_dir: folder of images (jpg, png, tif, bmp, webp); unreadable files and duplicates are skipped.
        output: project folder to create (sparse/0, database.db, points.ply, report.json); -o for short.
        model: "default", a Hugging Face Hub id (facebook/VGGT-1B, yyfz233/Pi3) or a checkpoint path.
        attention: "gsa" (sparse attention; its records guide keypoints and matches unless the model
            declares them untrained, as the shipped default does), "dense", or "auto" (the model's own:
            for the shipped default dense below 64 views per pass and GSA from 64 (on CUDA from 128),
            GSA for official checkpoints (on CUDA from 256)).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        ba: run bundle adjustment.
        camera_model: COLMAP camera model; distortion starts at zero and is refined by bundle adjustment.
        shared_camera: one camera for all images (they must have the same size); per_folder: one camera per
            subfolder of IMAGE_DIR (with --recursive or --image_list; a rig, several phones).
        camera_params: known intrinsics of every image, as COLMAP's --ImageReader.camera_params: the
            camera model's parameters in original pixels, comma-separated ("f,cx,cy,k" for SIMPLE_RADIAL,
            "fx,fy,cx,cy" for PINHOLE); held fixed by bundle adjustment; images of one size.
        overwrite: replace OUT if it holds a project (report.json, sparse/ or database.db); an empty OUT is
            used without it, any other existing OUT is refused.
        max_keypoints: keypoints per image (options.keypoints.max_keypoints, 1024).
        max_image_size: long side of the copies used for keypoints and matching (bigger images are read
            downscaled; observations are still in original pixels; options.max_image_size, 1600).
        min_work_scale: those copies keep at least this fraction of the original resolution (0.5 keeps
            the reprojection error of large photos within 1 px of the original; 0: max_image_size only;
            options.min_work_scale, 0.5).
        track_verification: with a model that has a track head (VGGT-1B), keep only the matches its tracks
            agree with (on an H200 about 0.8 s at 24 views, 4 s at 128; options.matching.track_verification,
            true).
        readjust: after bundle adjustment, rebuild every observation at the adjusted poses and adjust once
            more (undoes wrong joins of groups of views the first adjustment locked in; about one more
            bundle adjustment of time; options.bundle.readjust, true).
        deterministic: bundle adjustment on one thread, so that a run repeats bit for bit on the same
            machine (multi-threaded solves differ in the last bits, which a poorly conditioned scene can
            turn into other registered views); about 0.16 s slower at 24 views. Checked on the CPU, not
            with the model on CUDA (true: options.bundle.num_threads 1).
        chunk_size: views per model pass for long sequences; chunks overlap and are aligned by robust Sim(3).
            Default: one pass on CPU, on CUDA as many views as fit in free GPU memory.
        chunk_overlap: views shared by consecutive chunks (default: a quarter of chunk_size).
        ordered: the images are a sequence in file-name order (video); false: an unordered collection,
            grouped into chunks by the similarity of the model's own tokens.
        loop_closure: ordered chunks (three or more): find the places the sequence returns to by the
            model's own tokens, verify each by one more model pass over both places, and correct the drift
            of the chunks between them before matching (one model pass of half a chunk per loop, at most as
            many loops as chunks; options.loops.enabled, true).
        chunk_h5: HDF5 file keeping each chunk's output; a re-run with the same file resumes.
        undistort: also write OUT/undistorted: undistorted images and PINHOLE cameras (images/,
            sparse/0/; further models' in sparse/1/, ...), the folder Gaussian-splatting and NeRF tools
            (3DGS, gsplat, nerfstudio) read.
        image_list: text file naming the images to use, one per line, relative to IMAGE_DIR (as COLMAP's
            --ImageReader.image_list_path; subfolders allowed, "#" comments), in that order.
        recursive: read the images of IMAGE_DIR's subfolders too (names "sub/img.jpg"); OUT must then lie
            outside IMAGE_DIR.
        options: every stage's settings (``--options.STAGE.NAME``; the defaults are the documented ones).
        quiet: errors only: no progress bar, warnings (skipped inputs, unregistered views) or summary. The
            progress bar shows only on a terminal; a log file gets one line per finished stage instead.
    """
    if output is None:
        print("error: give the output project folder with -o OUT", file=sys.stderr)
        return 1
    try:
        check_chunk_arguments(chunk_size, chunk_overlap, chunk_h5, output)
        resolve_device(device)
        if camera_params is not None:
            parse_camera_params(camera_model, camera_params)
        options = with_shortcuts(
            options or PipelineOptions(),
            max_keypoints=max_keypoints,
            max_image_size=max_image_size,
            min_work_scale=min_work_scale,
            track_verification=track_verification,
            readjust=readjust,
            num_threads=1 if deterministic else None,
            loop_closure=loop_closure,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not quiet and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    # log lines (skipped inputs, unregistered views) go through tqdm.write, above the progress bar
    redirect = _errors_only() if quiet else logging_redirect_tqdm()
    try:
        with redirect:
            result = run_pipeline(
                image_dir,
                output,
                model=model,
                attention=attention,
                device=device,
                ba=ba,
                camera_model=camera_model,
                shared_camera=shared_camera,
                camera_params=camera_params,
                overwrite=overwrite,
                options=options,
                progress=not quiet and stderr_is_terminal(),
                chunk_size=chunk_size,
                chunk_overlap=chunk_overlap,
                ordered=ordered,
                chunk_h5=chunk_h5,
                undistort=undistort,
                image_list=image_list,
                recursive=recursive,
            )
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not quiet:
        print(summary_text(result))
    return 0


def stderr_is_terminal() -> bool:
    """Whether stderr, where the progress bar draws, is a terminal (a log file would get every redraw)."""
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


# where each shortcut argument of reconstruct_command lives in PipelineOptions
SHORTCUTS = {
    "max_keypoints": ("keypoints", "max_keypoints"),
    "max_image_size": (None, "max_image_size"),
    "min_work_scale": (None, "min_work_scale"),
    "track_verification": ("matching", "track_verification"),
    "readjust": ("bundle", "readjust"),
    "num_threads": ("bundle", "num_threads"),
    "loop_closure": ("loops", "enabled"),
}


def with_shortcuts(options: PipelineOptions, **values: Any) -> PipelineOptions:
    """``options`` with the given (not None) :data:`SHORTCUTS` set; every part validated anew."""
    parts: dict[str | None, dict[str, Any]] = {}
    for name, value in values.items():
        if value is not None:
            stage, field_name = SHORTCUTS[name]
            parts.setdefault(stage, {})[field_name] = value
    top = parts.pop(None, {})
    stages = {
        stage: dataclasses.replace(getattr(options, stage), **fields) for stage, fields in parts.items()
    }
    return dataclasses.replace(options, **stages, **top)


@contextlib.contextmanager
def _errors_only() -> Iterator[None]:
    """Silence the package's log messages below ERROR and Python warnings inside the block (``--quiet``)."""
    package = logging.getLogger("speed3r_sfm")
    previous = package.level
    package.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        package.setLevel(previous)


# from this many images of one size, a run with a camera per image hints at sharing one
SHARED_CAMERA_HINT_VIEWS = 8


def _camera_text(result: PipelineResult) -> str:
    """The cameras of the first model, and for a camera per image of one size a hint to share one."""
    r = result.report
    count = result.reconstruction.num_cameras()
    how = {True: "shared", False: "one per image", "per_folder": "one per folder"}[r["shared_camera"]]
    first = "sparse/0: " if r.get("further_models") else ""
    text = f"  {first}{count} {r['camera_model']} camera{'s' if count != 1 else ''} ({how})"
    sizes = {tuple(size) for size in r["images"]["sizes"]}
    one_size = len(sizes) == 1 and r.get("camera_params") is None
    if r["shared_camera"] is False and one_size and count >= SHARED_CAMERA_HINT_VIEWS:
        width, height = sizes.pop()
        text += f"; all images are {width}x{height}: if one camera took them, --shared_camera true fits one"
    return text


def summary_text(result: PipelineResult) -> str:
    """A few lines describing a finished reconstruction."""
    r = result.report
    counts, errors, timings = r["counts"], r["reprojection_error_px"], r["timings_s"]
    images = r["images"]
    further = r.get("further_models", [])
    in_models = counts["registered_images"] + sum(entry["registered_images"] for entry in further)
    lines = [
        f"reconstructed {counts['registered_images']}/{images['used']} images"
        + (f" ({len(images['skipped'])} skipped)" if images["skipped"] else "")
        + (f"; {in_models}/{images['used']} in {len(further) + 1} models" if further else ""),
        f"  model {r['model']} on {r['device']}, attention {r['attention']}"
        + (" (GSA records)" if r["gsa_records"] else " (texture keypoints)")
        + (f", poses from {r['poses']['source']}" if "poses" in r else ""),
        f"  {counts['keypoints']} keypoints, {counts['refined_matches']} matches, {counts['tracks']} tracks"
        + _track_check_text(counts.get("track_verification")),
        f"  {'sparse/0: ' if further else ''}{counts['points3D']} points, {counts['observations']} "
        f"observations, mean track length {counts['observations'] / max(counts['points3D'], 1):.2f}",
    ]
    lines.append(_camera_text(result))
    chunking = r.get("chunking")
    if chunking:
        lines.append(
            f"  {chunking['num_chunks']} chunks of {chunking['chunk_size']} views (overlap "
            f"{chunking['overlap']}, {chunking['grouping']}), Sim(3) inliers "
            f">= {min(chunking['sim3_inlier_fraction']):.2f}"
        )
        closure = chunking.get("loop_closure") or {}
        if closure.get("loops"):
            kept = sum(loop["kept"] for loop in closure["loops"])
            turned = max(closure.get("chunk_correction_deg") or [0.0])
            lines.append(
                f"  loop closure: {kept} of {closure['candidates']} candidate loop(s) closed"
                + (
                    f", chunks turned by up to {turned:.1f} deg (the drift the loops took out)"
                    if kept
                    else ""
                )
            )
    if errors["final"] is not None:
        initial = errors["initial"]
        before = f"{initial:.2f} px before BA, " if initial is not None and r["bundle_adjustment"] else ""
        lines.append(f"  reprojection error {before}{errors['final']:.2f} px final")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if not k.startswith("total"))
    lines.append(f"  time {timings.get('total', sum(timings.values())):.1f}s ({stages})")
    rounds = r.get("rescue", {}).get("rounds", [])
    kept = [entry for entry in rounds if entry["registered_after"] > entry["registered_before"]]
    if kept:
        lines.append(
            f"  weakly linked views re-posed and matched again: {kept[0]['registered_before']} -> "
            f"{kept[-1]['registered_after']} registered images"
        )
    recheck = r.get("recheck", {})
    if recheck.get("kept"):
        turned = [f"{name} ({angle:.1f} deg)" for name, angle in recheck["turned_deg"].items()]
        lines.append(
            f"  views on few shared points posed again by SIFT: {', '.join(turned[:3])}"
            + (f" and {len(turned) - 3} more" if len(turned) > 3 else "")
        )
    fixed = r.get("fixed_camera_pass", {})
    if fixed.get("kept"):
        lines.append(
            f"  adjusted again with the adjusted camera held fixed: {fixed['registered_before']} -> "
            f"{fixed['registered_after']} registered images"
        )
    for warning in r.get("input_warnings", []):
        lines.append(f"  warning: {warning}")
    for entry in further:
        error = entry["reprojection_error_px"]
        lines.append(
            f"  further model {entry['path']}: {entry['registered_images']} images (views sparse/0 did not "
            f"register), {entry['points3D']} points" + (f", {error:.2f} px" if error is not None else "")
        )
    in_no_model = set(r.get("registered_in_no_model", [e["name"] for e in r.get("unregistered_images", [])]))
    lost = [entry for entry in r.get("unregistered_images", []) if entry["name"] in in_no_model]
    for entry in lost[:SHOWN_UNREGISTERED]:
        lines.append(f"  not registered: {entry['name']} ({entry['why']})")
    tail = [f"{len(lost) - SHOWN_UNREGISTERED} more not registered"] if len(lost) > SHOWN_UNREGISTERED else []
    if lost and result.output_dir is not None:
        tail.append(f"all listed in {result.output_dir / UNREGISTERED_LIST}")
    if tail:
        lines.append("  " + "; ".join(tail))
    if result.output_dir is not None:
        lines.append(f"  written to {result.output_dir}")
    undistorted = r.get("undistorted")
    if undistorted:
        lines.append(
            f"  undistorted: {undistorted['images']} images, {'/'.join(undistorted['camera_models'])} "
            f"cameras in {result.output_dir / undistorted['path']} (images/, "
            + ", ".join(f"sparse/{k}/" for k in range(undistorted.get("models", 1)))
            + ")"
        )
    return "\n".join(lines)


def _track_check_text(check: dict | None) -> str:
    if not check or not check.get("ran"):
        return ""
    return f" (track head kept {check['kept']} of {check['checked']} candidates)"
