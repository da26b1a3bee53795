"""The whole pipeline (``reconstruct``) on one long synthetic video, one pass against ordered chunks with and
without loop closure, scored against the ground truth (relative rotation error of every pair of views).

The scene is rendered once (on CUDA when there is one) and written as a COLMAP dataset under ``--work``; each
run writes its project beside it and appends one JSON line to ``--out``::

    python benchmarks/long_sequence_pipeline.py --views 240 --chunk-size 48 --out results.jsonl

Runs (``--runs``): ``single`` (one pass, ``attention="auto"``), ``chunks`` (ordered chunks, loop closure),
``chunks-open`` (ordered chunks, ``--loop_closure false``).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np
import pycolmap
import torch

import speed3r_sfm
from speed3r_sfm.data.colmap_dataset import write_colmap_dataset
from speed3r_sfm.data.synthetic import render_scene
from speed3r_sfm.pipeline import LoopOptions, PipelineOptions

RUNS = ("single", "chunks", "chunks-open")


def rotations(model: pycolmap.Reconstruction) -> dict[str, np.ndarray]:
    """World-to-camera rotation of every registered image, by name."""
    return {
        model.images[i].name: model.images[i].cam_from_world().rotation.matrix()
        for i in model.reg_image_ids()
    }


def relative_rotation_errors(truth: pycolmap.Reconstruction, run: pycolmap.Reconstruction) -> np.ndarray:
    """Degrees, one per pair of views registered in both."""
    true_rotations, run_rotations = rotations(truth), rotations(run)
    names = sorted(set(true_rotations) & set(run_rotations))
    errors = []
    for a, b in itertools.combinations(names, 2):
        relative = run_rotations[b] @ run_rotations[a].T
        true_relative = true_rotations[b] @ true_rotations[a].T
        cosine = (np.trace(relative @ true_relative.T) - 1) / 2
        errors.append(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))
    return np.asarray(errors)


def write_scene(args: argparse.Namespace, device: str) -> Path:
    scene = args.work / "scene"
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
    chunking = report.get("chunking") or {}
    loops = chunking.get("loop_closure") or {}
    return {
        "run": name,
        "registered": reconstruction.num_reg_images(),
        "views": args.views,
        "median_rre_deg": float(np.median(errors)),
        "max_rre_deg": float(errors.max()),
        "pairs_over_5deg": float(np.mean(errors > 5)),
        "wall_s": wall,
        "timings_s": report["timings_s"],
        "attention": report.get("attention"),
        "chunks": len(chunking.get("chunks", [])) or None,
        "loops_kept": sum(bool(entry.get("kept")) for entry in loops.get("loops", [])) if loops else None,
        "loop_candidates": len(loops.get("loops", [])) if loops else None,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
    }


def machine(device: str) -> dict:
    facts = {
        "platform": platform.platform(),
        "cpu_count": str(torch.get_num_threads()),
        "torch": torch.__version__,
    }
    facts["pycolmap"] = pycolmap.__version__
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path("outputs/long_sequence_pipeline"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reports", type=Path, help="also copy each run's report.json here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    scene = write_scene(args, args.device)
    header = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(args.device),
        "settings": vars(args),
    }
    header["settings"] = {k: str(v) for k, v in header["settings"].items()}
    for name in args.runs:
        row = {**header, **run_once(name, scene, args)}
        print(json.dumps({k: v for k, v in row.items() if k not in ("machine", "settings")}), flush=True)
        with args.out.open("a") as file:
            file.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
