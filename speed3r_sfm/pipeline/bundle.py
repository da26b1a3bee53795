"""Bundle adjustment, filtering and re-triangulation with pycolmap.

The adjustment runs in a normalised world frame: the frame of the lowest-id image it adjusts, scaled to a
median point depth of 1. COLMAP's two-camera gauge fixes that camera and one translation coordinate of a
second; in an arbitrary world frame (π³'s, or the oracle's random one) that coordinate can be mostly offset
rather than baseline, which leaves the scale nearly free, and we observed the solver then collapse the scene
behind the cameras, where COLMAP's reprojection cost is zero. The result is mapped back to the input world
frame.

Before the first round, observations far off the median initial reprojection error and points with a
too small triangulation angle are removed. Then rounds of: bundle adjustment of poses, 3D points and
(optionally) intrinsics with a robust loss (``pycolmap.create_default_bundle_adjuster``; the gauge is
fixed by two camera poses; only the main group of linked images is adjusted, :func:`adjustable_images`),
``ObservationManager.filter_all_points3D`` (reprojection error, triangulation angle), and re-triangulation
with pycolmap's ``IncrementalTriangulator`` over the correspondence graph of all matches (complete and merge
tracks, triangulate observations left without a point). The first round keeps the intrinsics fixed,
because the feed-forward poses start far from the optimum, and uses ``initial_loss_scale`` (the 8 px used
before let two groups of views that share few points settle at a wrong angle more often:
hinge_forward1000001.md); later rounds refine the intrinsics and use ``loss_scale``. The last round ends with
one more solve and filtering (``polish``): a solve that stops at the function tolerance can leave a slow
correction half done.

Afterwards, views not linked to the main group of views by pairs that share at least ``min_shared_points``
3D points are de-registered (:func:`drop_weakly_linked_images`): on held-out scenes every view hanging on
fewer (5-19 points) had a pose 15-40 degrees off that bundle adjustment had fitted to those few points.
A pair of the feed-forward pose tree whose adjusted relative rotation contradicts its feed-forward one
(:func:`contradicted_pairs`) does not count as a link: where it was the only one, the groups it joined had
been joined at a wrong angle. Where other pairs kept the two sides linked and the pair's own matches side with
the feed-forward relative rotation rather than the adjusted one (:func:`hinged_links`), the adjustment locked
in a hinge: the smaller side of the pose tree across the link is de-registered too
(:func:`beyond_contradicted_links`), for the rescue to re-pose by PnP (a 100-view chunked run whose last six
views had ended 62 degrees off: 0.15 degrees median error, none off).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pycolmap
import torch

from speed3r_sfm.eval.metrics import rotation_angle_deg

from .checks import require_at_least, require_integer, require_positive
from .colmap_model import implausible_camera
from .tracks import connected_components

logger = logging.getLogger(__name__)

LOSSES = {
    "trivial": pycolmap.LossFunctionType.TRIVIAL,
    "soft_l1": pycolmap.LossFunctionType.SOFT_L1,
    "cauchy": pycolmap.LossFunctionType.CAUCHY,
    "huber": pycolmap.LossFunctionType.HUBER,
}


@dataclass
class BundleOptions:
    """Bundle adjustment settings (loss scales in work pixels, error thresholds in original pixels).

    Attributes:
        rounds: rounds of adjustment, filtering and re-triangulation; the first of several keeps the
            intrinsics fixed.
        refine_focal_length: refine the focal length (from the second round on).
        refine_principal_point: refine the principal point (from the second round on).
        refine_extra_params: refine the camera model's distortion parameters (from the second round on).
        loss: robust loss: "trivial" (plain least squares), "soft_l1", "cauchy" or "huber".
        loss_scale: scale (work pixels) of the robust loss after the first round; residuals well above it
            weigh less.
        initial_loss_scale: scale (work pixels) of the robust loss in the first round, which starts from
            the feed-forward poses; larger values let weakly linked groups settle at a wrong angle more often.
        initial_outlier_factor: before the first round, drop observations whose reprojection error exceeds
            this many times the median (and max_reproj_error).
        max_iterations: most solver iterations per adjustment.
        function_tolerance: a solve stops when an iteration lowers the cost by less than this fraction;
            lower is more precise and slower.
        tolerance_views: function_tolerance holds up to this many adjusted images; larger problems use a
            proportionally smaller tolerance.
        min_adjusted_link: only the largest group of images linked by pairs sharing at least this many 3D
            points is adjusted, the others keep their poses (0: adjust every registered image).
        max_reproj_error: reprojection error (original pixels) above which an observation is filtered out
            and not triangulated.
        min_tri_angle: smallest triangulation angle (degrees) of a 3D point, in filtering and triangulation.
        min_shared_points: after the adjustment, views not linked to the main group by pairs sharing at
            least this many 3D points are de-registered; higher is stricter.
        max_link_disagreement: a feed-forward pose-tree pair whose adjusted relative rotation differs from
            its feed-forward one by more than this (degrees) does not count as a link.
        drop_hinged: where other pairs keep such a contradicted link's two sides joined (a "hinge"),
            de-register the smaller side for the rescue to re-pose.
        fixed_camera_pass: with one shared camera of predicted intrinsics and views left unregistered,
            adjust once more with the adjusted camera held fixed; kept if it registers more views.
        num_threads: solver (Ceres) threads; -1: all cores; 1: a run repeats bit for bit on the same
            machine, a little slower.
        readjust: after the adjustment, rebuild every observation at the adjusted poses and adjust once
            more (undoes wrong joins; about one more adjustment of time).
        readjust_rounds: rounds of that readjustment, all at loss_scale; the intrinsics are refined from the
            first round when it is 1, from the second when more (as in ``rounds``).
        recheck_min_shared_points: after the readjustment, views linked to the main group by fewer shared
            points than this are posed again by SIFT, and everything re-matched where one turns (0: off).
        polish: after the last round's filtering, solve once more and filter again (finishes corrections a
            solve stopped early).
    """

    rounds: int = 2
    refine_focal_length: bool = True
    refine_principal_point: bool = False
    refine_extra_params: bool = True
    loss: str = "cauchy"
    loss_scale: float = 1.0  # work pixels (where the 2D points are measured)
    # work pixels, first round. 2 rather than 8 (with KeypointOptions.confidence_quantile 0.05 rather than
    # 0.2): at 518x392 no hinge in 36 runs of the six held-out scenes with their depth perturbed by 0.05 %,
    # where 8 joined forward 1000001 about 7-15 deg off at one weak cut in 2 of 6 and left the hard orbit
    # 1000001 with 6-38 % of pairs off in all 6 (hinge_forward1000001.md)
    initial_loss_scale: float = 2.0
    initial_outlier_factor: float = 3.0  # before BA: drop observations above this x the median error
    max_iterations: int = 50
    # stops a solve on a small relative cost decrease (COLMAP's 0: never). 1e-5 had left the RRE after BA
    # of 18 held-out scenes within 0.01 deg of 1e-6 for 20-40 % less BA time; 1e-4 stops the solves after
    # 15-22 instead of 26-37 iterations (final cost within 0.06 %), the same views and medians on 36
    # depth-perturbed runs of the six scenes (one Ceres thread), 0.4-0.6 s less per 24-view run; 1e-3 left
    # the hard orbit with 21 views (ba_function_tolerance.md)
    function_tolerance: float = 1e-4
    # ``function_tolerance`` holds up to this many adjusted images; a larger problem stops at a
    # proportionally smaller relative decrease: a slow correction of a few dozen views moves the cost of 240
    # by little per iteration. A 240-view video after loop closure ended with its first 40 views bent up to
    # 2.3 deg at 1e-4, within 0.28 deg at 1e-5 (1e-6: the same), bundle adjustment 36 s instead of 30
    # (chunked_loop_closure.md)
    tolerance_views: int = 24
    # bundle adjustment poses the largest group of registered images linked by pairs sharing at least this
    # many 3D points; the others keep their poses (weakly linked views are decided on after the adjustment).
    # A view with a handful of points, or a group joined to the rest by one or two, leaves the problem a free
    # gauge: Ceres's Cholesky factorisation fails (dozens of logged failures per run on the hard orbit
    # 1000001 at 2072x1568, none since; ba_main_group.md). 0 adjusts every registered image
    min_adjusted_link: int = 5
    # pixels of the original images, as COLMAP's mapper (filtering and triangulation). In work pixels it let
    # 2-4 px observations of 13 MP images through: mean error 0.95-1.14 px instead of 0.80-0.88, and on one
    # sharp 13 MP scene ten views with a wrong feed-forward scale stayed joined to the rest by such
    # observations (24/24 registered, median RRE 1.44 deg; now de-registered, re-posed: 23/24, 0.11 deg).
    # On the blurry upscaled orbit 1000001 it registers 12 of 24 views instead of 15 (SIFT: 13).
    max_reproj_error: float = 4.0
    min_tri_angle: float = 1.5  # degrees, filtering and triangulation
    # after BA, views not linked to the main group by pairs sharing this many points are de-registered
    min_shared_points: int = 30
    # ...and a feed-forward pose-tree pair whose adjusted relative rotation differs from its feed-forward
    # one by more than this (degrees) is no link: a wrong join that no cycle of pairs checks (a "hinge":
    # two right groups joined 15.7 deg off through one pair of 30 points, ba_diagnostics_*.md). Correct
    # adjustments of such pairs were within 8.1 deg on the 13 diagnosed scenes where the pair was the only
    # link; pairs inside cycles (corrections of 11-28 deg) keep their groups linked either way.
    max_link_disagreement: float = 10.0
    # ...and where other pairs keep such a link's two sides joined while the pair's own matches side with the
    # feed-forward rotation (hinged_links), the smaller side of the pose tree is de-registered for the
    # rescue to re-pose by PnP: a 100-view chunked forward run had locked its last six views in 62 deg off
    # (0.15 deg median, none off, with it). Not in the readjustment, which starts near the solution and
    # undoes hinges itself (there it dropped right views: 0 of 5 hard-orbit runs clean, 3 of 8 without)
    drop_hinged: bool = True
    # one camera for all views (shared_camera), predicted intrinsics, and views still unregistered after the
    # rescue and the readjustment: steps 5-6, the rescue and the readjustment once more from the feed-forward
    # poses with the same matches and the adjusted camera held fixed, kept if it registers more views. The
    # first round holds the model's focal length, 4.6 % low on the hard orbit 1000001, where it locks a few
    # weak views in at a wrong pose in some runs (fixed_camera_pass.md)
    fixed_camera_pass: bool = True
    # Ceres threads (-1: all cores). Multi-threaded solves end in slightly different places from run to
    # run (the hard orbit 1000001 registered 21-24 of 24 views); with 1 a run repeats bit for bit on the
    # same machine, for 0.16 s more at 24 views (CLI: --deterministic; reproducibility.md)
    num_threads: int = -1
    # after every pass, rebuild all observations at the adjusted poses and adjust once more (passes.py).
    # With GSA it joined the two halves of the hinge on forward 1000001 at 2072x1568 in 6 of 7 runs
    # (0.15 deg) and cut the pairs off by > 5 deg at 96 views from 45 % to 12 %; dense runs hinge the same
    # way on that scene when the depth changes by 0.05 % (bf16 heads: 14 % and 49 % of pairs off at 518x392
    # and 2072x1568 without it, none with it). Costs 0.5-1 s at 24 views (a second BA)
    readjust: bool = True
    # rounds of the readjustment, all at ``loss_scale`` with the intrinsics refined. One instead of this
    # pass's two (the first at ``initial_loss_scale``, intrinsics fixed): 32 % less readjustment time; the
    # 15 held-out scene/size combos off the hard orbit 24/24 with no pair > 5 deg either way, the hard orbit
    # 23/23/19 views instead of 24/23/14 (it varies from run to run; hinge_and_robustness_experiments.md)
    readjust_rounds: int = 1
    # after the readjustment, registered views linked to the main group by fewer shared points than this
    # (a stricter min_shared_points) are posed again by SIFT (the rescue's); where that turns one by more
    # than 3 deg (passes.RECHECK_MIN_TURN_DEG) every view is matched again and adjusted, kept if as
    # many views register. A view hanging on ~30 matches found around a wrong feed-forward pose agrees with
    # that pose, and nothing else checks it (hard orbit 1000001: view 23 11.7 deg off on 35 observations;
    # hinge_and_robustness_experiments.md). 0: no re-check
    recheck_min_shared_points: int = 40
    # after the last round's filtering, solve once more (that round's loss and intrinsics) and filter again.
    # A solve stops at ``function_tolerance`` while a slow, low-gradient correction is still under way: on
    # forward 1000001 at 96 views (GSA) the last solve left views 55-78 joined 5 deg off (38 % of pairs
    # off); a new solve of the filtered problem joins them in a few iterations (polish_solve.md)
    polish: bool = True

    def __post_init__(self) -> None:
        require_at_least(self, rounds=1, max_iterations=1, readjust_rounds=1, min_shared_points=0)
        require_at_least(self, min_adjusted_link=0, min_tri_angle=0.0, recheck_min_shared_points=0)
        require_integer(self, tolerance_views=1)
        require_positive(self, "loss_scale", "initial_loss_scale", "max_reproj_error", "function_tolerance")
        if self.loss not in LOSSES:
            raise ValueError(f"BundleOptions.loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if self.num_threads != -1:
            require_at_least(self, num_threads=1)  # -1: all cores


def mean_reprojection_error(rec: pycolmap.Reconstruction) -> float | None:
    """Mean reprojection error (pixels) over all observations, recomputed; None without points."""
    if rec.num_points3D() == 0:
        return None
    rec.update_point_3d_errors()
    return rec.compute_mean_reprojection_error()


def correspondence_graph(
    num_points: list[int], pair_matches: dict[tuple[int, int], np.ndarray]
) -> pycolmap.CorrespondenceGraph:
    """pycolmap correspondence graph of views 0..S-1 (image ids 1..S) with the given matches as inliers."""
    graph = pycolmap.CorrespondenceGraph()
    for view, count in enumerate(num_points):
        graph.add_image(view + 1, int(count))
    for (a, b), matches in pair_matches.items():
        geometry = pycolmap.TwoViewGeometry()
        geometry.config = pycolmap.TwoViewGeometryConfiguration.CALIBRATED
        geometry.inlier_matches = np.ascontiguousarray(matches, dtype=np.uint32)
        graph.add_two_view_geometry(a + 1, b + 1, geometry)
    graph.finalize()
    return graph


def solve_tolerance(options: BundleOptions, num_images: int) -> float:
    """Ceres's function tolerance for a problem of ``num_images`` adjusted images (``tolerance_views``)."""
    return options.function_tolerance * min(1.0, options.tolerance_views / max(num_images, 1))


