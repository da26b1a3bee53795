"""A second chance for views that bundle adjustment left weakly linked.

A view whose feed-forward pose is far off (a bad token-pose edge) gets few matches: matching predicts where
its keypoints land from that pose, and the photometric search finds nothing there. Bundle adjustment then
fits it to the handful of points it has, and :func:`~.bundle.drop_weakly_linked_images` de-registers it.

The few correspondences it has are usually right. :func:`rescued_geometry` re-poses such views by PnP
(pycolmap LO-RANSAC and refinement) on their 2D observations of the main group's 3D points (optionally,
a view of the same weak group without enough of them keeps its feed-forward pose relative to the group's
best re-posed member, its baseline rescaled to the main group's scale). Every registered view takes its
pose from bundle adjustment, and every view's depth is rescaled to the 3D points it sees. Matching again
on that geometry (``reconstruct.run_pipeline``), with the weak views' earlier matches kept, links them;
a rescued pose that is wrong stays weakly linked and is dropped again.

A view without enough correspondences for PnP (none at all when its pose was far off) is placed by the
classical fallback of :mod:`.sift_rescue` instead: SIFT matches to registered neighbours, triangulated there.

On held-out synthetic orbits the views de-registered this way were a contiguous run whose token-pose edge
to the rest was 15-27 degrees off; each round re-posed the views next to the main group (7-20
correspondences) and matching again linked them, so that the next round could pose their neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pycolmap
import torch

from speed3r_sfm.geometry import compose_poses, invert_pose

from .checks import require_at_least
from .colmap_model import view_camera
from .frames import SceneGeometry, apply_pose, intrinsics_to_original, original_to_work, work_to_model
from .inputs import View
from .pnp import absolute_pose, has_own_camera
from .sift_rescue import SiftFeatures, nearest_registered, sift_pose
from .tracks import connected_components


@dataclass
class RescueOptions:
    """Second chance for views that bundle adjustment de-registered as weakly linked (module docstring).

    Attributes:
        enabled: re-pose de-registered views by PnP and match again, while that registers more views.
        max_rounds: most rounds of re-posing and matching again (0: none).
        min_inliers: PnP inliers a view needs to be re-posed.
        max_error: PnP RANSAC threshold (work pixels); the view's observations must then still pass bundle
            adjustment's filter in original pixels.
        move_weak_group: also move the views of a weak group that PnP cannot pose along with the group's
            best re-posed view (registers more views, but may register some of them at a wrong pose).
        sift: views PnP cannot re-pose (too few correspondences) are posed from SIFT matches to their nearest
            registered views (a classical fallback).
        sift_image_size: long side (pixels) of the copies SIFT runs on.
        sift_neighbours: nearest registered views a view is SIFT-matched to: nearest in the feed-forward
            pose tree, then, if those give too few matches, nearest in the image order.
        sift_ratio: Lowe's ratio test of the SIFT matches (with mutual nearest neighbours); lower is
            stricter.
        sift_min_inliers: PnP inliers a view needs to be posed by SIFT.
        sift_max_error: reprojection threshold (pixels of the SIFT copies) of triangulation and PnP.
        sift_min_angle: smallest triangulation angle (degrees) of the SIFT points.
        estimate_focal: a view with a camera of its own (one camera per image): PnP estimates its focal
            length too, and the next pass starts from it.
    """

    enabled: bool = True
    max_rounds: int = 3
    min_inliers: int = 6
    max_error: float = 4.0
    # off by default: on one held-out orbit with one camera per image it sometimes registered views 6-20
    # degrees off; later rounds pose them by PnP instead
    move_weak_group: bool = False
    # views PnP cannot re-pose (too few correspondences): SIFT matches to their ``sift_neighbours`` nearest
    # registered views (by the pose tree, else by image order), triangulated there, and PnP on those
    # (``sift_rescue.py``)
    sift: bool = True
    sift_image_size: int = 640  # long side of the copies SIFT runs on
    sift_neighbours: int = 3
    sift_ratio: float = 0.85  # Lowe's ratio test, with mutual nearest neighbours
    sift_min_inliers: int = 20
    sift_max_error: float = 4.0  # pixels of the SIFT copies: triangulation and PnP
    sift_min_angle: float = 1.5  # degrees, triangulation
    # a view with a camera of its own (one camera per image): PnP estimates its focal length too, and the
    # next pass starts from it (the model's focal length of a view whose pose was far off is suspect too)
    estimate_focal: bool = True

    def __post_init__(self) -> None:
        require_at_least(self, max_rounds=0)


def pose_matrix(rigid: pycolmap.Rigid3d) -> torch.Tensor:
    """(3, 4) float64 cam_from_world of a pycolmap pose."""
    return torch.from_numpy(np.asarray(rigid.matrix(), dtype=np.float64))


def correspondences_2d3d(
    rec: pycolmap.Reconstruction,
    pair_matches: dict[tuple[int, int], np.ndarray],
    points2d: Sequence[np.ndarray],
    view: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) original pixels of ``view`` matched to (N, 3) 3D points of registered images (image id =
    view + 1), one per 2D point (the first 3D point found)."""
    registered = set(rec.reg_image_ids())
    found: dict[int, int] = {}
    for (a, b), matches in pair_matches.items():
        if view not in (a, b):
            continue
        other, mine, theirs = (
            (b, matches[:, 0], matches[:, 1]) if a == view else (a, matches[:, 1], matches[:, 0])
        )
        if other + 1 not in registered:
            continue
        points = rec.image(other + 1).points2D
        for m, t in zip(mine.tolist(), theirs.tolist(), strict=True):
            if m not in found and points[t].has_point3D():
                found[m] = points[t].point3D_id
    if not found:
        return np.zeros((0, 2)), np.zeros((0, 3))
    xy = np.stack([points2d[view][m] for m in found]).astype(np.float64)
    xyz = np.stack([rec.points3D[p].xyz for p in found.values()]).astype(np.float64)
    return xy, xyz


