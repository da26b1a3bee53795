"""Dense scaled-dot-product attention: the baseline every sparse variant is measured against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import ViewLayout


class DenseAttention(nn.Module):
    """softmax(q kᵀ / √d) v over the whole sequence, through ``F.scaled_dot_product_attention``."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ViewLayout | None = None
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)
