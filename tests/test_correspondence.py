"""Patch correspondence supervision: ground-truth patch matches against a per-patch float64 loop and the
rendered images, the InfoNCE loss, and its wiring into the VGGT criterion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speed3r_sfm.data.synthetic import render_scene
from speed3r_sfm.geometry import patch_centres
from speed3r_sfm.training.backbone import BackboneSpec
from speed3r_sfm.training.correspondence import (
    correspondence_loss,
    correspondence_pairs,
    patch_correspondences,
)
from speed3r_sfm.training.losses import LossConfig, VGGTCriterion, normalize_ground_truth

PATCH = 14


@pytest.fixture(scope="module")
def scene():
    gt = render_scene(3, 4, 70, 98, "forward")
    target = normalize_ground_truth(
        gt.depth[None].float(), gt.intrinsics[None].float(), gt.cam_from_world[None].float()
    )
    return gt, target


def _reference_matches(target, i: int, j: int, tolerance: float = 0.05) -> list[int]:
    """One patch at a time, float64: unproject the centre pixel of view i, project into view j, check."""
    h, w = target.image_size
    out = []
    for y, x in patch_centres(h, w, PATCH).tolist():
        if not target.valid[0, i, y, x]:
            out.append(-1)
            continue
        z = target.depth[0, i, y, x].double()
        k_i = target.intrinsics[0, i].double()
        cam = torch.linalg.solve(k_i, torch.tensor([x, y, 1.0], dtype=torch.float64)) * z
        pose_i, pose_j = target.cam_from_world[0, i].double(), target.cam_from_world[0, j].double()
        world = pose_i[:, :3].T @ (cam - pose_i[:, 3])
        cam_j = pose_j[:, :3] @ world + pose_j[:, 3]
        if cam_j[2] <= 0:
            out.append(-1)
            continue
        u, v, _ = (target.intrinsics[0, j].double() @ cam_j) / cam_j[2]
        if not (-0.5 < u < w - 0.5 and -0.5 < v < h - 0.5):
            out.append(-1)
            continue
        px, py = round(float(u)), round(float(v))
        seen = target.depth[0, j, py, px].double()
        if not target.valid[0, j, py, px] or abs(cam_j[2] - seen) > tolerance * seen:
            out.append(-1)
            continue
        out.append((py // PATCH) * (w // PATCH) + px // PATCH)
    return out


def _matches(target, pairs: torch.Tensor) -> torch.Tensor:
    return patch_correspondences(
        target.world_points,
        target.depth,
        target.valid,
        target.intrinsics,
        target.cam_from_world,
        pairs,
        PATCH,
    )


def test_pairs_are_neighbours_and_first_view_both_ways():
    assert correspondence_pairs(1).shape == (0, 2)
    pairs = {tuple(p) for p in correspondence_pairs(4).tolist()}
    assert pairs == {(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2), (0, 2), (2, 0), (0, 3), (3, 0)}


def test_matches_equal_the_per_patch_reference(scene):
    _, target = scene
    pairs = correspondence_pairs(4)
    matches = _matches(target, pairs)
    assert matches.shape == (1, len(pairs), (70 // PATCH) * (98 // PATCH))
    for k, (i, j) in enumerate(pairs.tolist()):
        assert matches[0, k].tolist() == _reference_matches(target, i, j)
    assert (matches[0, 0] >= 0).float().mean() > 0.5  # neighbouring frames of a video mostly overlap


def test_a_view_matches_itself_patch_for_patch(scene):
    _, target = scene
    pairs = torch.tensor([[1, 1]])
    matches = _matches(target, pairs)[0, 0]
    found = matches >= 0
    assert found.float().mean() > 0.9
    assert torch.equal(matches[found], torch.arange(matches.numel())[found])


def test_matched_patches_look_alike(scene):
    """Mean colour of the matched patches agrees far better than that of random patch pairs."""
    gt, target = scene
    pairs = correspondence_pairs(4)
    matches = _matches(target, pairs)[0]
    colour = F.avg_pool2d(gt.images, PATCH).flatten(2).transpose(1, 2)  # (S, P, 3)
    matched, random = [], []
    gen = torch.Generator().manual_seed(0)
    for k, (i, j) in enumerate(pairs.tolist()):
        rows = (matches[k] >= 0).nonzero()[:, 0]
        matched.append((colour[i, rows] - colour[j, matches[k, rows]]).abs().mean())
        other = torch.randint(colour.shape[1], (len(rows),), generator=gen)
        random.append((colour[i, rows] - colour[j, other]).abs().mean())
    assert torch.stack(matched).mean() < 0.4 * torch.stack(random).mean()


def test_loss_is_low_for_matching_features_and_has_gradients():
    gen = torch.Generator().manual_seed(0)
    b, s, p, c = 2, 3, 20, 32
    pairs = correspondence_pairs(s)
    perm = torch.stack([torch.randperm(p, generator=gen) for _ in range(s)])  # view v's patch q = code perm
    codes = torch.randn(p, c, generator=gen)
    tokens = codes[perm][None].expand(b, -1, -1, -1).clone()  # (B, S, P, C)
    # matches: patch q of view i shows the same code as patch perm_j^-1[perm_i[q]] of view j
    inverse = perm.argsort(dim=1)
    matches = torch.stack([inverse[j][perm[i]] for i, j in pairs.tolist()])[None].expand(b, -1, -1).clone()
    matches[:, :, :3] = -1  # unmatched patches are ignored
    good = correspondence_loss(tokens, matches, pairs, temperature=0.05)
    assert good["correspondence_accuracy"] == 1.0 and good["correspondence"] < 1e-3
    noisy = torch.randn(b, s, p, c, generator=gen, requires_grad=True)
    bad = correspondence_loss(noisy, matches, pairs)
    assert bad["correspondence"] > 1.0
    bad["correspondence"].backward()
    assert noisy.grad is not None and noisy.grad.abs().sum() > 0
    # reference: the same cross-entropy, one patch at a time
    feats = F.normalize(noisy.detach().double(), dim=-1)
    terms = []
    for bi in range(b):
        for k, (i, j) in enumerate(pairs.tolist()):
            for q in range(p):
                t = int(matches[bi, k, q])
                if t >= 0:
                    logits = feats[bi, j] @ feats[bi, i, q] / 0.07
                    terms.append(torch.logsumexp(logits, 0) - logits[t])
    assert torch.allclose(bad["correspondence"].double(), torch.stack(terms).mean(), atol=1e-5)
    empty = correspondence_loss(noisy, torch.full_like(matches, -1), pairs)
    assert empty["correspondence"] == 0 and empty["correspondence"].requires_grad


def test_vggt_criterion_adds_the_correspondence_term(scene):
    gt, target = scene
    model = BackboneSpec(name="vggt", preset="tiny").build().train()
    images = gt.images[None].float()
    out = model(images)
    assert "aggregated_tokens_list" in out
    plain = VGGTCriterion(LossConfig())(out, target)
    config = LossConfig(correspondence=0.5, correspondence_layers=(-1,))
    with_corr = VGGTCriterion(config)(out, target)
    assert "correspondence" in with_corr and 0 <= with_corr["correspondence_accuracy"] <= 1
    expected = plain["loss"] + 0.5 * with_corr["correspondence"]
    assert torch.allclose(with_corr["loss"], expected)
    with_corr["loss"].backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("aggregator.patch_embed")]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    out = model(images)
    out["aggregated_tokens_list"][0] = None  # as for a layer that is neither a DPT layer nor the last
    with pytest.raises(ValueError, match="not kept in training"):
        VGGTCriterion(LossConfig(correspondence=1.0, correspondence_layers=(0,)))(out, target)
    model.eval()
    with torch.no_grad():
        assert "aggregated_tokens_list" not in model(images)
