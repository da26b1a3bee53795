"""Selection branch in plain torch: gather each query block's key blocks and attend to them.

Exact and differentiable on any device; memory grows with (query blocks x attended keys), so it is meant
for the CPU and small configurations (CI, training-size tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .blocks import BlockGeometry


def gather_block_attention(
    q: torch.Tensor,
    k_relaid: torch.Tensor,
    v_relaid: torch.Tensor,
    geom: BlockGeometry,
    ids: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """softmax(q kᵀ·scale) v per query block over the listed key blocks; returns q's shape.

    ids/valid: (B, Hs, T, M) key blocks of the re-laid-out keys (see ``selection.kv_block_lists``).
    """
    b, h, n, d = q.shape
    t, qb, bs = geom.num_query_blocks, geom.query_block_size, geom.block_size
    m = ids.shape[-1]
    q_blocks = F.pad(q, (0, 0, 0, t * qb - n)).view(b, h, t, qb, d)
    k_blocks = k_relaid.view(b, h, geom.num_kv_blocks, bs, d)
    v_blocks = v_relaid.view(b, h, geom.num_kv_blocks, bs, d)
    token_ok = geom.kv_token_is_valid(q.device).view(geom.num_kv_blocks, bs)
    ids = ids.expand(b, h, t, m)
    valid = valid.expand(b, h, t, m)
    bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
    hi = torch.arange(h, device=q.device).view(1, h, 1, 1)
    chunk = max(1, chunk_elements // max(1, b * h * qb * m * bs))
    outs = []
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        idx = ids[:, :, t0:t1]
        keys = k_blocks[bi, hi, idx].flatten(3, 4)  # (B, H, c, M*bs, D)
        values = v_blocks[bi, hi, idx].flatten(3, 4)
        ok = (token_ok[idx] & valid[:, :, t0:t1, :, None]).flatten(3, 4)
        logits = torch.matmul(q_blocks[:, :, t0:t1], keys.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~ok[:, :, :, None, :], float("-inf"))
        outs.append(torch.matmul(torch.softmax(logits, dim=-1), values))
    return torch.cat(outs, dim=2).view(b, h, t * qb, d)[:, :, :n]
