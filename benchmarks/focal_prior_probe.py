"""Would a focal-length prior (EXIF, as COLMAP reads it) help bundle adjustment? One shared camera started at
the true focal length times ``--factors`` instead of the model's, refined as usual (no prior flag: the first
round holds it, later rounds refine it), against the model's own ("none").

The scene's renders (the cache of ``benchmarks/pipeline_synthetic.py``, 518x392) are written as PNGs once;
each run is ``run_pipeline(folder, model=..., shared_camera=True)`` with ``colmap_model.make_cameras``
wrapped to set the focal length::

    python benchmarks/focal_prior_probe.py --scene orbit1000001 --runs 4 --factors none 1.0 1.04 0.96 \
        --out benchmarks/results/focal_prior_hard_orbit_cpu.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline_synthetic as harness  # noqa: E402

from speed3r_sfm.data.colmap_dataset import to_uint8_image  # noqa: E402
from speed3r_sfm.eval.metrics import relative_pose_errors  # noqa: E402

colmap_model = importlib.import_module("speed3r_sfm.pipeline.colmap_model")
pipeline = importlib.import_module("speed3r_sfm.pipeline.reconstruct")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scene", default="orbit1000001", help="trajectory and seed, e.g. orbit1000001")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--factors", nargs="+", default=["none", "1.0", "1.04", "0.96"])
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--cache", default=str(harness.RESULTS.parents[1] / "outputs" / "pipeline_bench_cache")
    )
    parser.add_argument("--out", required=True, help="a .jsonl file the rows are appended to")
    args = parser.parse_args()
    trajectory, seed = args.scene[:-7], int(args.scene[-7:])
    scene = argparse.Namespace(
        views=24, height=392, width=518, supersample=2, trajectory=trajectory, fov=None, cache=args.cache
    )
    views = harness.load_scene(seed, scene)
    truth, true_focal = views.cam_from_world.double(), float(views.intrinsics[0, 0, 0])
    make_cameras = colmap_model.make_cameras
    factor: float | None = None

    def with_focal(views, geometry, camera_model, shared_camera, calibration=None):
        cameras, ids = make_cameras(views, geometry, camera_model, shared_camera, calibration)
        # the predicted cameras only: a calibration (the fixed-camera pass's adjusted camera) stays
        for camera in cameras if factor is not None and calibration is None else []:
            params = camera.params.copy()
            params[0] = true_focal * factor
            camera.params = params
        return cameras, ids

    colmap_model.make_cameras = with_focal
    meta = {"date": datetime.date.today().isoformat(), **harness.machine()}
    with tempfile.TemporaryDirectory() as folder:
        for i in range(views.images.shape[0]):
            Image.fromarray(to_uint8_image(views.images[i])).save(Path(folder) / f"{i:05d}.png")
        for name in args.factors:
            factor = None if name == "none" else float(name)
            for run in range(args.runs):
                result = pipeline.run_pipeline(folder, None, model=args.model, shared_camera=True)
                registered, poses = harness.registered_poses(result)
                rre, _ = relative_pose_errors(poses, truth, registered)
                camera = next(iter(result.reconstruction.cameras.values()))
                row = {
                    "scene": args.scene,
                    "factor": factor,
                    "run": run,
                    "registered": int(registered.sum()),
                    "median": round(harness.finite_median(rre), 3),
                    "over5": round(harness.share_over(rre, 5.0), 3),
                    "focal": round(float(camera.params[0]), 1),
                    "true": round(true_focal, 1),
                    "wall": round(result.report["timings_s"]["total"], 1),
                    **meta,
                }
                harness.record(row, args.out)


if __name__ == "__main__":
    main()
