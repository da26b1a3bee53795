"""Camera poses from the model's own patch descriptors and depth ("token poses").

A model trained with the patch-correspondence loss (``VGGTConfig.descriptor_layer``, e.g. the shipped
default) exports L2-normalised patch tokens that match across views. For a pair of views, mutual nearest
neighbours among those tokens give patch correspondences; the predicted depth at the patch centres lifts
them into the camera frames. Three solvers give the pair's relative pose (a similarity: its scale is the
ratio of the two views' depth scales): a robust Sim(3) of the two point sets (:func:`~.chunking.robust_sim3`),
PnP of one view's points in the other's pixels, and the essential matrix of the pixels (pycolmap); by
default the one with the lowest symmetric reprojection error is kept. The pairs form a graph (edge weight:
matches within ``inlier_error`` pixels); the maximum spanning tree from view 0 chains them into one frame.

Small models regress relative pose poorly from their camera token, yet match patches well: on held-out
synthetic scenes the shipped default's camera head is off by 6-13 degrees between consecutive views (median
per scene) where its token poses are off by 1-3 on five scenes of six (``benchmarks/results/token_poses.md``).
Chaining along the tree accumulates drift; bundle adjustment does not always remove it.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import pycolmap
import torch

from ..geometry import depth_to_world_points, patch_centres
from ..models.prediction import Prediction
from .chunking import robust_sim3
from .frames import SceneGeometry

logger = logging.getLogger(__name__)

ROTATION_SOURCES = ("best", "pnp", "essential", "sim3")
RANSAC_TRIALS = 1000  # a pair has 100-200 matches with about half inliers: plenty
# below this many trials RANSAC may stop once it is confident (pycolmap's essential-matrix default, 1000,
# made every pair run all 1000 trials: 0.8 of the 1.1 s of token poses at 24 views)
RANSAC_MIN_TRIALS = 100
# pairs aligned at once: a third of a pair's time holds the GIL (small torch ops), so more threads queue for
# it. Token poses at 24 views, 1 / 2 / 4 / 16 workers: 0.9 / 0.46 / 0.66 / 1.4 s on 2 cores,
# 1.2 / 0.69 / 0.85 / 1.3 s on a 16-core GPU host (token_poses_threads.md)
POOL_WORKERS = 2
# mean-descriptor cosine above which two views count as the same view (the shipped default: 0.9999 for one
# view as PNG and as JPEG, at most 0.991 between neighbouring views of the held-out scenes)
DUPLICATE_AFFINITY = 0.999


@dataclass
class TokenPoseOptions:
    """Token poses: camera poses from the model's own patch descriptors and depth.

    Attributes:
        enabled: use token poses when the model exports descriptors (otherwise the camera head's poses).
        rotation_from: solver of a pair's relative pose: "essential" (essential matrix of the matched patch
            centres, unaffected by depth errors; scale and baseline from the depths), "pnp" (one view's
            points in the other's pixels), "sim3" (robust Sim(3) of the two point sets) or "best" (all
            three, keeping the lowest median symmetric reprojection error).
        max_error: RANSAC threshold (model pixels) of PnP and the essential matrix.
        inlier_error: reprojection error (model pixels) under which a match counts towards a pair's support.
        neighbours: partner views per view, the most similar by mean descriptor (all pairs when fewer
            views); doubled, for the pairs not tried yet, while some view is not connected.
        min_matches: mutual descriptor matches below which a pair is not used.
        min_confidence_quantile: patches whose predicted depth confidence is below this quantile (0-1) of
            their view are not matched.
        hypotheses: random 3-point hypotheses the robust Sim(3) fit starts from; more is more robust and
            slower.
    """

    enabled: bool = True
    rotation_from: str = "best"
    max_error: float = 4.0
    inlier_error: float = 10.0
    neighbours: int = 3
    min_matches: int = 12
    min_confidence_quantile: float = 0.1
    hypotheses: int = 32

    def __post_init__(self) -> None:
        if self.rotation_from not in ROTATION_SOURCES:
            raise ValueError(f"rotation_from must be one of {ROTATION_SOURCES}, got {self.rotation_from!r}")


@dataclass
class PairAlignment:
    """``i_from_j``: Sim(3) (s, R (3, 3), t (3,)) mapping view j's camera-frame points to view i's."""

    i: int
    j: int
    scale: torch.Tensor
    rotation: torch.Tensor
    translation: torch.Tensor
    matches: int
    support: float


@dataclass
class TokenPoses:
    """Token poses of all S views in view 0's frame: ``cam_from_world`` (S, 3, 4) float64 rigid poses and
    ``depth_scale`` (S,): multiply view k's predicted depth by it to bring it to view 0's scale."""

    cam_from_world: torch.Tensor
    depth_scale: torch.Tensor
    edges: list[PairAlignment] = field(default_factory=list)

    def report(self) -> dict:
        return {
            "tree_edges": [[e.i, e.j] for e in self.edges],
            "tree_support": [e.support for e in self.edges],
            "tree_matches_min": min((e.matches for e in self.edges), default=0),
            "tree_support_min": min((e.support for e in self.edges), default=0.0),
        }


def patch_camera_points(
    depth: torch.Tensor, intrinsics: torch.Tensor, patch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, P, 3) float64 camera-frame points at the centre pixel of each patch (row-major) and (P, 2) those
    pixels (x, y), from depth (S, H, W) and K (S, 3, 3) (pixel (u, v) centred at (u, v))."""
    h, w = depth.shape[-2:]
    pixels = patch_centres(h, w, patch).flip(-1)  # (x, y)
    z = depth[:, pixels[:, 1], pixels[:, 0]].double()  # (S, P)
    homogeneous = torch.cat([pixels.double(), torch.ones(len(pixels), 1, dtype=torch.float64)], dim=-1)
    rays = homogeneous @ torch.linalg.inv(intrinsics.double()).transpose(-1, -2)  # (S, P, 3)
    return rays * z[..., None], pixels