def shared_matches(pair_matches: dict[tuple[int, int], np.ndarray], a: int, b: int) -> int:
    """Matched 2D point pairs between views ``a`` and ``b``."""
    key = (min(a, b), max(a, b))
    return len(pair_matches[key]) if key in pair_matches else 0


def rescued_geometry(
    rec: pycolmap.Reconstruction,
    views: Sequence[View],
    geometry: SceneGeometry,
    pair_matches: dict[tuple[int, int], np.ndarray],
    points2d: Sequence[np.ndarray],
    dropped: Sequence[int],
    options: RescueOptions,
    pixel_scale: float = 1.0,
    tree_edges: Sequence[tuple[int, int]] = (),
    features: SiftFeatures | None = None,
    pnp: bool = True,
) -> tuple[SceneGeometry, list[dict]] | None:
    """The geometry to match again with (module docstring) and what happened to each dropped view, or None
    when no dropped view could be re-posed.

    ``dropped``: image ids de-registered as weakly linked; ``rec``: after the drop, in the same world frame
    as ``geometry`` (the geometry its pass matched with); ``pair_matches`` and ``points2d``: that pass's;
    ``tree_edges``: the feed-forward pose tree (view pairs), which picks the views SIFT matches a view to;
    ``features``: SIFT features kept between rounds (made here when None); ``pnp``: False to pose the views
    by SIFT only (where their own matches are suspect).
    """
    poses = registered_poses(rec, geometry)
    intrinsics = geometry.intrinsics.clone()
    seen = {
        image_id - 1: correspondences_2d3d(rec, pair_matches, points2d, image_id - 1) for image_id in dropped
    }
    placed: dict[int, dict] = {}

    def estimates_focal(view: int) -> bool:  # as COLMAP's mapper: not for a camera of known intrinsics
        camera = rec.cameras[rec.image(view + 1).camera_id]
        return options.estimate_focal and has_own_camera(rec, view + 1) and not camera.has_prior_focal_length

    def place(view: int, pose: pycolmap.Rigid3d, camera: pycolmap.Camera, how: str, inliers: int) -> None:
        poses[view] = pose_matrix(pose)
        placed[view].update(how=how, inliers=inliers)
        if estimates_focal(view):  # the next pass starts from it (original -> model pixels)
            focal = camera.mean_focal_length()
            scale_x, scale_y = views[view].transform.scale
            intrinsics[view, 0, 0], intrinsics[view, 1, 1] = focal * scale_x, focal * scale_y
            placed[view]["focal_length"] = round(focal, 2)

    for view, (xy, xyz) in seen.items():
        placed[view] = {"name": views[view].name, "correspondences": len(xy), "how": "not re-posed"}
        if pnp and len(xy) >= max(options.min_inliers, 4):
            camera, error = pnp_camera(rec, views, geometry, view), options.max_error * pixel_scale
            found = absolute_pose(xy, xyz, camera, error, estimates_focal(view))
            if found is not None and int(found[0]["num_inliers"]) >= options.min_inliers:
                result, camera = found
                place(view, result["cam_from_world"], camera, "pnp", int(result["num_inliers"]))
    if options.sift:
        features = features or SiftFeatures(views, options.sift_image_size, options.sift_ratio)
        registered = [image_id - 1 for image_id in rec.reg_image_ids()]
        for view, entry in placed.items():
            if entry["how"] != "not re-posed":
                continue
            max_error = options.sift_max_error * features.scale(view)
            camera, focal = pnp_camera(rec, views, geometry, view), estimates_focal(view)
            # the views the pose tree puts nearest, else those nearest in the image order: a wrong tree link
            # (the reason a view hangs on few points) can put the other side of an orbit "nearest"
            by_tree = nearest_registered(view, registered, len(views), tree_edges, options.sift_neighbours)
            by_order = nearest_registered(view, registered, len(views), (), options.sift_neighbours)
            for near in [by_tree] + ([by_order] if by_order != by_tree else []):
                found = sift_pose(rec, features, view, camera, near, max_error, options.sift_min_angle, focal)
                if found is not None and len(found[1]) >= options.sift_min_inliers:
                    pose, xy, xyz, camera = found
                    seen[view] = xy, xyz
                    place(view, pose, camera, "sift", len(xy))
                    entry["matched_to"] = [views[n].name for n in near]
                    break
    if all(entry["how"] == "not re-posed" for entry in placed.values()):
        return None
    if options.move_weak_group:
        _move_with_group(views, geometry, poses, placed, seen, pair_matches)
    # depth to the scale of the adjusted poses: matching lifts keypoints with it
    points = observed_points(rec)
    points.update({view: seen[view] for view, entry in placed.items() if entry["how"] != "not re-posed"})
    depth, ratios = rescaled_depth(views, geometry, poses, points)
    for view, ratio in ratios.items():
        if view in placed:
            placed[view]["depth_rescaled_by"] = round(ratio, 4)
    return replace(geometry, cam_from_world=poses, depth=depth, intrinsics=intrinsics), list(placed.values())


