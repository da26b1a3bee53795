"""Slow reference GSA in plain torch with explicit (N x N) masks, in the original token order.

Written independently of the block re-layout of the fast paths (python loops over views and blocks);
works in float64. For tests and tiny configurations only.
"""

from __future__ import annotations

import torch

from .config import AttentionConfig
from .gate import BranchGate
from .layout import ViewLayout
from .selection import Selection


def view_blocks(layout: ViewLayout, block_size: int) -> list[torch.Tensor]:
    """Sequence positions of every patch block, in global-id order (view-major, then block)."""
    out = []
    for view in range(layout.num_views):
        first = view * layout.tokens_per_view + layout.num_special
        for start in range(0, layout.num_patches, block_size):
            stop = min(start + block_size, layout.num_patches)
            out.append(torch.arange(first + start, first + stop))
    return out


def query_blocks(layout: ViewLayout, query_block_size: int) -> list[tuple[int, int, set[int]]]:
    """(start, stop, views) of every query block."""
    n, p = layout.num_tokens, layout.tokens_per_view
    return [
        (s, min(s + query_block_size, n), set(range(s // p, (min(s + query_block_size, n) - 1) // p + 1)))
        for s in range(0, n, query_block_size)
    ]


def reference_scores(
    q: torch.Tensor, k: torch.Tensor, layout: ViewLayout, block_size: int, query_block_size: int, scale: float
) -> torch.Tensor:
    """Selection logits (B, H, num_query_blocks, num_patch_blocks): mean query · mean key · scale."""
    k_mean = torch.stack([k[:, :, idx].mean(dim=2) for idx in view_blocks(layout, block_size)], dim=2)
    q_mean = torch.stack([q[:, :, a:b].mean(dim=2) for a, b, _ in query_blocks(layout, query_block_size)], 2)
    return torch.einsum("bhtd,bhgd->bhtg", q_mean, k_mean) * scale


def reference_select(
    logits: torch.Tensor,
    layout: ViewLayout,
    block_size: int,
    query_block_size: int,
    top_k: int,
    include_own_view: bool,
    per_head: bool,
) -> Selection:
    """Top-k blocks per query block (own views excluded when they are always attended), and importance."""
    b, _, t, g = logits.shape
    nb = g // layout.num_views
    prob = torch.softmax(logits.double(), dim=-1)
    own = torch.zeros(t, g, dtype=torch.bool)
    for i, (_, _, views) in enumerate(query_blocks(layout, query_block_size)):
        for v in views:
            own[i, v * nb : (v + 1) * nb] = True
    own = own.to(logits.device)
    head_mean = prob.mean(dim=1)
    importance = torch.zeros(b, g, dtype=torch.float64, device=logits.device)
    for j in range(g):
        others = ~own[:, j]
        if others.any():
            importance[:, j] = head_mean[:, others, j].mean(dim=1)
    sel_prob = prob if per_head else head_mean[:, None]
    if include_own_view:
        sel_prob = sel_prob.masked_fill(own, -1.0)
    vals, idx = sel_prob.topk(min(top_k, g), dim=-1)
    ok = vals >= 0
    return Selection(
        torch.where(ok, idx, -1), torch.where(ok, vals, 0.0).float(), importance.float().view(b, -1, nb)
    )


def reference_selection_mask(
    layout: ViewLayout, block_size: int, query_block_size: int, blocks: torch.Tensor, include_own_view: bool
) -> torch.Tensor:
    """(B, Hs, N, N) bool: query i may attend key j in the selection branch."""
    b, hs, _, _ = blocks.shape
    n, p, ns = layout.num_tokens, layout.tokens_per_view, layout.num_special
    positions = view_blocks(layout, block_size)
    special = torch.zeros(n, dtype=torch.bool)
    for view in range(layout.num_views):
        special[view * p : view * p + ns] = True
    mask = torch.zeros(b, hs, n, n, dtype=torch.bool)
    mask[..., special] = True
    blocks = blocks.cpu()
    for t, (start, stop, views) in enumerate(query_blocks(layout, query_block_size)):
        if include_own_view:
            for view in views:
                mask[:, :, start:stop, view * p + ns : (view + 1) * p] = True
        for bi in range(b):
            for hi in range(hs):
                for gid in blocks[bi, hi, t].tolist():
                    if gid >= 0:
                        mask[bi, hi, start:stop, positions[gid]] = True
    return mask.to(blocks.device)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q kᵀ·scale, masked) v with an explicit boolean mask broadcastable to (B, H, N, N)."""
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1), v)


def reference_compression(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ViewLayout,
    compression_block_size: int,
    scale: float,
) -> torch.Tensor:
    """Every query attends densely to the per-view mean-pooled patch blocks."""
    blocks = view_blocks(layout, compression_block_size)
    k_c = torch.stack([k[:, :, idx].mean(dim=2) for idx in blocks], dim=2)
    v_c = torch.stack([v[:, :, idx].mean(dim=2) for idx in blocks], dim=2)
    return torch.softmax(torch.matmul(q, k_c.transpose(-1, -2)) * scale, dim=-1) @ v_c


def reference_gsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ViewLayout,
    config: AttentionConfig,
    gate: BranchGate,
    selection: Selection | None = None,
) -> tuple[torch.Tensor, Selection]:
    """GSA output and its selection; pass ``selection`` to reuse the blocks of another implementation."""
    scale = q.shape[-1] ** -0.5
    bs, qbs = config.block_size, config.query_block_size
    if selection is None:
        with torch.no_grad():
            logits = reference_scores(q, k, layout, bs, qbs, scale)
            selection = reference_select(
                logits, layout, bs, qbs, config.top_k, config.include_own_view, config.per_head_selection
            )
    mask = reference_selection_mask(layout, bs, qbs, selection.blocks, config.include_own_view)
    o_sel = masked_attention(q, k, v, mask.to(q.device), scale)
    o_cmp = reference_compression(q, k, v, layout, config.compression_block_size, scale)
    z = torch.tanh(
        torch.einsum("bhnd,hdc->bhnc", q, gate.weight.to(q.dtype)) + gate.bias.to(q.dtype)[:, None]
    )
    return (1 + z[..., :1]) * o_sel + z[..., 1:] * o_cmp, selection