def mutual_matches(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mutual nearest neighbours of unit descriptors a (N, C) and b (M, C): indices into a, into b, and
    their cosine similarities."""
    similarity = a.float() @ b.float().T
    best_b = similarity.argmax(dim=1)
    best_a = similarity.argmax(dim=0)
    rows = (best_a[best_b] == torch.arange(len(a))).nonzero()[:, 0]
    cols = best_b[rows]
    return rows, cols, similarity[rows, cols]


def _pinhole(intrinsics: torch.Tensor, height: int, width: int) -> pycolmap.Camera:
    """A pycolmap PINHOLE camera of K (pixel (u, v) centred at (u, v); COLMAP's centres are at +0.5)."""
    k = intrinsics.double().tolist()
    params = [k[0][0], k[1][1], k[0][2] + 0.5, k[1][2] + 0.5]
    return pycolmap.Camera(model="PINHOLE", width=width, height=height, params=params)


def _configure_ransac(ransac: pycolmap.RANSACOptions, max_error: float) -> pycolmap.RANSACOptions:
    """Set, in place, what we change of an estimator's RANSAC options (the rest keeps its defaults)."""
    ransac.max_error = max_error
    ransac.random_seed = 0  # reproducible runs
    ransac.max_num_trials = RANSAC_TRIALS
    ransac.min_num_trials = RANSAC_MIN_TRIALS
    return ransac


def _pose_and_inliers(found: dict | None, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(R, t, inlier mask) of a pycolmap estimator's answer (pose under ``key``); None when it failed or
    kept fewer than 6 inliers."""
    if found is None:
        return None
    inliers = torch.from_numpy(found["inlier_mask"].astype(bool))
    if int(inliers.sum()) < 6:
        return None
    pose = found[key]
    return (
        torch.from_numpy(pose.rotation.matrix()).double(),
        torch.from_numpy(pose.translation).double(),
        inliers,
    )


def _essential_alignment(
    pixels_i: torch.Tensor,
    pixels_j: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    cameras: tuple[pycolmap.Camera, pycolmap.Camera],
    max_error: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(s, R, t, inliers) of ``i_from_j`` with R and the direction of t from the essential matrix of the
    pixel matches, s and the length of t by least squares on the inliers' points (dst ≈ s R src + λ t̂)."""
    found = pycolmap.estimate_essential_matrix(
        (pixels_j.double() + 0.5).numpy(),
        (pixels_i.double() + 0.5).numpy(),
        cameras[1],
        cameras[0],
        _configure_ransac(pycolmap.RANSACOptions(), max_error),
    )
    estimate = _pose_and_inliers(found, "cam2_from_cam1")  # camera 1 = view j, camera 2 = view i
    if estimate is None:
        return None
    rotation, direction, inliers = estimate
    rotated = (src[inliers] @ rotation.T).reshape(-1)  # (3n,)
    along = direction.repeat(int(inliers.sum()))
    target = dst[inliers].reshape(-1)
    # the 2 x 2 normal equations in closed form: MKL's lstsq differs in the last bits from call to call
    aa, ab, bb = rotated @ rotated, rotated @ along, along @ along
    at, bt = rotated @ target, along @ target
    det = aa * bb - ab * ab
    if not det > 1e-12 * aa * bb:
        return None
    scale, length = (bb * at - ab * bt) / det, (aa * bt - ab * at) / det
    if not (torch.isfinite(scale) and torch.isfinite(length) and scale > 0):
        return None
    return scale, rotation, length * direction, inliers


def _pnp_alignment(
    pixels_i: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    camera_i: pycolmap.Camera,
    max_error: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(s, R, t, inliers) of ``i_from_j``: R and t by PnP of view j's points ``src`` seen at ``pixels_i``
    in view i (pycolmap LO-RANSAC + refinement), s by least squares of the inliers' depths in view i."""
    options = pycolmap.AbsolutePoseEstimationOptions()
    _configure_ransac(options.ransac, max_error)
    found = pycolmap.estimate_and_refine_absolute_pose(
        (pixels_i.double() + 0.5).numpy(), src.double().numpy(), camera_i, options
    )
    estimate = _pose_and_inliers(found, "cam_from_world")  # "world" = view j's camera frame
    if estimate is None:
        return None
    rotation, translation, inliers = estimate
    # view i's depth scale relative to view j's: predicted z in view i vs z of the moved points
    moved = src[inliers] @ rotation.T + translation
    scale = (dst[inliers, 2] * moved[:, 2]).sum() / (moved[:, 2] ** 2).sum().clamp_min(1e-12)
    if not (torch.isfinite(scale) and scale > 0):
        return None
    # i_from_j maps view j's points into view i's (scaled) frame: x_i = scale * (R x_j + t)
    return scale, rotation, scale * translation, inliers


def align_pair(
    descriptors: torch.Tensor,
    points: torch.Tensor,
    usable: torch.Tensor,
    i: int,
    j: int,
    options: TokenPoseOptions,
    pixels: torch.Tensor | None = None,
    cameras: tuple[pycolmap.Camera, pycolmap.Camera] | None = None,
) -> PairAlignment | None:
    """``i_from_j`` from mutual descriptor matches among usable patches (None if too few or every solver
    failed), by the solver(s) of ``options.rotation_from``; PnP and the essential matrix need the patch
    ``pixels`` (P, 2) and the ``cameras`` (view i, view j). Without them only the Sim(3) runs and its robust
    weight sum is the support."""
    keep_i, keep_j = usable[i].nonzero()[:, 0], usable[j].nonzero()[:, 0]
    if min(len(keep_i), len(keep_j)) < options.min_matches:
        return None
    rows, cols, similarity = mutual_matches(descriptors[i, keep_i], descriptors[j, keep_j])
    if len(rows) < options.min_matches:
        return None
    src, dst = points[j, keep_j[cols]], points[i, keep_i[rows]]
    weights = similarity.double().clamp_min(0.0)
    candidates = []
    if options.rotation_from in ("sim3", "best"):
        (scale, rotation, translation), robust = robust_sim3(src, dst, weights, hypotheses=options.hypotheses)
        if torch.isfinite(scale) and scale > 0 and torch.isfinite(rotation).all():
            candidates.append((scale, rotation, translation, float(robust.sum())))
    if pixels is not None:
        pixels_i, pixels_j = pixels[keep_i[rows]], pixels[keep_j[cols]]
    if options.rotation_from != "sim3" and pixels is not None and cameras is not None:
        solvers = {
            "pnp": lambda: _pnp_alignment(pixels_i, src, dst, cameras[0], options.max_error),
            "essential": lambda: _essential_alignment(
                pixels_i, pixels_j, src, dst, cameras, options.max_error
            ),
        }
        for name, solve in solvers.items():
            if options.rotation_from in (name, "best"):
                found = solve()
                if found is not None:
                    candidates.append((*found[:3], float(found[3].sum())))
    if not candidates:
        return None
    if cameras is None or pixels is None:
        scale, rotation, translation, support = candidates[0]
        return PairAlignment(i, j, scale, rotation, translation, len(rows), support)
    k_i, k_j = cameras[0].calibration_matrix(), cameras[1].calibration_matrix()
    errors = [reprojection_errors(src, dst, pixels_i, pixels_j, c[:3], k_i, k_j) for c in candidates]
    best = int(torch.stack([e.median() for e in errors]).argmin())
    scale, rotation, translation, _ = candidates[best]
    support = float((errors[best] < options.inlier_error).sum())
    return PairAlignment(i, j, scale, rotation, translation, len(rows), support)


def reprojection_errors(
    src: torch.Tensor,
    dst: torch.Tensor,
    pixels_i: torch.Tensor,
    pixels_j: torch.Tensor,
    sim3: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    k_i,
    k_j,
) -> torch.Tensor:
    """Per match, the larger pixel distance of view j's point moved into view i by ``i_from_j`` = (s, R, t)
    and of view i's point moved into view j, from the matched pixels; K of view i and j in COLMAP's
    convention (centres at +0.5). Points that land behind a camera count as 1e6."""
    scale, rotation, translation = (x.double() for x in sim3)

    def project(points, k):
        uv = points @ torch.as_tensor(k, dtype=torch.float64).T
        return uv[:, :2] / uv[:, 2:].clamp_min(1e-9) - 0.5

    moved_i = scale * src @ rotation.T + translation
    moved_j = ((dst - translation) @ rotation) / scale
    error = torch.maximum(
        (project(moved_i, k_i) - pixels_i.double()).norm(dim=-1),
        (project(moved_j, k_j) - pixels_j.double()).norm(dim=-1),
    )
    behind = (moved_i[:, 2] <= 0) | (moved_j[:, 2] <= 0)
    return torch.where(behind, torch.full_like(error, 1e6), error)


def candidate_pairs(descriptors: torch.Tensor, neighbours: int) -> list[tuple[int, int]]:
    """Unordered view pairs (i < j): each view with its ``neighbours`` most similar views by the cosine of
    their mean descriptors (every pair when there are few views). Near-duplicates (cosine above
    :data:`DUPLICATE_AFFINITY`: the same view twice, a pause in a video) count as one view: a view's own
    duplicates are paired with it besides its ``neighbours`` partners (up to as many), and of several
    duplicates among its partners only the most similar is taken: copies, which have no baseline between
    them, do not crowd out the views that link a view to the rest."""
    s = descriptors.shape[0]
    if s - 1 <= neighbours:
        return [(i, j) for i in range(s) for j in range(i + 1, s)]
    means = torch.nn.functional.normalize(descriptors.float().mean(dim=1), dim=-1)
    affinity = means @ means.T
    affinity.fill_diagonal_(-2.0)
    duplicate = (affinity > DUPLICATE_AFFINITY).tolist()
    pairs = set()
    for i, order in enumerate(affinity.argsort(dim=1, descending=True).tolist()):
        chosen: list[int] = []
        twins = 0
        for j in order[: s - 1]:
            if duplicate[i][j]:
                if twins < neighbours:
                    twins += 1
                    pairs.add((min(i, j), max(i, j)))
            elif not any(duplicate[j][c] for c in chosen):
                chosen.append(j)
                pairs.add((min(i, j), max(i, j)))
                if len(chosen) == neighbours:
                    break
    return sorted(pairs)


def spanning_tree(num_views: int, alignments: list[PairAlignment]) -> list[tuple[PairAlignment, bool]] | None:
    """Prim's maximum spanning tree (by support) from view 0: the edges in the order they join, each with
    whether it is used as stored (parent = i) or inverted (parent = j); None if some view is unreachable."""
    joined = {0}
    order: list[tuple[PairAlignment, bool]] = []
    while len(joined) < num_views:
        best = None
        for edge in alignments:
            if (edge.i in joined) != (edge.j in joined) and (best is None or edge.support > best.support):
                best = edge
        if best is None:
            return None
        forward = best.i in joined
        joined.add(best.j if forward else best.i)
        order.append((best, forward))
    return order


def token_poses(
    descriptors: torch.Tensor,
    depth: torch.Tensor,
    confidence: torch.Tensor,
    intrinsics: torch.Tensor,
    patch: int,
    options: TokenPoseOptions | None = None,
) -> TokenPoses | None:
    """Token poses of S views from descriptors (S, P, C), depth and confidence (S, H, W) and K (S, 3, 3);
    None when the views do not connect (some view shares too few matches with the rest)."""
    options = options or TokenPoseOptions()
    s = depth.shape[0]
    points, pixels = patch_camera_points(depth, intrinsics, patch)
    conf = confidence[:, pixels[:, 1], pixels[:, 0]].float()
    floor = torch.quantile(conf, options.min_confidence_quantile, dim=1, keepdim=True)
    usable = torch.isfinite(points).all(dim=-1) & (points[..., 2] > 0) & (conf >= floor)
    h, w = depth.shape[-2:]
    cameras = [_pinhole(k, h, w) for k in intrinsics]

    def align(pair: tuple[int, int]) -> PairAlignment | None:
        i, j = pair
        return align_pair(descriptors, points, usable, i, j, options, pixels, (cameras[i], cameras[j]))

    alignments: list[PairAlignment] = []
    tried: set[tuple[int, int]] = set()
    neighbours = options.neighbours
    workers = max(1, min(POOL_WORKERS, torch.get_num_threads()))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # pycolmap's estimators free the GIL
        while True:
            pairs = [pair for pair in candidate_pairs(descriptors, neighbours) if pair not in tried]
            tried.update(pairs)
            alignments += [edge for edge in pool.map(align, pairs) if edge is not None]
            poses = compose_tree(s, alignments)
            if poses is not None or neighbours >= s - 1:
                return poses
            neighbours = min(2 * neighbours, s - 1)  # some view is not reached: try more partners


def compose_tree(num_views: int, alignments: list[PairAlignment]) -> TokenPoses | None:
    """Poses of ``num_views`` views in view 0's frame along the maximum spanning tree of the pair
    ``alignments`` (:func:`spanning_tree`); None if some view is unreachable."""
    s = num_views
    tree = spanning_tree(s, alignments)
    if tree is None:
        return None
    # world_from_cam of every view as a similarity (scale, R, t); view 0 is the world
    scale = torch.ones(s, dtype=torch.float64)
    rotation = torch.eye(3, dtype=torch.float64).repeat(s, 1, 1)
    centre = torch.zeros(s, 3, dtype=torch.float64)
    for edge, forward in tree:
        s_e, r_e, t_e = edge.scale.double(), edge.rotation.double(), edge.translation.double()
        if forward:  # parent i, child j: world_from_j = world_from_i ∘ i_from_j
            parent, child = edge.i, edge.j
        else:  # parent j, child i: j_from_i is the inverse similarity
            parent, child = edge.j, edge.i
            r_e = r_e.T
            s_e = 1.0 / s_e
            t_e = -s_e * (r_e @ t_e)
        scale[child] = scale[parent] * s_e
        rotation[child] = rotation[parent] @ r_e
        centre[child] = scale[parent] * (rotation[parent] @ t_e) + centre[parent]
    rot_cw = rotation.transpose(-1, -2)
    cam_from_world = torch.cat([rot_cw, -(rot_cw @ centre[..., None])], dim=-1)
    return TokenPoses(cam_from_world, scale, [edge for edge, _ in tree])


def apply_token_poses(geometry, prediction, options: TokenPoseOptions) -> dict:
    """Replace the camera head's poses of ``geometry`` (a :class:`~.frames.SceneGeometry`) by token poses,
    rescaling each view's depth to view 0's scale, when ``prediction`` carries descriptors and ``options``
    allow; returns the report entry (``source``: "tokens" or "camera head", and why)."""
    if options.enabled and "chunk_sim3" in prediction.extras:
        return chunked_pose_report(prediction.extras)
    why = _camera_head_reason(prediction, options)
    if why is not None:
        return {"source": "camera head", "why": why}
    poses = token_poses(
        prediction.extras["descriptors"][0].cpu(),
        geometry.depth,
        geometry.confidence,
        geometry.intrinsics,
        int(prediction.extras["patch_size"]),
        options,
    )
    if poses is None:
        logger.warning("token poses: some view shares too few descriptor matches; using the camera head")
        return {"source": "camera head", "why": "views not connected by descriptor matches"}
    geometry.cam_from_world = poses.cam_from_world
    geometry.depth = geometry.depth * poses.depth_scale.to(geometry.depth.dtype)[:, None, None]
    return {"source": "tokens", **poses.report()}


def _camera_head_reason(prediction: Prediction, options: TokenPoseOptions) -> str | None:
    """Why token poses cannot replace the camera head's for this prediction (None: they can be tried)."""
    if not options.enabled:
        return "token poses disabled"
    if prediction.extras.get("descriptors") is None:
        return "the model exports no match descriptors"
    if prediction.num_views < 2:
        return "one view"
    return None


def posed_by_tokens(prediction: Prediction, options: TokenPoseOptions) -> tuple[Prediction, dict]:
    """One pass's ``prediction`` (B = 1) with token poses in place of the camera head's (depth rescaled to
    view 0's scale, world points unprojected from it) and :func:`apply_token_poses`'s report entry;
    ``prediction`` as it is where that keeps the camera head. Chunked inference applies it to each chunk
    before the chunks are aligned, so that they are composed from token poses too."""
    why = _camera_head_reason(prediction, options)
    if why is not None:  # no copy of the maps to the CPU (a chunk of an official model)
        return prediction, {"source": "camera head", "why": why}
    geometry = SceneGeometry.from_prediction(prediction)
    report = apply_token_poses(geometry, prediction, options)
    if report["source"] != "tokens":
        return prediction, report
    depth = geometry.depth[None].to(prediction.depth)
    cam_from_world = geometry.cam_from_world[None].to(prediction.cam_from_world)
    points = depth_to_world_points(depth, prediction.intrinsics.to(depth), cam_from_world.to(depth))
    posed = replace(
        prediction,
        cam_from_world=cam_from_world,
        depth=depth,
        world_points=points.to(prediction.world_points),
        world_points_conf=prediction.depth_conf,
    )
    return posed, report


def chunked_pose_report(extras: dict) -> dict:
    """The report entry of a chunked prediction (``predict_chunked``'s ``extras``, with the
    :func:`posed_by_tokens` report of each chunk computed in this run in ``chunk_token_poses``, keyed by
    chunk index): where the poses come from, per chunk, and the token-pose tree edges in global views."""
    per_chunk = extras.get("chunk_token_poses")
    if per_chunk is None:
        return {"source": "camera head", "why": "chunked inference without token poses per chunk"}
    plan = extras["chunks"]
    edges = {
        tuple(sorted((plan[k][i], plan[k][j])))
        for k, report in per_chunk.items()
        if report["source"] == "tokens"
        for i, j in report["tree_edges"]
    }
    computed = {report["source"] for report in per_chunk.values()}
    source, why = "camera head", "; ".join(sorted({r["why"] for r in per_chunk.values() if "why" in r}))
    if "tokens" in computed:
        source = "tokens" if computed == {"tokens"} else "tokens and camera head"
        why = "token poses within each chunk, chunks composed by Sim(3)"
    return {
        "source": source,
        "why": why,
        "chunk_sources": [
            per_chunk[k]["source"] if k in per_chunk else "stored in the chunk file" for k in range(len(plan))
        ],
        "tree_edges": [list(edge) for edge in sorted(edges)],
    }
