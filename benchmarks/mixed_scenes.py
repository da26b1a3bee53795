"""Two scenes in one folder: what the default pipeline keeps of each, against each scene alone.

For each pair of held-out harness scenes (``--pairs``, e.g. ``forward1000000+orbit1000002``), the first
``--views`` renders of each (518x392, the cache of ``benchmarks/pipeline_synthetic.py``) are written into
one folder (``a_00.png``..., ``b_00.png``...) and reconstructed with ``run_pipeline(folder, model=...)``
(one camera per image, reconstruct()'s default); every scene is then reconstructed alone. Each row, per
scene, mixed (in the model that registered most of its views: 0 for sparse/0, 1 for the first further
model) and alone: views registered, median relative rotation error and pairs off by more than 5 degrees;
and how well the model's own image tokens tell the scenes apart (``token_descriptors``: the least
similarity of a view to its nearest view of its own scene, the largest to a view of the other scene)::

    python benchmarks/mixed_scenes.py --out benchmarks/results/mixed_scenes_cpu.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline_synthetic as harness  # noqa: E402

from speed3r_sfm.data.colmap_dataset import to_uint8_image  # noqa: E402
from speed3r_sfm.eval.metrics import relative_pose_errors  # noqa: E402
from speed3r_sfm.pipeline.backbone import load_backbone  # noqa: E402
from speed3r_sfm.pipeline.reconstruct import ReconstructionError, run_pipeline  # noqa: E402
from speed3r_sfm.pipeline.view_features import token_descriptors  # noqa: E402


def load(scene: str, cache: str) -> harness.RenderedViews:
    trajectory, seed = scene[:-7], int(scene[-7:])
    args = argparse.Namespace(
        views=24, height=392, width=518, supersample=2, trajectory=trajectory, fov=None, cache=cache
    )
    return harness.load_scene(seed, args)


def write(views: harness.RenderedViews, count: int, folder: Path, prefix: str) -> None:
    for i in range(count):
        Image.fromarray(to_uint8_image(views.images[i])).save(folder / f"{prefix}_{i:02d}.png")


def score(folder: Path, truths: dict[str, torch.Tensor], model: str) -> dict[str, dict]:
    """Per prefix, in the model (0: sparse/0, 1: the first further model, ...) that registered most of its
    views: registered views, median RRE and share of pairs over 5 degrees (pairs with a view registered
    elsewhere or nowhere count as off)."""
    try:
        first = run_pipeline(folder, None, model=model)
    except ReconstructionError:
        return {prefix: {"registered": 0} for prefix in truths}
    out = {}
    for prefix, truth in truths.items():
        best = None
        for index, result in enumerate([first, *first.further_models]):
            registered, poses = harness.registered_poses(result)
            index_of = {name: k for k, name in enumerate(result.image_names)}
            mine = [index_of.get(f"{prefix}_{i:02d}.png") for i in range(len(truth))]
            reg = torch.tensor([k is not None and bool(registered[k]) for k in mine])
            pose = torch.stack([poses[k] if k is not None else torch.full((3, 4), math.nan) for k in mine])
            if best is None or int(reg.sum()) > best[1]:
                best = (index, int(reg.sum()), reg, pose)
        index, count, reg, pose = best
        rre, _ = relative_pose_errors(pose, truth, reg)
        out[prefix] = {
            "model": index,
            "registered": count,
            "median_rre_deg": None if count < 2 else round(harness.finite_median(rre), 3),
            "pairs_over_5deg": round(harness.share_over(rre, 5.0), 3),
        }
    return out


def separation(images: torch.Tensor, count: int, model: str) -> dict[str, float]:
    """Token-descriptor cosine similarities: the least of a view to its nearest view of its own scene, the
    largest to a view of the other (views 0..count-1 are one scene, the rest the other)."""
    backbone = load_backbone(model, device="cpu")
    size = backbone.preprocessing.target_size
    height = round(size * images.shape[-2] / images.shape[-1] / 14) * 14
    resized = F.interpolate(images, size=(height, size), mode="bilinear", antialias=True, align_corners=False)
    features = F.normalize(token_descriptors(backbone.module, resized), dim=1)
    similarity = features @ features.T
    scene = torch.arange(len(features)) < count
    same = similarity.masked_fill(torch.eye(len(features), dtype=torch.bool), -2.0)
    own = torch.stack([same[i, scene == scene[i]].max() for i in range(len(features))])
    other = torch.stack([similarity[i, scene != scene[i]].max() for i in range(len(features))])
    return {"own_nearest_min": round(float(own.min()), 3), "other_max": round(float(other.max()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pairs",
        nargs="+",
        default=["forward1000000+orbit1000002", "forward1000000+forward1000002", "orbit1000000+orbit1000001"],
    )
    parser.add_argument("--views", type=int, default=12, help="views of each scene")
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--cache", default=str(harness.RESULTS.parents[1] / "outputs" / "pipeline_bench_cache")
    )
    parser.add_argument("--out", required=True, help="a .jsonl file the rows are appended to")
    args = parser.parse_args()
    meta = {"date": datetime.date.today().isoformat(), **harness.machine()}
    for pair in args.pairs:
        scenes = dict(zip("ab", pair.split("+"), strict=True))
        views = {prefix: load(scene, args.cache) for prefix, scene in scenes.items()}
        truths = {prefix: v.cam_from_world[: args.views].double() for prefix, v in views.items()}
        row = {"pair": pair, "views_each": args.views}
        with tempfile.TemporaryDirectory() as tmp:
            mixed = Path(tmp) / "mixed"
            mixed.mkdir()
            for prefix, v in views.items():
                write(v, args.views, mixed, prefix)
            row["mixed"] = score(mixed, truths, args.model)
            for prefix in scenes:
                alone = Path(tmp) / f"alone_{prefix}"
                alone.mkdir()
                for path in mixed.glob(f"{prefix}_*"):
                    shutil.copy(path, alone / path.name)
                row[f"alone_{prefix}"] = score(alone, {prefix: truths[prefix]}, args.model)[prefix]
        images = torch.cat([v.images[: args.views] for v in views.values()])
        row["tokens"] = separation(images, args.views, args.model)
        row.update(meta)
        harness.record(row, args.out)


if __name__ == "__main__":
    main()
