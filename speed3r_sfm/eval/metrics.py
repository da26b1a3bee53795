"""Accuracy metrics for poses, depth and point clouds (float64 where it matters).

Pose metrics follow the VGGT / π³ protocol (VGGT ``evaluation/test_co3d.py``, π³ ``relpose`` evaluation):
for every pair i < j the relative pose ``cam_j_from_cam_i = E_j E_i^-1`` of prediction and ground truth are
compared; RRE is the geodesic angle between the relative rotations, RTE the angle between the relative
translation directions with the sign ambiguity folded in (``min(θ, 180° - θ)``, so RTE <= 90°; a zero
translation on either side gives 90°). RRA@τ / RTA@τ are the fractions of pairs below τ degrees and
AUC@τ (a.k.a. mAA) is the mean over the τ one-degree bins of the cumulative histogram of
``max(RRE, RTE)``.
"""

from __future__ import annotations

import numpy as np
import torch

from speed3r_sfm.geometry import apply_sim3, camera_centers, compose_poses, invert_pose, umeyama_sim3


def pair_indices(num_views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j) of all pairs i < j, in ``torch.combinations`` order."""
    pairs = torch.combinations(torch.arange(num_views), 2)
    return pairs[:, 0], pairs[:, 1]


def rotation_angle_deg(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Geodesic angle (degrees) between rotations ``(..., 3, 3)``, computed in float64."""
    rel = r1.double().transpose(-1, -2) @ r2.double()
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    # atan2 of the skew part is accurate near 0 and 180 degrees, unlike acos alone.
    skew = torch.stack(
        [rel[..., 2, 1] - rel[..., 1, 2], rel[..., 0, 2] - rel[..., 2, 0], rel[..., 1, 0] - rel[..., 0, 1]],
        -1,
    )
    return torch.rad2deg(torch.atan2(skew.norm(dim=-1) / 2.0, cos))


def direction_angle_deg(
    v1: torch.Tensor, v2: torch.Tensor, sign_ambiguous: bool = True, eps: float = 1e-12
) -> torch.Tensor:
    """Angle (degrees) between vectors ``(..., 3)``; 90 where either is (near) zero. With
    ``sign_ambiguous`` the angle to the closer of ±v2 is returned."""
    v1, v2 = v1.double(), v2.double()
    n1, n2 = v1.norm(dim=-1), v2.norm(dim=-1)
    cos = (v1 * v2).sum(-1) / (n1 * n2).clamp_min(eps)
    sin = torch.linalg.cross(v1, v2, dim=-1).norm(dim=-1) / (n1 * n2).clamp_min(eps)
    if sign_ambiguous:
        cos = cos.abs()
    angle = torch.rad2deg(torch.atan2(sin, cos))
    return torch.where((n1 < eps) | (n2 < eps), torch.full_like(angle, 90.0), angle)


