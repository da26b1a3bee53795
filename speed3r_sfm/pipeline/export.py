"""Writing a project folder atomically: everything goes to a temporary sibling folder, then is moved.

Layout::

    OUT/sparse/0/{cameras,images,points3D,rigs,frames}.bin   the reconstruction (after bundle adjustment)
    OUT/sparse/1, sparse/2, ...                              further models: views sparse/0 did not register,
                                                             reconstructed on their own (the database's ids;
                                                             points.ply is sparse/0's)
    OUT/database.db                                          keypoints, matches, two-view geometries
    OUT/points.ply                                           the 3D points (after bundle adjustment)
    OUT/report.json                                          timings, counts, reprojection errors
    OUT/undistorted/{images,sparse/0}                        with ``undistort``: undistorted images and
                                                             PINHOLE cameras (``undistort.py``); further
                                                             models' in undistorted/sparse/1, ...
    OUT/unregistered_images.txt                              views registered in no model: their names, an
                                                             ``--image_list`` for a run of their own

An existing OUT is refused unless ``overwrite``; then the old folder is moved aside, the new one moved
in, and the old one deleted. A failure at any point removes the temporary folder and leaves OUT as it was.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap

from speed3r_sfm.fileio import normal_permissions

from .database import write_database
from .undistort import write_undistorted_models


class OutputExistsError(FileExistsError):
    """The output folder exists and overwriting was not asked for (or it is not a project to replace)."""


class OutputPathError(OSError):
    """The output folder cannot be created where it was asked for (a file in the way, no permission)."""


# what a project folder holds (module docstring): ``overwrite`` replaces a folder of these only
# a project's entries, and points.glb that `speed3r-sfm export OUT` writes by default
FURTHER = re.compile(r"sparse/[1-9][0-9]{0,3}")  # a further model's folder as report.json names it
MAX_REPORT_BYTES = 64 << 20  # a report.json larger than this is not one of ours
UNREGISTERED_LIST = "unregistered_images.txt"  # names of the views that did not register (--image_list)
PROJECT_ENTRIES = (
    "sparse",
    "database.db",
    "points.ply",
    "report.json",
    "undistorted",
    "points.glb",
    UNREGISTERED_LIST,
)
IGNORED_ENTRIES = (".DS_Store",)  # left by file browsers


def check_output(
    output: str | os.PathLike,
    overwrite: bool,
    image_dir: str | os.PathLike | None = None,
    reads_subfolders: bool = False,
    inputs: Sequence[Path] = (),
) -> Path:
    """Fail early (before any computation) if ``output`` cannot be written, or if writing it would replace
    ``image_dir``, the folder of the input images (``output`` is that folder or holds it), or any of the
    ``inputs`` (image files), or, when the images are read from ``image_dir``'s subfolders too, if
    ``output`` lies inside it (its images would be read as input). An existing empty folder is used; a
    non-empty one is replaced only with ``overwrite`` and only if it holds nothing but a project's entries
    (:data:`PROJECT_ENTRIES`), never the current folder or one holding it. Returns ``output`` as an
    absolute path."""
    output = Path(os.path.abspath(output))
    if output.is_symlink():
        raise OutputPathError(
            f"output {output} is a symbolic link (to {os.readlink(output)}); give the folder itself"
        )
    if image_dir is not None:
        if Path(image_dir).resolve().is_relative_to(output.resolve()):
            raise OutputExistsError(
                f"output {output} holds the input images ({image_dir}): the project would replace them; "
                + (
                    "choose a folder outside it"
                    if reads_subfolders
                    else "choose a folder outside it (a new subfolder of the image folder is fine)"
                )
            )
        if reads_subfolders and output.resolve().is_relative_to(Path(image_dir).resolve()):
            raise OutputExistsError(
                f"output {output} lies inside the image folder {image_dir}, whose subfolders are read "
                "(recursive): its images would be read as input next time; choose a folder outside it"
            )
    inside = next((p for p in inputs if p.resolve().is_relative_to(output.resolve())), None)
    if inside is not None:
        raise OutputExistsError(
            f"output {output} holds the input image {inside}: the project would replace it; choose a folder "
            "outside it"
        )
    if output.exists() and not output.is_dir():
        raise OutputExistsError(
            f"output {output} exists and is not a folder; remove it or choose another path"
        )
    if output.is_dir() and current_folder().is_relative_to(output.resolve()):
        raise OutputExistsError(
            f"output {output} is the current folder or holds it: the project would replace the folder "
            "you are working in; choose another folder"
        )
    if output.is_dir() and any(output.iterdir()):
        foreign = sorted({p.name for p in output.iterdir()} - set(PROJECT_ENTRIES) - set(IGNORED_ENTRIES))
        sparse = output / "sparse"
        # sparse/0 and the further models its report lists (a COLMAP mapper run may add more)
        if sparse.is_dir():
            ours = {"0", *_further_model_folders(output), *IGNORED_ENTRIES}
            foreign += sorted(f"sparse/{p.name}" for p in sparse.iterdir() if p.name not in ours)
        if foreign:  # said first: overwrite would not help
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OutputExistsError(
                f"output {output} holds more than a speed3r-sfm project ({shown}): it is never replaced "
                f"(overwrite replaces only a folder of {', '.join(PROJECT_ENTRIES)}); choose another folder "
                "or move those out"
            )
        if not overwrite:
            raise OutputExistsError(
                f"output {output} holds a project already; choose another folder or pass overwrite=True "
                "(CLI: --overwrite true)"
            )
    check_writable(output)
    return output


def _further_model_folders(output: Path) -> list[str]:
    """The sparse/N folders (N >= 1) of the further models a project's report.json lists; [] for a report
    that is missing, not a small regular file or not one this package writes."""
    report = output / "report.json"
    try:
        if not report.is_file() or report.stat().st_size > MAX_REPORT_BYTES:
            return []
        entries = json.loads(report.read_text()).get("further_models", [])
        paths = [entry.get("path") for entry in entries]
    except Exception:  # unreadable, not JSON, nested too deep, not the expected layout: no model is ours
        return []
    names = [
        path.removeprefix("sparse/") for path in paths if isinstance(path, str) and FURTHER.fullmatch(path)
    ]
    return [name for name in names if (output / "sparse" / name).is_dir()]


def current_folder() -> Path:
    """The resolved current folder (a path no folder is inside if it was deleted)."""
    try:
        return Path.cwd().resolve()
    except FileNotFoundError:  # the current folder was deleted
        return Path("/nonexistent-current-folder")


def check_writable(output: Path) -> None:
    """Raise :class:`OutputPathError` unless ``output``'s nearest existing ancestor is a folder in which a
    folder can be created (the project is staged next to ``output``)."""
    ancestor = output.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot create the output {output}: {ancestor} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{output.name}.probe-", dir=ancestor))
    except OSError as error:
        raise OutputPathError(
            f"cannot create the output {output}: no folder can be made in {ancestor} ({error.strerror}); "
            "choose a writable location"
        ) from error


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _clean(value: Any) -> Any:
    """NaN/inf -> None so that report.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_report(path: str | os.PathLike, report: dict) -> None:
    with open(path, "w") as handle:
        json.dump(_clean(report), handle, indent=2, default=_json_default)
        handle.write("\n")


