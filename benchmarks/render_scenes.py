"""Render benchmark scenes at ``--render-scale`` times 518x392 into the cache of ``pipeline_synthetic.py``.

The large renders (``--render-scale 8``: 4144x3136) take seconds per view on a GPU and far longer on two CPU
cores, so they are made where a GPU is and the cache folder is carried back; this script needs only torch,
kornia and Pillow (no pycolmap). ``pipeline_synthetic.py --render-scale K`` then finds the folders and times
the pipeline on them.

    python benchmarks/render_scenes.py --scenes orbit:1000001 forward:1000000 --render-scale 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from speed3r_sfm.data.synthetic import make_cameras, make_scene, render_views


def cache_folder(
    cache: str | Path,
    seed: int,
    trajectory: str,
    views: int,
    height: int,
    width: int,
    supersample: int,
    scale: int,
    image_format: str,
) -> Path:
    """Where ``pipeline_synthetic.py`` looks for a scene's ``scale``-times renders."""
    name = f"scene{seed}_{trajectory}_{views}v_{height}x{width}_ss{supersample}"
    return Path(cache) / f"{name}_x{scale}_{image_format}"


def save_image(image: Image.Image, path: Path) -> None:
    if path.suffix == ".jpg":
        image.save(path, quality=92)  # a typical camera setting
    else:
        image.save(path)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8 from a (3, H, W) float image in [0, 1] (``colmap_dataset.to_uint8_image``, whose
    module needs pycolmap)."""
    arr = image.detach().cpu().numpy().transpose(1, 2, 0)
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_scene_files(
    folder: Path,
    seed: int,
    trajectory: str,
    views: int,
    height: int,
    width: int,
    supersample: int,
    image_format: str,
    device: str,
) -> None:
    """Render every view at ``height`` x ``width``, one at a time, into ``folder`` (written beside it and
    renamed when complete)."""
    scene = make_scene(seed).to(device)
    intrinsics, poses = make_cameras(scene, views, height, width, trajectory)
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    suffix = ".jpg" if image_format == "jpg" else ".png"
    for i in range(views):
        view = render_views(
            scene, intrinsics[i : i + 1], poses[i : i + 1], height, width, supersample=supersample
        )
        save_image(Image.fromarray(to_uint8(view.images[0])), partial / f"{i:05d}{suffix}")
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
    k = args.render_scale
    for spec in args.scenes:
        trajectory, seed = spec.split(":")
        folder = cache_folder(
            args.cache,
            int(seed),
            trajectory,
            args.views,
            args.height,
            args.width,
            args.supersample,
            k,
            args.image_format,
        )
        if folder.is_dir():
            print(f"{folder} exists")
            continue
        start = time.perf_counter()
        render_scene_files(
            folder,
            int(seed),
            trajectory,
            args.views,
            args.height * k,
            args.width * k,
            args.supersample,
            args.image_format,
            args.device,
        )
        size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        print(f"{folder}: {time.perf_counter() - start:.0f} s, {size:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
