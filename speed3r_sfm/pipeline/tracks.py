"""Tracks: connected components (union-find) of the correspondence graph, one observation per image.

Nodes are 2D points of the views. Each view's points are its keypoints followed by the refined match
locations other views' keypoints found in it; a match location within ``merge_radius`` work pixels of one
of the view's own keypoints reuses that keypoint instead (so tracks started from different views join).
Each match is an edge; the connected components are the tracks. A track with several points in one view
keeps one of them (a keypoint before a match location, then the best-correlated) and drops the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .keypoints import Keypoints
from .matching import Matches


@dataclass
class Tracks:
    """2D points of every view and the tracks linking them (CSR layout)."""

    points: list[torch.Tensor]  # per view (P_v, 2) float64 work pixels: keypoints first, then match locations
    num_keypoints: list[int]  # per view
    track_start: np.ndarray  # (T + 1,) int64; track t's observations are [start[t], start[t + 1])
    obs_view: np.ndarray  # (O,) int64
    obs_point: np.ndarray  # (O,) int64 index into points[view]

    @property
    def num_tracks(self) -> int:
        return len(self.track_start) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.track_start)

    def track_of_observation(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_tracks), self.lengths())

    def pairwise_matches(self) -> dict[tuple[int, int], np.ndarray]:
        """All pairs of observations of every track, grouped by view pair (v1 < v2): (m, 2) point indices."""
        v1s, v2s, p1s, p2s = [], [], [], []
        lengths = self.lengths()
        for length in np.unique(lengths):
            if length < 2:
                continue
            ids = np.nonzero(lengths == length)[0]
            obs = self.track_start[ids][:, None] + np.arange(length)[None]  # (n, length)
            a, b = np.triu_indices(length, k=1)
            va, vb = self.obs_view[obs[:, a]], self.obs_view[obs[:, b]]
            pa, pb = self.obs_point[obs[:, a]], self.obs_point[obs[:, b]]
            swap = va > vb
            v1s.append(np.where(swap, vb, va).ravel())
            v2s.append(np.where(swap, va, vb).ravel())
            p1s.append(np.where(swap, pb, pa).ravel())
            p2s.append(np.where(swap, pa, pb).ravel())
        if not v1s:
            return {}
        v1, v2, p1, p2 = (np.concatenate(parts) for parts in (v1s, v2s, p1s, p2s))
        key = v1 * (1 << 32) + v2
        order = np.argsort(key, kind="stable")  # by view pair, in the order found
        key, pairs = key[order], np.stack([p1[order], p2[order]], 1)
        keys, starts = np.unique(key, return_index=True)
        chunks = np.split(pairs, starts[1:])
        return {(int(k >> 32), int(k & 0xFFFFFFFF)): c for k, c in zip(keys, chunks, strict=True)}


def connected_components(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    """Component label (the smallest node id of the component) of each node; ``edges`` is (E, 2)."""
    parent = np.arange(num_nodes)
    if edges.size == 0:
        return parent
    a, b = edges[:, 0], edges[:, 1]
    while True:
        # hook every edge's larger root onto the smaller one, then compress paths fully
        ra, rb = parent[a], parent[b]
        low, high = np.minimum(ra, rb), np.maximum(ra, rb)
        np.minimum.at(parent, high, low)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        if np.array_equal(parent[a], parent[b]):
            return parent


def nearest_within(
    query: torch.Tensor,
    points: torch.Tensor,
    radius: float,
    query_group: torch.Tensor | None = None,
    point_group: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to and index of the nearest of ``points`` (N, 2) for every ``query`` (M, 2), exact for
    neighbours within ``radius`` (others report inf): points sorted by cells of side ``radius``, the
    3 x 3 cells around each query searched (three runs of consecutive cells), instead of all M x N
    distances. With ``query_group`` (M,) and ``point_group`` (N,) (non-negative ints), only points of
    the query's own group count."""
    best = torch.full((query.shape[0],), float("inf"), dtype=query.dtype)
    best_index = torch.zeros(query.shape[0], dtype=torch.long)
    if query.shape[0] == 0 or points.shape[0] == 0:
        return best, best_index
    if query_group is None or point_group is None:
        query_group = torch.zeros(query.shape[0], dtype=torch.long)
        point_group = torch.zeros(points.shape[0], dtype=torch.long)
    cell = max(radius, 1e-6)
    key_points = torch.floor(points / cell).long()
    key_query = torch.floor(query / cell).long()
    # the cells (group, row, column) of the points, sorted, and the range of points in each cell
    origin = torch.minimum(key_points.min(dim=0).values, key_query.min(dim=0).values) - 1
    extent = torch.maximum(key_points.max(dim=0).values, key_query.max(dim=0).values) - origin + 2
    width, height = int(extent[0]), int(extent[1])

    def flat(group: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return (group * height + key[:, 1] - origin[1]) * width + key[:, 0] - origin[0]

    order = torch.argsort(flat(point_group, key_points))
    sorted_flat = flat(point_group, key_points)[order]
    query_flat = flat(query_group, key_query)
    query_order = torch.argsort(query_flat)  # sorted look-ups are faster
    query_flat, sorted_query = query_flat[query_order], query[query_order]
    for dy in (-1, 0, 1):  # the three cells of a row are consecutive keys: one range
        row = query_flat + dy * width
        start = torch.searchsorted(sorted_flat, row - 1)
        count = torch.searchsorted(sorted_flat, row + 1, right=True) - start
        for k in range(int(count.max())):
            has = count > k
            candidate = order[(start + k).clamp(max=len(order) - 1)]
            distance = (sorted_query - points[candidate]).norm(dim=1)
            better = has & (distance < best)
            best = torch.where(better, distance, best)
            best_index = torch.where(better, candidate, best_index)
    out, out_index = torch.empty_like(best), torch.empty_like(best_index)
    out[query_order], out_index[query_order] = best, best_index
    return out, out_index


def build_tracks(
    keypoints: list[Keypoints], matches: Matches, merge_radius: float = 0.0, min_length: int = 2
) -> Tracks:
    """Points and tracks of all views from keypoints and matches (see the module docstring)."""
    num_views = len(keypoints)
    num_keypoints = [kp.xy.shape[0] for kp in keypoints]
    first_keypoint = torch.tensor([0] + num_keypoints).cumsum(0)
    target_view = matches.target_view
    target_point = torch.zeros(len(matches), dtype=torch.long)
    snap = torch.zeros(len(matches), dtype=torch.bool)
    if merge_radius > 0 and len(matches):  # every view at once: keypoints grouped by their view
        keypoint_view = torch.repeat_interleave(torch.arange(num_views), torch.tensor(num_keypoints))
        distance, nearest = nearest_within(
            matches.target_xy,
            torch.cat([kp.xy for kp in keypoints]).to(matches.target_xy.dtype),
            merge_radius,
            target_view,
            keypoint_view,
        )
        snap = distance <= merge_radius
        target_point[snap] = nearest[snap] - first_keypoint[target_view[snap]]
    # the other match locations become new points of their view, in match order
    new = (~snap).nonzero()[:, 0]
    new = new[torch.argsort(target_view[new], stable=True)]
    views_of_new = target_view[new]
    rank = torch.arange(new.numel()) - torch.searchsorted(views_of_new, views_of_new)
    target_point[new] = torch.tensor(num_keypoints)[views_of_new] + rank
    counts = torch.bincount(views_of_new, minlength=num_views).tolist()
    points = [
        torch.cat([kp.xy, located]) if located.numel() else kp.xy.clone()
        for kp, located in zip(keypoints, matches.target_xy[new].split(counts), strict=True)
    ]
    offsets = np.concatenate([[0], np.cumsum([p.shape[0] for p in points])])
    view_of_node = np.repeat(np.arange(num_views), np.diff(offsets))
    edges = np.stack(
        [
            offsets[matches.source_view.numpy()] + matches.source_index.numpy(),
            offsets[matches.target_view.numpy()] + target_point.numpy(),
        ],
        axis=1,
    )
    label = connected_components(int(offsets[-1]), edges)
    # priority inside a (track, view): keypoints first, then higher NCC of the match that created the point
    quality = np.full(int(offsets[-1]), 2.0)
    quality[edges[:, 1]] = np.minimum(quality[edges[:, 1]], matches.ncc.numpy().astype(np.float64))
    is_keypoint = np.zeros(int(offsets[-1]), dtype=bool)
    for v in range(num_views):
        is_keypoint[offsets[v] : offsets[v] + num_keypoints[v]] = True
    quality = np.where(is_keypoint, 3.0, quality)
    in_edge = np.zeros(int(offsets[-1]), dtype=bool)
    in_edge[edges.ravel()] = True
    nodes = np.nonzero(in_edge)[0]
    order = np.lexsort((-quality[nodes], view_of_node[nodes], label[nodes]))
    nodes = nodes[order]
    key = label[nodes] * num_views + view_of_node[nodes]
    first = np.ones(nodes.size, dtype=bool)
    first[1:] = key[1:] != key[:-1]
    nodes = nodes[first]  # one observation per (track, view)
    labels = label[nodes]
    starts = np.nonzero(np.concatenate([[True], labels[1:] != labels[:-1]]))[0]
    lengths = np.diff(np.concatenate([starts, [labels.size]]))
    keep_track = lengths >= min_length
    keep_obs = np.repeat(keep_track, lengths)
    nodes, lengths = nodes[keep_obs], lengths[keep_track]
    obs_view = view_of_node[nodes]
    return Tracks(
        points=points,
        num_keypoints=num_keypoints,
        track_start=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        obs_view=obs_view.astype(np.int64),
        obs_point=(nodes - offsets[obs_view]).astype(np.int64),
    )
