"""A stand-in backbone for tests and benchmarks: the ground truth of a synthetic scene as a Prediction.

:class:`SceneOracle` is called like a backbone's ``predict`` on the preprocessed images and returns the
ground-truth cameras and depth at model resolution, in a random Sim(3) frame, optionally with Gaussian
noise on the camera rotations and centres (``speed3r_sfm.eval.evaluate.oracle_predictor``) and
multiplicative noise on depth. With ``records="ideal"`` it also returns GSA records computed from the
ground truth (the blocks a query block's pixels really project into), to exercise the GSA code path with
meaningful selections. With ``tracks=True`` its prediction carries a :class:`GroundTruthTracker` as
``extras["tracker"]``, standing in for a track head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from kornia.geometry.camera import unproject_points
from PIL import Image

from speed3r_sfm.data.images import ImageTransform, preprocess_images
from speed3r_sfm.data.raycast import intersect
from speed3r_sfm.data.synthetic import RenderedViews, SyntheticScene, camera_rays
from speed3r_sfm.eval.evaluate import oracle_predictor
from speed3r_sfm.geometry import depth_to_world_points, invert_pose, project_points, transform_points
from speed3r_sfm.models.prediction import Prediction

from .inputs import Preprocessing


def model_intrinsics(transform: ImageTransform, intrinsics: torch.Tensor) -> torch.Tensor:
    """K (3, 3) of an original image (integer centres) -> K of its model input (integer centres)."""
    return transform.intrinsics_from_original(intrinsics.double(), "integer")


def render_depth(
    scene: SyntheticScene,
    intrinsics: torch.Tensor,
    cam_from_world: torch.Tensor,
    height: int,
    width: int,
    chunk: int = 1 << 16,
) -> torch.Tensor:
    """Ground-truth z-depth (S, H, W) of ``scene`` seen by cameras (K integer centres, OpenCV poses)."""
    origins, dirs, z_per_t = camera_rays(intrinsics.float(), cam_from_world.float(), height, width)
    depth = torch.cat(
        [
            intersect(scene.primitives, origins[k : k + chunk], dirs[k : k + chunk]).t
            for k in range(0, len(dirs), chunk)
        ]
    )
    depth = torch.where(torch.isfinite(depth), depth * z_per_t, torch.zeros_like(depth))
    return depth.view(intrinsics.shape[0], height, width)


class SceneOracle:
    """Ground truth of a rendered scene, answered at whatever model resolution the pipeline asks for.

    ``intrinsics`` (S, 3, 3) and ``cam_from_world`` (S, 3, 4) describe the original images (integer-centre
    K), ``original_sizes`` their (W, H). Depth at model resolution is ray-cast from ``scene``, or taken
    from ``depth`` (S maps (h, w)): when the model input is the original image, or when the maps have the
    model input's size and were rendered with ``depth_intrinsics`` equal to the model input's K (e.g.
    images upscaled from the renders by an exact factor).
    """

    name = "oracle"

    def __init__(
        self,
        intrinsics: torch.Tensor,
        cam_from_world: torch.Tensor,
        original_sizes: Sequence[tuple[int, int]],
        preprocessing: Preprocessing,
        scene: SyntheticScene | None = None,
        depth: Sequence[torch.Tensor] | None = None,
        depth_intrinsics: torch.Tensor | None = None,
        rotation_noise_deg: float = 0.0,
        translation_noise: float = 0.0,
        depth_noise: float = 0.0,
        seed: int = 0,
        records: Literal["none", "ideal"] = "none",
        block_size: int = 64,
        query_block_size: int = 64,
        top_k: int = 8,
        tracks: bool = False,
    ) -> None:
        if scene is None and depth is None:
            raise ValueError("SceneOracle needs the scene (to ray-cast depth) or the depth maps")
        self.intrinsics = intrinsics.double()
        self.cam_from_world = cam_from_world.double()
        self.original_sizes = list(original_sizes)
        self.preprocessing = preprocessing
        self.scene = scene
        self.depth = depth
        self.depth_intrinsics = depth_intrinsics
        self.rotation_noise_deg = rotation_noise_deg
        self.translation_noise = translation_noise
        self.depth_noise = depth_noise
        self.seed = seed
        self.records = records
        self.block_size, self.query_block_size, self.top_k = block_size, query_block_size, top_k
        self.tracks = tracks
        self.calls = 0

    def transforms(self) -> list[ImageTransform]:
        """The original -> model transforms the pipeline's preprocessing produces for these sizes."""
        blanks = [Image.new("RGB", size) for size in self.original_sizes]
        p = self.preprocessing
        _, transforms = preprocess_images(blanks, p.mode, p.target_size, p.pixel_limit, p.patch_size)
        return transforms

    def __call__(self, images: torch.Tensor) -> Prediction:
        self.calls += 1
        if images.dim() == 4:
            images = images[None]
        s, height, width = images.shape[1], images.shape[-2], images.shape[-1]
        if s != len(self.original_sizes):
            raise ValueError(f"oracle built for {len(self.original_sizes)} views, got {s}")
        transforms = self.transforms()
        k_model = torch.stack(
            [model_intrinsics(t, k) for t, k in zip(transforms, self.intrinsics, strict=True)]
        )
        identity = all(t.scale == (1.0, 1.0) and t.crop == (0, 0) and t.pad == (0, 0) for t in transforms)
        sizes_match = self.depth is not None and all(tuple(d.shape) == (height, width) for d in self.depth)
        if self.depth_intrinsics is not None:
            same_cameras = torch.allclose(k_model, self.depth_intrinsics.double(), atol=1e-6)
        else:
            same_cameras = identity
        if self.scene is not None:
            depth = render_depth(self.scene, k_model, self.cam_from_world, height, width)
        elif sizes_match and same_cameras:
            depth = torch.stack([d.float() for d in self.depth])
        else:
            raise ValueError("the oracle has no scene to ray-cast depth at the model resolution")
        gt = RenderedViews(images[0].cpu(), depth, k_model.float(), self.cam_from_world.float())
        prediction = oracle_predictor(gt, self.seed, self.rotation_noise_deg, self.translation_noise)(
            images.cpu()
        )
        valid = (depth > 0).float()[None]
        prediction.depth_conf = valid.clone()
        prediction.world_points_conf = valid.clone()
        if self.depth_noise:
            gen = torch.Generator().manual_seed(self.seed + 1)
            noise = 1.0 + self.depth_noise * torch.randn(prediction.depth.shape, generator=gen)
            prediction.depth = prediction.depth * noise
        if self.tracks:
            prediction.extras["tracker"] = GroundTruthTracker(depth, k_model, self.cam_from_world)
        if self.records == "ideal":
            prediction.attention = ideal_records(
                depth,
                k_model,
                self.cam_from_world,
                self.preprocessing.patch_size,
                self.block_size,
                self.query_block_size,
                self.top_k,
            )
        return prediction


