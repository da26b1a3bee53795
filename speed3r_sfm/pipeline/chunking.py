"""Long sequences: chunk plans, a default chunk size from free GPU memory, robust Sim(3) and grouping of
unordered collections. :mod:`speed3r_sfm.pipeline.chunked` runs a backbone over the chunks and composes
them."""

from __future__ import annotations

import torch

from speed3r_sfm.geometry import apply_sim3, umeyama_sim3, umeyama_sim3_batched

CPU_DEFAULT_CHUNK_SIZE = 32
"""Chunk size on CPU (no memory query): small enough that a chunk's attention fits in a few GiB."""


def plan_chunks(num_views: int, chunk_size: int, overlap: int) -> list[list[int]]:
    """Ordered sliding windows over ``range(num_views)``: every chunk has ``chunk_size`` views (the last one
    is shifted back to stay full-size), consecutive chunks share at least ``overlap`` views, and every view
    is covered. A sequence no longer than ``chunk_size`` is one chunk."""
    if chunk_size < 1 or overlap < 0 or overlap >= chunk_size:
        raise ValueError(f"need chunk_size >= 1 and 0 <= overlap < chunk_size, got {chunk_size}, {overlap}")
    if num_views < 1:
        raise ValueError("plan_chunks: no views")
    if num_views <= chunk_size:
        return [list(range(num_views))]
    step = chunk_size - overlap
    starts = list(range(0, num_views - chunk_size, step)) + [num_views - chunk_size]
    return [list(range(s, s + chunk_size)) for s in starts]


