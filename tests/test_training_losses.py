"""Training losses: hand-computable cases and float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from speed3r_sfm.geometry import compose_poses, invert_pose
from speed3r_sfm.models.vggt import extrinsics_intrinsics_to_pose_encoding
from speed3r_sfm.training.losses import (
    LossConfig,
    Pi3Criterion,
    VGGTCriterion,
    camera_loss,
    filter_by_quantile,
    gradient_loss,
    gradient_loss_multi_scale,
    normalize_ground_truth,
    optimal_scale,
    pi3_point_loss,
    regression_loss,
    relative_pose_loss,
    rotation_geodesic,
)


def rotation_z(angle: float, dtype=torch.float64) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=dtype)


def random_rotation(gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.det(q))


def two_view_scene():
    """B=1, S=2, 2x2 pixels, K with f=1 and principal point (0.5, 0.5); view 0 at the world origin,
    view 1 translated so that its points lie 1 unit closer to the world origin along z."""
    k = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    intrinsics = k.expand(1, 2, 3, 3).clone()
    cam_from_world = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    cam_from_world[..., :3, :3] = torch.eye(3, dtype=torch.float64)
    cam_from_world[0, 1, :3, 3] = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    depth = torch.full((1, 2, 2, 2), 2.0, dtype=torch.float64)
    return depth, intrinsics, cam_from_world


def test_normalize_ground_truth_hand_case():
    depth, k, pose = two_view_scene()
    target = normalize_ground_truth(depth, k, pose, min_valid_pixels=0)
    # view 0 points (±1, ±1, 2): norm √6; view 1 points (±1, ±1, 1) in the world: norm √3
    scale = (math.sqrt(6) + math.sqrt(3)) / 2
    assert target.scale.item() == pytest.approx(scale, rel=1e-12)
    assert torch.allclose(target.depth, depth / scale)
    assert torch.allclose(target.cam_from_world[0, 0], torch.eye(3, 4, dtype=torch.float64))
    assert torch.allclose(
        target.cam_from_world[0, 1, :, 3], torch.tensor([0, 0, 1 / scale], dtype=torch.float64)
    )
    expected = torch.tensor([[[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0]], [[-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]])
    assert torch.allclose(target.world_points[0, 1], expected.double() / scale)
    assert torch.allclose(
        target.camera_points[0, 1, ..., 2], torch.full((2, 2), 2 / scale, dtype=torch.float64)
    )
    assert target.sequence_valid.tolist() == [True]
    # the first view needs more than min_valid_pixels valid pixels
    assert normalize_ground_truth(depth, k, pose, min_valid_pixels=4).sequence_valid.tolist() == [False]


def test_normalize_ground_truth_is_invariant_to_the_world_frame():
    gen = torch.Generator().manual_seed(0)
    depth = torch.rand(2, 3, 5, 6, generator=gen, dtype=torch.float64) + 1.0
    depth[0, 1, 0, :] = 0.0  # some invalid pixels
    k = torch.tensor([[4.0, 0.0, 2.5], [0.0, 4.0, 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64).expand(
        2, 3, 3, 3
    )
    rot = torch.stack([random_rotation(gen) for _ in range(6)]).view(2, 3, 3, 3)
    pose = torch.cat([rot, torch.randn(2, 3, 3, 1, generator=gen, dtype=torch.float64)], dim=-1)
    world_change = torch.cat(
        [random_rotation(gen), torch.randn(3, 1, generator=gen, dtype=torch.float64) * 5], -1
    )
    moved = compose_poses(pose, invert_pose(world_change).expand(2, 3, 3, 4))
    a = normalize_ground_truth(depth, k, pose)
    b = normalize_ground_truth(depth, k, moved)
    for name in ("depth", "cam_from_world", "world_points", "camera_points", "scale"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-10), name
    assert not a.valid[0, 1, 0].any() and a.valid[0, 1, 1:].all()
    # mean norm of the valid normalised points is 1
    norms = a.world_points.norm(dim=-1)
    for i in range(2):
        assert norms[i][a.valid[i]].mean().item() == pytest.approx(1.0, rel=1e-12)


def test_camera_loss_hand_case():
    gt = torch.zeros(2, 3, 9)
    first, second = gt.clone(), gt.clone()
    first[..., :3] += 0.3  # translation error 0.3 in every entry
    second[..., 3:7] -= 0.5  # quaternion error 0.5
    second[..., 7:] += 0.2  # fov error 0.2
    out = camera_loss([first, second], gt, gamma=0.6)
    # iteration weights 0.6 (first) and 1 (last), averaged over 2 iterations
    assert out["translation"].item() == pytest.approx(0.6 * 0.3 / 2)
    assert out["rotation"].item() == pytest.approx(0.5 / 2)
    assert out["fov"].item() == pytest.approx(0.2 / 2)
    assert out["camera"].item() == pytest.approx(0.09 + 0.25 + 0.5 * 0.1)
    # translation errors are clamped at 100; the mask drops samples
    big = gt.clone()
    big[0, :, 0] = 1000.0
    assert camera_loss([big], gt)["translation"].item() == pytest.approx(100 / 6)
    assert camera_loss([big], gt, torch.tensor([False, True]))["translation"].item() == 0.0
    none = camera_loss([big.requires_grad_()], gt, torch.tensor([False, False]))["camera"]
    none.backward()
    assert none.item() == 0.0 and big.grad is not None


def test_filter_by_quantile_matches_numpy():
    gen = torch.Generator().manual_seed(1)
    values = torch.rand(5000, generator=gen, dtype=torch.float64) * 10
    kept = filter_by_quantile(values, 0.98)
    threshold = np.quantile(values.numpy(), 0.98)
    assert torch.equal(kept, values[values < threshold])
    # hard maximum: values of 100 and more always go
    values[:500] = 1000.0
    assert filter_by_quantile(values, 0.98).max().item() < 100.0
    # small inputs and disabled filtering are untouched
    assert torch.equal(filter_by_quantile(values[:1000], 0.98), values[:1000])
    assert torch.equal(filter_by_quantile(values, -1), values)


def reference_gradient_loss(pred, target, mask) -> float:
    """Python loops in float64 over (N, H, W, C)."""
    diff = (pred - target).double().numpy()
    m = mask.numpy()
    n, h, w, c = diff.shape
    total = 0.0
    for i in range(n):
        for y in range(h):
            for x in range(w):
                if x + 1 < w and m[i, y, x] and m[i, y, x + 1]:
                    total += np.abs(diff[i, y, x + 1] - diff[i, y, x]).sum()
                if y + 1 < h and m[i, y, x] and m[i, y + 1, x]:
                    total += np.abs(diff[i, y + 1, x] - diff[i, y, x]).sum()
    return total / (m.sum() * c)


def test_gradient_loss_hand_case_and_reference():
    h, w = 6, 8
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    target = torch.zeros(1, h, w, 1, dtype=torch.float64)
    pred = (0.5 * xx - 0.25 * yy)[None, ..., None]
    mask = torch.ones(1, h, w, dtype=torch.bool)
    expected = (0.5 * h * (w - 1) + 0.25 * (h - 1) * w) / (h * w)
    assert gradient_loss(pred, target, mask).item() == pytest.approx(expected, rel=1e-12)
    # a constant offset has no gradient
    assert gradient_loss(target + 3.0, target, mask).item() == 0.0

    gen = torch.Generator().manual_seed(2)
    pred = torch.randn(2, 9, 11, 3, generator=gen, dtype=torch.float64)
    target = torch.randn(2, 9, 11, 3, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 9, 11, generator=gen) > 0.3
    assert gradient_loss(pred, target, mask).item() == pytest.approx(
        reference_gradient_loss(pred, target, mask), rel=1e-10
    )
    multi = np.mean(
        [
            reference_gradient_loss(pred[:, ::s, ::s], target[:, ::s, ::s], mask[:, ::s, ::s])
            for s in (1, 2, 4)
        ]
    )
    assert gradient_loss_multi_scale(pred, target, mask, scales=3).item() == pytest.approx(multi, rel=1e-10)


def test_regression_loss_hand_case():
    target = torch.zeros(1, 2, 4, 5, 3, dtype=torch.float64)
    pred = target.clone()
    pred[..., 0], pred[..., 1] = 0.3, 0.4  # error norm 0.5 everywhere
    conf = torch.full((1, 2, 4, 5), 2.0, dtype=torch.float64)
    mask = torch.ones(1, 2, 4, 5, dtype=torch.bool)
    mask[0, 1, 0] = False
    out = regression_loss(pred, target, mask, conf, gamma=1.0, alpha=0.2)
    assert out["reg"].item() == pytest.approx(0.5)
    assert out["conf"].item() == pytest.approx(0.5 * 2.0 - 0.2 * math.log(2.0))
    assert out["grad"].item() == pytest.approx(0.0, abs=1e-15)  # a constant error has no gradient
    assert out["total"].item() == pytest.approx(out["reg"].item() + out["conf"].item())
    # masked pixels do not count, whatever their error
    pred[0, 1, 0] = 100.0
    assert regression_loss(pred, target, mask, conf)["reg"].item() == pytest.approx(0.5)
    empty = regression_loss(pred, target, torch.zeros_like(mask), conf)
    assert empty["total"].item() == 0.0


def test_rotation_geodesic_and_relative_pose_loss_hand_case():
    assert rotation_geodesic(torch.eye(3, dtype=torch.float64), rotation_z(0.3)).item() == pytest.approx(
        0.3, abs=1e-9
    )
    gt = torch.eye(4, dtype=torch.float64).repeat(1, 2, 1, 1)
    gt[0, 1, 0, 3] = 1.0
    pred = gt.clone()
    pred[0, 1, 0, 3] = 1.05
    pred[0, 1, :3, :3] = rotation_z(0.1)
    out = relative_pose_loss(pred, gt, huber_delta=0.1, translation_weight=100.0)
    # both ordered pairs: translation error 0.05 in one axis (Huber quadratic part 0.5 * 0.05²)
    # pair (0, 1): t = (1.05, 0, 0) vs (1, 0, 0); pair (1, 0): R1ᵀ(-t1) has norm 1.05 as well but
    # rotated by -0.1 rad, so compute it explicitly
    t10 = -(rotation_z(0.1).T @ torch.tensor([1.05, 0.0, 0.0], dtype=torch.float64))
    err10 = (t10 - torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64)).abs()
    huber = lambda e: float(sum(0.5 * x**2 if x < 0.1 else 0.1 * (x - 0.05) for x in e))  # noqa: E731
    expected_t = (0.5 * 0.05**2 + huber(err10.tolist())) / 2
    assert out["rel_translation"].item() == pytest.approx(expected_t, rel=1e-9)
    assert out["rel_rotation"].item() == pytest.approx(0.1, abs=1e-8)
    assert out["relative_pose"].item() == pytest.approx(100 * expected_t + 0.1, rel=1e-7)
    # the loss is relative: a common rigid change of the predicted world frame changes nothing,
    # and a translation scale can be undone by pred_translation_scale
    change = torch.eye(4, dtype=torch.float64)
    change[:3, :3], change[:3, 3] = (
        random_rotation(torch.Generator().manual_seed(3)),
        torch.tensor([1.0, 2.0, 3.0]),
    )
    moved = change @ pred
    assert relative_pose_loss(moved, gt)["relative_pose"].item() == pytest.approx(
        out["relative_pose"].item(), rel=1e-9
    )
    doubled = pred.clone()
    doubled[..., :3, 3] *= 2
    rescaled = relative_pose_loss(doubled, gt, pred_translation_scale=torch.tensor([0.5]))
    assert rescaled["relative_pose"].item() == pytest.approx(out["relative_pose"].item(), rel=1e-9)


def test_optimal_scale_and_pi3_point_loss():
    depth, k, pose = two_view_scene()
    target = normalize_ground_truth(depth, k, pose, min_valid_pixels=0)
    gen = torch.Generator().manual_seed(4)
    pred = torch.randn(1, 2, 2, 2, 3, generator=gen, dtype=torch.float64)
    weight = torch.rand(1, 2, 2, 2, generator=gen, dtype=torch.float64)
    s = optimal_scale(pred, target.camera_points, weight, target.valid)
    # float64 reference: argmin_s Σ w |s p − g|²
    p, g, w = (
        pred.reshape(-1, 3).numpy(),
        target.camera_points.reshape(-1, 3).numpy(),
        weight.reshape(-1).numpy(),
    )
    assert s.item() == pytest.approx(
        float((w * (p * g).sum(1)).sum() / (w * (p * p).sum(1)).sum()), rel=1e-12
    )

    # a prediction equal to the ground truth up to scale 3 has zero loss, and the returned factor undoes it
    logits = torch.full((1, 2, 2, 2, 1), 5.0, dtype=torch.float64)
    out = pi3_point_loss(3.0 * target.camera_points, target, logits)
    assert out["points"].item() == pytest.approx(0.0, abs=1e-12)
    assert out["scale"].item() == pytest.approx(1 / 3, rel=1e-12)
    assert out["conf"].item() == pytest.approx(math.log1p(math.exp(-5.0)), rel=1e-9)  # all inliers

    # numpy float64 reference on a perturbed prediction (with one invalid pixel)
    depth[0, 1, 0, 0] = 0.0
    target = normalize_ground_truth(depth, k, pose, min_valid_pixels=0)
    shifted = target.camera_points.clone() * 1.7
    shifted[0, 1, ..., 0] += 0.1
    got = pi3_point_loss(shifted, target)["points"].item()
    m = target.valid.reshape(-1).numpy()
    p, g = shifted.reshape(-1, 3).numpy()[m], target.camera_points.reshape(-1, 3).numpy()[m]
    z = np.maximum(target.depth.reshape(-1).numpy()[m], 0.01)
    p = p / np.linalg.norm(p, axis=1).mean()
    s_ref = ((p * g).sum(1) / z).sum() / ((p * p).sum(1) / z).sum()
    expected = (np.abs(s_ref * p - g).sum(1) / z).mean()
    assert got == pytest.approx(float(expected), rel=1e-10)
    assert got > 0.01


def perfect_vggt_prediction(target, scale=1.0):
    enc = extrinsics_intrinsics_to_pose_encoding(target.cam_from_world, target.intrinsics, target.image_size)
    return {
        "pose_enc_list": [enc] * 4,
        "pose_enc": enc,
        "depth": target.depth[..., None],
        "depth_conf": torch.ones_like(target.depth),
        "world_points": target.world_points,
        "world_points_conf": torch.ones_like(target.depth),
    }


def test_criteria_are_zero_for_perfect_predictions():
    gen = torch.Generator().manual_seed(5)
    depth = torch.rand(2, 3, 14, 14, generator=gen, dtype=torch.float64) + 1.0
    k = torch.tensor([[10.0, 0.0, 7.0], [0.0, 10.0, 7.0], [0.0, 0.0, 1.0]], dtype=torch.float64).expand(
        2, 3, 3, 3
    )
    rot = torch.stack([random_rotation(gen) for _ in range(6)]).view(2, 3, 3, 3)
    pose = torch.cat([rot, torch.randn(2, 3, 3, 1, generator=gen, dtype=torch.float64)], dim=-1)
    target = normalize_ground_truth(depth, k, pose, min_valid_pixels=10)

    terms = VGGTCriterion(LossConfig(relative_pose=1.0))(perfect_vggt_prediction(target), target)
    for name in ("camera", "depth", "point", "relative_pose", "loss"):
        assert abs(terms[name].item()) < 1e-6, name
    worse = perfect_vggt_prediction(target)
    worse["depth"] = worse["depth"] * 1.1
    assert VGGTCriterion()(worse, target)["depth"].item() > 0.01

    c2w = target.camera_to_world.clone()
    c2w[..., :3, 3] *= 2.0
    pi3_pred = {
        "local_points": 2.0 * target.camera_points,
        "camera_poses": torch.cat(
            [c2w, torch.tensor([0, 0, 0, 1.0], dtype=torch.float64).expand(2, 3, 1, 4)], -2
        ),
        "conf": torch.full((2, 3, 14, 14, 1), 20.0, dtype=torch.float64),
    }
    terms = Pi3Criterion()(pi3_pred, target)
    for name in ("points", "relative_pose", "conf", "loss"):
        assert abs(terms[name].item()) < 1e-6, name
