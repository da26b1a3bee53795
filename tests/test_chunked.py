"""Chunked long-sequence inference: robust Sim(3), chunk plans, composition and h5 resume (CPU)."""

from __future__ import annotations

import math
import time

import h5py
import pytest
import torch

from speed3r_sfm.data.synthetic import RenderedViews, render_scene
from speed3r_sfm.eval.evaluate import oracle_predictor
from speed3r_sfm.eval.metrics import absolute_trajectory_error
from speed3r_sfm.geometry import apply_sim3, camera_centers, umeyama_sim3
from speed3r_sfm.pipeline.chunked import ChunkFileError, load_view_maps, predict_chunked, stored_plan
from speed3r_sfm.pipeline.chunking import (
    default_chunk_size,
    group_views_by_similarity,
    plan_chunks,
    robust_sim3,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tensors are tiny, and two OpenMP threads on a shared 2-core machine can
    spin for minutes when the cores are busy (measured: 10 s alone, 170 s under load; 15 s with one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _random_sim3(gen: torch.Generator):
    q = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))[0]
    rot = q * torch.sign(torch.det(q))
    return torch.tensor(2.7, dtype=torch.float64), rot, torch.randn(3, generator=gen, dtype=torch.float64) * 3


@pytest.mark.parametrize("loss", ["cauchy", "huber"])
def test_robust_sim3_recovers_transform_with_outliers(loss):
    gen = torch.Generator().manual_seed(0)
    s, rot, t = _random_sim3(gen)
    n = 2000
    src = torch.randn(n, 3, generator=gen, dtype=torch.float64) * 2
    dst = apply_sim3(s, rot, t, src) + torch.randn(n, 3, generator=gen, dtype=torch.float64) * 1e-3
    bad = torch.randperm(n, generator=gen)[: int(0.3 * n)]
    dst[bad] = torch.randn(bad.numel(), 3, generator=gen, dtype=torch.float64) * 20 + 10
    (s_p, r_p, t_p), w = robust_sim3(src.float(), dst.float(), iterations=30, loss=loss)
    assert s_p.dtype == torch.float32
    assert abs(float(s_p) - 2.7) < 1e-3
    assert torch.allclose(r_p.double(), rot, atol=1e-3)
    assert torch.allclose(t_p.double(), t, atol=5e-3)
    good = torch.ones(n, dtype=torch.bool)
    good[bad] = False
    assert w[bad].mean() < 0.1 * w[good].mean()
    # Plain Umeyama is pulled far off by the same outliers.
    s_u, r_u, t_u = umeyama_sim3(src, dst)
    assert abs(float(s_u) - 2.7) > 0.5 and float((t_u - t).norm()) > 1.0


def test_robust_sim3_exact_data_and_prior_weights():
    gen = torch.Generator().manual_seed(1)
    s, rot, t = _random_sim3(gen)
    src = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    dst = apply_sim3(s, rot, t, src)
    prior = torch.rand(50, generator=gen, dtype=torch.float64)
    (s_p, r_p, t_p), _ = robust_sim3(src, dst, prior)
    assert torch.allclose(s_p, s) and torch.allclose(r_p, rot) and torch.allclose(t_p, t)


@pytest.mark.parametrize("n,size,overlap", [(1, 4, 1), (10, 10, 3), (11, 10, 3), (200, 24, 8), (101, 16, 0)])
def test_plan_chunks_covers_with_overlap(n, size, overlap):
    chunks = plan_chunks(n, size, overlap)
    assert sorted({v for c in chunks for v in c}) == list(range(n))
    for c in chunks:
        assert len(c) == min(n, size) and c == list(range(c[0], c[0] + len(c)))
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert len(set(a) & set(b)) >= overlap and b[0] > a[0]
    with pytest.raises(ValueError):
        plan_chunks(n, size, size)


def test_default_chunk_size_cpu():
    assert default_chunk_size("cpu", tokens_per_view=1000) == 32


