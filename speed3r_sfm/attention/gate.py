"""The learned per-head gate that mixes GSA's selection and compression branches."""

from __future__ import annotations

import torch
from torch import nn


class BranchGate(nn.Module):
    """``out = g_sel * o_sel + g_cmp * o_cmp`` with per-head gates computed from the query.

    ``g_sel = 1 + tanh(q·w_sel + b_sel)`` and ``g_cmp = tanh(q·w_cmp + b_cmp)``. At the training-free
    init (all parameters zero) ``g_sel = 1`` and ``g_cmp = 0`` exactly, so a dense checkpoint runs as pure
    block-sparse attention; both gates still get gradients (tanh'(0) = 1). ``weight``: (heads, head_dim, 2),
    ``bias``: (heads, 2); index 0 is the selection branch, 1 the compression branch.
    """

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads, head_dim, 2))
        self.bias = nn.Parameter(torch.zeros(num_heads, 2))

    def reset_parameters(self) -> None:
        """Back to the training-free init."""
        with torch.no_grad():
            self.weight.zero_()
            self.bias.zero_()

    def is_training_free(self) -> bool:
        """All parameters zero (synchronises with the device)."""
        return not bool(torch.any(self.weight != 0) | torch.any(self.bias != 0))

    def forward(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (B, H, N, D) -> (g_sel, g_cmp), each (B, H, N, 1) in q's dtype."""
        z = torch.einsum("bhnd,hdc->bhnc", q, self.weight.to(q.dtype)) + self.bias.to(q.dtype)[:, None]
        z = torch.tanh(z)
        return 1 + z[..., :1], z[..., 1:]
