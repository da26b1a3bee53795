"""The default pipeline on the held-out harness scenes with less colour: gray, sepia, washed out.

Each scene of the #7 harness (24 views at 518x392, the renders of ``--cache``) is written as PNGs in colour
and in each variant (``gray``: PIL ``convert("L")``; ``sepia``: the classic sepia matrix on the colour image,
also as JPEG quality 90, ``sepia_jpg``; ``satK``: each pixel moved towards its luminance, keeping K of its
colour), reconstructed with ``run_pipeline(folder, model=..., shared_camera=True)`` and scored against the
truth. Every row also has the colour score the pipeline computes (``View.colour_score``, median over the
views) and the input warnings the run gave (``report["input_warnings"]``)::

    python benchmarks/colour_input.py --variants colour gray sepia sepia_jpg sat0.5 sat0.35 sat0.25 sat0.1 \
        --out benchmarks/results/colour_input_cpu.jsonl
    python benchmarks/colour_input.py --photos PHOTO... --out benchmarks/results/colour_score_photos.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline_synthetic as harness  # noqa: E402

from speed3r_sfm.data.colmap_dataset import to_uint8_image  # noqa: E402
from speed3r_sfm.data.images import read_image_upright  # noqa: E402
from speed3r_sfm.eval.metrics import relative_pose_errors  # noqa: E402
from speed3r_sfm.pipeline.inputs import Preprocessing, colour_score, load_views, select_images  # noqa: E402
from speed3r_sfm.pipeline.reconstruct import ReconstructionError, run_pipeline  # noqa: E402

SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])
LUMINANCE = np.array([0.299, 0.587, 0.114])


def variant(rgb: np.ndarray, name: str) -> np.ndarray:
    """The (h, w, 3) uint8 image ``rgb`` as variant ``name`` (module docstring)."""
    pixels = rgb.astype(np.float64)
    luminance = pixels @ LUMINANCE
    if name == "colour":
        return rgb
    if name == "gray":
        return np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 3, axis=2)
    if name in ("sepia", "sepia_jpg"):
        return np.clip(pixels @ SEPIA.T, 0, 255).round().astype(np.uint8)
    if name.startswith("sat"):
        keep = float(name[3:])
        washed = luminance[..., None] + keep * (pixels - luminance[..., None])
        return np.clip(washed, 0, 255).round().astype(np.uint8)
    raise ValueError(f"unknown variant {name!r}")


def write_variant(images: torch.Tensor, name: str, folder: Path) -> None:
    for i in range(images.shape[0]):
        image = Image.fromarray(variant(to_uint8_image(images[i]), name))
        if name == "sepia_jpg":
            image.save(folder / f"{i:05d}.jpg", quality=90)
        else:
            image.save(folder / f"{i:05d}.png")


def median_colour_score(folder: Path) -> float:
    views, _, _ = load_views(select_images(folder), folder, Preprocessing(), 1600, 0.5)
    return float(np.median([view.colour_score for view in views]))


def evaluate(folder: Path, truth: torch.Tensor, model: str) -> dict:
    start = time.perf_counter()
    try:
        result = run_pipeline(folder, None, model=model, shared_camera=True)
    except ReconstructionError as error:
        return {"registered": 0, "error": str(error), "wall_s": round(time.perf_counter() - start, 1)}
    registered, poses = harness.registered_poses(result)
    rre, _ = relative_pose_errors(poses, truth, registered)
    return {
        "registered": int(registered.sum()),
        "median_rre_deg": round(harness.finite_median(rre), 3),
        "pairs_over_5deg": round(harness.share_over(rre, 5.0), 3),
        "input_warnings": [w.split(":")[0] for w in result.report["input_warnings"]],
        "wall_s": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["colour", "gray", "sepia"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1000000, 1000001, 1000002])
    parser.add_argument("--trajectories", nargs="+", default=["forward", "orbit"])
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per scene and variant (they vary a little)"
    )
    parser.add_argument(
        "--cache", default=str(harness.RESULTS.parents[1] / "outputs" / "pipeline_bench_cache")
    )
    parser.add_argument("--out", required=True, help="a .jsonl file the rows are appended to")
    parser.add_argument(
        "--photos", nargs="+", default=None, help="instead: the colour score of each of these image files"
    )
    args = parser.parse_args()
    meta = {"date": datetime.date.today().isoformat(), **harness.machine()}
    if args.photos:
        for path in map(Path, args.photos):
            image, _, size = read_image_upright(path, max_size=1600)  # as the pipeline's work copy
            score = round(colour_score(np.asarray(image.convert("RGB"))), 2)
            row = {"photo": path.name, "size": list(size), "colour_score": score, **meta}
            harness.record(row, args.out)
        return
    for trajectory in args.trajectories:
        scene = argparse.Namespace(
            views=24, height=392, width=518, supersample=2, trajectory=trajectory, fov=None, cache=args.cache
        )
        for seed in args.seeds:
            views = harness.load_scene(seed, scene)
            for name in args.variants:
                with tempfile.TemporaryDirectory() as tmp:
                    folder = Path(tmp)
                    write_variant(views.images, name, folder)
                    score = round(median_colour_score(folder), 2)
                    for run in range(args.repeats):
                        row = {
                            "scene": f"{trajectory} {seed}",
                            "variant": name,
                            "run": run,
                            "colour_score": score,
                        }
                        row.update(evaluate(folder, views.cam_from_world.double(), args.model))
                        row.update(meta)
                        harness.record(row, args.out)


if __name__ == "__main__":
    main()
