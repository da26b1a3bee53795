"""Patch correspondence supervision: which patch of view j sees the surface point at the centre of each
patch of view i (from ground-truth depth and poses), and an InfoNCE loss that makes the aggregator's patch
tokens of the same surface point agree across views.

A backbone trained from scratch on camera and depth losses alone learns depth but not relative pose
(benchmarks/results/default_model_diagnosis.md): nothing in those losses asks its global attention to find
the same point in another view. This loss asks for exactly that, densely: every patch of view i must pick
its match among all patches of view j.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..geometry import patch_centres, project_points


def correspondence_pairs(num_views: int, device: torch.device | None = None) -> torch.Tensor:
    """(K, 2) ordered view pairs supervised per sample: neighbours (i, i+1), (i+1, i) and view 0 with
    every view, both ways, without repeats. Empty for one view."""
    pairs = {(i, i + 1) for i in range(num_views - 1)} | {(0, j) for j in range(1, num_views)}
    pairs |= {(j, i) for i, j in pairs}
    return torch.tensor(sorted(pairs), dtype=torch.long, device=device).view(-1, 2)


@torch.no_grad()
def patch_correspondences(
    world_points: torch.Tensor,
    depth: torch.Tensor,
    valid: torch.Tensor,
    intrinsics: torch.Tensor,
    cam_from_world: torch.Tensor,
    pairs: torch.Tensor,
    patch: int,
    depth_tolerance: float = 0.05,
) -> torch.Tensor:
    """(B, K, P) patch of view j (row-major index) that sees the surface point at the centre pixel of each
    patch of view i, for each pair (i, j) of ``pairs`` (K, 2); -1 where that pixel has no valid depth, the
    point projects behind or outside view j, or view j's depth there differs by more than
    ``depth_tolerance`` (relative): occluded.

    world_points (B, S, H, W, 3), depth and valid (B, S, H, W), intrinsics (B, S, 3, 3), cam_from_world
    (B, S, 3, 4), all in one frame (e.g. :class:`~.losses.NormalizedTarget`).
    """
    b, s, h, w = depth.shape
    centres = patch_centres(h, w, patch, depth.device)
    cols = w // patch
    src, dst = pairs[:, 0], pairs[:, 1]
    points = world_points[:, :, centres[:, 0], centres[:, 1]]  # (B, S, P, 3)
    has_depth = valid[:, :, centres[:, 0], centres[:, 1]]  # (B, S, P)
    uv, z = project_points(
        points[:, src].double(), intrinsics[:, dst].double(), cam_from_world[:, dst].double()
    )
    x, y = uv[..., 0], uv[..., 1]
    inside = (z > 0) & (x > -0.5) & (x < w - 0.5) & (y > -0.5) & (y < h - 0.5)
    px = x.round().long().clamp(0, w - 1)
    py = y.round().long().clamp(0, h - 1)
    flat = (py * w + px).view(b, -1)
    target_depth = depth[:, dst].reshape(b, len(pairs), h * w)
    target_valid = valid[:, dst].reshape(b, len(pairs), h * w)
    seen_depth = torch.gather(target_depth, 2, flat.view(b, len(pairs), -1)).double()
    seen_valid = torch.gather(target_valid, 2, flat.view(b, len(pairs), -1))
    visible = seen_valid & ((z - seen_depth).abs() <= depth_tolerance * seen_depth)
    ok = has_depth[:, src] & inside & visible
    index = torch.div(py, patch, rounding_mode="floor") * cols + torch.div(px, patch, rounding_mode="floor")
    return torch.where(ok, index, torch.full_like(index, -1))


def correspondence_loss(
    tokens: torch.Tensor, matches: torch.Tensor, pairs: torch.Tensor, temperature: float = 0.07
) -> dict[str, torch.Tensor]:
    """InfoNCE over patches: for each matched patch of view i (``matches`` (B, K, P) from
    :func:`patch_correspondences`), cross-entropy of its cosine similarities (divided by ``temperature``)
    to all patches of view j, against the true match. ``tokens``: (B, S, P, C) patch tokens.

    Returns ``correspondence`` (mean cross-entropy; zero, with gradient, when nothing matches) and
    ``correspondence_accuracy`` (share of matched patches whose most similar patch is the true one).
    """
    features = F.normalize(tokens.float(), dim=-1)
    logits = features[:, pairs[:, 0]] @ features[:, pairs[:, 1]].transpose(-1, -2) / temperature
    mask = matches >= 0
    if not bool(mask.any()):
        zero = tokens.sum() * 0.0
        return {"correspondence": zero, "correspondence_accuracy": zero.detach()}
    picked, target = logits[mask], matches[mask]
    accuracy = (picked.argmax(-1) == target).float().mean()
    return {"correspondence": F.cross_entropy(picked, target), "correspondence_accuracy": accuracy.detach()}