def test_group_views_by_similarity_recovers_a_shuffled_path():
    gen = torch.Generator().manual_seed(0)
    steps = torch.randn(60, 16, generator=gen) * 0.05
    features = torch.cumsum(steps, 0) + torch.randn(16, generator=gen)  # a smooth path in feature space
    perm = torch.randperm(60, generator=gen)
    chunks = group_views_by_similarity(features[perm], chunk_size=12, overlap=4)
    assert sorted({v for c in chunks for v in c}) == list(range(60))
    # Each chunk holds views that are close on the original path.
    for c in chunks:
        original = perm[torch.tensor(c)]
        assert int(original.max() - original.min()) < 30


def _chunk_oracle(gt: RenderedViews, calls: list, rot_deg: float, trans: float, point_noise: float):
    """Per call: the ground truth of the requested views in a fresh random Sim(3) frame, noisy cameras and
    noisy points with 10% gross outliers (as a chunk of a real backbone would be)."""
    keys = {gt.images[i].numpy().tobytes(): i for i in range(gt.images.shape[0])}

    def predict(images: torch.Tensor):
        idx = [keys[im.numpy().tobytes()] for im in images[0]]
        calls.append(idx)
        sub = RenderedViews(gt.images[idx], gt.depth[idx], gt.intrinsics[idx], gt.cam_from_world[idx])
        pred = oracle_predictor(sub, seed=len(calls), rotation_noise_deg=rot_deg, translation_noise=trans)(
            images
        )
        gen = torch.Generator().manual_seed(1000 + len(calls))
        scale = float(pred.depth.median() / sub.depth.median())
        pts = pred.world_points
        pts = pts + torch.randn(pts.shape, generator=gen) * point_noise * scale
        outlier = torch.rand(pts.shape[:-1], generator=gen) < 0.1
        pts[outlier] = torch.randn(int(outlier.sum()), 3, generator=gen) * 10 * scale
        pred.world_points = pts
        return pred

    return predict


@pytest.fixture(scope="module")
def trajectory():
    start = time.perf_counter()
    gt = render_scene(0, 200, 42, 56, trajectory="forward")
    return gt, time.perf_counter() - start


def test_chunked_oracle_reaches_single_pass_ate(trajectory, tmp_path):
    gt, _ = trajectory
    rot_deg, trans = 0.5, 0.01
    single = oracle_predictor(gt, seed=7, rotation_noise_deg=rot_deg, translation_noise=trans)(
        gt.images[None]
    )
    ate_single, _ = absolute_trajectory_error(single.cam_from_world[0], gt.cam_from_world)

    calls: list = []
    predict = _chunk_oracle(gt, calls, rot_deg, trans, point_noise=0.01)
    h5 = tmp_path / "chunks.h5"
    pred = predict_chunked(predict, gt.images, chunk_size=24, overlap=8, h5_path=h5)
    n_chunks = len(pred.extras["chunks"])
    assert len(calls) == n_chunks == len(plan_chunks(200, 24, 8))
    assert pred.cam_from_world.shape == (1, 200, 3, 4) and torch.isfinite(pred.cam_from_world).all()
    ate_chunked, sim3 = absolute_trajectory_error(pred.cam_from_world[0], gt.cam_from_world)
    length = float(camera_centers(gt.cam_from_world).diff(dim=0).norm(dim=-1).sum())
    print(
        f"ATE single pass {ate_single:.5f}, chunked {ate_chunked:.5f} ({n_chunks} chunks), path {length:.3f}"
    )
    assert ate_chunked < 2.0 * ate_single + 1e-3
    assert min(pred.extras["chunk_inlier_fraction"]) > 0.6

    # Composed points land on the ground truth after the ATE alignment (apart from the injected noise).
    aligned = apply_sim3(*sim3, pred.world_points[0].double())
    err = (aligned - gt.world_points().double()).norm(dim=-1)
    assert float(err.median()) < 0.05 * float(gt.depth.median())

    # Resume: a second run reuses every finished chunk and gives the same result.
    calls.clear()
    again = predict_chunked(predict, gt.images, chunk_size=24, overlap=8, h5_path=h5)
    assert calls == [] and again.extras["computed_chunks"] == []
    assert torch.allclose(again.cam_from_world, pred.cam_from_world)

    # Lazy maps from h5 match the in-memory composition.
    maps = load_view_maps(h5, 150, pred.extras["chunks"], pred.extras["chunk_sim3"])
    assert torch.allclose(maps["world_points"], pred.world_points[0, 150], atol=1e-4)
    assert torch.allclose(maps["depth"], pred.depth[0, 150], atol=1e-4)


