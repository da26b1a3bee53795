"""Token poses: pair alignment from descriptor matches, the spanning-tree composition (against ground truth
in float64), the model's descriptor export, and the pipeline's choice of pose source."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from speed3r_sfm.data.synthetic import render_scene
from speed3r_sfm.geometry import compose_poses, invert_pose
from speed3r_sfm.pipeline.frames import SceneGeometry
from speed3r_sfm.pipeline.token_poses import (
    PairAlignment,
    TokenPoseOptions,
    align_pair,
    apply_token_poses,
    candidate_pairs,
    chunked_pose_report,
    compose_tree,
    mutual_matches,
    patch_camera_points,
    posed_by_tokens,
    reprojection_errors,
    token_poses,
)
from speed3r_sfm.training.backbone import BackboneSpec
from speed3r_sfm.training.correspondence import patch_correspondences

PATCH = 14


def _rotation_error_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = ((a @ b.T).trace() - 1) / 2
    return float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))))


def _random_rotation(gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def _oracle_descriptors(gt, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """(S, P, dim) unit descriptors that match exactly where the ground truth says two patches see the same
    point: view 0's patches get random codes, and each later view's patch takes the code of the patch of
    an earlier view that it sees (first match), a fresh random code otherwise."""
    s, _, h, w = gt.images.shape
    gen = torch.Generator().manual_seed(seed)
    p = (h // PATCH) * (w // PATCH)
    codes = F.normalize(torch.randn(s, p, dim, generator=gen), dim=-1)
    valid = gt.depth > 0
    points = torch.stack(
        [
            (invert_pose(gt.cam_from_world[k].double())[:, :3] @ cam.T).T
            + invert_pose(gt.cam_from_world[k])[:, 3]
            for k, cam in enumerate(patch_camera_points(gt.depth, gt.intrinsics, 1)[0])
        ]
    ).view(s, h, w, 3)
    for j in range(1, s):
        pairs = torch.tensor([[j, i] for i in range(j)])
        matches = patch_correspondences(
            points[None].float(),
            gt.depth[None],
            valid[None],
            gt.intrinsics[None],
            gt.cam_from_world[None],
            pairs,
            PATCH,
        )[0]  # (j, P): patch of view i seen by each patch of view j
        for k in range(j):
            found = (matches[k] >= 0).nonzero()[:, 0]
            codes[j, found] = codes[k, matches[k, found]]
    return codes


@pytest.fixture(scope="module")
def scene():
    return render_scene(7, 5, 224, 294, "forward")


@pytest.fixture(scope="module")
def oracle(scene):
    return _oracle_descriptors(scene)


def test_camera_points_unproject_the_patch_centres(scene):
    points, pixels = patch_camera_points(scene.depth, scene.intrinsics, PATCH)
    assert pixels[0].tolist() == [7, 7] and pixels[1].tolist() == [21, 7]
    k = scene.intrinsics[2].double()
    x, y = pixels[5].tolist()
    z = scene.depth[2, y, x].double()
    expected = torch.linalg.solve(k, torch.tensor([x, y, 1.0], dtype=torch.float64)) * z
    assert torch.allclose(points[2, 5], expected)


def test_mutual_matches_keep_only_mutual_nearest_neighbours():
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]]), dim=-1)
    b = F.normalize(torch.tensor([[1.0, 0.05], [0.1, 1.0]]), dim=-1)
    rows, cols, similarity = mutual_matches(a, b)
    assert rows.tolist() == [0, 1] and cols.tolist() == [0, 1]  # a[2] prefers b[0], which prefers a[0]
    assert torch.allclose(similarity, (a[rows] * b[cols]).sum(-1))


def test_pair_alignment_from_oracle_descriptors_recovers_the_relative_pose(scene, oracle):
    descriptors = oracle
    points, _ = patch_camera_points(scene.depth, scene.intrinsics, PATCH)
    usable = scene.depth[:, 7::PATCH, 7::PATCH].reshape(5, -1) > 0
    edge = align_pair(descriptors, points, usable, 0, 1, TokenPoseOptions())
    assert edge is not None and edge.matches > 30
    g = scene.cam_from_world.double()
    i_from_j = compose_poses(g[0], invert_pose(g[1]))
    # patch centres are only the same surface point up to half a patch: degrees, not exact
    assert _rotation_error_deg(edge.rotation, i_from_j[:, :3]) < 2.0
    assert abs(float(edge.scale) - 1.0) < 0.05


def test_compose_tree_equals_ground_truth_with_exact_alignments():
    """Exact pair similarities from known poses and per-view depth scales, plus a weak wrong edge that the
    maximum spanning tree must leave out: the composed poses equal the truth in view 0's frame."""
    gen = torch.Generator().manual_seed(3)
    s = 5
    rot = torch.stack([_random_rotation(gen) for _ in range(s)])
    centre = torch.randn(s, 3, generator=gen, dtype=torch.float64)
    depth_scale = torch.rand(s, generator=gen, dtype=torch.float64) + 0.5
    depth_scale[0] = 1.0

    def world_from(k):  # similarity (scale, R, t): camera k's (scaled) points into the world
        return depth_scale[k], rot[k], centre[k]

    def i_from_j(i, j):
        si, ri, ti = world_from(i)
        sj, rj, tj = world_from(j)
        return sj / si, ri.T @ rj, ri.T @ (tj - ti) / si

    edges = [
        PairAlignment(i, j, *i_from_j(i, j), 50, 40.0) for i, j in [(0, 1), (1, 2), (2, 3), (1, 4), (4, 3)]
    ]
    edges[3].support = 45.0  # (1, 4) is kept, (4, 3) is the weaker route to view 3... but (2, 3) is 40 too
    edges.append(
        PairAlignment(
            0,
            3,
            torch.tensor(2.0, dtype=torch.float64),
            torch.eye(3, dtype=torch.float64),
            torch.zeros(3, dtype=torch.float64),
            12,
            1.0,
        )
    )  # wrong and weak
    poses = compose_tree(s, edges)
    assert poses is not None and len(poses.edges) == s - 1
    assert all(not (e.i == 0 and e.j == 3) for e in poses.edges)
    # the truth in view 0's frame: cam_from_world0 = cam_from_world @ world_from_cam0
    for k in range(s):
        r_expected = rot[0].T @ rot[k]
        c_expected = rot[0].T @ (centre[k] - centre[0])
        r = poses.cam_from_world[k, :, :3].T
        c = -r @ poses.cam_from_world[k, :, 3]
        assert torch.allclose(r, r_expected, atol=1e-10)
        assert torch.allclose(c, c_expected, atol=1e-10)
        assert torch.allclose(poses.depth_scale[k], depth_scale[k] / depth_scale[0], atol=1e-12)
    # an inverted edge (stored as j_from_i) composes the same way
    flipped = [PairAlignment(1, 0, *i_from_j(1, 0), 50, 40.0), *edges[1:5]]
    again = compose_tree(s, flipped)
    assert torch.allclose(again.cam_from_world, poses.cam_from_world, atol=1e-10)
    assert compose_tree(s, edges[:2]) is None  # views 3 and 4 unreachable


