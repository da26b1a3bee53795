"""Score reconstructions of synthetic scenes against their ground truth.

One Sim(3) per scene, the Umeyama fit of predicted to ground-truth camera centres (the ATE alignment), maps
the prediction into the ground-truth world for the point-cloud metrics as well; the same rule serves
dense models and sparse SfM. Depth is scored per image after median scaling (see ``depth_errors``).
Views a method failed to reconstruct (``registered == False``) enter the pose metrics as failed pairs
(errors = inf), are left out of the ATE fit and residual, and ``registered`` reports their share.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from speed3r_sfm.data.synthetic import RenderedViews
from speed3r_sfm.geometry import apply_sim3, sim3_cam_from_world
from speed3r_sfm.models.prediction import Prediction

from .metrics import (
    absolute_trajectory_error,
    accuracy_at,
    accuracy_completeness,
    depth_errors,
    pose_auc,
    relative_pose_errors,
)

Predictor = Callable[[torch.Tensor], Prediction]
"""Takes images (1, S, 3, H, W) in [0, 1] and returns a Prediction with B = 1 at the same (H, W)."""

POSE_THRESHOLDS = (5, 30)


@dataclass
class SceneResult:
    """Metrics of one method on one scene, plus the raw pair errors (for pooled AUC over scenes)."""

    seed: int
    metrics: dict[str, float]
    rre: torch.Tensor
    rte: torch.Tensor
    time_s: float
    extras: dict = field(default_factory=dict)


def evaluate_reconstruction(
    gt: RenderedViews,
    cam_from_world: torch.Tensor,
    registered: torch.Tensor | None = None,
    depth: torch.Tensor | None = None,
    points: torch.Tensor | None = None,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Metrics of a reconstruction of the S views in ``gt``: poses (S, 3, 4), optional per-view
    ``registered`` mask, depth maps (S, H, W) and a point cloud (..., 3) in the predicted world frame.
    Returns (metrics, RRE, RTE); metrics a method cannot provide are NaN."""
    s = gt.cam_from_world.shape[0]
    reg = torch.ones(s, dtype=torch.bool) if registered is None else registered.cpu().bool()
    rre, rte = relative_pose_errors(cam_from_world, gt.cam_from_world, reg)
    m: dict[str, float] = {}
    for tau in POSE_THRESHOLDS:
        m[f"RRA@{tau}"] = accuracy_at(rre, tau)
        m[f"RTA@{tau}"] = accuracy_at(rte, tau)
    for tau in POSE_THRESHOLDS:
        m[f"AUC@{tau}"] = pose_auc(rre, rte, tau)
    m["registered"] = float(reg.double().mean())
    m.update({"ATE": math.nan, "AbsRel": math.nan, "delta<1.25": math.nan, "Acc": math.nan, "Comp": math.nan})
    if int(reg.sum()) >= 3:
        m["ATE"], sim3 = absolute_trajectory_error(cam_from_world, gt.cam_from_world, reg)
        if points is not None and points.numel():
            gt_valid = gt.depth.cpu() > 0
            gt_points = gt.world_points().cpu()[gt_valid]
            aligned = apply_sim3(*sim3, points.reshape(-1, 3).double().cpu())
            pc = accuracy_completeness(aligned[torch.isfinite(aligned).all(-1)], gt_points)
            m["Acc"], m["Comp"] = pc["accuracy"], pc["completeness"]
    if depth is not None:
        d = depth_errors(depth.cpu(), gt.depth.cpu(), align="median")
        m["AbsRel"], m["delta<1.25"] = d["abs_rel"], d["delta_1.25"]
    return m, rre, rte