def replace_folder(staged: Path, output: Path, overwrite: bool) -> None:
    """Move the finished ``staged`` folder to ``output``; an old ``output`` is deleted only afterwards (an
    empty one is replaced at once)."""
    if output.is_dir() and not any(output.iterdir()):
        os.replace(staged, output)  # renaming onto an empty folder replaces it
    elif output.exists():
        if not overwrite:
            raise OutputExistsError(f"output {output} appeared while reconstructing; it was not replaced")
        trash = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, trash)
        try:
            os.replace(staged, output)
        except BaseException:
            os.replace(trash, output)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staged, output)


def write_image_list(path: Path, names: list[str]) -> None:
    """The image names (relative to the image folder), one per line, as ``--image_list`` reads them (a
    name starting with "#" as "./#...", not a comment)."""
    header = "# did not register; speed3r-sfm reconstruct IMAGE_DIR -o OUT2 --image_list THIS_FILE"
    lines = [f"./{name}" if name.startswith("#") else name for name in names]
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")


def write_project(
    output: str | os.PathLike,
    rec: pycolmap.Reconstruction,
    keypoints: list[np.ndarray],
    pair_matches: dict[tuple[int, int], np.ndarray],
    report: dict,
    overwrite: bool = False,
    undistort_sources: dict[str, tuple[Path, int]] | None = None,
    further: Sequence[tuple[pycolmap.Reconstruction, dict[tuple[int, int], np.ndarray]]] = (),
) -> Path:
    """Write the project folder (module docstring) atomically; returns its path. ``undistort_sources``
    (per image name, its file and EXIF orientation): also write ``undistorted/``; ``further`` models, in
    ``rec``'s ids (``model_ids.py``) with their matches, go to ``sparse/1``, ``sparse/2``, ..."""
    output = check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        normal_permissions(staged, folder=True)
        models = [rec, *(model for model, _ in further)]
        for index, model in enumerate(models):
            registered = pycolmap.Reconstruction(model)
            registered.tear_down()  # as COLMAP's mapper writes it: no camera or rig of an unregistered image
            (staged / "sparse" / str(index)).mkdir(parents=True, exist_ok=True)
            registered.write(staged / "sparse" / str(index))
        report.setdefault("database", {}).update(
            write_database(staged / "database.db", rec, keypoints, pair_matches, further)
        )
        rec.export_PLY(staged / "points.ply")
        if undistort_sources is not None:
            report["undistorted"] = write_undistorted_models(
                staged / "undistorted", models, staged / "sparse", undistort_sources
            )
        if unregistered := report.get("registered_in_no_model", []):
            write_image_list(staged / UNREGISTERED_LIST, unregistered)
        write_report(staged / "report.json", report)
        replace_folder(staged, output, overwrite)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return output
