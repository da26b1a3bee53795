"""DPT dense-prediction head (Ranftl et al.) over multi-layer transformer tokens, as used by VGGT.

Module names follow the official checkpoint: ``norm``, ``projects.{0..3}``, ``resize_layers.{0,1,3}``
(index 2 is parameter-free), ``scratch.layer{1..4}_rn``, ``scratch.refinenet{1..4}`` (``refinenet4`` has no
``resConfUnit1``), ``scratch.output_conv1`` and ``scratch.output_conv2.{0,2}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import aspect_uv_grid, sincos_embed_2d

# F.interpolate indexes with int32 on some backends; stay well below 2^31 output elements per call.
_MAX_INTERPOLATE_ELEMENTS = 1 << 30


def interpolate_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True``, split over the batch when the output is huge."""
    batch, channels = x.shape[:2]
    per_item = channels * size[0] * size[1]
    if batch * per_item <= _MAX_INTERPOLATE_ELEMENTS:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    step = max(1, _MAX_INTERPOLATE_ELEMENTS // per_item)
    parts = [
        F.interpolate(x[i : i + step], size=size, mode="bilinear", align_corners=True)
        for i in range(0, batch, step)
    ]
    return torch.cat(parts, dim=0)


def activate(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Output activations of the heads: exp, inv_log (sign(x)·(e^|x|−1)), expp1 (1+e^x), sigmoid, linear."""
    if kind == "exp":
        return torch.exp(x)
    if kind == "inv_log":
        return torch.sign(x) * torch.expm1(x.abs())
    if kind == "expp1":
        return 1.0 + torch.exp(x)
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "linear":
        return x
    raise ValueError(f"unknown activation {kind!r}")


class ResidualConvUnit(nn.Module):
    """relu(x) + conv2(relu(conv1(relu(x)))).

    The skip adds relu(x), not x: upstream applies an in-place ReLU to the unit's input before keeping it for
    the skip, and the released weights were trained with that behaviour.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        return x + self.conv2(F.relu(self.conv1(x)))


class FeatureFusionBlock(nn.Module):
    """RefineNet fusion: [x + rcu1(skip)] → rcu2 → bilinear upsample (to ``size`` or ×2) → 1×1 conv."""

    def __init__(self, features: int, has_skip: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        if has_skip:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        size = size if size is not None else (2 * x.shape[-2], 2 * x.shape[-1])
        return self.out_conv(interpolate_bilinear(x, size))


class DPTScratch(nn.Module):
    """The fusion decoder: per-level 3×3 convs to ``features`` channels, four fusion blocks, output convs."""

    def __init__(self, in_channels: Sequence[int], features: int, output_dim: int | None) -> None:
        super().__init__()
        self.layer1_rn = nn.Conv2d(in_channels[0], features, kernel_size=3, padding=1, bias=False)
        self.layer2_rn = nn.Conv2d(in_channels[1], features, kernel_size=3, padding=1, bias=False)
        self.layer3_rn = nn.Conv2d(in_channels[2], features, kernel_size=3, padding=1, bias=False)
        self.layer4_rn = nn.Conv2d(in_channels[3], features, kernel_size=3, padding=1, bias=False)
        self.refinenet1 = FeatureFusionBlock(features)
        self.refinenet2 = FeatureFusionBlock(features)
        self.refinenet3 = FeatureFusionBlock(features)
        self.refinenet4 = FeatureFusionBlock(features, has_skip=False)
        if output_dim is None:  # feature-only head (track head): no output_conv2
            self.output_conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        else:
            self.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
            self.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, output_dim, kernel_size=1),
            )

    def fuse(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fuse four maps of decreasing resolution into one map at the first level's resolution ×2."""
        l1, l2, l3, l4 = (
            self.layer1_rn(levels[0]),
            self.layer2_rn(levels[1]),
            self.layer3_rn(levels[2]),
            self.layer4_rn(levels[3]),
        )
        out = self.refinenet4(l4, size=l3.shape[-2:])
        out = self.refinenet3(out, l3, size=l2.shape[-2:])
        out = self.refinenet2(out, l2, size=l1.shape[-2:])
        out = self.refinenet1(out, l1)
        return self.output_conv1(out)


class DPTHead(nn.Module):
    """Dense head on the patch tokens of four aggregator layers.

    With ``output_dim`` set, returns ``(value, confidence)`` of shapes (B, S, H, W, output_dim−1) and
    (B, S, H, W): the last channel is the confidence. With ``output_dim=None`` (feature-only), returns
    features (B, S, features, H/down_ratio, W/down_ratio).
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int | None = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        layer_indices: Sequence[int] = (4, 11, 17, 23),
        pos_embed: bool = True,
        down_ratio: int = 1,
    ) -> None:
        super().__init__()
        if len(out_channels) != 4 or len(layer_indices) != 4:
            raise ValueError("DPTHead needs exactly four out_channels and four layer_indices")
        self.patch_size = patch_size
        self.activation = activation
        self.conf_activation = conf_activation
        self.layer_indices = tuple(layer_indices)
        self.use_pos_embed = pos_embed
        self.down_ratio = down_ratio
        self.feature_only = output_dim is None
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, oc, kernel_size=1) for oc in out_channels)
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = DPTScratch(out_channels, features, output_dim)

    def forward(
        self,
        layer_outputs: Sequence[torch.Tensor | None],
        image_size: tuple[int, int],
        patch_start_idx: int,
        frames_chunk_size: int | None = 8,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``layer_outputs[i]``: (B, S, P, dim_in) tokens of aggregator layer i (only ``layer_indices`` are
        read); ``image_size``: (H, W) of the input images. Frames are processed ``frames_chunk_size`` at a
        time to bound memory (None: all at once)."""
        num_frames = self._tokens(layer_outputs, self.layer_indices[0]).shape[1]
        chunk = num_frames if frames_chunk_size is None else max(1, frames_chunk_size)
        results = [
            self._forward_frames(
                layer_outputs, image_size, patch_start_idx, start, min(start + chunk, num_frames)
            )
            for start in range(0, num_frames, chunk)
        ]
        if self.feature_only:
            return torch.cat(results, dim=1)
        return torch.cat([r[0] for r in results], dim=1), torch.cat([r[1] for r in results], dim=1)

    @staticmethod
    def _tokens(layer_outputs: Sequence[torch.Tensor | None], index: int) -> torch.Tensor:
        tokens = layer_outputs[index]
        if tokens is None:
            raise ValueError(f"DPTHead needs the output of aggregator layer {index}, which was not kept")
        return tokens

    def _forward_frames(
        self,
        layer_outputs: Sequence[torch.Tensor | None],
        image_size: tuple[int, int],
        patch_start_idx: int,
        start: int,
        end: int,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        height, width = image_size
        rows, cols = height // self.patch_size, width // self.patch_size
        levels = []
        for level, index in enumerate(self.layer_indices):
            tokens = self._tokens(layer_outputs, index)[:, start:end, patch_start_idx:]
            batch, frames = tokens.shape[:2]
            x = self.norm(tokens.to(self.norm.weight.dtype).reshape(batch * frames, rows * cols, -1))
            x = x.transpose(1, 2).reshape(batch * frames, -1, rows, cols)
            x = self.projects[level](x)
            if self.use_pos_embed:
                x = self._add_pos_embed(x, width / height)
            levels.append(self.resize_layers[level](x))
        out = self.scratch.fuse(levels)
        out_size = (rows * self.patch_size // self.down_ratio, cols * self.patch_size // self.down_ratio)
        out = interpolate_bilinear(out, out_size)
        if self.use_pos_embed:
            out = self._add_pos_embed(out, width / height)
        if self.feature_only:
            return out.reshape(batch, frames, *out.shape[1:])
        out = self.scratch.output_conv2(out).permute(0, 2, 3, 1)
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # activations in float32 under autocast
        value = activate(out[..., :-1], self.activation)
        confidence = activate(out[..., -1], self.conf_activation)
        return value.reshape(batch, frames, *value.shape[1:]), confidence.reshape(
            batch, frames, *confidence.shape[1:]
        )

    @staticmethod
    def _add_pos_embed(x: torch.Tensor, aspect_ratio: float, scale: float = 0.1) -> torch.Tensor:
        """x + scale · sincos(UV grid of x's size with the image's aspect ratio)."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # the grid in float32 also for bf16 features
        grid = aspect_uv_grid(x.shape[-1], x.shape[-2], aspect_ratio, dtype=dtype, device=x.device)
        embedding = sincos_embed_2d(grid, x.shape[1]).to(x.dtype) * scale
        return x + embedding.permute(2, 0, 1).unsqueeze(0)
