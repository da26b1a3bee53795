"""Training, fine-tuning and distillation of the backbones with Lightning.

- :mod:`.losses`: VGGT and π³ losses and ground-truth normalisation.
- :mod:`.distill`: distillation of a GSA student from a frozen dense teacher.
- :mod:`.module`: :class:`ReconstructionModule` (LightningModule).
- :mod:`.data`: :class:`ReconstructionDataModule` (synthetic on-device rendering, COLMAP datasets,
  HDF5 frame cache, variable views per batch, view-consistent augmentation).
- :mod:`.backbone`: building, loading and exporting backbones.
- :mod:`.cli`: ``fit_main`` (LightningCLI); :mod:`.runner`: the same configs without jsonargparse.

``from speed3r_sfm.training import ReconstructionModule, ReconstructionDataModule`` imports Lightning on
first use (``import speed3r_sfm.training`` alone does not).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {"ReconstructionModule": ".module", "ReconstructionDataModule": ".data", "fit_main": ".cli"}
__all__ = ["ReconstructionDataModule", "ReconstructionModule", "fit_main"]

if TYPE_CHECKING:
    from .cli import fit_main
    from .data import ReconstructionDataModule
    from .module import ReconstructionModule


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'speed3r_sfm.training' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
