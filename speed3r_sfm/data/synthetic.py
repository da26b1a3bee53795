"""Procedural textured rooms with ground truth, rendered by analytic ray casting in torch (CPU or CUDA).

A scene is a room (floor, ceiling, four walls, posters and rugs) with boxes and spheres in its centre and
cabinets in its corners; every surface has its own procedural material (value noise between two colours,
a checker/stripe/grid/ring pattern and scattered coloured spots) and is lit by ambient light plus one or
two point lights with hard shadows. ``make_scene(seed)`` is a pure function of the seed (numpy Generator),
and rendering is a pure function of the scene, so CPU and CUDA renders agree up to float error.

Outputs follow ``speed3r_sfm.geometry`` conventions: RGB (S, 3, H, W) in [0, 1], z-depth (S, H, W) in
metres with 0 where a ray hits nothing (cannot happen inside a closed room), intrinsics (S, 3, 3) with
pixel centres at integer coordinates, OpenCV cam_from_world (S, 3, 4).

Typical use::

    views = render_scene(seed=3, num_views=24, height=392, width=518, trajectory="orbit", device="cuda")
    batch = render_batch([0, 1, 2, 3], num_views=8, height=392, width=518, device="cuda")  # (B, S, ...)
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from speed3r_sfm.geometry import depth_to_world_points, intrinsics_from_fov, invert_pose

from . import procedural_textures as tx
from .raycast import BOX, QUAD, SPHERE, Primitives, intersect, surface
from .trajectories import TRAJECTORIES, RoomLayout, sample_trajectory

__all__ = [
    "HELDOUT_SEED_START",
    "TRAJECTORIES",
    "RenderedViews",
    "SyntheticScene",
    "camera_rays",
    "make_cameras",
    "make_scene",
    "render_batch",
    "render_scene",
    "render_views",
]

HELDOUT_SEED_START = 1_000_000
"""Seeds >= this are reserved for evaluation (benchmarks/accuracy.py); training must draw seeds below it."""


@dataclass
class SyntheticScene:
    """Geometry, materials and lights of one room (tensors on one device, float32).

    ``material[k]`` maps the primitives of kind k (QUAD, BOX, SPHERE) to rows of the material tables.
    """

    seed: int
    primitives: Primitives
    material: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # per quad / box / sphere, int64
    material_params: torch.Tensor  # (M, tx.NUM_PARAMS)
    material_colours: torch.Tensor  # (M, 3, 3) noise colours 0, 1 and pattern colour, linear RGB
    material_salt: torch.Tensor  # (M,) int64
    light_position: torch.Tensor  # (L, 3)
    light_colour: torch.Tensor  # (L, 3)
    light_falloff: float  # distance (m) at which a light's irradiance halves
    ambient: float
    fov_x_deg: float
    layout: RoomLayout

    def to(self, device: torch.device | str) -> SyntheticScene:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, Primitives)):
                value = value.to(device)
            elif f.name == "material":
                value = tuple(m.to(device) for m in value)
            moved[f.name] = value
        return SyntheticScene(**moved)

    @property
    def device(self) -> torch.device:
        return self.material_params.device


@dataclass
class RenderedViews:
    """Rendered views with ground truth; leading dims (S,) or (B, S) (``render_batch``)."""

    images: torch.Tensor  # (..., 3, H, W) RGB in [0, 1]
    depth: torch.Tensor  # (..., H, W) z-depth in metres, 0 = no hit
    intrinsics: torch.Tensor  # (..., 3, 3) integer-centre pixel convention
    cam_from_world: torch.Tensor  # (..., 3, 4) OpenCV

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])  # type: ignore[return-value]

    def world_points(self) -> torch.Tensor:
        """(..., H, W, 3) world point of every pixel (meaningless where depth == 0)."""
        return depth_to_world_points(self.depth, self.intrinsics, self.cam_from_world)

    def to(self, device: torch.device | str) -> RenderedViews:
        return RenderedViews(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class _SceneBuilder:
    """Collects primitives and materials while a scene is generated."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.quads: list[tuple] = []
        self.boxes: list[tuple] = []
        self.spheres: list[tuple] = []
        self.params: list[np.ndarray] = []
        self.colours: list[np.ndarray] = []

    def _random_colour(self, hue: float, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
        rng = self.rng
        return np.array(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(*sat), rng.uniform(*val)))

    def material(self, noise_freq: tuple[float, float], muted: bool) -> int:
        rng = self.rng
        hue = rng.uniform()
        sat = (0.1, 0.45) if muted else (0.35, 0.9)
        c0 = self._random_colour(hue, sat, (0.25, 0.5))
        c1 = self._random_colour(hue + rng.uniform(-0.12, 0.12), sat, (0.65, 0.95))
        if rng.uniform() < 0.5:
            c0, c1 = c1, c0
        c2 = self._random_colour(rng.uniform(), (0.3, 0.9), (0.1, 0.95))
        p = np.zeros(tx.NUM_PARAMS)
        p[tx.NOISE_FREQ] = rng.uniform(*noise_freq)
        p[tx.NOISE_GAIN] = rng.uniform(1.2, 2.5)
        p[tx.PATTERN_KIND] = rng.choice(tx.NUM_PATTERNS, p=[0.2, 0.25, 0.25, 0.15, 0.15])
        p[tx.PATTERN_FREQ] = rng.uniform(2.0, 7.0)
        p[tx.PATTERN_STRENGTH] = rng.uniform(0.35, 0.85)
        p[tx.PATTERN_ANGLE] = rng.uniform(0, math.pi)
        p[tx.SPOT_CELL] = rng.uniform(0.12, 0.45)
        p[tx.SPOT_PROB] = rng.uniform(0.1, 0.6) if rng.uniform() < 0.7 else 0.0
        self.params.append(p)
        self.colours.append(np.stack([c0, c1, c2]))
        return len(self.params) - 1

    def quad(self, center, u, v, muted: bool = False, noise_freq=(1.5, 5.0)) -> None:
        self.quads.append((center, u, v, self.material(noise_freq, muted)))

    def box(self, center, yaw: float, half, noise_freq=(3.0, 9.0)) -> None:
        c, s = math.cos(yaw), math.sin(yaw)
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        self.boxes.append((center, rot, half, self.material(noise_freq, False)))

    def sphere(self, center, radius: float, noise_freq=(4.0, 12.0)) -> None:
        self.spheres.append((center, radius, self.material(noise_freq, False)))

    def primitives(self) -> tuple[Primitives, tuple[torch.Tensor, ...]]:
        def stack(items, i, shape):
            arr = np.array([it[i] for it in items], dtype=np.float64).reshape(len(items), *shape)
            return torch.from_numpy(arr).float()

        def mats(items):
            return torch.tensor([it[-1] for it in items], dtype=torch.long)

        prims = Primitives(
            quad_center=stack(self.quads, 0, (3,)),
            quad_u=stack(self.quads, 1, (3,)),
            quad_v=stack(self.quads, 2, (3,)),
            box_center=stack(self.boxes, 0, (3,)),
            box_rotation=stack(self.boxes, 1, (3, 3)),
            box_half=stack(self.boxes, 2, (3,)),
            sphere_center=stack(self.spheres, 0, (3,)),
            sphere_radius=stack(self.spheres, 1, ()),
        )
        return prims, (mats(self.quads), mats(self.boxes), mats(self.spheres))


