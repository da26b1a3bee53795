"""Why a bundle adjustment went wrong, against the ground truth of the held-out synthetic scenes.

Per scene (the cached renders of ``benchmarks/pipeline_synthetic.py``, 24 views, one shared camera):

- wrong observations: share of observation pairs of the final tracks whose ground-truth transfer (pixel of
  view a, true depth, true poses, into view b) lands more than 2 px (at render scale) from the observation
  in view b (true depth at the nearest pixel: at depth edges the transfer itself is wrong, so this is an
  upper bound, loose on orbits around objects);
- token-pose tree edges (the feed-forward poses bundle adjustment starts from): for the edges where the
  adjusted relative rotation differs most from the token pose, that difference, the 3D points the two views
  share, and both rotations' errors against the truth;
- the rotation error of every view relative to view 0 after BA (a "hinge": two groups, each right, joined
  at a wrong angle).

    python benchmarks/ba_diagnostics.py --trajectory forward --seeds 1000001 --upscale 4 --attention gsa \
        --out benchmarks/results/ba_diagnostics_forward1000001_up4
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pycolmap
from PIL import Image
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline_synthetic as ps  # noqa: E402

from speed3r_sfm.pipeline.reconstruct import run_pipeline  # noqa: E402


def angle_deg(rotation: np.ndarray) -> float:
    return float(np.degrees(Rotation.from_matrix(rotation).magnitude()))


def shared_points(rec: pycolmap.Reconstruction, index_of: dict[int, int]) -> dict[tuple[int, int], int]:
    shared: dict[tuple[int, int], int] = defaultdict(int)
    for point in rec.points3D.values():
        views = sorted({index_of[e.image_id] for e in point.track.elements})
        for k, a in enumerate(views):
            for b in views[k + 1 :]:
                shared[(a, b)] += 1
    return shared


def wrong_observation_share(rec, index_of, views, upscale: int, tolerance_px: float = 2.0) -> float:
    """Share of ordered observation pairs of a track whose ground-truth transfer misses by > tolerance."""
    world = views.world_points().double().numpy()
    k, pose = views.intrinsics.double().numpy(), views.cam_from_world.double().numpy()
    height, width = world.shape[1:3]
    errors = []
    for point in rec.points3D.values():
        obs = []
        for e in point.track.elements:  # COLMAP pixels (centres at +0.5) to integer centres at render scale
            xy = np.asarray(rec.image(e.image_id).points2D[e.point2D_idx].xy)
            obs.append((index_of[e.image_id], xy / upscale - 0.5))
        for a, xa in obs:
            u, v = int(round(xa[0])), int(round(xa[1]))
            if not (0 <= u < width and 0 <= v < height):
                continue
            for b, xb in obs:
                camera = pose[b, :, :3] @ world[a, v, u] + pose[b, :, 3]
                if b == a or camera[2] <= 0:
                    continue
                pixel = k[b] @ camera
                errors.append(np.linalg.norm(pixel[:2] / pixel[2] - xb))
    return float((np.array(errors) > tolerance_px).mean()) if errors else float("nan")


def diagnose(seed: int, args: argparse.Namespace) -> dict:
    render = argparse.Namespace(
        trajectory=args.trajectory, views=24, height=392, width=518, supersample=2, cache=args.cache
    )
    views = ps.load_scene(seed, render)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(views.images.shape[0]):
            image = Image.fromarray(ps.to_uint8_image(views.images[i]))
            if args.upscale > 1:
                size = (image.width * args.upscale, image.height * args.upscale)
                image = image.resize(size, Image.Resampling.BICUBIC)
            image.save(Path(tmp) / f"{i:05d}.png")
        result = run_pipeline(tmp, None, attention=args.attention, shared_camera=True)
    rec = result.reconstruction
    images = [rec.find_image_with_name(n) for n in result.image_names]
    index_of = {image.image_id: i for i, image in enumerate(images)}
    adjusted = [im.cam_from_world().rotation.matrix() if im.has_pose else None for im in images]
    token = result.feedforward_cam_from_world.double().numpy()[:, :, :3]
    truth = views.cam_from_world.double().numpy()[:, :, :3]
    shared = shared_points(rec, index_of)
    edges = []
    for i, j in (sorted(e) for e in result.report["poses"]["tree_edges"]):
        if adjusted[i] is None or adjusted[j] is None:
            continue
        ba, ff, gt = adjusted[j] @ adjusted[i].T, token[j] @ token[i].T, truth[j] @ truth[i].T
        edges.append(
            {
                "edge": [i, j],
                "ba_vs_token_deg": angle_deg(ff @ ba.T),
                "shared_points": shared.get((i, j), 0),
                "ba_error_deg": angle_deg(ba @ gt.T),
                "token_error_deg": angle_deg(ff @ gt.T),
            }
        )
    edges.sort(key=lambda e: -e["ba_vs_token_deg"])
    to_view0 = [
        None
        if r is None or adjusted[0] is None
        else angle_deg((r @ adjusted[0].T) @ (truth[j] @ truth[0].T).T)
        for j, r in enumerate(adjusted)
    ]
    return {
        "seed": seed,
        "registered": sum(r is not None for r in adjusted),
        "wrong_observation_share": wrong_observation_share(rec, index_of, views, args.upscale),
        "top_edges": edges[: args.top],
        "rotation_error_to_view0_deg": to_view0,
    }


def markdown(rows: list[dict], args: argparse.Namespace, date: str) -> str:
    lines = [
        f"# Bundle-adjustment diagnostics ({date})",
        "",
        f"`python {' '.join(sys.argv)}`: {args.trajectory} scenes at "
        f"{518 * args.upscale}x{392 * args.upscale}, attention {args.attention}, one shared camera, CPU. "
        "See the script's docstring for the columns; wrong observations are an upper bound (true depth at "
        "the nearest pixel, wrong at depth edges).",
        "",
        "| seed | registered | wrong observations | top token-pose edges: BA vs token (deg), shared points, "
        "BA / token error (deg) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        edges = "; ".join(
            f"{tuple(e['edge'])}: {e['ba_vs_token_deg']:.1f}, {e['shared_points']} pts, "
            f"{e['ba_error_deg']:.2f} / {e['token_error_deg']:.1f}"
            for e in r["top_edges"]
        )
        lines.append(f"| {r['seed']} | {r['registered']} | {r['wrong_observation_share']:.1%} | {edges} |")
    lines += ["", "Rotation error relative to view 0 after BA (deg):", ""]
    for r in rows:
        errors = ", ".join("-" if e is None else f"{e:.1f}" for e in r["rotation_error_to_view0_deg"])
        lines.append(f"- {r['seed']}: {errors}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trajectory", default="forward")
    p.add_argument("--seeds", type=int, nargs="+", default=[1000001])
    p.add_argument("--upscale", type=int, default=1)
    p.add_argument("--attention", default="auto", choices=["auto", "gsa", "dense"])
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--cache", default="outputs/pipeline_bench_cache")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = p.parse_args()
    date = datetime.date.today().isoformat()
    rows = []
    for seed in args.seeds:
        rows.append(diagnose(seed, args))
        summary = {k: v for k, v in rows[-1].items() if k != "rotation_error_to_view0_deg"}
        print(json.dumps(summary), flush=True)
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps({"date": date, "rows": rows}, indent=1))
        Path(args.out).with_suffix(".md").write_text(markdown(rows, args, date))


if __name__ == "__main__":
    main()
