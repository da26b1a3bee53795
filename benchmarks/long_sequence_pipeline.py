"""The whole pipeline (``reconstruct``) on one long synthetic video, one pass against ordered chunks with and
without loop closure, scored against the ground truth (relative rotation error of every pair of views).

The scene is rendered once (on ``--device``) and written as a COLMAP dataset under ``--work``; each
run writes its project beside it and appends one JSON line to ``--out``::

    python benchmarks/long_sequence_pipeline.py --views 240 --chunk-size 48 --out results.jsonl

Runs (``--runs``): ``single`` (one pass), ``chunks`` (ordered chunks, loop closure),
``chunks-open`` (ordered chunks, ``--loop_closure false``); ``--attention`` applies to each.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import pycolmap
import torch
from accuracy import machine_description  # benchmarks/ (this script's folder)
from relative_rotation_vs_truth import relative_rotation_errors

import speed3r_sfm
from speed3r_sfm.data.colmap_dataset import write_colmap_dataset
from speed3r_sfm.data.synthetic import render_scene
from speed3r_sfm.pipeline import LoopOptions, PipelineOptions

RUNS = ("single", "chunks", "chunks-open")


def write_scene(args: argparse.Namespace, device: str) -> Path:
    """The scene of these settings under ``--work`` (rendered on ``device`` once, then reused)."""
    name = f"scene_{args.seed}_{args.trajectory}_{args.views}v_{args.width}x{args.height}"
    scene = args.work / name
    if (scene / "sparse" / "0").exists():
        return scene
    views = render_scene(
        args.seed, args.views, args.height, args.width, trajectory=args.trajectory, device=device
    )
    views = views.to("cpu")
    write_colmap_dataset(scene, views.images, views.intrinsics, views.cam_from_world, overwrite=True)
    return scene


def run_once(name: str, scene: Path, args: argparse.Namespace) -> dict:
    chunked = name != "single"
    options = PipelineOptions(loops=LoopOptions(enabled=name == "chunks"))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    reconstruction = speed3r_sfm.reconstruct(
        scene / "images",
        output_dir=args.work / name,
        device=args.device,
        attention=args.attention,
        shared_camera=True,
        overwrite=True,
        options=options,
        chunk_size=args.chunk_size if chunked else None,
    )
    wall = time.perf_counter() - start
    report_text = (args.work / name / "report.json").read_text()
    if args.reports is not None:
        args.reports.mkdir(parents=True, exist_ok=True)
        (args.reports / f"report_{name}.json").write_text(report_text)
    report = json.loads(report_text)
    errors = relative_rotation_errors(pycolmap.Reconstruction(scene / "sparse" / "0"), reconstruction)
    if errors.size == 0:
        errors = np.array([np.nan])  # fewer than two views registered
    chunking = report.get("chunking") or {}
    loops = chunking.get("loop_closure") or {}
    ran_loops = bool(loops) and loops.get("why") != "disabled"
    return {
        "run": name,
        "registered": reconstruction.num_reg_images(),
        "views": args.views,
        "median_rre_deg": float(np.median(errors)),
        "max_rre_deg": float(np.max(errors)),
        "pairs_over_5deg": float(np.mean(errors > 5)),
        "wall_s": wall,
        "timings_s": report["timings_s"],
        "attention": report.get("attention"),
        "chunks": len(chunking.get("chunks", [])) or None,
        "loops_kept": sum(bool(entry.get("kept")) for entry in loops["loops"]) if ran_loops else None,
        "loop_candidates": len(loops["loops"]) if ran_loops else None,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--views", type=int, default=240)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--height", type=int, default=294)
    parser.add_argument("--width", type=int, default=392)
    parser.add_argument("--trajectory", default="forward")
    parser.add_argument("--chunk-size", type=int, default=48)
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--attention", choices=("auto", "dense", "gsa"), default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path("outputs/long_sequence_pipeline"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reports", type=Path, help="also copy each run's report.json here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    scene = write_scene(args, args.device)
    header = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(),
        "settings": {key: str(value) for key, value in vars(args).items()},
    }
    for name in args.runs:
        row = {**header, **run_once(name, scene, args)}
        print(json.dumps({k: v for k, v in row.items() if k not in ("machine", "settings")}), flush=True)
        with args.out.open("a") as file:
            file.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
