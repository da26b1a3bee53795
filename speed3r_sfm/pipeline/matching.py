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
6. *Track head* (``track_verification.py``, when the backbone has one): the track of ``x`` must see the
   point in view j and end within ``track_tolerance`` model pixels of the refined match.

Steps 2-3 run once per target view over the keypoints of every source view; steps 4-5 over groups of whole
view pairs (about ``refine.chunk`` matches each) in one batch, the pyramids of all views packed into one
:class:`~.refine.PyramidStack`. Where the correction fails, the wide search of step 4 is the final search
of those samples (the same search from the same location), so it is not repeated.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from .checks import require_at_least, require_between, require_positive
from .chunking import free_cuda_bytes
from .frames import SceneGeometry, model_to_work, work_pixels_per_model_pixel, work_to_model
from .inputs import View
from .keypoints import Keypoints
from .records import AttentionSummary
from .refine import REASONS, PyramidStack, RefineOptions, build_pyramid, num_levels, refine_matches
from .track_verification import TrackCheck, Tracker, check_with_tracks

logger = logging.getLogger(__name__)

# GPU memory of one chunk of the refinement's search (16384 windows of up to 43 x 43 values, their sample
# grid and the NCC temporaries: a few hundred MiB), rounded up
REFINE_WORKSPACE_BYTES = 1 << 30


@dataclass
class MatchOptions:
    """Matching settings (distances in model pixels unless stated).

    Attributes:
        max_views: candidate views searched per keypoint; more finds more matches, at more time.
        min_affinity: with GSA records, least share (0-1) of a query block's attention a view needs to be
            a candidate.
        min_covisibility: without GSA records, least share (0-1) of a view's keypoints that another view
            must see, by the predicted geometry, to be a candidate.
        search_radius: radius (model pixels) of the photometric search around the corrected predicted
            location.
        correction_samples: strongest keypoints per view pair searched widely (correction_radius) to
            correct the pair's predicted locations.
        correction_radius: radius (model pixels) of that wide search; also the search radius of a pair
            whose correction fails.
        correction_min_inliers: inliers the correction's robust affine fit needs to be used.
        depth_tolerance: largest relative difference between a projected point's depth and the other
            view's predicted depth there; larger keeps more, less reliable candidates.
        affine_step: finite-difference step (model pixels) of the local affine map of the predicted warp.
        time_limit: seconds for the photometric refinement; view pairs left when it runs out are skipped
            (null: no limit).
        track_verification: with a model that has a track head (VGGT-1B), keep only the matches its tracks
            agree with.
        track_tolerance: largest distance (model pixels) between the track head's location and the refined
            match.
        min_track_visibility: least visibility (0-1) the track head must give the point in the other view.
        refine: Photometric refinement settings (pixels of the work images unless stated).
    """

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
    # also check the refined matches with the track head, if the model has one
    track_verification: bool = True
    track_tolerance: float = 8.0  # model pixels between the track and the refined match
    min_track_visibility: float = 0.2  # upstream demo_colmap.py's --vis_thresh
    refine: RefineOptions = field(default_factory=RefineOptions)

    def __post_init__(self) -> None:
        require_at_least(self, max_views=1, correction_samples=0, correction_min_inliers=0)
        require_positive(self, "search_radius", "correction_radius", "depth_tolerance", "affine_step")
        require_positive(self, "track_tolerance")
        require_between(self, min_affinity=(0.0, 1.0), min_covisibility=(0.0, 1.0))
        require_between(self, min_track_visibility=(0.0, 1.0))
        if self.time_limit is not None:
            require_at_least(self, time_limit=0.0)
        if not isinstance(self.refine, RefineOptions):
            raise TypeError(f"MatchOptions.refine must be a RefineOptions, got {type(self.refine).__name__}")


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


