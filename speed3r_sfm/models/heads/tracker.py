"""CoTracker/VGGSfM-style iterative point tracker on dense feature maps (VGGT's ``BaseTrackerPredictor``).

Coordinates: a point (x, y) in feature-map pixels has x = column, y = row, with pixel centres at integers
(bilinear sampling with ``align_corners=True``). Query points and outputs are in input-image pixels, i.e.
feature coordinates × ``stride``.

Details the architecture notes leave open follow CoTracker2 / VGGSfM and are recorded where they occur:
the motion embedding's frequencies, the (x-major) order of the correlation window, the MAE-style sin-cos
embedding of the query position, and the zero padding of correlation lookups.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.block import Mlp
from .embeddings import pixel_sincos_table
from .update_former import EfficientUpdateFormer


def bilinear_sample(maps: torch.Tensor, points: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Sample (N, C, H, W) maps at (N, ..., 2) pixel coordinates (x, y). Returns (N, C, ...)."""
    height, width = maps.shape[-2:]
    scale = points.new_tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)])
    grid = (points.to(maps.dtype) * scale.to(maps.dtype) - 1).reshape(points.shape[0], -1, 1, 2)
    sampled = F.grid_sample(maps, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    return sampled.reshape(*sampled.shape[:2], *points.shape[1:-1])


def sample_at_points(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Features (B, N, C) of (B, C, H, W) maps at (B, N, 2) points, border-padded."""
    return bilinear_sample(maps, points, padding_mode="border").transpose(1, 2)


def motion_embedding(flows: torch.Tensor, channels: int) -> torch.Tensor:
    """(..., 2·channels) sin/cos embedding of 2-D displacements, as CoTracker's ``get_2d_embedding``.

    Per axis, frequency f_k = 2k·1000/channels (k < channels/2) and channels interleave sin(f_k·d),
    cos(f_k·d); the x embedding comes first.
    """
    freqs = torch.arange(0, channels, 2, device=flows.device, dtype=torch.float32) * (1000.0 / channels)
    parts = []
    for axis in range(2):
        angles = flows[..., axis : axis + 1].float() * freqs
        parts.append(torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2))
    return torch.cat(parts, dim=-1)


class CorrelationPyramid:
    """Correlations between track features and a pyramid of feature maps, looked up in a window.

    Level l is the maps average-pooled l times by 2. For each track and frame the correlation
    <track feature, map pixel>/√C is sampled on a (2r+1)² window around the track position at every level,
    giving ``num_levels · (2r+1)²`` values. The window is flattened with the x offset as the slow index and
    the y offset as the fast one (upstream's order, which the trained ``corr_mlp`` expects). Correlation
    volumes are built for a few frames at a time so that memory stays bounded.
    """

    def __init__(self, maps: torch.Tensor, num_levels: int, radius: int, max_elements: int = 1 << 28) -> None:
        self.radius = radius
        self.max_elements = max_elements
        self.levels = [maps]
        for _ in range(num_levels - 1):
            batch, frames, channels, height, width = maps.shape
            if min(height, width) < 2:
                raise ValueError(f"feature maps too small for {num_levels} correlation levels")
            maps = F.avg_pool2d(
                maps.reshape(batch * frames, channels, height, width), kernel_size=2, stride=2
            )
            maps = maps.reshape(batch, frames, channels, *maps.shape[-2:])
            self.levels.append(maps)
        line = torch.linspace(-radius, radius, 2 * radius + 1, device=maps.device, dtype=torch.float32)
        offset_a, offset_b = torch.meshgrid(line, line, indexing="ij")
        self.offsets = torch.stack([offset_a, offset_b], dim=-1)  # [i, j] = (dx_i, dy_j)

    def sample(self, track_feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """track_feats (B, S, N, C), coords (B, S, N, 2) at level 0. Returns (B, S, N, levels·(2r+1)²)."""
        batch, frames, num_points, channels = track_feats.shape
        window = self.offsets.to(coords.dtype)
        per_level = []
        for level, maps in enumerate(self.levels):
            height, width = maps.shape[-2:]
            step = max(1, self.max_elements // max(1, batch * num_points * height * width))
            chunks = []
            for start in range(0, frames, step):
                end = min(start + step, frames)
                corr = track_feats[:, start:end] @ maps[:, start:end].flatten(3) / math.sqrt(channels)
                corr = corr.reshape(-1, 1, height, width)
                centres = coords[:, start:end].reshape(-1, 1, 1, 2) / 2**level
                sampled = bilinear_sample(corr, centres + window, padding_mode="zeros")
                chunks.append(sampled.reshape(batch, end - start, num_points, -1))
            per_level.append(torch.cat(chunks, dim=1))
        return torch.cat(per_level, dim=-1)


class BaseTrackerPredictor(nn.Module):
    """Tracks query points of frame 0 through all frames by ``iterations`` rounds of refinement.

    Track tokens concatenate a motion embedding of the displacement from the query (+ the displacement
    itself, twice, scaled by 1/``max_scale``), the correlation features (``corr_mlp``) and the track
    feature; a sin-cos embedding of the query position and a query/other-frame token
    (``query_ref_token``) are added. The :class:`EfficientUpdateFormer` predicts coordinate and feature
    deltas; frame 0 is always reset to the query.
    """

    def __init__(
        self,
        latent_dim: int = 128,
        hidden_size: int = 384,
        stride: int = 2,
        corr_levels: int = 7,
        corr_radius: int = 4,
        depth: int = 6,
        num_heads: int = 8,
        num_virtual_tracks: int = 64,
        max_scale: float = 518.0,
    ) -> None:
        super().__init__()
        if latent_dim % 4:
            raise ValueError(f"latent_dim must be a multiple of 4, got {latent_dim}")
        self.latent_dim = latent_dim
        self.stride = stride
        self.max_scale = max_scale
        self.transformer_dim = 3 * latent_dim + 4
        self.corr_levels = corr_levels
        self.corr_radius = corr_radius
        self.corr_mlp = Mlp(corr_levels * (2 * corr_radius + 1) ** 2, hidden_size, latent_dim)
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, self.transformer_dim))
        self.updateformer = EfficientUpdateFormer(
            self.transformer_dim,
            hidden_size,
            latent_dim + 2,
            time_depth=depth,
            space_depth=depth,
            num_heads=num_heads,
            num_virtual_tracks=num_virtual_tracks,
        )
        self.fmap_norm = nn.LayerNorm(latent_dim)
        self.ffeat_norm = nn.GroupNorm(1, latent_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        self.conf_predictor = nn.Sequential(nn.Linear(latent_dim, 1))

    def forward(
        self, query_points: torch.Tensor, feature_maps: torch.Tensor, iterations: int = 4
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """query_points (B, N, 2) in frame-0 input pixels; feature_maps (B, S, C, H/stride, W/stride).

        Returns the (B, S, N, 2) tracks of every iteration in input pixels, and the visibility and
        confidence (B, S, N) in [0, 1].
        """
        batch, frames, channels, height, width = feature_maps.shape
        num_points = query_points.shape[1]
        maps = self.fmap_norm(feature_maps.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        queries = query_points.float() / self.stride  # coordinates stay float32 under autocast
        coords = queries.unsqueeze(1).expand(batch, frames, num_points, 2)
        query_feats = sample_at_points(maps[:, 0], queries)
        track_feats = query_feats.unsqueeze(1).expand(batch, frames, num_points, channels)
        pyramid = CorrelationPyramid(maps, self.corr_levels, self.corr_radius)

        table = pixel_sincos_table(self.transformer_dim, height, width, device=maps.device).to(maps.dtype)
        query_pos = sample_at_points(table.expand(batch, -1, -1, -1), queries).reshape(
            batch * num_points, 1, -1
        )
        ref = self.query_ref_token
        frame_tokens = torch.cat([ref[:, :1], ref[:, 1:].expand(-1, frames - 1, -1)], dim=1)

        predictions = []
        for _ in range(iterations):
            coords = coords.detach()
            corr = pyramid.sample(track_feats, coords)
            corr = self.corr_mlp(corr.transpose(1, 2).reshape(batch * num_points, frames, -1))
            flows = (coords - coords[:, :1]).transpose(1, 2).reshape(batch * num_points, frames, 2)
            scaled = flows / self.max_scale
            motion = torch.cat([motion_embedding(flows, self.latent_dim // 2), scaled, scaled], dim=-1)
            feats = track_feats.transpose(1, 2).reshape(batch * num_points, frames, channels)
            x = torch.cat([motion.to(corr.dtype), corr, feats.to(corr.dtype)], dim=-1)
            x = x + query_pos.to(x.dtype) + frame_tokens.to(x.dtype)
            delta = self.updateformer(x.reshape(batch, num_points, frames, -1))
            delta = delta.reshape(batch * num_points, frames, -1)
            feats = feats + self.ffeat_updater(self.ffeat_norm(delta[..., 2:].reshape(-1, channels))).reshape(
                feats.shape
            )
            track_feats = feats.reshape(batch, num_points, frames, channels).transpose(1, 2)
            moved = coords + delta[..., :2].reshape(batch, num_points, frames, 2).transpose(1, 2)
            coords = torch.cat([queries.unsqueeze(1), moved[:, 1:]], dim=1)
            predictions.append(coords * self.stride)

        vis = torch.sigmoid(self.vis_predictor(track_feats).squeeze(-1).float())
        conf = torch.sigmoid(self.conf_predictor(track_feats).squeeze(-1).float())
        return predictions, vis, conf
