"""Steps 4-6 of :func:`~.reconstruct.run_pipeline` (matches, tracks, bundle adjustment) and the passes
that repeat them: the rescue of weakly linked views, the readjustment from the adjusted poses and the
re-check of views on few shared points."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import pycolmap
import torch

from speed3r_sfm.eval.metrics import rotation_angle_deg

from .bundle import (
    contradicted_pairs,
    correspondence_graph,
    drop_hinged_images,
    drop_weakly_linked_images,
    hinged_links,
    matched_rotation,
    mean_reprojection_error,
    refine_reconstruction,
    weakly_linked_images,
)
from .colmap_model import (
    CameraSharing,
    add_points,
    build_reconstruction,
    keep_adjusted_cameras,
    points_from_depth,
    points_in_original,
    track_colors,
    triangulate_tracks,
)
from .frames import SceneGeometry
from .matching import Matches, keep_matches, match_views, matching_pyramids, refinement_device
from .options import PipelineOptions
from .records import AttentionSummary
from .refine import PyramidStack
from .rescue import RescueOptions, adjusted_geometry, rescued_geometry
from .sift_rescue import SiftFeatures
from .stages import Stages
from .tracks import Tracks, build_tracks

# the re-check (recheck_weak_views) adjusts again only where SIFT turns a view by more than this from its
# adjusted pose: the SIFT poses were within 0.4-1.1 deg of the truth on the hard orbit, and a new adjustment
# of right views moves the others a little (hinge_and_robustness_experiments.md)
RECHECK_MIN_TURN_DEG = 3.0


@dataclass
class Adjusted:
    """Matches, tracks and the bundle-adjusted reconstruction of one pass of steps 4-6."""

    rec: pycolmap.Reconstruction
    matches: Matches
    tracks: Tracks
    points2d: list
    pair_matches: dict
    initial_error: float | None
    initial_points: int
    ba_rounds: list[dict]
    dropped: list[int]  # image ids de-registered as weakly linked (or hinged)
    distrusted: list[tuple[int, int]]  # image-id pairs whose link contradicted the feed-forward poses
    hinged: list[int] = field(default_factory=list)  # of ``dropped``: beyond a hinge (bundle.hinged_links)


def match_and_adjust(
    geometry: SceneGeometry,
    *,
    views: list,
    grays: list[torch.Tensor],
    keypoints: list,
    summary: AttentionSummary | None,
    thresholds: torch.Tensor,
    tracker: Any,
    options: PipelineOptions,
    ba: bool,
    camera_model: str,
    shared_camera: CameraSharing,
    calibration: pycolmap.Camera | None,
    pixel_scale: float,
    feedforward: tuple[torch.Tensor, list],
    stages: Stages | None = None,
    carried: tuple[Matches, list[int]] | None = None,
    matches: Matches | None = None,
    from_adjusted: pycolmap.Reconstruction | None = None,
    pyramids: dict[str, PyramidStack] | None = None,
    device: torch.device | None = None,
) -> Adjusted:
    """Steps 4-6 of :func:`~.reconstruct.run_pipeline` on ``geometry`` (``stages``: time them, or None);
    ``feedforward``: the view pairs of the feed-forward pose tree and the cam_from_world they are checked
    against (the feed-forward poses; the rescue's for the views it re-posed); ``carried``: earlier matches
    kept where they touch the given views (image ids); ``matches``: use these instead of matching (step
    4); ``from_adjusted``: an adjusted reconstruction whose registered images' cameras are kept, and the
    3D points are triangulated at ``geometry``'s poses where that is well conditioned (else from depth, as
    without it); ``pyramids``: a cache for the refinement's image pyramids, kept between passes;
    ``device``: where the photometric refinement runs if its image pyramids fit
    (:func:`refinement_device`; the CPU if None)."""
    start = stages.start if stages else (lambda name: None)
    done = stages.done if stages else (lambda name: None)
    if matches is None:
        # 4. matches: GSA-selected views, verified by the predicted geometry, refined photometrically
        start("matching")
        pyramids = {} if pyramids is None else pyramids
        if "stack" not in pyramids:
            device = refinement_device(device, grays)
            pyramids["stack"] = matching_pyramids(views, grays, options.matching, device)
        matches = match_views(
            views,
            grays,
            keypoints,
            geometry,
            summary,
            thresholds,
            options.matching,
            tracker,
            pyramids["stack"],
        )
        if carried is not None:
            matches = keep_matches(carried[0], [image_id - 1 for image_id in carried[1]], matches)
        done("matching")

    # 5. tracks and the pycolmap reconstruction at the predicted poses
    start("tracks")
    tracks = build_tracks(keypoints, matches, options.merge_radius)
    points2d = points_in_original(views, tracks)
    rec = build_reconstruction(views, geometry, points2d, camera_model, shared_camera, calibration)
    if from_adjusted is not None:
        keep_adjusted_cameras(rec, from_adjusted)
    pair_matches = tracks.pairwise_matches()
    graph = correspondence_graph([len(p) for p in points2d], pair_matches)
    manager = pycolmap.ObservationManager(rec, graph)
    xyz, valid = points_from_depth(views, geometry, tracks)
    if from_adjusted is not None:
        triangulated, reliable = triangulate_tracks(rec, tracks, points2d, options.bundle.min_tri_angle)
        xyz, valid = np.where(reliable[:, None], triangulated, xyz), valid | reliable
    add_points(manager, tracks, xyz, valid, track_colors(views, tracks))
    manager.filter_observations_with_negative_depth()
    initial_error, initial_points = mean_reprojection_error(rec), rec.num_points3D()
    done("tracks")

    # 6. bundle adjustment, filtering, re-triangulation (without BA: filtering at the feed-forward poses)
    stage = "bundle adjustment" if ba else "filtering"
    start(stage)
    ba_rounds: list[dict] = []
    if ba:
        triangulator = pycolmap.IncrementalTriangulator(graph, rec, manager)
        ba_rounds = refine_reconstruction(rec, manager, triangulator, options.bundle, pixel_scale)
    else:
        error = options.no_ba_max_reproj_error * pixel_scale
        manager.filter_all_points3D(error, options.bundle.min_tri_angle)
    dropped: list[int] = []
    distrusted: list[tuple[int, int]] = []
    bent: list[int] = []
    if ba and rec.num_points3D():  # views whose pose BA fitted to a handful of points or a wrong join
        poses, tree_pairs = feedforward
        distrusted = contradicted_pairs(rec, poses, tree_pairs, options.bundle.max_link_disagreement)
        dropped = drop_weakly_linked_images(rec, manager, options.bundle.min_shared_points, distrusted)
        if options.bundle.drop_hinged:
            own = partial(matched_rotation, rec, points2d, pair_matches)
            bent = drop_hinged_images(rec, manager, tree_pairs, hinged_links(rec, poses, distrusted, own))
        dropped = dropped + bent
    done(stage)
    return Adjusted(
        rec,
        matches,
        tracks,
        points2d,
        pair_matches,
        initial_error,
        initial_points,
        ba_rounds,
        dropped,
        distrusted,
        bent,
    )


@dataclass
class AdjustmentPass:
    """Steps 4-6, the rescue and the readjustment of one calibration (:func:`adjust_rescue_readjust`)."""

    adjusted: Adjusted
    rescue: dict[str, Any]
    readjustment: dict[str, Any]
    recheck: dict[str, Any]  # views on few shared points posed again (bundle.recheck_min_shared_points)
    contradicted: set[tuple[int, int]]  # view pairs whose link contradicted the feed-forward poses, any pass
    hinged: set[int]  # image ids de-registered beyond a hinge in any pass (bundle.hinged_links)
    first_matches: Matches  # the matches of its first adjustment


def adjust_rescue_readjust(
    adjust: Callable[..., Adjusted],
    *,
    geometry: SceneGeometry,
    views: list,
    options: PipelineOptions,
    pixel_scale: float,
    tree_edges: list,
    readjusting: bool,
    rechecking: bool = False,
    stages: Stages | None = None,
    matches: Matches | None = None,
) -> AdjustmentPass:
    """Steps 4-6 (``adjust``; with ``matches`` instead of matching), then the rescue of weakly linked views
    and the readjustment; ``stages``: time them (or None)."""
    # the poses the view pairs of the feed-forward pose tree are checked against (``contradicted_pairs``)
    reference = geometry.cam_from_world.clone()
    adjusted = adjust(geometry, feedforward=(reference, tree_edges), stages=stages, matches=matches)
    first_matches = adjusted.matches
    contradicted = {(i - 1, j - 1) for i, j in adjusted.distrusted}
    hinged = set(adjusted.hinged)
    rescue: dict[str, Any] = {"rounds": []}
    if adjusted.dropped and options.rescue.enabled:
        if stages:
            stages.add_stage("rescuing weakly linked views")
        tried = [views[image_id - 1].name for image_id in adjusted.dropped]
        adjusted, rescue, reference = rescue_weak_views(
            adjusted, geometry, adjust, views, options.rescue, pixel_scale, tree_edges, reference
        )
        rescue["tried"] = tried  # also when no round could re-pose any of them
        if stages:
            stages.done("rescue")
        contradicted.update(tuple(pair) for r in rescue["rounds"] for pair in r["contradicted_links"])
        hinged.update(view + 1 for r in rescue["rounds"] for view in r["hinged_views"])
    readjustment: dict[str, Any] = {"ran": False}
    if readjusting and adjusted.rec.num_reg_images() >= 2:
        if stages:
            stages.start("adjusting again from the adjusted poses")
        again = partial(adjust, feedforward=(reference, tree_edges), options=readjust_options(options))
        adjusted, readjustment = readjust(adjusted, geometry, again, views)
        contradicted.update(tuple(pair) for pair in readjustment["contradicted_links"])
        if stages:
            stages.done("readjustment")
    rechecked: dict[str, Any] = {"views": []}
    suspects = []
    if rechecking and options.rescue.enabled and options.rescue.sift and adjusted.rec.num_reg_images() >= 2:
        bound = options.bundle.recheck_min_shared_points
        suspects = weakly_linked_images(adjusted.rec, bound, adjusted.distrusted)
    if suspects:
        if stages:
            stages.add_stage("posing views on few shared points again")
        near_solution = partial(adjust, options=readjust_options(options))
        adjusted, rechecked = recheck_weak_views(
            adjusted, suspects, geometry, near_solution, views, options.rescue, pixel_scale, tree_edges
        )
        contradicted.update(tuple(pair) for pair in rechecked.get("contradicted_links", []))
        if stages:
            stages.done("re-check")
    return AdjustmentPass(adjusted, rescue, readjustment, rechecked, contradicted, hinged, first_matches)


def recheck_weak_views(
    adjusted: Adjusted,
    suspects: list[int],
    geometry: SceneGeometry,
    adjust: Callable[..., Adjusted],
    views: list,
    options: RescueOptions,
    pixel_scale: float,
    tree_edges: list,
) -> tuple[Adjusted, dict[str, Any]]:
    """The ``suspects`` (image ids of registered views linked by few shared points, ``BundleOptions.
    recheck_min_shared_points``) posed again by SIFT alone: their own matches were found around their
    feed-forward pose and may agree with a wrong one. Where a SIFT pose turns a view by more than
    :data:`RECHECK_MIN_TURN_DEG` from its adjusted pose, every view is matched again from those poses and
    adjusted (``adjust``), kept if as many views register; else ``adjusted`` stays as it is."""
    rec = pycolmap.Reconstruction(adjusted.rec)
    manager = pycolmap.ObservationManager(rec)
    for image_id in suspects:
        manager.deregister_frame(rec.image(image_id).frame_id)
    start = adjusted_geometry(rec, views, geometry)
    entry: dict[str, Any] = {"views": [views[i - 1].name for i in suspects], "kept": False, "turned_deg": {}}
    rescued = rescued_geometry(
        rec, views, start, adjusted.pair_matches, adjusted.points2d, suspects, options, pixel_scale,
        tree_edges, pnp=False,
    )  # fmt: skip
    if rescued is None:
        return adjusted, entry
    posed, placed = rescued
    for image_id, view in zip(suspects, placed, strict=True):
        if view["how"] == "sift":
            was = torch.from_numpy(adjusted.rec.image(image_id).cam_from_world().rotation.matrix())
            turn = rotation_angle_deg(posed.cam_from_world[image_id - 1, :, :3], was)
            entry["turned_deg"][view["name"]] = round(float(turn), 2)
    if max(entry["turned_deg"].values(), default=0.0) <= RECHECK_MIN_TURN_DEG:
        return adjusted, entry  # SIFT agrees with the adjusted poses
    # the suspects' earlier matches are carried: without them view 23 of the hard orbit did not register
    # again (a new matching from its SIFT pose alone finds too few); the adjustment filters the wrong ones
    again = adjust(
        posed, carried=(adjusted.matches, suspects), feedforward=(posed.cam_from_world.clone(), tree_edges)
    )
    entry["kept"] = again.rec.num_reg_images() >= adjusted.rec.num_reg_images()
    entry["contradicted_links"] = [[i - 1, j - 1] for i, j in again.distrusted] if entry["kept"] else []
    return (again if entry["kept"] else adjusted), entry


def rescue_weak_views(
    adjusted: Adjusted,
    geometry: SceneGeometry,
    adjust: Callable[..., Adjusted],
    views: list,
    options: RescueOptions,
    pixel_scale: float,
    tree_edges: list,
    reference: torch.Tensor,
) -> tuple[Adjusted, dict[str, Any], torch.Tensor]:
    """Rounds of :func:`~.rescue.rescued_geometry` and steps 4-6 again (``adjust``), keeping the weak views'
    earlier matches, while that registers more views; the best result, the report entry and the poses the
    pose tree's links are checked against from then on (``reference``, the feed-forward poses, until a
    round is kept). A round checks them against the poses it starts from (adjusted, re-posed by the
    rescue, else feed-forward): checked against a re-posed view's feed-forward pose, the wrong one, its
    now right links would be cut, and the rescue's poses are in the adjusted poses' frame."""
    rounds = []
    features = SiftFeatures(views, options.sift_image_size, options.sift_ratio)  # kept between rounds
    for _ in range(options.max_rounds):
        rescued = rescued_geometry(
            adjusted.rec,
            views,
            geometry,
            adjusted.pair_matches,
            adjusted.points2d,
            adjusted.dropped,
            options,
            pixel_scale,
            tree_edges,
            features,
        )
        if rescued is None:
            break
        geometry, placed = rescued
        checked = geometry.cam_from_world.clone()
        again = adjust(
            geometry, carried=(adjusted.matches, adjusted.dropped), feedforward=(checked, tree_edges)
        )
        before, after = adjusted.rec.num_reg_images(), again.rec.num_reg_images()
        rounds.append(
            {
                "views": placed,
                "registered_before": before,
                "registered_after": after,
                "contradicted_links": [[i - 1, j - 1] for i, j in again.distrusted],
                "hinged_views": [image_id - 1 for image_id in again.hinged],
            }
        )
        if after <= before:
            break
        adjusted, reference = again, checked
        if not adjusted.dropped:
            break
    return adjusted, {"rounds": rounds}, reference


def readjust(
    adjusted: Adjusted, geometry: SceneGeometry, adjust: Callable[..., Adjusted], views: list
) -> tuple[Adjusted, dict[str, Any]]:
    """Steps 5-6 once more with the same matches, from the adjusted poses (depth rescaled to them) with every
    observation back; kept when it registers at least as many views. The first adjustment starts several
    degrees off and its filter drops the observations that disagree with where it then is, which can lock
    in a wrong join of two groups of views (a hinge); from poses near the solution the right ones win. It
    keeps the adjusted cameras and triangulates the points at the adjusted poses: from the model's intrinsics
    and depth-unprojected points its solve took 35 Levenberg-Marquardt iterations on average over 15
    held-out runs, from these 23 (``benchmarks/results/readjust_start.md``)."""
    again = adjust(
        adjusted_geometry(adjusted.rec, views, geometry), matches=adjusted.matches, from_adjusted=adjusted.rec
    )
    before, after = adjusted.rec.num_reg_images(), again.rec.num_reg_images()
    kept = after >= before
    entry = {
        "ran": True,
        "registered_before": before,
        "registered_after": after,
        "kept": kept,
        "contradicted_links": [[i - 1, j - 1] for i, j in again.distrusted],
    }
    return (again if kept else adjusted), entry


def readjust_options(options: PipelineOptions) -> PipelineOptions:
    """The readjustment's settings: ``BundleOptions.readjust_rounds`` rounds, every one at ``loss_scale`` (it
    starts from the adjusted poses, not several degrees off), no hinge drops (``drop_hinged``)."""
    bundle = options.bundle
    return replace(
        options,
        bundle=replace(
            bundle, rounds=bundle.readjust_rounds, initial_loss_scale=bundle.loss_scale, drop_hinged=False
        ),
    )
