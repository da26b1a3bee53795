"""speed3r-sfm: fast feed-forward 3D reconstruction (VGGT, π³) with Global Sparse Attention, into COLMAP."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ReconstructionError", "reconstruct", "__version__"]

if TYPE_CHECKING:
    from .pipeline.reconstruct import ReconstructionError, reconstruct


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import speed3r_sfm` stays light (no pycolmap/kornia until needed).
    if name in ("reconstruct", "ReconstructionError"):
        import importlib

        return getattr(importlib.import_module(".pipeline.reconstruct", __name__), name)
    raise AttributeError(f"module 'speed3r_sfm' has no attribute {name!r}")
