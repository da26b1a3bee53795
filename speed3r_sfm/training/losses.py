"""Supervised losses of VGGT and π³ training.

Ground truth is first normalised as in both official trainings (:func:`normalize_ground_truth`): poses and
points are expressed in the first camera's frame, then depths, translations and points are divided by the
mean Euclidean norm of the valid points of the sample.

VGGT (``training/loss.py`` upstream, see /work/shared/reference section 3):

- camera: L1 between predicted and ground-truth 9-D pose encodings on every refinement iteration k of
  ``pose_enc_list`` with weight ``gamma**(n-1-k)``, averaged over iterations; per iteration
  ``T + R + 0.5 * FoV`` (translation error clamped at 100). Only samples whose first frame has more than
  ``min_valid_pixels`` valid depth pixels count.
- depth / points: :func:`regression_loss`, i.e. ``gamma * err * conf - alpha * log(conf)`` plus the plain
  error ``err`` (both with the top 2 % dropped by :func:`filter_by_quantile`) plus the multi-scale gradient
  loss :func:`gradient_loss_multi_scale`.

π³ (branch ``training`` upstream, reference section 4.7):

- local points: the prediction is divided by its mean local-point norm, aligned to the ground truth by the
  optimal scale (:func:`optimal_scale`, weighted least squares with weights 1/depth, detached), then L1
  per point weighted by 1/depth.
- camera: :func:`relative_pose_loss` over all ordered pairs i != j (Huber on the relative translation,
  geodesic angle of the relative rotation), translations scaled like the points.
- confidence: BCE-with-logits against inliers (relative point error below a threshold).

All functions take float tensors with a leading (B, S) and return scalars; criteria return a dict of
named terms plus ``"loss"``, the weighted total.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..geometry import compose_poses, depth_to_camera_points, depth_to_world_points, invert_pose
from ..models.vggt.pose_encoding import (
    extrinsics_intrinsics_to_pose_encoding,
    pose_encoding_to_extrinsics_intrinsics,
)
from .correspondence import correspondence_loss, correspondence_pairs, patch_correspondences

_QUANTILE_SAMPLE = 1 << 20


@dataclass
class NormalizedTarget:
    """Ground truth in the first camera's frame, divided by the per-sample ``scale``.

    Shapes: depth and valid (B, S, H, W); cam_from_world (B, S, 3, 4) (view 0 is the identity);
    intrinsics (B, S, 3, 3); world_points and camera_points (B, S, H, W, 3) (zero where invalid);
    scale (B,); sequence_valid (B,): the sample's first view has enough valid pixels, or the sample has
    no depth at all (its scale then comes from the camera centres).
    """

    depth: torch.Tensor
    valid: torch.Tensor
    cam_from_world: torch.Tensor
    intrinsics: torch.Tensor
    world_points: torch.Tensor
    camera_points: torch.Tensor
    scale: torch.Tensor
    sequence_valid: torch.Tensor

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.depth.shape[-2:])  # type: ignore[return-value]

    @property
    def camera_to_world(self) -> torch.Tensor:
        return invert_pose(self.cam_from_world)


def normalize_ground_truth(
    depth: torch.Tensor,
    intrinsics: torch.Tensor,
    cam_from_world: torch.Tensor,
    valid: torch.Tensor | None = None,
    min_valid_pixels: int = 100,
    scale_range: tuple[float, float] = (1e-6, 1e6),
) -> NormalizedTarget:
    """Normalise (B, S, H, W) z-depth (0 = invalid), (B, S, 3, 3) K and (B, S, 3, 4) cam_from_world.

    scale = mean norm of the valid points in the first camera's frame, clamped to ``scale_range``; for a
    sample without any valid depth, the mean distance of the camera centres from the first camera (1 if
    that is 0 too).
    """
    depth = depth.float() if depth.dtype not in (torch.float32, torch.float64) else depth
    dtype = depth.dtype
    intrinsics, cam_from_world = intrinsics.to(dtype), cam_from_world.to(dtype)
    if valid is None:
        valid = depth > 0
    valid = valid & (depth > 0) & torch.isfinite(depth)
    depth = torch.where(valid, depth, torch.zeros_like(depth))
    cam_from_first = compose_poses(cam_from_world, invert_pose(cam_from_world[:, :1]))
    points = depth_to_world_points(depth, intrinsics, cam_from_first)
    points = torch.where(valid[..., None], points, torch.zeros_like(points))

    count = valid.flatten(1).sum(1)
    mean_norm = points.norm(dim=-1).flatten(1).sum(1) / count.clamp_min(1)
    centres = invert_pose(cam_from_first)[..., :3, 3].norm(dim=-1).mean(1)
    fallback = torch.where(centres > 0, centres, torch.ones_like(centres))
    scale = torch.where(count > 0, mean_norm, fallback).clamp(*scale_range)

    s = scale.view(-1, 1, 1, 1)
    cam_from_first = torch.cat([cam_from_first[..., :3], cam_from_first[..., 3:] / s], dim=-1)
    world_points = points / s[..., None]
    camera_points = depth_to_camera_points(depth / s, intrinsics)
    camera_points = torch.where(valid[..., None], camera_points, torch.zeros_like(camera_points))
    first_ok = valid[:, 0].flatten(1).sum(1) > min_valid_pixels
    return NormalizedTarget(
        depth=depth / s,
        valid=valid,
        cam_from_world=cam_from_first,
        intrinsics=intrinsics,
        world_points=world_points,
        camera_points=camera_points,
        scale=scale,
        sequence_valid=first_ok | (count == 0),
    )


def _zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero that keeps the graph of ``tensors`` (so DDP sees every parameter used)."""
    return sum((t.sum() * 0.0 for t in tensors), torch.zeros((), device=tensors[0].device))


