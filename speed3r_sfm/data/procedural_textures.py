"""Procedural surface textures for the synthetic renderer, evaluated per ray hit in torch.

Every function is device-agnostic and deterministic: lattice values come from an integer hash (int64 ops
wrap identically on CPU and CUDA), never from a random number generator. Textures are functions of
surface-local coordinates, so they stick to their surface whichever camera looks at it.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF

# Columns of the per-material parameter table (SyntheticScene.material_params).
NOISE_FREQ = 0  # value-noise base frequency (1/m)
NOISE_GAIN = 1  # contrast of the two-colour noise blend (>= 1 sharpens it)
PATTERN_KIND = 2  # 0 none, 1 checker, 2 stripes, 3 grid, 4 rings
PATTERN_FREQ = 3  # pattern frequency (1/m)
PATTERN_STRENGTH = 4  # 0..1 blend of the pattern colour
PATTERN_ANGLE = 5  # stripe direction in the local xy plane (rad)
SPOT_CELL = 6  # size of the spot lattice cells (m)
SPOT_PROB = 7  # probability that a cell holds a spot
NUM_PARAMS = 8
NUM_PATTERNS = 5


_PRIMES = (0x8DA6B343, 0xD8163841, 0xCB1AB31F)


def _mix(h: torch.Tensor) -> torch.Tensor:
    """32-bit integer finaliser ("lowbias32"); input and output in [0, 2^32)."""
    h = ((h ^ (h >> 16)) * 0x7FEB352D) & _M32
    h = ((h ^ (h >> 15)) * 0x846CA68B) & _M32
    return h ^ (h >> 16)


def _lattice_terms(i: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis hash terms of lattice coordinates i and i + 1 (int64, any sign)."""
    return i * _PRIMES[axis], (i + 1) * _PRIMES[axis]


def hash_cells(salt: torch.Tensor, ix: torch.Tensor, iy: torch.Tensor, iz: torch.Tensor) -> torch.Tensor:
    """Hash of integer lattice cells (int64 tensors, broadcastable), uniform in [0, 2^32)."""
    return _mix((ix * _PRIMES[0] ^ iy * _PRIMES[1] ^ iz * _PRIMES[2] ^ salt) & _M32)


def _unit(h: torch.Tensor, k: int = 0) -> torch.Tensor:
    """A float in [0, 1) from hash ``h``; different ``k`` give independent values."""
    if k:
        h = _mix((h + k * 0x9E3779B9) & _M32)
    return (h & 0xFFFFFF).to(torch.float32) / float(1 << 24)


def value_noise(p: torch.Tensor, salt: torch.Tensor) -> torch.Tensor:
    """Trilinearly interpolated lattice noise in [0, 1] at points ``p`` (R, 3); ``salt`` (R,) int64."""
    cell = torch.floor(p)
    f = p - cell
    f = f * f * (3.0 - 2.0 * f)
    i = cell.to(torch.int64)
    tx, ty, tz = (_lattice_terms(i[:, a], a) for a in range(3))
    salt = _mix(salt & _M32)
    out = torch.zeros_like(p[:, 0])
    for dz in (0, 1):
        wz = f[:, 2] if dz else 1.0 - f[:, 2]
        hz = tz[dz] ^ salt
        for dy in (0, 1):
            wzy = wz * (f[:, 1] if dy else 1.0 - f[:, 1])
            hzy = hz ^ ty[dy]
            for dx in (0, 1):
                wx = f[:, 0] if dx else 1.0 - f[:, 0]
                out = out + wzy * wx * _unit(_mix((hzy ^ tx[dx]) & _M32))
    return out


def fbm(p: torch.Tensor, salt: torch.Tensor, octaves: int = 4) -> torch.Tensor:
    """Fractal sum of ``octaves`` value-noise layers, normalised to [0, 1]."""
    total = torch.zeros_like(p[:, 0])
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        total = total + amp * value_noise(p * (2.0**o) + 17.0 * o, salt + 7919 * o)
        norm += amp
        amp *= 0.5
    return total / norm


def _patterns(p: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Binary-ish pattern masks (R,) for each material's pattern kind."""
    q = p * params[:, PATTERN_FREQ, None]
    kind = params[:, PATTERN_KIND].round().long()
    checker = (torch.floor(q).sum(-1).remainder(2.0) > 0.5).float()
    angle = params[:, PATTERN_ANGLE]
    along = q[:, 0] * torch.cos(angle) + q[:, 1] * torch.sin(angle)
    stripes = (torch.frac(along - torch.floor(along)) < 0.5).float()
    fq = q[:, :2] - torch.floor(q[:, :2])
    grid = ((fq < 0.12) | (fq > 0.88)).any(-1).float()
    radius = torch.linalg.vector_norm(q[:, :2], dim=-1)
    rings = ((radius - torch.floor(radius)) < 0.45).float()
    table = torch.stack([torch.zeros_like(checker), checker, stripes, grid, rings], dim=-1)
    return table.gather(-1, kind.clamp(0, NUM_PATTERNS - 1)[:, None])[:, 0]


def _spots(p: torch.Tensor, planar: torch.Tensor, salt: torch.Tensor, params: torch.Tensor):
    """Random coloured discs on a jittered lattice: (inside mask (R,), colour (R, 3))."""
    cell_size = params[:, SPOT_CELL, None]
    q = p / cell_size
    cell = torch.floor(q)
    i = cell.to(torch.int64)
    h = hash_cells(salt + 104729, i[:, 0], i[:, 1], i[:, 2])
    radius = 0.15 + 0.25 * _unit(h, 1)
    centre = torch.stack([radius + (1 - 2 * radius) * _unit(h, k) for k in (2, 3, 4)], dim=-1)
    offset = q - cell - centre
    offset[:, 2] = torch.where(planar, torch.zeros_like(offset[:, 2]), offset[:, 2])
    inside = (offset.square().sum(-1) < radius.square()) & (_unit(h, 5) < params[:, SPOT_PROB])
    colour = torch.stack([_unit(h, k) for k in (6, 7, 8)], dim=-1)
    return inside, 0.1 + 0.85 * colour


def surface_albedo(
    tex: torch.Tensor, planar: torch.Tensor, salt: torch.Tensor, params: torch.Tensor, colours: torch.Tensor
) -> torch.Tensor:
    """Albedo (R, 3) in [0, 1] at surface-local coordinates ``tex`` (R, 3).

    ``planar`` (R,) marks hits on flat faces, whose coordinates lie in the local xy plane (z = 0);
    ``salt`` (R,) int64 makes each material and face distinct; ``params`` (R, NUM_PARAMS) and
    ``colours`` (R, 3, 3) are the hit materials' rows.
    """
    n = fbm(tex * params[:, NOISE_FREQ, None], salt)
    n = ((n - 0.5) * params[:, NOISE_GAIN] + 0.5).clamp(0.0, 1.0)[:, None]
    albedo = colours[:, 0] * (1 - n) + colours[:, 1] * n
    pattern = (_patterns(tex, params) * params[:, PATTERN_STRENGTH])[:, None]
    albedo = albedo * (1 - pattern) + colours[:, 2] * pattern
    inside, spot_colour = _spots(tex, planar, salt, params)
    return torch.where(inside[:, None], spot_colour, albedo)
