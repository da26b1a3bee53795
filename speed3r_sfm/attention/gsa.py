"""Global Sparse Attention (GSA, Speed3R): global attention over all views' tokens in two gated branches.

For q, k, v of shape (B, H, N, D), N = num_views * tokens_per_view (view-major, special tokens first in
each view), and the block geometry of ``blocks.py``:

- compression branch: the patch tokens of each view are mean-pooled in blocks of
  ``compression_block_size`` into compressed keys/values; every query attends to all of them (SDPA).
- selection branch: each query block (``query_block_size`` consecutive tokens) scores every patch block
  (``block_size`` patch tokens of one view) by softmax(mean query · mean key), keeps the ``top_k`` best
  blocks of other views, and attends at full resolution to them, to the special tokens of all views and,
  with ``include_own_view``, to all patch blocks of its own view(s).
- ``out = g_sel * o_sel + g_cmp * o_cmp`` with the per-head query gate of ``gate.BranchGate``; at its
  training-free init g_sel = 1, g_cmp = 0. The compression output is then not computed unless gradients
  are needed (multiplying it by an exactly-zero gate changes nothing).

Backends (``AttentionConfig.backend``): "flex" runs the selection branch as one compiled FlexAttention
call over block-aligned keys (``sparse_flex``); at CUDA inference the special-token keys instead go
through a fused dense SDPA kernel, merged exactly by log-sum-exp (``lse``). "gather" (``sparse_gather``)
is plain torch for the CPU, "reference" (``reference``) the explicit-mask version the others are tested
against. Selection itself (``selection``) is discrete and carries no gradient.

Records: if ``layout.records`` is a list, each call appends one dict (tensors stay on the input's device):

- ``layer_index`` (int), ``num_views``, ``tokens_per_view``, ``num_special`` (int), ``patch_grid``
  ((rows, cols) or None), ``block_size``, ``blocks_per_view``, ``query_block_size`` (int).
- ``block_importance``: float32 (B, num_views, blocks_per_view): mean selection probability (head-averaged
  softmax over all patch blocks) that query blocks of *other* views give to patch block j of view v.
- ``query_block_views``: int32 (num_query_blocks, 2): first and last view of query block t, which covers
  tokens [t*query_block_size, min((t+1)*query_block_size, N)) of the view-major sequence.
- ``selected_blocks``: int32 (B, Hs, num_query_blocks, k): the top-k patch blocks of query block t as
  global ids g (view g // blocks_per_view, block g % blocks_per_view), best first, -1 where there were
  fewer candidates; Hs = heads with ``per_head_selection`` else 1; k = min(top_k, num_views *
  blocks_per_view). With ``include_own_view`` these are all in other views than the query block's.
- ``selected_scores``: float32, same shape: the selection probability of each entry (0 for -1).

Patch block j of view v holds the view's patch tokens [j*block_size, min((j+1)*block_size, num_patches)),
i.e. sequence positions v*tokens_per_view + num_special + those; patch p sits at (p // cols, p % cols)
on ``patch_grid``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BlockGeometry
from .config import AttentionConfig
from .gate import BranchGate
from .layout import ViewLayout
from .lse import sdpa_with_lse
from .selection import Selection, kv_block_lists, select_blocks
from .sparse_flex import flex_block_attention
from .sparse_gather import gather_block_attention


def compressed_from_sums(sums: torch.Tensor, counts: torch.Tensor, ratio: int) -> torch.Tensor:
    """Block sums (B, H, S, nb, D) of selection blocks with token counts (nb,) -> compressed tokens.

    Groups ``ratio`` consecutive selection blocks of a view into one compression block and returns the
    mean over its real tokens: (B, H, S * ceil(nb / ratio), D) float32.
    """
    b, h, s, nb, d = sums.shape
    ncb = -(-nb // ratio)
    pad = ncb * ratio - nb
    sums = F.pad(sums, (0, 0, 0, pad)).view(b, h, s, ncb, ratio, d).sum(dim=-2)
    counts = F.pad(counts.to(sums.dtype), (0, pad)).view(ncb, ratio).sum(dim=-1)
    return (sums / counts[:, None]).reshape(b, h, s * ncb, d)


FLEX_MIN_DIM = 16  # Triton tl.dot needs K >= 16: smaller head dims or key blocks (P @ V) fail to compile


class GlobalSparseAttention(nn.Module):
    """GSA as the ``attend(q, k, v, layout)`` module of a global block (see the module docstring)."""

    def __init__(self, config: AttentionConfig, *, num_heads: int, head_dim: int, layer_index: int) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.head_dim = head_dim
        self.gate = BranchGate(num_heads, head_dim)

    def reset_parameters(self) -> None:
        self.gate.reset_parameters()

    def backend_for(self, device: torch.device) -> str:
        """ "auto": FlexAttention on CUDA where its Triton kernels apply (head dims and key blocks of at
        least :data:`FLEX_MIN_DIM`; the tiny test presets use smaller blocks), else the gather path."""
        if self.config.backend != "auto":
            return self.config.backend
        fits_flex = min(self.head_dim, self.config.block_size) >= FLEX_MIN_DIM
        return "flex" if device.type == "cuda" and fits_flex else "gather"

    # Inference callers that produce k and v in chunks of whole views (``Block`` in place) may write them
    # straight into the block-aligned layout of the fast path (``kv_buffer`` + ``write_kv``) and pass
    # ``kv_block_aligned=True``: the sequence-ordered k and v then never exist next to their re-laid copies.

    def kv_buffer(self, like: torch.Tensor, layout: ViewLayout) -> torch.Tensor | None:
        """An uninitialised (B, H, kv_len, D) buffer of ``like``'s (B, H, N, D) kind in the block-aligned
        layout, padding zeroed, for ``write_kv``; None where the call would not use it (reference backend,
        autograd)."""
        if self.backend_for(like.device) == "reference" or torch.is_grad_enabled():
            return None
        cfg = self.config
        geom = BlockGeometry.from_layout(layout, cfg.block_size, cfg.query_block_size)
        b, h, _, d = like.shape
        buffer = like.new_empty(b, h, geom.kv_len, d)
        buffer[:, :, geom.num_special_tokens : geom.special_len].zero_()
        patches = buffer[:, :, geom.special_len :].view(b, h, geom.num_views, geom.view_stride, d)
        patches[:, :, :, geom.num_patches :].zero_()
        return buffer

    def write_kv(
        self, buffer: torch.Tensor, values: torch.Tensor, layout: ViewLayout, first_view: int
    ) -> None:
        """Write (B, H, n·tokens_per_view, D) keys or values of views [first_view, first_view + n) into a
        ``kv_buffer`` (what ``BlockGeometry.relayout`` does for the whole sequence)."""
        cfg = self.config
        geom = BlockGeometry.from_layout(layout, cfg.block_size, cfg.query_block_size)
        b, h, tokens, d = values.shape
        views = tokens // geom.tokens_per_view
        ns, end = geom.num_special, first_view + views
        per_view = values.view(b, h, views, geom.tokens_per_view, d)
        if ns:
            special = buffer[:, :, first_view * ns : end * ns].view(b, h, views, ns, d)
            special.copy_(per_view[:, :, :, :ns])
        patches = buffer[:, :, geom.special_len :].view(b, h, geom.num_views, geom.view_stride, d)
        patches[:, :, first_view:end, : geom.num_patches].copy_(per_view[:, :, :, ns:])

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: ViewLayout | None = None,
        kv_block_aligned: bool = False,
    ) -> torch.Tensor:
        """q, k, v: (B, H, N, D) in sequence order; with ``kv_block_aligned``, k and v are ``kv_buffer``s
        filled by ``write_kv`` instead (inference)."""
        if layout is None:
            raise ValueError("GSA needs the ViewLayout of the global-attention sequence")
        cfg = self.config
        geom = BlockGeometry.from_layout(layout, cfg.block_size, cfg.query_block_size)
        if q.shape[2] != geom.num_tokens:
            raise ValueError(f"sequence of {q.shape[2]} tokens does not match the layout ({geom.num_tokens})")
        if kv_block_aligned and (k.shape[2] != geom.kv_len or self.backend_for(q.device) == "reference"):
            raise ValueError("block-aligned k, v must come from kv_buffer (not for the reference backend)")
        if geom.num_special == 0 and cfg.top_k == 0 and not cfg.include_own_view:
            raise ValueError("GSA with top_k=0, no special tokens and include_own_view=False attends nothing")
        backend = self.backend_for(q.device)
        if backend not in ("flex", "gather", "reference"):
            raise ValueError(f"unknown GSA backend {backend!r}")
        # Computed in the dtype of q, k, v (autocast would turn the float32 scoring into bfloat16).
        with torch.autocast(q.device.type, enabled=False):
            if backend == "reference":
                from .reference import reference_gsa

                out, selection = reference_gsa(q, k, v, layout, cfg, self.gate)
            else:
                if not kv_block_aligned:
                    k, v = geom.relayout(k), geom.relayout(v)
                out, selection = self._fast_forward(q, k, v, geom, backend, layout.records is not None)
        if layout.records is not None:
            layout.records.append(self._record(layout, geom, selection))
        return out

    def _needs_grad(self, *tensors: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in self.parameters())

    def _fast_forward(
        self,
        q: torch.Tensor,
        k_r: torch.Tensor,
        v_r: torch.Tensor,
        geom: BlockGeometry,
        backend: str,
        with_importance: bool,
    ) -> tuple[torch.Tensor, Selection]:
        """Selection and block-sparse attention with k, v in the block-aligned layout (``relayout``)."""
        cfg = self.config
        scale = q.shape[-1] ** -0.5
        need_grad = self._needs_grad(q, k_r, v_r)
        counts = geom.block_token_counts(q.device)
        k_sums = geom.patch_block_sums(k_r)  # float32, differentiable (compression branch)
        split_special = (
            backend == "flex"
            and cfg.special_kernel == "auto"
            and not need_grad
            and q.device.type == "cuda"
            and geom.num_special > 0
        )
        with torch.no_grad():
            k_pooled = (k_sums / counts[:, None]).flatten(2, 3)
            selection = select_blocks(
                geom.pooled_queries(q),
                k_pooled,
                geom,
                top_k=cfg.top_k,
                include_own_view=cfg.include_own_view,
                per_head=cfg.per_head_selection,
                scale=scale,
                with_importance=with_importance,
                with_scores=with_importance,
                score_dtype=q.dtype if q.dtype in (torch.bfloat16, torch.float16) else None,
            )
        special = None
        if split_special:
            ns = geom.num_special_tokens
            special = sdpa_with_lse(q, k_r[:, :, :ns].contiguous(), v_r[:, :, :ns].contiguous(), scale)
        with torch.no_grad():
            ids, valid = kv_block_lists(geom, selection, cfg.include_own_view, with_special=special is None)
        opts = cfg.flex_kernel_options
        if backend == "gather":
            o_sel = gather_block_attention(q, k_r, v_r, geom, ids, valid, scale)
        elif special is not None:
            o_blocks, lse_blocks = flex_block_attention(
                q, k_r, v_r, geom, ids, valid, scale, need_grad=False, return_lse=True, extra_options=opts
            )
            # merge_by_lse(special[0], special[1], o_blocks, lse_blocks), in place (no autograd on this
            # path): one (B, H, N, D) output less at the memory peak of long sequences.
            weight = torch.sigmoid(special[1] - lse_blocks).unsqueeze(-1).to(o_blocks.dtype)
            o_sel = o_blocks.lerp_(special[0], weight)
        else:
            o_sel = flex_block_attention(
                q, k_r, v_r, geom, ids, valid, scale, need_grad=need_grad, extra_options=opts
            )
        if not need_grad and self.gate.is_training_free():
            return o_sel, selection
        ratio = cfg.compression_block_size // cfg.block_size
        k_c = compressed_from_sums(k_sums, counts, ratio).to(q.dtype)
        v_c = compressed_from_sums(geom.patch_block_sums(v_r), counts, ratio).to(q.dtype)
        o_cmp = F.scaled_dot_product_attention(q, k_c, v_c)
        g_sel, g_cmp = self.gate(q)
        return g_sel * o_sel + g_cmp * o_cmp, selection

    def _record(self, layout: ViewLayout, geom: BlockGeometry, selection: Selection) -> dict[str, Any]:
        return {
            "layer_index": self.layer_index,
            "num_views": geom.num_views,
            "tokens_per_view": geom.tokens_per_view,
            "num_special": geom.num_special,
            "patch_grid": layout.patch_grid,
            "block_size": geom.block_size,
            "blocks_per_view": geom.blocks_per_view,
            "query_block_size": geom.query_block_size,
            "block_importance": selection.importance,
            "query_block_views": geom.query_block_views(selection.blocks.device).to(torch.int32),
            "selected_blocks": selection.blocks.to(torch.int32),
            "selected_scores": selection.scores,
        }
