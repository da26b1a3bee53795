"""Photometric refinement of predicted correspondences: coarse-to-fine NCC search, sub-pixel peak.

For a keypoint ``x`` of a source image, a predicted location ``y`` in a target image and the predicted
local affine map ``A`` (source pixels -> target pixels, from depth and poses), the target is sampled on
the grid ``y + A (s + u)``, i.e. warped into the source frame, and the source patch (u in a P x P grid
around ``x``) is correlated with it over offsets ``s``. The search starts on the coarsest level of a
Gaussian pyramid that makes the search radius at most ``level_radius`` pixels, and each finer level
searches ``middle_radius`` (level 0: ``fine_radius``) pixels around the doubled previous offset. At level 0
a separable parabola through the NCC peak gives the sub-pixel offset.

Everything is batched over matches, whatever their view pair: the pyramids of all views are packed level by
level into one atlas image (:class:`PyramidStack`), so that one ``grid_sample`` call per level samples the
patches of every match (coordinates clamped to each image's own border, as ``padding_mode="border"`` does
for a single image), and one grouped convolution correlates them. The search runs on the stack's device:
:meth:`PyramidStack.from_pyramids` of pyramids on a CUDA device refines there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d

from .checks import require_at_least, require_between


@dataclass
class RefineOptions:
    """Photometric refinement settings (pixels of the work images unless stated).

    Attributes:
        patch_size: side (pixels, odd) of the compared patches, at every pyramid level.
        level_radius: search radius (pixels) on the coarsest pyramid level; it sets how many levels a
            search radius needs.
        fine_radius: search radius (pixels) at level 0 (full resolution) around the offset found on the
            level above.
        middle_radius: search radius (pixels) on the levels between the coarsest and level 0; larger copes
            better with smooth (upscaled, or very large) images, at more time.
        recentre: on the finer levels, times a peak found on the search border is searched again around
            itself (0: never).
        min_ncc: least normalised cross-correlation (-1 to 1) of a match at level 0; higher keeps fewer,
            surer matches.
        min_margin: on the coarsest level, least gap between the best correlation and the second-highest
            local maximum (drops ambiguous peaks; 0: off).
        min_texture: least standard deviation of the source patch (gray values 0-1); flatter patches are
            not matched.
        chunk: matches refined per batch; more takes fewer, larger batches and more memory.
    """

    patch_size: int = 11  # odd, at every pyramid level
    level_radius: int = 6  # integer search radius on the coarsest level
    # search radius at level 0, and on the levels between the coarsest and level 0 (their offset, doubled
    # from the level above, can miss by more than 2 pixels on smooth images: upscaled, or photos much
    # larger than the model's input, whose pyramids have more levels)
    fine_radius: int = 2
    middle_radius: int = 3
    recentre: int = 0  # finer levels: search again around a peak found on the search border (times)
    min_ncc: float = 0.8  # at level 0
    min_margin: float = 0.1  # coarsest level: best NCC minus the second-highest local maximum
    min_texture: float = 0.01  # minimum std of the (0-1 gray) source patch
    chunk: int = 16384  # matches per batch

    def __post_init__(self) -> None:
        require_at_least(self, patch_size=3, level_radius=1, fine_radius=1, middle_radius=1, recentre=0)
        require_at_least(self, min_margin=0.0, min_texture=0.0, chunk=1)
        require_between(self, min_ncc=(-1.0, 1.0))
        if self.patch_size % 2 == 0:
            raise ValueError(f"RefineOptions.patch_size must be odd, got {self.patch_size}")


WINDOW_BUDGET = 1 << 21  # values of the coarsest level's search windows per batch


def build_pyramid(gray: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[(1, 1, h, w), (1, 1, h/2, w/2), ...]: ``levels + 1`` levels, each blurred (σ = 1) and 2x2-averaged
    from the previous one. Level-l pixel coordinates are ``(x + 0.5) / 2^l - 0.5`` (integer centres)."""
    pyramid = [gray[None, None].float()]
    for _ in range(levels):
        previous = pyramid[-1]
        if min(previous.shape[-2:]) < 8:
            break
        blurred = gaussian_blur2d(previous, (5, 5), (1.0, 1.0), border_type="replicate")
        pyramid.append(F.avg_pool2d(blurred, 2))
    return pyramid