@pytest.mark.parametrize(
    ("rotation_from", "tolerance_deg"), [("sim3", 2.0), ("essential", 4.0), ("best", 4.0)]
)
def test_token_poses_of_oracle_descriptors_match_the_trajectory(scene, oracle, rotation_from, tolerance_deg):
    """Patch centres quantise the matches to 14 px: with exact depth the 3D fit is the most accurate and
    the essential matrix of such points the noisiest (with predicted depth each wins on some scenes, which
    is why "best" keeps the solver with the lowest reprojection error per pair)."""
    descriptors = oracle
    confidence = torch.ones_like(scene.depth)
    options = TokenPoseOptions(rotation_from=rotation_from)
    poses = token_poses(descriptors, scene.depth, confidence, scene.intrinsics, PATCH, options)
    assert poses is not None
    g = scene.cam_from_world.double()
    for k in range(1, 5):
        truth = g[k, :, :3] @ g[0, :, :3].T
        assert _rotation_error_deg(poses.cam_from_world[k, :, :3], truth) < tolerance_deg
    with pytest.raises(ValueError, match="rotation_from"):
        TokenPoseOptions(rotation_from="x")


def test_essential_alignment_recovers_the_similarity_of_exact_matches():
    """Rotation and translation direction from the essential matrix, then the depth-scale ratio and the
    baseline length by least squares on the points (closed form): exact on noise-free matches, and the
    same bits on every call."""
    from speed3r_sfm.pipeline.token_poses import _essential_alignment, _pinhole

    gen = torch.Generator().manual_seed(6)
    k = torch.tensor([[200.0, 0, 160], [0, 200.0, 120], [0, 0, 1]], dtype=torch.float64)
    rotation = _random_rotation(gen)
    rotation = torch.linalg.matrix_exp(0.05 * (rotation - rotation.T))  # a few degrees
    translation = torch.tensor([0.4, -0.1, 0.05], dtype=torch.float64)
    scale = 1.6
    pixels_j = torch.rand(120, 2, generator=gen, dtype=torch.float64) * torch.tensor([320.0, 240.0])
    depth = 2.0 + 3.0 * torch.rand(120, generator=gen, dtype=torch.float64)
    src = torch.cat([pixels_j, torch.ones(120, 1, dtype=torch.float64)], 1) @ torch.linalg.inv(k).T
    src = src * depth[:, None]
    dst = scale * (src @ rotation.T + translation)
    projected = dst @ k.T
    pixels_i = projected[:, :2] / projected[:, 2:]
    camera = _pinhole(k, 240, 320)
    found = _essential_alignment(pixels_i, pixels_j, src, dst, (camera, camera), 1.0)
    assert found is not None
    s, r, t, inliers = found
    assert bool(inliers.all())
    assert abs(float(s) - scale) < 1e-6
    assert torch.allclose(r, rotation, atol=1e-6)
    assert torch.allclose(t, scale * translation, atol=1e-5)
    again = _essential_alignment(pixels_i, pixels_j, src, dst, (camera, camera), 1.0)
    assert torch.equal(again[0], s) and torch.equal(again[2], t)


