"""Loop closure for ordered chunks: a trajectory that returns to a place it saw chunks ago.

Ordered chunks are composed one after the other by Sim(3) (``chunked.py``), so their alignment errors add
up; where the trajectory comes back, the two passes over a place disagree by the drift in between and are
not matched (candidate pairs come from the composed geometry or from attention within a chunk). Classical
SLAM closes such loops in three steps, and so do we:

1. *Detection.* Views at least a chunk apart that never shared a chunk, whose per-view descriptors (the
   backbone's own image encoder, ``view_features.py``) are at least as similar as views
   ``reference_distance`` apart in the sequence (the median over the sequence), are loop candidates; the
   most similar pair of each pair of chunks is kept, at most ``max_loops`` pairs, most similar first.
2. *Verification.* A *loop chunk* of the ``window`` views around each view of the pair runs through the
   backbone, so the model relates the two places directly. Its point maps are aligned to the composed
   world once through each window (robust Sim(3), as chunks are); the two alignments differ by the drift,
   ``C = A ∘ B⁻¹`` (the correction of the later place in the world frame of the earlier one). The loop
   is kept when both alignments have enough inliers, the correction is a plausible drift (rotation
   below ``max_correction_deg``) and, for token-posed models, the loop chunk's spanning tree links the two
   windows by a pair with at least ``min_support`` inlier matches. A loop whose tree links the windows by
   ``revisit_links`` such pairs or more (the views of both passes pair up: a place seen twice) is kept at
   any correction: a weak feed-forward model drifts by more than any fixed bound (the shipped default: 100-170
   deg between the passes of a 240-view video, each measured by its loop chunk within about 7 deg).
3. *Correction.* One Sim(3) correction ``X_k`` per chunk (chunk 0 fixed) from a pose graph: consecutive
   chunks keep their relative placement (``X_{k-1}⁻¹ X_k = I``, weight 1) and every loop asks
   ``X_a⁻¹ X_b = C`` (weight ``loop_weight``), solved in closed form: chordal rotations, log-scales and
   translations by weighted linear least squares (:func:`solve_corrections`). Each view moves by a
   correction interpolated along the sequence between those of the chunks around it
   (:func:`view_corrections`); bundle adjustment then closes the loop exactly through the matches the
   corrected geometry now finds (and, with GSA, the loop chunks' attention, merged into the summary).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix, rotation_matrix_to_axis_angle

from ..eval.metrics import rotation_angle_deg
from ..geometry import (
    apply_sim3,
    camera_centers,
    compose_sim3,
    depth_to_world_points,
    identity_sim3,
    invert_sim3,
    sim3_cam_from_world,
)
from ..models.prediction import Prediction
from .checks import require_at_least, require_between, require_bool, require_integer, require_positive
from .chunked import Predict, alignment_points, run_chunk, store_extra_chunk, stored_extra_chunk
from .chunking import robust_sim3
from .records import AttentionSummary

logger = logging.getLogger(__name__)

Sim3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# a place's pixels aligned to the composed world as chunks are (predict_chunked's defaults)
ALIGN_CONF_QUANTILE = 0.5
ALIGN_MAX_POINTS = 20000


@dataclass
class LoopOptions:
    """Loop closure of ordered chunks: find the places a long sequence returns to, verify and correct drift.

    Attributes:
        enabled: close loops of ordered chunks (three chunks or more).
        max_loops: most loop chunks run, one model pass of two windows each (null: as many as there are
            chunks).
        window: views per place in a loop chunk (null: a quarter of the chunk size, at least 2).
        reference_distance: detection threshold: two views are a loop candidate when their descriptors are
            at least as similar as those of views this far apart in the sequence (median); larger finds more
            candidates (null: half the chunk overlap, at least 1).
        min_inlier_fraction: least share (0-1) of inliers when each window of a loop chunk is aligned to
            the composed chunks; a loop below it is rejected.
        min_support: token-posed models: least inlier matches of a loop chunk's pose-tree pair for it to
            link the two places.
        max_correction_deg: largest drift correction (degrees of rotation) a loop may ask for, unless it is
            a place seen twice (revisit_links).
        revisit_links: a loop whose loop chunk links the two places by at least this many pairs is kept
            whatever its correction.
        loop_weight: weight of a loop against a consecutive pair of chunks in the pose graph; higher trusts
            loops more.
    """

    enabled: bool = True
    max_loops: int | None = None
    window: int | None = None
    reference_distance: int | None = None
    min_inlier_fraction: float = 0.5
    min_support: float = 20.0
    max_correction_deg: float = 45.0
    revisit_links: int = 3
    loop_weight: float = 10.0

    def __post_init__(self) -> None:
        require_bool(self, "enabled")
        for name in ("max_loops", "window", "reference_distance"):
            if getattr(self, name) is not None:
                require_integer(self, **{name: 1})
        require_integer(self, revisit_links=1)
        require_between(self, min_inlier_fraction=(0.0, 1.0), max_correction_deg=(0.0, 180.0))
        require_at_least(self, min_support=0.0)
        require_positive(self, "loop_weight")


@dataclass
class Loop:
    """A loop candidate: views ``i`` < ``j`` placed by chunks ``chunk_i`` and ``chunk_j``."""

    i: int
    j: int
    chunk_i: int
    chunk_j: int
    similarity: float


def placing_chunks(chunks: Sequence[Sequence[int]], num_views: int) -> torch.Tensor:
    """(S,) the first chunk holding each view: the one whose estimate the composed prediction keeps."""
    placed = torch.full((num_views,), -1, dtype=torch.long)
    for k, views in enumerate(chunks):
        idx = torch.as_tensor(list(views), dtype=torch.long)
        placed[idx] = torch.where(placed[idx] < 0, k, placed[idx])
    if (placed < 0).any():
        raise ValueError(f"view {int((placed < 0).nonzero()[0])} is in no chunk")
    return placed


def find_loops(
    descriptors: torch.Tensor,
    chunks: Sequence[Sequence[int]],
    reference_distance: int,
    max_loops: int,
    min_gap: int | None = None,
) -> list[Loop]:
    """Loop candidates (step 1 of the module docstring) from per-view descriptors (S, D) of an ordered
    sequence, most similar first. Views fewer than ``min_gap`` apart in the sequence (default: the largest
    chunk) are neighbours the chunk chain already links, not a return."""
    s = descriptors.shape[0]
    if s <= reference_distance:
        return []
    unit = torch.nn.functional.normalize(descriptors.double(), dim=-1)
    similarity = unit @ unit.T
    reference = similarity.diagonal(reference_distance).median()
    together = torch.zeros(s, s, dtype=torch.bool)
    for views in chunks:
        idx = torch.as_tensor(list(views), dtype=torch.long)
        together[idx[:, None], idx[None, :]] = True
    placed = placing_chunks(chunks, s)
    gap = min_gap if min_gap is not None else max(len(c) for c in chunks)
    best: dict[tuple[int, int], Loop] = {}
    candidate = ~together & (similarity >= reference)
    rows, cols = torch.nonzero(torch.triu(candidate, diagonal=max(1, gap)), as_tuple=True)
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        key = (int(placed[i]), int(placed[j]))
        value = float(similarity[i, j])
        if key not in best or value > best[key].similarity:
            best[key] = Loop(i, j, *key, value)
    return sorted(best.values(), key=lambda loop: -loop.similarity)[:max_loops]


def loop_views(loop: Loop, placed: torch.Tensor, window: int) -> tuple[list[int], list[int]]:
    """Up to ``window`` consecutive views around ``loop.i`` among those its chunk placed, and around
    ``loop.j`` among those of its chunk (``placed``: :func:`placing_chunks`), so that each window moves
    with one node of the pose graph."""

    def around(v: int) -> list[int]:
        own = (placed == placed[v]).nonzero()[:, 0].tolist()  # consecutive in an ordered plan
        at = own.index(v)
        start = min(max(0, at - window // 2), max(0, len(own) - window))
        return own[start : start + window]

    return around(loop.i), around(loop.j)


@dataclass
class Edge:
    """A pose-graph measurement ``X_a⁻¹ X_b ≈ relative`` between the corrections of chunks a and b, with its
    ``weight``; its translation is measured at ``anchor`` (3,), a world point of the place it joins (the
    views two consecutive chunks share, the later place of a loop): measured at the world origin, far from
    the place, the rotation differences between chunks would tear them apart where they meet."""

    a: int
    b: int
    relative: Sim3
    weight: float = 1.0
    anchor: torch.Tensor | None = None


def solve_corrections(num_nodes: int, edges: Sequence[Edge]) -> list[Sim3]:
    """Per node k a Sim(3) ``X_k`` (node 0 the identity) with ``X_a⁻¹ X_b ≈ M`` for every edge, by weighted
    linear least squares in three steps: rotations (chordal: the rows of ``R_b = R_a R_M``, projected onto
    SO(3)), log-scales (``l_b - l_a = log s_M``), then translations from ``X_b(q) = X_a(M(q))`` at the edge's
    anchor q (``t_b - t_a = s_a R_a M(q) - s_b R_b q``). The edges must connect every node to node 0."""
    eye = torch.eye(3, dtype=torch.float64)
    # rotations: row r of R_b equals row r of R_a R_M, i.e. r_b - R_M^T r_a = 0 with the rows as columns
    stacked = _graph_least_squares(
        num_nodes,
        [
            (e.a, e.b, -e.relative[1].double().T, torch.zeros(3, 3, dtype=torch.float64), e.weight)
            for e in edges
        ],
        known=eye,
    )
    rotations = []
    for rows in stacked:
        u, _, vh = torch.linalg.svd(rows.T)
        fix = torch.diag(torch.tensor([1.0, 1.0, float(torch.det(u @ vh).sign())], dtype=torch.float64))
        rotations.append(u @ fix @ vh)
    minus_one = -torch.ones(1, 1, dtype=torch.float64)
    logs = _graph_least_squares(
        num_nodes,
        [(e.a, e.b, minus_one, torch.log(e.relative[0].double()).reshape(1, 1), e.weight) for e in edges],
        known=torch.zeros(1, 1, dtype=torch.float64),
    )
    scales = [torch.exp(value[0, 0]) for value in logs]

    def moved(edge: Edge) -> torch.Tensor:
        q = torch.zeros(3, dtype=torch.float64) if edge.anchor is None else edge.anchor.double()
        target = scales[edge.a] * rotations[edge.a] @ apply_sim3(*edge.relative, q)
        return (target - scales[edge.b] * rotations[edge.b] @ q)[None]

    shifts = _graph_least_squares(
        num_nodes,
        [(e.a, e.b, minus_one, moved(e), e.weight) for e in edges],
        known=torch.zeros(1, 3, dtype=torch.float64),
    )
    return [(scales[k], rotations[k], shifts[k][0]) for k in range(num_nodes)]


def _graph_least_squares(
    num_nodes: int,
    equations: Sequence[tuple[int, int, torch.Tensor, torch.Tensor, float]],
    known: torch.Tensor,
) -> torch.Tensor:
    """(num_nodes, d, m) blocks x with ``x_0 = known`` (d, m) that minimise the weighted squares of
    ``x_b + A x_a - y`` over the equations ``(a, b, A (d, d), y (d, m), weight)``."""
    d, m = known.shape
    lhs = torch.zeros(len(equations) * d, (num_nodes - 1) * d, dtype=torch.float64)
    rhs = torch.zeros(len(equations) * d, m, dtype=torch.float64)
    for e, (a, b, coef, target, weight) in enumerate(equations):
        rows, root = slice(e * d, (e + 1) * d), math.sqrt(weight)
        rhs[rows] = root * target
        for node, block in ((b, torch.eye(d, dtype=torch.float64)), (a, coef)):
            if node == 0:
                rhs[rows] -= root * block @ known
            else:
                lhs[rows, (node - 1) * d : node * d] += root * block
    solution = torch.linalg.lstsq(lhs, rhs).solution if num_nodes > 1 else rhs[:0]
    return torch.cat([known[None], solution.reshape(num_nodes - 1, d, m)])


def rotation_deg(rot: torch.Tensor) -> float:
    """The angle of a rotation matrix, in degrees."""
    return float(rotation_angle_deg(torch.eye(3, dtype=torch.float64), rot))


@dataclass
class LoopClosure:
    """What :func:`close_loops` did: ``report`` (JSON-able) and, per loop chunk run, its views and GSA
    summary (None without records) for :func:`~.records.merge_chunk_summaries`."""

    report: dict
    loop_chunks: list[list[int]]
    summaries: list[AttentionSummary | None]

    @classmethod
    def skipped(cls, why: str) -> LoopClosure:
        return cls({"candidates": 0, "loops": [], "why": why}, [], [])


def close_loops(
    prediction: Prediction,
    predict: Predict,
    load: Callable[[list[int]], torch.Tensor],
    descriptors: torch.Tensor | None,
    chunks: Sequence[Sequence[int]],
    options: LoopOptions,
    keep_attention: bool = False,
    seed: int = 0,
    h5_path: str | os.PathLike | None = None,
) -> LoopClosure:
    """Close the loops of a composed ordered-chunk ``prediction`` (:func:`~.chunked.predict_chunked`, B = 1,
    with its depth maps) in place: its poses, depth and world points (if kept) move by
    :func:`view_corrections`, ``extras["chunk_sim3"]`` by each chunk's own correction. ``predict`` and
    ``load`` run a loop chunk as the chunks were run; ``descriptors`` (S, D) are the per-view descriptors of
    detection (None only when disabled or with fewer than three chunks). With ``h5_path`` (the chunk file)
    each loop chunk is kept there and a re-run reuses it."""
    if not options.enabled:
        return LoopClosure.skipped("disabled")
    if len(chunks) < 3 or descriptors is None:
        return LoopClosure.skipped("fewer than three chunks")
    num_views = prediction.num_views
    chunk_size = max(len(c) for c in chunks)
    # the planned overlap: the last ordered chunk, shifted back to stay full-size, shares more
    overlap = min(len(set(a) & set(b)) for a, b in zip(chunks, chunks[1:], strict=False))
    window = options.window or max(2, chunk_size // 4)
    distance = options.reference_distance or max(1, overlap // 2)
    max_loops = options.max_loops if options.max_loops is not None else len(chunks)
    candidates = find_loops(descriptors, chunks, distance, max_loops)
    report: dict = {"candidates": len(candidates), "loops": []}
    world = _ComposedWorld(prediction)
    generator = torch.Generator().manual_seed(seed)
    placed = placing_chunks(chunks, num_views)
    edges = [
        Edge(k - 1, k, identity_sim3(), anchor=world.centre(sorted(set(chunks[k - 1]) & set(chunks[k]))))
        for k in range(1, len(chunks))
    ]
    loop_chunks, summaries = [], []
    for loop in candidates:
        first, second = loop_views(loop, placed, window)
        out, summary, chunk_report = _loop_chunk(predict, load, first + second, keep_attention, h5_path)
        loop_chunks.append(first + second)
        summaries.append(summary)
        fits = [world.align(out, part, views, generator) for part, views in _parts(first, second)]
        entry = {
            "views": [loop.i, loop.j],
            "loop_chunk": first + second,  # the views run together to verify it
            "chunks": [loop.chunk_i, loop.chunk_j],
            "similarity": loop.similarity,
            "inlier_fraction": [fraction for _, fraction in fits],
        }
        links = _crossing_links(chunk_report, len(first), options.min_support)
        if links is not None:
            entry["crossing_links"] = links
        why = _rejected(fits, links, options)
        if why is None:
            correction = compose_sim3(fits[0][0], invert_sim3(fits[1][0]))
            entry["correction_deg"] = rotation_deg(correction[1])
            entry["correction_scale"] = float(correction[0])
            revisit = links is not None and links >= options.revisit_links
            if entry["correction_deg"] > options.max_correction_deg and not revisit:
                why = f"correction of {entry['correction_deg']:.1f} deg is no plausible drift"
                if links is not None:
                    why += (
                        f" for a loop the loop chunk links by {links} pair(s) of views (a place seen twice: "
                        f"{options.revisit_links})"
                    )
            else:
                anchor = world.centre(second)
                edges.append(Edge(loop.chunk_i, loop.chunk_j, correction, options.loop_weight, anchor))
        entry["kept"] = why is None
        if why is not None:
            entry["why"] = why
        report["loops"].append(entry)
    if any(entry["kept"] for entry in report["loops"]):
        corrections = solve_corrections(len(chunks), edges)
        _apply(prediction, placed, corrections)
        report["chunk_correction_deg"] = [rotation_deg(rot) for _, rot, _ in corrections]
    kept = sum(entry["kept"] for entry in report["loops"])
    logger.info("loop closure: %d candidate(s), %d kept", len(candidates), kept)
    return LoopClosure(report, loop_chunks, summaries)


def _parts(first: list[int], second: list[int]) -> list[tuple[slice, list[int]]]:
    """The rows of each place in a loop chunk of ``first + second`` and its views."""
    return [(slice(0, len(first)), first), (slice(len(first), len(first) + len(second)), second)]


class _ComposedWorld:
    """The composed prediction's world points and camera centres, for aligning loop chunks to it."""

    def __init__(self, prediction: Prediction) -> None:
        self.cams = prediction.cam_from_world[0].double()
        self.intrinsics = prediction.intrinsics[0].double()
        self.depth, self.conf = prediction.depth[0], prediction.depth_conf[0]

    def centre(self, views: list[int]) -> torch.Tensor:
        """The mean camera centre (3,) of ``views``."""
        return camera_centers(self.cams[views]).mean(dim=0)

    def align(
        self, out: dict[str, torch.Tensor], part: slice, views: list[int], generator: torch.Generator
    ) -> tuple[Sim3 | None, float]:
        """Robust Sim(3) from a loop chunk's frame to the composed world through the place ``views``
        (rows ``part`` of the loop chunk ``out``) and its inlier fraction; (None, 0) without enough points."""
        world = depth_to_world_points(self.depth[views].double(), self.intrinsics[views], self.cams[views])
        src, dst, w = alignment_points(
            out["world_points"][part],
            out["world_points_conf"][part],
            world,
            self.conf[views],
            ALIGN_CONF_QUANTILE,
            ALIGN_MAX_POINTS,
            generator,
        )
        if src.shape[0] < 3:
            return None, 0.0
        sim3, final_w = robust_sim3(src, dst, w)
        return sim3, float((final_w > 0.5 * w).double().mean())