def num_levels(radius: float, level_radius: int) -> int:
    """Pyramid levels needed so that ``radius`` (level-0 pixels) is at most ``level_radius`` on top."""
    return max(0, math.ceil(math.log2(max(radius, 1.0) / level_radius)))


def _warped_grid(centre: torch.Tensor, affine: torch.Tensor, radius: int) -> torch.Tensor:
    """(M, n, n, 2) float32 points ``centre + affine @ v`` for the integer offsets v of an n = 2 radius + 1
    grid (row-major over v_y then v_x); ``centre`` (M, 2), ``affine`` (M, 2, 2)."""
    m, n = centre.shape[0], 2 * radius + 1
    r = torch.arange(-radius, radius + 1, dtype=affine.dtype, device=affine.device)
    out = torch.empty(m, n, n, 2, device=affine.device)
    for k in range(2):  # one coordinate plane at a time: contiguous broadcasts
        along_x = (centre[:, k, None] + affine[:, k, 0, None] * r).float()  # (M, n)
        along_y = (affine[:, k, 1, None] * r).float()
        torch.add(along_y[:, :, None], along_x[:, None, :], out=out[..., k])
    return out


def _grid_sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear samples (M, n, n) of ``image`` (1, 1, H, W) at normalised points ``grid`` (M, n, n, 2)
    (``align_corners=True``, border padding). The CPU kernel parallelises over the batch only, so the
    points are split into one batch per thread, over the (expanded, not copied) image."""
    m, n = grid.shape[:2]
    if image.device.type != "cpu":
        points = grid.reshape(1, m * n, n, 2)
        samples = F.grid_sample(image, points, mode="bilinear", padding_mode="border", align_corners=True)
        return samples.reshape(m, n, n)
    batches = max(1, min(torch.get_num_threads(), m))
    whole = m - m % batches
    parts = []
    for start, count, split in ((0, whole, batches), (whole, m - whole, 1)):
        if count or not parts:
            points = grid[start : start + count].reshape(split, count // split * n, n, 2)
            source = image.expand(split, *image.shape[1:])
            parts.append(
                F.grid_sample(source, points, mode="bilinear", padding_mode="border", align_corners=True)
            )
    samples = parts[0] if len(parts) == 1 else torch.cat([p.reshape(-1) for p in parts])
    return samples.reshape(m, n, n)


@dataclass
class ImageAtlas:
    """Images of several views (one pyramid level) packed into one image, each with a one-pixel border
    that repeats its edge, so that one ``grid_sample`` call samples any of them."""

    image: torch.Tensor  # (1, 1, H, W) float32
    origin: torch.Tensor  # (V, 2) float64 atlas pixel (x, y) of each image's top-left pixel
    size: torch.Tensor  # (V, 2) float32 (width, height) of each image; 1 x 1 for a missing level
    # (all three on the device of the images)

    @classmethod
    def pack(cls, images: list[torch.Tensor | None]) -> ImageAtlas:
        """Pack images (1, 1, h_v, w_v) (None: the view has no such level; at least one is not) into a grid
        of equal cells, on the images' device."""
        sizes = [(1, 1) if im is None else (im.shape[-1], im.shape[-2]) for im in images]
        device = next(im.device for im in images if im is not None)
        size = torch.tensor(sizes, dtype=torch.float32, device=device)
        if len(images) == 1:  # nothing to pack
            return cls(images[0].float(), torch.zeros(1, 2, dtype=torch.float64, device=device), size)
        cell_w = max(w for w, _ in sizes) + 2
        cell_h = max(h for _, h in sizes) + 2
        columns = max(1, math.ceil(math.sqrt(len(images) * cell_h / cell_w)))
        rows = math.ceil(len(images) / columns)
        atlas = torch.zeros(1, 1, rows * cell_h, columns * cell_w, device=device)
        origin = torch.zeros(len(images), 2, dtype=torch.float64)
        for v, im in enumerate(images):
            row, column = divmod(v, columns)
            x, y = column * cell_w, row * cell_h
            origin[v, 0], origin[v, 1] = x + 1, y + 1
            if im is not None:
                w, h = sizes[v]
                atlas[..., y : y + h + 2, x : x + w + 2] = F.pad(im.float(), (1, 1, 1, 1), mode="replicate")
        return cls(atlas, origin.to(device), size)

    def sample(
        self, view: torch.Tensor, centre: torch.Tensor, affine: torch.Tensor, radius: int
    ) -> torch.Tensor:
        """Bilinear samples (M, 2 radius + 1, 2 radius + 1) of images ``view`` (M,) at ``centre + affine @ v``
        for the integer offsets v of a (2 radius + 1)^2 grid; border values repeat outside each image."""
        m = centre.shape[0]
        h, w = self.image.shape[-2:]
        scale = torch.tensor(
            [2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], dtype=torch.float64, device=centre.device
        )
        origin = self.origin[view]
        # grid_sample's coordinates: [-1, 1] over the atlas (align_corners=True)
        grid = _warped_grid((centre + origin) * scale - 1.0, affine * scale[None, :, None], radius)
        # clamp to each image's own border (outside its one-pixel margin lies another image)
        border = (~self.inside(view, centre, affine, radius)).nonzero()[:, 0]
        if 4 * border.numel() > m:  # many windows cross a border: clamp all (one pass)
            low = (origin * scale - 1.0).float()[:, None, None, :]
            high = ((origin + self.size[view] - 1.0) * scale - 1.0).float()[:, None, None, :]
            torch.clamp(grid, low, high, out=grid)
        elif border.numel():
            low = (origin[border] * scale - 1.0).float()[:, None, None, :]
            high = ((origin[border] + self.size[view[border]] - 1.0) * scale - 1.0).float()[:, None, None, :]
            grid[border] = torch.clamp(grid[border], low, high)
        return _grid_sample(self.image, grid)

    def inside(
        self, view: torch.Tensor, centre: torch.Tensor, affine: torch.Tensor, radius: float
    ) -> torch.Tensor:
        """(M,) whether the parallelograms ``centre + affine @ [-radius, radius]^2`` lie inside images
        ``view``."""
        extent = radius * affine.abs().sum(dim=-1)  # (M, 2) half-extent along x and y
        high = self.size[view].double() - 1.0
        return ((centre - extent) >= 0).all(dim=1) & ((centre + extent) <= high).all(dim=1)


