"""Dense scaled-dot-product attention: the baseline every sparse variant is measured against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import ViewLayout

# bf16 scores per query chunk of :func:`chunked_bf16_attention` (8 MiB): a chunk's scores stay in the cache
CHUNK_SCORES = 1 << 22


class DenseAttention(nn.Module):
    """softmax(q kᵀ / √d) v over the whole sequence, through ``F.scaled_dot_product_attention``; bf16 inputs
    on the CPU at inference (the aggregator under CPU autocast) through :func:`chunked_bf16_attention`."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ViewLayout | None = None
    ) -> torch.Tensor:
        if is_cpu_bf16_inference(q):
            return chunked_bf16_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)


def is_cpu_bf16_inference(q: torch.Tensor) -> bool:
    """bf16 queries on the CPU without autograd: attention as bf16 matmuls (``chunked_bf16_attention``)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and not torch.is_grad_enabled()


def chunked_bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v as two bf16 matmuls and a softmax per chunk of queries; q, k, v (..., N, d), any
    float dtype, output in q's dtype.

    On CPUs with native bf16 (AVX512-BF16, AMX) oneDNN's bf16 matmuls run about 4x the float32 rate, but
    the CPU kernel of ``scaled_dot_product_attention`` does not use them: at 8184 tokens, 2 heads of 64 on
    two cores it took 0.20-0.23 s in float32 or bf16, this 0.09-0.16 s
    (``benchmarks/results/cpu_bf16_aggregator.md``). The scores and probabilities are rounded to bf16 (as
    bf16 flash attention on a GPU rounds the probabilities).
    """
    *batch, tokens, dim = q.shape
    keys = k.shape[-2]
    rows = max(1, int(torch.Size(batch).numel()))
    chunk = max(16, CHUNK_SCORES // max(1, rows * keys))
    scaled = (q * dim**-0.5).to(torch.bfloat16)
    keys_t = k.to(torch.bfloat16).transpose(-1, -2).contiguous()
    values = v.to(torch.bfloat16)
    out = torch.empty(*batch, tokens, v.shape[-1], dtype=q.dtype, device=q.device)
    for start in range(0, tokens, chunk):
        scores = torch.matmul(scaled[..., start : start + chunk, :], keys_t)
        out[..., start : start + chunk, :] = torch.matmul(torch.softmax(scores, dim=-1), values)
    return out
