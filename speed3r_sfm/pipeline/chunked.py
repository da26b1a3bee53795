"""Chunked sliding-window inference for long sequences, composed into one world frame by robust Sim(3).

:func:`predict_chunked` runs a backbone's ``predict`` on overlapping chunks of views (:func:`plan_chunks`
for ordered video, :func:`group_views_by_similarity` for unordered collections) and aligns each chunk to
the global frame (the frame of the first chunk) through the world points of the views it shares with the
chunks already placed: confidence-weighted, subsampled correspondences fitted by IRLS around weighted
Umeyama (:func:`robust_sim3`). A view seen by several chunks keeps the estimate of the first chunk that
placed it. Each chunk's raw output (its own frame) can stream to an HDF5 file, one group per chunk whose
``complete`` attribute is written last; a re-run with the same file reuses complete chunks and recomputes
only the rest (alignment is recomputed from the stored raw outputs, which is cheap and deterministic). The
file also keeps the plan (:func:`stored_plan`) and, when given, the names of the views, digests of their
model input and a description of the model, so that a re-run on other images (or the same names with other
pixels) or with another model is refused. With ``keep_attention=True`` each chunk's GSA records are
reduced to an :class:`~speed3r_sfm.pipeline.records.AttentionSummary` over its own views, stored with the
chunk and returned in ``extras["chunk_attention"]``
(see :func:`~speed3r_sfm.pipeline.records.merge_chunk_summaries`).

Memory: only the aligned points of the last chunk's views are kept for alignment. With
``keep_maps=True`` (default) the composed per-pixel maps of all S views are returned in memory; with
``keep_maps=False`` only poses and intrinsics are (the maps have size 0 x 0; ``keep_maps`` may also name the
maps to keep, e.g. ``("depth", "depth_conf")``) and the per-pixel maps of any
view are read lazily from the h5 file with :func:`load_view_maps` and the chunk Sim(3) from
``extras["chunk_sim3"]``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from speed3r_sfm.geometry import apply_sim3, identity_sim3, sim3_cam_from_world
from speed3r_sfm.models.prediction import Prediction

from .chunking import plan_chunks, robust_sim3
from .records import AttentionSummary, read_summary, summarize_records, write_summary

Predict = Callable[[torch.Tensor], Prediction]
"""Images (1, n, 3, H, W) -> Prediction with B = 1 (e.g. ``load_backbone(...).predict``)."""

_MAPS = ("depth", "depth_conf", "world_points", "world_points_conf")
_FIELDS = ("cam_from_world", "intrinsics", *_MAPS)


def _chunk_name(k: int) -> str:
    return f"chunk_{k:05d}"


def _read_chunk(group: h5py.Group) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(group[name][()]) for name in _FIELDS}


def _read_attention(group: h5py.Group) -> AttentionSummary | None:
    return read_summary(group["attention"]) if "attention" in group else None


def _read_report(group: h5py.Group) -> dict | None:
    return json.loads(group.attrs["report"]) if "report" in group.attrs else None


def _write_chunk(
    file: h5py.File,
    k: int | str,
    indices: Sequence[int],
    out: dict[str, torch.Tensor],
    attention: AttentionSummary | None = None,
    report: dict | None = None,
) -> None:
    name = _chunk_name(k) if isinstance(k, int) else k
    if name in file:
        del file[name]
    group = file.create_group(name)
    group.create_dataset("indices", data=np.asarray(indices, dtype=np.int64))
    for key in _FIELDS:
        data = out[key].numpy()
        if key in _MAPS and data.size > 0:  # per-pixel maps: lossless, 1.5x smaller
            layout = dict(compression="lzf", shuffle=True, chunks=(1, *data.shape[1:]))
            group.create_dataset(key, data=data, **layout)
        else:
            group.create_dataset(key, data=data)
    if attention is not None:
        write_summary(group.create_group("attention"), attention)
    if report is not None:
        group.attrs["report"] = json.dumps(report, default=_plain)
    file.flush()
    group.attrs["complete"] = True  # last: a crash before this line leaves the chunk to be recomputed
    file.flush()


def _plain(value):
    """JSON for the numpy / torch scalars and arrays of a chunk report."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


class ChunkFileError(ValueError):
    """The chunk file was written for other images, another model or another chunk plan."""


def _complete_chunk(file: h5py.File | None, k: int, indices: Sequence[int]) -> bool:
    if file is None or _chunk_name(k) not in file:
        return False
    group = file[_chunk_name(k)]
    if not group.attrs.get("complete", False):
        return False
    if not np.array_equal(group["indices"][()], np.asarray(indices, dtype=np.int64)):
        raise ChunkFileError(f"{file.filename}: chunk {k} holds other views than planned; use a new h5 file")
    return True


