"""VGGT track head: a feature-only DPT at half resolution feeding the iterative point tracker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .dpt import DPTHead
from .tracker import BaseTrackerPredictor


class TrackHead(nn.Module):
    """Tracks query points of frame 0 through all frames of each sequence."""

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        features: int = 128,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        layer_indices: Sequence[int] = (4, 11, 17, 23),
        iterations: int = 4,
        stride: int = 2,
        corr_levels: int = 7,
        corr_radius: int = 4,
        hidden_size: int = 384,
        depth: int = 6,
        num_heads: int = 8,
        num_virtual_tracks: int = 64,
        max_scale: float = 518.0,
    ) -> None:
        super().__init__()
        self.iterations = iterations
        self.feature_extractor = DPTHead(
            dim_in,
            patch_size,
            output_dim=None,
            features=features,
            out_channels=out_channels,
            layer_indices=layer_indices,
            pos_embed=False,
            down_ratio=stride,
        )
        self.tracker = BaseTrackerPredictor(
            latent_dim=features,
            hidden_size=hidden_size,
            stride=stride,
            corr_levels=corr_levels,
            corr_radius=corr_radius,
            depth=depth,
            num_heads=num_heads,
            num_virtual_tracks=num_virtual_tracks,
            max_scale=max_scale,
        )

    def forward(
        self,
        layer_outputs: Sequence[torch.Tensor | None],
        image_size: tuple[int, int],
        patch_start_idx: int,
        query_points: torch.Tensor,
        iterations: int | None = None,
        frames_chunk_size: int | None = 8,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """query_points: (B, N, 2) pixel (x, y) in frame 0. Returns per-iteration tracks (B, S, N, 2),
        visibility (B, S, N) and confidence (B, S, N)."""
        feature_maps = self.features(layer_outputs, image_size, patch_start_idx, frames_chunk_size)
        return self.track(feature_maps, query_points, 0, iterations)

    def features(
        self,
        layer_outputs: Sequence[torch.Tensor | None],
        image_size: tuple[int, int],
        patch_start_idx: int,
        frames_chunk_size: int | None = 8,
    ) -> torch.Tensor:
        """The (B, S, C, H/stride, W/stride) feature maps the tracker correlates."""
        return self.feature_extractor(layer_outputs, image_size, patch_start_idx, frames_chunk_size)

    def track(
        self,
        feature_maps: torch.Tensor,
        query_points: torch.Tensor,
        frames: torch.Tensor | None = None,
        iterations: int | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Tracks of ``query_points`` (B, N, 2) through the frames of ``feature_maps`` (1 or B, S, C, h, w,
        from :meth:`features`); outputs as :meth:`forward`.

        The tracker takes its first frame as the query frame. ``frames`` (B, F) picks, per sequence, the F
        frames to track through, the query frame first (default: all, in order); outputs follow that order.
        A query frame other than frame 0 approximates upstream's way (a backbone pass with that frame
        first): the features keep the aggregator's frame-0 reference.
        """
        if frames is not None:
            batch = torch.arange(frames.shape[0], device=frames.device)[:, None]
            if feature_maps.shape[0] == 1:
                batch = torch.zeros_like(batch)
            feature_maps = feature_maps[batch, frames]
        return self.tracker(query_points, feature_maps, iterations or self.iterations)


