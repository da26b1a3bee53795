"""Step 2 of :func:`~.reconstruct.run_pipeline`: the backbone over the views, in one call or in chunks of
views (composed into one frame, loops closed), and the checks of what it returned."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import torch

from speed3r_sfm.models.prediction import Prediction

from .backbone import Backbone
from .chunked import predict_chunked, stored_plan
from .chunking import default_chunk_size, group_views_by_similarity, plan_chunks
from .frames import SceneGeometry
from .loop_closure import LoopClosure, LoopOptions, close_loops
from .records import AttentionSummary, merge_chunk_summaries, summarize_records
from .token_poses import TokenPoseOptions, posed_by_tokens
from .view_features import thumbnail_descriptors, token_descriptors, token_encoder

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = 5  # camera / register tokens per view of VGGT and π³ (for the automatic chunk size)


def check_chunk_arguments(
    chunk_size: int | None,
    chunk_overlap: int | None,
    chunk_h5: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
) -> None:
    """Raise ValueError, saying why, for a chunk size, overlap or chunk file that cannot work."""
    for name, value in (("chunk_size", chunk_size), ("chunk_overlap", chunk_overlap)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be a whole number of views, got {value!r}")
    if chunk_h5 is not None:
        h5 = Path(chunk_h5).resolve()
        if h5.is_dir():
            raise ValueError(
                f"chunk_h5 {chunk_h5} is a folder; give a file path, e.g. {Path(chunk_h5) / 'chunks.h5'}"
            )
        if output_dir is not None and h5.is_relative_to(Path(output_dir).resolve()):
            raise ValueError(
                f"chunk_h5 {chunk_h5} lies in the output folder {output_dir}, which is written anew when the "
                "project is done: keep the chunk file outside it"
            )
        if h5.is_file():
            _check_chunk_file(h5)
    if chunk_size is not None and chunk_size < 2:
        raise ValueError(
            f"chunk_size must be at least 2 (chunks share views to be aligned), got {chunk_size}"
        )
    if chunk_overlap is not None and chunk_overlap < 1:
        raise ValueError(
            f"chunk_overlap must be at least 1 (chunks are aligned on shared views), got {chunk_overlap}"
        )
    if chunk_size is not None and chunk_overlap is not None and chunk_overlap >= chunk_size:
        raise ValueError(f"chunk_overlap ({chunk_overlap}) must be smaller than chunk_size ({chunk_size})")


def _check_chunk_file(path: Path) -> None:
    """Raise ValueError unless the existing file ``path`` is a chunk file (or an empty HDF5 file): chunks
    are never written into another HDF5 file (a dataset's depths.h5) or over a file of another kind."""
    try:
        with h5py.File(path, "r") as file:
            foreign = "plan" not in file.attrs and (len(file.keys()) or len(file.attrs))
    except OSError as error:
        raise ValueError(f"chunk_h5 {path} exists and is not an HDF5 file; give a new path") from error
    if foreign:
        raise ValueError(
            f"chunk_h5 {path} is an HDF5 file but not a chunk file of an earlier run; give a new path"
        )


def resolve_chunk_size(chunk_size: int | None, backbone: Backbone, model_images: torch.Tensor) -> int | None:
    """The views per pass: ``chunk_size`` if given; else on CUDA what fits in free memory; else None (one
    pass)."""
    if chunk_size is not None:
        return chunk_size
    if backbone.device.type != "cuda":
        return None
    patch = backbone.preprocessing.patch_size
    height, width = model_images.shape[-2:]
    return default_chunk_size(backbone.device, (height // patch) * (width // patch) + SPECIAL_TOKENS)


@dataclass
class ChunkOptions:
    size: int | None
    overlap: int | None
    ordered: bool
    h5: str | os.PathLike | None


def run_backbone(
    backbone: Backbone,
    model_images: torch.Tensor,
    names: list[str],
    chunk: ChunkOptions,
    with_tracker: bool = False,
    token_poses: TokenPoseOptions | None = None,
    loops: LoopOptions | None = None,
) -> tuple[Prediction, AttentionSummary | None, dict[str, Any] | None]:
    """The prediction of all views, their GSA summary (None without records) and the chunk plan for the
    report (None for a single pass). In chunks, each chunk is posed by ``token_poses`` (if enabled and the
    model exports descriptors) before the chunks are composed; a single pass is posed by the caller."""
    size = resolve_chunk_size(chunk.size, backbone, model_images)
    if size is None or size >= len(names):
        unused = [
            name
            for name, given in (
                ("chunk_size", chunk.size is not None),
                ("chunk_h5", chunk.h5 is not None),
                ("chunk_overlap", chunk.overlap is not None),
                ("ordered=False", not chunk.ordered),
            )
            if given
        ]
        if unused:
            why = "no chunk_size on this device" if size is None else f"{len(names)} views fit in one pass"
            # a chunk size above a short sequence's length (a video config) is as asked; no chunk file is not
            level = logging.WARNING if chunk.size is None or chunk.h5 is not None else logging.INFO
            logger.log(level, "%s not used: one pass over all views (%s)", ", ".join(unused), why)
        predict = (with_tracker and backbone.predict_with_tracker) or backbone.predict
        prediction = predict(model_images[None].to(backbone.device))
        summary = summarize_records(prediction.attention, len(names)) if backbone.guided else None
        return prediction, summary, None
    overlap = chunk.overlap if chunk.overlap is not None else max(1, size // 4)
    if overlap >= size:
        raise ValueError(f"chunk_overlap ({overlap}) must be smaller than the chunk size ({size})")
    return _predict_in_chunks(backbone, model_images, names, size, overlap, chunk, token_poses, loops)


def _chunk_plan(
    backbone: Backbone,
    model_images: torch.Tensor,
    size: int,
    overlap: int,
    chunk: ChunkOptions,
) -> tuple[list[list[int]], str]:
    """The chunks and how they were made: ordered windows; for an unordered collection the plan of an
    earlier run stored in the chunk file, else views grouped by their token (or thumbnail) descriptors."""
    num_views = model_images.shape[0]
    if chunk.ordered:
        return plan_chunks(num_views, size, overlap), "ordered"
    stored = stored_plan(chunk.h5) if chunk.h5 is not None else None
    if stored is not None and sorted(v for c in stored for v in c) == list(range(num_views)):
        return stored, "stored in the chunk file"
    features, source = _view_descriptors(backbone, model_images)
    if source == "image thumbnails":
        logger.warning("the model has no known token encoder: unordered views are grouped by thumbnails")
    return group_views_by_similarity(features, size, overlap), source


def _view_descriptors(backbone: Backbone, model_images: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Per-view descriptors (S, D) from the backbone's own image encoder ("backbone tokens"), else from
    grey thumbnails ("image thumbnails"), and which of the two."""
    module = backbone.module
    if module is not None and token_encoder(module) is not None:
        patch = backbone.preprocessing.patch_size
        features = token_descriptors(module, model_images, patch_size=patch, device=backbone.device)
        return features, "backbone tokens"
    return thumbnail_descriptors(model_images), "image thumbnails"


def _predict_in_chunks(
    backbone: Backbone,
    model_images: torch.Tensor,
    names: list[str],
    size: int,
    overlap: int,
    chunk: ChunkOptions,
    token_poses: TokenPoseOptions | None = None,
    loops: LoopOptions | None = None,
) -> tuple[Prediction, AttentionSummary | None, dict[str, Any]]:
    """The composed prediction of overlapping chunks, the merged GSA summary (or None) and the chunk plan
    for the report. Only one chunk of images is on the device at a time."""
    start = time.perf_counter()
    chunks, grouping = _chunk_plan(backbone, model_images, size, overlap, chunk)
    grouping_s = time.perf_counter() - start
    logger.info(
        "%d views in %d chunks of %d (overlap %d, %s)", len(names), len(chunks), size, overlap, grouping
    )
    if chunk.h5 is not None:
        Path(chunk.h5).parent.mkdir(parents=True, exist_ok=True)

    def predict(images: torch.Tensor) -> Prediction:
        prediction = backbone.predict(images)
        if token_poses is None:
            return prediction
        prediction, report = posed_by_tokens(prediction, token_poses)
        prediction.extras["chunk_report"] = report  # kept in the chunk file with the chunk
        return prediction

    def load(indices: list[int]) -> torch.Tensor:
        return model_images[indices].to(backbone.device)

    prediction = predict_chunked(
        predict,
        load,
        size,
        overlap,
        h5_path=chunk.h5,
        num_views=len(names),
        chunks=chunks,
        keep_maps=("depth", "depth_conf"),  # what SceneGeometry uses
        keep_attention=backbone.guided,
        view_names=names,
        view_digests=[hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in model_images],
        model=f"{backbone.name}, {backbone.attention} attention, token poses {token_poses is not None}",
    )
    extras = prediction.extras
    if token_poses is not None:
        reports = enumerate(extras["chunk_reports"])
        extras["chunk_token_poses"] = {k: report for k, report in reports if report is not None}
    closure = LoopClosure.skipped("unordered chunks")
    if chunk.ordered:
        loops = loops or LoopOptions()
        descriptors = None
        if loops.enabled and len(chunks) > 2:
            descriptors, _ = _view_descriptors(backbone, model_images)
        closure = close_loops(
            prediction, predict, load, descriptors, chunks, loops, backbone.guided, h5_path=chunk.h5
        )
    summary = None
    if backbone.guided:
        summary = merge_chunk_summaries(
            extras["chunk_attention"] + closure.summaries, chunks + closure.loop_chunks, len(names)
        )
    report = {
        "chunk_size": size,
        "overlap": overlap,
        "ordered": chunk.ordered,
        "grouping": grouping,
        "grouping_s": grouping_s,
        "num_chunks": len(chunks),
        "chunks": chunks,
        # views each chunk shares with the one before (the last ordered chunk is shifted back to stay full)
        "shared_views": [len(set(a) & set(b)) for a, b in zip(chunks, chunks[1:], strict=False)],
        "sim3_scale": [float(sim3[0]) for sim3 in extras["chunk_sim3"]],
        "sim3_inlier_fraction": extras["chunk_inlier_fraction"],
        "computed_chunks": extras["computed_chunks"],
        "h5": None if chunk.h5 is None else str(chunk.h5),
        "loop_closure": closure.report,
    }
    return prediction, summary, report


def check_prediction(geometry: SceneGeometry, model_images: torch.Tensor) -> None:
    s, _, h, w = model_images.shape
    if geometry.num_views != s or geometry.image_size != (h, w):
        raise ValueError(
            f"the model returned {geometry.num_views} views of {geometry.image_size} "
            f"for {s} inputs of {(h, w)}"
        )
    if not torch.isfinite(geometry.cam_from_world).all():
        raise ValueError("the model returned non-finite camera poses; check the model and its weights")
    fixed = geometry.sanitize_intrinsics()
    if fixed:
        logger.warning(
            "the model's intrinsics of %d view(s) (e.g. view %d) were unusable and were replaced by "
            "a default focal length / centred principal point",
            len(fixed),
            fixed[0],
        )
