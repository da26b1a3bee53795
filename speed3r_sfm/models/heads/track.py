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
        query_frame: int = 0,
        iterations: int | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Tracks of ``query_points`` (B, N, 2), pixels of frame ``query_frame``, through every frame of
        ``feature_maps`` (from :meth:`features`); outputs as :meth:`forward`, frames in their given order.

        The tracker takes its first frame as the query frame, so the maps are reordered to put
        ``query_frame`` first and the outputs back. For ``query_frame`` > 0 this is an approximation of
        upstream's way (a backbone pass with that frame first): the features keep the aggregator's
        frame-0 reference.
        """
        frames = feature_maps.shape[1]
        if not 0 <= query_frame < frames:
            raise IndexError(f"query_frame {query_frame} out of range for {frames} frames")
        if query_frame == 0:
            return self.tracker(query_points, feature_maps, iterations or self.iterations)
        order = torch.tensor([query_frame] + [f for f in range(frames) if f != query_frame])
        back = torch.argsort(order).to(feature_maps.device)
        tracks, vis, conf = self.tracker(
            query_points, feature_maps[:, order.to(feature_maps.device)], iterations or self.iterations
        )
        return [t[:, back] for t in tracks], vis[:, back], conf[:, back]


@dataclass
class FeatureTracker:
    """Tracks points of any view through all views of one prediction, from track features computed once
    in the backbone pass (``Prediction.extras["tracker"]`` of VGGT's ``predict(..., with_tracker=True)``).

    Called as ``tracker(view, points)`` with (N, 2) model-input pixels of ``view`` (integer centres); returns
    tracks (S, N, 2) in model-input pixels, visibility and confidence (S, N) in [0, 1], float32 on the CPU.
    """

    head: TrackHead
    feature_maps: torch.Tensor  # (1, S, C, h, w) on the model's device
    chunk: int = 2048  # query points per tracker call

    @property
    def num_views(self) -> int:
        return self.feature_maps.shape[1]

    def __call__(self, view: int, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = self.feature_maps.device
        outputs: list[tuple[torch.Tensor, ...]] = []
        with (
            torch.inference_mode(),
            torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"),
        ):
            for start in range(0, points.shape[0], self.chunk):
                query = points[start : start + self.chunk].to(device, torch.float32)[None]
                tracks, vis, conf = self.head.track(self.feature_maps, query, view)
                outputs.append((tracks[-1][0].float().cpu(), vis[0].float().cpu(), conf[0].float().cpu()))
        if not outputs:
            empty = torch.zeros(self.num_views, 0)
            return torch.zeros(self.num_views, 0, 2), empty, empty.clone()
        tracks, vis, conf = (torch.cat(parts, dim=1) for parts in zip(*outputs, strict=True))
        return tracks, vis, conf