@dataclass
class PyramidStack:
    """Pyramids of several views (:func:`build_pyramid`), level by level packed into :class:`ImageAtlas`."""

    levels: list[ImageAtlas]
    depth: torch.Tensor  # (V,) int64 coarsest level of each view's pyramid

    @classmethod
    def from_pyramids(cls, pyramids: list[list[torch.Tensor]]) -> PyramidStack:
        """The stack of one pyramid per view (they may differ in size and depth), on their device."""
        count = max(len(p) for p in pyramids)
        levels = [ImageAtlas.pack([p[k] if k < len(p) else None for p in pyramids]) for k in range(count)]
        depth = torch.tensor([len(p) - 1 for p in pyramids], device=pyramids[0][0].device)
        return cls(levels, depth)

    @property
    def device(self) -> torch.device:
        return self.levels[0].image.device


def _box_sum(x: torch.Tensor, size: int) -> torch.Tensor:
    """Sums of ``x`` (M, n, n) over every size x size box -> (M, n - size + 1, n - size + 1): running sums
    along the rows, differenced, then the same along the columns."""
    m, n, _ = x.shape
    k = n - size + 1
    c = x.cumsum(1)
    rows = torch.empty(m, k, n, dtype=x.dtype, device=x.device)
    rows[:, 0] = c[:, size - 1]
    torch.sub(c[:, size:], c[:, :-size], out=rows[:, 1:])
    c = rows.cumsum(2)
    out = torch.empty(m, k, k, dtype=x.dtype, device=x.device)
    out[:, :, 0] = c[:, :, size - 1]
    torch.sub(c[:, :, size:], c[:, :, :-size], out=out[:, :, 1:])
    return out