def _loop_chunk(
    predict: Predict,
    load: Callable[[list[int]], torch.Tensor],
    views: list[int],
    keep_attention: bool,
    h5_path: str | os.PathLike | None,
) -> tuple[dict[str, torch.Tensor], AttentionSummary | None, dict | None]:
    """The loop chunk of ``views``, from the chunk file when an earlier run kept it there."""
    name = f"loop_{views[0]:06d}_{views[-1]:06d}"
    if h5_path is not None:
        stored = stored_extra_chunk(h5_path, name, views, keep_attention)
        if stored is not None:
            return stored
    out, summary, report = run_chunk(predict, load, views, keep_attention)
    if h5_path is not None:
        store_extra_chunk(h5_path, name, views, out, summary, report)
    return out, summary, report


def _crossing_links(chunk_report: dict | None, first: int, min_support: float) -> int | None:
    """How many edges of a token-posed loop chunk's spanning tree join its first ``first`` views to the
    others with at least ``min_support`` matches; None when the chunk was not token-posed."""
    if chunk_report is None or chunk_report.get("source") != "tokens":
        return None
    supports = zip(chunk_report["tree_edges"], chunk_report.get("tree_support", []), strict=False)
    return sum((a < first) != (b < first) and support >= min_support for (a, b), support in supports)