def bundle_adjust(
    rec: pycolmap.Reconstruction, options: BundleOptions, loss_scale: float, refine_intrinsics: bool = True
) -> pycolmap.BundleAdjustmentSummary | None:
    """One bundle adjustment of the :func:`adjustable_images` and their points; None if there is nothing to
    do. With ``refine_intrinsics=False`` every camera is kept constant, else those of known intrinsics
    (``has_prior_focal_length``: ``run_pipeline``'s ``camera_params``)."""
    image_ids = adjustable_images(rec, options.min_adjusted_link)
    if len(image_ids) < 2 or rec.num_points3D() == 0:
        return None
    ba = pycolmap.BundleAdjustmentOptions()
    ba.refine_focal_length = options.refine_focal_length
    ba.refine_principal_point = options.refine_principal_point
    ba.refine_extra_params = options.refine_extra_params
    ba.print_summary = False
    if options.loss not in LOSSES:
        raise ValueError(f"unknown loss {options.loss!r}; choose one of {sorted(LOSSES)}")
    ba.ceres.loss_function_type = LOSSES[options.loss]
    ba.ceres.loss_function_scale = float(loss_scale)
    ba.ceres.solver_options.max_num_iterations = options.max_iterations
    ba.ceres.solver_options.function_tolerance = solve_tolerance(options, len(image_ids))
    ba.ceres.solver_options.parameter_tolerance = 1e-8
    ba.ceres.solver_options.num_threads = options.num_threads
    ba.ceres.min_num_residuals_for_cpu_multi_threading = 0
    config = pycolmap.BundleAdjustmentConfig()
    for image_id in image_ids:
        config.add_image(image_id)
    for camera_id, camera in rec.cameras.items():
        if not refine_intrinsics or camera.has_prior_focal_length:
            config.set_constant_cam_intrinsics(camera_id)
    config.fix_gauge(pycolmap.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
    summary = pycolmap.create_default_bundle_adjuster(ba, config, rec).solve()
    # a camera fitted to few points can end with a distortion that folds its image border (no ray there,
    # an undistorted copy mirrored into itself): its distortion back at zero, held with the camera's
    # other intrinsics while the rest is adjusted again
    refined = [c for c in rec.cameras if refine_intrinsics and not rec.cameras[c].has_prior_focal_length]
    folded = [c for c in refined if implausible_camera(rec.cameras[c]) is not None]
    if folded:
        for camera_id in folded:
            camera = rec.cameras[camera_id]
            params = camera.params
            params[camera.extra_params_idxs()] = 0.0
            camera.params = params
            config.set_constant_cam_intrinsics(camera_id)
        logger.info("distortion of %d camera(s) reset: it folded the image border", len(folded))
        summary = pycolmap.create_default_bundle_adjuster(ba, config, rec).solve()
    return summary


def triangulator_options(options: BundleOptions) -> pycolmap.IncrementalTriangulatorOptions:
    tri = pycolmap.IncrementalTriangulatorOptions()
    tri.min_angle = options.min_tri_angle
    tri.complete_max_reproj_error = options.max_reproj_error
    tri.merge_max_reproj_error = options.max_reproj_error
    tri.ignore_two_view_tracks = False
    tri.random_seed = 0  # else its RANSAC draws a new seed every run and runs differ
    return tri


def retriangulate(
    rec: pycolmap.Reconstruction,
    triangulator: pycolmap.IncrementalTriangulator,
    options: BundleOptions,
) -> int:
    """Complete and merge tracks and triangulate untriangulated observations; returns observations added."""
    tri = triangulator_options(options)
    added = triangulator.complete_all_tracks(tri)
    added += triangulator.merge_all_tracks(tri)
    for image_id in sorted(rec.reg_image_ids()):
        added += triangulator.triangulate_image(tri, image_id)
    added += triangulator.retriangulate(tri)
    return added


def adjustable_images(rec: pycolmap.Reconstruction, min_link: int) -> list[int]:
    """Sorted ids of the registered images in the largest group linked by pairs that share at least
    ``min_link`` 3D points (:func:`weakly_linked_images`): the images bundle adjustment can pose."""
    weak = set(weakly_linked_images(rec, min_link))
    return [image_id for image_id in sorted(rec.reg_image_ids()) if image_id not in weak]


def normalizing_transform(rec: pycolmap.Reconstruction, min_link: int = 0) -> pycolmap.Sim3d:
    """new_from_old: world := frame of the lowest-id image of :func:`adjustable_images` (the camera COLMAP's
    gauge fixes; with ``min_link`` 0 the lowest registered image), scaled to a median point depth of 1."""
    first = rec.image(adjustable_images(rec, min_link)[0])
    cam_from_world = first.cam_from_world()
    xyz = np.array([p.xyz for p in rec.points3D.values()], dtype=np.float64).reshape(-1, 3)
    depths = (cam_from_world * xyz)[:, 2] if len(xyz) else xyz[:, 2]
    median = float(np.median(np.abs(depths))) if len(depths) else 1.0
    scale = 1.0 / median if np.isfinite(median) and median > 0 else 1.0
    return pycolmap.Sim3d(scale, cam_from_world.rotation, scale * cam_from_world.translation)


def refine_reconstruction(
    rec: pycolmap.Reconstruction,
    manager: pycolmap.ObservationManager,
    triangulator: pycolmap.IncrementalTriangulator,
    options: BundleOptions,
    pixel_scale: float = 1.0,
) -> list[dict]:
    """Rounds of bundle adjustment, filtering and re-triangulation (module docstring); per-round stats.

    ``pixel_scale``: original pixels per work pixel; the loss scales are in work pixels, the filtering and
    triangulation thresholds in original pixels.
    """
    if rec.num_reg_images() < 2:
        return []
    new_from_old = normalizing_transform(rec, options.min_adjusted_link)
    rec.transform(new_from_old)
    try:
        return _refine(rec, manager, triangulator, options, pixel_scale)
    finally:
        rec.transform(new_from_old.inverse())


def _refine(
    rec: pycolmap.Reconstruction,
    manager: pycolmap.ObservationManager,
    triangulator: pycolmap.IncrementalTriangulator,
    options: BundleOptions,
    pixel_scale: float,
) -> list[dict]:
    history = []
    if rec.num_points3D():
        rec.update_point_3d_errors()
        median = float(np.median([p.error for p in rec.points3D.values()]))
        threshold = max(options.initial_outlier_factor * median, options.max_reproj_error)
        ids = set(rec.point3D_ids())
        removed = manager.filter_points3D_with_large_reprojection_error(threshold, ids)
        removed += manager.filter_points3D_with_small_triangulation_angle(
            options.min_tri_angle, set(rec.point3D_ids())
        )
        history.append(
            {
                "round": "prefilter",
                "max_reproj_error_px": threshold,
                "filtered_observations": int(removed),
                "points3D": rec.num_points3D(),
            }
        )
    for round_index in range(options.rounds):
        start = time.perf_counter()
        scale = options.initial_loss_scale if round_index == 0 else options.loss_scale
        refine_intrinsics = round_index > 0 or options.rounds == 1
        summary = bundle_adjust(rec, options, scale * pixel_scale, refine_intrinsics=refine_intrinsics)
        if summary is None:
            logger.info(  # the run ends in ReconstructionError, which says so once
                "bundle adjustment skipped: %d registered images, %d points",
                rec.num_reg_images(),
                rec.num_points3D(),
            )
            break
        filtered = manager.filter_all_points3D(options.max_reproj_error, options.min_tri_angle)
        polished = None
        if options.polish and round_index == options.rounds - 1:
            polished = _polish(rec, manager, options, scale * pixel_scale, refine_intrinsics)
            if polished is not None:
                filtered += polished["filtered_observations"]
        error_after_filter = mean_reprojection_error(rec)
        added = 0
        if round_index < options.rounds - 1:
            added = retriangulate(rec, triangulator, options)
        history.append(
            {
                "round": round_index,
                "loss_scale_px": scale * pixel_scale,
                "solution_usable": bool(summary.is_solution_usable()),
                "termination": _termination(summary),
                "mean_reprojection_error_px": error_after_filter,
                "filtered_observations": int(filtered),
                "retriangulated_observations": int(added),
                "points3D": rec.num_points3D(),
                "polish": polished,
                "time_s": time.perf_counter() - start,
            }
        )
    return history


def _polish(
    rec: pycolmap.Reconstruction,
    manager: pycolmap.ObservationManager,
    options: BundleOptions,
    loss_scale: float,
    refine_intrinsics: bool,
) -> dict | None:
    """One more bundle adjustment of the filtered problem, then filtering; its stats (None if nothing to
    adjust)."""
    summary = bundle_adjust(rec, options, loss_scale, refine_intrinsics=refine_intrinsics)
    if summary is None:
        return None
    filtered = manager.filter_all_points3D(options.max_reproj_error, options.min_tri_angle)
    return {"termination": _termination(summary), "filtered_observations": int(filtered)}


def _termination(summary: pycolmap.BundleAdjustmentSummary) -> str:
    """Ceres's termination type by name ("CONVERGENCE", "NO_CONVERGENCE", ...)."""
    return str(summary.termination_type).rsplit(".", 1)[-1]


def observations(rec: pycolmap.Reconstruction, image_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(point3D id, position of the image in ``image_ids``) of every observation of a 3D point by those
    images, as two int64 arrays."""
    point_ids, slots = [], []
    for slot, image_id in enumerate(image_ids):
        seen = [point.point3D_id for point in rec.image(image_id).get_observation_points2D()]
        point_ids.append(np.asarray(seen, dtype=np.int64))
        slots.append(np.full(len(seen), slot, dtype=np.int64))
    empty = np.zeros(0, dtype=np.int64)
    return np.concatenate([empty, *point_ids]), np.concatenate([empty, *slots])


def weakly_linked_images(
    rec: pycolmap.Reconstruction,
    min_shared_points: int,
    distrusted: Iterable[tuple[int, int]] = (),
) -> list[int]:
    """Registered images outside the largest group of images linked by view pairs that share at least
    ``min_shared_points`` 3D points (ties: the group with more observations); the ``distrusted`` pairs of
    image ids do not link.

    A view hanging on a handful of points has a pose nothing checks (bundle adjustment fits it to them),
    often a wrong one; COLMAP's mapper would not register it either.
    """
    image_ids = sorted(rec.reg_image_ids())
    if len(image_ids) < 2 or min_shared_points <= 0:
        return []
    slot = {image_id: k for k, image_id in enumerate(image_ids)}
    n = len(image_ids)
    point_ids, slots = observations(rec, image_ids)
    # distinct (point, image) observations, sorted by point then image: each point's images form a run
    seen = np.unique(point_ids * n + slots)
    points, images = seen // n, seen % n
    per_image = np.bincount(images, minlength=n)
    longest = int(np.unique(points, return_counts=True)[1].max()) if points.size else 0
    pair_codes = [np.zeros(0, dtype=np.int64)]
    for gap in range(1, longest):  # image pairs (i < j) within each run, gap positions apart
        same = points[gap:] == points[:-gap]
        pair_codes.append(images[:-gap][same] * n + images[gap:][same])
    codes, shared = np.unique(np.concatenate(pair_codes), return_counts=True)
    linked = codes[shared >= min_shared_points]
    excluded = [
        min(slot[i], slot[j]) * n + max(slot[i], slot[j]) for i, j in distrusted if i in slot and j in slot
    ]
    linked = linked[~np.isin(linked, excluded)]
    a, b = linked // n, linked % n
    labels = connected_components(n, np.stack([a, b], axis=1))
    groups = {label: np.flatnonzero(labels == label) for label in np.unique(labels)}
    main = max(groups, key=lambda label: (len(groups[label]), per_image[groups[label]].sum()))
    return [image_ids[k] for k in range(n) if labels[k] != main]


def contradicted_pairs(
    rec: pycolmap.Reconstruction,
    feedforward_cam_from_world: torch.Tensor,
    pairs: Iterable[tuple[int, int]],
    max_disagreement_deg: float,
) -> list[tuple[int, int]]:
    """Image-id pairs (image id = view index + 1) among the registered view-index ``pairs`` whose adjusted
    relative rotation differs from the feed-forward one ((S, 3, 4) cam_from_world) by more than the bound."""
    found = []
    for i, j in pairs:
        a, b = rec.image(i + 1), rec.image(j + 1)
        if not (a.has_pose and b.has_pose):
            continue
        adjusted = [torch.from_numpy(im.cam_from_world().rotation.matrix()) for im in (a, b)]
        before = feedforward_cam_from_world[[i, j], :, :3].double()
        change = rotation_angle_deg(adjusted[1] @ adjusted[0].T, before[1] @ before[0].T)
        if float(change) > max_disagreement_deg:
            found.append((i + 1, j + 1))
    return found


def matched_rotation(
    rec: pycolmap.Reconstruction,
    points2d: Sequence[np.ndarray],
    pair_matches: dict[tuple[int, int], np.ndarray],
    i: int,
    j: int,
    max_error: float = 4.0,
) -> torch.Tensor | None:
    """The relative rotation (view j's camera from view i's, (3, 3) float64) that the pair's own matches
    give: an essential matrix (pycolmap LO-RANSAC, ``max_error`` original pixels) with the cameras of
    ``rec``; None with too few matches or inliers. ``points2d`` are in original pixels (COLMAP's
    convention), ``pair_matches`` as :meth:`~.tracks.Tracks.pairwise_matches`."""
    a, b = min(i, j), max(i, j)
    match = pair_matches.get((a, b))
    if match is None or len(match) < 16:
        return None
    ransac = pycolmap.RANSACOptions()
    ransac.max_error = max_error
    ransac.random_seed = 0
    camera_a, camera_b = (rec.cameras[rec.image(v + 1).camera_id] for v in (a, b))
    found = pycolmap.estimate_essential_matrix(
        points2d[a][match[:, 0]], points2d[b][match[:, 1]], camera_a, camera_b, ransac
    )
    if found is None or int(found["inlier_mask"].sum()) < 16:
        return None
    rotation = torch.from_numpy(found["cam2_from_cam1"].rotation.matrix()).double()  # b from a
    return rotation if (a, b) == (i, j) else rotation.T


def hinged_links(
    rec: pycolmap.Reconstruction,
    feedforward_cam_from_world: torch.Tensor,
    distrusted: Iterable[tuple[int, int]],
    own_rotation: Callable[[int, int], torch.Tensor | None],
) -> list[tuple[int, int]]:
    """The contradicted links (image ids, :func:`contradicted_pairs`) of registered views that bundle
    adjustment bent: the pair's own matches (``own_rotation(i, j)``: view j's camera from view i's, of view
    indices) side with the feed-forward relative rotation, not the adjusted one. Where they side with the
    adjusted one the feed-forward pose was wrong, and the adjustment right."""
    found = []
    for a, b in distrusted:
        i, j = a - 1, b - 1
        if not (rec.image(a).has_pose and rec.image(b).has_pose):
            continue
        own = own_rotation(i, j)
        if own is None:
            continue
        adjusted = [torch.from_numpy(rec.image(v).cam_from_world().rotation.matrix()) for v in (a, b)]
        before = feedforward_cam_from_world[[i, j], :, :3].double()
        to_adjusted = rotation_angle_deg(own, adjusted[1] @ adjusted[0].T)
        to_feedforward = rotation_angle_deg(own, before[1] @ before[0].T)
        if float(to_feedforward) < float(to_adjusted):
            found.append((a, b))
    return found


def beyond_contradicted_links(
    rec: pycolmap.Reconstruction, tree_pairs: Iterable[tuple[int, int]], distrusted: Iterable[tuple[int, int]]
) -> list[int]:
    """Registered images (ids) on the smaller side of each bent link of the feed-forward pose tree
    (``tree_pairs`` of view indices, ``distrusted`` of image ids, :func:`hinged_links`) whose two views are
    both still registered: other pairs kept the two sides linked, so bundle adjustment joined them at the
    wrong angle (a hinge it locked in). The side is the tree's component across the link, counted in
    registered images; a link that does not split the tree (the trees of overlapping chunks) is left
    alone."""
    pairs = np.asarray(sorted({tuple(sorted(p)) for p in tree_pairs}), dtype=np.int64).reshape(-1, 2)
    if not len(pairs):
        return []
    registered = set(rec.reg_image_ids())
    n = int(max(pairs.max() + 1, max((image_id for image_id in rec.images), default=0)))
    beyond: set[int] = set()
    for a, b in distrusted:
        i, j = a - 1, b - 1
        if not ({a, b} <= registered):
            continue
        cut = ~((pairs[:, 0] == min(i, j)) & (pairs[:, 1] == max(i, j)))
        labels = connected_components(n, pairs[cut])
        if labels[i] == labels[j]:
            continue
        sides = [[k + 1 for k in np.flatnonzero(labels == labels[v]) if k + 1 in registered] for v in (i, j)]
        smaller = min(sides, key=len)
        if len(smaller) < len(registered) / 2:
            beyond.update(smaller)
    return sorted(beyond)


def drop_weakly_linked_images(
    rec: pycolmap.Reconstruction,
    manager: pycolmap.ObservationManager,
    min_shared_points: int,
    distrusted: Iterable[tuple[int, int]] = (),
) -> list[int]:
    """De-register the :func:`weakly_linked_images` (their observations go with them); returns their ids."""
    return _deregister(rec, manager, weakly_linked_images(rec, min_shared_points, distrusted))


def drop_hinged_images(
    rec: pycolmap.Reconstruction,
    manager: pycolmap.ObservationManager,
    tree_pairs: Iterable[tuple[int, int]],
    hinged: Iterable[tuple[int, int]],
) -> list[int]:
    """De-register the images :func:`beyond_contradicted_links` of the ``hinged`` links (their
    observations go with them); returns their ids."""
    return _deregister(rec, manager, beyond_contradicted_links(rec, tree_pairs, hinged))


def _deregister(
    rec: pycolmap.Reconstruction, manager: pycolmap.ObservationManager, image_ids: list[int]
) -> list[int]:
    for image_id in image_ids:
        manager.deregister_frame(rec.image(image_id).frame_id)
    return image_ids