def ncc_map(patch: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """NCC of patches (M, P, P) at every placement inside windows (M, P + 2r, P + 2r) -> (M, 2r+1, 2r+1)."""
    m, p, _ = patch.shape
    centred = patch - patch.mean(dim=(1, 2), keepdim=True)
    centred = centred / centred.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
    numerator = F.conv2d(window[None], centred[:, None], groups=m)[0]
    shifted = window - window.mean(dim=(1, 2), keepdim=True)  # better conditioned sums of squares
    total = _box_sum(shifted, p)
    variance = _box_sum(shifted.square_(), p).sub_(total.square_().div_(p * p)).clamp_min_(1e-12)
    return numerator.div_(variance.sqrt_())


def _scores(
    image: ImageAtlas,
    view: torch.Tensor,
    patch: torch.Tensor,
    y_l: torch.Tensor,
    centre: torch.Tensor,
    affine: torch.Tensor,
    half: int,
    r: int,
) -> torch.Tensor:
    """NCC (M, 2r+1, 2r+1) of source patches against target images ``view`` warped into the source frame
    around ``y_l + affine @ centre``; placements whose patch leaves the image score -2."""
    y_c = y_l + (centre[:, None, :] * affine).sum(-1)
    window = image.sample(view, y_c, affine, half + r)
    scores = ncc_map(patch, window)
    scores = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -2.0))
    # placements whose patch may leave the image (the others are inside whatever the offset)
    edge = (~image.inside(view, y_c, affine, half + r)).nonzero()[:, 0]
    if 4 * edge.numel() > scores.shape[0]:  # many: check every match (no gather / scatter)
        scores.masked_fill_(~_placements_inside(image.size[view], y_c, affine, half, r), -2.0)
    elif edge.numel():
        inside = _placements_inside(image.size[view[edge]], y_c[edge], affine[edge], half, r)
        scores[edge] = scores[edge].masked_fill_(~inside, -2.0)
    return scores


def _placements_inside(
    size: torch.Tensor, centre: torch.Tensor, affine: torch.Tensor, half: int, r: int
) -> torch.Tensor:
    """(M, 2r+1, 2r+1) whether the patch (half-size ``half``) placed at ``centre + affine @ v`` (the
    points of :func:`_warped_grid`) lies inside images of ``size`` (M, 2) (width, height)."""
    m, n = centre.shape[0], 2 * r + 1
    steps = torch.arange(-r, r + 1, dtype=affine.dtype, device=affine.device)
    extent = (half * affine.abs().sum(dim=-1)).float()  # (M, 2)
    high = size - 1 - extent
    inside = torch.ones(m, n, n, dtype=torch.bool, device=centre.device)
    for k in range(2):  # one coordinate at a time, as _warped_grid computes it
        along_x = (centre[:, k, None] + affine[:, k, 0, None] * steps).float()
        along_y = (affine[:, k, 1, None] * steps).float()
        placement = along_y[:, :, None] + along_x[:, None, :]
        inside &= placement >= extent[:, k, None, None]
        inside &= placement <= high[:, k, None, None]
    return inside