def test_ransac_may_stop_before_its_maximum_number_of_trials():
    """pycolmap's essential-matrix RANSAC defaults to at least 1000 trials, which made every pair run all
    of them; token poses let both estimators stop once they are confident."""
    import pycolmap

    from speed3r_sfm.pipeline.token_poses import RANSAC_MIN_TRIALS, RANSAC_TRIALS, _configure_ransac

    for ransac in (pycolmap.RANSACOptions(), pycolmap.AbsolutePoseEstimationOptions().ransac):
        configured = _configure_ransac(ransac, 4.0)
        assert configured.min_num_trials == RANSAC_MIN_TRIALS < configured.max_num_trials == RANSAC_TRIALS
        assert configured.max_error == 4.0 and configured.random_seed == 0


def test_token_poses_try_more_partner_views_while_some_view_is_unreached(scene, oracle, monkeypatch):
    """When the nearest-descriptor partners leave a view unconnected, more partners are aligned (only the
    pairs not tried yet) before giving up on token poses."""
    import speed3r_sfm.pipeline.token_poses as module

    asked, aligned = [], []
    real_pairs, real_align = module.candidate_pairs, module.align_pair

    def few_pairs(descriptors, neighbours):
        asked.append(neighbours)
        return [(0, 1), (2, 3)] if neighbours < 2 else real_pairs(descriptors, neighbours)

    def counting_align(descriptors, points, usable, i, j, *args, **kwargs):
        aligned.append((i, j))
        return real_align(descriptors, points, usable, i, j, *args, **kwargs)

    monkeypatch.setattr(module, "candidate_pairs", few_pairs)
    monkeypatch.setattr(module, "align_pair", counting_align)
    confidence = torch.ones_like(scene.depth)
    options = TokenPoseOptions(neighbours=1)
    poses = token_poses(oracle, scene.depth, confidence, scene.intrinsics, PATCH, options)
    assert poses is not None and asked[:2] == [1, 2]
    assert len(aligned) == len(set(aligned))  # no pair aligned twice
    g = scene.cam_from_world.double()
    for k in range(1, 5):
        truth = g[k, :, :3] @ g[0, :, :3].T
        assert _rotation_error_deg(poses.cam_from_world[k, :, :3], truth) < 4.0