def keep_matches(earlier: Matches, views: Collection[int], into: Matches) -> Matches:
    """``into`` plus the matches of ``earlier`` that touch one of ``views`` and that ``into`` lacks (same
    source view, keypoint and target view); ``into``'s stats, with the count added as ``carried_over``."""
    chosen = torch.tensor(sorted(views), dtype=torch.long)
    wanted = torch.isin(earlier.source_view, chosen) | torch.isin(earlier.target_view, chosen)
    if len(into):
        wanted &= ~torch.isin(_match_keys(earlier), _match_keys(into))
    fields = [f.name for f in dataclasses.fields(Matches) if f.name != "stats"]
    merged = {name: torch.cat([getattr(into, name), getattr(earlier, name)[wanted]]) for name in fields}
    return Matches(**merged, stats={**into.stats, "carried_over": int(wanted.sum())})


def _match_keys(matches: Matches) -> torch.Tensor:
    """One int64 per match: (source view, keypoint, target view), 21 bits each."""
    return (matches.source_view << 42) | (matches.source_index << 21) | matches.target_view


@dataclass
class _Candidates:
    """Verified candidate correspondences, ordered by (source view, target view, keypoint)."""

    source_view: torch.Tensor  # (M,) int64
    source_index: torch.Tensor  # (M,) int64
    target_view: torch.Tensor  # (M,) int64
    predicted: torch.Tensor  # (M, 2) float64 predicted location in the target's work image
    affine: torch.Tensor  # (M, 2, 2) float64 d(work_j)/d(work_i)
    in_block: torch.Tensor  # (M,) bool

    def __len__(self) -> int:
        return int(self.source_view.numel())

    def subset(self, keep: torch.Tensor) -> _Candidates:
        return _Candidates(*(getattr(self, f.name)[keep] for f in dataclasses.fields(self)))


@dataclass
class _SourcePoints:
    """Every view's keypoints, concatenated: what the geometric checks need of the source side."""

    offsets: torch.Tensor  # (S + 1,) int64: view i's keypoints are rows [offsets[i], offsets[i + 1])
    view: torch.Tensor  # (N,) int64
    points: torch.Tensor  # (N, 3) float64 world points at the predicted depth
    ends: torch.Tensor  # (4, N, 3) world points at model offsets ±step along x, then y (_offset_points)
    query: torch.Tensor | None  # (N,) query block (GSA)

    @classmethod
    def compute(
        cls,
        views: list[View],
        keypoints: list[Keypoints],
        geometry: SceneGeometry,
        summary: AttentionSummary | None,
        step: float,
    ) -> _SourcePoints:
        points, ends, queries = [], [], []
        offsets = torch.tensor([0] + [kp.xy.shape[0] for kp in keypoints]).cumsum(0)
        for i, (view, kp) in enumerate(zip(views, keypoints, strict=True)):
            if kp.xy.shape[0] == 0:
                continue
            model_xy = work_to_model(view, kp.xy)
            depth = geometry.sample(geometry.depth, i, model_xy).double()
            points.append(geometry.unproject(i, model_xy, depth))
            ends.append(_offset_points(geometry, i, model_xy, depth, step))
            if summary is not None:
                patch = summary.patch_of_model_xy(model_xy, geometry.image_size)
                queries.append(summary.query_block_of_patch(i, patch.clamp_min(0)))
        if not points:
            points, ends = (
                [torch.zeros(0, 3, dtype=torch.float64)],
                [torch.zeros(4, 0, 3, dtype=torch.float64)],
            )
            queries = [torch.zeros(0, dtype=torch.long)]
        return cls(
            offsets=offsets,
            view=torch.repeat_interleave(torch.arange(len(views)), offsets.diff()),
            points=torch.cat(points),
            ends=torch.cat(ends, dim=1),
            query=torch.cat(queries) if summary is not None else None,
        )


def _offset_points(
    geometry: SceneGeometry, view: int, model_xy: torch.Tensor, depth: torch.Tensor, step: float
) -> torch.Tensor:
    """(4, N, 3) world points of model pixels ``model_xy`` moved by (+step, 0), (-step, 0), (0, +step),
    (0, -step), at their predicted depth (within 10 % of ``depth``; ``depth`` where not finite)."""
    out = []
    for offset in ((step, 0.0), (0.0, step)):
        delta = torch.tensor(offset, dtype=torch.float64)
        for sign in (1.0, -1.0):
            xy = model_xy + sign * delta
            d = geometry.sample(geometry.depth, view, xy).double()
            d = torch.where(torch.isfinite(d), d, depth).clamp(0.9 * depth, 1.1 * depth)
            out.append(geometry.unproject(view, xy, d))
    return torch.stack(out)


