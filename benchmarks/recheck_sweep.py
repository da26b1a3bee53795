"""The re-check of views on few shared points (``BundleOptions.recheck_min_shared_points``), on and off.

For each held-out scene (24 views at 518x392, the cache of ``benchmarks/pipeline_synthetic.py``) the model's
prediction is computed once; for depth-noise seeds 0..N-1 (``hinge_noise_sweep.perturbed``; seed 0: none)
the rest of the pipeline runs with one shared camera (``--camera-per-image``: one each) and one Ceres
thread (runs repeat bit for bit; ``--threads`` -1: all cores) per setting: ``base`` (0, no re-check),
``recheck40`` (the default), ``recheck50``. ``--factor``: start the shared camera at that multiple of the
true focal length instead of the model's (1.04 reproduces a view registered 11.7 deg off on the hard orbit
1000001; ``hinge_and_robustness_experiments.md``)::

    python benchmarks/recheck_sweep.py --seeds 3 --out benchmarks/results/recheck_sweep_cpu.jsonl
    python benchmarks/recheck_sweep.py --scene orbit1000001 --factor 1.04 --seeds 3 --out ...
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hinge_noise_sweep as sweep  # noqa: E402
import pipeline_synthetic as harness  # noqa: E402

from speed3r_sfm.eval.metrics import relative_pose_errors  # noqa: E402
from speed3r_sfm.pipeline.bundle import BundleOptions  # noqa: E402

colmap_model = importlib.import_module("speed3r_sfm.pipeline.colmap_model")
reconstruct = importlib.import_module("speed3r_sfm.pipeline.reconstruct")
SETTINGS = {"base": 0, "recheck40": 40, "recheck50": 50}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scene", dest="scenes", action="append", choices=sweep.SCENES, help="repeatable")
    parser.add_argument("--factor", type=float, default=None, help="focal length start / true one")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--camera-per-image", action="store_true", help="shared_camera=False")
    parser.add_argument("--threads", type=int, default=1, help="Ceres threads (-1: all cores, runs vary)")
    parser.add_argument("--cache", default="outputs/pipeline_bench_cache")
    parser.add_argument("--out", required=True, help="a .jsonl file the rows are appended to")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    meta = {"date": datetime.date.today().isoformat(), **harness.machine()}
    make_cameras = colmap_model.make_cameras
    for name in args.scenes or list(sweep.SCENES):
        trajectory, seed = sweep.SCENES[name]
        scene = argparse.Namespace(
            cache=args.cache, trajectory=trajectory, views=24, height=392, width=518, supersample=2,
            render_scale=1, upscale=1, image_format="png", known_intrinsics=True,
        )  # fmt: skip
        views = harness.load_scene(seed, scene)
        truth, true_focal = views.cam_from_world.double(), float(views.intrinsics[0, 0, 0])

        def with_focal(
            views_, geometry, camera_model, shared_camera, calibration=None, true_focal=true_focal
        ):
            cameras, ids = make_cameras(views_, geometry, camera_model, shared_camera, calibration)
            for camera in cameras if args.factor is not None and calibration is None else []:
                params = camera.params.copy()
                params[0] = true_focal * args.factor
                camera.params = params
            return cameras, ids

        with (
            tempfile.TemporaryDirectory() as folder,
            mock.patch.object(colmap_model, "make_cameras", with_focal),
        ):
            harness.write_images(views, seed, Path(folder), scene)
            base, _, _ = sweep.run_backbone_once(folder)
            for noise_seed in range(args.seeds):
                prediction = sweep.perturbed(base, 5e-4, noise_seed)
                with mock.patch.object(reconstruct, "run_backbone", sweep.returning(prediction)):
                    for setting in args.settings:
                        bundle = BundleOptions(
                            num_threads=args.threads, recheck_min_shared_points=SETTINGS[setting]
                        )
                        options = reconstruct.PipelineOptions(bundle=bundle)
                        start = time.perf_counter()
                        result = reconstruct.run_pipeline(
                            folder, None, shared_camera=not args.camera_per_image, options=options
                        )
                        wall = time.perf_counter() - start
                        registered, poses = harness.registered_poses(result)
                        rre, _ = relative_pose_errors(poses, truth, registered)
                        recheck = result.report["recheck"]
                        row = {
                            "scene": name,
                            "factor": args.factor,
                            "noise_seed": noise_seed,
                            "setting": setting,
                            "threads": args.threads,
                            "shared_camera": not args.camera_per_image,
                            "registered": int(registered.sum()),
                            "median": round(harness.finite_median(rre), 3),
                            "over5": round(harness.share_over(rre, 5.0), 3),
                            "wall": round(wall, 2),
                            "recheck": {
                                k: v for k, v in recheck.items() if k in ("views", "kept", "turned_deg")
                            },
                            **meta,
                        }
                        harness.record(row, args.out)


if __name__ == "__main__":
    main()
