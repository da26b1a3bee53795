"""Similarity transforms (Sim(3)): ``x' = s R x + t``."""

from __future__ import annotations

import torch


def umeyama_sim3(
    src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor | None = None, with_scale: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares ``(s, R, t)`` minimising ``sum_i w_i |dst_i - (s R src_i + t)|^2`` (Umeyama 1991).

    ``src``, ``dst``: (N, 3) corresponding points; ``weights``: optional (N,) non-negative weights.
    ``with_scale=False`` fixes ``s = 1`` (rigid alignment). R is always a proper rotation (det +1), also
    when the best orthogonal fit would be a reflection. Computed in float64; returned in ``src``'s dtype.
    With fewer than three non-collinear points the rotation about the points' line is not determined:
    a valid minimiser is still returned. Raises ``ValueError`` when the problem has no solution (no points,
    zero total weight, or all source points identical).
    """
    if src.ndim != 2 or src.shape[-1] != 3 or src.shape != dst.shape:
        raise ValueError(
            f"umeyama_sim3: src and dst must both be (N, 3), got {tuple(src.shape)} and {tuple(dst.shape)}"
        )
    if src.shape[0] == 0:
        raise ValueError("umeyama_sim3: no points to align")
    out_dtype = src.dtype
    x = src.double()
    y = dst.double()
    w = torch.ones(x.shape[0], dtype=torch.float64, device=x.device) if weights is None else weights.double()
    if w.shape != (x.shape[0],) or (w < 0).any():
        raise ValueError("umeyama_sim3: weights must be a non-negative (N,) tensor")
    total = w.sum()
    if total <= 0:
        raise ValueError("umeyama_sim3: the weights sum to zero")
    w = w / total
    scale, rot, trans, var_x = _weighted_umeyama(x[None], y[None], w[None], with_scale)
    if with_scale and var_x[0] <= 1e-24:
        raise ValueError("umeyama_sim3: all source points coincide, so the scale is undefined")
    return scale[0].to(out_dtype), rot[0].to(out_dtype), trans[0].to(out_dtype)


def umeyama_sim3_batched(
    src: torch.Tensor, dst: torch.Tensor
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Unweighted :func:`umeyama_sim3` of B problems at once: ``src``, ``dst`` (B, N, 3). Returns
    ``((s (B,), R (B, 3, 3), t (B, 3)), valid (B,))`` in float64; ``valid`` is False where the source
    points coincide (the scale is undefined) and those entries are meaningless."""
    x, y = src.double(), dst.double()
    w = torch.full(x.shape[:2], 1.0 / x.shape[1], dtype=torch.float64, device=x.device)
    scale, rot, trans, var_x = _weighted_umeyama(x, y, w, with_scale=True)
    valid = (var_x > 1e-24) & torch.isfinite(scale) & (scale > 0) & torch.isfinite(rot).flatten(1).all(-1)
    return (scale, rot, trans), valid


def _weighted_umeyama(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, with_scale: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s (B,), R (B, 3, 3), t (B, 3), source variance (B,)) of points (B, N, 3) in float64 with weights
    (B, N) that sum to one; s is 1 without scale and meaningless where the variance is zero."""
    mu_x = (w[..., None] * x).sum(1)
    mu_y = (w[..., None] * y).sum(1)
    xc = x - mu_x[:, None]
    yc = y - mu_y[:, None]
    var_x = (w * (xc * xc).sum(-1)).sum(-1)
    cov = (w[..., None] * yc).transpose(1, 2) @ xc
    u, d, vh = torch.linalg.svd(cov)
    sign = torch.ones_like(d)
    sign[:, 2] = torch.where(torch.det(u) * torch.det(vh) < 0, -1.0, 1.0)
    rot = u @ torch.diag_embed(sign) @ vh
    if with_scale:
        scale = (d * sign).sum(-1) / torch.where(var_x > 0, var_x, torch.ones_like(var_x))
    else:
        scale = torch.ones_like(var_x)
    trans = mu_y - scale[:, None] * (rot @ mu_x[..., None])[..., 0]
    return scale, rot, trans, var_x


def apply_sim3(
    scale: torch.Tensor, rot: torch.Tensor, trans: torch.Tensor, points: torch.Tensor
) -> torch.Tensor:
    """``s R x + t`` for points ``(..., 3)``."""
    return scale * points @ rot.transpose(-1, -2) + trans


def sim3_cam_from_world(
    scale: torch.Tensor, rot: torch.Tensor, trans: torch.Tensor, cam_from_world: torch.Tensor
) -> torch.Tensor:
    """Poses ``(..., 3, 4)`` of the same cameras after mapping the world by ``x' = s R x + t``.

    The camera frames scale with the world, so camera-frame points (and depths) are multiplied by ``s``:
    ``R_c' = R_c R^T``, ``t_c' = s t_c - R_c R^T t``.
    """
    rc = cam_from_world[..., :3, :3] @ rot.transpose(-1, -2)
    tc = scale * cam_from_world[..., :3, 3] - (rc @ trans[..., None])[..., 0]
    return torch.cat([rc, tc[..., None]], dim=-1)


def identity_sim3() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The identity similarity ``(1, I, 0)`` in float64."""
    return (
        torch.ones((), dtype=torch.float64),
        torch.eye(3, dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64),
    )


def compose_sim3(
    a: tuple[torch.Tensor, torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``a ∘ b``: the similarity ``x -> a(b(x))``."""
    sa, ra, ta = a
    sb, rb, tb = b
    return sa * sb, ra @ rb, sa * (ra @ tb) + ta


def invert_sim3(
    sim3: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse similarity ``x -> R^T (x - t) / s``."""
    scale, rot, trans = sim3
    return 1.0 / scale, rot.T, -(rot.T @ trans) / scale