def stored_extra_chunk(
    h5_path: str | Path, name: str, indices: Sequence[int], keep_attention: bool
) -> tuple[dict[str, torch.Tensor], AttentionSummary | None, dict | None] | None:
    """The output of a chunk outside the plan (a loop chunk) that :func:`store_extra_chunk` kept in
    ``h5_path`` under ``name``, as :func:`run_chunk` returns it; None when the file holds no complete
    group of that name for these views."""
    if not Path(h5_path).is_file():
        return None
    with h5py.File(h5_path, "r") as file:
        if name not in file or not file[name].attrs.get("complete", False):
            return None
        group = file[name]
        if not np.array_equal(group["indices"][()], np.asarray(indices, dtype=np.int64)):
            return None
        summary = _read_attention(group) if keep_attention else None
        return _read_chunk(group), summary, _read_report(group)


def store_extra_chunk(
    h5_path: str | Path,
    name: str,
    indices: Sequence[int],
    out: dict[str, torch.Tensor],
    attention: AttentionSummary | None = None,
    report: dict | None = None,
) -> None:
    """Keep a chunk outside the plan in the chunk file ``h5_path`` (see :func:`stored_extra_chunk`)."""
    with h5py.File(h5_path, "a") as file:
        _write_chunk(file, name, indices, out, attention, report)


