"""speed3r-sfm: fast feed-forward 3D reconstruction (VGGT, π³) with Global Sparse Attention, into COLMAP."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["reconstruct", "__version__"]

if TYPE_CHECKING:
    from .pipeline.reconstruct import reconstruct


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import speed3r_sfm` stays light (no pycolmap/kornia until needed).
    if name == "reconstruct":
        from .pipeline.reconstruct import reconstruct

        return reconstruct
    raise AttributeError(f"module 'speed3r_sfm' has no attribute {name!r}")
