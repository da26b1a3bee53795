"""An HDF5 cache of preprocessed frames: written once, read per view by the data loader workers.

Layout of one file (one group per scene)::

    /<scene>/images          uint8   (S, H, W, 3)   one chunk per view
    /<scene>/depth           float32 (S, H, W)      optional; z-depth, 0 = invalid (lzf-compressed)
    /<scene>/intrinsics      float64 (S, 3, 3)      integer-centre convention
    /<scene>/cam_from_world  float64 (S, 3, 4)      OpenCV
    /<scene>/names           utf-8 strings (S,)
    attrs: height, width, format, sources (optional: what the frames were made from)

Files are written to a temporary name and renamed, so a cache is either complete or absent. Handles are
opened lazily per process (h5py handles must not cross a fork).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CACHE_FORMAT = "speed3r-sfm/frames-v1"


@dataclass
class SceneFrames:
    """Frames of one scene at one size: images (S, 3, H, W) in [0, 1] (or uint8 (S, H, W, 3)), intrinsics
    (S, 3, 3), cam_from_world (S, 3, 4), optional depth (S, H, W) and image names."""

    name: str
    images: torch.Tensor
    intrinsics: torch.Tensor
    cam_from_world: torch.Tensor
    depth: torch.Tensor | None = None
    image_names: list[str] | None = None


def _uint8_hwc(images: torch.Tensor) -> np.ndarray:
    if images.dtype == torch.uint8:
        return images.cpu().numpy() if images.shape[-1] == 3 else images.permute(0, 2, 3, 1).cpu().numpy()
    return (images.clamp(0, 1).permute(0, 2, 3, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


def write_frame_cache(
    path: str | os.PathLike,
    scenes: Iterable[SceneFrames],
    overwrite: bool = False,
    sources: str | None = None,
) -> Path:
    """Write scenes (all at one size) to an HDF5 cache at ``path``; returns the path. ``sources``: a
    description of what the frames were made from, kept with them (:func:`cache_sources`)."""
    import h5py

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    size = None
    count = 0
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = CACHE_FORMAT
            if sources is not None:
                f.attrs["sources"] = sources
            for scene in scenes:
                images = _uint8_hwc(scene.images)
                s, h, w, _ = images.shape
                if size is None:
                    size = (h, w)
                elif size != (h, w):
                    raise ValueError(
                        f"scene {scene.name!r} is {h}x{w}, the cache holds {size[0]}x{size[1]} frames"
                    )
                if scene.name in f:
                    raise ValueError(f"duplicate scene name {scene.name!r}")
                g = f.create_group(scene.name)
                g.create_dataset("images", data=images, chunks=(1, h, w, 3))
                g.create_dataset("intrinsics", data=scene.intrinsics.double().cpu().numpy().reshape(s, 3, 3))
                g.create_dataset(
                    "cam_from_world", data=scene.cam_from_world.double().cpu().numpy().reshape(s, 3, 4)
                )
                names = scene.image_names or [f"{i:05d}" for i in range(s)]
                g.create_dataset("names", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
                if scene.depth is not None:
                    depth = scene.depth.float().cpu().numpy().reshape(s, h, w)
                    g.create_dataset("depth", data=depth, chunks=(1, h, w), compression="lzf")
                count += 1
            if size is None:
                raise ValueError("no scene to write")
            f.attrs["height"], f.attrs["width"] = size
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def cache_sources(path: str | os.PathLike) -> str | None:
    """The ``sources`` a cache was written with (None: none recorded, or no cache at ``path``)."""
    import h5py

    if not Path(path).is_file():
        return None
    with h5py.File(path, "r") as f:
        value = f.attrs.get("sources")
    return None if value is None else str(value)


class FrameCache:
    """Read access to a cache written by :func:`write_frame_cache`.

    The index (scene names, view counts, camera poses) is read at construction; frames are read on
    demand by :meth:`load`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"frame cache {self.path} does not exist")
        with h5py.File(self.path, "r") as f:
            if f.attrs.get("format") != CACHE_FORMAT:
                raise ValueError(f"{self.path} is not a {CACHE_FORMAT} cache")
            self.size = (int(f.attrs["height"]), int(f.attrs["width"]))
            self.scene_names = sorted(f.keys())
            self.cam_from_world = [torch.from_numpy(f[n]["cam_from_world"][()]) for n in self.scene_names]
            self.has_depth = ["depth" in f[n] for n in self.scene_names]
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.scene_names)

    def num_views(self, scene: int) -> int:
        return self.cam_from_world[scene].shape[0]

    def _handle(self):
        import h5py

        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def load(self, scene: int, views: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Frames ``views`` of scene index ``scene``: images (V, 3, H, W) float32 in [0, 1], intrinsics
        (V, 3, 3) and cam_from_world (V, 3, 4) float32, depth (V, H, W) (zeros without depth) and
        ``has_depth`` (a bool tensor)."""
        g = self._handle()[self.scene_names[scene]]
        views = [int(v) for v in views]
        images = np.stack([g["images"][v] for v in views])
        out = {
            "images": torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0,
            "intrinsics": torch.from_numpy(g["intrinsics"][()][views]).float(),
            "cam_from_world": torch.from_numpy(g["cam_from_world"][()][views]).float(),
            "has_depth": torch.tensor(self.has_depth[scene]),
        }
        if self.has_depth[scene]:
            out["depth"] = torch.from_numpy(np.stack([g["depth"][v] for v in views]))
        else:
            out["depth"] = torch.zeros(len(views), *self.size)
        return out

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state
