"""Second opinion on correspondences from the backbone's track head (where it has one).

A match says: keypoint ``x`` of view i is seen at ``y`` in view j (``matching.match_views`` checks its
refined matches). The track head follows ``x`` through the views from image features, independently of
the predicted depth and poses and of the photometric refinement. A match is kept only when the two agree:
the track head sees the point in view j (visibility at least ``min_visibility``) and puts it within
``tolerance`` model pixels of ``y``.

The tracker is the callable of ``Prediction.extras["tracker"]`` (e.g. VGGT's
:class:`~speed3r_sfm.models.heads.FeatureTracker`): ``tracker(view, points (N, 2), targets)`` -> tracks
(S, N, 2), visibility and confidence (S, N), all in model-input pixels (integer centres); it needs to
answer only for ``view`` and the ``targets`` views (the matches' target views), so the check costs
O(views), not O(views²).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tracker = Callable[[int, torch.Tensor, list[int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class TrackCheck:
    """Outcome of :func:`check_with_tracks` for M matches."""

    keep: torch.Tensor  # (M,) bool
    distance: torch.Tensor  # (M,) float64 model pixels between the track and the match
    visibility: torch.Tensor  # (M,) float32

    def stats(self, min_visibility: float) -> dict:
        """Counts and the median disagreement (model pixels) for the report."""
        invisible = self.visibility < min_visibility
        return {
            "checked": int(self.keep.numel()),
            "kept": int(self.keep.sum()),
            "rejected_not_visible": int(invisible.sum()),
            "rejected_too_far": int((~self.keep & ~invisible).sum()),
            "median_distance_px": float(self.distance.median()) if self.distance.numel() else None,
        }


def check_with_tracks(
    tracker: Tracker,
    source_view: torch.Tensor,
    source_point: torch.Tensor,
    source_xy: torch.Tensor,
    target_view: torch.Tensor,
    target_xy: torch.Tensor,
    tolerance: float,
    min_visibility: float,
) -> TrackCheck:
    """Check M matches against the track head.

    ``source_view``, ``target_view``: (M,) int64; ``source_point``: (M,) int64 id of the source keypoint
    (matches sharing it are tracked once); ``source_xy``, ``target_xy``: (M, 2) model pixels. Each source
    view's distinct keypoints are tracked once, through the tracker's ``track_views`` when it has one.
    """
    m = source_view.numel()
    distance = torch.full((m,), float("inf"), dtype=torch.float64)
    visibility = torch.zeros(m)
    requests, groups = [], []
    for view in source_view.unique().tolist():
        rows = (source_view == view).nonzero()[:, 0]
        points, slot = torch.unique(source_point[rows], return_inverse=True)
        first = torch.zeros(points.numel(), dtype=torch.long).scatter_(0, slot, rows)
        requests.append((view, source_xy[first].float(), target_view[rows].unique().tolist()))
        groups.append((rows, slot))
    batched = getattr(tracker, "track_views", None)  # e.g. FeatureTracker: several views per call
    answers = batched(requests) if batched is not None else [tracker(*request) for request in requests]
    for (rows, slot), (tracks, vis, _) in zip(groups, answers, strict=True):
        located = tracks[target_view[rows], slot].double()
        distance[rows] = torch.linalg.vector_norm(located - target_xy[rows].double(), dim=-1)
        visibility[rows] = vis[target_view[rows], slot].float()
    keep = (visibility >= min_visibility) & (distance <= tolerance)
    return TrackCheck(keep, distance, visibility)
