"""What the pipeline reads from GSA records (format: ``speed3r_sfm.attention.gsa``).

Per view, the importance of each token block (how much the query blocks of other views selected it,
averaged over the recorded global layers) decides where keypoints go. Per query block, the blocks it
selected in other views (summed selection probability over layers, heads and top-k entries) decide which
views a keypoint is matched in, and whether the predicted match location falls in a selected block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import h5py
import numpy as np
import torch


@dataclass
class AttentionSummary:
    """GSA records of one sequence of S views, reduced to what matching needs."""

    patch_grid: tuple[int, int]  # (rows, cols) of patch tokens per view
    num_special: int
    tokens_per_view: int
    block_size: int  # patch tokens per block
    blocks_per_view: int
    query_block_size: int
    importance: torch.Tensor  # (S, blocks_per_view) float32, mean over layers
    # (num_query_blocks, S) float32, selection mass per target view (rows sum to 1); lazy when chunked
    view_affinity: torch.Tensor | ChunkedAffinity
    # (num_query_blocks, S * blocks_per_view) bool, selected by any head / layer; lazy when chunked
    selected: torch.Tensor | ChunkedSelection
    num_layers: int

    @property
    def num_views(self) -> int:
        return self.importance.shape[0]

    def query_block_of_patch(self, view: int | torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        """Query block index of patch tokens ``patch`` (N,) of ``view`` (int or (N,))."""
        position = torch.as_tensor(view) * self.tokens_per_view + self.num_special + patch
        return torch.div(position, self.query_block_size, rounding_mode="floor")

    def block_of_patch(self, patch: torch.Tensor) -> torch.Tensor:
        """Block index within its view of patch tokens (N,)."""
        return torch.div(patch, self.block_size, rounding_mode="floor")

    def patch_of_model_xy(self, xy: torch.Tensor, model_size: tuple[int, int]) -> torch.Tensor:
        """Patch token index (N,) of model pixels ``xy`` (N, 2) (integer centres) in an (H, W) input; -1
        outside."""
        rows, cols = self.patch_grid
        height, width = model_size
        col = torch.floor((xy[:, 0] + 0.5) * cols / width).long()
        row = torch.floor((xy[:, 1] + 0.5) * rows / height).long()
        inside = (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
        return torch.where(inside, row * cols + col, torch.full_like(col, -1))


def summarize_records(records: Sequence[dict[str, Any]] | None, num_views: int) -> AttentionSummary | None:
    """Reduce the GSA records of one ``predict`` call (batch 1) to an :class:`AttentionSummary`.

    Returns None when there is nothing usable (dense attention: no records). Records whose block
    geometry differs from the first one's are ignored.
    """
    if not records:
        return None
    first = records[0]
    keys = (
        "num_views",
        "tokens_per_view",
        "num_special",
        "block_size",
        "blocks_per_view",
        "query_block_size",
    )
    geometry = tuple(int(first[k]) for k in keys)
    usable = [r for r in records if tuple(int(r[k]) for k in keys) == geometry]
    if geometry[0] != num_views:
        raise ValueError(f"GSA records describe {geometry[0]} views, the prediction {num_views}")
    if first.get("patch_grid") is None:
        return None
    _, tokens_per_view, num_special, block_size, blocks_per_view, query_block_size = geometry
    num_blocks = num_views * blocks_per_view
    importance = torch.zeros(num_views, blocks_per_view)
    num_query_blocks = int(first["selected_blocks"].shape[2])
    affinity = torch.zeros(num_query_blocks, num_views)
    selected = torch.zeros(num_query_blocks, num_blocks, dtype=torch.bool)
    for record in usable:
        importance += record["block_importance"][0].float().cpu()
        blocks = record["selected_blocks"][0].long().cpu()  # (Hs, T, k)
        scores = record["selected_scores"][0].float().cpu()
        valid = blocks >= 0
        safe = blocks.clamp_min(0)
        views = torch.div(safe, blocks_per_view, rounding_mode="floor")
        weights = torch.where(valid, scores, torch.zeros_like(scores))
        query = torch.arange(num_query_blocks)[None, :, None].expand_as(blocks)
        affinity.index_put_((query[valid], views[valid]), weights[valid], accumulate=True)
        selected[query[valid], safe[valid]] = True
    importance /= len(usable)
    affinity /= affinity.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return AttentionSummary(
        patch_grid=tuple(int(v) for v in first["patch_grid"]),  # type: ignore[arg-type]
        num_special=num_special,
        tokens_per_view=tokens_per_view,
        block_size=block_size,
        blocks_per_view=blocks_per_view,
        query_block_size=query_block_size,
        importance=importance,
        view_affinity=affinity,
        selected=selected,
        num_layers=len(usable),
    )


_GEOMETRY = ("patch_grid", "num_special", "tokens_per_view", "block_size", "blocks_per_view")


class _ChunkIndex:
    """Where each global view sits in the chunks: ``members`` (S, M) chunk ids and ``local`` (S, M)
    positions in them (-1 padding), and per chunk its sorted views for global -> local look-ups."""

    def __init__(
        self, summaries: Sequence[AttentionSummary], chunks: Sequence[Sequence[int]], num_views: int
    ):
        self.summaries = list(summaries)
        self.views = [torch.as_tensor(list(c), dtype=torch.long) for c in chunks]
        self.num_views = num_views
        first = self.summaries[0]
        self.tokens_per_view, self.blocks_per_view = first.tokens_per_view, first.blocks_per_view
        placements: list[list[tuple[int, int]]] = [[] for _ in range(num_views)]
        for k, views in enumerate(self.views):
            for position, view in enumerate(views.tolist()):
                placements[view].append((k, position))
        width = max(len(p) for p in placements)
        self.members = torch.full((num_views, width), -1, dtype=torch.long)
        self.local = torch.full((num_views, width), -1, dtype=torch.long)
        for view, placed in enumerate(placements):
            for m, (k, position) in enumerate(placed):
                self.members[view, m], self.local[view, m] = k, position
        self.sorted = [views.sort() for views in self.views]

    def split(self, query: torch.Tensor):
        """Per (chunk k, rows of ``query`` whose view is in k, their chunk-local query blocks)."""
        view = torch.div(query, self.tokens_per_view, rounding_mode="floor")
        token = query % self.tokens_per_view
        for m in range(self.members.shape[1]):
            chunk, position = self.members[view, m], self.local[view, m]
            for k in chunk.unique().tolist():
                if k < 0:
                    continue
                rows = (chunk == k).nonzero()[:, 0]
                sequence = position[rows] * self.tokens_per_view + token[rows]
                local = torch.div(sequence, self.summaries[k].query_block_size, rounding_mode="floor")
                yield k, rows, local

    def to_local(self, k: int, views: torch.Tensor) -> torch.Tensor:
        """Chunk-local positions of global ``views`` in chunk k (-1 where absent)."""
        values, order = self.sorted[k]
        at = torch.searchsorted(values, views).clamp_max(values.numel() - 1)
        return torch.where(values[at] == views, order[at], torch.full_like(views, -1))


class ChunkedAffinity:
    """``view_affinity`` of a merged summary, indexed like the dense (S * tokens_per_view, S) tensor by
    per-token query ids: each row is the chunk-local affinity scattered to global views, averaged over the
    chunks that hold the query's view."""

    def __init__(self, index: _ChunkIndex) -> None:
        self.index = index

    @property
    def shape(self) -> tuple[int, int]:
        return (self.index.num_views * self.index.tokens_per_view, self.index.num_views)

    def __getitem__(self, query: torch.Tensor | int) -> torch.Tensor:
        q = torch.as_tensor(query, dtype=torch.long)
        flat = q.reshape(-1)
        out = torch.zeros(flat.numel(), self.index.num_views)
        count = torch.zeros(flat.numel())
        for k, rows, local in self.index.split(flat):
            views = self.index.views[k]
            out[rows[:, None], views[None, :]] += self.index.summaries[k].view_affinity[local].float()
            count[rows] += 1
        return (out / count.clamp_min(1)[:, None]).reshape(*q.shape, self.index.num_views)


