"""Correspondences: GSA candidates, verified by the predicted geometry, refined photometrically.

For keypoint ``x`` of view i:

1. *Candidate views.* With GSA records, the views whose blocks the query block containing ``x`` selected
   (selection mass summed over layers, heads and top-k entries; the ``max_views`` views with the largest
   share above ``min_affinity``). Without records, the ``max_views`` views that see most of view i's
   keypoints according to the predicted geometry.
2. *Predicted location.* ``x`` is unprojected with its predicted depth, K_i and pose_i, and projected into
   view j; the local affine map of that warp (finite differences over the predicted depth) shapes the
   patch comparison.
3. *Verification.* The projection must lie in front of camera j and inside its image content; its depth
   must agree with view j's predicted depth nearby (relative ``depth_tolerance``) and view j's depth
   confidence there must pass its threshold. Whether the location falls in a block the query block
   selected is recorded (``in_selected_block``): a statistic of how well GSA's selection and the
   geometry agree.
4. *Correction per view pair.* Pose errors displace the predicted locations of a view pair by a smooth
   field (a rotation error shifts the whole image). The ``correction_samples`` strongest keypoints of the
   pair are searched widely (``correction_radius``); a robust affine fit of their displacements against
   position corrects every predicted location of the pair, so the full search can stay narrow.
5. *Photometric refinement* (``refine.py``): coarse-to-fine NCC in the work images around the corrected
   location, sub-pixel peak; matches below ``min_ncc`` or without a distinct peak are dropped. This is
   what makes the correspondences more accurate than the feed-forward geometry.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch

from .frames import SceneGeometry, model_to_work, work_pixels_per_model_pixel, work_to_model
from .inputs import View
from .keypoints import Keypoints
from .records import AttentionSummary
from .refine import REASONS, RefineOptions, build_pyramid, num_levels, refine_pair

logger = logging.getLogger(__name__)


@dataclass
class MatchOptions:
    """Matching settings (distances in model pixels unless stated)."""

    max_views: int = 6  # candidate views per keypoint
    min_affinity: float = 0.02  # GSA: minimum share of a query block's selection mass for a candidate view
    min_covisibility: float = 0.05  # dense fallback: minimum share of keypoints seen by a candidate view
    search_radius: float = 12.0  # how far (model pixels) the refinement looks around the corrected location
    correction_samples: int = (
        96  # strongest keypoints per view pair searched widely to correct the prediction
    )
    correction_radius: float = 64.0  # model pixels; also the search radius if the correction fails
    correction_min_inliers: int = 12
    depth_tolerance: float = 0.1  # relative depth agreement between the projection and view j's depth
    affine_step: float = 2.0  # finite-difference step for the local affine map
    time_limit: float | None = None  # seconds for the refinement; remaining view pairs are skipped
    refine: RefineOptions = field(default_factory=RefineOptions)


@dataclass
class Matches:
    """Verified, refined correspondences from keypoints to locations in other views (work pixels)."""

    source_view: torch.Tensor  # (M,) int64
    source_index: torch.Tensor  # (M,) int64 keypoint index in the source view
    target_view: torch.Tensor  # (M,) int64
    target_xy: torch.Tensor  # (M, 2) float64 refined location in the target's work image
    ncc: torch.Tensor  # (M,) float32
    in_selected_block: torch.Tensor  # (M,) bool (False without GSA records)
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.source_view.numel())


@dataclass
class _Candidates:
    source_view: list[torch.Tensor] = field(default_factory=list)
    source_index: list[torch.Tensor] = field(default_factory=list)
    target_view: list[torch.Tensor] = field(default_factory=list)
    predicted: list[torch.Tensor] = field(default_factory=list)
    affine: list[torch.Tensor] = field(default_factory=list)
    in_block: list[torch.Tensor] = field(default_factory=list)

    def cat(self):
        return [torch.cat(getattr(self, name)) for name in self.__dataclass_fields__]


def candidate_views(
    views: list[View],
    keypoints: list[Keypoints],
    geometry: SceneGeometry,
    summary: AttentionSummary | None,
    options: MatchOptions,
) -> list[torch.Tensor]:
    """Per view i, (N_i, max_views) candidate target views of its keypoints (-1 = none)."""
    s = len(views)
    k = min(options.max_views, s - 1)
    out = []
    if summary is not None:
        for i, (view, kp) in enumerate(zip(views, keypoints, strict=True)):
            patch = summary.patch_of_model_xy(work_to_model(view, kp.xy), geometry.image_size)
            query = summary.query_block_of_patch(i, patch.clamp_min(0))
            affinity = summary.view_affinity[query].clone()  # (N, S)
            affinity[:, i] = 0.0
            score, order = affinity.topk(k, dim=1)
            out.append(torch.where(score >= options.min_affinity, order, torch.full_like(order, -1)))
        return out
    covisible = covisibility(views, keypoints, geometry, options)
    for i, kp in enumerate(keypoints):
        row = covisible[i].clone()
        row[i] = -1.0
        score, order = row.topk(k)
        chosen = torch.where(score >= options.min_covisibility, order, torch.full_like(order, -1))
        out.append(chosen[None].expand(kp.xy.shape[0], k))
    return out


def covisibility(
    views: list[View], keypoints: list[Keypoints], geometry: SceneGeometry, options: MatchOptions
) -> torch.Tensor:
    """(S, S): share of view i's keypoints that pass the geometric checks in view j."""
    s = len(views)
    out = torch.zeros(s, s)
    for i, (view, kp) in enumerate(zip(views, keypoints, strict=True)):
        if kp.xy.shape[0] == 0:
            continue
        model_xy = work_to_model(view, kp.xy)
        depth = geometry.sample(geometry.depth, i, model_xy)
        points = geometry.unproject(i, model_xy, depth)
        for j in range(s):
            if j != i:
                ok, *_ = _project_and_check(views, geometry, points, j, options)
                out[i, j] = ok.float().mean()
    return out