def pnp_camera(
    rec: pycolmap.Reconstruction, views: Sequence[View], geometry: SceneGeometry, view: int
) -> pycolmap.Camera:
    """The camera a de-registered ``view`` is re-posed with: a shared camera as the registered views refined
    it; a camera of the view's own as the model predicted it (zero distortion), as the next pass rebuilds
    it. Bundle adjustment fitted that one to the handful of points that left the view weakly linked: on a
    held-out orbit, focal lengths 10-40 % off and radial distortion down to -1.04. A camera of known
    intrinsics (``has_prior_focal_length``; bundle adjustment holds them) is used as it is."""
    camera = rec.cameras[rec.image(view + 1).camera_id]
    if not has_own_camera(rec, view + 1) or camera.has_prior_focal_length:
        return camera
    k = intrinsics_to_original(views[view], geometry.intrinsics[view]).numpy()
    return view_camera(views[view], k, camera.model.name)


def registered_poses(rec: pycolmap.Reconstruction, geometry: SceneGeometry) -> torch.Tensor:
    """(S, 3, 4) cam_from_world: the adjusted pose of every registered view, ``geometry``'s for the rest."""
    poses = geometry.cam_from_world.clone()
    for image_id in rec.reg_image_ids():
        poses[image_id - 1] = pose_matrix(rec.image(image_id).cam_from_world())
    return poses


def rescaled_depth(
    views: Sequence[View],
    geometry: SceneGeometry,
    poses: torch.Tensor,
    points: dict[int, tuple[np.ndarray, np.ndarray]],
) -> tuple[torch.Tensor, dict[int, float]]:
    """``geometry``'s depth with each view of ``points`` (view -> its original pixels and the 3D points seen
    there) rescaled by :func:`depth_ratio` under ``poses``; and the ratios applied."""
    depth = geometry.depth.clone()
    ratios = {}
    for view, (xy, xyz) in sorted(points.items()):
        ratio = depth_ratio(views[view], geometry, view, poses[view], xy, xyz)
        if ratio is not None:
            depth[view] *= ratio
            ratios[view] = ratio
    return depth, ratios