def local_maximum(scores: torch.Tensor) -> torch.Tensor:
    """The maximum over each 3 x 3 neighbourhood of score maps (M, n, n) (``max_pool2d(3, stride=1,
    padding=1)``, as two separable passes of elementwise maxima)."""
    padded = F.pad(scores, (1, 1, 1, 1), value=-math.inf)
    rows = torch.maximum(torch.maximum(padded[:, :, :-2], padded[:, :, 1:-1]), padded[:, :, 2:])
    return torch.maximum(torch.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def _second_peak(scores: torch.Tensor, best_row: torch.Tensor, best_col: torch.Tensor) -> torch.Tensor:
    """(M,) the highest local maximum (3 x 3) of score maps (M, n, n) other than the peak at
    (best_row, best_col) and its 8 neighbours; -2 if there is none."""
    n = scores.shape[-1]
    peaks = (scores >= local_maximum(scores)) & (scores > -1.5)
    span = torch.arange(n, device=scores.device)
    near = ((span[None, :, None] - best_row[:, None, None]).abs() <= 1) & (
        (span[None, None, :] - best_col[:, None, None]).abs() <= 1
    )
    return torch.where(peaks & ~near, scores, torch.full_like(scores, -2.0)).flatten(1).amax(dim=1)


def _on_border(scores: torch.Tensor, best: torch.Tensor | None = None) -> torch.Tensor:
    """(M,) whether the maximum of each (M, n, n) score map (at flat index ``best`` if given) lies on the
    map's border."""
    n = scores.shape[-1]
    best = scores.flatten(1).argmax(dim=1) if best is None else best
    row, col = best // n, best % n
    return (row == 0) | (row == n - 1) | (col == 0) | (col == n - 1)


def _parabola_peak(before: torch.Tensor, centre: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    curvature = before - 2 * centre + after
    step = (
        0.5 * (before - after) / torch.where(curvature < -1e-9, curvature, torch.full_like(curvature, -1e9))
    )
    return torch.nan_to_num(step, nan=0.0).clamp(-0.5, 0.5)


# why a match was rejected (``refine_pair``'s reason codes)
REASONS = {
    0: "ok",
    1: "source patch",
    2: "outside target",
    3: "peak on search border",
    4: "ambiguous",
    5: "low NCC",
    6: "moved too far",
}


def refine_matches(
    source: PyramidStack,
    target: PyramidStack,
    source_view: torch.Tensor,
    target_view: torch.Tensor,
    x_source: torch.Tensor,
    y_predicted: torch.Tensor,
    affine: torch.Tensor,
    radius: float,
    options: RefineOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Refine matches between any views of two pyramid stacks (see the module docstring).

    ``source_view``, ``target_view``: (M,) views of the stacks; ``x_source``, ``y_predicted``: (M, 2) level-0
    pixels; ``affine``: (M, 2, 2) d(target)/d(source); ``radius``: search radius in source pixels.
    Returns refined target pixels (M, 2) float64, NCC (M,) and a reason code (M,) int64 (0 = accepted,
    see ``REASONS``), on the CPU; the search runs on the stacks' device.
    """
    device = target.device
    source_view, target_view = source_view.to(device), target_view.to(device)
    x_source, y_predicted, affine = x_source.to(device), y_predicted.to(device), affine.to(device)
    m = x_source.shape[0]
    out_xy = torch.zeros(m, 2, dtype=torch.float64, device=device)
    out_ncc = torch.zeros(m, device=device)
    out_reason = torch.zeros(m, dtype=torch.long, device=device)
    wanted = num_levels(radius, options.level_radius)
    levels = torch.minimum(source.depth[source_view], target.depth[target_view]).clamp_max(wanted)
    for count in levels.unique().tolist():  # one group unless some pyramids are shorter
        group = (levels == count).nonzero()[:, 0]
        window = options.patch_size + 2 * _top_radius(radius, count, options)
        chunk = options.chunk
        if device.type == "cpu":
            chunk = max(1, min(chunk, WINDOW_BUDGET // window**2))  # windows stay in the cache
        for part in group.split(chunk):
            xy, ncc, reason = _refine_chunk(
                source,
                target,
                source_view[part],
                target_view[part],
                x_source[part].double(),
                y_predicted[part].double(),
                affine[part].double(),
                radius,
                count,
                options,
            )
            out_xy[part], out_ncc[part], out_reason[part] = xy, ncc, reason
    return out_xy.cpu(), out_ncc.cpu(), out_reason.cpu()


def refine_pair(
    source: list[torch.Tensor],
    target: list[torch.Tensor],
    x_source: torch.Tensor,
    y_predicted: torch.Tensor,
    affine: torch.Tensor,
    radius: float,
    options: RefineOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`refine_matches` from one source image to one target image, given their pyramids
    (:func:`build_pyramid`)."""
    views = torch.zeros(x_source.shape[0], dtype=torch.long)
    return refine_matches(
        PyramidStack.from_pyramids([source]),
        PyramidStack.from_pyramids([target]),
        views,
        views,
        x_source,
        y_predicted,
        affine,
        radius,
        options,
    )


def _top_radius(radius: float, levels: int, options: RefineOptions) -> int:
    """Search radius (pixels) on the coarsest level ``levels``."""
    return min(max(math.ceil(radius / 2.0**levels), 1), max(options.level_radius, 1))


def _reject_at(reason: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, code: int) -> None:
    """Set ``reason[index[mask]]`` to ``code`` where not rejected yet."""
    chosen = index[mask]
    reason[chosen[reason[chosen] == 0]] = code


def _refine_chunk(
    source: PyramidStack,
    target: PyramidStack,
    source_view: torch.Tensor,
    target_view: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    affine: torch.Tensor,
    radius: float,
    levels: int,
    options: RefineOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, device = x.shape[0], x.device
    half = options.patch_size // 2
    # current offset, source pixels of the current level
    centre = torch.zeros(m, 2, dtype=torch.float64, device=device)
    reason = torch.zeros(m, dtype=torch.long, device=device)
    ncc_best = torch.full((m,), -2.0, device=device)
    for level in range(levels, -1, -1):
        act = (reason == 0).nonzero()[:, 0]  # only matches not rejected yet
        if act.numel() == 0:
            break
        factor = 2.0**level
        top = level == levels
        r = options.fine_radius if level == 0 else options.middle_radius
        if top:
            r = _top_radius(radius, levels, options)
        x_l = (x[act] + 0.5) / factor - 0.5
        y_l = (y[act] + 0.5) / factor - 0.5
        a = affine[act]
        sv, tv = source_view[act], target_view[act]
        identity = torch.eye(2, dtype=torch.float64, device=device).expand(act.numel(), 2, 2)
        patch = source.levels[level].sample(sv, x_l, identity, half)  # (m', P, P)
        if level == 0:
            texture = patch.flatten(1).std(dim=1) >= options.min_texture
            inside = source.levels[0].inside(sv, x_l, identity, half)
            _reject_at(reason, act, ~(inside & texture), 1)
        c = centre[act]
        image = target.levels[level]
        scores = _scores(image, tv, patch, y_l, c, a, half, r)
        for _ in range(0 if top else options.recentre):
            # a fine-level peak on the search border: move there and search again
            moved = _on_border(scores).nonzero()[:, 0]
            if moved.numel() == 0:
                break
            peak = scores[moved].flatten(1).argmax(dim=1)
            c[moved] += torch.stack([peak % (2 * r + 1) - r, peak // (2 * r + 1) - r], -1).double()
            scores[moved] = _scores(image, tv[moved], patch[moved], y_l[moved], c[moved], a[moved], half, r)
        flat = scores.flatten(1)
        best = flat.argmax(dim=1)
        best_row, best_col = best // (2 * r + 1), best % (2 * r + 1)
        ncc = flat.gather(1, best[:, None])[:, 0]
        ncc_best[act] = ncc
        _reject_at(reason, act, ncc <= -1.5, 2)
        _reject_at(reason, act, _on_border(scores, best), 3)
        if top and options.min_margin > 0 and r >= 2:
            second = _second_peak(scores, best_row, best_col)
            _reject_at(reason, act, ncc - second < options.min_margin, 4)
        step = torch.stack([best_col - r, best_row - r], -1).double()
        if level > 0:
            centre[act] = 2.0 * (c + step)
            continue
        rows = torch.arange(act.numel(), device=device)
        row_c, col_c = best_row.clamp(1, 2 * r - 1), best_col.clamp(1, 2 * r - 1)
        sub_x = _parabola_peak(
            scores[rows, row_c, col_c - 1], scores[rows, row_c, col_c], scores[rows, row_c, col_c + 1]
        )
        sub_y = _parabola_peak(
            scores[rows, row_c - 1, col_c], scores[rows, row_c, col_c], scores[rows, row_c + 1, col_c]
        )
        centre[act] = c + step + torch.stack([sub_x, sub_y], -1).double()
    refined = y + (centre[:, None, :] * affine).sum(-1)
    everyone = torch.arange(m, device=device)
    _reject_at(reason, everyone, ncc_best < options.min_ncc, 5)
    _reject_at(reason, everyone, centre.norm(dim=1) > radius * 1.5 + options.fine_radius, 6)
    return refined, ncc_best, reason