class ChunkedSelection:
    """``selected`` of a merged summary, indexed like the dense (S * tokens_per_view, S * blocks_per_view)
    bool tensor with ``[query, block]`` (tensors or ints, broadcast): True where a chunk holding both views
    selected the block for the query's query block."""

    def __init__(self, index: _ChunkIndex) -> None:
        self.index = index

    @property
    def shape(self) -> tuple[int, int]:
        s = self.index.num_views
        return (s * self.index.tokens_per_view, s * self.index.blocks_per_view)

    def __getitem__(self, key: tuple[torch.Tensor | int, torch.Tensor | int]) -> torch.Tensor:
        query, block = key
        q, b = torch.broadcast_tensors(torch.as_tensor(query, dtype=torch.long), torch.as_tensor(block))
        shape, q, b = q.shape, q.reshape(-1), b.reshape(-1).long()
        per_view = self.index.blocks_per_view
        target = torch.div(b, per_view, rounding_mode="floor")
        out = torch.zeros(q.numel(), dtype=torch.bool)
        for k, rows, local in self.index.split(q):
            target_local = self.index.to_local(k, target[rows])
            ok = target_local >= 0
            column = target_local[ok] * per_view + b[rows][ok] % per_view
            out[rows[ok]] |= self.index.summaries[k].selected[local[ok], column]
        return out.reshape(shape)


