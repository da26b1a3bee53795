"""One prediction type for every backbone, so the pipeline never branches on the model."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass
class Prediction:
    """Per-view geometry predicted for one sequence of S views at model resolution (H, W).

    All tensors have a leading batch dimension B.
    - ``cam_from_world``: (B, S, 3, 4) OpenCV camera-from-world [R|t] (x right, y down, z forward).
    - ``intrinsics``: (B, S, 3, 3) pinhole K in pixels of the model input (pixel centres at integer + 0.5
      convention is NOT applied: pixel (u, v) has its centre at (u, v), so the image centre is
      ((W - 1)/2, (H - 1)/2)).
    - ``depth``, ``depth_conf``: (B, S, H, W); confidences are "higher is better" (any positive scale).
    - ``world_points``, ``world_points_conf``: (B, S, H, W, 3) and (B, S, H, W).
    - ``attention``: optional exports of sparse global attention (token-block importance, selected blocks).
    - ``extras``: backbone-specific raw outputs (e.g. VGGT's ``pose_enc_list``, Pi3's ``local_points``).
    """

    cam_from_world: torch.Tensor
    intrinsics: torch.Tensor
    depth: torch.Tensor
    depth_conf: torch.Tensor
    world_points: torch.Tensor
    world_points_conf: torch.Tensor
    attention: list[dict[str, Any]] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the model input."""
        return tuple(self.depth.shape[-2:])  # type: ignore[return-value]

    @property
    def num_views(self) -> int:
        return self.depth.shape[1]

    def to(self, device: torch.device | str) -> Prediction:
        """A copy with every tensor moved to ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return Prediction(**moved)