@dataclass
class FeatureTracker:
    """Tracks points of any view through all views of one prediction, from track features computed once
    in the backbone pass (``Prediction.extras["tracker"]`` of VGGT's ``predict(..., with_tracker=True)``).

    Called as ``tracker(view, points, targets)`` with (N, 2) model-input pixels of ``view`` (integer centres)
    and optionally the views to track through (default all: the cost grows with their number); returns
    tracks (S, N, 2) in model-input pixels, visibility and confidence (S, N) in [0, 1], float32 on the CPU.
    :meth:`track_views` answers several requests in batched tracker calls (``batch`` per call: one call
    launches thousands of small kernels, so a single view leaves a GPU mostly idle). The points of one call
    attend to each other (virtual tracks), and the frames too, so chunks, batch padding and the choice of
    ``targets`` change tracks slightly.
    """

    head: TrackHead
    feature_maps: torch.Tensor  # (1, S, C, h, w) on the model's device
    chunk: int = 2048  # query points per tracker call
    batch: int = 8  # query views per tracker call in track_views

    @property
    def num_views(self) -> int:
        return self.feature_maps.shape[1]

    def __call__(
        self, view: int, points: torch.Tensor, targets: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tracks through every view, or only ``view`` and ``targets`` (the others: NaN, visibility 0)."""
        outputs: list[tuple[torch.Tensor, ...]] = []
        for start in range(0, points.shape[0], self.chunk):
            outputs += self._run([(view, points[start : start + self.chunk], targets)])
        if not outputs:
            empty = torch.zeros(self.num_views, 0)
            return torch.zeros(self.num_views, 0, 2), empty, empty.clone()
        tracks, vis, conf = (torch.cat(parts, dim=1) for parts in zip(*outputs, strict=True))
        return tracks, vis, conf

    def track_views(
        self, requests: Sequence[tuple[int, torch.Tensor, Sequence[int] | None]]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``[tracker(view, points, targets) for view, points, targets in requests]`` in batched calls of up
        to ``batch`` requests with equally many frames (points padded to the call's largest count by
        repeating the last point)."""
        results: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for k, (view, pts, targets) in enumerate(requests):
            if 0 < pts.shape[0] <= self.chunk:
                groups.setdefault(len(self._frames(view, targets)), []).append(k)
            else:
                results[k] = self(view, pts, targets)
        for members in groups.values():
            for first in range(0, len(members), self.batch):
                group = members[first : first + self.batch]
                size = max(requests[k][1].shape[0] for k in group)
                padded = []
                for k in group:
                    view, pts, targets = requests[k]
                    padded.append((view, torch.cat([pts, pts[-1:].expand(size - pts.shape[0], 2)]), targets))
                for k, (tracks, vis, conf) in zip(group, self._run(padded), strict=True):
                    n = requests[k][1].shape[0]
                    results[k] = (tracks[:, :n], vis[:, :n], conf[:, :n])
        return results  # type: ignore[return-value]

    def _frames(self, view: int, targets: Sequence[int] | None) -> list[int]:
        """The query view first, then the other frames to track through."""
        frames = self.num_views
        if not 0 <= view < frames:
            raise IndexError(f"query_frame {view} out of range for {frames} frames")
        others = range(frames) if targets is None else sorted(set(targets))
        if any(not 0 <= f < frames for f in others):
            raise IndexError(f"targets {list(others)} out of range for {frames} frames")
        return [view] + [f for f in others if f != view]

    def _run(
        self, requests: Sequence[tuple[int, torch.Tensor, Sequence[int] | None]]
    ) -> list[tuple[torch.Tensor, ...]]:
        """One tracker call; the requests have equally many frames and points."""
        device = self.feature_maps.device
        frames = torch.tensor([self._frames(view, targets) for view, _, targets in requests])
        query = torch.stack([pts for _, pts, _ in requests]).to(device, torch.float32)
        with (
            torch.inference_mode(),
            torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"),
        ):
            tracks, vis, conf = self.head.track(self.feature_maps, query, frames.to(device))
        tracks, vis, conf = tracks[-1].float().cpu(), vis.float().cpu(), conf.float().cpu()
        outputs = []
        for b, order in enumerate(frames):
            n = query.shape[1]
            full_tracks = torch.full((self.num_views, n, 2), float("nan"))
            full_vis, full_conf = torch.zeros(self.num_views, n), torch.zeros(self.num_views, n)
            full_tracks[order], full_vis[order], full_conf[order] = tracks[b], vis[b], conf[b]
            outputs.append((full_tracks, full_vis, full_conf))
        return outputs
