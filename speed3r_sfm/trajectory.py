"""Camera trajectories in the TUM RGB-D format, which SLAM evaluation tools read (evo, the TUM scripts).

One line per registered image, ``timestamp tx ty tz qx qy qz qw``: the camera's centre and its
world-from-camera rotation (Hamilton quaternion, w last) in the reconstruction's frame and scale::

    speed3r-sfm export OUT -o trajectory.txt --format tum
    evo_ape tum groundtruth.txt trajectory.txt --align --correct_scale

Timestamps come from the image names (:func:`timestamp_rule`):

- every file stem a number, as in the TUM RGB-D datasets (``1305031102.175304.png``: seconds) and EuRoC
  (``1403636579763555584.png``: nanoseconds, a stem of 19 digits, written in seconds): that number;
- else every stem holding a number, its last one growing with the name order (``frame_00012.png``,
  ``rgb_1305031102.175304.png``): that number (in seconds as above);
- else the image's index in natural name order (frame_9 before frame_10) among all the images of the run,
  ``all_names`` (a project's database.db lists them; a written model holds only the registered ones).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import pycolmap

from .fileio import written_atomically

TUM_HEADER = "# timestamp tx ty tz qx qy qz qw"
NANOSECOND_DIGITS = 19  # EuRoC's stems: nanoseconds since the epoch
_NUMBER = re.compile(r"\d+(\.\d+)?", re.ASCII)
_DIGITS = re.compile(r"\d+", re.ASCII)


TimestampRule = Literal["stem", "number in name", "index"]


def timestamp_rule(names: Sequence[str]) -> TimestampRule:
    """Which rule of this module's docstring gives the images ``names`` (all of a run's, for one camera)
    their timestamps. A number in the names counts only if it grows with the name order."""
    stems = [Path(name).stem for name in names]
    if stems and all(_NUMBER.fullmatch(stem) for stem in stems):
        return "stem"
    numbers = {name: _last_number(name) for name in names}
    if names and None not in numbers.values():
        ordered = sorted(names, key=natural_order)
        values = [Decimal(_seconds(numbers[name])) for name in ordered]
        if all(a < b for a, b in zip(values, values[1:], strict=False)):
            return "number in name"
    return "index"


def _last_number(name: str) -> str | None:
    found = [match.group(0) for match in _NUMBER.finditer(Path(name).stem)]
    return found[-1] if found else None


def tum_timestamps(names: Sequence[str], all_names: Sequence[str] | None = None) -> dict[str, str]:
    """The timestamp of each image name, as text (no digit lost to floating point). ``all_names``: every
    image of the run (one camera's), ``names`` among them; default ``names``."""
    every = sorted(set(all_names or ()) | set(names), key=natural_order)
    rule = timestamp_rule(every)
    if rule == "stem":
        return {name: _seconds(Path(name).stem) for name in names}
    if rule == "number in name":
        return {name: _seconds(_last_number(name)) for name in names}
    index = {name: k for k, name in enumerate(every)}
    return {name: str(index[name]) for name in names}


def natural_order(name: str) -> list[tuple[int, int | str]]:
    """Sort key of a name with its digit runs as numbers: frame_9 before frame_10."""
    return [
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name, flags=re.ASCII)
    ]


def _seconds(stem: str) -> str:
    if len(stem) == NANOSECOND_DIGITS and stem.isdigit():
        return f"{stem[:-9]}.{stem[-9:]}"
    return str(int(stem)) if stem.isdigit() else stem  # frame numbers: 00012 -> 12


def tum_lines(
    rec: pycolmap.Reconstruction, prefix: str = "", all_names: Sequence[str] | None = None
) -> list[str]:
    """The registered images whose name starts with ``prefix`` (one camera of a rig: ``"cam0/"``) as TUM
    lines, in time order; ``all_names``: every image of the run (:func:`tum_timestamps`). Raises
    ValueError if two images would get one timestamp or none is left."""
    images = [image for image in rec.images.values() if image.name.startswith(prefix)]
    if not images:
        raise ValueError(f"no image name starts with {prefix!r}" if prefix else "the model has no image")
    names = [image.name for image in images]
    every = sorted({*names, *(name for name in all_names or () if name.startswith(prefix))})
    folders = sorted({str(PurePosixPath(name).parent) for name in every})
    if len(folders) > 1 and timestamp_rule(every) == "index":  # indices would interleave the cameras
        listed = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
        raise ValueError(
            f"the images lie in {len(folders)} folders ({listed}) and their names hold no frame number that "
            f"differs per image: a trajectory is one camera's; pass one camera's prefix (e.g. --images "
            f"{folders[0]}/)"
        )
    timestamps = tum_timestamps(names, every)
    seen: dict[Decimal, str] = {}
    for name, stamp in sorted(timestamps.items()):
        if Decimal(stamp) in seen:
            raise ValueError(
                f"images {seen[Decimal(stamp)]} and {name} have the same timestamp {stamp}: a trajectory is "
                "one camera's; pass the prefix of one camera's images (e.g. --images cam0/)"
            )
        seen[Decimal(stamp)] = name
    lines = []
    for image in sorted(images, key=lambda image: Decimal(timestamps[image.name])):
        if not image.has_pose:
            continue
        world_from_cam = image.cam_from_world().inverse()
        values = np.concatenate([world_from_cam.translation, world_from_cam.rotation.quat]) + 0.0  # no -0
        lines.append(" ".join([timestamps[image.name], *(repr(float(v)) for v in values)]))
    if not lines:
        which = f"whose name starts with {prefix!r} " if prefix else ""
        raise ValueError(f"no image {which}is registered: no trajectory to write")
    return lines


def write_tum(
    rec: pycolmap.Reconstruction,
    path: str | os.PathLike,
    prefix: str = "",
    all_names: Sequence[str] | None = None,
) -> Path:
    """Write :func:`tum_lines` (after a ``#`` header) to ``path``, through a temporary file."""
    lines = tum_lines(rec, prefix, all_names)
    with written_atomically(path) as tmp:
        tmp.write_text("\n".join([TUM_HEADER, *lines]) + "\n")
    return Path(path)
