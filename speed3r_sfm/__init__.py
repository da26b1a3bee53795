"""speed3r-sfm: fast feed-forward 3D reconstruction (VGGT, π³) with Global Sparse Attention, into COLMAP."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
# what reconstruct() raises for what its caller can fix, by the module that defines it
_ERRORS = {
    "ReconstructionError": ".pipeline.reconstruct",
    "InputError": ".pipeline.inputs",
    "OutputExistsError": ".pipeline.export",
    "OutputPathError": ".pipeline.export",
    "ModelNotAvailableError": ".pipeline.backbone",
    "DeviceNotAvailableError": ".pipeline.backbone",
    "CheckpointError": ".models.checkpoint",
}
__all__ = [
    "CheckpointError",
    "DeviceNotAvailableError",
    "InputError",
    "ModelNotAvailableError",
    "OutputExistsError",
    "OutputPathError",
    "ReconstructionError",
    "__version__",
    "reconstruct",
]

if TYPE_CHECKING:
    from .models.checkpoint import CheckpointError
    from .pipeline.backbone import DeviceNotAvailableError, ModelNotAvailableError
    from .pipeline.export import OutputExistsError, OutputPathError
    from .pipeline.inputs import InputError
    from .pipeline.reconstruct import ReconstructionError, reconstruct


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import speed3r_sfm` stays light (no pycolmap/kornia until needed).
    if name == "reconstruct" or name in _ERRORS:
        import importlib

        module = _ERRORS.get(name, ".pipeline.reconstruct")
        return getattr(importlib.import_module(module, __name__), name)
    raise AttributeError(f"module 'speed3r_sfm' has no attribute {name!r}")
