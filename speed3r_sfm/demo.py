"""The offline demo: a synthetic scene with ground truth, reconstructed and scored against the truth."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from jsonargparse.typing import NonNegativeInt, restricted_number_type

from .data.colmap_dataset import write_colmap_dataset
from .data.synthetic import render_scene
from .eval.metrics import absolute_trajectory_error, pose_auc, relative_pose_errors

# argument types the command line checks (jsonargparse): at least two views, sides a model can read
ViewCount = restricted_number_type("ViewCount", int, [(">=", 2), ("<=", 10_000)])
ImageSide = restricted_number_type("ImageSide", int, [(">=", 32), ("<=", 4096)])
MAX_RENDERED_PIXELS = 100_000_000  # views x height x width rendered at once
SCENE_ENTRIES = ("images", "sparse", "depths.h5")  # what write_colmap_dataset writes: all overwrite replaces


class SceneTooLargeError(ValueError):
    """More pixels than are rendered at once."""


def _check_scene(views: int, height: int, width: int) -> None:
    pixels = views * height * width
    if pixels > MAX_RENDERED_PIXELS:
        raise SceneTooLargeError(
            f"{views} views of {width}x{height} are {pixels / 1e6:.0f} M pixels; at most "
            f"{MAX_RENDERED_PIXELS / 1e6:.0f} M are rendered at once: fewer views or smaller images"
        )


def _scene_output(output: str | os.PathLike, overwrite: bool) -> Path:
    """``output`` as an absolute path, checked before rendering: an empty folder is used, another existing
    folder is replaced only with ``overwrite`` and only if it holds nothing but a scene
    (:data:`SCENE_ENTRIES`), never the current folder; a folder that cannot be created is refused."""
    from .pipeline.export import check_writable, current_folder

    path = Path(os.path.abspath(output))
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):  # new, or an empty folder
        check_writable(path)
        return path
    foreign = sorted({p.name for p in path.iterdir()} - set(SCENE_ENTRIES)) if path.is_dir() else []
    if not path.is_dir() or foreign:  # said first: overwrite would not help
        raise FileExistsError(
            f"{output} exists and is not a scene folder (only {', '.join(SCENE_ENTRIES)})"
            + (f"; it holds {', '.join(foreign[:5])}" if foreign else "")
            + "; it is never replaced: choose another folder"
        )
    if current_folder().is_relative_to(path.resolve()):
        raise FileExistsError(f"{output} is the current folder or holds it; choose another folder")
    if not overwrite:
        raise FileExistsError(
            f"{output} holds a scene already; pass overwrite=True (CLI: --overwrite true) to replace it"
        )
    return path


def synthetic_command(
    output: str | os.PathLike,
    seed: NonNegativeInt = 0,
    views: ViewCount = 24,
    height: ImageSide = 294,
    width: ImageSide = 392,
    trajectory: Literal["orbit", "forward", "random"] = "orbit",
    overwrite: bool = False,
) -> Path:
    """Render synthetic scene ``seed`` and write it as a COLMAP-format dataset (images/, sparse/0, depths.h5).

    Args:
        output: folder to create.
        seed: scene seed (scenes are deterministic per seed).
        views: number of views along the trajectory.
        height: image height in pixels.
        width: image width in pixels.
        trajectory: camera path: "orbit" (half a turn to one turn around the objects, looking at them),
            "forward" (a walking video along the ring, looking ahead and inwards, 0.12-0.3 m a frame: long
            sequences circle the room again and again) or "random" (unordered views).
        overwrite: replace an existing folder.
    """
    output = _scene_output(output, overwrite)  # before rendering
    _check_scene(views, height, width)
    gt = render_scene(seed, views, height, width, trajectory=trajectory)
    path = write_colmap_dataset(
        output, gt.images, gt.intrinsics, gt.cam_from_world, depth=gt.depth, overwrite=overwrite
    )
    print(f"wrote {views} views of synthetic scene {seed} ({trajectory}, {width}x{height}) to {path}")
    return path


def _registered_poses(reconstruction, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, 3, 4) cam_from_world of each name in ``names`` (identity where not registered) and (S,) valid."""
    by_name = {image.name: image for image in reconstruction.images.values() if image.has_pose}
    poses = torch.zeros(len(names), 3, 4, dtype=torch.float64)
    poses[:, :, :3] = torch.eye(3, dtype=torch.float64)
    valid = torch.zeros(len(names), dtype=torch.bool)
    for i, name in enumerate(names):
        if name in by_name:
            poses[i] = torch.from_numpy(by_name[name].cam_from_world().matrix())
            valid[i] = True
    return poses, valid


