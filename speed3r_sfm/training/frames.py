"""Fitting frames of any size to the model's input size, with intrinsics and depth kept consistent.

A frame is resized (aspect kept) so that it covers the target (H, W), then centre-cropped. Intrinsics
follow the integer-centre convention of ``speed3r_sfm.geometry`` (resizing maps pixel edges to edges,
then the crop shifts the principal point); depth is resized with nearest-exact sampling (no blending
across depth edges; z-depth values do not change with the image size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..geometry import resize_intrinsics


def cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an image of ``size`` resized with its aspect kept to cover ``target`` (H, W)."""
    h, w = size
    scale = max(target[0] / h, target[1] / w)
    return max(target[0], round(h * scale)), max(target[1], round(w * scale))


def fit_frame(
    image: torch.Tensor,
    intrinsics: torch.Tensor,
    target: tuple[int, int],
    depth: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(3, h, w) image in [0, 1], (3, 3) K and optional (h, w) depth → the same at ``target`` (H, W).

    Returns float32 image (antialiased bilinear resize), K (dtype of the input) and depth (or None).
    """
    h, w = image.shape[-2:]
    rh, rw = cover_size((h, w), target)
    if (rh, rw) != (h, w):
        image = F.interpolate(
            image[None].float(), size=(rh, rw), mode="bilinear", antialias=True, align_corners=False
        )[0]
        if depth is not None:
            depth = F.interpolate(depth[None, None].float(), size=(rh, rw), mode="nearest-exact")[0, 0]
        intrinsics = resize_intrinsics(intrinsics, (h, w), (rh, rw))
    top, left = (rh - target[0]) // 2, (rw - target[1]) // 2
    image = image[:, top : top + target[0], left : left + target[1]].float().clamp(0.0, 1.0)
    if depth is not None:
        depth = depth[top : top + target[0], left : left + target[1]].float()
    intrinsics = intrinsics.clone()
    intrinsics[0, 2] -= left
    intrinsics[1, 2] -= top
    return image.contiguous(), intrinsics, None if depth is None else depth.contiguous()