def test_reprojection_errors_are_zero_for_the_true_pose_and_grow_off_it(scene):
    points, pixels = patch_camera_points(scene.depth, scene.intrinsics, PATCH)
    g = scene.cam_from_world.double()
    i_from_j = compose_poses(g[0], invert_pose(g[1]))
    rotation, translation = i_from_j[:, :3], i_from_j[:, 3]
    src = points[1, :40]
    dst = src @ rotation.T + translation
    k = scene.intrinsics[0].double()
    uv = dst @ k.T
    pixels_i = uv[:, :2] / uv[:, 2:]
    pixels_j = pixels[:40].double()
    k_colmap = k.clone()
    k_colmap[:2, 2] += 0.5
    one = torch.tensor(1.0, dtype=torch.float64)
    exact = reprojection_errors(
        src, dst, pixels_i, pixels_j, (one, rotation, translation), k_colmap, k_colmap
    )
    assert exact.max() < 1e-4  # the scene's intrinsics are float32
    turned = _random_rotation(torch.Generator().manual_seed(1))
    off = reprojection_errors(
        src, dst, pixels_i, pixels_j, (one, turned @ rotation, translation), k_colmap, k_colmap
    )
    assert off.median() > 5.0


def test_candidate_pairs_are_all_pairs_or_nearest_neighbours():
    d = F.normalize(torch.randn(4, 10, 8), dim=-1)
    assert candidate_pairs(d, 5) == [(i, j) for i in range(4) for j in range(i + 1, 4)]
    base = F.normalize(torch.randn(10, 8), dim=-1)
    views = torch.stack([F.normalize(base + 0.01 * k * torch.randn(10, 8), dim=-1) for k in range(12)])
    pairs = candidate_pairs(views, 2)
    # 2 partners per view, and up to 2 near-duplicates besides (views 0-2 differ by at most 2 % noise)
    assert all(i < j for i, j in pairs) and len(pairs) <= 12 * 2 * 2
    assert {i for p in pairs for i in p} == set(range(12))


