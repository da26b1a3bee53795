"""Photometric augmentation (kornia) with one set of parameters for all views of a sample.

Geometry is untouched (so poses, intrinsics and depth stay valid); colour jitter and grayscale are drawn
once per sample and applied to all its views when ``consistent`` (as VGGT's consistent jitter), else per
view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class AugmentConfig:
    """kornia ``ColorJiggle`` (brightness, contrast, saturation, hue; applied with probability ``p``) then
    ``RandomGrayscale`` (probability ``grayscale_p``)."""

    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05
    p: float = 0.8
    grayscale_p: float = 0.05
    consistent: bool = True

    @classmethod
    def from_any(cls, value: AugmentConfig | dict[str, Any] | None) -> AugmentConfig | None:
        if value is None or isinstance(value, cls):
            return value
        return cls(**value)


class ViewConsistentColorAugment(nn.Module):
    """Callable on (B, S, 3, H, W) images in [0, 1]; each sample's S views share the drawn parameters."""

    def __init__(self, config: AugmentConfig) -> None:
        super().__init__()
        import kornia.augmentation as K

        same = config.consistent
        self.config = config
        self.jitter = K.ColorJiggle(
            config.brightness, config.contrast, config.saturation, config.hue, p=config.p, same_on_batch=same
        )
        self.grayscale = (
            K.RandomGrayscale(p=config.grayscale_p, same_on_batch=same) if config.grayscale_p > 0 else None
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 5:
            raise ValueError(f"expected (B, S, 3, H, W) images, got {tuple(images.shape)}")
        out = []
        for sample in images:
            x = self.jitter(sample.float())
            if self.grayscale is not None:
                x = self.grayscale(x)
            out.append(x.clamp(0.0, 1.0))
        return torch.stack(out).to(images.dtype)
