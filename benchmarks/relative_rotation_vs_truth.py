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


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("truth")
    parser.add_argument("run")
    args = parser.parse_args()
    truth, run = rotations(pycolmap.Reconstruction(args.truth)), rotations(pycolmap.Reconstruction(args.run))
    names = sorted(set(truth) & set(run))
    errors = []
    for a, b in itertools.combinations(names, 2):
        difference = (run[b] @ run[a].T) @ (truth[b] @ truth[a].T).T
        errors.append(np.degrees(np.arccos(np.clip((np.trace(difference) - 1) / 2, -1.0, 1.0))))
    errors = np.array(errors)
    print(
        f"registered {len(run)}/{len(truth)}, median RRE {np.median(errors):.3f} deg, "
        f"max {errors.max():.2f} deg, pairs > 5 deg {100 * np.mean(errors > 5):.1f} %"
    )


if __name__ == "__main__":
    main()
