"""Selection branch through compiled FlexAttention with a BlockMask built from the selected block lists.

Never run flex_attention eagerly: on the CPU (torch 2.13) eager flex with ``BlockMask.from_kv_blocks``
returned wrong values; only the compiled kernel is used here. Key blocks without padding go to the
"full" lists (no mask evaluated); blocks with padding go to the partial lists, where ``mask_mod``
drops the padded positions. On the CPU, compiled flex supports inference only, and its AVX2 kernel
(torch 2.13, float32) returned wrong values with 8-token key blocks at head_dim 8 and 16, even with
every block full and no mask_mod (AVX-512 was right; other block sizes from 1 to 128 were right), so
8-token key blocks are refused there.
"""

from __future__ import annotations

import inspect

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .blocks import BlockGeometry

_compiled_flex = None
_HAS_COMPUTE_Q_BLOCKS = "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


def _flex():
    global _compiled_flex
    if _compiled_flex is None:
        # Each layout shape compiles once; automatic dynamic shapes take over after the first change.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 32))
                break
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def _sorted_lists(ids: torch.Tensor, keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the kept ids in ascending order, padded or cut to ``width`` (>= count), and their count."""
    big = torch.iinfo(torch.int32).max
    ordered = torch.where(keep, ids, big).sort(dim=-1).values
    count = keep.sum(dim=-1, dtype=torch.int32)
    ordered = torch.where(ordered == big, 0, ordered).to(torch.int32)
    m = ordered.shape[-1]
    if width > m:
        ordered = torch.nn.functional.pad(ordered, (0, width - m))
    return ordered[..., :width].contiguous(), count.contiguous()


def build_block_mask(
    geom: BlockGeometry, ids: torch.Tensor, valid: torch.Tensor, *, full_width: bool
) -> BlockMask:
    """BlockMask of (query block x key block) tiles of size (query_block_size, block_size).

    ``full_width``: index tensors as wide as the number of key blocks, and the transposed (q) lists that
    the backward pass needs; otherwise narrow lists, forward only (CUDA).
    """
    device = ids.device
    full_width = full_width or not _HAS_COMPUTE_Q_BLOCKS
    partial = geom.kv_block_is_partial(device)[ids]
    m = ids.shape[-1]
    width = geom.num_kv_blocks if full_width else m + 1
    full_ids, full_cnt = _sorted_lists(ids, valid & ~partial, width)
    part_ids, part_cnt = _sorted_lists(ids, valid & partial, width)
    bounds = torch.tensor(
        [geom.num_special_tokens, geom.special_len, geom.view_stride, geom.num_patches], device=device
    )

    def real_key(b, h, q_idx, kv_idx):
        rel = kv_idx - bounds[1]
        return (kv_idx < bounds[0]) | ((rel >= 0) & (torch.remainder(rel, bounds[2]) < bounds[3]))

    extra = {"compute_q_blocks": full_width} if _HAS_COMPUTE_Q_BLOCKS else {}
    return BlockMask.from_kv_blocks(
        part_cnt,
        part_ids,
        full_cnt,
        full_ids,
        BLOCK_SIZE=(geom.query_block_size, geom.block_size),
        mask_mod=real_key,
        seq_lengths=(geom.num_tokens, geom.kv_len),
        **extra,
    )


def _largest_tile(size: int, cap: int) -> int:
    tile = cap
    while size % tile:
        tile //= 2
    return tile


def kernel_options(
    geom: BlockGeometry, dtype: torch.dtype, device: torch.device, extra: dict | None = None
) -> dict | None:
    """Tile sizes that divide the BlockMask blocks (the Hopper defaults for head_dim 64 are 128 x 128),
    updated with ``extra``."""
    if device.type != "cuda":
        return None
    cap_n = 32 if dtype == torch.float32 else 128
    opts = {}
    if geom.query_block_size % 128:
        opts["BLOCK_M"] = _largest_tile(geom.query_block_size, 64)
    if geom.block_size % cap_n:
        opts["BLOCK_N"] = _largest_tile(geom.block_size, min(cap_n, 64))
    if torch.cuda.get_device_capability(device) >= (9, 0):
        opts["fwd_USE_TMA"] = True  # bulk tensor copies for the scattered key blocks: ~15% faster on H100
    opts.update(extra or {})
    return opts or None


def flex_block_attention(
    q: torch.Tensor,
    k_relaid: torch.Tensor,
    v_relaid: torch.Tensor,
    geom: BlockGeometry,
    ids: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    *,
    need_grad: bool,
    return_lse: bool = False,
    extra_options: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same function as ``gather_block_attention``, through compiled FlexAttention; with ``return_lse``
    also the (B, H, N) float32 log-sum-exp (CUDA only)."""
    if need_grad and q.device.type == "cuda" and geom.block_size % 128:
        if torch.cuda.get_device_capability(q.device) == (9, 0):
            # torch's Hopper backward tiles are 128 keys wide and must divide the key block.
            raise ValueError(
                f"GSA block_size {geom.block_size} cannot be trained with FlexAttention on Hopper GPUs; "
                "use a multiple of 128 (smaller blocks work for inference)"
            )
    if q.device.type == "cpu" and geom.block_size == 8:
        raise ValueError(
            "compiled FlexAttention on the CPU returns wrong values with 8-token key blocks (torch 2.13, "
            "AVX2); use GSA backend 'gather' (the CPU default) or another block_size"
        )
    full_width = need_grad or q.device.type != "cuda"
    block_mask = build_block_mask(geom, ids, valid, full_width=full_width)
    opts = kernel_options(geom, q.dtype, q.device, extra_options)
    flex = _flex()
    return flex(
        q, k_relaid, v_relaid, block_mask=block_mask, scale=scale, kernel_options=opts, return_lse=return_lse
    )
