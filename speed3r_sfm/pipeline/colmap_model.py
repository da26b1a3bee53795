"""Predictions to a pycolmap 4.x ``Reconstruction``: cameras, trivial rigs/frames, images, points.

Cameras carry the predicted intrinsics mapped to each original image (COLMAP pixel convention); models
with distortion start with zero distortion. Each image gets a trivial rig (``add_camera_with_trivial_rig``)
and frame (``add_image_with_trivial_frame``) posed at the predicted ``cam_from_world``; its 2D points are
all of the view's points in original pixels, so that point2D indices equal the database keypoint indices.
Tracks become 3D points through a :class:`pycolmap.ObservationManager`, initialised from the predicted
depth of their observations.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Literal

import numpy as np
import pycolmap
import torch

from speed3r_sfm.geometry import camera_centers

from .frames import SceneGeometry, intrinsics_to_original, work_to_model, work_to_original
from .inputs import InputError, View
from .tracks import Tracks

CAMERA_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV")


def camera_params(model: str, k: np.ndarray) -> list[float]:
    """COLMAP parameters of ``model`` for a pinhole K (COLMAP convention), with zero distortion."""
    fx, fy, cx, cy = float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2])
    f = 0.5 * (fx + fy)
    params = {
        "SIMPLE_PINHOLE": [f, cx, cy],
        "PINHOLE": [fx, fy, cx, cy],
        "SIMPLE_RADIAL": [f, cx, cy, 0.0],
        "RADIAL": [f, cx, cy, 0.0, 0.0],
        "OPENCV": [fx, fy, cx, cy, 0.0, 0.0, 0.0, 0.0],
    }
    if model not in params:
        raise ValueError(f"unsupported camera model {model!r}; choose one of {CAMERA_MODELS}")
    return params[model]


def parse_camera_params(camera_model: str, params: str | Sequence[float]) -> list[float]:
    """Known intrinsics in COLMAP's parameter order of ``camera_model`` (a list, or a string as COLMAP's
    ``--ImageReader.camera_params`` takes it, ``"f,cx,cy,k"``) -> floats; ValueError naming the order."""
    if camera_model not in CAMERA_MODELS:
        raise ValueError(f"unsupported camera model {camera_model!r}; choose one of {CAMERA_MODELS}")
    expected = pycolmap.Camera(model=camera_model, width=1, height=1).params_info
    count = len(expected.split(","))
    items = params.split(",") if isinstance(params, str) else list(params)
    try:
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        values = []
    if len(values) != count or not np.isfinite(values).all():
        raise ValueError(
            f"camera_params {params!r}: {camera_model} takes {count} finite numbers, {expected} (pixels of "
            "the original images); give those, or the camera_model they are for"
        )
    camera = pycolmap.Camera(model=camera_model, width=1, height=1, params=values)
    if min(camera.focal_length_x, camera.focal_length_y) <= 0:
        raise ValueError(f"camera_params {params!r}: the focal length must be positive")
    return values


def known_camera(camera_model: str, params: Sequence[float], views: Sequence[View]) -> pycolmap.Camera:
    """The camera of known intrinsics ``params`` (:func:`parse_camera_params`) for images of one size."""
    _check_one_size(views, "camera_params (known intrinsics)", "give them for images of one size only")
    width, height = views[0].original_size
    camera = pycolmap.Camera(model=camera_model, width=width, height=height, params=list(params))
    camera.has_prior_focal_length = True
    problem = implausible_camera(camera)
    if problem is not None:
        raise InputError(
            f"camera_params {params!r} do not fit the {width}x{height} images as {camera_model} ({problem}); "
            f"check the values and their order, {camera.params_info}, or give the camera_model they are for"
        )
    return camera


MAX_DISTORTION = 2.0  # times: how far a camera's distortion may stretch or shrink the image border


def implausible_camera(camera: pycolmap.Camera) -> str | None:
    """Why ``camera`` cannot be the camera of its images (principal point outside them; a distortion
    that folds the image, or stretches or shrinks its border more than :data:`MAX_DISTORTION` times, such
    as a principal point read as a distortion coefficient), or None."""
    w, h = camera.width, camera.height
    cx, cy = camera.principal_point_x, camera.principal_point_y
    if not (0 <= cx <= w and 0 <= cy <= h):
        return f"principal point ({cx:g}, {cy:g}) outside the image"
    steps = np.linspace(0.0, 1.0, 17)
    border = np.concatenate(
        [np.stack([steps * w, np.full_like(steps, y)], 1) for y in (0.0, h)]
        + [np.stack([np.full_like(steps, x), steps * h], 1) for x in (0.0, w)]
    )
    distorted = (border - [cx, cy]) / [camera.focal_length_x, camera.focal_length_y]
    undistorted = camera.cam_from_img(border)
    if not np.isfinite(undistorted).all():
        return "a distortion that folds the image"
    rays = np.concatenate([undistorted, np.ones((len(undistorted), 1))], 1)
    back = camera.img_from_cam(rays)
    radius = np.linalg.norm(distorted, axis=1)
    far = radius > 0.05 * radius.max()
    ratio = radius[far] / np.maximum(np.linalg.norm(undistorted[far], axis=1), 1e-12)
    if (
        not np.allclose(back, border, atol=0.5)
        or ratio.max() > MAX_DISTORTION
        or ratio.min() < 1 / MAX_DISTORTION
    ):
        times = f"{ratio.min():.2g}-{ratio.max():.2g}"
        return f"a distortion that puts the image border {times} times as far from the centre"
    return None


def adjusted_shared_camera(
    rec: pycolmap.Reconstruction, views: Sequence[View], camera_model: str
) -> pycolmap.Camera | None:
    """One camera for every view, held fixed as known intrinsics are: the median parameters of the
    registered images' adjusted cameras; None if the views differ in size, fewer than two are registered
    or that camera cannot be theirs (:func:`implausible_camera`: not the user's camera_params to refuse)."""
    if len({v.original_size for v in views}) > 1 or rec.num_reg_images() < 2:
        return None
    params = np.median([rec.image(i).camera.params for i in rec.reg_image_ids()], axis=0)
    try:
        return known_camera(camera_model, params.tolist(), views)
    except InputError:  # implausible_camera: the views have one size, so only that can refuse it
        return None


def _check_one_size(views: Sequence[View], what: str, fix: str) -> None:
    by_size: dict[tuple[int, int], list[str]] = {}
    for view in views:
        by_size.setdefault(view.original_size, []).append(view.name)
    if len(by_size) > 1:
        listing = ", ".join(
            f"{w}x{h} ({len(names)} image{'s' if len(names) > 1 else ''}, e.g. {names[0]})"
            for (w, h), names in sorted(by_size.items(), key=lambda item: -len(item[1]))[:4]
        )
        more = f" and {len(by_size) - 4} more" if len(by_size) > 4 else ""
        raise InputError(f"{what} needs images of one size, got {len(by_size)}: {listing}{more}; {fix}")


CameraSharing = bool | Literal["per_folder"]


def camera_groups(views: Sequence[View], shared_camera: CameraSharing) -> list[int]:
    """The camera id (1-based) of every view: one per view (False), one for all (True) or one per folder of
    the images' names ("per_folder", as COLMAP's ``CameraMode.PER_FOLDER``; ids in order of appearance)."""
    if shared_camera == "per_folder":
        folders: dict[str, int] = {}
        return [folders.setdefault(PurePosixPath(v.name).parent.as_posix(), len(folders) + 1) for v in views]
    if shared_camera is True:
        return [1] * len(views)
    if shared_camera is False:
        return list(range(1, len(views) + 1))
    raise ValueError(f"shared_camera must be True, False or 'per_folder', got {shared_camera!r}")


def make_cameras(
    views: Sequence[View],
    geometry: SceneGeometry,
    camera_model: str,
    shared_camera: CameraSharing,
    calibration: pycolmap.Camera | None = None,
) -> tuple[list[pycolmap.Camera], list[int]]:
    """COLMAP cameras and the camera id of every view (:func:`camera_groups`): copies of ``calibration`` if
    the intrinsics are known, else the predicted ones with zero distortion (the mean over the views of a
    shared camera)."""
    ids = camera_groups(views, shared_camera)
    if calibration is not None:
        cameras = [copy.copy(calibration) for _ in sorted(set(ids))]
        for camera_id, camera in enumerate(cameras, start=1):
            camera.camera_id = camera_id
        return cameras, ids
    ks = [intrinsics_to_original(v, geometry.intrinsics[i]).numpy() for i, v in enumerate(views)]
    cameras = []
    for camera_id in sorted(set(ids)):
        members = [i for i, group in enumerate(ids) if group == camera_id]
        if len(members) == 1 and shared_camera is False:
            cameras.append(view_camera(views[members[0]], ks[members[0]], camera_model, camera_id=camera_id))
            continue
        group = [views[i] for i in members]
        if shared_camera == "per_folder":
            folder = PurePosixPath(group[0].name).parent.as_posix()
            what = f"shared_camera='per_folder' (folder {folder!r})"
            fix = "give each folder images of one size, or shared_camera=False (CLI: --shared_camera false)"
        else:
            what = "shared_camera=True"
            fix = "use shared_camera=False (CLI: --shared_camera false; a camera per image) or resize them"
        _check_one_size(group, what, fix)
        k = np.mean(np.stack([ks[i] for i in members]), axis=0)
        width, height = group[0].original_size
        cameras.append(
            pycolmap.Camera(
                camera_id=camera_id,
                model=camera_model,
                width=width,
                height=height,
                params=camera_params(camera_model, k),
            )
        )
    return cameras, ids


def view_camera(
    view: View, k: np.ndarray, camera_model: str, camera_id: int | None = None
) -> pycolmap.Camera:
    """The COLMAP camera of ``view`` for its pinhole K in original pixels (COLMAP convention), with zero
    distortion (``camera_id`` None: pycolmap's invalid id, a camera outside any reconstruction)."""
    width, height = view.original_size
    camera = pycolmap.Camera(
        model=camera_model, width=width, height=height, params=camera_params(camera_model, k)
    )
    if camera_id is not None:
        camera.camera_id = camera_id
    return camera


def keep_adjusted_cameras(rec: pycolmap.Reconstruction, adjusted: pycolmap.Reconstruction) -> None:
    """Set, in place, the parameters of every camera of ``rec`` that a registered image of ``adjusted`` uses
    (same camera ids, as :func:`build_reconstruction` numbers them) to their adjusted values."""
    for image_id in adjusted.reg_image_ids():
        camera_id = adjusted.image(image_id).camera_id
        rec.camera(camera_id).params = adjusted.camera(camera_id).params


def points_in_original(views: Sequence[View], tracks: Tracks) -> list[np.ndarray]:
    """Every view's 2D points (keypoints, then match locations) in original pixels, COLMAP convention."""
    return [work_to_original(v, p).numpy() for v, p in zip(views, tracks.points, strict=True)]


def build_reconstruction(
    views: Sequence[View],
    geometry: SceneGeometry,
    points2d: Sequence[np.ndarray],
    camera_model: str = "SIMPLE_RADIAL",
    shared_camera: CameraSharing = False,
    calibration: pycolmap.Camera | None = None,
) -> pycolmap.Reconstruction:
    """A Reconstruction with cameras (:func:`make_cameras`), rigs, frames and posed images (image_id = view
    index + 1), no 3D points yet."""
    rec = pycolmap.Reconstruction()
    cameras, camera_ids = make_cameras(views, geometry, camera_model, shared_camera, calibration)
    for camera in cameras:
        rec.add_camera_with_trivial_rig(camera)
    poses = geometry.cam_from_world.numpy()
    for i, view in enumerate(views):
        image = pycolmap.Image(
            name=view.name,
            keypoints=np.asarray(points2d[i], dtype=np.float64).reshape(-1, 2),
            camera_id=camera_ids[i],
            image_id=i + 1,
        )
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(poses[i]))
    return rec