def _add_room(b: _SceneBuilder, sx: float, sy: float, sz: float) -> None:
    """Floor, ceiling, walls (slightly oversized so corners close), posters and rugs."""
    rng, e = b.rng, 0.02
    b.quad((0, 0, 0), (sx / 2 + e, 0, 0), (0, sy / 2 + e, 0), muted=True)
    b.quad((0, 0, sz), (sx / 2 + e, 0, 0), (0, sy / 2 + e, 0), muted=True)
    walls = [  # (centre, half-width vector along the wall, inward normal)
        ((sx / 2, 0, sz / 2), (0, sy / 2 + e, 0), (-1, 0, 0)),
        ((-sx / 2, 0, sz / 2), (0, sy / 2 + e, 0), (1, 0, 0)),
        ((0, sy / 2, sz / 2), (sx / 2 + e, 0, 0), (0, -1, 0)),
        ((0, -sy / 2, sz / 2), (sx / 2 + e, 0, 0), (0, 1, 0)),
    ]
    for centre, along, normal in walls:
        b.quad(centre, along, (0, 0, sz / 2 + e), muted=True)
        along = np.array(along)
        half_len = np.linalg.norm(along) - 0.3
        axis = along / np.linalg.norm(along)
        for k in range(rng.integers(1, 4)):
            w, h = rng.uniform(0.25, 0.8), rng.uniform(0.2, 0.6)
            pos = np.array(centre) + axis * rng.uniform(-half_len + w, half_len - w)
            pos[2] = rng.uniform(0.5 + h, sz - 0.3 - h)
            pos = pos + np.array(normal) * 0.01 * (k + 1)
            b.quad(pos, axis * w, (0, 0, h), noise_freq=(3.0, 10.0))
    for k in range(rng.integers(1, 3)):
        pos = (rng.uniform(-sx / 4, sx / 4), rng.uniform(-sy / 4, sy / 4), 0.005 * (k + 1))
        yaw = rng.uniform(0, math.pi)
        u = np.array([math.cos(yaw), math.sin(yaw), 0.0]) * rng.uniform(0.6, 1.4)
        v = np.array([-math.sin(yaw), math.cos(yaw), 0.0]) * rng.uniform(0.4, 1.0)
        b.quad(pos, u, v, noise_freq=(2.0, 8.0))