def relative_pose_errors(
    pred_cam_from_world: torch.Tensor, gt_cam_from_world: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RRE and RTE (degrees, float64) of all pairs i < j of S views; poses (S, 3, 4).

    Pairs that involve a view with ``valid[i] == False`` (e.g. not registered by SfM) get ``inf`` for both
    errors: they fail every threshold and count as zero in AUC.
    """
    if pred_cam_from_world.shape != gt_cam_from_world.shape or pred_cam_from_world.shape[-2:] != (3, 4):
        raise ValueError(
            f"poses must both be (S, 3, 4); got {tuple(pred_cam_from_world.shape)} and "
            f"{tuple(gt_cam_from_world.shape)}"
        )
    i, j = pair_indices(gt_cam_from_world.shape[0])
    pred = torch.nan_to_num(pred_cam_from_world.double().cpu())
    gt = gt_cam_from_world.double().cpu()
    rel_pred = compose_poses(pred[j], invert_pose(pred[i]))
    rel_gt = compose_poses(gt[j], invert_pose(gt[i]))
    rre = rotation_angle_deg(rel_gt[:, :, :3], rel_pred[:, :, :3])
    rte = direction_angle_deg(rel_gt[:, :, 3], rel_pred[:, :, 3])
    if valid is not None:
        ok = valid.cpu()[i] & valid.cpu()[j]
        rre = torch.where(ok, rre, torch.full_like(rre, torch.inf))
        rte = torch.where(ok, rte, torch.full_like(rte, torch.inf))
    return rre, rte


def accuracy_at(errors: torch.Tensor, threshold: float) -> float:
    """Fraction of errors strictly below ``threshold`` (RRA@τ, RTA@τ)."""
    return float((errors < threshold).double().mean())


def pose_auc(rre: torch.Tensor, rte: torch.Tensor, max_threshold: int = 30) -> float:
    """AUC@max_threshold as in VGGT's ``calculate_auc_np``: histogram of max(RRE, RTE) over the bins
    [0,1), [1,2), ..., [τ-1, τ] (numpy bins; the last one is closed), normalised by the number of pairs,
    then the mean of its cumulative sum. Errors above τ (and inf) only count in the denominator."""
    max_err = torch.maximum(rre, rte).double().cpu().numpy()
    if max_err.size == 0:
        raise ValueError("pose_auc: no pairs")
    hist, _ = np.histogram(max_err, bins=np.arange(max_threshold + 1))
    return float(np.mean(np.cumsum(hist / max_err.size)))


def absolute_trajectory_error(
    pred_cam_from_world: torch.Tensor,
    gt_cam_from_world: torch.Tensor,
    valid: torch.Tensor | None = None,
    with_scale: bool = True,
) -> tuple[float, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """ATE: RMSE (ground-truth units) of camera centres after the Umeyama Sim(3) (or SE(3) with
    ``with_scale=False``) that maps predicted centres onto ground truth; only ``valid`` views are used.
    Returns the ATE and the alignment ``(s, R, t)`` (prediction world -> ground-truth world)."""
    pred_c = camera_centers(pred_cam_from_world.double().cpu())
    gt_c = camera_centers(gt_cam_from_world.double().cpu())
    if valid is not None:
        pred_c, gt_c = pred_c[valid.cpu()], gt_c[valid.cpu()]
    if pred_c.shape[0] < 3:
        raise ValueError(f"ATE needs at least 3 valid cameras, got {pred_c.shape[0]}")
    sim3 = umeyama_sim3(pred_c, gt_c, with_scale=with_scale)
    residual = apply_sim3(*sim3, pred_c) - gt_c
    return float(residual.square().sum(-1).mean().sqrt()), sim3


def _median(x: torch.Tensor) -> torch.Tensor:
    """Median that averages the two middle values of an even count (as numpy; torch.median does not)."""
    return torch.quantile(x, 0.5)


def depth_errors(
    pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None, align: str = "median"
) -> dict[str, float]:
    """AbsRel and δ<1.25 of depth maps (S, H, W), computed per image and averaged over images.

    Pixels count where gt > 0, pred > 0, both finite (and ``valid``). Each predicted map is first scaled by
    ``align``: ``"median"`` s = median(gt)/median(pred) (the usual protocol for scale-ambiguous models),
    ``"lstsq"`` s = argmin Σ (s·pred − gt)², or ``"none"`` (metric depth, s = 1).
    """
    if pred.shape != gt.shape:
        raise ValueError(f"depth shapes differ: pred {tuple(pred.shape)} vs gt {tuple(gt.shape)}")
    if align not in ("median", "lstsq", "none"):
        raise ValueError(f"align must be 'median', 'lstsq' or 'none', got {align!r}")
    p, g = pred.double().cpu().flatten(1), gt.double().cpu().flatten(1)
    mask = (g > 0) & (p > 0) & torch.isfinite(g) & torch.isfinite(p)
    if valid is not None:
        mask &= valid.cpu().flatten(1)
    abs_rel, delta = [], []
    for pi, gi, mi in zip(p, g, mask, strict=True):
        if not mi.any():
            continue
        pi, gi = pi[mi], gi[mi]
        if align == "median":
            pi = pi * (_median(gi) / _median(pi))
        elif align == "lstsq":
            pi = pi * ((pi * gi).sum() / pi.square().sum())
        abs_rel.append(float(((pi - gi).abs() / gi).mean()))
        delta.append(float((torch.maximum(pi / gi, gi / pi) < 1.25).double().mean()))
    if not abs_rel:
        raise ValueError("depth_errors: no pixel has valid depth in both maps")
    return {"abs_rel": float(np.mean(abs_rel)), "delta_1.25": float(np.mean(delta))}


def _subsample(points: torch.Tensor, max_points: int, generator: torch.Generator) -> torch.Tensor:
    if points.shape[0] <= max_points:
        return points
    return points[torch.randperm(points.shape[0], generator=generator)[:max_points]]


def nearest_distances(src: torch.Tensor, dst: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Distance from every ``src`` point (N, 3) to its nearest ``dst`` point (M, 3), in float64, chunked
    over ``src`` (memory ``chunk * M``)."""
    if dst.shape[0] == 0:
        raise ValueError("nearest_distances: the target point cloud is empty")
    centre = dst.double().mean(0)
    src, dst = src.double() - centre, dst.double() - centre
    out = [torch.cdist(src[k : k + chunk], dst).amin(dim=1) for k in range(0, src.shape[0], chunk)]
    return torch.cat(out) if out else src.new_zeros(0)


def accuracy_completeness(
    pred_points: torch.Tensor,
    gt_points: torch.Tensor,
    num_queries: int = 5000,
    num_references: int = 50000,
    seed: int = 0,
) -> dict[str, float]:
    """Point-cloud accuracy (mean distance from predicted points to the nearest ground-truth point) and
    completeness (ground truth to nearest prediction), in ground-truth units.

    Each direction queries a seeded random subset of ``num_queries`` points against ``num_references``
    points of the other cloud, so the values have a floor of about half the reference spacing; the
    oracle row of the accuracy benchmark shows that floor.
    """
    gen = torch.Generator().manual_seed(seed)
    pred = pred_points.reshape(-1, 3).double().cpu()
    gt = gt_points.reshape(-1, 3).double().cpu()
    if pred.shape[0] == 0 or gt.shape[0] == 0:
        raise ValueError(
            f"accuracy_completeness: empty cloud (pred {pred.shape[0]}, gt {gt.shape[0]} points)"
        )
    acc = nearest_distances(_subsample(pred, num_queries, gen), _subsample(gt, num_references, gen))
    comp = nearest_distances(_subsample(gt, num_queries, gen), _subsample(pred, num_references, gen))
    return {"accuracy": float(acc.mean()), "completeness": float(comp.mean())}