def test_resume_after_interrupted_run(trajectory, tmp_path):
    gt, _ = trajectory
    views = gt.images[:40]
    calls: list = []
    predict = _chunk_oracle(gt, calls, 0.0, 0.0, point_noise=0.0)

    def failing(images):
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return predict(images)

    h5 = tmp_path / "chunks.h5"
    with pytest.raises(RuntimeError):
        predict_chunked(failing, views, chunk_size=12, overlap=4, h5_path=h5)
    assert len(calls) == 2
    calls.clear()
    pred = predict_chunked(predict, views, chunk_size=12, overlap=4, h5_path=h5, keep_maps=False)
    n_chunks = len(plan_chunks(40, 12, 4))
    assert pred.extras["computed_chunks"] == list(range(2, n_chunks)) and len(calls) == n_chunks - 2
    ate, _ = absolute_trajectory_error(pred.cam_from_world[0], gt.cam_from_world[:40])
    assert ate < 1e-4 * max(1.0, math.sqrt(float(gt.depth.median())))
    assert pred.depth.shape == (1, 40, 0, 0)
    import h5py

    with h5py.File(h5, "r") as file:  # per-pixel maps stored losslessly compressed, one view per block
        group = file["chunk_00000"]
        assert group["depth"].compression == "lzf" and group["depth"].chunks == (1, *group["depth"].shape[1:])
        assert group["cam_from_world"].compression is None
    again = predict_chunked(predict, views, chunk_size=12, overlap=4, h5_path=h5, keep_maps=False)
    assert again.extras["computed_chunks"] == [] and torch.equal(again.cam_from_world, pred.cam_from_world)


def test_loader_input_and_unplanned_chunks_error(trajectory):
    gt, _ = trajectory
    calls: list = []
    predict = _chunk_oracle(gt, calls, 0.0, 0.0, point_noise=0.0)
    loaded: list = []

    def loader(indices):
        loaded.append(len(indices))
        return gt.images[indices]

    pred = predict_chunked(predict, loader, chunk_size=10, overlap=3, num_views=30)
    assert max(loaded) == 10 and pred.num_views == 30
    with pytest.raises(ValueError):
        predict_chunked(predict, gt.images[:30], 10, 3, chunks=[list(range(10)), list(range(12, 30))])


