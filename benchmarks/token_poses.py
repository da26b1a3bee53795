"""Token poses vs the camera head on held-out synthetic scenes (no bundle adjustment).

For each scene: the shipped default model's prediction at 224x294, then the poses of every view relative to
view 0 from the camera head and from token poses (``speed3r_sfm.pipeline.token_poses``) with each pair
solver (``--solvers``). Reported: the median and maximum over views of the rotation error relative to view
0 (degrees; after composing a whole trajectory, so drift counts), and the median relative rotation error
between consecutive views; and how often the mutual nearest neighbours of the descriptors are the true
patch (or within one patch) for views 1 and 4 apart (ground truth from ``patch_correspondences``).

    python benchmarks/token_poses.py --seeds 1000000 1000001 1000002 --trajectories forward orbit
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy import machine_description  # noqa: E402

from speed3r_sfm.data.synthetic import render_scene  # noqa: E402
from speed3r_sfm.geometry import depth_to_world_points  # noqa: E402
from speed3r_sfm.pipeline.token_poses import (  # noqa: E402
    ROTATION_SOURCES,
    TokenPoseOptions,
    mutual_matches,
    token_poses,
)
from speed3r_sfm.training.backbone import load_exported  # noqa: E402
from speed3r_sfm.training.correspondence import patch_correspondences  # noqa: E402


def rotation_errors_deg(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) error of each view's rotation relative to view 0 and (S-1,) of consecutive relative rotations."""
    p, g = pred[:, :, :3].double(), gt[:, :, :3].double()

    def angle(r):
        return torch.rad2deg(torch.arccos(((r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)))

    to_first = angle((p @ p[0].T) @ (g @ g[0].T).transpose(-1, -2))
    consecutive = angle(
        (p[1:] @ p[:-1].transpose(-1, -2)) @ (g[1:] @ g[:-1].transpose(-1, -2)).transpose(-1, -2)
    )
    return to_first, consecutive


def match_accuracy(descriptors: torch.Tensor, gt, gap: int, patch: int) -> tuple[float, float]:
    """Share of mutual descriptor matches (views ``gap`` apart, where the truth has a match) that are the
    true patch, and that are within one patch of it."""
    points = depth_to_world_points(gt.depth, gt.intrinsics, gt.cam_from_world).float()
    cols = gt.depth.shape[-1] // patch
    exact = near = total = 0
    for i in range(descriptors.shape[0] - gap):
        pair = torch.tensor([[i, i + gap]])
        truth = patch_correspondences(
            points[None],
            gt.depth[None],
            (gt.depth > 0)[None],
            gt.intrinsics[None],
            gt.cam_from_world[None],
            pair,
            patch,
        )[0, 0]
        rows, found, _ = mutual_matches(descriptors[i], descriptors[i + gap])
        keep = truth[rows] >= 0
        found, true = found[keep], truth[rows[keep]]
        total += len(found)
        exact += int((found == true).sum())
        rows_off = ((found // cols) - (true // cols)).abs()
        cols_off = ((found % cols) - (true % cols)).abs()
        near += int(((rows_off <= 1) & (cols_off <= 1)).sum())
    return exact / max(total, 1), near / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", default=str(REPO / "speed3r_sfm" / "weights" / "default.safetensors"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1_000_000, 1_000_001, 1_000_002])
    parser.add_argument("--trajectories", nargs="+", default=["forward", "orbit"])
    parser.add_argument("--views", type=int, default=24)
    parser.add_argument("--solvers", nargs="+", default=list(ROTATION_SOURCES))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "token_poses"))
    args = parser.parse_args()

    model = load_exported(args.weights)
    rows = []
    for trajectory in args.trajectories:
        for seed in args.seeds:
            gt = render_scene(seed, args.views, 224, 294, trajectory)
            with torch.no_grad():
                prediction = model.predict(gt.images[None])
            inputs = (
                prediction.extras["descriptors"][0],
                prediction.depth[0].float(),
                prediction.depth_conf[0].float(),
                prediction.intrinsics[0].double(),
                int(prediction.extras["patch_size"]),
            )
            matches = {f"gap{gap}": match_accuracy(inputs[0], gt, gap, inputs[4]) for gap in (1, 4)}
            methods = {"camera head": prediction.cam_from_world[0]}
            seconds = {}
            for solver in args.solvers:
                start = time.perf_counter()
                poses = token_poses(*inputs, TokenPoseOptions(rotation_from=solver))
                seconds[solver] = time.perf_counter() - start
                if poses is not None:
                    methods[f"tokens ({solver})"] = poses.cam_from_world
            for name, pred in methods.items():
                to_first, consecutive = rotation_errors_deg(pred, gt.cam_from_world)
                solver = name.removeprefix("tokens (").removesuffix(")")
                rows.append(
                    {
                        "trajectory": trajectory,
                        "seed": seed,
                        "method": name,
                        "median_to_first_deg": float(to_first[1:].median()),
                        "max_to_first_deg": float(to_first.max()),
                        "median_consecutive_deg": float(consecutive.median()),
                        "solve_s": seconds.get(solver),
                        "matches_exact_within1": matches,
                    }
                )
                print(json.dumps(rows[-1]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(),
        "weights": args.weights,
        "views": args.views,
        "rows": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Token poses vs the camera head ({report['date']})",
        "",
        f"Machine: {', '.join(f'{k}: {v}' for k, v in report['machine'].items())}.",
        "",
        f"Shipped default model, {args.views} views at 224x294 per held-out scene, no bundle adjustment."
        " Rotation errors in degrees: of each view relative to view 0 (median / max over views: drift"
        " counts) and between consecutive views (median). Generated by `benchmarks/token_poses.py`.",
        "",
        "| trajectory | seed | method | median to view 0 | max to view 0 | median consecutive | solve (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        solve = "" if r["solve_s"] is None else f"{r['solve_s']:.2f}"
        lines.append(
            f"| {r['trajectory']} | {r['seed']} | {r['method']} | {r['median_to_first_deg']:.1f} |"
            f" {r['max_to_first_deg']:.1f} | {r['median_consecutive_deg']:.1f} | {solve} |"
        )
    lines += [
        "",
        "Descriptor matches (mutual nearest neighbours) that are the true patch / within one patch:",
        "",
        "| trajectory | seed | consecutive views | 4 views apart |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] == "camera head":
            m = r["matches_exact_within1"]
            lines.append(
                f"| {r['trajectory']} | {r['seed']} | {m['gap1'][0]:.2f} / {m['gap1'][1]:.2f} |"
                f" {m['gap4'][0]:.2f} / {m['gap4'][1]:.2f} |"
            )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