def _add_objects(b: _SceneBuilder, content_radius: float) -> list[np.ndarray]:
    """Boxes (some stacked) and spheres within ``content_radius``; returns their centres."""
    rng = b.rng
    footprints: list[tuple[float, float, float]] = []  # (x, y, radius) of floor-standing objects
    tops: list[tuple[np.ndarray, float]] = []  # (top centre, usable radius) of boxes
    centres: list[np.ndarray] = []

    def place(radius: float) -> tuple[float, float] | None:
        for _ in range(30):
            r = math.sqrt(rng.uniform()) * (content_radius - radius)
            a = rng.uniform(0, 2 * math.pi)
            x, y = r * math.cos(a), r * math.sin(a)
            if all(math.hypot(x - fx, y - fy) > radius + fr + 0.05 for fx, fy, fr in footprints):
                return x, y
        return None

    for _ in range(rng.integers(3, 7)):
        half = np.array([rng.uniform(0.15, 0.5), rng.uniform(0.15, 0.5), rng.uniform(0.1, 0.55)])
        stack_on = tops[rng.integers(len(tops))] if tops and rng.uniform() < 0.3 else None
        if stack_on is not None and np.hypot(*half[:2]) < stack_on[1]:
            center = stack_on[0] + np.array([0.0, 0.0, half[2]])
        else:
            radius = float(np.hypot(*half[:2]))
            xy = place(radius)
            if xy is None:
                continue
            footprints.append((*xy, radius))
            center = np.array([xy[0], xy[1], half[2]])
        b.box(center, rng.uniform(0, math.pi), half)
        tops.append((center + np.array([0.0, 0.0, half[2]]), float(min(half[:2]))))
        centres.append(center)
    for _ in range(rng.integers(1, 5)):
        radius = rng.uniform(0.12, 0.4)
        if tops and rng.uniform() < 0.35:
            top, usable = tops[rng.integers(len(tops))]
            if usable < 0.5 * radius:
                continue
            center = top + np.array([0.0, 0.0, radius])
        else:
            xy = place(radius)
            if xy is None:
                continue
            footprints.append((*xy, radius))
            center = np.array([xy[0], xy[1], radius])
        b.sphere(center, radius)
        centres.append(center)
    return centres


def _add_corner_cabinets(b: _SceneBuilder, sx: float, sy: float, keep_out: float) -> None:
    """Axis-aligned cabinets in room corners, outside the camera ring (``keep_out`` from the centre)."""
    rng = b.rng
    for cx, cy in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        if rng.uniform() < 0.4:
            continue
        half = np.array([rng.uniform(0.2, 0.5), rng.uniform(0.2, 0.5), rng.uniform(0.3, 1.0)])
        x, y = cx * (sx / 2 - half[0] - 0.03), cy * (sy / 2 - half[1] - 0.03)
        nearest = math.hypot(max(abs(x) - half[0], 0.0), max(abs(y) - half[1], 0.0))
        if nearest > keep_out:
            b.box(np.array([x, y, half[2]]), 0.0, half)


