"""Camera trajectories in the TUM RGB-D format, which SLAM evaluation tools read (evo, the TUM scripts).

One line per registered image, ``timestamp tx ty tz qx qy qz qw``: the camera's centre and its
world-from-camera rotation (Hamilton quaternion, w last) in the reconstruction's frame and scale::

    speed3r-sfm export OUT -o trajectory.txt --format tum
    evo_ape tum groundtruth.txt trajectory.txt --align --correct_scale

Timestamps come from the image names when every file stem is a number, as in the TUM RGB-D datasets
(``1305031102.175304.png``: seconds) and EuRoC (``1403636579763555584.png``: nanoseconds, a stem of 19
digits, written in seconds); otherwise an image's timestamp is its index in natural name order
(frame_9 before frame_10), counting the images the reconstruction did not register.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import numpy as np
import pycolmap

from .fileio import written_atomically

TUM_HEADER = "# timestamp tx ty tz qx qy qz qw"
NANOSECOND_DIGITS = 19  # EuRoC's stems: nanoseconds since the epoch
_NUMBER = re.compile(r"\d+(\.\d+)?", re.ASCII)


def tum_timestamps(names: Sequence[str]) -> dict[str, str]:
    """The timestamp of each image name, as text (no digit lost to floating point)."""
    stems = {name: Path(name).stem for name in names}
    if names and all(_NUMBER.fullmatch(stem) for stem in stems.values()):
        return {name: _seconds(stem) for name, stem in stems.items()}
    return {name: str(index) for index, name in enumerate(sorted(names, key=natural_order))}


def natural_order(name: str) -> list[tuple[int, int | str]]:
    """Sort key of a name with its digit runs as numbers: frame_9 before frame_10."""
    return [
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name, flags=re.ASCII)
    ]


def _seconds(stem: str) -> str:
    if len(stem) == NANOSECOND_DIGITS and stem.isdigit():
        return f"{stem[:-9]}.{stem[-9:]}"
    return str(int(stem)) if stem.isdigit() else stem  # frame numbers: 00012 -> 12


def tum_lines(rec: pycolmap.Reconstruction, prefix: str = "") -> list[str]:
    """The registered images whose name starts with ``prefix`` (one camera of a rig: ``"cam0/"``) as TUM
    lines, in time order. Raises ValueError if two images would get one timestamp or none is left."""
    images = [image for image in rec.images.values() if image.name.startswith(prefix)]
    if not images:
        raise ValueError(f"no image name starts with {prefix!r}" if prefix else "the model has no image")
    timestamps = tum_timestamps([image.name for image in images])
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


def write_tum(rec: pycolmap.Reconstruction, path: str | os.PathLike, prefix: str = "") -> Path:
    """Write :func:`tum_lines` (after a ``#`` header) to ``path``, through a temporary file."""
    lines = tum_lines(rec, prefix)
    with written_atomically(path) as tmp:
        tmp.write_text("\n".join([TUM_HEADER, *lines]) + "\n")
    return Path(path)
