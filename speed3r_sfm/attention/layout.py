"""How the tokens of a global-attention call are laid out over views."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ViewLayout:
    """Token layout of a global-attention sequence of shape (B, heads, num_views * tokens_per_view, head_dim).

    Each view contributes ``tokens_per_view`` consecutive tokens; the first ``num_special`` of them are
    special tokens (camera/register) and the rest are patch tokens on a ``patch_grid`` (rows, cols) grid.
    ``records`` collects optional exports of sparse attention (see ``speed3r_sfm.attention.gsa``);
    ``None`` means nothing is recorded.
    """

    num_views: int
    tokens_per_view: int
    num_special: int
    patch_grid: tuple[int, int] | None = None
    records: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.num_views * self.tokens_per_view

    @property
    def num_patches(self) -> int:
        return self.tokens_per_view - self.num_special