# --------------------------------------------------------------------------------------------------- VGGT


def camera_loss(
    pose_enc_list: list[torch.Tensor],
    gt_pose_enc: torch.Tensor,
    sequence_mask: torch.Tensor | None = None,
    gamma: float = 0.6,
    weight_translation: float = 1.0,
    weight_rotation: float = 1.0,
    weight_fov: float = 0.5,
    translation_clamp: float = 100.0,
) -> dict[str, torch.Tensor]:
    """VGGT's camera loss: L1 on the 9-D encodings of every iteration, weighted ``gamma**(n-1-k)`` and
    averaged over the n iterations. Returns ``translation``, ``rotation``, ``fov`` and ``camera`` (the
    weighted sum). ``sequence_mask`` (B,) selects the samples that count."""
    n = len(pose_enc_list)
    if n == 0:
        raise ValueError("camera_loss needs at least one pose encoding")
    if sequence_mask is not None and not bool(sequence_mask.any()):
        zero = _zero(*pose_enc_list)
        return {"translation": zero, "rotation": zero, "fov": zero, "camera": zero}
    gt = gt_pose_enc if sequence_mask is None else gt_pose_enc[sequence_mask]
    totals = torch.zeros(3, device=gt.device, dtype=gt.dtype)
    for k, pred in enumerate(pose_enc_list):
        pred = pred if sequence_mask is None else pred[sequence_mask]
        err = (pred.to(gt.dtype) - gt).abs()
        stage = torch.stack(
            [
                err[..., :3].clamp(max=translation_clamp).mean(),
                err[..., 3:7].mean(),
                err[..., 7:].mean(),
            ]
        )
        totals = totals + gamma ** (n - 1 - k) * stage
    translation, rotation, fov = totals / n
    total = weight_translation * translation + weight_rotation * rotation + weight_fov * fov
    return {"translation": translation, "rotation": rotation, "fov": fov, "camera": total}


def filter_by_quantile(
    values: torch.Tensor, quantile: float, hard_max: float = 100.0, min_elements: int = 1000
) -> torch.Tensor:
    """Drop the values at or above the ``quantile`` (and above ``hard_max``), as VGGT's
    ``filter_by_quantile``: kept unchanged when there are at most ``min_elements`` values or when fewer than
    ``min_elements`` would remain. The quantile (linear interpolation) is taken on at most 2**20 evenly
    strided values."""
    if not 0 < quantile < 1 or values.numel() <= min_elements:
        return values
    flat = values.detach().flatten()
    stride = -(-flat.numel() // _QUANTILE_SAMPLE)
    threshold = torch.quantile(flat[::stride].float(), quantile).clamp(max=hard_max)
    keep = values < threshold.to(values.dtype)
    if int(keep.sum()) > min_elements:
        return values[keep]
    return values


def gradient_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    conf: torch.Tensor | None = None,
    gamma: float = 1.0,
    alpha: float = 0.2,
    clamp: float = 100.0,
) -> torch.Tensor:
    """VGGT's gradient loss on (N, H, W, C) maps: masked L1 of the x and y finite differences of
    ``pred - target`` (pairs of valid pixels only, clamped at ``clamp``), optionally confidence-weighted,
    summed and divided by the number of valid values (N·H·W·C masked)."""
    mask = mask[..., None].expand_as(pred).to(pred.dtype)
    count = mask.sum()
    diff = (pred - target) * mask
    grad_x = (diff[:, :, 1:] - diff[:, :, :-1]).abs() * (mask[:, :, 1:] * mask[:, :, :-1])
    grad_y = (diff[:, 1:] - diff[:, :-1]).abs() * (mask[:, 1:] * mask[:, :-1])
    grad_x, grad_y = grad_x.clamp(max=clamp), grad_y.clamp(max=clamp)
    if conf is not None:
        conf = conf[..., None].expand_as(pred)
        conf_x, conf_y = conf[:, :, 1:], conf[:, 1:]
        grad_x = gamma * grad_x * conf_x - alpha * torch.log(conf_x)
        grad_y = gamma * grad_y * conf_y - alpha * torch.log(conf_y)
    if count == 0:
        return _zero(pred)
    return (grad_x.sum() + grad_y.sum()) / count


