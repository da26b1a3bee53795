"""VGGT camera head: iterative refinement of a 9-D pose encoding from the per-frame camera tokens."""

from __future__ import annotations

import torch
from torch import nn

from ..layers.block import Block, Mlp


def activate_pose(
    pose: torch.Tensor, translation: str = "linear", quaternion: str = "linear", fov: str = "relu"
):
    """Activate a raw [T(3), quat(4), fov(2)] encoding: each part linear, relu or exp."""

    def apply(x: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "linear":
            return x
        if kind == "relu":
            return torch.relu(x)
        if kind == "exp":
            return torch.exp(x)
        raise ValueError(f"unknown pose activation {kind!r}")

    return torch.cat(
        [apply(pose[..., :3], translation), apply(pose[..., 3:7], quaternion), apply(pose[..., 7:], fov)],
        dim=-1,
    )


class CameraHead(nn.Module):
    """Refines a pose encoding ``num_iterations`` times with an adaLN-modulated transformer over frames.

    Each iteration embeds the previous (detached) raw prediction — zeros at first — and turns it into a
    shift, scale and gate that modulate the normalised camera tokens; a trunk of ``Block``s attends across
    the S frames of each sequence, and an MLP predicts a delta that is added to the raw prediction.
    """

    def __init__(
        self,
        dim: int = 2048,
        trunk_depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        init_values: float = 0.01,
        num_iterations: int = 4,
        pose_dim: int = 9,
    ) -> None:
        super().__init__()
        self.num_iterations = num_iterations
        self.trunk = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, init_values=init_values, norm_eps=1e-5)
            for _ in range(trunk_depth)
        )
        self.token_norm = nn.LayerNorm(dim)
        self.trunk_norm = nn.LayerNorm(dim)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, pose_dim))
        self.embed_pose = nn.Linear(pose_dim, dim)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.adaln_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim, dim // 2, pose_dim)

    def forward(
        self, last_layer_tokens: torch.Tensor, num_iterations: int | None = None
    ) -> list[torch.Tensor]:
        """last_layer_tokens: (B, S, P, dim), camera token at index 0. Returns the activated (B, S, 9)
        encodings of every iteration (the last is the prediction)."""
        tokens = self.token_norm(last_layer_tokens[:, :, 0].to(self.token_norm.weight.dtype))
        batch, frames, _ = tokens.shape
        raw: torch.Tensor | None = None
        predictions = []
        for _ in range(num_iterations or self.num_iterations):
            condition = self.empty_pose_tokens.expand(batch, frames, -1) if raw is None else raw.detach()
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(condition)).chunk(3, dim=-1)
            x = tokens + gate * (self.adaln_norm(tokens) * (1 + scale) + shift)
            for block in self.trunk:
                x = block(x)
            delta = self.pose_branch(self.trunk_norm(x))
            raw = delta if raw is None else raw + delta
            predictions.append(activate_pose(raw))
        return predictions
