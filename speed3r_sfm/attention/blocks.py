"""Block geometry of GSA: query blocks, key blocks within views, and the block-aligned key layout.

Queries stay in the view-major order of the input: query block ``t`` is tokens ``[t*qb, (t+1)*qb)``
(the last one may be shorter) and may straddle a view boundary. Keys and values are re-laid out so that
blocks align with views: first the special tokens of all views (view-major), zero-padded to a multiple
of the block size, then per view its patch tokens, zero-padded to ``blocks_per_view * block_size``.
Patch block ``g = view * blocks_per_view + j`` holds patch tokens ``[j*bs, (j+1)*bs)`` of that view and
is key block ``num_special_blocks + g`` of the re-laid-out keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import ViewLayout


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class BlockGeometry:
    """Integer bookkeeping of one GSA call (no tensors are kept)."""

    num_views: int
    tokens_per_view: int
    num_special: int
    block_size: int
    query_block_size: int

    @classmethod
    def from_layout(cls, layout: ViewLayout, block_size: int, query_block_size: int) -> BlockGeometry:
        if layout.num_patches < 1:
            raise ValueError("GSA needs at least one patch token per view")
        return cls(layout.num_views, layout.tokens_per_view, layout.num_special, block_size, query_block_size)

    @property
    def num_tokens(self) -> int:
        return self.num_views * self.tokens_per_view

    @property
    def num_patches(self) -> int:
        return self.tokens_per_view - self.num_special

    @property
    def blocks_per_view(self) -> int:
        return _ceil_div(self.num_patches, self.block_size)

    @property
    def num_patch_blocks(self) -> int:
        return self.num_views * self.blocks_per_view

    @property
    def num_special_tokens(self) -> int:
        return self.num_views * self.num_special

    @property
    def num_special_blocks(self) -> int:
        return _ceil_div(self.num_special_tokens, self.block_size)

    @property
    def special_len(self) -> int:
        """Length of the (padded) special segment of the re-laid-out keys."""
        return self.num_special_blocks * self.block_size

    @property
    def view_stride(self) -> int:
        """Padded length of one view's patch tokens in the re-laid-out keys."""
        return self.blocks_per_view * self.block_size

    @property
    def kv_len(self) -> int:
        return self.special_len + self.num_views * self.view_stride

    @property
    def num_kv_blocks(self) -> int:
        return self.num_special_blocks + self.num_patch_blocks

    @property
    def num_query_blocks(self) -> int:
        return _ceil_div(self.num_tokens, self.query_block_size)

    @property
    def max_views_per_query_block(self) -> int:
        return min(self.num_views, (self.query_block_size - 1) // self.tokens_per_view + 2)

    def query_block_views(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(num_query_blocks, 2) int64: first and last view touched by each query block."""
        start = torch.arange(self.num_query_blocks, device=device) * self.query_block_size
        end = torch.clamp(start + self.query_block_size, max=self.num_tokens) - 1
        return torch.stack([start // self.tokens_per_view, end // self.tokens_per_view], dim=1)

    def block_token_counts(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(blocks_per_view,) number of real patch tokens in each block of a view."""
        start = torch.arange(self.blocks_per_view, device=device) * self.block_size
        return torch.clamp(self.num_patches - start, max=self.block_size)

    def kv_block_is_partial(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(num_kv_blocks,) bool: the re-laid-out key block contains padding."""
        special = torch.zeros(self.num_special_blocks, dtype=torch.bool, device=device)
        if self.num_special_tokens % self.block_size:
            special[-1] = True
        patch = (self.block_token_counts(device) < self.block_size).repeat(self.num_views)
        return torch.cat([special, patch])

    def kv_token_is_valid(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(kv_len,) bool: the re-laid-out key position holds a real token (not padding)."""
        pos = torch.arange(self.kv_len, device=device)
        rel = pos - self.special_len
        in_patch = (rel >= 0) & (torch.remainder(rel, self.view_stride) < self.num_patches)
        return (pos < self.num_special_tokens) | in_patch

    def relayout(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, D) keys or values -> (B, H, kv_len, D) in the block-aligned layout, padding zeroed."""
        b, h, n, d = x.shape
        if n != self.num_tokens:
            raise ValueError(f"sequence of {n} tokens does not match the layout ({self.num_tokens})")
        s, p, ns, npat = self.num_views, self.tokens_per_view, self.num_special, self.num_patches
        xv = x.view(b, h, s, p, d)
        out = x.new_empty(b, h, self.kv_len, d)
        if ns:
            out[:, :, : s * ns].view(b, h, s, ns, d).copy_(xv[:, :, :, :ns])
            out[:, :, s * ns : self.special_len].zero_()
        patches = out[:, :, self.special_len :].view(b, h, s, self.view_stride, d)
        patches[:, :, :, :npat].copy_(xv[:, :, :, ns:])
        patches[:, :, :, npat:].zero_()
        return out

    def patch_block_sums(self, x_relaid: torch.Tensor) -> torch.Tensor:
        """(B, H, kv_len, D) re-laid-out -> (B, H, num_views, blocks_per_view, D) block sums.

        Accumulated in float32 (float64 for float64 input)."""
        b, h, _, d = x_relaid.shape
        patches = x_relaid[:, :, self.special_len :]
        shape = (b, h, self.num_views, self.blocks_per_view, self.block_size, d)
        return patches.reshape(shape).sum(dim=-2, dtype=accumulation_dtype(x_relaid.dtype))

    def pooled_queries(self, q: torch.Tensor) -> torch.Tensor:
        """(B, H, N, D) -> (B, H, num_query_blocks, D) mean of each query block (float32 or float64)."""
        b, h, n, d = q.shape
        qb, nfull = self.query_block_size, n // self.query_block_size
        acc = accumulation_dtype(q.dtype)
        pooled = q[:, :, : nfull * qb].reshape(b, h, nfull, qb, d).sum(dim=-2, dtype=acc) / qb
        if nfull * qb < n:
            tail = q[:, :, nfull * qb :].mean(dim=-2, dtype=acc)
            pooled = torch.cat([pooled, tail[:, :, None]], dim=2)
        return pooled
