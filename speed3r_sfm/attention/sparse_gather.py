"""Selection branch in plain torch: gather each query block's key blocks and attend to them.

Exact and differentiable on any device. The gathered keys and values of each chunk of query blocks go through
one fused SDPA call (on the CPU its flash kernel, with a boolean mask for block padding and unused list
entries), so the logits are never materialised (CPU bf16 inference: two bf16 matmuls per chunk instead); the
gathered copies grow with (query blocks x attended keys), which is why this is the CPU path and the GPU has
FlexAttention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .blocks import BlockGeometry
from .dense import is_cpu_bf16_inference


def gather_block_attention(
    q: torch.Tensor,
    k_relaid: torch.Tensor,
    v_relaid: torch.Tensor,
    geom: BlockGeometry,
    ids: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    chunk_elements: int = 1 << 22,
) -> torch.Tensor:
    """softmax(q kᵀ·scale) v per query block over the listed key blocks; returns q's shape.

    ids/valid: (B, Hs, T, M) key blocks of the re-laid-out keys (see ``selection.kv_block_lists``).
    """
    b, h, n, d = q.shape
    t, qb, bs = geom.num_query_blocks, geom.query_block_size, geom.block_size
    m = ids.shape[-1]
    q_blocks = F.pad(q, (0, 0, 0, t * qb - n)).view(b, h, t, qb, d)
    nkv = geom.num_kv_blocks
    # rows of whole key blocks, gathered by one index_select per chunk (a memcpy per block)
    k_rows = k_relaid.reshape(b * h * nkv, bs * d)
    v_rows = v_relaid.reshape(b * h * nkv, bs * d)
    token_ok = geom.kv_token_is_valid(q.device).view(nkv, bs)
    ids = ids.expand(b, h, t, m)
    valid = valid.expand(b, h, t, m)
    head_row = (torch.arange(b * h, device=q.device) * nkv).view(b, h, 1, 1)
    chunk = max(1, chunk_elements // max(1, b * h * m * bs * d))  # gathered key elements per chunk
    # Without autograd, two buffers serve every chunk: a fresh allocation of this size costs more in page
    # faults than the gather that fills it.
    reuse = not (torch.is_grad_enabled() and (k_rows.requires_grad or v_rows.requires_grad))
    # CPU bf16 inference: two bf16 matmuls per chunk (see ``dense.chunked_bf16_attention``: the CPU SDPA
    # kernel does not use the CPU's bf16 dot products); every query block lists its own view's key blocks,
    # so no row of the mask is empty
    bf16_matmuls = is_cpu_bf16_inference(q)
    if reuse:
        key_buffer = k_rows.new_empty(b * h * min(chunk, t) * m, bs * d)
        value_buffer = torch.empty_like(key_buffer)
    outs = []
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        c = t1 - t0
        idx = ids[:, :, t0:t1]
        rows = (head_row + idx).flatten()
        if reuse:
            keys = torch.index_select(k_rows, 0, rows, out=key_buffer[: rows.numel()])
            values = torch.index_select(v_rows, 0, rows, out=value_buffer[: rows.numel()])
        else:
            keys, values = k_rows.index_select(0, rows), v_rows.index_select(0, rows)
        keys, values = keys.view(b, h * c, m * bs, d), values.view(b, h * c, m * bs, d)
        ok = (token_ok[idx] & valid[:, :, t0:t1, :, None]).view(b, h * c, 1, m * bs)
        queries = q_blocks[:, :, t0:t1].reshape(b, h * c, qb, d)
        if bf16_matmuls:
            scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(scale).masked_fill_(~ok, -math.inf)
            out = torch.matmul(torch.softmax(scores, dim=-1), values)
        else:
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=ok, scale=scale)
        outs.append(out.view(b, h, c, qb, d))
    return torch.cat(outs, dim=2).view(b, h, t * qb, d)[:, :, :n]
