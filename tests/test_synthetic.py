"""Synthetic scenes: determinism, render outputs, depth geometry, trajectories."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from speed3r_sfm.data.raycast import QUAD, Primitives, intersect
from speed3r_sfm.data.synthetic import (
    camera_rays,
    make_cameras,
    make_scene,
    render_batch,
    render_scene,
    render_views,
)
from speed3r_sfm.data.trajectories import TRAJECTORIES
from speed3r_sfm.geometry import camera_centers, depth_to_world_points, look_at, project_points

H, W = 24, 32


def test_scene_and_render_are_deterministic_per_seed():
    a, b, c = make_scene(7), make_scene(7), make_scene(8)
    for name in ("quad_center", "box_center", "sphere_radius"):
        assert torch.equal(getattr(a.primitives, name), getattr(b.primitives, name))
    assert torch.equal(a.material_colours, b.material_colours)
    assert not torch.equal(a.primitives.quad_center, c.primitives.quad_center)
    v1 = render_scene(7, 3, H, W, "random")
    v2 = render_scene(7, 3, H, W, "random")
    assert torch.equal(v1.images, v2.images) and torch.equal(v1.depth, v2.depth)
    assert not torch.equal(v1.images, render_scene(8, 3, H, W, "random").images)


def test_render_shapes_ranges_and_conventions():
    views = render_scene(3, 4, H, W, "orbit")
    assert views.images.shape == (4, 3, H, W) and views.images.dtype == torch.float32
    assert views.depth.shape == (4, H, W)
    assert views.intrinsics.shape == (4, 3, 3) and views.cam_from_world.shape == (4, 3, 4)
    assert 0.0 <= views.images.min() and views.images.max() <= 1.0
    assert views.images.std() > 0.05, "images should be textured, not flat"
    assert (views.depth > 0).all(), "every ray in a closed room hits a surface"
    k = views.intrinsics[0]
    assert k[0, 2] == pytest.approx((W - 1) / 2) and k[1, 2] == pytest.approx((H - 1) / 2)
    rot = views.cam_from_world[:, :, :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(4, 3, 3), atol=1e-5)
    assert torch.allclose(torch.det(rot), torch.ones(4), atol=1e-5)


def test_depth_of_a_plane_matches_the_analytic_z_depth():
    """A camera 1.5 m above an infinite-like floor: z-depth of pixel (u, v) is h / (R^T K^-1 [u, v, 1])_z."""
    scene = make_scene(0)
    floor = Primitives(
        quad_center=torch.zeros(1, 3),
        quad_u=torch.tensor([[50.0, 0.0, 0.0]]),
        quad_v=torch.tensor([[0.0, 50.0, 0.0]]),
        box_center=torch.zeros(0, 3),
        box_rotation=torch.zeros(0, 3, 3),
        box_half=torch.zeros(0, 3),
        sphere_center=torch.zeros(0, 3),
        sphere_radius=torch.zeros(0),
    )
    scene = dataclasses.replace(
        scene,
        primitives=floor,
        material=(
            torch.zeros(1, dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
        ),
    )
    eye = torch.tensor([0.3, -0.2, 1.5], dtype=torch.float64)
    pose = look_at(eye, torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))[None]
    k = torch.tensor([[30.0, 0.0, 15.5], [0.0, 30.0, 11.5], [0.0, 0.0, 1.0]], dtype=torch.float64)[None]
    views = render_views(scene, k.float(), pose.float(), H, W)
    v, u = torch.meshgrid(
        torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij"
    )
    ray_cam = torch.stack(
        [(u - k[0, 0, 2]) / k[0, 0, 0], (v - k[0, 1, 2]) / k[0, 1, 1], torch.ones_like(u)], -1
    )
    ray_world_z = (ray_cam @ pose[0, :, :3])[..., 2]  # R^T d, z component
    expected = torch.where(ray_world_z < 0, eye[2] / -ray_world_z, torch.zeros_like(ray_world_z))
    assert (expected > 0).float().mean() > 0.3
    assert torch.allclose(views.depth[0].double(), expected, rtol=1e-4, atol=1e-5)
    points = depth_to_world_points(views.depth[0].double(), k[0], pose[0])
    assert points[expected > 0][:, 2].abs().max() < 1e-4


def test_depth_reprojects_consistently_between_views():
    scene = make_scene(11)
    k, pose = make_cameras(scene, 12, 48, 64, "orbit")
    views = render_views(scene, k[:2], pose[:2], 48, 64)  # neighbours on a 12-view orbit
    pts = views.world_points()[0].reshape(-1, 3)
    uv, z = project_points(pts, views.intrinsics[1], views.cam_from_world[1])
    col, row = uv[:, 0].round().long(), uv[:, 1].round().long()
    inside = (z > 0) & (col >= 0) & (col < 64) & (row >= 0) & (row < 48)
    target = views.depth[1][row[inside], col[inside]]
    rel = (target - z[inside]).abs() / z[inside]
    assert inside.sum() > 500, "views of an orbit should overlap"
    # Occluded points and silhouette edges disagree; the visible surface must agree to rounding.
    assert (rel < 0.03).float().mean() > 0.8
    # Exact check away from rounding: the centre pixel of view 1, unprojected, reprojects to itself.
    centre = views.world_points()[1, 24, 32]
    uv1, z1 = project_points(centre[None], views.intrinsics[1], views.cam_from_world[1])
    assert torch.allclose(uv1[0], torch.tensor([32.0, 24.0]), atol=1e-3)
    assert z1[0] == pytest.approx(views.depth[1, 24, 32].item(), rel=1e-5)


@pytest.mark.parametrize("kind", TRAJECTORIES)
def test_trajectories_stay_in_free_space_and_look_at_content(kind):
    object_fractions = []
    for seed in range(4):
        scene = make_scene(seed)
        k, pose = make_cameras(scene, 8, H, W, kind)
        centres = camera_centers(pose.double())
        sx, sy, sz = scene.layout.size
        assert (centres[:, 0].abs() < sx / 2 - 0.4).all() and (centres[:, 1].abs() < sy / 2 - 0.4).all()
        assert ((centres[:, 2] > 0.5) & (centres[:, 2] < sz - 0.4)).all()
        prims = scene.primitives
        box_dist = (centres[:, None, :2] - prims.box_center[None, :, :2].double()).norm(dim=-1)
        box_reach = prims.box_half[:, :2].double().norm(dim=-1)
        assert (box_dist > box_reach + 0.2).all(), "a camera is inside a box"
        sphere_dist = (centres[:, None] - prims.sphere_center[None].double()).norm(dim=-1)
        assert (sphere_dist > prims.sphere_radius.double() + 0.2).all()
        origins, dirs, z_per_t = camera_rays(k, pose, H, W)
        hits = intersect(prims, origins, dirs)
        depth = (hits.t * z_per_t).reshape(8, -1)
        assert depth.min() > 0.3, "a camera stares at a surface from too close"
        object_fractions.append((hits.kind != QUAD).float().reshape(8, -1).mean(1))
        if kind == "forward":  # video-like: small steps between consecutive frames
            assert (centres[1:] - centres[:-1]).norm(dim=-1).max() < 0.5
    fractions = torch.cat(object_fractions)
    if kind == "forward":
        assert (fractions > 0.05).float().mean() >= 0.85
    else:
        assert (fractions > 0.03).all(), "every orbit/random view should see objects"


def test_supersampling_keeps_centre_depth_and_changes_colour_slightly():
    scene = make_scene(2)
    k, pose = make_cameras(scene, 2, H, W, "orbit")
    one = render_views(scene, k, pose, H, W)
    two = render_views(scene, k, pose, H, W, supersample=2)
    assert torch.equal(one.depth, two.depth)
    diff = (one.images - two.images).abs().mean()
    assert 0 < diff < 0.1


def test_render_batch_stacks_scenes():
    batch = render_batch([1, 2], 2, H, W, trajectory=["orbit", "forward"])
    assert batch.images.shape == (2, 2, 3, H, W) and batch.cam_from_world.shape == (2, 2, 3, 4)
    single = render_scene(2, 2, H, W, "forward")
    assert torch.equal(batch.images[1], single.images)
    with pytest.raises(ValueError, match="unknown trajectory"):
        render_batch([1], 2, H, W, trajectory="spiral")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_render_matches_cpu():
    cpu = render_scene(5, 2, H, W, "random")
    gpu = render_scene(5, 2, H, W, "random", device="cuda").to("cpu")
    assert torch.allclose(cpu.depth, gpu.depth, rtol=1e-4, atol=1e-4)
    # Texture lattices can flip at a few pixels where float rounding crosses a cell boundary.
    assert ((cpu.images - gpu.images).abs() > 1e-2).float().mean() < 0.01


def test_every_surface_has_its_own_material():
    """No two walls (or any two surfaces) look alike: one material per primitive, distinct colours."""
    scene = make_scene(4)
    materials = torch.cat(scene.material)
    assert len(set(materials.tolist())) == materials.numel()
    colours = scene.material_colours.flatten(1)
    pairwise = (colours[:, None] - colours[None]).abs().amax(-1)
    off_diagonal = ~torch.eye(colours.shape[0], dtype=torch.bool)
    assert pairwise[off_diagonal].min() > 1e-3


def test_cameras_take_the_scene_field_of_view_unless_one_is_given():
    scene = make_scene(11)
    k, pose = make_cameras(scene, 4, 48, 64, "forward")
    narrow, same_pose = make_cameras(scene, 4, 48, 64, "forward", fov_x_deg=35.0)
    assert k[0, 0, 0].item() == pytest.approx(32.0 / math.tan(math.radians(scene.fov_x_deg) / 2), rel=1e-6)
    assert narrow[:, 0, 0] == pytest.approx([32.0 / math.tan(math.radians(17.5))] * 4, rel=1e-6)
    assert torch.equal(narrow[:, :2, 2], k[:, :2, 2]) and torch.equal(same_pose, pose)