def points_from_depth(
    views: Sequence[View], geometry: SceneGeometry, tracks: Tracks
) -> tuple[np.ndarray, np.ndarray]:
    """Initial 3D points: the median over a track's observations of their unprojected predicted depth (in
    the prediction's world frame). Returns (T, 3) points and a mask of tracks with at least one
    observation on valid depth. Unlike triangulation from the (noisy) predicted poses, this never places a
    point at infinity, and keeps it in front of the cameras whose depth it came from."""
    num_obs = tracks.obs_view.size
    world = torch.full((num_obs, 3), float("nan"), dtype=torch.float64)
    for view in np.unique(tracks.obs_view):
        rows = np.nonzero(tracks.obs_view == view)[0]
        v = int(view)
        model_xy = work_to_model(views[v], tracks.points[v][torch.from_numpy(tracks.obs_point[rows])])
        depth = geometry.sample(geometry.depth, v, model_xy).double()
        good = torch.isfinite(depth) & (depth > 0)
        points = geometry.unproject(v, model_xy, torch.where(good, depth, torch.ones_like(depth)))
        world[torch.from_numpy(rows)] = torch.where(
            good[:, None], points, torch.full_like(points, float("nan"))
        )
    lengths = tracks.lengths()
    padded = torch.full(
        (tracks.num_tracks, max(int(lengths.max(initial=1)), 1), 3), float("nan"), dtype=torch.float64
    )
    track = torch.from_numpy(tracks.track_of_observation())
    slot = torch.arange(num_obs) - torch.from_numpy(tracks.track_start[:-1])[track]
    padded[track, slot] = world
    xyz = padded.nanmedian(dim=1).values
    return xyz.numpy(), torch.isfinite(xyz).all(dim=1).numpy()


