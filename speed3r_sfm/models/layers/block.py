"""Pre-norm transformer block with LayerScale, as in DINOv2, VGGT and π³."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...attention import ViewLayout
from .attention import Attention
from .rope import RopeTable, RotaryPositionEmbedding2D


def token_ranges(num_tokens: int, chunk: int | None, multiple: int = 1) -> list[slice]:
    """Consecutive slices covering ``num_tokens``, each of ``chunk`` tokens rounded down to a multiple of
    ``multiple`` (at least ``multiple``); one slice when ``chunk`` is None."""
    if chunk is None or chunk >= num_tokens:
        return [slice(0, num_tokens)]
    step = max(multiple, chunk // multiple * multiple)
    return [slice(start, min(start + step, num_tokens)) for start in range(0, num_tokens, step)]


def linear_output_dtype(x: torch.Tensor, linear: nn.Linear) -> torch.dtype:
    """dtype of ``linear(x)``: the autocast dtype when autocast is on for x's device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, linear.weight.dtype)


def layer_norm_inference(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``; for half-precision x (a bf16 residual stream) computed in x's dtype, with float32
    statistics and the affine parameters rounded to x's dtype, instead of autocast's float32 output."""
    if x.dtype not in (torch.bfloat16, torch.float16) or norm.weight is None:
        return norm(x)
    with torch.autocast(x.device.type, enabled=False):
        weight, bias = norm.weight.to(x.dtype), None if norm.bias is None else norm.bias.to(x.dtype)
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


def add_scaled_(x: torch.Tensor, update: torch.Tensor, scale: nn.Module) -> torch.Tensor:
    """x += scale(update) in place, in one pass (``scale`` is a LayerScale or the identity)."""
    if isinstance(scale, LayerScale):
        return x.addcmul_(update, scale.gamma)
    return x.add_(update)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))). ``init_values=None`` drops LayerScale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = None,
        norm_eps: float = 1e-5,
        qk_norm: bool = False,
        qk_norm_eps: float = 1e-5,
        rope: RotaryPositionEmbedding2D | None = None,
        attend: nn.Module | None = None,
        cast_qk_before_rope: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim, num_heads, qkv_bias, proj_bias, qk_norm, qk_norm_eps, rope, attend, cast_qk_before_rope
        )
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        # In-place inference through torch.compile'd token-wise parts (set by the model; see ``compiled``).
        self.compile_inference = False

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | RopeTable | None = None,
        layout: ViewLayout | None = None,
        *,
        rope_table: RopeTable | None = None,
        inplace: bool = False,
        token_chunk: int | None = None,
        before_update: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """x: (B, N, dim); positions: (B, N, 2) integer (y, x) RoPE positions; ``rope_table``: their cos/sin
        computed once for all blocks (used instead of ``positions`` when given; needed in place).

        ``inplace`` (inference only, no autograd): the same maths with x updated in place and returned. The
        token-wise parts (norms, projections, MLP) then run over ``token_chunk`` tokens at a time, so that
        besides x only q, k, v and the attention output exist for the whole sequence, in the attention dtype
        (bf16 under autocast). ``before_update(x)`` is called once the attention is computed and q, k, v are
        freed, before x changes (e.g. to copy x out at a lower memory peak).
        """
        if inplace:
            if torch.is_grad_enabled():
                raise RuntimeError("Block(inplace=True) is for inference: run it under torch.no_grad()")
            heads = self.attention_heads(x, rope_table, layout, token_chunk)
            if before_update is not None:
                before_update(x)
            return self.add_updates_(x, heads, token_chunk)
        positions = rope_table if rope_table is not None else positions
        x = x + self.ls1(self.attn(self.norm1(x), positions, layout))
        return x + self.ls2(self.mlp(self.norm2(x)))

    # The two halves of the in-place inference forward.

    @torch.no_grad()
    def attention_heads(
        self,
        x: torch.Tensor,
        rope_table: RopeTable | None = None,
        layout: ViewLayout | None = None,
        token_chunk: int | None = None,
    ) -> torch.Tensor:
        """(no autograd) attention of norm1(x) before the output projection, (B, heads, N, head_dim).

        x is unchanged; norm1, qkv, qk-norm and RoPE run on ``token_chunk`` tokens at a time (rounded to
        whole periods of ``rope_table``), writing q, k, v of the whole sequence into buffers; where the
        attention kernel takes k and v in its own layout (GSA's ``kv_buffer``), straight into that."""
        batch, num_tokens, _ = x.shape
        attn = self.attn
        period = rope_table.period if rope_table is not None else 1
        ranges = token_ranges(num_tokens, token_chunk, period)
        if len(ranges) == 1:
            return attn.attend(*self._project_rows(x, rope_table), layout)
        dtype = linear_output_dtype(x, attn.qkv)
        q = x.new_empty(batch, attn.num_heads, num_tokens, attn.head_dim, dtype=dtype)
        k, v, aligned = self._kv_buffers(q, layout, ranges)
        for rows in ranges:
            if not aligned:
                self._project_rows(x[:, rows], rope_table, out=(q[:, :, rows], k[:, :, rows], v[:, :, rows]))
                continue
            _, k_rows, v_rows = self._project_rows(x[:, rows], rope_table, out=(q[:, :, rows], None, None))
            first_view = rows.start // layout.tokens_per_view
            attn.attend.write_kv(k, k_rows, layout, first_view)
            attn.attend.write_kv(v, v_rows, layout, first_view)
        if aligned:
            return attn.attend(q, k, v, layout, kv_block_aligned=True)
        return attn.attend(q, k, v, layout)

    def _kv_buffers(
        self, q: torch.Tensor, layout: ViewLayout | None, ranges: list[slice]
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Whole-sequence k and v buffers, and whether they are the attention kernel's block-aligned ones
        (when it has them, e.g. GSA, and the chunks are whole views) rather than of q's shape."""
        make_buffer = getattr(self.attn.attend, "kv_buffer", None)
        if make_buffer is not None and layout is not None:
            if all(r.start % layout.tokens_per_view == 0 for r in ranges):
                k = make_buffer(q, layout)
                if k is not None:
                    return k, make_buffer(q, layout), True
        return torch.empty_like(q), torch.empty_like(q), False

    @torch.no_grad()
    def add_updates_(
        self, x: torch.Tensor, heads: torch.Tensor, token_chunk: int | None = None
    ) -> torch.Tensor:
        """(no autograd) x += ls1(proj(heads)), then x += ls2(mlp(norm2(x))), in place, on ``token_chunk``
        tokens at a time; returns x."""
        for rows in token_ranges(x.shape[1], token_chunk):
            part, part_heads = x[:, rows], heads[:, :, rows]
            if self.compile_inference:
                compiled(updated_rows_)(self, part, part_heads)
                continue
            add_scaled_(part, self.attn.proj(part_heads.transpose(1, 2).flatten(-2)), self.ls1)
            add_scaled_(part, self.mlp(layer_norm_inference(self.norm2, part)), self.ls2)
        return x

    def _project_rows(
        self,
        x: torch.Tensor,
        rope_table: RopeTable | None,
        out: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, heads, T, head_dim) of tokens x (B, T, dim); those with a tensor in ``out`` are
        written there (see ``Attention.project_qkv``)."""
        if not self.compile_inference:
            return self.attn.project_qkv(layer_norm_inference(self.norm1, x), rope_table, out)
        qkv = compiled(projected_rows)(self, x, rope_table)
        out = out if out is not None else (None, None, None)
        return tuple(new if dest is None else dest.copy_(new) for dest, new in zip(out, qkv, strict=True))


# Compiled inference (``Block.compile_inference``): the token-wise parts of a chunk as two functions of the
# block, compiled once per process for all blocks (parameters are graph inputs; dynamic shapes cover every
# chunk size). They are the maths of ``forward`` fused by inductor: LayerNorm + cast, qk-norm + RoPE + cast,
# residual update + LayerNorm each become one pass over memory instead of several.


def projected_rows(
    block: Block, x: torch.Tensor, rope_table: RopeTable | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, heads, T, head_dim) of tokens x (B, T, dim): ``attn.qkv_heads(norm1(x))``."""
    return block.attn.qkv_heads(block.norm1(x), rope_table)


def updated_rows_(block: Block, x: torch.Tensor, heads: torch.Tensor) -> None:
    """x (B, T, dim) += ls1(proj(heads)), then += ls2(mlp(norm2(x))), in place."""
    x1 = x + block.ls1(block.attn.proj(heads.transpose(1, 2).flatten(-2)))
    x.copy_(x1 + block.ls2(block.mlp(block.norm2(x1))))


_compiled_functions: dict[Callable, Callable] = {}


def compiled(function: Callable) -> Callable:
    """``torch.compile(function, dynamic=True)``, created once per process."""
    if function not in _compiled_functions:
        _compiled_functions[function] = torch.compile(function, dynamic=True)
    return _compiled_functions[function]
