"""Block selection of GSA: score key blocks per query block, keep the top-k, list the key blocks to attend.

Score of patch block ``g`` for query block ``t`` and head ``h``: ``softmax_g(q̄_t · k̄_g · scale)``, with
``q̄_t`` the mean query of the block and ``k̄_g`` the mean key of the patch block (the compression
branch's pooling at selection granularity). Scores are never materialised for all query blocks at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import BlockGeometry


@dataclass
class Selection:
    """Selected patch blocks per query block.

    ``blocks``: (B, Hs, num_query_blocks, k) int64 global patch-block ids ``view * blocks_per_view + j``,
    -1 where there were fewer candidates; Hs is the number of heads, or 1 for a selection shared by all
    heads; k = min(top_k, num_patch_blocks). ``scores``: the selection probability of each entry (0 for -1).
    ``importance``: (B, num_views, blocks_per_view) float32, mean probability that query blocks of
    *other* views give to each patch block (head-averaged), or None when not requested.
    """

    blocks: torch.Tensor
    scores: torch.Tensor
    importance: torch.Tensor | None = None


def own_view_mask(geom: BlockGeometry, query_views: torch.Tensor) -> torch.Tensor:
    """(T, num_patch_blocks) bool: the patch block lies in a view touched by the query block."""
    block_view = torch.arange(geom.num_patch_blocks, device=query_views.device) // geom.blocks_per_view
    return (block_view >= query_views[:, :1]) & (block_view <= query_views[:, 1:])


def select_blocks(
    q_pooled: torch.Tensor,
    k_pooled: torch.Tensor,
    geom: BlockGeometry,
    *,
    top_k: int,
    include_own_view: bool,
    per_head: bool,
    scale: float,
    with_importance: bool = False,
    with_scores: bool = True,
    score_dtype: torch.dtype | None = None,
    chunk_elements: int = 1 << 26,
) -> Selection:
    """Top-k patch blocks per query block, chunked over query blocks.

    q_pooled: (B, H, T, D), k_pooled: (B, H, num_patch_blocks, D), float32 (or float64). With
    ``include_own_view`` the blocks of the query block's own view(s) are not candidates (they are always
    attended anyway). Without ``with_scores`` (and importance) the returned scores are zeros.
    ``score_dtype``: dtype of the logits that are ranked (default: q_pooled's); bfloat16 halves the cost
    of the per-head top-k at scale.
    """
    score_dtype = score_dtype or q_pooled.dtype
    b, h, t, _ = q_pooled.shape
    npb = geom.num_patch_blocks
    k = min(top_k, npb)
    hs = h if per_head else 1
    device = q_pooled.device
    blocks = torch.empty(b, hs, t, k, dtype=torch.int64, device=device)
    scores = torch.empty(b, hs, t, k, dtype=q_pooled.dtype, device=device)
    imp_sum = torch.zeros(b, npb, dtype=q_pooled.dtype, device=device) if with_importance else None
    imp_cnt = torch.zeros(npb, dtype=q_pooled.dtype, device=device) if with_importance else None
    query_views = geom.query_block_views(device)
    chunk = max(1, chunk_elements // max(1, b * h * npb))
    k_t = (k_pooled.transpose(-1, -2) * scale).to(score_dtype)
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        logits = torch.matmul(q_pooled[:, :, t0:t1].to(score_dtype), k_t)  # (B, H, c, npb)
        own = own_view_mask(geom, query_views[t0:t1])
        if per_head and not with_importance:
            # Softmax is monotonic per row: select on logits, probabilities from the log-sum-exp.
            lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True) if with_scores else None
            if include_own_view:
                logits.masked_fill_(own, float("-inf"))
            vals, idx = logits.topk(k, dim=-1)
            valid = vals > float("-inf")
            vals = torch.exp(vals.float() - lse) if lse is not None else torch.zeros_like(vals)
        else:
            prob = torch.softmax(logits.float(), dim=-1)
            if with_importance:
                other = prob.mean(dim=1).masked_fill(own, 0.0)
                imp_sum += other.sum(dim=1)
                imp_cnt += (~own).sum(dim=0)
            if not per_head:
                prob = prob.mean(dim=1, keepdim=True)
            if include_own_view:
                prob = prob.masked_fill(own, -1.0)
            vals, idx = prob.topk(k, dim=-1)
            valid = vals >= 0
        blocks[:, :, t0:t1] = torch.where(valid, idx, -1)
        scores[:, :, t0:t1] = torch.where(valid, vals.to(scores.dtype), 0.0)
    importance = None
    if with_importance:
        importance = (imp_sum / imp_cnt.clamp(min=1)).view(b, geom.num_views, geom.blocks_per_view).float()
    return Selection(blocks, scores.float(), importance)


def kv_block_lists(
    geom: BlockGeometry, selection: Selection, include_own_view: bool, with_special: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key blocks (of the re-laid-out keys) that each query block attends: (ids, valid).

    ids: (B, Hs, T, M) int64, valid: same shape bool. The list is the special blocks (unless
    ``with_special`` is False), then (with ``include_own_view``) all blocks of the query block's view(s),
    then the selected blocks; valid entries are distinct.
    """
    sel = selection.blocks
    b, hs, t, _ = sel.shape
    device = sel.device
    nsb = geom.num_special_blocks if with_special else 0
    parts = [torch.arange(nsb, device=device).expand(b, hs, t, -1)]
    masks = [torch.ones(b, hs, t, nsb, dtype=torch.bool, device=device)]
    if include_own_view:
        qv = geom.query_block_views(device)
        views = qv[:, :1] + torch.arange(geom.max_views_per_query_block, device=device)  # (T, V)
        ok = views <= qv[:, 1:]
        j = torch.arange(geom.blocks_per_view, device=device)
        own = geom.num_special_blocks + views[:, :, None] * geom.blocks_per_view + j  # (T, V, nb)
        own_ok = ok[:, :, None].expand_as(own)
        own = torch.where(own_ok, own, 0)
        parts.append(own.reshape(t, -1).expand(b, hs, -1, -1))
        masks.append(own_ok.reshape(t, -1).expand(b, hs, -1, -1))
    parts.append(torch.where(sel >= 0, sel + geom.num_special_blocks, 0))
    masks.append(sel >= 0)
    return torch.cat(parts, dim=-1), torch.cat(masks, dim=-1)
