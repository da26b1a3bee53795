"""Render benchmark scenes at ``--render-scale`` times 518x392 into the cache of ``pipeline_synthetic.py``.

The large renders (``--render-scale 8``: 4144x3136) take seconds per view on a GPU and far longer on two CPU
cores, so they are made where a GPU is and the cache folder is carried back; this script needs only
torch, kornia, kornia-rs and Pillow (no pycolmap). ``pipeline_synthetic.py --render-scale K`` then finds the
folders and times the pipeline on them.

    python benchmarks/render_scenes.py --scenes orbit:1000001 forward:1000000 --render-scale 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image

from speed3r_sfm.data.images import to_uint8_image
from speed3r_sfm.data.synthetic import make_cameras, make_scene, render_views


def cache_folder(args: argparse.Namespace, seed: int, trajectory: str) -> Path:
    """Where ``pipeline_synthetic.py`` looks for a scene's ``args.render_scale``-times renders (``args``:
    either script's options: cache, views, height, width, supersample, render_scale, image_format)."""
    name = f"scene{seed}_{trajectory}_{args.views}v_{args.height}x{args.width}_ss{args.supersample}"
    return Path(args.cache) / f"{name}_x{args.render_scale}_{args.image_format}"


def save_image(image: Image.Image, path: Path) -> None:
    if path.suffix == ".jpg":
        image.save(path, quality=92)  # a typical camera setting
    else:
        image.save(path)


def render_scene_files(
    folder: Path, args: argparse.Namespace, seed: int, trajectory: str, device: str
) -> None:
    """Render every view at ``args.render_scale`` times the size, one at a time, into ``folder`` (written
    beside it and renamed when complete)."""
    height, width = args.height * args.render_scale, args.width * args.render_scale
    scene = make_scene(seed).to(device)
    intrinsics, poses = make_cameras(scene, args.views, height, width, trajectory)
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    suffix = ".jpg" if args.image_format == "jpg" else ".png"
    for i in range(args.views):
        k_i, pose_i = intrinsics[i : i + 1], poses[i : i + 1]
        view = render_views(scene, k_i, pose_i, height, width, supersample=args.supersample)
        save_image(Image.fromarray(to_uint8_image(view.images[0])), partial / f"{i:05d}{suffix}")
    partial.rename(folder)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", nargs="+", required=True, help="TRAJECTORY:SEED, e.g. orbit:1000001")
    parser.add_argument("--render-scale", type=int, default=8)
    parser.add_argument("--views", type=int, default=24)
    parser.add_argument("--height", type=int, default=392)
    parser.add_argument("--width", type=int, default=518)
    parser.add_argument("--supersample", type=int, default=2)
    parser.add_argument("--image-format", default="jpg", choices=["png", "jpg"])
    parser.add_argument("--cache", default="outputs/pipeline_bench_cache")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    for spec in args.scenes:
        trajectory, seed = spec.split(":")
        folder = cache_folder(args, int(seed), trajectory)
        if folder.is_dir():
            print(f"{folder} exists")
            continue
        start = time.perf_counter()
        render_scene_files(folder, args, int(seed), trajectory, args.device)
        size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        print(f"{folder}: {time.perf_counter() - start:.0f} s, {size:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
