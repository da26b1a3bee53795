"""Reference checks of the fast routines of keypoints, matching and tracks: each against the slow, obvious
one on random inputs (atlas sampling vs grid_sample per image, batched refinement vs one pair at a time,
batched displacement fits vs a least-squares solve per pair, separable maxima vs max_pool2d, Sobel by
shifted differences vs kornia, grouped nearest neighbours vs all distances)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kornia.feature import gftt_response
from kornia.filters import gaussian_blur2d, spatial_gradient

from speed3r_sfm.pipeline.keypoints import shi_tomasi_response, sobel_gradients, window_max
from speed3r_sfm.pipeline.matching import (
    apply_displacement_fields,
    fit_displacement_fields,
    weighted_least_squares,
)
from speed3r_sfm.pipeline.refine import (
    ImageAtlas,
    PyramidStack,
    RefineOptions,
    build_pyramid,
    local_maximum,
    refine_matches,
    refine_pair,
)
from speed3r_sfm.pipeline.tracks import nearest_within


def _image(h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    image = gaussian_blur2d(torch.rand(1, 1, h, w, generator=gen), (7, 7), (1.2, 1.2))[0, 0]
    return (image - image.min()) / (image.max() - image.min())


def _reference_samples(image: torch.Tensor, centre: torch.Tensor, affine: torch.Tensor, radius: int):
    """grid_sample of one image (h, w) at centre + affine @ v, border padding: the obvious way."""
    h, w = image.shape
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    vy, vx = torch.meshgrid(r, r, indexing="ij")
    v = torch.stack([vx, vy], -1)  # (n, n, 2)
    points = centre[:, None, None, :] + torch.einsum("mij,abj->mabi", affine, v)
    grid = torch.stack([2 * points[..., 0] / (w - 1) - 1, 2 * points[..., 1] / (h - 1) - 1], -1)
    out = F.grid_sample(
        image[None, None].double().expand(len(centre), 1, h, w),
        grid,
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )
    return out[:, 0].float()


@pytest.mark.parametrize("threads", [1, 2])
def test_atlas_samples_equal_grid_sample_of_each_image(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        sizes = [(40, 60), (55, 33), (40, 60), (12, 20), (70, 45)]
        images = [_image(h, w, gen) for h, w in sizes]
        atlas = ImageAtlas.pack([im[None, None] for im in images])
        m = 301
        view = torch.randint(0, len(images), (m,), generator=gen)
        size = torch.tensor([(w, h) for h, w in sizes], dtype=torch.float64)[view]
        centre = (torch.rand(m, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2) * (size - 1)
        affine = torch.eye(2, dtype=torch.float64) + 0.3 * torch.randn(m, 2, 2, generator=gen).double()
        out = atlas.sample(view, centre, affine, 4)
        for v in range(len(images)):
            rows = view == v
            reference = _reference_samples(images[v], centre[rows], affine[rows], 4)
            assert torch.allclose(out[rows], reference, atol=2e-4), v
        inside = atlas.inside(view, centre, affine, 4)
        assert 0 < int(inside.sum()) < m  # both cases were exercised
    finally:
        torch.set_num_threads(previous)


def test_batched_refinement_equals_refining_each_pair_alone():
    gen = torch.Generator().manual_seed(1)
    sizes = [(120, 160), (140, 150), (120, 160)]
    grays = [_image(h, w, gen) for h, w in sizes]
    grays[2] = grays[0].clone()  # pairs (0, 2) and (2, 0) are identity warps: those refine
    pyramids = [build_pyramid(g, 2) for g in grays]
    stack = PyramidStack.from_pyramids(pyramids)
    pairs = [(0, 1), (1, 2), (2, 0), (0, 2)]
    rows = []
    for i, j in pairs:
        n = 60
        h, w = sizes[i]
        x = torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([w - 1.0, h - 1.0])
        y = x + torch.randn(n, 2, generator=gen, dtype=torch.float64) * 2.0
        affine = torch.eye(2, dtype=torch.float64) + 0.02 * torch.randn(n, 2, 2, generator=gen).double()
        rows.append((torch.full((n,), i), torch.full((n,), j), x, y, affine))
    source, target, x, y, affine = (torch.cat(parts) for parts in zip(*rows, strict=True))
    options = RefineOptions(chunk=37)  # several chunks
    xy, ncc, reason = refine_matches(stack, stack, source, target, x, y, affine, 10.0, options)
    start = 0
    for (i, j), (_, _, xp, yp, ap) in zip(pairs, rows, strict=True):
        part = slice(start, start + len(xp))
        start += len(xp)
        ref_xy, ref_ncc, ref_reason = refine_pair(pyramids[i], pyramids[j], xp, yp, ap, 10.0, options)
        assert torch.equal(reason[part], ref_reason)
        ok = ref_reason == 0
        assert torch.allclose(xy[part][ok], ref_xy[ok], atol=2e-3)
        assert torch.allclose(ncc[part], ref_ncc, atol=1e-3)
    assert (reason == 0).sum() > 50 and (reason != 0).sum() > 50


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_refinement_on_cuda_agrees_with_the_cpu():
    """A stack built on the GPU refines there (one grid_sample and one convolution per level, no per-thread
    split, larger chunks) and returns CPU tensors: the same reasons as the CPU and the same locations up to
    float32 rounding."""
    gen = torch.Generator().manual_seed(2)
    sizes = [(200, 260), (180, 240), (200, 260)]
    grays = [_image(h, w, gen) for h, w in sizes]
    grays[2] = torch.roll(grays[0], shifts=(3, -2), dims=(0, 1))
    n = 400
    source = torch.randint(0, 3, (n,), generator=gen)
    target = (source + 1 + torch.randint(0, 2, (n,), generator=gen)) % 3
    size = torch.tensor([(w - 1.0, h - 1.0) for h, w in sizes], dtype=torch.float64)
    x = torch.rand(n, 2, generator=gen, dtype=torch.float64) * size[source]
    y = x + torch.randn(n, 2, generator=gen, dtype=torch.float64) * 3.0
    affine = torch.eye(2, dtype=torch.float64) + 0.02 * torch.randn(n, 2, 2, generator=gen).double()
    options = RefineOptions()
    found = {}
    for device in ("cpu", "cuda"):
        stack = PyramidStack.from_pyramids([build_pyramid(g.to(device), 3) for g in grays])
        assert stack.device.type == device
        found[device] = refine_matches(stack, stack, source, target, x, y, affine, 12.0, options)
    (xy, ncc, reason), (xy_gpu, ncc_gpu, reason_gpu) = found["cpu"], found["cuda"]
    assert xy_gpu.device.type == "cpu" and reason_gpu.dtype == torch.long
    assert (reason_gpu != reason).float().mean() < 0.02  # a score at a threshold may round either way
    both = (reason == 0) & (reason_gpu == 0)
    assert both.sum() > 50
    assert torch.allclose(xy_gpu[both], xy[both], atol=1e-2)
    assert torch.allclose(ncc_gpu[both], ncc[both], atol=1e-3)


def test_refinement_runs_on_the_gpu_only_where_its_pyramids_fit(monkeypatch):
    from speed3r_sfm.pipeline import matching

    grays = [torch.zeros(1500, 2000) for _ in range(100)]  # 300 M pixels: 1.6 GB of pyramids, twice packed
    need = 2 * 300e6 * 4 * 4 / 3 + matching.REFINE_WORKSPACE_BYTES
    monkeypatch.setattr(matching, "free_cuda_bytes", lambda device: int(2 * need) + 1)
    assert matching.refinement_device("cuda", grays) == torch.device("cuda")
    assert matching.refinement_device(torch.device("cuda", 1), grays) == torch.device("cuda", 1)
    monkeypatch.setattr(matching, "free_cuda_bytes", lambda device: int(2 * need) - 1)
    assert matching.refinement_device("cuda", grays) == torch.device("cpu")
    assert matching.refinement_device("cuda", grays[:50]) == torch.device("cuda")
    assert matching.refinement_device(None, grays) == torch.device("cpu")
    assert matching.refinement_device("cpu", grays) == torch.device("cpu")


def _reference_field(predicted, found, min_inliers):
    """The per-pair fit: lstsq on the inliers, four reweighting rounds (points off by more than
    max(2, 3 x median residual) dropped)."""
    if predicted.shape[0] < min_inliers:
        return None
    centre = predicted.mean(dim=0)
    design = torch.cat([predicted - centre, torch.ones(predicted.shape[0], 1, dtype=predicted.dtype)], 1)
    offset = found - predicted
    inliers = torch.ones(predicted.shape[0], dtype=torch.bool)
    for _ in range(4):
        if int(inliers.sum()) < min_inliers:
            return None
        solution = torch.linalg.lstsq(design[inliers], offset[inliers]).solution
        residual = (design @ solution - offset).norm(dim=1)
        inliers = residual <= max(2.0, 3.0 * float(residual[inliers].median()))
    if int(inliers.sum()) < min_inliers:
        return None
    return lambda p: p + torch.cat([p - centre, torch.ones(p.shape[0], 1, dtype=p.dtype)], 1) @ solution


def test_batched_displacement_fits_equal_a_fit_per_pair():
    gen = torch.Generator().manual_seed(2)
    predicted, found, group = [], [], []
    for g in range(40):
        n = int(torch.randint(0, 96, (1,), generator=gen))
        p = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 500
        a = torch.randn(2, 2, generator=gen, dtype=torch.float64) * 0.02
        shift = torch.randn(2, generator=gen, dtype=torch.float64) * 5
        f = p + p @ a.T + shift + torch.randn(n, 2, generator=gen, dtype=torch.float64) * 0.5
        outliers = torch.rand(n, generator=gen) < (0.7 if g % 7 == 0 else 0.3)
        f[outliers] += torch.randn(int(outliers.sum()), 2, generator=gen, dtype=torch.float64) * 30
        predicted.append(p)
        found.append(f)
        group.append(torch.full((n,), g))
    centre, solution, valid = fit_displacement_fields(
        torch.cat(predicted), torch.cat(found), torch.cat(group), 40, 12
    )
    query = torch.rand(10, 2, generator=gen, dtype=torch.float64) * 500
    for g in range(40):
        reference = _reference_field(predicted[g], found[g], 12)
        assert (reference is not None) == bool(valid[g]), g
        if reference is not None:
            fast = apply_displacement_fields(query, torch.full((10,), g), centre, solution)
            assert torch.allclose(fast, reference(query), atol=1e-8)
    assert 0 < int(valid.sum()) < 40


def _weighted_problems(groups: int = 30, rows: int = 80):
    gen = torch.Generator().manual_seed(5)
    xy = torch.rand(groups, rows, 2, generator=gen, dtype=torch.float64) * 600 - 300
    design = torch.cat([xy, torch.ones(groups, rows, 1, dtype=torch.float64)], dim=-1)
    target = torch.randn(groups, rows, 2, generator=gen, dtype=torch.float64) * 3
    weight = (torch.rand(groups, rows, generator=gen) > 0.3).double()
    weight[0] = 0.0  # no rows
    design[1, :, 1] = 0.5 * design[1, :, 0] + 7.0  # collinear points: the affine fit is undetermined
    return design, target, weight


def test_weighted_least_squares_equals_numpy_lstsq_in_float64():
    design, target, weight = _weighted_problems()
    solution, solvable = weighted_least_squares(design, target, weight)
    assert solvable.tolist() == [False, False] + [True] * (len(design) - 2)
    assert torch.equal(solution[:2], torch.zeros(2, 3, 2, dtype=torch.float64))
    for g in range(2, len(design)):
        rows = weight[g] > 0
        reference = np.linalg.lstsq(design[g][rows].numpy(), target[g][rows].numpy(), rcond=None)[0]
        np.testing.assert_allclose(solution[g].numpy(), reference, rtol=0, atol=1e-12)


def _at_offset(x: torch.Tensor, elements: int) -> torch.Tensor:
    """A copy of ``x`` whose storage starts ``elements`` elements into a larger buffer (another alignment)."""
    buffer = torch.empty(x.numel() + elements, dtype=x.dtype)
    view = buffer[elements:].view(x.shape)
    view.copy_(x)
    return view


def test_weighted_least_squares_is_bitwise_reproducible():
    """The same numbers give the same bits, call after call and at another address. MKL's batched lstsq
    did not (1e-16 apart on most calls of this size), which the photometric refinement turned into other
    matches from run to run."""
    design, target, weight = _weighted_problems(groups=100, rows=100)
    first, _ = weighted_least_squares(design, target, weight)
    for _ in range(20):
        assert torch.equal(weighted_least_squares(design, target, weight)[0], first)
    for elements in range(1, 8):
        moved = (_at_offset(x, elements) for x in (design, target, weight))
        assert torch.equal(weighted_least_squares(*moved)[0], first), elements


def test_separable_maxima_equal_max_pool2d():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(5, 13, 13, generator=gen)
    scores[:, 4:7, 4:7] = 0.5  # plateaus
    reference = F.max_pool2d(scores[:, None], 3, stride=1, padding=1)[:, 0]
    assert torch.equal(local_maximum(scores), reference)
    image = torch.randn(37, 53, generator=gen)
    for radius in (1, 2, 3, 4, 6, 9):
        size = 2 * radius + 1
        reference = F.max_pool2d(image[None, None], size, stride=1, padding=radius)[0, 0]
        assert torch.equal(window_max(window_max(image, radius, 0), radius, 1), reference), radius


def test_grouped_nearest_neighbours_equal_all_distances_within_groups():
    gen = torch.Generator().manual_seed(4)
    points = torch.rand(600, 2, generator=gen, dtype=torch.float64) * 100
    point_group = torch.randint(0, 4, (600,), generator=gen)
    near = points[:200] + torch.randn(200, 2, generator=gen, dtype=torch.float64) * 0.7
    query = torch.cat([near, torch.rand(300, 2, generator=gen, dtype=torch.float64) * 100])
    query_group = torch.cat([point_group[:200], torch.randint(0, 5, (300,), generator=gen)])
    distance, index = nearest_within(query, points, 1.5, query_group, point_group)
    all_distances = torch.cdist(query, points)
    all_distances[query_group[:, None] != point_group[None, :]] = float("inf")
    reference, reference_index = all_distances.min(dim=1)
    close = reference <= 1.5
    assert close.sum() > 100
    assert torch.allclose(distance[close], reference[close])
    assert (index[close] == reference_index[close]).all()
    assert (distance[~close] > 1.5).all()


def test_corner_response_equals_kornia():
    gen = torch.Generator().manual_seed(5)
    image = torch.rand(2, 1, 45, 70, generator=gen)
    assert torch.allclose(sobel_gradients(image), spatial_gradient(image, "sobel"), atol=1e-6)
    reference = gftt_response(image)
    assert torch.allclose(shi_tomasi_response(image), reference, atol=1e-6 * float(reference.abs().max()))