def _quantile(values: torch.Tensor, q: float, max_samples: int = 1 << 20) -> torch.Tensor:
    """``torch.quantile`` on at most ``max_samples`` evenly strided values (it refuses > 2**24 inputs)."""
    stride = -(-values.numel() // max_samples)
    return torch.quantile(values[::stride], q)


def alignment_points(
    src_points: torch.Tensor,
    src_conf: torch.Tensor,
    dst_points: torch.Tensor,
    dst_conf: torch.Tensor,
    conf_quantile: float,
    max_points: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correspondences (N, 3), (N, 3) and weights (N,) of the shared views' pixels: pixels below the
    ``conf_quantile`` of either side's confidence are dropped, weight = sqrt(conf_src * conf_dst)."""
    src = src_points.reshape(-1, 3).double()
    dst = dst_points.reshape(-1, 3).double()
    cs = src_conf.reshape(-1).double()
    cd = dst_conf.reshape(-1).double()
    ok = torch.isfinite(src).all(-1) & torch.isfinite(dst).all(-1) & (cs > 0) & (cd > 0)
    if conf_quantile > 0 and ok.any():
        ok &= (cs >= _quantile(cs[ok], conf_quantile)) & (cd >= _quantile(cd[ok], conf_quantile))
    idx = ok.nonzero()[:, 0]
    if idx.numel() > max_points:
        idx = idx[torch.randperm(idx.numel(), generator=generator)[:max_points]]
    return src[idx], dst[idx], (cs[idx] * cd[idx]).sqrt()


def _loader(
    images: torch.Tensor | Callable[[list[int]], torch.Tensor], num_views: int | None
) -> tuple[Callable[[list[int]], torch.Tensor], int]:
    if isinstance(images, torch.Tensor):
        tensor = images[0] if images.ndim == 5 else images
        if tensor.ndim != 4:
            raise ValueError(f"images must be (S, 3, H, W) or (1, S, 3, H, W), got {tuple(images.shape)}")

        def load(indices: list[int]) -> torch.Tensor:
            return tensor[indices]

        return load, tensor.shape[0]
    if num_views is None:
        raise ValueError("predict_chunked: a loader needs num_views")
    return images, num_views


def _plan(num_views: int, chunk_size: int, overlap: int, chunks: list[list[int]] | None) -> list[list[int]]:
    plan = chunks if chunks is not None else plan_chunks(num_views, chunk_size, overlap)
    if sorted({v for c in plan for v in c}) != list(range(num_views)):
        raise ValueError("predict_chunked: the chunks do not cover every view exactly")
    return plan


def run_chunk(
    predict: Predict, load: Callable, indices: Sequence[int], keep_attention: bool = False
) -> tuple[dict[str, torch.Tensor], AttentionSummary | None, dict | None]:
    """``predict`` on the views ``indices``: its fields on the CPU (B dropped), its GSA summary (with
    ``keep_attention``) and its ``extras["chunk_report"]``."""
    pred = predict(load(list(indices))[None])
    attention = summarize_records(pred.attention, len(indices)) if keep_attention else None
    report = pred.extras.get("chunk_report")
    pred = pred.to("cpu")
    out = {name: getattr(pred, name)[0].detach().float().contiguous() for name in _FIELDS}
    return out, attention, report


def _map_names(keep_maps: bool | Sequence[str]) -> tuple[str, ...]:
    if isinstance(keep_maps, bool):
        return _MAPS if keep_maps else ()
    names = tuple(keep_maps)
    unknown = sorted(set(names) - set(_MAPS))
    if unknown:
        raise ValueError(f"keep_maps: unknown maps {unknown}; choose among {_MAPS}")
    return names


def _bind_file(
    file: h5py.File,
    plan: list[list[int]],
    view_names: Sequence[str] | None,
    view_digests: Sequence[str] | None = None,
    model: str | None = None,
) -> None:
    """Store the plan, the view names, the digests of the views' model input and the model in a new chunk
    file; refuse a file written for other images (names or pixels), another model or another plan."""
    if view_names is not None:
        names = json.dumps(list(view_names))
        stored = file.attrs.get("view_names")
        if stored is not None and stored != names:
            raise ChunkFileError(f"{file.filename} holds chunks of other images; use a new h5 file")
        file.attrs["view_names"] = names
    if view_digests is not None:
        stored = file.attrs.get("view_digests")
        if stored is not None and json.loads(stored) != list(view_digests):
            before = json.loads(stored)
            pairs = enumerate(zip(before, view_digests, strict=False))
            changed = next((i for i, (a, b) in pairs if a != b), min(len(before), len(view_digests)))
            which = view_names[changed] if view_names and changed < len(view_names) else f"view {changed}"
            raise ChunkFileError(
                f"{file.filename} holds chunks of other pixels for image {which} (the image changed, another "
                "folder holds images of the same names, or the model input is made differently); use a new "
                "h5 file"
            )
        file.attrs["view_digests"] = json.dumps(list(view_digests))
    if model is not None:
        stored = file.attrs.get("model")
        if stored is not None and stored != model:
            raise ChunkFileError(
                f"{file.filename} holds chunks of another model ({stored}; this run: {model}); use a new h5 "
                "file"
            )
        file.attrs["model"] = model
    stored_plan = file.attrs.get("plan")
    if stored_plan is not None and json.loads(stored_plan) != json.loads(json.dumps(plan)):
        raise ChunkFileError(
            f"{file.filename} holds chunks of another plan (chunk size, overlap or grouping): use a new h5 "
            "file, or the settings it was written with"
        )
    if stored_plan is None:
        file.attrs["plan"] = json.dumps(plan)


def stored_plan(h5_path: str | Path) -> list[list[int]] | None:
    """The chunk plan a previous :func:`predict_chunked` run stored in ``h5_path`` (None if none)."""
    if not Path(h5_path).is_file():
        return None
    with h5py.File(h5_path, "r") as file:
        plan = file.attrs.get("plan")
    return None if plan is None else [list(map(int, c)) for c in json.loads(plan)]


def predict_chunked(
    predict: Predict,
    images: torch.Tensor | Callable[[list[int]], torch.Tensor],
    chunk_size: int,
    overlap: int,
    h5_path: str | Path | None = None,
    num_views: int | None = None,
    chunks: list[list[int]] | None = None,
    conf_quantile: float = 0.5,
    max_align_points: int = 20000,
    irls_iterations: int = 10,
    keep_maps: bool | Sequence[str] = True,
    seed: int = 0,
    keep_attention: bool = False,
    view_names: Sequence[str] | None = None,
    view_digests: Sequence[str] | None = None,
    model: str | None = None,
) -> Prediction:
    """Predict a long sequence chunk by chunk and compose the chunks in one world frame.

    ``images``: (S, 3, H, W) or (1, S, 3, H, W) in [0, 1], or a loader ``indices -> (n, 3, H, W)`` (then
    ``num_views`` is required), so that only one chunk of images is in memory at a time. ``chunks``
    overrides the ordered plan ``plan_chunks(S, chunk_size, overlap)`` (e.g. with
    :func:`group_views_by_similarity`); each chunk after the first must share views with the chunk before
    it. Returns a Prediction (B = 1) of all S views in the first chunk's frame; ``extras`` holds
    ``chunks``, ``chunk_sim3`` (per chunk ``(s, R, t)`` chunk frame -> global frame, float64),
    ``chunk_inlier_fraction`` and ``computed_chunks`` (indices of the chunks run in this call), and with
    ``keep_attention`` ``chunk_attention`` (per chunk an AttentionSummary of its views, or None).
    ``keep_maps``: True, False or the names of the composed maps to return. ``view_names``,
    ``view_digests`` (of each view's input) and ``model`` (a description of the model and its settings),
    stored in the h5 file, make a resume on other images or with another model fail instead of mixing
    them. A JSON-able ``extras["chunk_report"]`` of a chunk's prediction is stored with the chunk and
    returned, per chunk (None where absent), in ``extras["chunk_reports"]``.
    """
    load, num_views = _loader(images, num_views)
    plan = _plan(num_views, chunk_size, overlap, chunks)
    if view_names is not None and len(view_names) != num_views:
        raise ValueError(f"predict_chunked: {len(view_names)} view names for {num_views} views")
    kept = _map_names(keep_maps)

    generator = torch.Generator().manual_seed(seed)
    file = h5py.File(h5_path, "a") if h5_path is not None else None
    cams = torch.full((num_views, 3, 4), torch.nan, dtype=torch.float64)
    intr = torch.full((num_views, 3, 3), torch.nan, dtype=torch.float64)
    maps: dict[str, torch.Tensor] = {}
    placed = torch.zeros(num_views, dtype=torch.bool)
    last_points: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    sim3s: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    inliers: list[float] = []
    computed: list[int] = []
    attention: list[AttentionSummary | None] = []
    reports: list[dict | None] = []
    try:
        if file is not None:
            _bind_file(file, plan, view_names, view_digests, model)
        for k, indices in enumerate(plan):
            if _complete_chunk(file, k, indices):
                out = _read_chunk(file[_chunk_name(k)])
                summary = _read_attention(file[_chunk_name(k)]) if keep_attention else None
                report = _read_report(file[_chunk_name(k)])
            else:
                out, summary, report = run_chunk(predict, load, indices, keep_attention)
                computed.append(k)
                if file is not None:
                    _write_chunk(file, k, indices, out, summary, report)
            attention.append(summary)
            reports.append(report)
            if k == 0:
                sim3 = identity_sim3()
                inliers.append(1.0)
            else:
                shared = [i for i, v in enumerate(indices) if v in last_points]
                if not shared:
                    raise ValueError(f"predict_chunked: chunk {k} shares no view with chunk {k - 1}")
                dst_p = torch.stack([last_points[indices[i]][0] for i in shared])
                dst_c = torch.stack([last_points[indices[i]][1] for i in shared])
                src, dst, w = alignment_points(
                    out["world_points"][shared],
                    out["world_points_conf"][shared],
                    dst_p,
                    dst_c,
                    conf_quantile,
                    max_align_points,
                    generator,
                )
                sim3, final_w = robust_sim3(src, dst, w, iterations=irls_iterations)
                inliers.append(float((final_w > 0.5 * w).double().mean()))
            sim3s.append(sim3)
            s, rot, t = sim3
            points = apply_sim3(s, rot, t, out["world_points"].double()).float()
            last_points = {v: (points[i], out["world_points_conf"][i]) for i, v in enumerate(indices)}
            new = [i for i, v in enumerate(indices) if not placed[v]]
            views = torch.tensor([indices[i] for i in new], dtype=torch.long)
            cams[views] = sim3_cam_from_world(s, rot, t, out["cam_from_world"][new].double())
            intr[views] = out["intrinsics"][new].double()
            placed[views] = True
            if kept:
                if not maps:
                    h, w_ = out["depth"].shape[-2:]
                    maps = {name: torch.zeros(num_views, h, w_, *_extra(name)) for name in kept}
                for name in kept:
                    if name == "world_points":
                        maps[name][views] = points[new]
                    elif name == "depth":
                        maps[name][views] = (out["depth"][new].double() * s).float()
                    else:  # confidences are not changed by the Sim(3)
                        maps[name][views] = out[name][new]
    finally:
        if file is not None:
            file.close()
    for name in _MAPS:
        maps.setdefault(name, torch.zeros(num_views, 0, 0, *_extra(name)))
    extras: dict = {
        "chunks": plan,
        "chunk_sim3": sim3s,
        "chunk_inlier_fraction": inliers,
        "computed_chunks": computed,
        "chunk_reports": reports,
    }
    if keep_attention:
        extras["chunk_attention"] = attention
    return Prediction(
        cam_from_world=cams.float()[None],
        intrinsics=intr.float()[None],
        depth=maps["depth"][None],
        depth_conf=maps["depth_conf"][None],
        world_points=maps["world_points"][None],
        world_points_conf=maps["world_points_conf"][None],
        extras=extras,
    )


def _extra(name: str) -> tuple[int, ...]:
    return (3,) if name == "world_points" else ()


def load_view_maps(
    h5_path: str | Path, view: int, chunks: list[list[int]], chunk_sim3: list
) -> dict[str, torch.Tensor]:
    """The composed per-pixel maps of one view read from the h5 file of :func:`predict_chunked` (the chunk
    that placed it first, mapped by its Sim(3)): ``depth``, ``depth_conf``, ``world_points``,
    ``world_points_conf``."""
    for k, indices in enumerate(chunks):
        if view in indices:
            i = list(indices).index(view)
            s, rot, t = chunk_sim3[k]
            with h5py.File(h5_path, "r") as f:
                g = f[_chunk_name(k)]
                out = {name: torch.from_numpy(g[name][i]) for name in _MAPS}
            out["depth"] = (out["depth"].double() * s).float()
            out["world_points"] = apply_sim3(s, rot, t, out["world_points"].double()).float()
            return out
    raise KeyError(f"view {view} is in no chunk")


def compute_chunks(
    predict: Predict,
    images: torch.Tensor | Callable[[list[int]], torch.Tensor],
    plan: list[list[int]],
    h5_path: str | Path,
    select: Sequence[int],
    num_views: int | None = None,
    keep_attention: bool = False,
) -> list[int]:
    """Run ``predict`` on the chunks ``select`` of ``plan`` that ``h5_path`` does not yet hold complete and
    store their raw outputs (and with ``keep_attention`` their GSA summaries) there, without alignment;
    returns the indices of the chunks computed."""
    load, _ = _loader(images, num_views)
    computed = []
    with h5py.File(h5_path, "a") as file:
        for k in select:
            if not _complete_chunk(file, k, plan[k]):
                _write_chunk(file, k, plan[k], *run_chunk(predict, load, plan[k], keep_attention))
                computed.append(k)
    return computed


def merge_chunk_files(dst: str | Path, sources: Sequence[str | Path]) -> None:
    """Copy the complete chunk groups of ``sources`` that ``dst`` lacks (or holds incomplete) into ``dst``."""
    with h5py.File(dst, "a") as out:
        for src in sources:
            if not Path(src).exists():
                continue
            with h5py.File(src, "r") as f:
                for name, group in f.items():
                    if not group.attrs.get("complete", False):
                        continue
                    if name in out and out[name].attrs.get("complete", False):
                        continue
                    if name in out:
                        del out[name]
                    f.copy(group, out, name=name)


def predict_chunked_distributed(
    predict: Predict,
    images: torch.Tensor | Callable[[list[int]], torch.Tensor],
    chunk_size: int,
    overlap: int,
    h5_path: str | Path,
    num_views: int | None = None,
    chunks: list[list[int]] | None = None,
    **compose_kwargs,
) -> Prediction | None:
    """Multi-process (multi-GPU) :func:`predict_chunked`, called by every rank of an initialised
    ``torch.distributed`` process group (any backend: only ``barrier`` is used; each rank passes its own
    ``predict``, e.g. the backbone on ``cuda:rank``).

    Rank r computes the chunks ``k % world_size == r`` into its own file ``<h5_path>.rank<r>`` (HDF5 files
    take one writer), resuming from the chunks it holds complete; after a barrier rank 0 merges the rank
    files into ``h5_path`` and composes all chunks there (as :func:`predict_chunked` with every chunk
    already complete, so ``predict`` is not called again). Rank 0 returns the Prediction, the others
    None. ``compose_kwargs`` go to :func:`predict_chunked` (``conf_quantile``, ``keep_maps``, ...).
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    _, n = _loader(images, num_views)
    plan = _plan(n, chunk_size, overlap, chunks)
    select = [k for k in range(len(plan)) if k % world == rank]
    rank_file = Path(f"{h5_path}.rank{rank}")
    keep_attention = bool(compose_kwargs.get("keep_attention", False))
    computed = compute_chunks(predict, images, plan, rank_file, select, n, keep_attention)
    dist.barrier()
    result = None
    if rank == 0:
        merge_chunk_files(h5_path, [Path(f"{h5_path}.rank{r}") for r in range(world)])
        result = predict_chunked(
            predict, images, chunk_size, overlap, h5_path=h5_path, num_views=n, chunks=plan, **compose_kwargs
        )
        result.extras["computed_chunks"] = computed
    dist.barrier()
    return result