def free_cuda_bytes(device: torch.device) -> int:
    """Free memory of CUDA ``device``: ``torch.cuda.mem_get_info`` plus what PyTorch's allocator holds in its
    cache."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def default_chunk_size(
    device: torch.device | str,
    tokens_per_view: int,
    bytes_per_token: int = 28 * 1024,
    fixed_bytes: int = 12 << 30,
    fraction: float = 0.8,
    minimum: int = 8,
    maximum: int = 2048,
) -> int:
    """Largest chunk that fits the free memory of ``device``.

    On CUDA: ``(fraction * free - fixed_bytes) / (tokens_per_view * bytes_per_token)`` clamped to
    [``minimum``, ``maximum``], where ``free`` is ``torch.cuda.mem_get_info`` plus what PyTorch's allocator
    holds in its cache. ``fixed_bytes`` and ``bytes_per_token`` are calibrated on VGGT-1B with GSA in bf16
    on an H100 (benchmarks/results/vggt_profile.md, 1041 tokens per view: peak 37.9 GiB at 1000 views and
    64.1 GiB at 2000, i.e. 11.7 GiB + 25.8 KiB per token), rounded up; smaller backbones get chunks that
    fit with room to spare. On any other device:
    :data:`CPU_DEFAULT_CHUNK_SIZE`.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return CPU_DEFAULT_CHUNK_SIZE
    budget = fraction * free_cuda_bytes(device) - fixed_bytes
    size = int(budget // max(1, tokens_per_view * bytes_per_token))
    return max(minimum, min(maximum, size))


def robust_sim3(
    src: torch.Tensor,
    dst: torch.Tensor,
    weights: torch.Tensor | None = None,
    iterations: int = 10,
    threshold: float | None = None,
    loss: str = "cauchy",
    hypotheses: int = 64,
    seed: int = 0,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Sim(3) ``dst ≈ s R src + t`` by IRLS around the weighted Umeyama fit (:func:`umeyama_sim3`).

    IRLS alone converges to a wrong fit when gross outliers pull the initial least-squares estimate far
    off, so it starts from the best of ``hypotheses`` Umeyama fits to random 3-point samples (least median
    of residuals, LMedS, robust up to ~50% outliers) or from the all-points fit if that is better; set
    ``hypotheses=0`` to start from the plain weighted Umeyama fit.
    Each iteration reweights every point by ``weights * rho'(r) / r`` of its residual ``r`` (Huber or
    Cauchy) with scale ``threshold``; when ``threshold`` is None it is 1.4826 * the weighted median residual
    of the current fit (MAD-style, floored to avoid collapse on exact data). Stops early when the weights
    settle. Returns ``((s, R, t), final_weights)`` in ``src``'s dtype; the weights are the prior times the
    robust factor (small for outliers).
    """
    if loss not in ("huber", "cauchy"):
        raise ValueError(f"loss must be 'huber' or 'cauchy', got {loss!r}")
    x, y = src.double(), dst.double()
    prior = torch.ones(x.shape[0], dtype=torch.float64) if weights is None else weights.double().cpu()
    prior = prior.to(x.device)
    w = prior.clone()
    sim3 = _lmeds_init(x, y, prior, hypotheses, seed)
    extent = (y - y.mean(0)).norm(dim=-1).median().clamp_min(1e-12)
    for _ in range(iterations):
        r = (apply_sim3(*sim3, x) - y).norm(dim=-1)
        if threshold is None:
            ok = prior > 0
            c = 1.4826 * r[ok].median() if ok.any() else r.median()
            c = torch.clamp(c, min=1e-9 * extent)
        else:
            c = torch.as_tensor(threshold, dtype=torch.float64, device=x.device)
        if loss == "huber":
            factor = torch.where(r <= c, torch.ones_like(r), c / r.clamp_min(1e-300))
        else:
            factor = 1.0 / (1.0 + (r / c) ** 2)
        new_w = prior * factor
        sim3 = umeyama_sim3(x, y, new_w)
        converged = (new_w - w).abs().max() < 1e-6 * new_w.max()
        w = new_w
        if converged:
            break
    s, rot, t = sim3
    return (s.to(src.dtype), rot.to(src.dtype), t.to(src.dtype)), w.to(src.dtype)


def _lmeds_init(
    x: torch.Tensor, y: torch.Tensor, prior: torch.Tensor, hypotheses: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Umeyama fit (all points or a random 3-point sample) with the least median residual."""
    best = umeyama_sim3(x, y, prior)
    usable = (prior > 0).nonzero()[:, 0]
    if hypotheses <= 0 or usable.numel() < 4:
        return best
    xs, ys = x[usable], y[usable]

    def median_residual(sim3):
        return (apply_sim3(*sim3, xs) - ys).norm(dim=-1).median()

    best_med = median_residual(best)
    gen = torch.Generator().manual_seed(seed)
    samples = [torch.randperm(usable.numel(), generator=gen)[:3] for _ in range(hypotheses)]
    picks = usable[torch.stack(samples).to(usable.device)]  # (H, 3)
    (scale, rot, trans), valid = umeyama_sim3_batched(x[picks], y[picks])
    residuals = (apply_sim3(scale[:, None, None], rot, trans[:, None], xs[None]) - ys[None]).norm(dim=-1)
    medians = torch.where(valid, residuals.median(dim=1).values, torch.inf)
    k = int(medians.argmin())
    if medians[k] < best_med:
        dtype = best[0].dtype
        best = (scale[k].to(dtype), rot[k].to(dtype), trans[k].to(dtype))
    return best


def group_views_by_similarity(features: torch.Tensor, chunk_size: int, overlap: int) -> list[list[int]]:
    """Chunks for an unordered collection: a greedy nearest-neighbour ordering of per-view descriptors
    ``features`` (S, D) (e.g. the mean of each view's own tokens; cosine similarity), then
    :func:`plan_chunks` over that order. The walk starts at the view least similar to the mean (an end of
    the collection) and always steps to the most similar unvisited view, so neighbouring chunks share
    similar views for the Sim(3) alignment."""
    if features.ndim != 2:
        raise ValueError(f"features must be (S, D), got {tuple(features.shape)}")
    f = torch.nn.functional.normalize(features.double(), dim=-1)
    n = f.shape[0]
    sim = f @ f.T
    start = int((f @ f.mean(0)).argmin())
    order = [start]
    visited = torch.zeros(n, dtype=torch.bool)
    visited[start] = True
    for _ in range(n - 1):
        row = sim[order[-1]].masked_fill(visited, -torch.inf)
        nxt = int(row.argmax())
        order.append(nxt)
        visited[nxt] = True
    return [[order[i] for i in chunk] for chunk in plan_chunks(n, chunk_size, overlap)]
