"""Training data: batch plans, synthetic rendering, COLMAP datasets, the HDF5 cache, augmentation."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from speed3r_sfm.data.colmap_dataset import write_colmap_dataset
from speed3r_sfm.data.synthetic import render_scene
from speed3r_sfm.geometry import depth_to_world_points, project_points
from speed3r_sfm.training.augment import AugmentConfig, ViewConsistentColorAugment
from speed3r_sfm.training.cache import FrameCache, SceneFrames, write_frame_cache
from speed3r_sfm.training.data import (
    VAL_SEED_START,
    ReconstructionDataModule,
    ScenePool,
    ViewSampling,
    choose_views,
    pick_views,
)
from speed3r_sfm.training.frames import fit_frame

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def colmap_root(tmp_path_factory):
    """A synthetic scene of 4 views at 56 x 84 written as a COLMAP dataset with depth."""
    views = render_scene(7, 4, 56, 84, trajectory="orbit", shadows=False)
    root = tmp_path_factory.mktemp("colmap") / "scene7"
    write_colmap_dataset(root, views.images, views.intrinsics, views.cam_from_world, views.depth)
    return root, views


def test_view_sampling_draws_one_view_count_per_batch():
    import numpy as np

    sampling = ViewSampling(min_views=2, max_views=6, max_images_per_batch=12)
    seen = set()
    for step in range(40):
        views, batch = sampling.draw(np.random.default_rng(step))
        assert 2 <= views <= 6 and batch == 12 // views
        seen.add(views)
    assert seen == {2, 3, 4, 5, 6}
    assert ViewSampling(batch_size=3).draw(np.random.default_rng(0))[1] == 3
    with pytest.raises(ValueError):
        ViewSampling(min_views=5, max_views=4)


def test_synthetic_batches_are_deterministic_and_rendered_on_the_device():
    dm = ReconstructionDataModule(
        height=42, width=56, views={"min_views": 2, "max_views": 4, "batch_size": 2}
    )
    a, b, c = dm.train_batch(5), dm.train_batch(5), dm.train_batch(6)
    assert [j.seed for j in a["jobs"]] == [j.seed for j in b["jobs"]]
    assert [j.seed for j in a["jobs"]] != [j.seed for j in c["jobs"]]
    assert all(0 <= j.seed < VAL_SEED_START for j in a["jobs"])
    views = a["jobs"][0].intrinsics.shape[0]
    assert all(j.intrinsics.shape[0] == views for j in a["jobs"])  # one view count per batch
    batch = dm.on_after_batch_transfer(a, 0)
    assert batch["images"].shape == (2, views, 3, 42, 56)
    assert batch["depth"].shape == (2, views, 42, 56) and (batch["depth"] > 0).all()
    assert batch["cam_from_world"].shape == (2, views, 3, 4) and batch["step"] == 5
    # validation batches use their own fixed seeds
    val = dm.val_batch(1)
    assert [j.seed for j in val["jobs"]] == [VAL_SEED_START + 1]
    assert val["jobs"][0].intrinsics.shape[0] == dm.val_views


def test_scene_pool_samples_view_subsets():
    pool = ScenePool(capacity=2)
    for k in range(3):
        pool.add({"images": torch.full((5, 3, 2, 2), float(k)), "index": torch.arange(5)})
    assert len(pool.scenes) == 2  # FIFO: scene 0 left
    batch = pool.sample(2, 3, seed=0)
    assert batch["images"].shape == (2, 3, 3, 2, 2)
    assert set(batch["images"][:, 0, 0, 0, 0].tolist()) == {1.0, 2.0}
    assert all((row.diff() > 0).all() for row in batch["index"])  # sorted, distinct views
    assert torch.equal(pool.sample(2, 3, seed=0)["index"], batch["index"])

    dm = ReconstructionDataModule(
        height=42,
        width=56,
        views={"min_views": 2, "max_views": 3},
        synthetic={"pool_scenes": 2, "pool_refresh": 1},
    )
    first, later = dm.train_batch(0, first=True), dm.train_batch(1)
    assert len(first["jobs"]) == 2 and len(later["jobs"]) == 1
    assert first["jobs"][0].intrinsics.shape[0] == 3  # pool_views defaults to max_views
    out = dm.on_after_batch_transfer(first, 0)
    assert out["images"].shape[2:] == (3, 42, 56) and out["images"].shape[1] == first["pool_sample"][1]


def test_window_sampling_takes_consecutive_views_at_a_stride():
    gen = torch.Generator().manual_seed(0)
    strides, directions = set(), set()
    for _ in range(200):
        idx = pick_views(24, 5, "window", 3, gen)
        steps = idx.diff()
        assert len(set(steps.tolist())) == 1 and abs(int(steps[0])) in (1, 2, 3)  # one constant stride
        assert idx.min() >= 0 and idx.max() < 24
        strides.add(abs(int(steps[0])))
        directions.add(int(steps[0].sign()))
    assert strides == {1, 2, 3} and directions == {-1, 1}
    # a stride that does not fit shrinks: 5 views of 6 only fit at stride 1
    assert pick_views(6, 5, "window", 3, gen).diff().abs().eq(1).all()
    assert pick_views(1, 1, "window", 3, gen).tolist() == [0]
    with pytest.raises(ValueError, match="raise pool_views"):
        pick_views(4, 5, "window", 2, gen)

    pool = ScenePool(capacity=1, sampling="window", max_stride=1)
    pool.add({"images": torch.zeros(8, 3, 2, 2), "index": torch.arange(8)})
    rows = pool.sample(4, 3, seed=1)["index"]
    assert all(row.diff().abs().eq(1).all() for row in rows)
    with pytest.raises(ValueError, match="pool_sampling"):
        ReconstructionDataModule(height=42, width=56, synthetic={"pool_sampling": "nearby"})


def test_fit_frame_adjusts_intrinsics():
    k = torch.tensor([[50.0, 0.0, 52.0], [0.0, 50.0, 34.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    image = torch.rand(3, 70, 105)
    depth = torch.rand(70, 105) + 1
    out, k2, d2 = fit_frame(image, k, (42, 56), depth)
    assert out.shape == (3, 42, 56) and d2.shape == (42, 56)
    # cover size 42 x 63 (scale 0.6), then 3 columns cropped on the left
    point = torch.tensor([0.3, -0.2, 2.0], dtype=torch.float64)
    uv = (k @ point)[:2] / 2.0
    expected = (uv + 0.5) * 0.6 - 0.5 - torch.tensor([3.0, 0.0], dtype=torch.float64)
    assert torch.allclose((k2 @ point)[:2] / 2.0, expected, atol=1e-12)
    assert set(d2.unique().tolist()) <= set(depth.unique().tolist())  # nearest: no blended depths


def matching_fraction(batch: dict, index: int) -> float:
    """Mean fraction, over ordered view pairs (a, c) of sample ``index``, of view a's depth points that
    project into view c at a pixel whose depth agrees within 2 % (occlusions keep it well below 1; wrong
    intrinsics or poses bring it near 0)."""
    depth, k, pose = (
        batch["depth"][index],
        batch["intrinsics"][index].double(),
        batch["cam_from_world"][index].double(),
    )
    h, w = depth.shape[-2:]
    fractions = []
    for a in range(depth.shape[0]):
        for c in range(depth.shape[0]):
            if a == c:
                continue
            points = depth_to_world_points(depth[a].double(), k[a], pose[a])[depth[a] > 0]
            uv, z = project_points(points, k[c], pose[c])
            col, row = uv[:, 0].round().long(), uv[:, 1].round().long()
            inside = (col >= 0) & (col < w) & (row >= 0) & (row < h) & (z > 0)
            if inside.sum() < 50:
                continue
            seen = depth[c].double()[row[inside], col[inside]]
            fractions.append(float(((seen - z[inside]).abs() / z[inside] < 0.02).double().mean()))
    return sum(fractions) / len(fractions)


def test_colmap_source_and_cache_round_trip(colmap_root, tmp_path):
    root, _ = colmap_root
    kwargs = {
        "source": "colmap",
        "height": 42,
        "width": 56,
        "colmap_roots": [str(root)],
        "views": {"min_views": 2, "max_views": 3, "batch_size": 2},
    }
    direct = ReconstructionDataModule(**kwargs)
    direct.setup("fit")
    batch = direct.train_batch(3)
    s = batch["images"].shape[1]
    assert batch["images"].shape == (2, s, 3, 42, 56) and batch["has_depth"].all()
    k = direct._frames.datasets[0].intrinsics[0, 0, 0].item()
    assert batch["intrinsics"][0, 0, 0, 0].item() == pytest.approx(
        0.75 * k, rel=1e-6
    )  # 56x84 -> 42x63 -> crop
    # intrinsics, poses and depth stay consistent after the resize and crop (~0.2-0.35 here; ~0.01 with
    # the unadjusted intrinsics or swapped poses)
    good = [matching_fraction(batch, i) for i in range(2)]
    unadjusted = direct._frames.datasets[0].intrinsics[0].float().expand_as(batch["intrinsics"])
    bad = [matching_fraction({**batch, "intrinsics": unadjusted}, i) for i in range(2)]
    assert min(good) > 0.12 and max(bad) < 0.5 * min(good)

    cache_path = tmp_path / "frames.h5"
    cached = ReconstructionDataModule(**kwargs, cache_path=str(cache_path))
    cached.prepare_data()
    assert cache_path.exists()
    cached.setup("fit")
    again = cached.train_batch(3)
    assert torch.allclose(again["images"], batch["images"], atol=0.5 / 255 + 1e-6)
    for key in ("depth", "intrinsics", "cam_from_world"):
        assert torch.allclose(again[key], batch[key], atol=1e-5), key
    val = cached.val_batch(0)
    assert val["images"].shape[:2] == (1, cached.val_views)
    # the cache is reused while its datasets stay as they are, and rebuilt when they change
    built = cache_path.stat().st_mtime_ns
    ReconstructionDataModule(**kwargs, cache_path=str(cache_path)).prepare_data()
    assert cache_path.stat().st_mtime_ns == built
    other = tmp_path / "other_scene"
    shutil.copytree(root, other)
    switched = ReconstructionDataModule(
        **(kwargs | {"colmap_roots": [str(other)]}), cache_path=str(cache_path)
    )
    switched.prepare_data()
    switched.setup("fit")
    assert switched._frames.scene_names == ["other_scene"]
    rebuilt = cache_path.stat().st_mtime_ns
    images = sorted((other / "images").iterdir())  # an image replaced in place: the folder's time stays
    folder_time = (other / "images").stat().st_mtime_ns
    images[0].write_bytes(images[1].read_bytes())
    os.utime(other / "images", ns=(folder_time, folder_time))
    switched.prepare_data()
    assert cache_path.stat().st_mtime_ns != rebuilt
    missing = ReconstructionDataModule(
        **(kwargs | {"colmap_roots": [str(tmp_path / "nope")]}), cache_path=str(cache_path)
    )
    with pytest.raises(FileNotFoundError):
        missing.prepare_data()


def test_frame_cache_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    scenes = [
        SceneFrames(
            name=f"s{i}",
            images=torch.rand(3, 3, 14, 28, generator=gen),
            intrinsics=torch.rand(3, 3, 3, generator=gen, dtype=torch.float64),
            cam_from_world=torch.rand(3, 3, 4, generator=gen, dtype=torch.float64),
            depth=torch.rand(3, 14, 28, generator=gen) if i == 0 else None,
        )
        for i in range(2)
    ]
    path = write_frame_cache(tmp_path / "c.h5", scenes)
    cache = FrameCache(path)
    assert cache.scene_names == ["s0", "s1"] and cache.size == (14, 28) and cache.num_views(1) == 3
    frames = cache.load(0, [2, 0])
    assert torch.allclose(frames["images"], scenes[0].images[[2, 0]], atol=0.5 / 255 + 1e-6)
    assert torch.equal(frames["depth"], scenes[0].depth[[2, 0]])
    assert torch.allclose(frames["intrinsics"].double(), scenes[0].intrinsics[[2, 0]], atol=1e-6)
    assert torch.allclose(frames["cam_from_world"].double(), scenes[0].cam_from_world[[2, 0]], atol=1e-6)
    assert frames["has_depth"].item() and not cache.load(1, [0])["has_depth"].item()
    assert (cache.load(1, [0, 1])["depth"] == 0).all()
    with pytest.raises(FileExistsError):
        write_frame_cache(path, scenes)


def test_choose_views_prefers_nearby_cameras():
    import numpy as np

    pose = torch.eye(3, 4).repeat(20, 1, 1)
    pose[:, 0, 3] = -torch.arange(20.0)  # camera centres at x = 0, 1, ..., 19
    for seed in range(10):
        views = choose_views(pose, 4, np.random.default_rng(seed), expand=1)
        anchor = views[0]
        assert len(set(views)) == 4 and all(abs(v - anchor) <= 4 for v in views)


def test_augmentation_is_consistent_across_views():
    torch.manual_seed(0)
    base = torch.rand(1, 1, 3, 14, 14)
    images = base.expand(2, 4, 3, 14, 14).clone()
    config = AugmentConfig(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=1.0, grayscale_p=0.0)
    out = ViewConsistentColorAugment(config)(images)
    assert out.shape == images.shape and (out >= 0).all() and (out <= 1).all()
    assert torch.allclose(out[:, 1:], out[:, :1].expand_as(out[:, 1:]))  # same parameters for all views
    assert not torch.allclose(out[0], images[0])
    assert not torch.allclose(out[0], out[1])  # but drawn per sample
    per_view = ViewConsistentColorAugment(AugmentConfig(**{**vars(config), "consistent": False}))(images)
    assert not torch.allclose(per_view[:, 1], per_view[:, 0])