def evaluate_predictor(predict: Predictor, gt: RenderedViews, seed: int = -1) -> SceneResult:
    """Run ``predict`` on the rendered images (timed, wall clock) and score its Prediction."""
    images = gt.images[None]
    start = time.perf_counter()
    pred = predict(images)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if pred.cam_from_world.shape[:2] != (1, images.shape[1]):
        raise ValueError(
            f"the predictor returned poses of shape {tuple(pred.cam_from_world.shape)} for {images.shape[1]} "
            "views; expected (1, S, 3, 4)"
        )
    if pred.image_size != gt.image_size:
        raise ValueError(f"the predictor returned maps of size {pred.image_size}, expected {gt.image_size}")
    pred = pred.to("cpu")
    metrics, rre, rte = evaluate_reconstruction(
        gt, pred.cam_from_world[0], depth=pred.depth[0], points=pred.world_points[0]
    )
    return SceneResult(seed, metrics, rre, rte, elapsed)


def oracle_predictor(
    gt: RenderedViews, seed: int = 0, rotation_noise_deg: float = 0.0, translation_noise: float = 0.0
) -> Predictor:
    """A Predictor that returns the ground truth in a random world frame and scale (a random Sim(3)), to
    test the harness: every metric must be perfect. Optional Gaussian noise on the camera rotations
    (degrees) and centres (ground-truth units) makes it imperfect in a controlled way."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))[0]
    rot = q * torch.sign(torch.det(q))
    scale = torch.exp(torch.empty((), dtype=torch.float64).uniform_(-1.0, 1.0, generator=gen))
    trans = torch.randn(3, generator=gen, dtype=torch.float64) * 5.0
    cam = gt.cam_from_world.double().cpu()
    if rotation_noise_deg or translation_noise:
        s = cam.shape[0]
        axis_angle = torch.randn(s, 3, generator=gen, dtype=torch.float64) * math.radians(rotation_noise_deg)
        r_noise = axis_angle_to_rotation_matrix(axis_angle)
        centres = -(cam[:, :, :3].transpose(1, 2) @ cam[:, :, 3:])[..., 0]
        centres = centres + torch.randn(s, 3, generator=gen, dtype=torch.float64) * translation_noise
        new_r = r_noise @ cam[:, :, :3]
        cam = torch.cat([new_r, -(new_r @ centres[..., None])], dim=-1)
    pred_cam = sim3_cam_from_world(scale, rot, trans, cam).float()
    depth = (gt.depth.cpu() * scale).float()
    points = apply_sim3(scale, rot, trans, gt.world_points().cpu().double()).float()

    def predict(images: torch.Tensor) -> Prediction:
        if images.shape[1:] != gt.images.shape:
            raise ValueError(f"oracle built for images {tuple(gt.images.shape)}, got {tuple(images.shape)}")
        ones = torch.ones_like(depth)
        return Prediction(
            cam_from_world=pred_cam[None],
            intrinsics=gt.intrinsics.cpu()[None],
            depth=depth[None],
            depth_conf=ones[None],
            world_points=points[None],
            world_points_conf=ones[None],
        )

    return predict


def summarize(results: Sequence[SceneResult]) -> dict[str, float]:
    """Pose accuracies and AUC over the pooled pairs of all scenes (as VGGT pools the sequences of a
    category); the other metrics and the time are means over scenes (NaN-aware)."""
    if not results:
        raise ValueError("summarize: no results")
    rre = torch.cat([r.rre for r in results])
    rte = torch.cat([r.rte for r in results])
    out: dict[str, float] = {}
    for tau in POSE_THRESHOLDS:
        out[f"RRA@{tau}"] = accuracy_at(rre, tau)
        out[f"RTA@{tau}"] = accuracy_at(rte, tau)
    for tau in POSE_THRESHOLDS:
        out[f"AUC@{tau}"] = pose_auc(rre, rte, tau)
    for key in ("registered", "ATE", "AbsRel", "delta<1.25", "Acc", "Comp"):
        values = np.array([r.metrics[key] for r in results], dtype=np.float64)
        out[key] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
    out["time_s"] = float(np.mean([r.time_s for r in results]))
    return out
