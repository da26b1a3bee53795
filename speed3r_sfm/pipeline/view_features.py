"""Per-view descriptors that group an unordered collection into chunks (``group_views_by_similarity``).

:func:`token_descriptors` uses the backbone's own image encoder (the DINOv2 patch embedding of VGGT's
aggregator or π³'s encoder), run view by view: no global attention, so it costs a fraction of a forward pass
and its memory does not grow with the number of views. A view's descriptor is the mean of its L2-normalised
patch tokens followed by their means over the 2 x 2 quadrants of the image (the layout tells apart views of
similar content looking at different parts of the scene), each part L2-normalised. Models without a known
encoder (e.g. a plain predictor callable) fall back to :func:`thumbnail_descriptors`, small grey thumbnails.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Loader = Callable[[list[int]], torch.Tensor]
"""Views ``indices`` -> images (n, 3, H, W) in [0, 1]."""


def token_encoder(model: object) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function images (n, 3, H, W) in [0, 1] -> patch tokens (n, P, D) of ``model``'s own image encoder
    (VGGT: ``aggregator.patch_embed``; π³: ``encoder``), or None when the model has no known encoder."""
    aggregator = getattr(model, "aggregator", None)
    if isinstance(aggregator, nn.Module) and hasattr(aggregator, "patch_embed"):
        return lambda images: aggregator.patch_embed(aggregator._normalise(images))
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, nn.Module) and hasattr(model, "image_mean") and hasattr(model, "image_std"):
        return lambda images: encoder((images - model.image_mean) / model.image_std)
    return None


def _as_loader(images: torch.Tensor | Loader, num_views: int | None) -> tuple[Loader, int]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (S, 3, H, W), got {tuple(images.shape)}")
        return (lambda indices: images[indices]), images.shape[0]
    if num_views is None:
        raise ValueError("a loader of images needs num_views")
    return images, num_views


def _batches(num_views: int, batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(range(i, min(i + batch_size, num_views))) for i in range(0, num_views, batch_size)]


def pool_tokens(tokens: torch.Tensor, patch_grid: tuple[int, int]) -> torch.Tensor:
    """(n, P, D) patch tokens on a (rows, cols) grid -> (n, 5 D) descriptors: the mean of the L2-normalised
    tokens, then their means over the 2 x 2 quadrants, each part L2-normalised."""
    n, p, d = tokens.shape
    rows, cols = patch_grid
    if rows * cols != p:
        raise ValueError(f"{p} patch tokens do not fill a {rows} x {cols} grid")
    grid = F.normalize(tokens.float(), dim=-1).transpose(1, 2).reshape(n, d, rows, cols)
    parts = [grid.mean(dim=(2, 3)), *F.adaptive_avg_pool2d(grid, 2).flatten(2).unbind(-1)]
    return torch.cat([F.normalize(part, dim=-1) for part in parts], dim=-1)


@torch.inference_mode()
def token_descriptors(
    model: nn.Module,
    images: torch.Tensor | Loader,
    num_views: int | None = None,
    patch_size: int = 14,
    batch_size: int = 16,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(S, 5 D) float32 descriptors of S views from ``model``'s own image encoder (see the module docstring).

    ``images``: (S, 3, H, W) in [0, 1] or a loader ``indices -> (n, 3, H, W)`` with ``num_views``; they are
    encoded ``batch_size`` views at a time on ``device`` (default: the model's), under bfloat16 autocast
    on CUDA. Raises TypeError when the model has no known encoder.
    """
    encode = token_encoder(model)
    if encode is None:
        raise TypeError(
            f"{type(model).__name__} has no known image encoder (VGGT aggregator.patch_embed or π³ encoder); "
            "use thumbnail_descriptors"
        )
    load, n = _as_loader(images, num_views)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    out = []
    for indices in _batches(n, batch_size):
        batch = load(indices).to(dev)
        height, width = batch.shape[-2:]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            tokens = encode(batch)
        out.append(pool_tokens(tokens, (height // patch_size, width // patch_size)).cpu())
    return torch.cat(out)


def thumbnail_descriptors(
    images: torch.Tensor | Loader, num_views: int | None = None, size: int = 16, batch_size: int = 64
) -> torch.Tensor:
    """(S, size²) descriptors from grey ``size`` x ``size`` thumbnails (mean-free, L2-normalised): the
    fallback for models without a token encoder."""
    load, n = _as_loader(images, num_views)
    out = []
    for indices in _batches(n, batch_size):
        gray = load(indices).float().cpu().mean(dim=1, keepdim=True)
        thumb = F.adaptive_avg_pool2d(gray, size).flatten(1)
        out.append(F.normalize(thumb - thumb.mean(dim=1, keepdim=True), dim=-1))
    return torch.cat(out)
