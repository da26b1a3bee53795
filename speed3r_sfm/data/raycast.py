"""Analytic ray casting against quads, oriented boxes and spheres, vectorised over rays (any device)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

QUAD, BOX, SPHERE = 0, 1, 2
T_MIN = 1e-4


@dataclass
class Primitives:
    """Scene geometry. Quads are centre ± u ± v (u, v orthogonal half-extent vectors); boxes are
    ``centre + rotation @ local`` with ``|local| <= half_size`` per axis (rotation = world_from_local)."""

    quad_center: torch.Tensor  # (Nq, 3)
    quad_u: torch.Tensor  # (Nq, 3)
    quad_v: torch.Tensor  # (Nq, 3)
    box_center: torch.Tensor  # (Nb, 3)
    box_rotation: torch.Tensor  # (Nb, 3, 3)
    box_half: torch.Tensor  # (Nb, 3)
    sphere_center: torch.Tensor  # (Ns, 3)
    sphere_radius: torch.Tensor  # (Ns,)

    def to(self, device: torch.device | str) -> Primitives:
        return Primitives(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def counts(self) -> tuple[int, int, int]:
        return self.quad_center.shape[0], self.box_center.shape[0], self.sphere_center.shape[0]


@dataclass
class Hits:
    """Nearest hit per ray: distance along the (unit) ray (inf if none), primitive kind and index."""

    t: torch.Tensor  # (R,)
    kind: torch.Tensor  # (R,) int64, -1 for no hit
    index: torch.Tensor  # (R,) int64


def _quad_t(prims: Primitives, o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    u, v, c = prims.quad_u, prims.quad_v, prims.quad_center
    n = torch.linalg.cross(u, v, dim=-1)
    dn = d @ n.T
    on = o @ n.T - (c * n).sum(-1)
    t = -on / torch.where(dn == 0, torch.full_like(dn, 1e-30), dn)
    a = (o @ u.T - (c * u).sum(-1) + t * (d @ u.T)) / u.square().sum(-1)
    b = (o @ v.T - (c * v).sum(-1) + t * (d @ v.T)) / v.square().sum(-1)
    ok = (t > T_MIN) & (a.abs() <= 1) & (b.abs() <= 1)
    return torch.where(ok, t, torch.full_like(t, torch.inf))


def _box_local(prims: Primitives, o: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rot = prims.box_rotation
    o_l = torch.einsum("rk,nkj->rnj", o, rot) - torch.einsum("nk,nkj->nj", prims.box_center, rot)
    d_l = torch.einsum("rk,nkj->rnj", d, rot)
    return o_l, d_l


def _box_t(prims: Primitives, o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    o_l, d_l = _box_local(prims, o, d)
    d_l = torch.where(d_l.abs() < 1e-12, torch.full_like(d_l, 1e-12), d_l)
    inv = 1.0 / d_l
    t1 = (-prims.box_half - o_l) * inv
    t2 = (prims.box_half - o_l) * inv
    t_near = torch.minimum(t1, t2).amax(-1)
    t_far = torch.maximum(t1, t2).amin(-1)
    t = torch.where(t_near > T_MIN, t_near, t_far)
    ok = (t_far >= t_near) & (t > T_MIN)
    return torch.where(ok, t, torch.full_like(t, torch.inf))


def _sphere_t(prims: Primitives, o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    oc = o[:, None, :] - prims.sphere_center[None]
    b = (oc * d[:, None, :]).sum(-1)
    c = oc.square().sum(-1) - prims.sphere_radius.square()
    disc = b.square() - c
    sq = disc.clamp_min(0).sqrt()
    t = torch.where(-b - sq > T_MIN, -b - sq, -b + sq)
    ok = (disc >= 0) & (t > T_MIN)
    return torch.where(ok, t, torch.full_like(t, torch.inf))


def intersect(prims: Primitives, origins: torch.Tensor, dirs: torch.Tensor) -> Hits:
    """Nearest hit of rays ``origins`` (R, 3) + t ``dirs`` (R, 3, unit length), t > T_MIN."""
    best_t = torch.full_like(origins[:, 0], torch.inf)
    kind = torch.full(best_t.shape, -1, dtype=torch.long, device=origins.device)
    index = torch.zeros_like(kind)
    for k, fn in ((QUAD, _quad_t), (BOX, _box_t), (SPHERE, _sphere_t)):
        if prims.counts[k] == 0:
            continue
        t, i = fn(prims, origins, dirs).min(dim=1)
        closer = t < best_t
        best_t = torch.where(closer, t, best_t)
        kind = torch.where(closer, torch.full_like(kind, k), kind)
        index = torch.where(closer, i, index)
    return Hits(best_t, kind, index)


@dataclass
class Surface:
    """Surface attributes at the hits: world point, unit normal facing the ray, local texture coordinates,
    face id (box faces 0..5, else 0) and whether the texture coordinates are planar (z = 0)."""

    point: torch.Tensor  # (R, 3)
    normal: torch.Tensor  # (R, 3)
    tex: torch.Tensor  # (R, 3)
    face: torch.Tensor  # (R,) int64
    planar: torch.Tensor  # (R,) bool


def surface(prims: Primitives, hits: Hits, origins: torch.Tensor, dirs: torch.Tensor) -> Surface:
    """Point, normal and texture coordinates of each ray's hit (rays without a hit get zeros)."""
    r = origins.shape[0]
    t = torch.where(torch.isfinite(hits.t), hits.t, torch.zeros_like(hits.t))
    point = origins + t[:, None] * dirs
    normal = torch.zeros_like(point)
    tex = torch.zeros_like(point)
    face = torch.zeros(r, dtype=torch.long, device=origins.device)
    planar = torch.ones(r, dtype=torch.bool, device=origins.device)

    sel = (hits.kind == QUAD).nonzero()[:, 0]
    if sel.numel():
        i = hits.index[sel]
        u, v = prims.quad_u[i], prims.quad_v[i]
        rel = point[sel] - prims.quad_center[i]
        normal[sel] = torch.nn.functional.normalize(torch.linalg.cross(u, v, dim=-1), dim=-1)
        tex[sel, 0] = (rel * u).sum(-1) / u.norm(dim=-1)
        tex[sel, 1] = (rel * v).sum(-1) / v.norm(dim=-1)

    sel = (hits.kind == BOX).nonzero()[:, 0]
    if sel.numel():
        i = hits.index[sel]
        rot, half = prims.box_rotation[i], prims.box_half[i]
        local = ((point[sel] - prims.box_center[i])[:, None, :] @ rot)[:, 0]
        axis = (local.abs() / half).argmax(-1)
        sign = torch.sign(local.gather(-1, axis[:, None])[:, 0])
        normal[sel] = rot.gather(-1, axis[:, None, None].expand(-1, 3, 1))[..., 0] * sign[:, None]
        ar = torch.arange(sel.numel(), device=origins.device)
        tex[sel, 0] = local[ar, (axis + 1) % 3]
        tex[sel, 1] = local[ar, (axis + 2) % 3]
        face[sel] = 2 * axis + (sign > 0).long()

    sel = (hits.kind == SPHERE).nonzero()[:, 0]
    if sel.numel():
        i = hits.index[sel]
        rel = point[sel] - prims.sphere_center[i]
        normal[sel] = rel / prims.sphere_radius[i, None]
        tex[sel] = rel
        planar[sel] = False

    facing = torch.where((normal * dirs).sum(-1, keepdim=True) > 0, -1.0, 1.0)
    return Surface(point, normal * facing, tex, face, planar)
