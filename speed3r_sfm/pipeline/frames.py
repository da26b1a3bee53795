"""Pixel frames of one view and the predicted geometry at model resolution.

Three pixel frames per view, all continuous (x = column, y = row):

- *work*: the downscaled RGB copy that keypoints and refinement use; integer-centre convention
  (pixel (i, j) centred at (j, i)), the convention of kornia / ``grid_sample(align_corners=True)``;
- *model*: the backbone input, integer-centre convention like ``Prediction.intrinsics``;
- *original*: the upright input image in COLMAP's convention (top-left pixel centre at (0.5, 0.5)).

work -> original is a pure scale in COLMAP's convention; original -> model is the view's
:class:`~speed3r_sfm.data.images.ImageTransform`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.geometry.camera import project_points as kornia_project_points
from kornia.geometry.camera import unproject_points

from speed3r_sfm.geometry import invert_pose
from speed3r_sfm.models.prediction import Prediction

from .inputs import View


def work_to_original(view: View, xy: torch.Tensor) -> torch.Tensor:
    """(..., 2) work pixels (integer centres) -> original pixels (COLMAP convention), float64."""
    sx, sy = view.work_scale
    scale = torch.tensor([sx, sy], dtype=torch.float64)
    return (xy.to(torch.float64) + 0.5) / scale


def original_to_work(view: View, xy: torch.Tensor) -> torch.Tensor:
    """(..., 2) original pixels (COLMAP convention) -> work pixels (integer centres), float64."""
    sx, sy = view.work_scale
    return xy.to(torch.float64) * torch.tensor([sx, sy], dtype=torch.float64) - 0.5


def work_to_model(view: View, xy: torch.Tensor) -> torch.Tensor:
    """(..., 2) work pixels -> model pixels (both integer centres), float64."""
    return view.transform.from_original(work_to_original(view, xy), "colmap") - 0.5


def model_to_work(view: View, xy: torch.Tensor) -> torch.Tensor:
    """(..., 2) model pixels -> work pixels (both integer centres), float64."""
    original = view.transform.to_original(xy.to(torch.float64) + 0.5, "colmap")
    return original_to_work(view, original)


def intrinsics_to_original(view: View, intrinsics: torch.Tensor) -> torch.Tensor:
    """(3, 3) K of the model input (integer centres) -> K of the original image in COLMAP's convention."""
    k = view.transform.intrinsics_to_original(intrinsics.to(torch.float64), "integer")
    k[..., 0, 2] += 0.5
    k[..., 1, 2] += 0.5
    return k


def work_pixels_per_model_pixel(view: View) -> tuple[float, float]:
    """(sx, sy): how many work pixels one model pixel spans."""
    tx, ty = view.transform.scale
    wx, wy = view.work_scale
    return wx / tx, wy / ty


def apply_pose(pose: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``R @ p + t`` for a (3, 4) pose and points (N, 3), written elementwise: BLAS calls on 3 x 3 matrices
    are slow under CPU contention."""
    return (points[:, None, :] * pose[None, :, :3]).sum(-1) + pose[:, 3]


@dataclass
class SceneGeometry:
    """Predicted geometry of S views at model resolution (H, W), float64 cameras."""

    intrinsics: torch.Tensor  # (S, 3, 3) integer-centre convention
    cam_from_world: torch.Tensor  # (S, 3, 4)
    depth: torch.Tensor  # (S, H, W) float32 z-depth
    confidence: torch.Tensor  # (S, H, W) float32, higher is better

    @classmethod
    def from_prediction(cls, prediction: Prediction) -> SceneGeometry:
        if prediction.depth.shape[0] != 1:
            raise ValueError(f"expected a Prediction with batch size 1, got {prediction.depth.shape[0]}")
        p = prediction.to("cpu")
        return cls(
            intrinsics=p.intrinsics[0].to(torch.float64),
            cam_from_world=p.cam_from_world[0].to(torch.float64),
            depth=p.depth[0].float(),
            confidence=p.depth_conf[0].float(),
        )

    @property
    def num_views(self) -> int:
        return self.depth.shape[0]

    def sanitize_intrinsics(self, min_ratio: float = 0.1, max_ratio: float = 10.0) -> list[int]:
        """Replace unusable predicted intrinsics in place; returns the views that were fixed.

        A focal length that is not finite or outside [min_ratio, max_ratio] x the image's long side becomes
        the median of the usable ones (1.2 x the long side if none is usable, COLMAP's prior); a non-finite
        principal point becomes the image centre.
        """
        height, width = self.image_size
        size = max(height, width)
        k = self.intrinsics
        focal = torch.stack([k[:, 0, 0], k[:, 1, 1]], 1)
        usable = torch.isfinite(focal) & (focal >= min_ratio * size) & (focal <= max_ratio * size)
        fallback = focal[usable].median() if usable.any() else torch.tensor(1.2 * size, dtype=k.dtype)
        bad_focal = ~usable.all(dim=1)
        k[bad_focal, 0, 0] = fallback
        k[bad_focal, 1, 1] = fallback
        k[bad_focal, 0, 1] = 0.0
        centre = torch.tensor([(width - 1) / 2, (height - 1) / 2], dtype=k.dtype)
        bad_centre = ~torch.isfinite(k[:, :2, 2]).all(dim=1)
        k[bad_centre, :2, 2] = centre
        return (bad_focal | bad_centre).nonzero()[:, 0].tolist()

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.depth.shape[-2:])  # type: ignore[return-value]

    def world_from_cam(self) -> torch.Tensor:
        return invert_pose(self.cam_from_world)

    def sample(self, maps: torch.Tensor, view: int, xy: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
        """Values of ``maps[view]`` (H, W) at model pixels ``xy`` (N, 2); NaN outside the map."""
        h, w = maps.shape[-2:]
        grid = torch.stack([2 * xy[:, 0] / max(w - 1, 1) - 1, 2 * xy[:, 1] / max(h - 1, 1) - 1], -1)
        out = F.grid_sample(
            maps[view][None, None].float(), grid[None, None].float(), mode=mode, align_corners=True
        )[0, 0, 0]
        inside = (xy[:, 0] >= -0.5) & (xy[:, 0] <= w - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] <= h - 0.5)
        return torch.where(inside, out, torch.full_like(out, float("nan")))

    def unproject(self, view: int, xy: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """World points (N, 3) float64 of model pixels ``xy`` (N, 2) at z-depths ``depth`` (N,)."""
        k = self.intrinsics[view].expand(xy.shape[0], 3, 3)
        cam = unproject_points(xy.double(), depth.double()[:, None], k)
        return apply_pose(invert_pose(self.cam_from_world[view]), cam)

    def project(self, view: int, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model pixels (N, 2) and z-depth (N,) of world points (N, 3) in ``view``."""
        cam = apply_pose(self.cam_from_world[view], points.double())
        k = self.intrinsics[view].expand(cam.shape[0], 3, 3)
        return kornia_project_points(cam, k), cam[:, 2]
