"""Configuration of the global attention of a backbone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class AttentionConfig:
    """Which attention the global blocks use.

    ``kind`` is "dense" (SDPA) or "gsa" (Global Sparse Attention). ``gsa_layers`` restricts GSA to
    some global-block indices (None: all); the other global blocks stay dense.
    """

    kind: Literal["dense", "gsa"] = "dense"
    gsa_layers: tuple[int, ...] | None = None

    def uses_gsa(self, layer_index: int) -> bool:
        if self.kind != "gsa":
            return False
        return self.gsa_layers is None or layer_index in self.gsa_layers
