"""Score a COLMAP model against a ground-truth model of the same images: relative rotation error of every
pair of views registered in both (median, maximum, share of pairs off by more than 5 degrees).

    python benchmarks/relative_rotation_vs_truth.py TRUTH/sparse/0 RUN/sparse/0
"""

from __future__ import annotations

import argparse

import numpy as np
import pycolmap
import torch

from speed3r_sfm.eval.metrics import relative_pose_errors


def registered_poses(model: pycolmap.Reconstruction) -> dict[str, np.ndarray]:
    """World-to-camera pose (3, 4) of every registered image, by name."""
    images = [model.images[i] for i in model.reg_image_ids()]
    return {image.name: image.cam_from_world().matrix() for image in images}


def relative_rotation_errors(truth: pycolmap.Reconstruction, run: pycolmap.Reconstruction) -> np.ndarray:
    """Degrees, one per pair of views registered in both models (``eval.metrics.relative_pose_errors``)."""
    true_poses, run_poses = registered_poses(truth), registered_poses(run)
    names = sorted(set(true_poses) & set(run_poses))
    if len(names) < 2:
        return np.empty(0)

    def stacked(poses: dict[str, np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack([poses[name] for name in names]))

    return relative_pose_errors(stacked(run_poses), stacked(true_poses))[0].numpy()


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("truth")
    parser.add_argument("run")
    args = parser.parse_args()
    truth, model = pycolmap.Reconstruction(args.truth), pycolmap.Reconstruction(args.run)
    run = registered_poses(model)
    errors = relative_rotation_errors(truth, model)
    print(
        f"registered {len(run)}/{truth.num_reg_images()}, median RRE {np.median(errors):.3f} deg, "
        f"max {errors.max():.2f} deg, pairs > 5 deg {100 * np.mean(errors > 5):.1f} %"
    )


if __name__ == "__main__":
    main()
