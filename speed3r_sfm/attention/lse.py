"""Dense attention that also returns its log-sum-exp, and the merge of two attentions over disjoint keys.

Used for GSA's special tokens at inference on CUDA: all queries attend densely to the special tokens of all
views, which the fused SDPA kernels do about 2.5x faster than FlexAttention's block-sparse kernel; the two
partial softmaxes are then merged exactly by their log-sum-exps. The kernels are private aten ops whose
signature may change, so each one is checked once against an explicit computation before it is used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LseOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
_checked: dict[tuple[str, torch.dtype], _LseOp | None] = {}


def _cudnn(q, k, v, scale):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, False, False, scale=scale
    )
    return out[0], out[1]


def _flash(q, k, v, scale):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return out[0], out[1]


def _efficient(q, k, v, scale):
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
    return out[0], out[1]


def _normalise_lse(lse: torch.Tensor, b: int, h: int, n: int) -> torch.Tensor:
    return lse.reshape(b, h, -1)[:, :, :n].float()


def _works(op: _LseOp, device: torch.device, dtype: torch.dtype) -> bool:
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 64, device=device, generator=gen).to(dtype) for n in (200, 77, 77))
    try:
        out, lse = op(q, k, v, 0.125)
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        return False
    out = out.float()
    logits = (q.float() @ k.float().transpose(-1, -2)) * 0.125
    ref_lse = torch.logsumexp(logits, dim=-1)
    ref_out = torch.softmax(logits, dim=-1) @ v.float()
    ok_lse = torch.allclose(_normalise_lse(lse, 1, 2, 200), ref_lse, atol=2e-2, rtol=1e-3)
    return ok_lse and torch.allclose(out, ref_out, atol=3e-2, rtol=3e-2)


def sdpa_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(softmax(q kᵀ·scale) v, log-sum-exp (B, H, N) float32) on CUDA, or None where no kernel works."""
    if q.device.type != "cuda":
        return None
    key = (str(q.device), q.dtype)
    if key not in _checked:
        with torch.autocast(q.device.type, enabled=False):
            _checked[key] = next(
                (op for op in (_cudnn, _flash, _efficient) if _works(op, q.device, q.dtype)), None
            )
    op = _checked[key]
    if op is None:
        return None
    try:
        out, lse = op(q, k, v, scale)
    except RuntimeError:  # e.g. a layout this kernel rejects: the caller falls back to FlexAttention
        return None
    return out, _normalise_lse(lse, q.shape[0], q.shape[1], q.shape[2])


def merge_by_lse(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from the attentions over each set.

    o: (B, H, N, D), lse: (B, H, N) natural-log normalisers; a row without keys has lse = -inf.
    """
    weight = torch.sigmoid(lse1 - lse2).unsqueeze(-1)  # share of the first key set
    return torch.lerp(o2, o1, weight.to(o1.dtype))
