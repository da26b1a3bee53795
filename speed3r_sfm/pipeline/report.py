"""The ``report.json`` of a project: what went in, what came out, how long it took."""

from __future__ import annotations

import datetime
from dataclasses import asdict
from importlib import metadata
from typing import Any

import pycolmap

from .backbone import Backbone
from .bundle import mean_reprojection_error
from .inputs import View
from .keypoints import Keypoints
from .matching import Matches
from .records import AttentionSummary
from .tracks import Tracks


def package_version() -> str:
    try:
        return metadata.version("speed3r-sfm")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"


def build_report(
    *,
    views: list[View],
    skipped: list[str],
    backbone: Backbone,
    attention: str,
    summary: AttentionSummary | None,
    keypoints: list[Keypoints],
    matches: Matches,
    tracks: Tracks,
    rec: pycolmap.Reconstruction,
    settings: dict[str, Any],
    initial_error: float | None,
    initial_points: int,
    ba_rounds: list[dict],
    timings: dict[str, float],
) -> dict:
    """The report of one reconstruction (JSON-serialisable apart from NaN, see ``export.write_report``)."""
    lengths = tracks.lengths()
    gsa = None
    if summary is not None:
        gsa = {
            "layers": summary.num_layers,
            "block_size": summary.block_size,
            "blocks_per_view": summary.blocks_per_view,
            "matches_in_selected_block": matches.stats.get("in_selected_block"),
        }
    return {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "speed3r_sfm": package_version(),
        "pycolmap": pycolmap.__version__,
        "model": backbone.name,
        "device": str(backbone.device),
        "preprocessing": asdict(backbone.preprocessing),
        "attention": attention,
        "gsa_guidance": backbone.guided,  # the GSA records chose keypoints and view pairs
        "gsa_records": gsa,
        "images": {
            "used": len(views),
            "skipped": skipped,
            "names": [v.name for v in views],
            "sizes": [list(v.original_size) for v in views],
        },
        **settings,
        "counts": {
            "keypoints": int(sum(k.xy.shape[0] for k in keypoints)),
            "candidate_matches": matches.stats.get("proposed", 0),
            "verified_matches": matches.stats.get("verified", 0),
            "refined_matches": matches.stats.get("refined", 0),
            "refinement_rejections": matches.stats.get("rejected", {}),
            "track_verification": matches.stats.get("track_verification"),
            "tracks": tracks.num_tracks,
            "mean_track_length": float(lengths.mean()) if lengths.size else 0.0,
            "points3D_initial": initial_points,
            "points3D": rec.num_points3D(),
            "observations": rec.compute_num_observations(),
            "registered_images": rec.num_reg_images(),
        },
        "reprojection_error_px": {"initial": initial_error, "final": mean_reprojection_error(rec)},
        "ba_rounds": ba_rounds,
        "timings_s": timings,
    }
