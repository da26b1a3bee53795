"""How often pipeline settings join two groups of views at a wrong angle (a hinge) under tiny depth noise.

For each held-out scene (24 views at 518x392, or ``--views``; optionally written ``--upscale`` times larger):
the prediction of the model (``--model``; the shipped default) is computed once on the CPU; then, for noise
seeds 0..N-1, its depth is multiplied by (1 + sigma N(0, 1)) (seed 0: unperturbed) and the rest of the
pipeline runs from it with each setting.
Settings are ``NAME:bundle_key=value;...|keypoints_key=value;...|match_key=value;...|known_intrinsics``
(BundleOptions / KeypointOptions / MatchOptions fields; a last section ``known_intrinsics`` gives the renders'
intrinsics as ``camera_params``; trailing sections may be left out).
One JSON line per run: views registered, median relative rotation error after BA, share of pairs > 5 deg.

    python benchmarks/hinge_noise_sweep.py --out sweep.jsonl --seeds 6 \\
        "old:initial_loss_scale=8.0|confidence_quantile=0.2" "new:"
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline_synthetic as harness  # noqa: E402

from speed3r_sfm.eval.evaluate import evaluate_reconstruction  # noqa: E402
from speed3r_sfm.pipeline.bundle import BundleOptions  # noqa: E402
from speed3r_sfm.pipeline.keypoints import KeypointOptions  # noqa: E402
from speed3r_sfm.pipeline.matching import MatchOptions  # noqa: E402

# the held-out scenes of the pipeline tables, by name
SCENES = {
    f"{trajectory}{seed}": (trajectory, seed)
    for trajectory in ("forward", "orbit")
    for seed in (1000000, 1000001, 1000002)
}

# the module, not the function ``speed3r_sfm.pipeline.reconstruct`` that the package exports
reconstruct = importlib.import_module("speed3r_sfm.pipeline.reconstruct")


def parse_setting(text: str) -> tuple[str, reconstruct.PipelineOptions, bool]:
    """``NAME:bundle_key=value;...|keypoints_key=value;...|match_key=value;...|known_intrinsics`` -> (name,
    options, whether to give the renders' intrinsics)."""
    name, _, spec = text.partition(":")
    bundle_spec, _, rest = spec.partition("|")
    keypoint_spec, _, rest = rest.partition("|")
    match_spec, _, run_spec = rest.partition("|")
    if run_spec not in ("", "known_intrinsics"):
        raise SystemExit(f"setting {text!r}: the last section may only be 'known_intrinsics'")

    def fields(spec: str, cls: type) -> dict:
        out = {}
        for item in filter(None, spec.split(";")):
            key, value = item.split("=")
            kind = type(getattr(cls(), key))
            out[key] = value == "True" if kind is bool else kind(value)
        return out

    bundle = BundleOptions(**fields(bundle_spec, BundleOptions))
    keypoints = KeypointOptions(**fields(keypoint_spec, KeypointOptions))
    matching = MatchOptions(**fields(match_spec, MatchOptions))
    options = reconstruct.PipelineOptions(bundle=bundle, keypoints=keypoints, matching=matching)
    return name, options, run_spec == "known_intrinsics"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("settings", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=6, help="noise seeds per scene (0: no noise)")
    parser.add_argument("--sigma", type=float, default=5e-4, help="relative depth noise")
    parser.add_argument("--upscale", type=int, default=1)
    parser.add_argument(
        "--views", type=int, default=24, help="views per scene (attention: the default's auto)"
    )
    parser.add_argument("--cache", default="outputs/pipeline_bench_cache")
    parser.add_argument("--model", default="default", help="what reconstruct(model=...) accepts")
    parser.add_argument(  # one scene per flag: a list option would swallow the settings after it
        "--scene", dest="scenes", action="append", choices=SCENES, help="only this scene (repeatable)"
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    settings = [parse_setting(text) for text in args.settings]
    for scene_name, (trajectory, seed) in SCENES.items():
        if args.scenes is not None and scene_name not in args.scenes:
            continue
        label = f"{scene_name}_up{args.upscale}" + ("" if args.views == 24 else f"_{args.views}v")
        scene = argparse.Namespace(
            cache=args.cache, trajectory=trajectory, views=args.views, height=392, width=518, supersample=2,
            render_scale=1, upscale=args.upscale, image_format="png", known_intrinsics=True,
        )  # fmt: skip
        views = harness.load_scene(seed, scene)
        known = harness.known_camera_params(views, scene)
        with tempfile.TemporaryDirectory() as folder:
            harness.write_images(views, seed, Path(folder), scene)
            base, _, _ = run_backbone_once(folder, args.model)
            for noise_seed in range(args.seeds):
                prediction = perturbed(base, args.sigma, noise_seed)
                with mock.patch.object(reconstruct, "run_backbone", returning(prediction)):
                    for name, options, with_known in settings:
                        row = evaluate(folder, views, options, known if with_known else None, args.model)
                        row.update(scene=label, noise_seed=noise_seed, setting=name)
                        print(json.dumps(row), flush=True)
                        with args.out.open("a") as f:
                            f.write(json.dumps(row) + "\n")


def run_backbone_once(folder: str, model: str = "default"):
    """The model's output for the images in ``folder`` (one pipeline run, the backbone call kept)."""
    kept = {}
    run_backbone = reconstruct.run_backbone

    def keep(*a, **k):
        kept["out"] = run_backbone(*a, **k)
        return kept["out"]

    with mock.patch.object(reconstruct, "run_backbone", keep):
        reconstruct.run_pipeline(folder, None, model=model, device="cpu", shared_camera=True)
    return kept["out"]


def returning(prediction):
    """A stand-in for the pipeline's backbone call that returns ``prediction``."""
    return lambda *args, **kwargs: (prediction, None, None)


def perturbed(prediction, sigma: float, noise_seed: int):
    """``prediction`` with its depth multiplied by (1 + sigma N(0, 1)); seed 0 leaves it as it is."""
    if noise_seed == 0:
        return prediction
    generator = torch.Generator().manual_seed(noise_seed)
    noise = torch.randn(prediction.depth.shape, generator=generator)
    return reconstruct.replace(prediction, depth=prediction.depth * (1 + sigma * noise))


def evaluate(folder: str, views, options, camera_params: str | None = None, model: str = "default") -> dict:
    start = time.perf_counter()
    result = reconstruct.run_pipeline(
        folder,
        None,
        model=model,
        device="cpu",
        shared_camera=True,
        options=options,
        camera_params=camera_params,
    )
    wall = time.perf_counter() - start
    registered, poses = harness.registered_poses(result)
    _, rre, _ = evaluate_reconstruction(views, poses, registered)
    return {
        "registered": int(registered.sum()),
        "median_rre": harness.finite_median(rre),
        "pairs_over_5": harness.share_over(rre, 5.0),
        "points": result.reconstruction.num_points3D(),
        "wall_s": wall,
    }


if __name__ == "__main__":
    main()