def candidate_views(
    views: list[View],
    keypoints: list[Keypoints],
    geometry: SceneGeometry,
    summary: AttentionSummary | None,
    options: MatchOptions,
    sources: _SourcePoints | None = None,
) -> list[torch.Tensor]:
    """Per view i, (N_i, max_views) candidate target views of its keypoints (-1 = none)."""
    s = len(views)
    k = min(options.max_views, s - 1)
    out = []
    if summary is not None:
        for i, (view, kp) in enumerate(zip(views, keypoints, strict=True)):
            if sources is not None and sources.query is not None:
                query = sources.query[sources.offsets[i] : sources.offsets[i + 1]]
            else:
                patch = summary.patch_of_model_xy(work_to_model(view, kp.xy), geometry.image_size)
                query = summary.query_block_of_patch(i, patch.clamp_min(0))
            affinity = summary.view_affinity[query].clone()  # (N, S)
            affinity[:, i] = 0.0
            score, order = affinity.topk(k, dim=1)
            out.append(torch.where(score >= options.min_affinity, order, torch.full_like(order, -1)))
        return out
    covisible = covisibility(views, keypoints, geometry, options, sources)
    for i, kp in enumerate(keypoints):
        row = covisible[i].clone()
        row[i] = -1.0
        score, order = row.topk(k)
        chosen = torch.where(score >= options.min_covisibility, order, torch.full_like(order, -1))
        out.append(chosen[None].expand(kp.xy.shape[0], k))
    return out


def covisibility(
    views: list[View],
    keypoints: list[Keypoints],
    geometry: SceneGeometry,
    options: MatchOptions,
    sources: _SourcePoints | None = None,
) -> torch.Tensor:
    """(S, S): share of view i's keypoints that pass the geometric checks in view j."""
    s = len(views)
    if sources is None:
        sources = _SourcePoints.compute(views, keypoints, geometry, None, options.affine_step)
    count = sources.offsets.diff()
    out = torch.zeros(s, s)
    for j in range(s):  # every view's keypoints at once
        ok, *_ = _project_and_check(views, geometry, sources.points, j, options)
        seen = torch.zeros(s).index_add_(0, sources.view, ok.float())
        out[:, j] = torch.where(count > 0, seen / count.clamp_min(1), 0.0)
    out.fill_diagonal_(0.0)
    return out


def _project_and_check(views, geometry, points, j, options, thresholds=None):
    """Project world points into view j and run the geometric checks; returns (ok, model uv, work uv, z)."""
    uv, z = geometry.project(j, points)
    x0, y0, x1, y1 = views[j].transform.content_box
    inside = (uv[:, 0] >= x0) & (uv[:, 0] <= x1 - 1) & (uv[:, 1] >= y0) & (uv[:, 1] <= y1 - 1)
    ok = torch.isfinite(z) & (z > 0) & inside
    rows = ok.nonzero()[:, 0]  # the depth and confidence checks only where the point lands in view j
    depth_j = _nearest_depths(geometry, j, uv[rows], options.affine_step)  # (M, 9)
    relative = ((depth_j - z[rows, None]).abs() / z[rows].abs().clamp_min(1e-12)[:, None]).nan_to_num(nan=1e9)
    keep = relative.amin(dim=1) <= options.depth_tolerance
    if thresholds is not None:
        keep &= geometry.sample(geometry.confidence, j, uv[rows]).nan_to_num(nan=-1e30) >= thresholds[j]
    ok[rows] = keep
    return ok, uv, model_to_work(views[j], uv), z


