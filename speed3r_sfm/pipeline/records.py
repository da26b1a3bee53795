"""What the pipeline reads from GSA records (format: ``speed3r_sfm.attention.gsa``).

Per view, the importance of each token block (how much the query blocks of other views selected it,
averaged over the recorded global layers) decides where keypoints go. Per query block, the blocks it
selected in other views (summed selection probability over layers, heads and top-k entries) decide which
views a keypoint is matched in, and whether the predicted match location falls in a selected block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    view_affinity: (
        torch.Tensor
    )  # (num_query_blocks, S) float32, selection mass per target view (rows sum to 1)
    selected: torch.Tensor  # (num_query_blocks, S * blocks_per_view) bool, selected by any head / layer
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
