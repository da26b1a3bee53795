"""Score a COLMAP model against a ground-truth model of the same images: relative rotation error of every
pair of views registered in both (median, maximum, share of pairs off by more than 5 degrees).

    python benchmarks/relative_rotation_vs_truth.py TRUTH/sparse/0 RUN/sparse/0
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import pycolmap


def rotations(model: pycolmap.Reconstruction) -> dict[str, np.ndarray]:
    """World-to-camera rotation of every registered image, by name."""
    images = [model.images[i] for i in model.reg_image_ids()]
    return {image.name: image.cam_from_world().rotation.matrix() for image in images}


def relative_rotation_errors(truth: pycolmap.Reconstruction, run: pycolmap.Reconstruction) -> np.ndarray:
    """Degrees, one per pair of views registered in both models."""
    true_rotations, run_rotations = rotations(truth), rotations(run)
    names = sorted(set(true_rotations) & set(run_rotations))
    errors = []
    for a, b in itertools.combinations(names, 2):
        difference = (run_rotations[b] @ run_rotations[a].T) @ (true_rotations[b] @ true_rotations[a].T).T
        errors.append(np.degrees(np.arccos(np.clip((np.trace(difference) - 1) / 2, -1.0, 1.0))))
    return np.asarray(errors)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("truth")
    parser.add_argument("run")
    args = parser.parse_args()
    truth, model = pycolmap.Reconstruction(args.truth), pycolmap.Reconstruction(args.run)
    run = rotations(model)
    errors = relative_rotation_errors(truth, model)
    print(
        f"registered {len(run)}/{truth.num_reg_images()}, median RRE {np.median(errors):.3f} deg, "
        f"max {errors.max():.2f} deg, pairs > 5 deg {100 * np.mean(errors > 5):.1f} %"
    )


if __name__ == "__main__":
    main()
