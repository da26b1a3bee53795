"""A classical fallback for views whose feed-forward pose is too far off for matching to find anything.

Matching predicts where a keypoint lands from the feed-forward poses and depth; a view whose pose is tens of
degrees off gets no correspondences at all, so :mod:`.rescue` has nothing to re-pose it by PnP with. Here such
a view is matched with SIFT (pycolmap's extractor, kornia's mutual-nearest ratio matcher) to its nearest
registered views, whose own SIFT matches are triangulated at their adjusted poses, as an incremental mapper
registers the next image: PnP on those 2D-3D pairs gives the view a pose close enough for matching again to
link it. SIFT only starts the view off: its final pose comes from the refined matches and bundle adjustment,
as every other view's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from itertools import combinations

import numpy as np
import pycolmap
import torch
import torch.nn.functional as F
from kornia.feature import match_smnn

from .colmap_log import colmap_log_level
from .inputs import View
from .pnp import absolute_pose


class SiftFeatures:
    """SIFT keypoints (original pixels, COLMAP convention) and descriptors of views, computed on first use
    on the work copy downscaled to ``image_size`` pixels on the long side, and their matches (mutual nearest
    neighbours passing Lowe's ``ratio`` test), kept for the whole run."""

    def __init__(self, views: Sequence[View], image_size: int, ratio: float) -> None:
        self.views, self.image_size, self.ratio = views, image_size, ratio
        self.extractor: pycolmap.FeatureExtractor | None = None
        self.cache: dict[int, tuple[np.ndarray, torch.Tensor]] = {}
        self.pairs: dict[tuple[int, int], np.ndarray] = {}

    def matches(self, a: int, b: int) -> np.ndarray:
        """(M, 2) indices of the matched keypoints of views ``a`` and ``b``."""
        if (b, a) in self.pairs:
            return self.pairs[b, a][:, ::-1]
        if (a, b) not in self.pairs:
            descriptors_a, descriptors_b = self(a)[1], self(b)[1]
            found = np.zeros((0, 2), dtype=np.int64)
            if len(descriptors_a) >= 2 and len(descriptors_b) >= 2:
                found = match_smnn(descriptors_a, descriptors_b, self.ratio)[1].numpy()
            self.pairs[a, b] = found
        return self.pairs[a, b]

    def scale(self, view: int) -> float:
        """Original pixels per pixel of the copy SIFT runs on."""
        image = self.views[view]
        return max(image.original_size) / min(self.image_size, max(image.work_size))

    def __call__(self, view: int) -> tuple[np.ndarray, torch.Tensor]:
        """((N, 2) float64 original pixels, (N, 128) float32 descriptors) of ``view``."""
        if view not in self.cache:
            image = self.views[view]
            gray = image.gray()
            scale = min(1.0, self.image_size / max(gray.shape))
            if scale < 1.0:
                size = (round(gray.shape[0] * scale), round(gray.shape[1] * scale))
                gray = F.interpolate(gray[None, None], size=size, mode="bilinear", antialias=True)[0, 0]
            pixels = (gray.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            if self.extractor is None:
                options = pycolmap.FeatureExtractionOptions()
                options.sift.first_octave = 0  # no upsampled first octave: 4x less work
                with colmap_log_level():  # no "Creating SIFT CPU feature extractor" in the user's terminal
                    self.extractor = pycolmap.FeatureExtractor.create(options, pycolmap.Device.cpu)
            keypoints, descriptors = self.extractor.extract_from_uint8_array(pixels)
            xy = np.array([[k.x, k.y] for k in keypoints], dtype=np.float64).reshape(-1, 2)
            # COLMAP convention (pixel edges at integers) scales with the image size
            xy *= np.array(image.original_size, dtype=np.float64) / np.array(pixels.shape[::-1])
            self.cache[view] = xy, torch.from_numpy(np.asarray(descriptors.data, dtype=np.float32))
        return self.cache[view]


def nearest_registered(
    view: int, registered: Sequence[int], num_views: int, tree_edges: Sequence[tuple[int, int]], count: int
) -> list[int]:
    """Up to ``count`` of the ``registered`` views nearest to ``view``: by hops in the feed-forward pose tree
    (views it predicts to overlap), else, without a tree, by distance in the image order."""
    if not tree_edges:
        return sorted(registered, key=lambda other: (abs(other - view), other))[:count]
    neighbours: list[list[int]] = [[] for _ in range(num_views)]
    for a, b in tree_edges:
        neighbours[a].append(b)
        neighbours[b].append(a)
    hops, queue = {view: 0}, deque([view])
    while queue:
        current = queue.popleft()
        for other in neighbours[current]:
            if other not in hops:
                hops[other] = hops[current] + 1
                queue.append(other)
    reachable = [other for other in registered if other in hops]
    return sorted(reachable, key=lambda other: (hops[other], other))[:count]


def triangulated(
    rec: pycolmap.Reconstruction,
    a: int,
    b: int,
    xy_a: np.ndarray,
    xy_b: np.ndarray,
    max_error: float,
    min_angle_deg: float,
) -> tuple[np.ndarray, np.ndarray]:
    """World points (K, 3) of the matched original pixels ``xy_a`` / ``xy_b`` (N, 2) of registered views
    ``a`` and ``b``, triangulated at their adjusted poses and cameras, and the (K,) indices of the matches
    kept: in front of both cameras, reprojected within ``max_error`` pixels in both and seen under at least
    ``min_angle_deg`` degrees."""
    images = [rec.image(a + 1), rec.image(b + 1)]
    cameras = [rec.cameras[image.camera_id] for image in images]
    poses = [image.cam_from_world() for image in images]
    rays = [camera.cam_from_img(xy) for camera, xy in zip(cameras, (xy_a, xy_b), strict=True)]
    matrices = [pose.matrix() for pose in poses]
    points, kept = [], []
    for k in range(len(xy_a)):
        point = pycolmap.triangulate_point(matrices[0], matrices[1], rays[0][k], rays[1][k])
        if point is not None:
            points.append(point.ravel())
            kept.append(k)
    if not points:
        return np.zeros((0, 3)), np.zeros(0, dtype=np.int64)
    points_arr, kept_arr = np.array(points), np.array(kept)
    good = np.ones(len(points_arr), dtype=bool)
    centres = []
    for pose, camera, xy in zip(poses, cameras, (xy_a, xy_b), strict=True):
        cam = pose * points_arr
        good &= cam[:, 2] > 0
        projected = camera.img_from_cam(np.where(good[:, None], cam, 1.0))
        good &= np.linalg.norm(projected - xy[kept_arr], axis=1) <= max_error
        centres.append(pose.inverse().translation)
    rays_a, rays_b = points_arr - centres[0], points_arr - centres[1]
    cosine = (rays_a * rays_b).sum(1) / (np.linalg.norm(rays_a, axis=1) * np.linalg.norm(rays_b, axis=1))
    good &= cosine <= np.cos(np.radians(min_angle_deg))
    return points_arr[good], kept_arr[good]


def sift_pose(
    rec: pycolmap.Reconstruction,
    features: SiftFeatures,
    view: int,
    camera: pycolmap.Camera,
    neighbours: Sequence[int],
    max_error: float,
    min_angle_deg: float,
    estimate_focal: bool = False,
) -> tuple[pycolmap.Rigid3d, np.ndarray, np.ndarray, pycolmap.Camera] | None:
    """PnP pose of ``view`` seen by ``camera`` on the SIFT keypoints of the registered ``neighbours`` that
    SIFT matches between pairs of them triangulate (module docstring): (cam_from_world, inlier original
    pixels (K, 2), their 3D points (K, 3), the camera, its focal length estimated with ``estimate_focal``
    (:func:`.pnp.absolute_pose`)), or None without a pose. ``max_error`` (original pixels) bounds both the
    triangulation's and PnP's reprojection errors."""
    point_of: dict[int, dict[int, np.ndarray]] = {other: {} for other in neighbours}
    for a, b in combinations(neighbours, 2):
        pairs = features.matches(a, b)
        xy_a, xy_b = features(a)[0][pairs[:, 0]], features(b)[0][pairs[:, 1]]
        xyz, kept = triangulated(rec, a, b, xy_a, xy_b, max_error, min_angle_deg)
        for (index_a, index_b), point in zip(pairs[kept], xyz, strict=True):
            point_of[a].setdefault(int(index_a), point)
            point_of[b].setdefault(int(index_b), point)
    xy = features(view)[0]
    pixels, points = [], []
    for other in neighbours:
        for index, other_index in features.matches(view, other).tolist():
            if other_index in point_of[other]:
                pixels.append(xy[index])
                points.append(point_of[other][other_index])
    if len(pixels) < 4:
        return None
    xy_all, xyz_all = np.array(pixels), np.array(points)
    found = absolute_pose(xy_all, xyz_all, camera, max_error, estimate_focal)
    if found is None:
        return None
    result, camera = found
    inliers = np.asarray(result["inlier_mask"], dtype=bool)
    return result["cam_from_world"], xy_all[inliers], xyz_all[inliers], camera
