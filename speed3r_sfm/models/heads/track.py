"""VGGT track head: a feature-only DPT at half resolution feeding the iterative point tracker."""

from __future__ import annotations

from collections.abc import Sequence

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
        feature_maps = self.feature_extractor(layer_outputs, image_size, patch_start_idx, frames_chunk_size)
        return self.tracker(query_points, feature_maps, iterations or self.iterations)