def make_scene(seed: int) -> SyntheticScene:
    """The procedural room of ``seed`` (on CPU; move it with ``scene.to(device)``)."""
    rng = np.random.default_rng(seed)
    sx, sy, sz = rng.uniform(5.0, 9.0), rng.uniform(5.0, 9.0), rng.uniform(2.6, 3.4)
    half = min(sx, sy) / 2
    content_radius = 0.45 * half
    ring_min, ring_max = content_radius + 0.5, half - 0.5
    b = _SceneBuilder(rng)
    _add_room(b, sx, sy, sz)
    centres = _add_objects(b, content_radius)
    _add_corner_cabinets(b, sx, sy, ring_max + 0.3)
    prims, material = b.primitives()

    num_lights = int(rng.integers(1, 3))
    light_xy = rng.uniform(-0.6, 0.6, (num_lights, 2)) * half
    light_position = np.concatenate([light_xy, np.full((num_lights, 1), sz - 0.25)], axis=1)
    tint = 1.0 + rng.uniform(-0.15, 0.15, (num_lights, 3))
    light_colour = tint * rng.uniform(1.0, 1.6) / num_lights
    return SyntheticScene(
        seed=seed,
        primitives=prims,
        material=material,
        material_params=torch.from_numpy(np.stack(b.params)).float(),
        material_colours=torch.from_numpy(np.stack(b.colours)).float(),
        material_salt=torch.from_numpy(rng.integers(0, 2**31, len(b.params))).long(),
        light_position=torch.from_numpy(light_position).float(),
        light_colour=torch.from_numpy(light_colour).float(),
        light_falloff=float(rng.uniform(2.5, 4.0)),
        ambient=float(rng.uniform(0.2, 0.35)),
        fov_x_deg=float(rng.uniform(55.0, 75.0)),
        layout=RoomLayout(
            size=(sx, sy, sz),
            content_radius=content_radius,
            ring_min=ring_min,
            ring_max=ring_max,
            object_centers=np.stack(centres) if centres else np.array([[0.0, 0.0, 0.5]]),
        ),
    )