def gradient_loss_multi_scale(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    scales: int = 4,
    conf: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of :func:`gradient_loss` over ``scales`` subsamplings with steps 1, 2, 4, ... of (N, H, W, C)."""
    total = _zero(pred)
    for scale in range(scales):
        step = 2**scale
        total = total + gradient_loss(
            pred[:, ::step, ::step],
            target[:, ::step, ::step],
            mask[:, ::step, ::step],
            conf=None if conf is None else conf[:, ::step, ::step],
        )
    return total / max(scales, 1)


def regression_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    conf: torch.Tensor,
    gamma: float = 1.0,
    alpha: float = 0.2,
    valid_range: float = 0.98,
    gradient_scales: int = 4,
    gradient_with_conf: bool = False,
) -> dict[str, torch.Tensor]:
    """VGGT's confidence-aware regression of (B, S, H, W, C) maps with (B, S, H, W) ``mask`` and ``conf``.

    ``reg`` = mean ‖target − pred‖ over valid pixels, ``conf`` = mean (gamma·err·conf − alpha·log conf),
    both after :func:`filter_by_quantile` with ``valid_range`` (≤ 0 disables), and ``grad`` =
    :func:`gradient_loss_multi_scale` (0 scales disables). ``total`` = conf + reg + grad.
    """
    err = torch.linalg.vector_norm(target[mask] - pred[mask], dim=-1)
    if err.numel() == 0:
        zero = _zero(pred, conf)
        return {"conf": zero, "reg": zero, "grad": zero, "total": zero}
    c = conf[mask]
    loss_conf = gamma * err * c - alpha * torch.log(c)
    loss_conf = filter_by_quantile(loss_conf, valid_range).mean()
    loss_reg = filter_by_quantile(err, valid_range).mean()
    if gradient_scales > 0:
        b, s, h, w, ch = pred.shape
        loss_grad = gradient_loss_multi_scale(
            pred.reshape(b * s, h, w, ch),
            target.reshape(b * s, h, w, ch),
            mask.reshape(b * s, h, w),
            scales=gradient_scales,
            conf=conf.reshape(b * s, h, w) if gradient_with_conf else None,
        )
    else:
        loss_grad = _zero(pred)
    return {"conf": loss_conf, "reg": loss_reg, "grad": loss_grad, "total": loss_conf + loss_reg + loss_grad}


# ------------------------------------------------------------------------------------------ π³ / pairs


def rotation_geodesic(r1: torch.Tensor, r2: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Angle (radians) between rotations (..., 3, 3) as atan2(sin, cos) of r1ᵀ r2: cos = (tr − 1) / 2 and
    sin = |skew part| / 2 (regularised by ``eps`` so that the gradient is finite at zero angle)."""
    rel = r1.transpose(-1, -2) @ r2
    cos = (rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0
    skew = torch.stack(
        [rel[..., 2, 1] - rel[..., 1, 2], rel[..., 0, 2] - rel[..., 2, 0], rel[..., 1, 0] - rel[..., 0, 1]],
        -1,
    )
    sin = torch.sqrt(skew.square().sum(-1) + eps) / 2.0
    return torch.atan2(sin, cos)


def relative_poses(camera_to_world: torch.Tensor) -> torch.Tensor:
    """(B, N, 3|4, 4) camera-to-world poses → (B, N, N, 3, 4) ``inv(P_i) · P_j`` (camera j in camera i)."""
    pose = camera_to_world[..., :3, :4]
    inverse = invert_pose(pose)
    return compose_poses(inverse[:, :, None], pose[:, None, :])


def relative_pose_loss(
    pred_camera_to_world: torch.Tensor,
    gt_camera_to_world: torch.Tensor,
    pred_translation_scale: torch.Tensor | None = None,
    sequence_mask: torch.Tensor | None = None,
    huber_delta: float = 0.1,
    translation_weight: float = 100.0,
    rotation_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """π³'s camera loss over all ordered pairs i != j of relative poses ``inv(P_i) P_j``.

    ``translation`` = mean over pairs of the Huber(``huber_delta``) loss of the relative translation,
    summed over x, y, z (predicted translations multiplied by ``pred_translation_scale`` (B,) first);
    ``rotation`` = mean geodesic angle (radians) between the relative rotations.
    ``relative_pose`` = translation_weight · translation + rotation_weight · rotation.
    """
    pred = pred_camera_to_world[..., :3, :4]
    if pred_translation_scale is not None:
        scale = pred_translation_scale.to(pred.dtype).view(-1, 1, 1, 1)
        pred = torch.cat([pred[..., :3], pred[..., 3:] * scale], dim=-1)
    gt = gt_camera_to_world[..., :3, :4].to(pred.dtype)
    if sequence_mask is not None:
        if not bool(sequence_mask.any()):
            zero = _zero(pred_camera_to_world)
            return {"rel_translation": zero, "rel_rotation": zero, "relative_pose": zero}
        pred, gt = pred[sequence_mask], gt[sequence_mask]
    n = pred.shape[1]
    if n < 2:
        raise ValueError("relative_pose_loss needs at least two views")
    off = ~torch.eye(n, dtype=torch.bool, device=pred.device)
    rel_pred, rel_gt = relative_poses(pred)[:, off], relative_poses(gt)[:, off]
    translation = F.huber_loss(rel_pred[..., 3], rel_gt[..., 3], reduction="none", delta=huber_delta)
    translation = translation.sum(-1).mean()
    rotation = rotation_geodesic(rel_pred[..., :3], rel_gt[..., :3]).mean()
    total = translation_weight * translation + rotation_weight * rotation
    return {"rel_translation": translation, "rel_rotation": rotation, "relative_pose": total}


def optimal_scale(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Per sample s = Σ w·⟨p, g⟩ / Σ w·⟨p, p⟩ over masked pixels, the weighted least-squares scale that maps
    (B, S, H, W, 3) ``pred`` onto ``target`` (no gradient). 1 for a sample without valid pixel."""
    with torch.no_grad():
        w = (weight * mask).flatten(1)
        num = (w * (pred * target).sum(-1).flatten(1)).sum(1)
        den = (w * pred.square().sum(-1).flatten(1)).sum(1)
        return torch.where(den > eps, num / den.clamp_min(eps), torch.ones_like(den))


def pi3_point_loss(
    pred_local_points: torch.Tensor,
    target: NormalizedTarget,
    conf_logits: torch.Tensor | None = None,
    min_depth: float = 0.01,
    inlier_threshold: float = 0.02,
) -> dict[str, torch.Tensor]:
    """π³'s local-point loss (and confidence BCE) for (B, S, H, W, 3) predicted camera-frame points.

    The prediction is divided by its mean norm over valid pixels (``pred_norm``), then scaled by
    :func:`optimal_scale` (weights 1/depth). ``points`` = Σ |s·p − g|₁ / max(z, min_depth) over valid pixels,
    divided by their number. ``conf`` = BCE-with-logits against ``|s·p − g| / z < inlier_threshold`` over
    valid pixels. Also returns ``scale`` = s / pred_norm (B,), the factor that maps predicted translations
    to the normalised ground truth.
    """
    mask = target.valid
    gt = target.camera_points.to(pred_local_points.dtype)
    count = mask.flatten(1).sum(1).clamp_min(1)
    pred_norm = (pred_local_points.norm(dim=-1) * mask).flatten(1).sum(1) / count
    pred_norm = pred_norm.clamp_min(1e-6)
    pred = pred_local_points / pred_norm.view(-1, 1, 1, 1, 1)
    inv_depth = 1.0 / target.depth.clamp_min(min_depth)
    s = optimal_scale(pred, gt, inv_depth, mask)
    aligned = pred * s.view(-1, 1, 1, 1, 1)
    err = (aligned - gt).abs().sum(-1) * inv_depth
    total_valid = mask.sum()
    if total_valid == 0:
        zero = _zero(pred_local_points)
        return {"points": zero, "conf": zero, "scale": (s / pred_norm).detach()}
    points = (err * mask).sum() / total_valid
    out = {"points": points, "scale": (s / pred_norm).detach()}
    if conf_logits is not None:
        with torch.no_grad():
            rel = (aligned - gt).norm(dim=-1) * inv_depth
            inlier = (rel < inlier_threshold).to(conf_logits.dtype)
        logits = conf_logits[..., 0] if conf_logits.dim() == pred.dim() else conf_logits
        out["conf"] = F.binary_cross_entropy_with_logits(logits[mask], inlier[mask])
    return out


# ----------------------------------------------------------------------------------------------- criteria


@dataclass
class LossConfig:
    """Loss weights and settings (defaults: the official trainings).

    VGGT: ``camera`` (5.0), ``depth`` (1.0), ``point`` (1.0; only if the model has a point head);
    π³: ``point`` (local points, 1.0), ``pi3_conf`` (0.05). ``relative_pose``: weight of
    :func:`relative_pose_loss`; None means 0.1 for π³ and 0 for VGGT (decoded from ``pose_enc``).
    ``correspondence`` (VGGT, default 0): weight of the patch-matching InfoNCE
    (:mod:`.correspondence`) on the aggregator outputs of ``correspondence_layers`` (layers the model
    keeps in training: its DPT layers and the last).
    """

    camera: float = 5.0
    depth: float = 1.0
    point: float = 1.0
    relative_pose: float | None = None
    pi3_conf: float = 0.05
    camera_gamma: float = 0.6
    fov_weight: float = 0.5
    conf_gamma: float = 1.0
    conf_alpha: float = 0.2
    valid_range: float = 0.98
    gradient_scales: int = 4
    min_valid_pixels: int = 100
    huber_delta: float = 0.1
    relative_translation_weight: float = 100.0
    pi3_min_depth: float = 0.01
    pi3_inlier_threshold: float = 0.02
    correspondence: float = 0.0
    correspondence_layers: tuple[int, ...] = (1, 3)
    correspondence_temperature: float = 0.07
    correspondence_depth_tolerance: float = 0.05

    @classmethod
    def from_any(cls, value: LossConfig | dict[str, Any] | None) -> LossConfig:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        data = dict(value)
        if "correspondence_layers" in data:  # a list in a checkpoint's or YAML's hyper-parameters
            data["correspondence_layers"] = tuple(data["correspondence_layers"])
        return cls(**data)


class VGGTCriterion:
    """VGGT's multitask loss on the output dict of :class:`~speed3r_sfm.models.vggt.VGGT`."""

    def __init__(self, config: LossConfig | None = None) -> None:
        self.config = config or LossConfig()

    def __call__(self, pred: dict[str, Any], target: NormalizedTarget) -> dict[str, torch.Tensor]:
        c = self.config
        terms: dict[str, torch.Tensor] = {}
        total = None

        def add(name: str, weight: float, value: torch.Tensor) -> None:
            nonlocal total
            terms[name] = value
            total = weight * value if total is None else total + weight * value

        if "pose_enc_list" in pred and c.camera > 0:
            gt_enc = extrinsics_intrinsics_to_pose_encoding(
                target.cam_from_world, target.intrinsics, target.image_size
            )
            cam = camera_loss(
                [p.float() for p in pred["pose_enc_list"]],
                gt_enc.float(),
                target.sequence_valid,
                gamma=c.camera_gamma,
                weight_fov=c.fov_weight,
            )
            terms.update({f"camera_{k}": v for k, v in cam.items() if k != "camera"})
            add("camera", c.camera, cam["camera"])
        relative = 0.0 if c.relative_pose is None else c.relative_pose
        if "pose_enc" in pred and relative > 0:
            cam_from_world, _ = pose_encoding_to_extrinsics_intrinsics(
                pred["pose_enc"].float(), target.image_size
            )
            rel = relative_pose_loss(
                invert_pose(cam_from_world),
                target.camera_to_world,
                sequence_mask=target.sequence_valid,
                huber_delta=c.huber_delta,
                translation_weight=c.relative_translation_weight,
            )
            terms.update({k: v for k, v in rel.items() if k != "relative_pose"})
            add("relative_pose", relative, rel["relative_pose"])
        for key, conf_key, gt, name, weight in (
            ("depth", "depth_conf", target.depth[..., None], "depth", c.depth),
            ("world_points", "world_points_conf", target.world_points, "point", c.point),
        ):
            if key not in pred or weight <= 0:
                continue
            reg = regression_loss(
                pred[key].float(),
                gt.float(),
                target.valid,
                pred[conf_key].float(),
                gamma=c.conf_gamma,
                alpha=c.conf_alpha,
                valid_range=c.valid_range,
                gradient_scales=c.gradient_scales,
            )
            terms.update({f"{name}_{k}": v for k, v in reg.items() if k != "total"})
            add(name, weight, reg["total"])
        if c.correspondence > 0:
            corr = self._correspondence(pred, target)
            terms["correspondence_accuracy"] = corr["correspondence_accuracy"]
            add("correspondence", c.correspondence, corr["correspondence"])
        if total is None:
            raise ValueError("no loss term applies: check the loss weights and the model's heads")
        terms["loss"] = total
        return terms

    def _correspondence(self, pred: dict[str, Any], target: NormalizedTarget) -> dict[str, torch.Tensor]:
        """Patch-matching InfoNCE averaged over ``correspondence_layers``."""
        c = self.config
        if "aggregated_tokens_list" not in pred:
            raise ValueError("the correspondence loss needs the aggregator outputs: train the VGGT model")
        outputs, start, patch = pred["aggregated_tokens_list"], pred["patch_start_idx"], pred["patch_size"]
        pairs = correspondence_pairs(target.depth.shape[1], target.depth.device)
        matches = patch_correspondences(
            target.world_points,
            target.depth,
            target.valid,
            target.intrinsics,
            target.cam_from_world,
            pairs,
            patch,
            c.correspondence_depth_tolerance,
        )
        matches = torch.where(target.sequence_valid.view(-1, 1, 1), matches, torch.full_like(matches, -1))
        losses, accuracies = [], []
        for layer in c.correspondence_layers:
            tokens = outputs[layer]
            if tokens is None:
                raise ValueError(f"aggregator layer {layer} is not kept in training; use a DPT layer or -1")
            out = correspondence_loss(tokens[:, :, start:], matches, pairs, c.correspondence_temperature)
            losses.append(out["correspondence"])
            accuracies.append(out["correspondence_accuracy"])
        return {
            "correspondence": torch.stack(losses).mean(),
            "correspondence_accuracy": torch.stack(accuracies).mean(),
        }


class Pi3Criterion:
    """π³'s loss on the output dict of :class:`~speed3r_sfm.models.pi3.Pi3`."""

    def __init__(self, config: LossConfig | None = None) -> None:
        self.config = config or LossConfig()

    def __call__(self, pred: dict[str, Any], target: NormalizedTarget) -> dict[str, torch.Tensor]:
        c = self.config
        pts = pi3_point_loss(
            pred["local_points"].float(),
            target,
            pred["conf"].float() if c.pi3_conf > 0 else None,
            min_depth=c.pi3_min_depth,
            inlier_threshold=c.pi3_inlier_threshold,
        )
        total = c.point * pts["points"]
        terms = {"points": pts["points"]}
        if "conf" in pts:
            terms["conf"] = pts["conf"]
            total = total + c.pi3_conf * pts["conf"]
        relative = 0.1 if c.relative_pose is None else c.relative_pose
        if relative > 0:
            rel = relative_pose_loss(
                pred["camera_poses"].float(),
                target.camera_to_world,
                pred_translation_scale=pts["scale"],
                sequence_mask=target.sequence_valid,
                huber_delta=c.huber_delta,
                translation_weight=c.relative_translation_weight,
            )
            terms.update(rel)
            total = total + relative * rel["relative_pose"]
        terms["loss"] = total
        return terms


def build_criterion(model_name: str, config: LossConfig | None = None) -> VGGTCriterion | Pi3Criterion:
    if model_name == "vggt":
        return VGGTCriterion(config)
    if model_name == "pi3":
        return Pi3Criterion(config)
    raise ValueError(f"no criterion for model {model_name!r}")


__all__ = [
    "LossConfig",
    "NormalizedTarget",
    "Pi3Criterion",
    "VGGTCriterion",
    "build_criterion",
    "camera_loss",
    "filter_by_quantile",
    "gradient_loss",
    "gradient_loss_multi_scale",
    "normalize_ground_truth",
    "optimal_scale",
    "pi3_point_loss",
    "regression_loss",
    "relative_pose_loss",
    "relative_poses",
    "rotation_geodesic",
]
