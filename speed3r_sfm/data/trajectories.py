"""Camera trajectories for synthetic rooms: orbit, forward-moving video and random unordered views.

Cameras stay in the free ring between the central objects and the walls (see ``RoomLayout``) and look
at the content. All sampling uses a numpy Generator, so a trajectory is a pure function of its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from speed3r_sfm.geometry import look_at

TRAJECTORIES = ("orbit", "forward", "random")


@dataclass(frozen=True)
class RoomLayout:
    """Where cameras may go. Room: [-sx/2, sx/2] x [-sy/2, sy/2] x [0, sz], z up. Objects lie within
    ``content_radius`` of the vertical axis; cameras stay at horizontal radius in [ring_min, ring_max]."""

    size: tuple[float, float, float]
    content_radius: float
    ring_min: float
    ring_max: float
    object_centers: np.ndarray  # (N, 3) centres of the central objects (look-at targets)


def _smooth_noise(rng: np.random.Generator, n: int, amplitude: float) -> np.ndarray:
    """Low-frequency noise over a sequence of n samples (sum of two random sinusoids)."""
    s = np.linspace(0.0, 1.0, n)
    out = np.zeros(n)
    for freq in (rng.uniform(0.5, 1.5), rng.uniform(1.5, 3.0)):
        out += np.sin(2 * math.pi * (freq * s + rng.uniform()))
    return amplitude * out / 2


def _orbit(layout: RoomLayout, rng: np.random.Generator, n: int):
    span = rng.uniform(math.pi, 2 * math.pi)
    step = span / n if span > 1.9 * math.pi else span / max(n - 1, 1)
    theta = rng.uniform(0, 2 * math.pi) + step * np.arange(n)
    radius = rng.uniform(layout.ring_min, layout.ring_max) + _smooth_noise(rng, n, 0.08)
    radius = np.clip(radius, layout.ring_min, layout.ring_max)
    height = rng.uniform(1.1, 1.8) + _smooth_noise(rng, n, 0.15)
    eye = np.stack([radius * np.cos(theta), radius * np.sin(theta), height], -1)
    target = np.array([0.0, 0.0, rng.uniform(0.3, 0.6)]) + rng.normal(0, 0.1, (n, 3))
    roll = rng.normal(0, math.radians(2), n)
    return eye, target, roll


def _forward(layout: RoomLayout, rng: np.random.Generator, n: int):
    base_radius = rng.uniform(layout.ring_min, layout.ring_max)
    step = rng.uniform(0.12, 0.3)  # metres per frame, like a walking video
    direction = rng.choice([-1.0, 1.0])
    theta = rng.uniform(0, 2 * math.pi) + direction * np.arange(n) * step / base_radius
    radius = np.clip(base_radius + _smooth_noise(rng, n, 0.15), layout.ring_min, layout.ring_max)
    height = rng.uniform(1.2, 1.7) + _smooth_noise(rng, n, 0.1)
    eye = np.stack([radius * np.cos(theta), radius * np.sin(theta), height], -1)
    # Look ahead along the path, turned towards the centre so the objects stay in view.
    tangent = direction * np.stack([-np.sin(theta), np.cos(theta), np.zeros(n)], -1)
    inward = -np.stack([np.cos(theta), np.sin(theta), np.zeros(n)], -1)
    turn = np.radians(rng.uniform(45, 65) + _smooth_noise(rng, n, 8.0))[:, None]
    look = np.cos(turn) * tangent + np.sin(turn) * inward
    target = eye + 2.5 * look
    target[:, 2] = height - rng.uniform(0.6, 1.0)
    roll = _smooth_noise(rng, n, math.radians(3))
    return eye, target, roll


def _random(layout: RoomLayout, rng: np.random.Generator, n: int):
    theta = rng.uniform(0, 2 * math.pi, n)
    radius = rng.uniform(layout.ring_min, layout.ring_max, n)
    height = rng.uniform(0.7, 2.0, n)
    eye = np.stack([radius * np.cos(theta), radius * np.sin(theta), height], -1)
    centers = layout.object_centers
    target = centers[rng.integers(0, len(centers), n)] + rng.normal(0, 0.25, (n, 3))
    roll = rng.normal(0, math.radians(6), n)
    return eye, target, roll


def sample_trajectory(layout: RoomLayout, kind: str, num_views: int, seed: int) -> torch.Tensor:
    """OpenCV cam_from_world (num_views, 3, 4), float64, for trajectory ``kind`` (one of TRAJECTORIES).

    ``orbit``: an arc of 180-360 degrees around the content. ``forward``: a smooth video-like path along
    the free ring (0.12-0.3 m per frame, circling the room again for long sequences), looking ahead and
    inwards. ``random``: independent views, unordered.
    """
    if kind not in TRAJECTORIES:
        raise ValueError(f"unknown trajectory {kind!r}; choose one of {TRAJECTORIES}")
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    rng = np.random.default_rng([seed, TRAJECTORIES.index(kind), num_views])
    eye, target, roll = {"orbit": _orbit, "forward": _forward, "random": _random}[kind](
        layout, rng, num_views
    )
    return look_at(torch.from_numpy(eye), torch.from_numpy(target), roll_rad=torch.from_numpy(roll))