def make_cameras(
    scene: SyntheticScene,
    num_views: int,
    height: int,
    width: int,
    trajectory: str = "orbit",
    seed: int | None = None,
    fov_x_deg: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intrinsics (S, 3, 3) and OpenCV cam_from_world (S, 3, 4), float32 on CPU, for a trajectory of
    the scene (``seed`` defaults to the scene's). All views share the scene's horizontal field of view, or
    ``fov_x_deg`` if given."""
    pose = sample_trajectory(scene.layout, trajectory, num_views, scene.seed if seed is None else seed)
    fov = scene.fov_x_deg if fov_x_deg is None else fov_x_deg
    k = intrinsics_from_fov(fov, height, width).expand(num_views, 3, 3).clone()
    return k, pose.float()


def _material_rows(scene: SyntheticScene, kind: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    mat = torch.zeros_like(index)
    for k in (QUAD, BOX, SPHERE):
        sel = kind == k
        if sel.any():
            mat[sel] = scene.material[k][index[sel]]
    return mat


def _shade(
    scene: SyntheticScene, origins: torch.Tensor, dirs: torch.Tensor, shadows: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear-light colour (R, 3) and hit distance (R,) of unit rays."""
    hits = intersect(scene.primitives, origins, dirs)
    surf = surface(scene.primitives, hits, origins, dirs)
    mat = _material_rows(scene, hits.kind, hits.index)
    salt = scene.material_salt[mat] * 8 + surf.face
    albedo = tx.surface_albedo(
        surf.tex, surf.planar, salt, scene.material_params[mat], scene.material_colours[mat]
    )
    light = torch.full_like(albedo, scene.ambient)
    for pos, colour in zip(scene.light_position, scene.light_colour, strict=True):
        to_light = pos - surf.point
        dist = to_light.norm(dim=-1)
        ldir = to_light / dist[:, None]
        lambert = (surf.normal * ldir).sum(-1).clamp_min(0.0)
        irradiance = lambert / (1.0 + (dist / scene.light_falloff).square())
        if shadows:
            lit = lambert > 0
            blocked = torch.zeros_like(lit)
            idx = lit.nonzero()[:, 0]
            if idx.numel():
                occ = intersect(scene.primitives, surf.point[idx] + 1e-3 * surf.normal[idx], ldir[idx])
                blocked[idx] = occ.t < dist[idx] - 2e-3
            irradiance = torch.where(blocked, 0.15 * irradiance, irradiance)
        light = light + irradiance[:, None] * colour
    colour = albedo * light
    colour = torch.where(torch.isfinite(hits.t)[:, None], colour, torch.zeros_like(colour))
    return colour, hits.t


def camera_rays(
    intrinsics: torch.Tensor,
    cam_from_world: torch.Tensor,
    height: int,
    width: int,
    offset: tuple[float, float] = (0.0, 0.0),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rays through the pixels of S views, pixel (row i, col j) sampled at (u, v) = (j, i) + ``offset``.

    Returns world origins and unit directions (S*H*W, 3), and each ray's camera-frame z per unit length
    (so z-depth = hit distance * that).
    """
    dev = intrinsics.device
    v, u = torch.meshgrid(
        torch.arange(height, device=dev, dtype=torch.float32) + offset[1],
        torch.arange(width, device=dev, dtype=torch.float32) + offset[0],
        indexing="ij",
    )
    pix = torch.stack([u, v, torch.ones_like(u)], -1).reshape(1, -1, 3)
    d_cam = pix @ torch.linalg.inv(intrinsics).transpose(-1, -2)  # (S, HW, 3), z = 1
    norm = d_cam.norm(dim=-1, keepdim=True)
    world_from_cam = invert_pose(cam_from_world)
    d_world = (d_cam / norm) @ world_from_cam[:, :, :3].transpose(-1, -2)
    origins = world_from_cam[:, None, :, 3].expand_as(d_world)
    return origins.reshape(-1, 3), d_world.reshape(-1, 3), (1.0 / norm).reshape(-1)


def _default_chunk(device: torch.device) -> int:
    return 1 << 20 if device.type == "cuda" else 1 << 16


@torch.no_grad()
def render_views(
    scene: SyntheticScene,
    intrinsics: torch.Tensor,
    cam_from_world: torch.Tensor,
    height: int,
    width: int,
    device: torch.device | str | None = None,
    supersample: int = 1,
    shadows: bool = True,
    gamma: float = 2.2,
    chunk_size: int | None = None,
) -> RenderedViews:
    """Render S views of ``scene`` on ``device`` (default: the scene's).

    ``supersample`` = n averages n x n sub-pixel samples for the colour (anti-aliasing); depth is always
    the z-depth of the ray through the pixel centre. Colours are linear light encoded with ``1/gamma``.
    """
    device = torch.device(device) if device is not None else scene.device
    if scene.device != device:
        scene = scene.to(device)
    intrinsics = intrinsics.to(device=device, dtype=torch.float32)
    cam_from_world = cam_from_world.to(device=device, dtype=torch.float32)
    s = intrinsics.shape[0]
    chunk = chunk_size or _default_chunk(device)

    def run(offset, want_colour):
        origins, dirs, z_per_t = camera_rays(intrinsics, cam_from_world, height, width, offset)
        colours, depths = [], []
        for start in range(0, origins.shape[0], chunk):
            sl = slice(start, start + chunk)
            if want_colour:
                c, t = _shade(scene, origins[sl], dirs[sl], shadows)
                colours.append(c)
            else:
                t = intersect(scene.primitives, origins[sl], dirs[sl]).t
            depths.append(torch.where(torch.isfinite(t), t * z_per_t[sl], torch.zeros_like(t)))
        colour = torch.cat(colours) if want_colour else None
        return colour, torch.cat(depths).reshape(s, height, width)

    if supersample == 1:
        colour, depth = run((0.0, 0.0), True)
    else:
        _, depth = run((0.0, 0.0), False)
        offsets = [(k + 0.5) / supersample - 0.5 for k in range(supersample)]
        colour = sum(run((ox, oy), True)[0] for oy in offsets for ox in offsets) / supersample**2
    rgb = colour.clamp(0.0, 1.0).pow(1.0 / gamma).reshape(s, height, width, 3).permute(0, 3, 1, 2)
    return RenderedViews(rgb.contiguous(), depth, intrinsics, cam_from_world)


def render_scene(
    seed: int,
    num_views: int,
    height: int,
    width: int,
    trajectory: str = "orbit",
    device: torch.device | str = "cpu",
    fov_x_deg: float | None = None,
    **render_kwargs,
) -> RenderedViews:
    """``make_scene(seed)`` rendered along a ``trajectory`` (one of ``TRAJECTORIES``) of ``num_views``, with
    the scene's field of view or ``fov_x_deg``."""
    scene = make_scene(seed)
    k, pose = make_cameras(scene, num_views, height, width, trajectory, fov_x_deg=fov_x_deg)
    return render_views(scene, k, pose, height, width, device=device, **render_kwargs)


def render_batch(
    seeds: Sequence[int],
    num_views: int,
    height: int,
    width: int,
    trajectory: str | Sequence[str] = "random",
    device: torch.device | str = "cpu",
    **render_kwargs,
) -> RenderedViews:
    """A training batch: one scene per seed, tensors shaped (B, S, ...) on ``device``.

    ``trajectory`` is one kind for all scenes or one per scene.
    """
    kinds = [trajectory] * len(seeds) if isinstance(trajectory, str) else list(trajectory)
    if len(kinds) != len(seeds):
        raise ValueError(f"got {len(kinds)} trajectories for {len(seeds)} seeds")
    views = [
        render_scene(s, num_views, height, width, k, device, **render_kwargs)
        for s, k in zip(seeds, kinds, strict=True)
    ]
    return RenderedViews(*(torch.stack([getattr(v, f.name) for v in views]) for f in fields(RenderedViews)))