class GroundTruthTracker:
    """Exact tracks of a rendered scene, called like a track head's tracker (``track_verification.Tracker``):
    ``tracker(view, points (N, 2))`` -> the points' projections into every view (S, N, 2), visibility 1
    where the projection lies in the image, in front of the camera and not occluded (its depth within
    ``occlusion_tolerance`` of the depth map there), else 0; confidence = visibility."""

    def __init__(
        self,
        depth: torch.Tensor,
        intrinsics: torch.Tensor,
        cam_from_world: torch.Tensor,
        occlusion_tolerance: float = 0.02,
    ) -> None:
        self.depth = depth.double()  # (S, H, W) model resolution
        self.intrinsics = intrinsics.double()
        self.cam_from_world = cam_from_world.double()
        self.occlusion_tolerance = occlusion_tolerance

    def __call__(
        self, view: int, points: torch.Tensor, targets: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact tracks into every view (``targets`` is accepted for the protocol; all views are answered)."""
        s, height, width = self.depth.shape
        xy = points.double()
        col = xy[:, 0].round().long().clamp(0, width - 1)
        row = xy[:, 1].round().long().clamp(0, height - 1)
        z = self.depth[view, row, col]
        camera = unproject_points(xy, z[:, None], self.intrinsics[view].expand(xy.shape[0], 3, 3))
        world = transform_points(invert_pose(self.cam_from_world[view]), camera)
        uv, depth = project_points(world.expand(s, -1, -1), self.intrinsics, self.cam_from_world)
        inside = (
            (uv[..., 0] > -0.5)
            & (uv[..., 0] < width - 0.5)
            & (uv[..., 1] > -0.5)
            & (uv[..., 1] < height - 0.5)
        )
        cols = uv[..., 0].round().long().clamp(0, width - 1)
        rows = uv[..., 1].round().long().clamp(0, height - 1)
        seen = self.depth[torch.arange(s)[:, None], rows, cols]
        unoccluded = (depth - seen).abs() <= self.occlusion_tolerance * seen
        visible = (inside & (depth > 0) & unoccluded & (z > 0)[None]).float()
        return uv.float(), visible, visible.clone()


def ideal_records(
    depth: torch.Tensor,
    intrinsics: torch.Tensor,
    cam_from_world: torch.Tensor,
    patch_size: int,
    block_size: int,
    query_block_size: int,
    top_k: int,
    num_special: int = 5,
) -> list[dict[str, Any]]:
    """One GSA record (format of ``speed3r_sfm.attention.gsa``) whose selections follow the ground truth:
    query block t selects the blocks of other views its patch centres project into (depth-consistent),
    most hits first; ``block_importance`` is the share of other views' patches landing in each block."""
    s, height, width = depth.shape
    rows, cols = height // patch_size, width // patch_size
    num_patches = rows * cols
    tokens_per_view = num_special + num_patches
    blocks_per_view = -(-num_patches // block_size)
    num_tokens = s * tokens_per_view
    num_query_blocks = -(-num_tokens // query_block_size)
    centre = (
        torch.arange(rows) * patch_size + patch_size // 2,
        torch.arange(cols) * patch_size + patch_size // 2,
    )
    sub_depth = depth[:, centre[0]][:, :, centre[1]]  # (S, rows, cols)
    k_sub = intrinsics.clone().double()
    points = depth_to_world_points(depth.double(), k_sub, cam_from_world.double())[:, centre[0]][
        :, :, centre[1]
    ]
    hits = torch.zeros(num_query_blocks, s * blocks_per_view)
    importance = torch.zeros(s, blocks_per_view)
    for v in range(s):
        world = points[v].reshape(-1, 3)
        valid_v = sub_depth[v].reshape(-1) > 0
        token = v * tokens_per_view + num_special + torch.arange(num_patches)
        query = token // query_block_size
        for u in range(s):
            if u == v:
                continue
            uv, z = project_points(world, intrinsics[u].double(), cam_from_world[u].double())
            col = torch.floor((uv[:, 0] + 0.5) / patch_size).long()
            row = torch.floor((uv[:, 1] + 0.5) / patch_size).long()
            inside = valid_v & (z > 0) & (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
            target_depth = sub_depth[u][row.clamp(0, rows - 1), col.clamp(0, cols - 1)].double()
            inside &= (target_depth - z).abs() <= 0.05 * z
            patch = (row * cols + col)[inside]
            block = u * blocks_per_view + patch // block_size
            hits.index_put_((query[inside], block), torch.ones(block.numel()), accumulate=True)
            importance[u].index_add_(0, patch // block_size, torch.ones(patch.numel()))
    k = min(top_k, s * blocks_per_view)
    score, selected = hits.topk(k, dim=1)
    selected = torch.where(score > 0, selected, torch.full_like(selected, -1))
    probability = score / hits.sum(dim=1, keepdim=True).clamp_min(1.0)
    first = torch.arange(num_query_blocks) * query_block_size
    last = torch.clamp(first + query_block_size, max=num_tokens) - 1
    return [
        {
            "layer_index": 0,
            "num_views": s,
            "tokens_per_view": tokens_per_view,
            "num_special": num_special,
            "patch_grid": (rows, cols),
            "block_size": block_size,
            "blocks_per_view": blocks_per_view,
            "query_block_size": query_block_size,
            "block_importance": (importance / importance.sum(dim=1, keepdim=True).clamp_min(1.0))[None],
            "query_block_views": torch.stack([first // tokens_per_view, last // tokens_per_view], 1).int(),
            "selected_blocks": selected[None, None].int(),
            "selected_scores": probability[None, None].float(),
        }
    ]