def test_vggt_exports_descriptors_only_when_configured(scene):
    images = scene.images[None].float()
    plain = BackboneSpec(name="vggt", preset="tiny").build().eval()
    assert "descriptors" not in plain.predict(images).extras
    model = BackboneSpec(name="vggt", preset="tiny", overrides={"descriptor_layer": 1}).build().eval()
    extras = model.predict(images).extras
    descriptors = extras["descriptors"]
    p = (224 // PATCH) * (294 // PATCH)
    assert descriptors.shape == (1, 5, p, 2 * model.config.embed_dim) and descriptors.dtype == torch.float16
    assert torch.allclose(descriptors.float().norm(dim=-1), torch.ones(1, 5, p), atol=1e-2)
    assert extras["patch_size"] == PATCH
    with pytest.raises(ValueError, match="descriptor_layer"):
        BackboneSpec(name="vggt", preset="tiny", overrides={"descriptor_layer": 99}).build()


def _oracle_prediction(scene, oracle):
    """A tiny VGGT's prediction with the oracle's descriptors, the true depth doubled, confident, and the
    true intrinsics: its camera head is untrained, its token poses are right."""
    model = BackboneSpec(name="vggt", preset="tiny", overrides={"descriptor_layer": 1}).build().eval()
    prediction = model.predict(scene.images[None].float())
    prediction.extras["descriptors"] = oracle[None].half()
    prediction.depth = scene.depth[None].float() * 2.0
    prediction.depth_conf = torch.ones_like(prediction.depth)
    prediction.intrinsics = scene.intrinsics[None].float()
    return prediction


def test_apply_token_poses_replaces_head_poses_and_rescales_depth(scene, oracle):
    prediction = _oracle_prediction(scene, oracle)
    geometry = SceneGeometry.from_prediction(prediction)
    report = apply_token_poses(geometry, prediction, TokenPoseOptions(rotation_from="sim3"))
    assert report["source"] == "tokens" and len(report["tree_edges"]) == 4
    g = scene.cam_from_world.double()
    assert _rotation_error_deg(geometry.cam_from_world[3, :, :3], g[3, :, :3] @ g[0, :, :3].T) < 2.0
    assert torch.allclose(geometry.depth[0], scene.depth[0].float() * 2.0)  # view 0 sets the scale
    off = apply_token_poses(
        SceneGeometry.from_prediction(prediction), prediction, TokenPoseOptions(enabled=False)
    )
    assert off["source"] == "camera head"
    prediction.extras["chunk_sim3"] = []  # a composed chunked prediction
    assert apply_token_poses(geometry, prediction, TokenPoseOptions())["why"].startswith("chunked")
    del prediction.extras["chunk_sim3"], prediction.extras["descriptors"]
    assert apply_token_poses(geometry, prediction, TokenPoseOptions())["why"].startswith(
        "the model exports no"
    )


@pytest.mark.slow
def test_default_model_pipeline_uses_token_poses_and_bundle_adjusts_to_a_degree(tmp_path):
    """The shipped default on a held-out 8-view walk (forward trajectory): token poses, then BA below 1
    degree (median RRE). Longer sequences and orbits are not this reliable yet (pipeline_synthetic.md)."""
    from speed3r_sfm.demo import demo_command

    summary = demo_command(tmp_path / "demo", views=8, height=294, width=392, trajectory="forward")
    assert summary["feed_forward_poses"] == "tokens"
    scores = summary["scores"]
    assert scores["after bundle adjustment"]["registered"] == 8
    assert scores["after bundle adjustment"]["median_rotation_error_deg"] < 1.0
    assert (
        scores["after bundle adjustment"]["median_rotation_error_deg"]
        < 0.7 * scores["feed-forward"]["median_rotation_error_deg"]
    )
    report = json.loads((tmp_path / "demo" / "reconstruction" / "report.json").read_text())
    assert report["poses"]["source"] == "tokens"


def test_posed_by_tokens_rewrites_poses_depth_and_world_points_consistently(scene, oracle):
    prediction = _oracle_prediction(scene, oracle)
    options = TokenPoseOptions(rotation_from="sim3")
    posed, report = posed_by_tokens(prediction, options)
    geometry = SceneGeometry.from_prediction(prediction)
    assert apply_token_poses(geometry, prediction, options)["tree_edges"] == report["tree_edges"]
    assert torch.allclose(posed.cam_from_world[0].double(), geometry.cam_from_world, atol=1e-6)
    assert torch.allclose(posed.depth[0], geometry.depth)
    assert torch.equal(posed.world_points_conf, prediction.depth_conf)
    # world points: X = R^T (d K^-1 [u, v, 1] - t), in float64, at a few pixels of every view
    gen = torch.Generator().manual_seed(0)
    h, w = posed.depth.shape[-2:]
    for view in range(posed.num_views):
        u, v = torch.randint(0, w, (20,), generator=gen), torch.randint(0, h, (20,), generator=gen)
        d = posed.depth[0, view, v, u].double()
        k = posed.intrinsics[0, view].double()
        rays = torch.linalg.solve(
            k, torch.stack([u.double(), v.double(), torch.ones(20, dtype=torch.float64)])
        )
        pose = posed.cam_from_world[0, view].double()
        expected = (pose[:, :3].T @ (rays * d - pose[:, 3:])).T
        assert torch.allclose(
            posed.world_points[0, view, v, u].double(), expected, atol=1e-4 * expected.abs().max()
        )
    del prediction.extras["descriptors"]
    with pytest.MonkeyPatch.context() as patch:  # an official model's chunk: its maps are not copied
        patch.setattr(SceneGeometry, "from_prediction", lambda _: pytest.fail("maps copied"))
        same, none = posed_by_tokens(prediction, options)
    assert same is prediction and none == {
        "source": "camera head",
        "why": "the model exports no match descriptors",
    }


def test_chunked_pose_report_maps_chunk_edges_to_global_views():
    extras = {
        "chunk_sim3": [],
        "chunks": [[0, 1, 2], [2, 3, 4], [4, 5, 6]],
        "chunk_token_poses": {
            0: {"source": "tokens", "tree_edges": [[0, 1], [2, 1]]},
            1: {"source": "camera head", "why": "views not connected by descriptor matches"},
        },  # chunk 2 was read back from the chunk file
    }
    report = chunked_pose_report(extras)
    assert report["source"] == "tokens and camera head"
    assert report["chunk_sources"] == ["tokens", "camera head", "stored in the chunk file"]
    assert report["tree_edges"] == [[0, 1], [1, 2]]
    extras["chunk_token_poses"][1] = {"source": "tokens", "tree_edges": [[1, 0], [2, 1]]}  # views 3-2, 4-3
    assert chunked_pose_report(extras)["tree_edges"] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert chunked_pose_report(extras)["source"] == "tokens"
    no_descriptors = {"source": "camera head", "why": "the model exports no match descriptors"}
    extras["chunk_token_poses"] = {0: no_descriptors, 1: no_descriptors, 2: no_descriptors}
    assert {k: v for k, v in chunked_pose_report(extras).items() if k != "chunk_sources"} == {
        **no_descriptors,
        "tree_edges": [],
    }
    del extras["chunk_token_poses"]
    assert chunked_pose_report(extras)["source"] == "camera head"


# mean-descriptor cosines of the shipped default on a 12-view synthetic orbit (seed 0, 392x294)
ORBIT_AFFINITY = """
1.0000 0.9817 0.9662 0.9647 0.9761 0.9695 0.9386 0.9539 0.9743 0.9831 0.9674 0.9827
0.9817 1.0000 0.9834 0.9864 0.9783 0.9666 0.9429 0.9626 0.9727 0.9592 0.9321 0.9593
0.9662 0.9834 1.0000 0.9905 0.9746 0.9729 0.9501 0.9510 0.9639 0.9473 0.9288 0.9589
0.9647 0.9864 0.9905 1.0000 0.9875 0.9695 0.9454 0.9576 0.9632 0.9472 0.9213 0.9493
0.9761 0.9783 0.9746 0.9875 1.0000 0.9679 0.9344 0.9480 0.9572 0.9612 0.9369 0.9557
0.9695 0.9666 0.9729 0.9695 0.9679 1.0000 0.9831 0.9624 0.9635 0.9484 0.9298 0.9549
0.9386 0.9429 0.9501 0.9454 0.9344 0.9831 1.0000 0.9734 0.9585 0.9180 0.8948 0.9294
0.9539 0.9626 0.9510 0.9576 0.9480 0.9624 0.9734 1.0000 0.9858 0.9454 0.9194 0.9484
0.9743 0.9727 0.9639 0.9632 0.9572 0.9635 0.9585 0.9858 1.0000 0.9746 0.9617 0.9808
0.9831 0.9592 0.9473 0.9472 0.9612 0.9484 0.9180 0.9454 0.9746 1.0000 0.9837 0.9834
0.9674 0.9321 0.9288 0.9213 0.9369 0.9298 0.8948 0.9194 0.9617 0.9837 1.0000 0.9878
0.9827 0.9593 0.9589 0.9493 0.9557 0.9549 0.9294 0.9484 0.9808 0.9834 0.9878 1.0000
"""


def test_a_duplicate_view_does_not_take_a_neighbour_slot():
    """The same view twice (PNG and JPEG, a pause in a video) has no baseline: each copy keeps its distinct
    partners, and the duplicate pair is tried besides. On this orbit the copy of view 5 had taken the slot
    of view 3, the link between the orbit's two halves, which was then chained the long way round and lost
    three views."""
    affinity = torch.tensor([[float(v) for v in row.split()] for row in ORBIT_AFFINITY.split("\n") if row])
    means = torch.linalg.cholesky(affinity.double()).float()  # unit vectors with these cosines
    copy = means[5] + 1e-5 * torch.arange(12.0)
    with_copy = torch.cat([means[:6], copy[None], means[6:]])[:, None, :]  # (S, P=1, C); view 6 = view 5
    plain = set(candidate_pairs(means[:, None, :], 3))
    pairs = set(candidate_pairs(with_copy, 3))
    assert (5, 6) in pairs

    def as_plain(view: int) -> int:
        return view if view < 6 else 5 if view == 6 else view - 1

    merged = {(as_plain(i), as_plain(j)) for i, j in pairs} - {(5, 5)}
    assert plain <= merged  # every link between distinct views survives, through either copy
    assert len(pairs) <= len(plain) + 2 * 3  # a bounded number of extra pairs
