"""π³ (Pi3) backbone."""

from .config import Pi3Config
from .heads import CameraHead, LinearPts3d, TransformerDecoder, svd_orthogonalize
from .model import Pi3, cam_from_world_from_c2w

__all__ = [
    "CameraHead",
    "LinearPts3d",
    "Pi3",
    "Pi3Config",
    "TransformerDecoder",
    "cam_from_world_from_c2w",
    "svd_orthogonalize",
]