def merge_chunk_summaries(
    summaries: Sequence[AttentionSummary | None], chunks: Sequence[Sequence[int]], num_views: int
) -> AttentionSummary | None:
    """One summary of ``num_views`` views from the summaries of chunked passes (``chunks[k]`` lists the
    global views of chunk k, in its order); see the module docstring. ``importance`` is averaged over the
    chunks holding each view. Returns None when a chunk has no summary (dense attention)."""
    if len(summaries) != len(chunks):
        raise ValueError(f"{len(summaries)} chunk summaries for {len(chunks)} chunks")
    if not summaries or any(s is None for s in summaries):
        return None
    first = summaries[0]
    geometry = tuple(getattr(first, name) for name in _GEOMETRY)
    for k, (summary, views) in enumerate(zip(summaries, chunks, strict=True)):
        if tuple(getattr(summary, name) for name in _GEOMETRY) != geometry:
            raise ValueError(f"chunk {k}'s GSA records have another token geometry than chunk 0's")
        if summary.num_views != len(views):
            raise ValueError(f"chunk {k} has {len(views)} views but its GSA records {summary.num_views}")
    if sorted({v for c in chunks for v in c}) != list(range(num_views)):
        raise ValueError("merge_chunk_summaries: the chunks do not cover every view exactly")
    importance = torch.zeros(num_views, first.blocks_per_view)
    count = torch.zeros(num_views)
    for summary, views in zip(summaries, chunks, strict=True):
        idx = torch.as_tensor(list(views), dtype=torch.long)
        importance.index_add_(0, idx, summary.importance.float())
        count.index_add_(0, idx, torch.ones(idx.numel()))
    index = _ChunkIndex(summaries, chunks, num_views)  # type: ignore[arg-type]
    return AttentionSummary(
        patch_grid=first.patch_grid,
        num_special=first.num_special,
        tokens_per_view=first.tokens_per_view,
        block_size=first.block_size,
        blocks_per_view=first.blocks_per_view,
        query_block_size=1,
        importance=importance / count[:, None],
        view_affinity=ChunkedAffinity(index),
        selected=ChunkedSelection(index),
        num_layers=min(s.num_layers for s in summaries),  # type: ignore[union-attr]
    )


def write_summary(group: h5py.Group, summary: AttentionSummary) -> None:
    """Store a (dense) summary in an HDF5 group (chunk files of ``chunked.py``)."""
    for f in fields(summary):
        value = getattr(summary, f.name)
        if isinstance(value, torch.Tensor):
            group.create_dataset(f.name, data=value.cpu().numpy())
        else:
            group.attrs[f.name] = np.asarray(value)


def read_summary(group: h5py.Group) -> AttentionSummary:
    """The summary :func:`write_summary` stored in ``group``."""
    values: dict[str, Any] = {name: torch.from_numpy(group[name][()]) for name in group}
    for name, value in group.attrs.items():
        values[name] = tuple(int(v) for v in value) if name == "patch_grid" else int(value)
    return AttentionSummary(**values)
