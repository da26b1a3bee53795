"""Dense attention: the chunked bf16 path the aggregator takes under CPU autocast."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speed3r_sfm.attention import DenseAttention
from speed3r_sfm.attention import dense as dense_module
from speed3r_sfm.attention.dense import chunked_bf16_attention


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v in float64, written out."""
    q, k, v = q.double(), k.double(), v.double()
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return weights @ v


def test_chunked_bf16_attention_matches_float64_reference(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 301, 16) for _ in range(3))
    monkeypatch.setattr(dense_module, "CHUNK_SCORES", 6 * 301 * 40)  # chunks of 40 queries, a last of 21
    out = chunked_bf16_attention(q, k, v)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 301, 16)
    rounded = reference_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())  # same inputs, exact maths
    exact = reference_attention(q, k, v)
    assert (out.double() - rounded).abs().max() < 1.5e-2  # scores and probabilities rounded to bf16
    assert (out.double() - exact).abs().max() < 2e-2
    assert (out.double() - exact).abs().mean() < 2e-3
    # chunking does not change the result: one chunk gives the same values
    monkeypatch.setattr(dense_module, "CHUNK_SCORES", 1 << 30)
    torch.testing.assert_close(chunked_bf16_attention(q, k, v), out, rtol=0, atol=0)
    assert chunked_bf16_attention(q.bfloat16(), k, v).dtype == torch.bfloat16


def test_dense_attention_takes_the_chunked_path_for_cpu_bf16_inference_only():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 50, 8, dtype=torch.bfloat16) for _ in range(3))
    attend = DenseAttention()
    with torch.no_grad():
        assert torch.equal(attend(q, k, v), chunked_bf16_attention(q, k, v))
        q32, k32, v32 = q.float(), k.float(), v.float()
        assert torch.equal(attend(q32, k32, v32), F.scaled_dot_product_attention(q32, k32, v32))
    # with autograd: SDPA and its memory-efficient backward
    q.requires_grad_(True)
    out = attend(q, k, v)
    assert torch.equal(out.detach(), F.scaled_dot_product_attention(q, k, v).detach())
    out.float().sum().backward()
    assert q.grad is not None