def _rejected(fits: list[tuple[Sim3 | None, float]], links: int | None, options: LoopOptions) -> str | None:
    """Why a loop chunk does not verify its loop (None: it does); ``links``: :func:`_crossing_links`."""
    if any(sim3 is None for sim3, _ in fits):
        return "too few confident points to align a window"
    if min(fraction for _, fraction in fits) < options.min_inlier_fraction:
        return "a window does not align with the composed world"
    if links == 0:
        return "the two places share too few descriptor matches"
    return None


def view_corrections(placed: torch.Tensor, centres: torch.Tensor, corrections: list[Sim3]) -> list[Sim3]:
    """Per view a correction that varies smoothly along the sequence: each chunk's own at the middle of
    the views it placed, in between interpolated (rotation along the geodesic, log-scale and the moved
    camera centre linearly), the first and last chunk's beyond. ``centres`` (S, 3): the views' composed
    camera centres. Moving whole chunks rigidly would break the sequence at every junction by the share of
    the loop error that the pose graph gave it (a 29 deg loop over six chunks of 14: 7 deg per junction,
    which matching across the junction did not survive)."""
    num_views = placed.shape[0]
    middles = torch.stack([(placed == k).nonzero()[:, 0].double().mean() for k in range(len(corrections))])
    position = torch.arange(num_views, dtype=torch.float64)
    upper = torch.searchsorted(middles, position).clamp(1, len(corrections) - 1)
    lower = upper - 1
    span = (middles[upper] - middles[lower]).clamp_min(1e-9)
    weight = ((position - middles[lower]) / span).clamp(0.0, 1.0)
    out = []
    for v in range(num_views):
        a, b, w = corrections[int(lower[v])], corrections[int(upper[v])], weight[v]
        turn = rotation_matrix_to_axis_angle((a[1].T @ b[1])[None])[0]
        rot = a[1] @ axis_angle_to_rotation_matrix((w * turn)[None])[0]
        scale = torch.exp((1 - w) * torch.log(a[0]) + w * torch.log(b[0]))
        moved = (1 - w) * apply_sim3(*a, centres[v]) + w * apply_sim3(*b, centres[v])
        out.append((scale, rot, moved - scale * rot @ centres[v]))
    return out


def _apply(prediction: Prediction, placed: torch.Tensor, corrections: list[Sim3]) -> None:
    """Move each view of ``prediction`` (in place) by its :func:`view_corrections`; each chunk's Sim(3) in
    ``extras["chunk_sim3"]`` by its chunk's own correction."""
    cams = prediction.cam_from_world[0]
    centres = camera_centers(cams.double())
    for v, (scale, rot_v, trans_v) in enumerate(view_corrections(placed, centres, corrections)):
        cams[v] = sim3_cam_from_world(scale, rot_v, trans_v, cams[v].double()).to(cams.dtype)
        if prediction.depth.shape[-1] > 0:
            prediction.depth[0, v] = (prediction.depth[0, v].double() * scale).to(prediction.depth.dtype)
        points = prediction.world_points
        if points.shape[-2] > 0:
            points[0, v] = apply_sim3(scale, rot_v, trans_v, points[0, v].double()).to(points.dtype)
    if "chunk_sim3" in prediction.extras:
        prediction.extras["chunk_sim3"] = [
            compose_sim3(correction, sim3)
            for correction, sim3 in zip(corrections, prediction.extras["chunk_sim3"], strict=True)
        ]
