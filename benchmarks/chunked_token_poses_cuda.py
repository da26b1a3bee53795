"""The shipped default chunked on CUDA (token poses per chunk) against one pass, on two held-out scenes.

    python benchmarks/chunked_token_poses_cuda.py OUT.jsonl [--device cuda|cpu] [--cache FOLDER]

Each setting runs twice (the first call of the process warms up); one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline_synthetic as ps  # noqa: E402

from speed3r_sfm.eval.evaluate import evaluate_reconstruction  # noqa: E402
from speed3r_sfm.pipeline.reconstruct import run_pipeline  # noqa: E402

SCENES = (("forward", 1000001), ("orbit", 1000000))
CHUNKS = (None, 12, None, 12)  # one pass, chunks of 12, and both again


def scene_settings(trajectory: str, device: str, cache: str) -> argparse.Namespace:
    """The harness's settings for a 24-view scene at 518x392 (renders cached in ``cache``)."""
    return argparse.Namespace(
        views=24, height=392, width=518, supersample=2, upscale=1, render_scale=1, image_format="png",
        trajectory=trajectory, cache=cache, fov=None, known_intrinsics=False, device=device,
        camera="shared",
    )  # fmt: skip


def run(folder: Path, views, chunk: int | None, device: str) -> dict:
    start = time.perf_counter()
    result = run_pipeline(folder, None, model="default", device=device, shared_camera=True, chunk_size=chunk)
    wall = time.perf_counter() - start
    registered, poses = ps.registered_poses(result)
    _, feedforward, _ = evaluate_reconstruction(views, result.feedforward_cam_from_world)
    _, adjusted, _ = evaluate_reconstruction(views, poses, registered)
    poses_report = result.report["poses"]
    return {
        "chunk": chunk,
        "source": poses_report["source"],
        "chunk_sources": poses_report.get("chunk_sources"),
        "registered": int(registered.sum()),
        "rre_ff": float(feedforward.median()),
        "rre_ba": ps.finite_median(adjusted),
        "pairs_off": ps.share_over(adjusted, 5.0),
        "wall_s": wall,
    }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("out", type=Path, help="JSON-lines file to write")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--cache", default=str(ps.RESULTS.parents[1] / "outputs" / "pipeline_bench_cache"))
    args = parser.parse_args()
    device = args.device
    rows = []
    for trajectory, seed in SCENES:
        settings = scene_settings(trajectory, device, args.cache)
        views = ps.load_scene(seed, settings)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "images"
            folder.mkdir()
            ps.write_images(views, seed, folder, settings)
            for chunk in CHUNKS:
                row = {"scene": f"{trajectory}{seed}", **run(folder, views, chunk, device)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
