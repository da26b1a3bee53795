"""Metrics and Umeyama against slow, obvious float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from speed3r_sfm.eval.metrics import (
    absolute_trajectory_error,
    accuracy_at,
    accuracy_completeness,
    depth_errors,
    pose_auc,
    relative_pose_errors,
)
from speed3r_sfm.geometry import (
    apply_sim3,
    look_at,
    sim3_cam_from_world,
    umeyama_sim3,
    umeyama_sim3_batched,
)

GEN = torch.Generator().manual_seed(0)


def random_rotation(n: int | None = None) -> torch.Tensor:
    aa = torch.randn(n or 1, 3, generator=GEN, dtype=torch.float64)
    rot = axis_angle_to_rotation_matrix(aa)
    return rot if n else rot[0]


def random_poses(n: int) -> torch.Tensor:
    rot = random_rotation(n)
    return torch.cat([rot, torch.randn(n, 3, 1, generator=GEN, dtype=torch.float64) * 2], dim=-1)


# ---------------------------------------------------------------- Umeyama


def test_umeyama_recovers_a_known_sim3():
    src = torch.randn(50, 3, generator=GEN, dtype=torch.float64)
    rot, scale, trans = (
        random_rotation(),
        torch.tensor(2.7, dtype=torch.float64),
        torch.tensor([1.0, -2.0, 0.5]),
    )
    dst = apply_sim3(scale, rot, trans.double(), src)
    s, r, t = umeyama_sim3(src, dst)
    assert s.item() == pytest.approx(2.7, abs=1e-10)
    assert torch.allclose(r, rot, atol=1e-10) and torch.allclose(t, trans.double(), atol=1e-10)
    assert umeyama_sim3(src.float(), dst.float())[1].dtype == torch.float32


def test_umeyama_with_noise_is_close_and_locally_optimal():
    src = torch.randn(200, 3, generator=GEN, dtype=torch.float64) * 3
    rot = random_rotation()
    dst = apply_sim3(torch.tensor(0.5, dtype=torch.float64), rot, torch.ones(3, dtype=torch.float64), src)
    dst = dst + torch.randn(200, 3, generator=GEN, dtype=torch.float64) * 0.01
    w = torch.rand(200, generator=GEN, dtype=torch.float64)
    s, r, t = umeyama_sim3(src, dst, w)
    assert s.item() == pytest.approx(0.5, abs=2e-3) and torch.allclose(r, rot, atol=5e-3)

    def cost(s_, r_, t_):
        return (w * (apply_sim3(s_, r_, t_, src) - dst).square().sum(-1)).sum()

    best = cost(s, r, t)
    for _ in range(20):  # every small perturbation of (s, R, t) costs more
        dr = axis_angle_to_rotation_matrix(torch.randn(1, 3, generator=GEN, dtype=torch.float64) * 1e-3)[0]
        ds, dt = (
            torch.randn((), generator=GEN, dtype=torch.float64) * 1e-3,
            torch.randn(3, generator=GEN, dtype=torch.float64) * 1e-3,
        )
        assert cost(s + ds, dr @ r, t + dt) > best


def test_umeyama_weights_ignore_outliers_and_rigid_mode():
    src = torch.randn(30, 3, generator=GEN, dtype=torch.float64)
    rot = random_rotation()
    dst = src @ rot.T + 3.0
    dst[:5] += 10.0  # outliers with zero weight
    w = torch.ones(30, dtype=torch.float64)
    w[:5] = 0
    s, r, t = umeyama_sim3(src, dst, w, with_scale=False)
    assert (
        s.item() == 1.0
        and torch.allclose(r, rot, atol=1e-10)
        and torch.allclose(t, torch.full((3,), 3.0, dtype=torch.float64))
    )


def test_umeyama_degenerate_cases():
    src = torch.randn(20, 3, generator=GEN, dtype=torch.float64)
    # Mirror image: the best fit is still a proper rotation.
    _, r, _ = umeyama_sim3(src, src * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    assert torch.det(r).item() == pytest.approx(1.0) and torch.allclose(
        r @ r.T, torch.eye(3, dtype=torch.float64)
    )
    # Collinear points: rotation about the line is free, but the points must still map exactly.
    line = torch.linspace(0, 1, 10, dtype=torch.float64)[:, None] * torch.tensor(
        [[1.0, 2.0, 3.0]], dtype=torch.float64
    )
    target = apply_sim3(
        torch.tensor(2.0, dtype=torch.float64), random_rotation(), torch.ones(3, dtype=torch.float64), line
    )
    assert torch.allclose(apply_sim3(*umeyama_sim3(line, target), line), target, atol=1e-10)
    with pytest.raises(ValueError, match="coincide"):
        umeyama_sim3(torch.ones(5, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="sum to zero"):
        umeyama_sim3(src, src, torch.zeros(20, dtype=torch.float64))
    with pytest.raises(ValueError, match="no points"):
        umeyama_sim3(torch.zeros(0, 3), torch.zeros(0, 3))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        umeyama_sim3(torch.zeros(4, 3), torch.zeros(5, 3))


# ---------------------------------------------------------------- relative poses and AUC


def reference_pair_errors(pred: np.ndarray, gt: np.ndarray) -> tuple[list[float], list[float]]:
    """The protocol spelled out with 4x4 matrices, acos and a loop."""

    def h(p):
        return np.vstack([p, [0, 0, 0, 1]])

    rre, rte = [], []
    n = len(gt)
    for i in range(n):
        for j in range(i + 1, n):
            rel_gt = h(gt[j]) @ np.linalg.inv(h(gt[i]))
            rel_pr = h(pred[j]) @ np.linalg.inv(h(pred[i]))
            c = (np.trace(rel_gt[:3, :3].T @ rel_pr[:3, :3]) - 1) / 2
            rre.append(math.degrees(math.acos(min(1.0, max(-1.0, c)))))
            a, b = rel_gt[:3, 3], rel_pr[:3, 3]
            c = abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
            rte.append(math.degrees(math.acos(min(1.0, c))))
    return rre, rte


def test_relative_pose_errors_match_reference():
    gt = random_poses(7)
    noise = axis_angle_to_rotation_matrix(torch.randn(7, 3, generator=GEN, dtype=torch.float64) * 0.2)
    pred = torch.cat(
        [noise @ gt[:, :, :3], gt[:, :, 3:] + torch.randn(7, 3, 1, generator=GEN, dtype=torch.float64)], -1
    )
    rre, rte = relative_pose_errors(pred, gt)
    ref_rre, ref_rte = reference_pair_errors(pred.numpy(), gt.numpy())
    assert rre.shape == (21,)
    assert np.allclose(rre.numpy(), ref_rre, atol=1e-6) and np.allclose(rte.numpy(), ref_rte, atol=1e-6)
    assert rre.max() > 5 and (rte <= 90).all()


def test_relative_pose_errors_are_invariant_to_a_similarity_of_the_world():
    gt = random_poses(6)
    moved = sim3_cam_from_world(
        torch.tensor(3.0, dtype=torch.float64),
        random_rotation(),
        torch.randn(3, generator=GEN, dtype=torch.float64),
        gt,
    )
    rre, rte = relative_pose_errors(moved, gt)
    assert rre.max() < 1e-6 and rte.max() < 1e-6


def test_unregistered_views_fail_their_pairs():
    gt = random_poses(4)
    valid = torch.tensor([True, True, False, True])
    rre, rte = relative_pose_errors(gt, gt, valid)
    assert torch.isinf(rre).sum() == 3 and torch.isinf(rte).sum() == 3  # pairs (0,2), (1,2), (2,3)
    assert accuracy_at(rre, 5) == pytest.approx(0.5) and pose_auc(rre, rte) == pytest.approx(0.5)


def reference_auc(rre: list[float], rte: list[float], tau: int) -> float:
    """Mean over thresholds k = 1..tau of the fraction of pairs with max error below k (<= tau at the end)."""
    errs = [max(a, b) for a, b in zip(rre, rte, strict=True)]
    fractions = []
    for k in range(1, tau + 1):
        fractions.append(sum((0 <= e < k) if k < tau else (0 <= e <= tau) for e in errs) / len(errs))
    return sum(fractions) / tau


def test_pose_auc_matches_reference_and_hand_values():
    rre = torch.tensor([0.0, 0.5, 3.0, 10.0, 29.99, 30.0, 31.0, math.inf, 2.5, 12.7], dtype=torch.float64)
    rte = torch.tensor([0.2, 1.0, 0.0, 2.0, 1.0, 0.0, 0.0, 0.0, 7.5, 12.6], dtype=torch.float64)
    for tau in (5, 15, 30):
        assert pose_auc(rre, rte, tau) == pytest.approx(
            reference_auc(rre.tolist(), rte.tolist(), tau), abs=1e-12
        )
    z = torch.zeros(4, dtype=torch.float64)
    assert pose_auc(z, z) == 1.0 and pose_auc(z + math.inf, z) == 0.0
    assert pose_auc(z + 10.5, z) == pytest.approx(20 / 30)


# ---------------------------------------------------------------- ATE, depth, point clouds


def test_ate_is_zero_under_a_similarity_and_measures_noise():
    eye = torch.randn(10, 3, generator=GEN, dtype=torch.float64) * 2
    gt = look_at(
        eye, torch.zeros(10, 3, dtype=torch.float64) + torch.tensor([0.0, 0.0, 0.1], dtype=torch.float64)
    )
    moved = sim3_cam_from_world(
        torch.tensor(0.3, dtype=torch.float64), random_rotation(), torch.ones(3, dtype=torch.float64), gt
    )
    ate, (s, _, _) = absolute_trajectory_error(moved, gt)
    assert ate < 1e-9 and s.item() == pytest.approx(1 / 0.3)
    # Camera 0 moved by 1 m: excluded from the fit it costs nothing; included, the raw RMSE over the
    # 10 cameras is sqrt(1 / 10), which the Sim(3) fit can only reduce.
    shifted = gt.clone()
    shifted[0, 2, 3] += 1.0  # camera 0 moves 1 m back along its optical axis
    valid = torch.ones(10, dtype=torch.bool)
    valid[0] = False
    assert absolute_trajectory_error(shifted, gt, valid)[0] < 1e-9
    ate_all = absolute_trajectory_error(shifted, gt)[0]
    assert 0 < ate_all < math.sqrt(1 / 10) + 1e-9
    with pytest.raises(ValueError, match="at least 3"):
        absolute_trajectory_error(gt[:2], gt[:2])


def test_depth_errors_alignment_modes_and_reference():
    gt = torch.rand(3, 8, 9, generator=GEN, dtype=torch.float64) * 5 + 0.5
    gt[0, 0, 0] = 0  # invalid pixel
    assert depth_errors(gt * 2, gt) == {"abs_rel": pytest.approx(0.0), "delta_1.25": pytest.approx(1.0)}
    assert depth_errors(gt * 2, gt, align="none") == {"abs_rel": pytest.approx(1.0), "delta_1.25": 0.0}
    pred = gt * torch.exp(torch.randn(3, 8, 9, generator=GEN, dtype=torch.float64) * 0.3)
    for align in ("median", "lstsq", "none"):
        abs_rel, delta = [], []
        for p, g in zip(pred.numpy(), gt.numpy(), strict=True):
            m = g > 0
            p, g = p[m], g[m]
            s = {"median": np.median(g) / np.median(p), "lstsq": (p @ g) / (p @ p), "none": 1.0}[align]
            abs_rel.append(np.mean(np.abs(s * p - g) / g))
            delta.append(np.mean(np.maximum(s * p / g, g / (s * p)) < 1.25))
        got = depth_errors(pred, gt, align=align)
        assert got["abs_rel"] == pytest.approx(np.mean(abs_rel), abs=1e-12)
        assert got["delta_1.25"] == pytest.approx(np.mean(delta), abs=1e-12)
    with pytest.raises(ValueError, match="align"):
        depth_errors(pred, gt, align="mean")


def test_accuracy_completeness_matches_brute_force():
    gt = torch.rand(300, 3, generator=GEN, dtype=torch.float64)
    pred = torch.rand(200, 3, generator=GEN, dtype=torch.float64) + 0.2
    got = accuracy_completeness(pred, gt)
    d = np.linalg.norm(pred.numpy()[:, None] - gt.numpy()[None], axis=-1)
    assert got["accuracy"] == pytest.approx(d.min(1).mean(), abs=1e-12)
    assert got["completeness"] == pytest.approx(d.min(0).mean(), abs=1e-12)
    # A grid shifted by 1 cm (spacing 10 cm): both directions are exactly 1 cm.
    g = torch.stack(
        torch.meshgrid(*[torch.arange(5, dtype=torch.float64) * 0.1] * 3, indexing="ij"), -1
    ).reshape(-1, 3)
    shifted = accuracy_completeness(g + torch.tensor([0.0, 0.0, 0.01], dtype=torch.float64), g)
    assert shifted["accuracy"] == pytest.approx(0.01) and shifted["completeness"] == pytest.approx(0.01)


def test_batched_umeyama_equals_one_problem_at_a_time():
    """Three-point samples as the LMedS initialisation draws them: noisy, mirrored and degenerate ones."""
    src = torch.randn(40, 3, 3, generator=GEN, dtype=torch.float64)
    dst = apply_sim3(torch.tensor(1.7, dtype=torch.float64), random_rotation(), torch.ones(3).double(), src)
    dst = dst + torch.randn(40, 3, 3, generator=GEN, dtype=torch.float64) * 0.2
    dst[3] = src[3] * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)  # best orthogonal fit: a mirror
    src[5] = 1.0  # coincident points: no scale
    (scale, rot, trans), valid = umeyama_sim3_batched(src, dst)
    assert valid.tolist() == [k != 5 for k in range(40)]
    for k in range(40):
        if k == 5:
            with pytest.raises(ValueError, match="coincide"):
                umeyama_sim3(src[k], dst[k])
            continue
        s, r, t = umeyama_sim3(src[k], dst[k])
        if s <= 0:  # the one-at-a-time fit can return a non-positive scale; the batch marks it invalid
            assert not valid[k]
            continue
        assert scale[k].item() == pytest.approx(s.item(), abs=1e-9)
        assert torch.allclose(rot[k], r, atol=1e-9) and torch.allclose(trans[k], t, atol=1e-9)
    assert torch.allclose(torch.det(rot[valid]), torch.ones(int(valid.sum()), dtype=torch.float64))