def adjusted_geometry(
    rec: pycolmap.Reconstruction, views: Sequence[View], geometry: SceneGeometry
) -> SceneGeometry:
    """``geometry`` with every registered view at its adjusted pose and its depth rescaled to the 3D points
    it sees (the others as they were)."""
    poses = registered_poses(rec, geometry)
    points = observed_points(rec)
    depth, _ = rescaled_depth(views, geometry, poses, points)
    return replace(geometry, cam_from_world=poses, depth=depth)


def _move_with_group(
    views: Sequence[View],
    geometry: SceneGeometry,
    poses: torch.Tensor,
    placed: dict[int, dict],
    seen: dict[int, tuple[np.ndarray, np.ndarray]],
    pair_matches: dict[tuple[int, int], np.ndarray],
) -> None:
    """Pose, in place, every weak view PnP could not pose by its feed-forward pose relative to the re-posed
    view with the most inliers in its weak group (views linked by matches), the baseline rescaled to the
    main group's scale."""
    posed = [view for view, entry in placed.items() if entry["how"] in ("pnp", "sift")]
    # per re-posed view: scale of the main group's points over its (the weak group's) depth
    scale = {p: depth_ratio(views[p], geometry, p, poses[p], *seen[p]) or 1.0 for p in posed}
    weak = sorted(placed)
    edges = [(a, b) for k, a in enumerate(weak) for b in weak[k + 1 :] if shared_matches(pair_matches, a, b)]
    labels = connected_components(len(weak), np.array([(weak.index(a), weak.index(b)) for a, b in edges]))
    group = {view: int(label) for view, label in zip(weak, labels, strict=True)}
    for view, entry in placed.items():
        linked = [p for p in posed if group[p] == group[view]]
        if view in posed or not linked:
            continue
        anchor = max(linked, key=lambda p: placed[p]["inliers"])
        view_from_anchor = compose_poses(
            geometry.cam_from_world[view], invert_pose(geometry.cam_from_world[anchor])
        )
        view_from_anchor[:, 3] *= scale[anchor]
        poses[view] = compose_poses(view_from_anchor, poses[anchor])
        entry.update(how=f"with {views[anchor].name}")


def observed_points(rec: pycolmap.Reconstruction) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per registered view (image id - 1), (N, 2) original pixels and (N, 3) 3D points of its observations."""
    items = list(rec.points3D.items())
    ids = np.fromiter((point3D_id for point3D_id, _ in items), dtype=np.int64, count=len(items))
    xyz = np.array([point.xyz for _, point in items], dtype=np.float64).reshape(-1, 3)
    order = np.argsort(ids)
    ids, xyz = ids[order], xyz[order]
    found = {}
    for image_id in rec.reg_image_ids():
        observed = rec.image(image_id).get_observation_points2D()
        seen = np.fromiter((p.point3D_id for p in observed), dtype=np.int64, count=len(observed))
        pixels = np.array([p.xy for p in observed], dtype=np.float64).reshape(-1, 2)
        found[image_id - 1] = pixels, xyz[np.searchsorted(ids, seen)]
    return found


def depth_ratio(
    image: View, geometry: SceneGeometry, view: int, pose: torch.Tensor, xy: np.ndarray, xyz: np.ndarray
) -> float | None:
    """Median over correspondences of (depth of the 3D point ``xyz`` under ``pose``) / (predicted depth at
    the original pixel ``xy``); None without any."""
    if len(xy) == 0:
        return None
    z = apply_pose(pose, torch.from_numpy(np.asarray(xyz, dtype=np.float64)))[:, 2]
    pixels = torch.from_numpy(np.asarray(xy, dtype=np.float64))
    model_xy = work_to_model(image, original_to_work(image, pixels))
    predicted = geometry.sample(geometry.depth, view, model_xy).double()
    ratio = z / predicted
    ratio = ratio[torch.isfinite(ratio) & (ratio > 0)]
    return float(ratio.median()) if ratio.numel() else None