def _project_and_check(views, geometry, points, j, options, thresholds=None):
    """Project world points into view j and run the geometric checks; returns (ok, model uv, work uv, z)."""
    uv, z = geometry.project(j, points)
    x0, y0, x1, y1 = views[j].transform.content_box
    inside = (uv[:, 0] >= x0) & (uv[:, 0] <= x1 - 1) & (uv[:, 1] >= y0) & (uv[:, 1] <= y1 - 1)
    ok = torch.isfinite(z) & (z > 0) & inside
    depth_j = _nearest_depths(geometry, j, uv, options.affine_step)  # (N, 9)
    relative = ((depth_j - z[:, None]).abs() / z.abs().clamp_min(1e-12)[:, None]).nan_to_num(nan=1e9)
    ok &= relative.amin(dim=1) <= options.depth_tolerance
    if thresholds is not None:
        ok &= geometry.sample(geometry.confidence, j, uv).nan_to_num(nan=-1e30) >= thresholds[j]
    return ok, uv, model_to_work(views[j], uv), z


def _nearest_depths(geometry: SceneGeometry, view: int, uv: torch.Tensor, step: float) -> torch.Tensor:
    """(N, 9) predicted depths of view ``view`` on a 3 x 3 grid (spacing ``step``) around ``uv``."""
    offsets = torch.tensor([(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dtype=torch.float64) * step
    grid = (uv[:, None, :] + offsets[None]).reshape(-1, 2)
    return geometry.sample(geometry.depth, view, grid).view(-1, 9).double()


def _local_affine(geometry, views, i, j, model_xy, depth, options):
    """(N, 2, 2) d(work_j)/d(work_i) of the predicted warp, from the depth around each keypoint."""
    step = options.affine_step
    columns = []
    for offset in ((step, 0.0), (0.0, step)):
        delta = torch.tensor(offset, dtype=torch.float64)
        ends = []
        for sign in (1.0, -1.0):
            xy = model_xy + sign * delta
            d = geometry.sample(geometry.depth, i, xy).double()
            d = torch.where(torch.isfinite(d), d, depth).clamp(0.9 * depth, 1.1 * depth)
            uv, _ = geometry.project(j, geometry.unproject(i, xy, d))
            ends.append(uv)
        columns.append((ends[0] - ends[1]) / (2 * step))
    jacobian = torch.stack(columns, dim=-1)  # model_j per model_i
    si = torch.tensor(work_pixels_per_model_pixel(views[i]), dtype=torch.float64)
    sj = torch.tensor(work_pixels_per_model_pixel(views[j]), dtype=torch.float64)
    return sj[None, :, None] * jacobian / si[None, None, :]


def _affine_ok(affine: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(affine).flatten(1).all(dim=1)
    safe = torch.where(finite[:, None, None], affine, torch.eye(2, dtype=affine.dtype).expand_as(affine))
    singular = torch.linalg.svdvals(safe)
    return finite & (torch.linalg.det(safe) > 0) & (singular[:, 1] > 0.25) & (singular[:, 0] < 4.0)


def find_candidates(
    views: list[View],
    keypoints: list[Keypoints],
    geometry: SceneGeometry,
    summary: AttentionSummary | None,
    thresholds: torch.Tensor,
    options: MatchOptions,
) -> tuple[_Candidates, dict]:
    """Geometrically verified candidate correspondences (steps 1-3 of the module docstring)."""
    candidates = _Candidates()
    proposed = 0
    targets = candidate_views(views, keypoints, geometry, summary, options)
    for i, (view, kp) in enumerate(zip(views, keypoints, strict=True)):
        if kp.xy.shape[0] == 0:
            continue
        model_xy = work_to_model(view, kp.xy)
        depth = geometry.sample(geometry.depth, i, model_xy).double()
        points = geometry.unproject(i, model_xy, depth)
        query = None
        if summary is not None:
            patch = summary.patch_of_model_xy(model_xy, geometry.image_size)
            query = summary.query_block_of_patch(i, patch.clamp_min(0))
        for j in targets[i].unique().tolist():
            if j < 0:
                continue
            rows = (targets[i] == j).any(dim=1).nonzero()[:, 0]
            proposed += rows.numel()
            ok, uv, work_uv, _ = _project_and_check(views, geometry, points[rows], j, options, thresholds)
            rows, uv, work_uv = rows[ok], uv[ok], work_uv[ok]
            if rows.numel() == 0:
                continue
            affine = _local_affine(geometry, views, i, j, model_xy[rows], depth[rows], options)
            good = _affine_ok(affine)
            rows, uv, work_uv, affine = rows[good], uv[good], work_uv[good], affine[good]
            in_block = torch.zeros(rows.numel(), dtype=torch.bool)
            if summary is not None:
                target_patch = summary.patch_of_model_xy(uv, geometry.image_size)
                block = j * summary.blocks_per_view + summary.block_of_patch(target_patch.clamp_min(0))
                in_block = (target_patch >= 0) & summary.selected[query[rows], block]
            candidates.source_view.append(torch.full_like(rows, i))
            candidates.source_index.append(rows)
            candidates.target_view.append(torch.full_like(rows, j))
            candidates.predicted.append(work_uv)
            candidates.affine.append(affine)
            candidates.in_block.append(in_block)
    return candidates, {"proposed": proposed}


def displacement_field(predicted: torch.Tensor, found: torch.Tensor, min_inliers: int):
    """Robust affine fit of ``found - predicted`` (N, 2) against ``predicted``: a function mapping predicted
    locations (M, 2) to corrected ones, or None when fewer than ``min_inliers`` agree. Iteratively
    reweighted: points off by more than max(2 px, 3 x the median residual) are dropped."""
    if predicted.shape[0] < min_inliers:
        return None
    centre = predicted.mean(dim=0)
    design = torch.cat([predicted - centre, torch.ones(predicted.shape[0], 1, dtype=predicted.dtype)], 1)
    offset = found - predicted
    inliers = torch.ones(predicted.shape[0], dtype=torch.bool)
    for _ in range(4):
        if int(inliers.sum()) < min_inliers:
            return None
        solution = torch.linalg.lstsq(design[inliers], offset[inliers]).solution  # (3, 2)
        residual = (design @ solution - offset).norm(dim=1)
        inliers = residual <= max(2.0, 3.0 * float(residual[inliers].median()))
    if int(inliers.sum()) < min_inliers:
        return None

    def correct(points: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([points - centre, torch.ones(points.shape[0], 1, dtype=points.dtype)], 1)
        return points + rows @ solution

    return correct


def match_views(
    views: list[View],
    grays: list[torch.Tensor],
    keypoints: list[Keypoints],
    geometry: SceneGeometry,
    summary: AttentionSummary | None,
    thresholds: torch.Tensor,
    options: MatchOptions,
) -> Matches:
    """All verified and refined correspondences of the keypoints (see the module docstring)."""
    candidates, stats = find_candidates(views, keypoints, geometry, summary, thresholds, options)
    if not candidates.source_view:
        empty = torch.zeros(0, dtype=torch.long)
        stats.update(verified=0, refined=0)
        return Matches(
            empty,
            empty,
            empty,
            torch.zeros(0, 2, dtype=torch.float64),
            torch.zeros(0),
            torch.zeros(0, dtype=torch.bool),
            stats,
        )
    source_view, source_index, target_view, predicted, affine, in_block = candidates.cat()
    stats["verified"] = int(source_view.numel())
    scales = [max(work_pixels_per_model_pixel(v)) for v in views]
    wide = dataclasses.replace(options.refine, level_radius=max(options.refine.level_radius, 16))
    levels = max(
        num_levels(options.correction_radius * max(scales), wide.level_radius),
        num_levels(options.search_radius * max(scales), options.refine.level_radius),
    )
    pyramids = [build_pyramid(g, levels) for g in grays]
    corrected_pairs = 0
    refined = torch.zeros_like(predicted)
    ncc = torch.zeros(source_view.numel())
    reason = torch.full((source_view.numel(),), -1, dtype=torch.long)  # -1: not refined (time limit)
    pair = source_view * len(views) + target_view
    start, skipped = time.perf_counter(), 0
    for key in pair.unique().tolist():
        rows = (pair == key).nonzero()[:, 0]
        if options.time_limit is not None and time.perf_counter() - start > options.time_limit:
            skipped += 1
            continue
        i, j = divmod(key, len(views))
        sources = keypoints[i].xy[source_index[rows]]
        sample = rows[torch.argsort(keypoints[i].score[source_index[rows]], descending=True)]
        sample = sample[: options.correction_samples]
        located, _, why = refine_pair(
            pyramids[i],
            pyramids[j],
            keypoints[i].xy[source_index[sample]],
            predicted[sample],
            affine[sample],
            options.correction_radius * scales[i],
            wide,
        )
        field = displacement_field(
            predicted[sample][why == 0], located[why == 0], options.correction_min_inliers
        )
        radius = options.correction_radius if field is None else options.search_radius
        guess = predicted[rows] if field is None else field(predicted[rows])
        corrected_pairs += field is not None
        xy, score, why = refine_pair(
            pyramids[i],
            pyramids[j],
            sources,
            guess,
            affine[rows],
            radius * scales[i],
            options.refine if field is not None else wide,
        )
        refined[rows], ncc[rows], reason[rows] = xy, score, why
    if skipped:
        logger.warning(
            "matching time limit (%.1f s) reached: %d view pairs were not refined",
            options.time_limit,
            skipped,
        )
    ok = reason == 0
    stats["refined"] = int(ok.sum())
    stats["rejected"] = {REASONS[code]: int((reason == code).sum()) for code in REASONS if code}
    stats["pairs_skipped_for_time"] = skipped
    stats["pairs_corrected"] = corrected_pairs
    stats["pairs"] = int(pair.unique().numel())
    stats["in_selected_block"] = (
        float(in_block[ok].float().mean()) if summary is not None and ok.any() else None
    )
    return Matches(
        source_view[ok], source_index[ok], target_view[ok], refined[ok], ncc[ok], in_block[ok], stats
    )