def _pose_scores(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, float]:
    rre, rte = relative_pose_errors(pred.double(), gt.double(), valid)
    finite = torch.isfinite(rre)
    registered = valid if valid is not None else torch.ones(len(gt), dtype=torch.bool)
    ate = absolute_trajectory_error(pred, gt, registered)[0] if registered.sum() >= 3 else float("nan")
    return {
        "median_rotation_error_deg": float(rre[finite].median()) if finite.any() else float("inf"),
        "median_translation_angle_deg": float(rte[finite].median()) if finite.any() else float("inf"),
        "auc30": pose_auc(rre, rte, 30),
        "ate": ate,
        "registered": int(registered.sum()),
    }


def demo_command(
    output: str | os.PathLike = "outputs/demo",
    seed: NonNegativeInt = 1_000_000,
    views: ViewCount = 24,
    height: ImageSide = 392,
    width: ImageSide = 518,
    trajectory: Literal["orbit", "forward", "random"] = "orbit",
    model: str = "default",
    attention: Literal["auto", "gsa", "dense"] = "auto",
    device: str = "auto",
    shared_camera: bool = True,
    overwrite: bool = True,
) -> dict:
    """Render a held-out synthetic scene, reconstruct it as a COLMAP project, and score it against the truth.

    Writes OUTPUT/scene (the images and their ground truth in COLMAP format), OUTPUT/reconstruction (the
    COLMAP project) and OUTPUT/demo.json (pose accuracy of the camera head, of the feed-forward poses that
    bundle adjustment starts from (token poses when the model exports descriptors) and of the adjusted ones).

    Args:
        output: demo folder.
        seed: scene seed (seeds from 1,000,000 are never used for training).
        views: number of views.
        height: image height.
        width: image width.
        trajectory: camera path: "orbit" (half a turn to one turn around the objects, looking at them),
            "forward" (a walking video along the ring, looking ahead and inwards, 0.12-0.3 m a frame: long
            sequences circle the room again and again) or "random" (unordered views).
        model: "default", a Hub id or a checkpoint path.
        attention: "auto" (the model's own choice), "gsa" or "dense".
        device: "auto", "cpu" or "cuda".
        shared_camera: one camera for all views (the rendered views share their intrinsics).
        overwrite: replace earlier demo outputs.
    """
    from .pipeline.backbone import check_model_spec, resolve_device
    from .pipeline.cli import stderr_is_terminal, summary_text
    from .pipeline.export import check_output
    from .pipeline.reconstruct import run_pipeline

    # before rendering: a device, model or output that cannot work fails at once
    resolve_device(device)
    check_model_spec(model)
    _check_scene(views, height, width)
    output = Path(os.path.abspath(output))
    if (output / "scene").exists():
        _scene_output(output / "scene", overwrite)
    check_output(output / "reconstruction", overwrite)
    output.mkdir(parents=True, exist_ok=True)
    gt = render_scene(seed, views, height, width, trajectory=trajectory)
    scene = write_colmap_dataset(
        output / "scene", gt.images, gt.intrinsics, gt.cam_from_world, depth=gt.depth, overwrite=overwrite
    )
    result = run_pipeline(
        scene / "images",
        output / "reconstruction",
        model=model,
        attention=attention,
        device=device,
        shared_camera=shared_camera,
        overwrite=overwrite,
        progress=stderr_is_terminal(),
    )
    order = {name: i for i, name in enumerate(sorted(p.name for p in (scene / "images").iterdir()))}
    gt_poses = gt.cam_from_world[[order[name] for name in result.image_names]]
    ba_poses, registered = _registered_poses(result.reconstruction, result.image_names)
    source = result.report["poses"]["source"]
    scores = {
        "camera head": _pose_scores(result.head_cam_from_world, gt_poses),
        "feed-forward": _pose_scores(result.feedforward_cam_from_world, gt_poses),
        "after bundle adjustment": _pose_scores(ba_poses, gt_poses, registered),
    }
    summary = {
        "scene": {"seed": seed, "views": views, "size": [width, height], "trajectory": trajectory},
        "model": model,
        "attention": attention,
        "shared_camera": shared_camera,
        "feed_forward_poses": source,  # "tokens" (from descriptors and depth) or "camera head"
        "scores": scores,
        "timings_s": result.report.get("timings_s", result.report.get("timings")),
    }
    (output / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(summary_text(result))
    print(f"\naccuracy against the ground truth ({views} views, scene {seed}):")
    for stage, values in scores.items():
        stage = f"feed-forward ({source})" if stage == "feed-forward" else stage
        print(
            f"  {stage:24s} median rotation error {values['median_rotation_error_deg']:.2f} deg, "
            f"AUC@30 {100 * values['auc30']:.1f}, registered {values['registered']}/{views}"
        )
    print(f"written: {output / 'reconstruction'} (COLMAP project), {output / 'demo.json'}")
    return summary
