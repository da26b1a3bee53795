"""LightningDataModule for reconstruction training: synthetic rooms rendered on the training device,
COLMAP-format datasets, and an HDF5 cache of preprocessed frames.

Every step's batch is a pure function of (seed, rank, step) (:class:`BatchStream`): the number of views V is
drawn per batch in [min_views, max_views] (all samples of a batch share V), the batch size is fixed or
``max_images_per_batch // V``. Training resumes where it stopped because the stream starts at the
trainer's restored step. Validation batches are fixed (seeded) and split over ranks.

Sources (``source``):

- ``"synthetic"``: DataLoader workers build scenes and cameras (``make_scene``/``make_cameras``, CPU,
  cheap); the rendering runs in :meth:`ReconstructionDataModule.on_after_batch_transfer`, i.e. on the
  training device (GPU when there). With ``pool_scenes > 0`` rendered scenes are kept in a pool on the
  device and batches draw scenes and view subsets from it (``pool_refresh`` new scenes per step), which
  cuts rendering cost. Training seeds are drawn below ``VAL_SEED_START``; validation uses seeds from
  ``VAL_SEED_START`` on; both are below the held-out benchmark seeds (``HELDOUT_SEED_START``).
- ``"colmap"``: undistorted COLMAP datasets (``data/colmap_dataset.py`` layout, optional depths.h5);
  frames are resized/cropped to (height, width) with intrinsics adjusted (:func:`~.frames.fit_frame`).
  With ``cache_path`` the preprocessed frames are written once to an HDF5 cache (``prepare_data``) and
  read from it. A sample's views are an anchor view plus views among its nearest cameras.
- ``"cache"``: an existing HDF5 frame cache (:mod:`.cache`).

Batches reaching the model are dicts of tensors: ``images`` (B, V, 3, H, W) in [0, 1], ``depth``
(B, V, H, W) (0 = invalid), ``intrinsics`` (B, V, 3, 3), ``cam_from_world`` (B, V, 3, 4), ``has_depth``
(B,), ``step`` (int) and, for synthetic batches, ``render_s`` (rendering wall time). Training batches get
the view-consistent colour augmentation.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data.synthetic import HELDOUT_SEED_START, TRAJECTORIES, make_cameras, make_scene, render_views
from ..geometry import camera_centers
from ._lightning import pl
from .augment import AugmentConfig, ViewConsistentColorAugment
from .cache import FrameCache, SceneFrames, cache_sources, write_frame_cache
from .frames import fit_frame

logger = logging.getLogger(__name__)


class DataConfigError(ValueError):
    """The data settings of a training config cannot work (one line for the command line)."""


VAL_SEED_START = 900_000
"""Synthetic validation seeds start here; training seeds are drawn in [0, VAL_SEED_START)."""
assert VAL_SEED_START < HELDOUT_SEED_START

SOURCES = ("synthetic", "colmap", "cache")
POOL_SAMPLING = ("subset", "window")
_TRAIN, _VAL = 0, 1


@dataclass
class ViewSampling:
    """Views per sample drawn uniformly in [min_views, max_views] once per batch; batch size
    ``batch_size``, or ``max(1, max_images_per_batch // views)`` when that is set."""

    min_views: int = 2
    max_views: int = 8
    batch_size: int = 1
    max_images_per_batch: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_views <= self.max_views:
            raise ValueError(f"need 1 <= min_views <= max_views, got {self.min_views}, {self.max_views}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """(views, batch size) of one batch."""
        views = int(rng.integers(self.min_views, self.max_views + 1))
        if self.max_images_per_batch:
            return views, max(1, self.max_images_per_batch // views)
        return views, self.batch_size


@dataclass
class SyntheticConfig:
    """Synthetic rooms (``speed3r_sfm.data.synthetic``): trajectories drawn uniformly from
    ``trajectories``; ``supersample``/``shadows`` as in ``render_views``; pooling as in the module doc
    (``pool_views``: views rendered per pooled scene, default ``max_views``).

    ``pool_sampling``: how a pooled sample picks its views along the rendered trajectory. ``"subset"``: any
    sorted subset (views may be half a room apart). ``"window"``: consecutive views at a stride drawn in
    [1, ``max_stride``], in either direction, so that every view overlaps its neighbours and the first
    view: relative pose is then observable from image content, which a model trained from scratch needs
    to learn it (benchmarks/results/default_model_diagnosis.md)."""

    trajectories: list[str] = field(default_factory=lambda: list(TRAJECTORIES))
    supersample: int = 1
    shadows: bool = True
    pool_scenes: int = 0
    pool_views: int | None = None
    pool_refresh: int = 1
    pool_sampling: str = "subset"
    max_stride: int = 2

    def __post_init__(self) -> None:
        bad = [t for t in self.trajectories if t not in TRAJECTORIES]
        if bad or not self.trajectories:
            raise ValueError(f"unknown trajectories {bad}; choose from {TRAJECTORIES}")
        if self.pool_sampling not in POOL_SAMPLING:
            raise ValueError(f"unknown pool_sampling {self.pool_sampling!r}; choose from {POOL_SAMPLING}")
        if self.max_stride < 1:
            raise ValueError(f"max_stride must be >= 1, got {self.max_stride}")


def _from_any(cls, value):
    if value is None:
        return cls()
    return value if isinstance(value, cls) else cls(**value)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class BatchStream(IterableDataset):
    """Yields ``make_batch(step, first)`` for steps ``start_step, start_step + 1, ...`` (``length`` steps in
    all, or forever), split over DataLoader workers by step (the DataLoader returns them in order)."""

    def __init__(
        self, make_batch: Callable[[int, bool], dict], start_step: int = 0, length: int | None = None
    ):
        self.make_batch = make_batch
        self.start_step = start_step
        self.length = length

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + worker
        while self.length is None or step < self.start_step + self.length:
            yield self.make_batch(step, step == self.start_step)
            step += workers


class FiniteBatchStream(BatchStream):
    """A :class:`BatchStream` of ``length`` steps, with a length (validation)."""

    def __init__(self, make_batch: Callable[[int, bool], dict], length: int):
        super().__init__(make_batch, start_step=0, length=length)

    def __len__(self) -> int:
        return self.length


@dataclass
class SceneJob:
    """A synthetic scene and its cameras, to be rendered on the training device."""

    seed: int
    trajectory: str
    scene: Any  # SyntheticScene
    intrinsics: torch.Tensor
    cam_from_world: torch.Tensor

    @classmethod
    def make(cls, seed: int, trajectory: str, num_views: int, height: int, width: int) -> SceneJob:
        scene = make_scene(seed)
        intrinsics, cam_from_world = make_cameras(scene, num_views, height, width, trajectory)
        return cls(seed, trajectory, scene, intrinsics, cam_from_world)

    def to(self, device: torch.device | str) -> SceneJob:
        return SceneJob(
            self.seed,
            self.trajectory,
            self.scene.to(device),
            self.intrinsics.to(device),
            self.cam_from_world.to(device),
        )


def pick_views(
    total: int, num_views: int, sampling: str, max_stride: int, gen: torch.Generator
) -> torch.Tensor:
    """Indices of ``num_views`` of ``total`` trajectory views: a sorted random subset (``"subset"``) or
    consecutive views at a random stride in [1, max_stride] that fits, in random direction (``"window"``)."""
    if num_views > total:
        raise ValueError(f"pooled scenes have {total} views, {num_views} requested; raise pool_views")
    if sampling == "subset":
        return torch.randperm(total, generator=gen)[:num_views].sort().values
    fits = max(1, min(max_stride, (total - 1) // max(num_views - 1, 1)))
    stride = int(torch.randint(1, fits + 1, (1,), generator=gen))
    start = int(torch.randint(0, total - (num_views - 1) * stride, (1,), generator=gen))
    idx = torch.arange(num_views) * stride + start
    return idx.flip(0) if bool(torch.rand(1, generator=gen) < 0.5) else idx


class ScenePool:
    """Rendered scenes kept on the device (FIFO of ``capacity``); batches draw scenes and view subsets
    from it (:func:`pick_views`)."""

    def __init__(self, capacity: int, sampling: str = "subset", max_stride: int = 2) -> None:
        self.capacity = capacity
        self.sampling = sampling
        self.max_stride = max_stride
        self.scenes: list[dict[str, torch.Tensor]] = []

    def add(self, views: dict[str, torch.Tensor]) -> None:
        self.scenes.append(views)
        if len(self.scenes) > self.capacity:
            self.scenes.pop(0)

    def sample(self, batch_size: int, num_views: int, seed: int) -> dict[str, torch.Tensor]:
        if not self.scenes:
            raise RuntimeError("the scene pool is empty")
        gen = torch.Generator().manual_seed(seed)
        n = len(self.scenes)
        if batch_size <= n:
            picks = torch.randperm(n, generator=gen)[:batch_size]
        else:
            picks = torch.randint(n, (batch_size,), generator=gen)
        samples = []
        for p in picks.tolist():
            scene = self.scenes[p]
            idx = pick_views(scene["images"].shape[0], num_views, self.sampling, self.max_stride, gen)
            idx = idx.to(scene["images"].device)
            samples.append({k: v[idx] for k, v in scene.items()})
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def choose_views(
    cam_from_world: torch.Tensor, num_views: int, rng: np.random.Generator, expand: int = 4
) -> list[int]:
    """An anchor view and ``num_views - 1`` others drawn among the ``expand * num_views`` cameras closest to
    it (with repetition only when the scene has fewer views)."""
    total = cam_from_world.shape[0]
    anchor = int(rng.integers(total))
    if num_views == 1:
        return [anchor]
    centres = camera_centers(cam_from_world.double())
    dist = (centres - centres[anchor]).norm(dim=-1)
    dist[anchor] = -1.0
    order = torch.argsort(dist, stable=True).tolist()[1:]
    pool = order[: max(num_views - 1, expand * num_views)]
    if not pool:
        return [anchor] * num_views
    picks = rng.choice(pool, size=num_views - 1, replace=len(pool) < num_views - 1)
    return [anchor, *(int(p) for p in picks)]


class ColmapFrames:
    """COLMAP datasets read directly; frames fitted to ``size`` on load. Same interface as
    :class:`~.cache.FrameCache` (``cam_from_world``, ``num_views``, ``load``)."""

    def __init__(self, roots: list[str], size: tuple[int, int], image_dir: str = "images") -> None:
        from ..data.colmap_dataset import load_colmap_dataset

        if not roots:
            raise ValueError("no COLMAP dataset roots given")
        self.size = size
        self.datasets = [
            load_colmap_dataset(root, image_dir=image_dir, require_pinhole=True) for root in roots
        ]
        self.scene_names = [Path(root).name for root in roots]
        self.cam_from_world = [d.cam_from_world for d in self.datasets]
        self.has_depth = [d.depth_file is not None for d in self.datasets]

    def __len__(self) -> int:
        return len(self.datasets)

    def num_views(self, scene: int) -> int:
        return len(self.datasets[scene])

    def load(self, scene: int, views: list[int]) -> dict[str, torch.Tensor]:
        dataset = self.datasets[scene]
        images, ks, depths = [], [], []
        for v in views:
            depth = dataset.load_depth(v) if self.has_depth[scene] else None
            image, k, depth = fit_frame(dataset.load_image(v), dataset.intrinsics[v], self.size, depth)
            images.append(image)
            ks.append(k)
            depths.append(depth if depth is not None else torch.zeros(self.size))
        return {
            "images": torch.stack(images),
            "intrinsics": torch.stack(ks).float(),
            "cam_from_world": dataset.cam_from_world[views].float(),
            "depth": torch.stack(depths),
            "has_depth": torch.tensor(self.has_depth[scene]),
        }


def build_colmap_cache(
    roots: list[str],
    path: str | os.PathLike,
    size: tuple[int, int],
    image_dir: str = "images",
    overwrite: bool = False,
) -> Path:
    """Preprocess every registered view of the COLMAP datasets ``roots`` to ``size`` into an HDF5 cache."""
    frames = ColmapFrames(roots, size, image_dir)
    names = [n if frames.scene_names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(frames.scene_names)]

    def scenes():
        for i, name in enumerate(names):
            data = frames.load(i, list(range(frames.num_views(i))))
            yield SceneFrames(
                name=name,
                images=data["images"],
                intrinsics=data["intrinsics"].double(),
                cam_from_world=frames.datasets[i].cam_from_world,
                depth=data["depth"] if frames.has_depth[i] else None,
                image_names=frames.datasets[i].image_names,
            )

    return write_frame_cache(
        path, scenes(), overwrite=overwrite, sources=colmap_sources(roots, size, image_dir)
    )


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def colmap_sources(roots: list[str], size: tuple[int, int], image_dir: str = "images") -> str:
    """What a frame cache of the COLMAP datasets ``roots`` depends on, as JSON: each root's absolute path
    and the size and modification time of its model files, depth file, image folder and every image file
    (as one digest), the frame size and the image folder name. A cache whose recorded sources differ is
    stale."""
    entries = []
    for root in roots:
        root_path = Path(root).resolve()
        files = [p for sub in ("sparse/0", "sparse", ".") for p in sorted((root_path / sub).glob("*.bin"))]
        files += [p for sub in ("sparse/0", "sparse", ".") for p in sorted((root_path / sub).glob("*.txt"))]
        files += [root_path / "depths.h5", root_path / image_dir]
        stamps = {str(p.relative_to(root_path)): _stamp(p) for p in files if p.exists()}
        images = root_path / image_dir
        if images.is_dir():  # every image file, in one digest (a file replaced in place keeps the folder's)
            listing = sorted(
                (str(p.relative_to(images)), *_stamp(p)) for p in images.rglob("*") if p.is_file()
            )
            stamps["image_files"] = hashlib.sha1(json.dumps(listing).encode()).hexdigest()
        entries.append({"root": str(root_path), "files": stamps})
    return json.dumps({"roots": entries, "size": list(size), "image_dir": image_dir}, sort_keys=True)


def _stack(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


@dataclass
class BatchPlanner:
    """What each batch holds, as a pure function of (seed, rank, step): view count, batch size, scenes and
    views. Picklable (it runs in DataLoader workers); the DataModule builds it in ``planner()``."""

    source: str
    size: tuple[int, int]
    views: ViewSampling
    synthetic: SyntheticConfig
    pooled: bool = False
    frames: Any = None
    val_frames: Any = None
    val_views: int = 8
    val_batch_size: int = 1
    nearby_expand: int = 4
    seed: int = 0

    def train_batch(self, step: int, first: bool = False, rank: int = 0) -> dict[str, Any]:
        rng = _rng(self.seed, _TRAIN, rank, step)
        num_views, batch_size = self.views.draw(rng)
        if self.source != "synthetic":
            return self._frame_batch(self.frames, rng, batch_size, num_views, step)
        h, w = self.size
        syn = self.synthetic

        def job(views: int) -> SceneJob:
            seed = int(rng.integers(0, VAL_SEED_START))
            trajectory = syn.trajectories[int(rng.integers(len(syn.trajectories)))]
            return SceneJob.make(seed, trajectory, views, h, w)

        if not self.pooled:
            return {"jobs": [job(num_views) for _ in range(batch_size)], "step": step}
        new = syn.pool_scenes if first else syn.pool_refresh
        pool_views = syn.pool_views or self.views.max_views
        return {
            "jobs": [job(pool_views) for _ in range(new)],
            "pool_sample": (batch_size, num_views, int(rng.integers(2**62))),
            "step": step,
        }

    def val_batch(self, index: int) -> dict[str, Any]:
        if self.val_frames is None:
            h, w = self.size
            trajectories = self.synthetic.trajectories
            jobs = []
            for b in range(self.val_batch_size):
                k = index * self.val_batch_size + b
                jobs.append(
                    SceneJob.make(
                        VAL_SEED_START + k, trajectories[k % len(trajectories)], self.val_views, h, w
                    )
                )
            return {"jobs": jobs, "step": index}
        rng = _rng(self.seed, _VAL, index)
        return self._frame_batch(self.val_frames, rng, self.val_batch_size, self.val_views, index)

    def _frame_batch(
        self, frames, rng: np.random.Generator, batch_size: int, num_views: int, step: int
    ) -> dict:
        samples = []
        for _ in range(batch_size):
            scene = int(rng.integers(len(frames)))
            views = choose_views(frames.cam_from_world[scene], num_views, rng, self.nearby_expand)
            samples.append(frames.load(scene, views))
        return {**_stack(samples), "step": step}


@dataclass
class _RankValBatches:
    """Validation batch i of a rank: global batch (i * world + rank) mod total."""

    planner: BatchPlanner
    rank: int
    world: int
    total: int

    def __call__(self, i: int, first: bool = False) -> dict[str, Any]:
        return self.planner.val_batch((i * self.world + self.rank) % self.total)


class ReconstructionDataModule(pl.LightningDataModule):
    """Training and validation batches of posed views (see the module docstring).

    Args:
        source: "synthetic", "colmap" or "cache".
        height, width: model input size (multiples of the patch size, 14).
        views: :class:`ViewSampling` of training batches.
        synthetic: :class:`SyntheticConfig`.
        colmap_roots: COLMAP dataset folders (source "colmap").
        image_dir: image folder name inside each COLMAP root.
        cache_path: HDF5 frame cache: built from ``colmap_roots`` if missing or built from other datasets
            (source "colmap"), or read (source "cache").
        val_colmap_roots: COLMAP folders for validation (default: the training source, other batches).
        val_batches, val_views, val_batch_size: fixed validation batches (0 batches: no validation).
        augment: :class:`~.augment.AugmentConfig` for training batches (None: none).
        nearby_expand: views of a COLMAP/cache sample come from the ``nearby_expand * V`` cameras
            nearest to a random anchor view.
        num_workers: DataLoader workers.
        seed: base seed of all sampling.
    """

    def __init__(
        self,
        source: str = "synthetic",
        height: int = 56,
        width: int = 84,
        views: ViewSampling | None = None,
        synthetic: SyntheticConfig | None = None,
        colmap_roots: list[str] | None = None,
        image_dir: str = "images",
        cache_path: str | None = None,
        val_colmap_roots: list[str] | None = None,
        val_batches: int = 4,
        val_views: int = 8,
        val_batch_size: int = 1,
        augment: AugmentConfig | None = None,
        nearby_expand: int = 4,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise DataConfigError(f"unknown source {source!r}; choose one of {SOURCES}")
        if height % 14 or width % 14:
            raise DataConfigError(f"data.height and data.width must be multiples of 14, got {height}x{width}")
        self.source = source
        self.size = (height, width)
        self.views = _from_any(ViewSampling, views)
        self.synthetic = _from_any(SyntheticConfig, synthetic)
        self.colmap_roots = list(colmap_roots or [])
        self.image_dir = image_dir
        self.cache_path = cache_path
        self.val_colmap_roots = list(val_colmap_roots or [])
        self.val_batches = val_batches
        self.val_views = val_views
        self.val_batch_size = val_batch_size
        self.augment_config = AugmentConfig.from_any(augment)
        self.nearby_expand = nearby_expand
        self.num_workers = num_workers
        self.seed = seed
        if source == "colmap" and not self.colmap_roots:
            raise DataConfigError("source 'colmap' needs colmap_roots: give the COLMAP dataset folders")
        if source == "cache" and not cache_path:
            raise DataConfigError("source 'cache' needs cache_path")
        pool_views = self.synthetic.pool_views or self.views.max_views
        if self.synthetic.pool_scenes and pool_views < self.views.max_views:
            raise ValueError(f"pool_views ({pool_views}) must be >= max_views ({self.views.max_views})")
        self.save_hyperparameters(
            {
                "source": source,
                "height": height,
                "width": width,
                "views": vars(self.views).copy(),
                "synthetic": {**vars(self.synthetic), "trajectories": list(self.synthetic.trajectories)},
                "colmap_roots": self.colmap_roots,
                "image_dir": image_dir,
                "cache_path": cache_path,
                "val_colmap_roots": self.val_colmap_roots,
                "val_batches": val_batches,
                "val_views": val_views,
                "val_batch_size": val_batch_size,
                "augment": None if self.augment_config is None else vars(self.augment_config).copy(),
                "nearby_expand": nearby_expand,
                "num_workers": num_workers,
                "seed": seed,
            }
        )
        self._frames = None
        self._val_frames = None
        syn = self.synthetic
        self._pool = (
            ScenePool(syn.pool_scenes, syn.pool_sampling, syn.max_stride) if syn.pool_scenes else None
        )
        self._augment = None

    # ------------------------------------------------------------------ setup

    def prepare_data(self) -> None:
        """Build the HDF5 cache of the COLMAP datasets (rank 0): once, and again whenever the datasets it
        was built from changed (other roots, an edited model, another frame size)."""
        if self.source != "colmap" or not self.cache_path:
            return
        path = Path(self.cache_path)
        if path.exists():
            if cache_sources(path) == colmap_sources(self.colmap_roots, self.size, self.image_dir):
                return
            logger.warning("frame cache %s was built from other datasets or settings; rebuilding it", path)
        build_colmap_cache(self.colmap_roots, path, self.size, self.image_dir, overwrite=True)

    def setup(self, stage: str | None = None) -> None:
        if self.source == "colmap":
            self._frames = (
                FrameCache(self.cache_path)
                if self.cache_path
                else ColmapFrames(self.colmap_roots, self.size, self.image_dir)
            )
        elif self.source == "cache":
            self._frames = FrameCache(self.cache_path)
        if self._frames is not None and tuple(self._frames.size) != self.size:
            raise ValueError(
                f"frame cache {self.cache_path} holds {self._frames.size} frames, the model wants {self.size}"
            )
        if self.val_colmap_roots:
            self._val_frames = ColmapFrames(self.val_colmap_roots, self.size, self.image_dir)
        else:
            self._val_frames = self._frames

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _start_step(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches

    # ------------------------------------------------------------------ batch plans

    def planner(self) -> BatchPlanner:
        """The (picklable) batch planner of the current setup."""
        if self.source != "synthetic" and self._frames is None:
            self.setup("fit")
        return BatchPlanner(
            source=self.source,
            size=self.size,
            views=self.views,
            synthetic=self.synthetic,
            pooled=self._pool is not None,
            frames=self._frames,
            val_frames=self._val_frames,
            val_views=self.val_views,
            val_batch_size=self.val_batch_size,
            nearby_expand=self.nearby_expand,
            seed=self.seed,
        )

    def train_batch(self, step: int, first: bool = False) -> dict[str, Any]:
        """The training batch of ``step`` on this rank (before device-side rendering/augmentation)."""
        return self.planner().train_batch(step, first, self._rank()[0])

    def val_batch(self, index: int) -> dict[str, Any]:
        """Validation batch ``index`` (the same for every run and rank layout)."""
        return self.planner().val_batch(index)

    # ------------------------------------------------------------------ loaders

    def _loader(self, stream: BatchStream) -> DataLoader:
        workers = self.num_workers
        return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        make = functools.partial(self.planner().train_batch, rank=self._rank()[0])
        return self._loader(BatchStream(make, start_step=self._start_step()))

    def val_dataloader(self) -> DataLoader | list:
        if self.val_batches <= 0:
            return []
        rank, world = self._rank()
        make = _RankValBatches(self.planner(), rank, world, self.val_batches)
        return self._loader(FiniteBatchStream(make, length=math.ceil(self.val_batches / world)))

    # ------------------------------------------------------------------ device side

    def render(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """Render the batch's synthetic jobs on ``device`` (pooling them if configured)."""
        syn, (h, w) = self.synthetic, self.size
        start = time.perf_counter()
        rendered = []
        for job in batch["jobs"]:
            views = render_views(
                job.scene,
                job.intrinsics,
                job.cam_from_world,
                h,
                w,
                device=device,
                supersample=syn.supersample,
                shadows=syn.shadows,
            )
            rendered.append(
                {
                    "images": views.images,
                    "depth": views.depth,
                    "intrinsics": views.intrinsics,
                    "cam_from_world": views.cam_from_world,
                }
            )
        if "pool_sample" in batch:
            for views in rendered:
                self._pool.add(views)
            batch_size, num_views, seed = batch["pool_sample"]
            stacked = self._pool.sample(batch_size, num_views, seed)
        else:
            stacked = _stack(rendered)
        b = stacked["images"].shape[0]
        stacked["has_depth"] = torch.ones(b, dtype=torch.bool, device=device)
        stacked["step"] = batch["step"]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stacked["render_s"] = time.perf_counter() - start
        return stacked

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        device = batch["images"].device if "images" in batch else batch["jobs"][0].intrinsics.device
        if "jobs" in batch:
            batch = self.render(batch, device)
        trainer = self.trainer
        if self.augment_config is not None and trainer is not None and trainer.training:
            if self._augment is None:
                self._augment = ViewConsistentColorAugment(self.augment_config)
            batch["images"] = self._augment(batch["images"])
        return batch