def _distributed_worker(rank: int, world: int, init_file: str, gt: RenderedViews, h5: str, out_dir: str):
    import json

    import torch.distributed as dist

    from speed3r_sfm.pipeline.chunked import predict_chunked_distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        calls: list = []
        predict = _chunk_oracle(gt, calls, 0.0, 0.0, point_noise=0.0)
        pred = predict_chunked_distributed(predict, gt.images, chunk_size=12, overlap=4, h5_path=h5)
        with open(f"{out_dir}/calls{rank}.json", "w") as f:
            json.dump(calls, f)
        if rank == 0:
            torch.save(pred.cam_from_world, f"{out_dir}/cams.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_two_gloo_processes(trajectory, tmp_path):
    import json

    import torch.multiprocessing as mp

    gt, _ = trajectory
    sub = RenderedViews(*(x[:40].clone() for x in (gt.images, gt.depth, gt.intrinsics, gt.cam_from_world)))
    h5 = str(tmp_path / "chunks.h5")
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init1"), sub, h5, str(tmp_path)), nprocs=2)
    plan = plan_chunks(40, 12, 4)
    calls = [json.loads((tmp_path / f"calls{r}.json").read_text()) for r in range(2)]
    assert calls[0] == [plan[k] for k in range(0, len(plan), 2)]
    assert calls[1] == [plan[k] for k in range(1, len(plan), 2)]
    cams = torch.load(tmp_path / "cams.pt")
    ate, _ = absolute_trajectory_error(cams[0], sub.cam_from_world)
    assert ate < 1e-4
    # A re-run computes nothing: every rank's chunks are complete in its own file.
    # (a fresh init file per process group: a file store must not be reused)
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init2"), sub, h5, str(tmp_path)), nprocs=2)
    assert all(json.loads((tmp_path / f"calls{r}.json").read_text()) == [] for r in range(2))


def test_resume_with_another_plan_is_refused(trajectory, tmp_path):
    gt, _ = trajectory
    predict = _chunk_oracle(gt, [], 0.0, 0.0, point_noise=0.0)
    h5 = tmp_path / "chunks.h5"
    predict_chunked(predict, gt.images[:30], chunk_size=12, overlap=4, h5_path=h5)
    with pytest.raises(ChunkFileError, match="another plan"):
        predict_chunked(predict, gt.images[:30], chunk_size=10, overlap=4, h5_path=h5)
    with h5py.File(h5, "a") as file:  # a file that does not record its plan: each chunk's views are checked
        del file.attrs["plan"]
    with pytest.raises(ChunkFileError, match="other views"):
        predict_chunked(predict, gt.images[:30], chunk_size=10, overlap=4, h5_path=h5)


def test_unordered_collection_grouped_by_similarity(trajectory):
    gt, _ = trajectory
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(3))
    views = RenderedViews(*(x[:60][perm] for x in (gt.images, gt.depth, gt.intrinsics, gt.cam_from_world)))
    features = torch.nn.functional.avg_pool2d(views.images, 7).flatten(1)  # a stand-in for mean tokens
    chunks = group_views_by_similarity(features, chunk_size=16, overlap=6)
    pred = predict_chunked(_chunk_oracle(views, [], 0.0, 0.0, 0.0), views.images, 16, 6, chunks=chunks)
    ate, _ = absolute_trajectory_error(pred.cam_from_world[0], views.cam_from_world)
    assert ate < 1e-4


def test_selected_maps_plan_and_view_names_in_the_chunk_file(trajectory, tmp_path):
    gt, _ = trajectory
    predict = _chunk_oracle(gt, [], 0.0, 0.0, point_noise=0.0)
    h5 = tmp_path / "chunks.h5"
    names = [f"v{i}" for i in range(20)]
    pred = predict_chunked(
        predict, gt.images[:20], 8, 3, h5_path=h5, keep_maps=("depth", "depth_conf"), view_names=names
    )
    assert pred.depth.shape == (1, 20, 42, 56) and pred.depth_conf.shape == (1, 20, 42, 56)
    assert pred.world_points.shape == (1, 20, 0, 0, 3) and pred.world_points_conf.shape == (1, 20, 0, 0)
    full = predict_chunked(predict, gt.images[:20], 8, 3, h5_path=h5)  # resumed: same maps
    assert torch.allclose(full.depth, pred.depth)
    assert stored_plan(h5) == plan_chunks(20, 8, 3) and stored_plan(tmp_path / "missing.h5") is None
    with pytest.raises(ValueError, match="other images"):
        predict_chunked(predict, gt.images[:20], 8, 3, h5_path=h5, view_names=names[::-1])
    with pytest.raises(ValueError, match="unknown maps"):
        predict_chunked(predict, gt.images[:20], 8, 3, keep_maps=("normals",))