def triangulate_tracks(
    rec: pycolmap.Reconstruction, tracks: Tracks, points2d: Sequence[np.ndarray], min_angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """3D points of the tracks by linear (DLT) triangulation at the poses and cameras of ``rec`` (image
    ``v + 1`` is view v), from every view's 2D points ``points2d`` in original pixels
    (:func:`points_in_original`). Returns (T, 3) points and a mask of the tracks triangulated reliably: in
    front of every camera that sees them, rays at least ``min_angle`` degrees apart."""
    num_obs = tracks.obs_view.size
    normalized = np.zeros((num_obs, 2))
    world_to_cam = np.zeros((num_obs, 3, 4))
    for view in np.unique(tracks.obs_view):
        rows = np.nonzero(tracks.obs_view == view)[0]
        image = rec.image(int(view) + 1)
        pixels = np.asarray(points2d[int(view)], dtype=np.float64)[tracks.obs_point[rows]]
        normalized[rows] = image.camera.cam_from_img(pixels)
        world_to_cam[rows] = image.cam_from_world().matrix()
    x = torch.from_numpy(normalized)
    pose = torch.from_numpy(world_to_cam)
    # a pixel an adjusted camera cannot undistort (a distortion that folds its border) has no ray (NaN):
    # it adds nothing here, and its track is not reliable
    finite = torch.isfinite(x).all(dim=1)
    x = torch.where(finite[:, None], x, torch.zeros_like(x))
    # each observation contributes rows x P3 - P1 and y P3 - P2 of A, with A X = 0; sum of their outer
    # products per track, whose eigenvector of the smallest eigenvalue is X
    rows_x = x[:, 0:1] * pose[:, 2] - pose[:, 0]
    rows_y = x[:, 1:2] * pose[:, 2] - pose[:, 1]
    normal = rows_x[:, :, None] * rows_x[:, None, :] + rows_y[:, :, None] * rows_y[:, None, :]
    normal = normal * finite[:, None, None]
    track = torch.from_numpy(tracks.track_of_observation())
    system = torch.zeros(tracks.num_tracks, 4, 4, dtype=torch.float64).index_add_(0, track, normal)
    rayless = torch.zeros(tracks.num_tracks, dtype=torch.float64).index_add_(0, track, (~finite).double())
    homogeneous = torch.linalg.eigh(system).eigenvectors[:, :, 0]
    xyz = homogeneous[:, :3] / homogeneous[:, 3:]
    # checks: depth in every observing camera, widest ray angle (against the track's mean ray)
    at = xyz[track]
    depth = (pose[:, 2, :3] * at).sum(-1) + pose[:, 2, 3]
    behind = torch.zeros(tracks.num_tracks, dtype=torch.float64).index_add_(0, track, (depth <= 0).double())
    rays = torch.nn.functional.normalize(at - camera_centers(pose), dim=1)
    mean = torch.nn.functional.normalize(
        torch.zeros(tracks.num_tracks, 3, dtype=torch.float64).index_add_(0, track, rays), dim=1
    )
    angle = torch.rad2deg(torch.arccos((rays * mean[track]).sum(1).clamp(-1.0, 1.0)))
    widest = torch.zeros(tracks.num_tracks, dtype=torch.float64).scatter_reduce_(
        0, track, angle, "amax", include_self=False
    )
    # half the widest pair's angle lies on each side of the mean ray
    reliable = torch.isfinite(xyz).all(dim=1) & (behind == 0) & (2 * widest >= min_angle) & (rayless == 0)
    return xyz.numpy(), reliable.numpy()


def add_points(
    manager: pycolmap.ObservationManager,
    tracks: Tracks,
    xyz: np.ndarray,
    keep: np.ndarray,
    colors: np.ndarray,
) -> int:
    """Add the kept tracks as 3D points (image_id = view + 1, point2D_idx = point index); returns how many."""
    image_ids, point_ids = (tracks.obs_view + 1).tolist(), tracks.obs_point.tolist()  # Python ints, once
    starts = tracks.track_start.tolist()
    added = 0
    for t in np.nonzero(keep)[0].tolist():
        track = pycolmap.Track()
        for k in range(starts[t], starts[t + 1]):
            track.add_element(image_ids[k], point_ids[k])
        manager.add_point3D(xyz[t], track, colors[t])
        added += 1
    return added


def track_colors(views: Sequence[View], tracks: Tracks) -> np.ndarray:
    """(T, 3) uint8 colour of every track: the work-image pixel under its first observation."""
    colors = np.zeros((tracks.num_tracks, 3), dtype=np.uint8)
    if tracks.num_tracks == 0:
        return colors
    first = tracks.track_start[:-1]
    for view in np.unique(tracks.obs_view[first]):
        sel = np.nonzero(tracks.obs_view[first] == view)[0]
        xy = tracks.points[int(view)][tracks.obs_point[first[sel]]].numpy()
        rgb = views[int(view)].work_rgb
        col = np.clip(np.round(xy[:, 0]).astype(int), 0, rgb.shape[1] - 1)
        row = np.clip(np.round(xy[:, 1]).astype(int), 0, rgb.shape[0] - 1)
        colors[sel] = rgb[row, col]
    return colors