def _nearest_depths(geometry: SceneGeometry, view: int, uv: torch.Tensor, step: float) -> torch.Tensor:
    """(N, 9) predicted depths of view ``view`` on a 3 x 3 grid (spacing ``step``) around ``uv``."""
    offsets = torch.tensor([(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dtype=torch.float64) * step
    grid = (uv[:, None, :] + offsets[None]).reshape(-1, 2)
    return geometry.sample(geometry.depth, view, grid).view(-1, 9).double()


def _local_affine(
    geometry: SceneGeometry,
    views: list[View],
    source_view: torch.Tensor,
    j: int,
    ends: torch.Tensor,
    options: MatchOptions,
) -> torch.Tensor:
    """(N, 2, 2) d(work_j)/d(work_i) of the predicted warp: central differences of the projections into
    view j of the offset points ``ends`` (4, N, 3) (:func:`_offset_points`) of keypoints of ``source_view``
    (N,)."""
    step = options.affine_step
    uv, _ = geometry.project(j, ends.reshape(-1, 3))
    uv = uv.view(4, -1, 2)
    jacobian = torch.stack([(uv[0] - uv[1]) / (2 * step), (uv[2] - uv[3]) / (2 * step)], dim=-1)
    si = torch.tensor([work_pixels_per_model_pixel(v) for v in views], dtype=torch.float64)[source_view]
    sj = torch.tensor(work_pixels_per_model_pixel(views[j]), dtype=torch.float64)
    return sj[None, :, None] * jacobian / si[:, None, :]


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
    s = len(views)
    sources = _SourcePoints.compute(views, keypoints, geometry, summary, options.affine_step)
    targets = candidate_views(views, keypoints, geometry, summary, options, sources)
    # every proposed (keypoint, target view), keypoints as rows of ``sources``
    proposals = []
    for i, chosen in enumerate(targets):
        row, column = (chosen >= 0).nonzero(as_tuple=True)
        proposals.append(torch.unique(row * s + chosen[row, column]) + sources.offsets[i] * s)
    proposal = torch.cat(proposals) if proposals else torch.zeros(0, dtype=torch.long)
    found: list[tuple[torch.Tensor, ...]] = []
    for j in range(s):  # the keypoints of every source view proposed for view j
        rows = torch.div(proposal[proposal % s == j], s, rounding_mode="floor")
        if rows.numel() == 0:
            continue
        ok, uv, work_uv, _ = _project_and_check(views, geometry, sources.points[rows], j, options, thresholds)
        rows, uv, work_uv = rows[ok], uv[ok], work_uv[ok]
        if rows.numel() == 0:
            continue
        source_view = sources.view[rows]
        affine = _local_affine(geometry, views, source_view, j, sources.ends[:, rows], options)
        good = _affine_ok(affine)
        rows, uv, work_uv, affine = rows[good], uv[good], work_uv[good], affine[good]
        in_block = torch.zeros(rows.numel(), dtype=torch.bool)
        if summary is not None and sources.query is not None:
            target_patch = summary.patch_of_model_xy(uv, geometry.image_size)
            block = j * summary.blocks_per_view + summary.block_of_patch(target_patch.clamp_min(0))
            in_block = (target_patch >= 0) & summary.selected[sources.query[rows], block]
        found.append((rows, torch.full_like(rows, j), work_uv, affine, in_block))
    if not found:
        empty = torch.zeros(0, dtype=torch.long)
        return _Candidates(
            empty,
            empty,
            empty,
            torch.zeros(0, 2, dtype=torch.float64),
            torch.zeros(0, 2, 2, dtype=torch.float64),
            torch.zeros(0, dtype=torch.bool),
        ), {"proposed": int(proposal.numel())}
    rows, target_view, predicted, affine, in_block = (torch.cat(parts) for parts in zip(*found, strict=True))
    source_view = sources.view[rows]
    order = torch.argsort((source_view * s + target_view) * len(sources.view) + rows)
    rows, source_view = rows[order], source_view[order]
    candidates = _Candidates(
        source_view=source_view,
        source_index=rows - sources.offsets[source_view],
        target_view=target_view[order],
        predicted=predicted[order],
        affine=affine[order],
        in_block=in_block[order],
    )
    return candidates, {"proposed": int(proposal.numel())}


def fit_displacement_fields(
    predicted: torch.Tensor,
    found: torch.Tensor,
    group: torch.Tensor,
    num_groups: int,
    min_inliers: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group of points, a robust affine fit of ``found - predicted`` (N, 2) against ``predicted``.

    ``group``: (N,) group of each point in [0, num_groups). Iteratively reweighted: points off by more
    than max(2 px, 3 x the median residual of the inliers) are dropped, four times. Returns the centre
    (G, 2) and solution (G, 3, 2) of each fit and (G,) whether at least ``min_inliers`` agree (and the
    points are not collinear); the corrected location of a point p of group g is
    ``p + [p - centre[g], 1] @ solution[g]`` (see :func:`apply_displacement_fields`). All groups are
    solved together as one padded batch.
    """
    count = torch.bincount(group, minlength=num_groups)
    width = max(int(count.max()) if count.numel() else 0, 1)
    order = torch.argsort(group, stable=True)
    g = group[order]
    slot = torch.arange(g.numel()) - (count.cumsum(0) - count)[g]
    present = torch.zeros(num_groups, width, dtype=torch.bool)
    present[g, slot] = True
    p = torch.zeros(num_groups, width, 2, dtype=torch.float64)
    p[g, slot] = predicted[order].double()
    offset = torch.zeros_like(p)
    offset[g, slot] = found[order].double() - predicted[order].double()
    centre = p.sum(dim=1) / count.clamp_min(1)[:, None]
    design = torch.cat([p - centre[:, None], present[..., None].double()], dim=-1)  # (G, K, 3)
    valid = count >= min_inliers
    inliers = present
    solution = torch.zeros(num_groups, 3, 2, dtype=torch.float64)
    for _ in range(4):
        valid &= inliers.sum(dim=1) >= min_inliers
        weight = (inliers & valid[:, None]).double()  # outliers as zero rows
        solution, solvable = weighted_least_squares(design, offset, weight)
        valid &= solvable
        residual = ((design[..., None] * solution[:, None]).sum(dim=2) - offset).norm(dim=-1)  # (G, K)
        ranked = torch.where(inliers, residual, torch.full_like(residual, math.inf)).sort(dim=1).values
        middle = torch.div(inliers.sum(dim=1) - 1, 2, rounding_mode="floor").clamp_min(0)  # lower median
        median = ranked.gather(1, middle[:, None])[:, 0]
        inliers = present & (residual <= (3.0 * median).clamp_min(2.0)[:, None])
    valid &= inliers.sum(dim=1) >= min_inliers
    return centre, solution, valid


def weighted_least_squares(
    design: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch, argmin_X sum_k w_k |design_k X - target_k|^2 for design (G, K, 3), target (G, K, C) and
    weights (G, K): X (G, 3, C) float64 and (G,) whether it is determined (else X is zero: the weighted
    design is rank-deficient).

    The 3 x 3 normal equations are solved in closed form, with elementwise operations only: the result
    does not depend on memory alignment or threads, as MKL's batched ``lstsq`` did (differences of 1e-15
    that photometric refinement turned into different matches from run to run). Columns are scaled to unit
    RMS first, which keeps the normal equations well conditioned for pixel coordinates."""
    w = weight.double()[..., None]
    scale = ((design.square() * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)).sqrt()  # (G, 3)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    a = design / scale[:, None]
    normal = (a[..., :, None] * a[..., None, :] * w[..., None]).sum(dim=1)  # (G, 3, 3)
    moment = (a[..., :, None] * target[..., None, :] * w[..., None]).sum(dim=1)  # (G, 3, C)
    # adjugate of the symmetric 3 x 3 matrix, row by row (cofactors)
    n = normal
    cofactor = torch.stack(
        [
            n[:, 1, 1] * n[:, 2, 2] - n[:, 1, 2] * n[:, 2, 1],
            n[:, 0, 2] * n[:, 2, 1] - n[:, 0, 1] * n[:, 2, 2],
            n[:, 0, 1] * n[:, 1, 2] - n[:, 0, 2] * n[:, 1, 1],
            n[:, 1, 2] * n[:, 2, 0] - n[:, 1, 0] * n[:, 2, 2],
            n[:, 0, 0] * n[:, 2, 2] - n[:, 0, 2] * n[:, 2, 0],
            n[:, 0, 2] * n[:, 1, 0] - n[:, 0, 0] * n[:, 1, 2],
            n[:, 1, 0] * n[:, 2, 1] - n[:, 1, 1] * n[:, 2, 0],
            n[:, 0, 1] * n[:, 2, 0] - n[:, 0, 0] * n[:, 2, 1],
            n[:, 0, 0] * n[:, 1, 1] - n[:, 0, 1] * n[:, 1, 0],
        ],
        dim=-1,
    ).reshape(-1, 3, 3)
    det = (n[:, 0] * cofactor[:, :, 0]).sum(dim=-1)  # (G,)
    trace = n.diagonal(dim1=1, dim2=2).sum(dim=-1)
    solvable = det > 1e-12 * trace.clamp_min(1e-300) ** 3
    inverse = cofactor / torch.where(solvable, det, torch.ones_like(det))[:, None, None]
    solution = (inverse[..., :, :, None] * moment[:, None, :, :]).sum(dim=2) / scale[..., None]
    return torch.where(solvable[:, None, None], solution, torch.zeros_like(solution)), solvable


def apply_displacement_fields(
    points: torch.Tensor, group: torch.Tensor, centre: torch.Tensor, solution: torch.Tensor
) -> torch.Tensor:
    """Corrected locations (N, 2) of ``points`` (N, 2) of groups ``group`` (N,) by the fits of
    :func:`fit_displacement_fields`."""
    local = points - centre[group]
    fitted = solution[group]  # (N, 3, 2)
    return points + local[:, :1] * fitted[:, 0] + local[:, 1:] * fitted[:, 1] + fitted[:, 2]


def _refine(
    stack: PyramidStack,
    candidates: _Candidates,
    rows: torch.Tensor,
    keypoint_xy: torch.Tensor,
    guess: torch.Tensor,
    radius: float,
    scales: torch.Tensor,
    options: RefineOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`refine_matches` of candidates ``rows`` around ``guess`` (len(rows), 2); ``radius`` in model
    pixels, ``scales`` (S,) work pixels per model pixel of each view, ``keypoint_xy`` (len(rows), 2)."""
    source_view = candidates.source_view[rows]
    per_match = radius * scales[source_view]
    xy = torch.zeros(rows.numel(), 2, dtype=torch.float64)
    ncc, reason = torch.zeros(rows.numel()), torch.zeros(rows.numel(), dtype=torch.long)
    for value in per_match.unique().tolist():  # one value unless the views have several scales
        part = (per_match == value).nonzero()[:, 0]
        xy[part], ncc[part], reason[part] = refine_matches(
            stack,
            stack,
            source_view[part],
            candidates.target_view[rows[part]],
            keypoint_xy[part],
            guess[part],
            candidates.affine[rows[part]],
            value,
            options,
        )
    return xy, ncc, reason


def _check_with_tracks(
    views: list[View],
    keypoints: list[Keypoints],
    candidates: _Candidates,
    target_work_xy: torch.Tensor,
    tracker: Tracker,
    options: MatchOptions,
) -> TrackCheck:
    """:func:`~.track_verification.check_with_tracks` of matches (``candidates`` found at
    ``target_work_xy``, (M, 2) work pixels of their target views), in model pixels."""
    source_xy = torch.zeros(len(candidates), 2, dtype=torch.float64)
    target_xy = torch.zeros_like(source_xy)
    for v, view in enumerate(views):
        rows = (candidates.source_view == v).nonzero()[:, 0]
        source_xy[rows] = work_to_model(view, keypoints[v].xy.double()[candidates.source_index[rows]])
        rows = (candidates.target_view == v).nonzero()[:, 0]
        target_xy[rows] = work_to_model(view, target_work_xy[rows])
    return check_with_tracks(
        tracker,
        candidates.source_view,
        candidates.source_index,
        source_xy,
        candidates.target_view,
        target_xy,
        options.track_tolerance,
        options.min_track_visibility,
    )


def _pair_groups(counts: list[int], size: int) -> list[tuple[int, int]]:
    """Consecutive ranges [first, last) of view pairs with about ``size`` candidates together (a larger
    pair alone)."""
    groups, first, total = [], 0, 0
    for k, count in enumerate(counts):
        if total and total + count > size:
            groups.append((first, k))
            first, total = k, 0
        total += count
    if first < len(counts):
        groups.append((first, len(counts)))
    return groups


def _top_per_group(group: torch.Tensor, score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest ``score`` of each group, for ``group`` (N,) sorted ascending."""
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]  # by group, best first inside each
    sorted_group = group[order]
    rank = torch.arange(order.numel()) - torch.searchsorted(sorted_group, sorted_group)
    return order[rank < k].sort().values


def _work_scales(views: list[View]) -> torch.Tensor:
    """(S,) work pixels per model pixel of each view."""
    return torch.tensor([max(work_pixels_per_model_pixel(v)) for v in views], dtype=torch.float64)


def _wide_search(options: MatchOptions) -> RefineOptions:
    """Refinement settings of the wide searches (correction samples, uncorrected pairs)."""
    return dataclasses.replace(options.refine, level_radius=max(options.refine.level_radius, 16))


def refinement_device(device: torch.device | str | None, grays: list[torch.Tensor]) -> torch.device:
    """Where photometric refinement runs: ``device`` if it is a CUDA device with room for the image pyramids
    of ``grays`` (:func:`matching_pyramids`, float32, twice while they are packed) and the search's
    workspace within half its free memory, else the CPU."""
    cpu = torch.device("cpu")
    device = cpu if device is None else torch.device(device)
    if device.type != "cuda":
        return cpu
    pyramid_bytes = sum(g.numel() for g in grays) * 4 * 4 / 3
    need = 2 * pyramid_bytes + REFINE_WORKSPACE_BYTES
    free = free_cuda_bytes(device)
    if need > 0.5 * free:
        logger.info(
            "photometric refinement on the CPU: the image pyramids need %.1f GiB, %s has %.1f GiB free",
            need / 2**30,
            device,
            free / 2**30,
        )
        return cpu
    return device


def matching_pyramids(
    views: list[View],
    grays: list[torch.Tensor],
    options: MatchOptions,
    device: torch.device | str = "cpu",
) -> PyramidStack:
    """The image pyramids photometric refinement searches, deep enough for the widest search radius, on
    ``device``: the refinement runs where they are."""
    scale = float(_work_scales(views).max())
    levels = max(
        num_levels(options.correction_radius * scale, _wide_search(options).level_radius),
        num_levels(options.search_radius * scale, options.refine.level_radius),
    )
    return PyramidStack.from_pyramids([build_pyramid(g.to(device), levels) for g in grays])


def match_views(
    views: list[View],
    grays: list[torch.Tensor],
    keypoints: list[Keypoints],
    geometry: SceneGeometry,
    summary: AttentionSummary | None,
    thresholds: torch.Tensor,
    options: MatchOptions,
    tracker: Tracker | None = None,
    pyramids: PyramidStack | None = None,
) -> Matches:
    """All verified and refined correspondences of the keypoints (see the module docstring); ``tracker``:
    the backbone's track head (``Prediction.extras["tracker"]``), a second check of the refined matches;
    ``pyramids``: :func:`matching_pyramids` of ``grays`` if already built (a run matches again when it
    rescues views)."""
    candidates, stats = find_candidates(views, keypoints, geometry, summary, thresholds, options)
    m = len(candidates)
    stats["verified"] = m
    if m == 0:
        empty = torch.zeros(0, dtype=torch.long)
        stats["refined"] = 0
        return Matches(
            empty,
            empty,
            empty,
            torch.zeros(0, 2, dtype=torch.float64),
            torch.zeros(0),
            torch.zeros(0, dtype=torch.bool),
            stats,
        )
    s = len(views)
    scales = _work_scales(views)
    wide = _wide_search(options)
    stack = matching_pyramids(views, grays, options) if pyramids is None else pyramids
    first_keypoint = torch.tensor([0] + [kp.xy.shape[0] for kp in keypoints]).cumsum(0)
    keypoint = first_keypoint[candidates.source_view] + candidates.source_index
    keypoint_xy = torch.cat([kp.xy for kp in keypoints]).double()[keypoint]
    keypoint_score = torch.cat([kp.score for kp in keypoints])[keypoint]
    pair = candidates.source_view * s + candidates.target_view  # ascending: candidates are sorted
    counts = torch.unique_consecutive(pair, return_counts=True)[1]
    pair_start = (counts.cumsum(0) - counts).tolist() + [m]
    refined = torch.zeros(m, 2, dtype=torch.float64)
    ncc = torch.zeros(m)
    reason = torch.full((m,), -1, dtype=torch.long)  # -1: not refined (time limit)
    start, skipped, corrected_pairs = time.perf_counter(), 0, 0
    for first, last in _pair_groups(counts.tolist(), options.refine.chunk):
        if options.time_limit is not None and time.perf_counter() - start > options.time_limit:
            skipped += last - first
            continue
        rows = torch.arange(pair_start[first], pair_start[last])
        pair_of_row = torch.repeat_interleave(torch.arange(last - first), counts[first:last])
        # 4. per view pair: its strongest keypoints searched widely, an affine correction of the prediction
        sample = _top_per_group(pair_of_row, keypoint_score[rows], options.correction_samples)
        located, score, why = _refine(
            stack,
            candidates,
            rows[sample],
            keypoint_xy[rows[sample]],
            candidates.predicted[rows[sample]],
            options.correction_radius,
            scales,
            wide,
        )
        accepted = why == 0
        centre, solution, corrected = fit_displacement_fields(
            candidates.predicted[rows[sample]][accepted],
            located[accepted],
            pair_of_row[sample][accepted],
            last - first,
            options.correction_min_inliers,
        )
        corrected_pairs += int(corrected.sum())
        # 5. every candidate: a narrow search around the corrected location; where the correction failed,
        # the wide search around the prediction, which the samples of those pairs have had already
        narrow = corrected[pair_of_row]
        guess = candidates.predicted[rows].clone()
        guess[narrow] = apply_displacement_fields(guess[narrow], pair_of_row[narrow], centre, solution)
        reuse = ~narrow[sample]
        done = torch.zeros(rows.numel(), dtype=torch.bool)
        done[sample[reuse]] = True
        kept = rows[sample[reuse]]
        refined[kept], ncc[kept], reason[kept] = located[reuse], score[reuse], why[reuse]
        for chosen, radius, settings in (
            (narrow, options.search_radius, options.refine),
            (~narrow & ~done, options.correction_radius, wide),
        ):
            part = rows[chosen]
            refined[part], ncc[part], reason[part] = _refine(
                stack, candidates, part, keypoint_xy[part], guess[chosen], radius, scales, settings
            )
    if skipped:
        logger.warning(
            "matching time limit (%.1f s) reached: %d view pairs were not refined",
            options.time_limit,
            skipped,
        )
    ok = reason == 0
    if tracker is None:
        why = "no tracker in the prediction (the model has no track head, or chunked inference)"
        stats["track_verification"] = {"ran": False, "why": why}
    elif not options.track_verification:
        stats["track_verification"] = {"ran": False, "why": "disabled (MatchOptions.track_verification)"}
    else:  # 6. the track head's second opinion on every refined match
        rows = ok.nonzero()[:, 0]
        check = _check_with_tracks(views, keypoints, candidates.subset(rows), refined[rows], tracker, options)
        stats["track_verification"] = {"ran": True, **check.stats(options.min_track_visibility)}
        ok[rows[~check.keep]] = False
    stats["refined"] = int(ok.sum())
    stats["rejected"] = {REASONS[code]: int((reason == code).sum()) for code in REASONS if code}
    stats["pairs_skipped_for_time"] = skipped
    stats["pairs_corrected"] = corrected_pairs
    stats["pairs"] = len(counts)
    stats["in_selected_block"] = (
        float(candidates.in_block[ok].float().mean()) if summary is not None and ok.any() else None
    )
    return Matches(
        candidates.source_view[ok],
        candidates.source_index[ok],
        candidates.target_view[ok],
        refined[ok],
        ncc[ok],
        candidates.in_block[ok],
        stats,
    )
