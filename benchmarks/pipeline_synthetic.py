"""The pycolmap pipeline on held-out synthetic scenes: feed-forward vs bundle-adjusted poses, reprojection
error, timings, and pycolmap SIFT incremental mapping on the same images.

Methods (``--methods``):
  oracle            ground truth (random Sim(3) frame) with Gaussian noise on camera rotations
                    (``--rotation-noise`` degrees per axis) and centres (``--translation-noise`` metres);
                    texture keypoints, geometric view pairs (the dense-attention fallback)
  oracle-gsa        the same oracle with GSA records computed from the ground truth ("ideal GSA"):
                    keypoints in the most-selected blocks, matches in the selected views
  tiny              the tiny VGGT with GSA and random weights: times the whole path, no accuracy claim
  sift              pycolmap SIFT + exhaustive matching + incremental mapping (speed3r_sfm.eval.sift_baseline)
  MODEL             anything ``reconstruct(model=...)`` accepts: "default", a Hub id, a checkpoint path

Pose errors follow the VGGT protocol (speed3r_sfm.eval.metrics): RRE/RTE over all view pairs; the
"median rotation error" of the issue's targets is the median RRE. Images are rendered once and cached in
``--cache`` (``outputs/`` is git-ignored).

Example::

    python benchmarks/pipeline_synthetic.py --methods oracle oracle-gsa tiny sift
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accuracy import machine_description  # benchmarks/accuracy.py (this script's folder)
from PIL import Image
from render_scenes import cache_folder, render_scene_files, save_image  # this script's folder

from speed3r_sfm.data.colmap_dataset import to_uint8_image
from speed3r_sfm.data.synthetic import (
    HELDOUT_SEED_START,
    RenderedViews,
    render_scene,
)
from speed3r_sfm.eval.evaluate import evaluate_reconstruction
from speed3r_sfm.eval.sift_baseline import run_sift_baseline
from speed3r_sfm.geometry import resize_intrinsics
from speed3r_sfm.pipeline.inputs import Preprocessing
from speed3r_sfm.pipeline.oracle import SceneOracle
from speed3r_sfm.pipeline.reconstruct import ReconstructionError, run_pipeline

RESULTS = Path(__file__).resolve().parent / "results"  # wherever the script is run from

DATE = datetime.date.today().isoformat()


def machine() -> dict[str, str]:
    info = machine_description(load_average=False)  # load averages are reported before/after the run
    try:
        import pycolmap

        info["pycolmap"] = pycolmap.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def record(row: dict, out: str | Path) -> None:
    """Print one result row and append it to the .jsonl file ``out``."""
    print(json.dumps(row), flush=True)
    with open(out, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def load_scene(seed: int, args: argparse.Namespace) -> RenderedViews:
    fov = getattr(args, "fov", None)
    fov_tag = "" if fov is None else f"_fov{fov:g}"
    size = f"{args.views}v_{args.height}x{args.width}_ss{args.supersample}"
    name = f"scene{seed}_{args.trajectory}_{size}{fov_tag}.pt"
    cache = Path(args.cache) / name
    if cache.exists():
        data = torch.load(cache)
        return RenderedViews(data["images"], data["depth"], data["K"], data["pose"])
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the same scene; a GPU renders it faster
    views = render_scene(
        seed,
        args.views,
        args.height,
        args.width,
        args.trajectory,
        device=device,
        fov_x_deg=fov,
        supersample=args.supersample,
    )
    views = RenderedViews(
        *(x.cpu() for x in (views.images, views.depth, views.intrinsics, views.cam_from_world))
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "images": views.images,
            "depth": views.depth,
            "K": views.intrinsics,
            "pose": views.cam_from_world,
            "seed": seed,
        },
        cache,
    )
    print(f"rendered scene {seed} in {time.perf_counter() - start:.0f} s", flush=True)
    return views


def write_images(views: RenderedViews, seed: int, folder: Path, args: argparse.Namespace) -> None:
    """The scene's image files: the cached render upscaled ``--upscale`` times (bicubic), or rendered
    ``--render-scale`` times larger, one view at a time (sharp detail at that size; the files are cached
    beside the tensors, since the larger tensors would not fit)."""
    suffix = ".jpg" if args.image_format == "jpg" else ".png"
    if args.render_scale > 1:
        k = args.render_scale
        cached = cache_folder(args, seed, args.trajectory)
        if not cached.is_dir():
            start = time.perf_counter()
            device = "cuda" if torch.cuda.is_available() else "cpu"
            render_scene_files(cached, args, seed, args.trajectory, device)
            size = f"{args.width * k}x{args.height * k}"
            print(f"rendered scene {seed} at {size} in {time.perf_counter() - start:.0f} s")
        for path in sorted(cached.iterdir()):
            (folder / path.name).symlink_to(path.resolve())
        return
    for i in range(views.images.shape[0]):
        image = Image.fromarray(to_uint8_image(views.images[i]))
        if args.upscale > 1:
            image = image.resize((image.width * args.upscale, image.height * args.upscale), Image.BICUBIC)
        save_image(image, folder / f"{i:05d}{suffix}")


def image_scale(args: argparse.Namespace) -> int:
    """How many times larger than the cached render the image files are."""
    return args.upscale * args.render_scale


def known_camera_params(views: RenderedViews, args: argparse.Namespace) -> str | None:
    """``--known-intrinsics``: the renders' K in the written images' pixels as SIMPLE_RADIAL parameters
    (COLMAP's pixel centres, no distortion); None otherwise."""
    if not args.known_intrinsics:
        return None
    _, _, h, w = views.images.shape
    k = image_scale(args)
    scaled = resize_intrinsics(views.intrinsics[0].double(), (h, w), (h * k, w * k))
    focal = 0.5 * float(scaled[0, 0] + scaled[1, 1])
    return f"{focal:.10g},{float(scaled[0, 2]) + 0.5:.10g},{float(scaled[1, 2]) + 0.5:.10g},0"


def build_model(method: str, views: RenderedViews, args: argparse.Namespace, seed: int):
    """(model, attention) for a method name."""
    s, _, h, w = views.images.shape
    if method in ("oracle", "oracle-gsa"):
        k = image_scale(args)
        oracle = SceneOracle(
            resize_intrinsics(views.intrinsics.double(), (h, w), (h * k, w * k)),
            views.cam_from_world,
            [(w * k, h * k)] * s,
            Preprocessing("crop", w),
            depth=list(views.depth),
            depth_intrinsics=views.intrinsics,
            rotation_noise_deg=args.rotation_noise,
            translation_noise=args.translation_noise,
            seed=seed,
            records="ideal" if method == "oracle-gsa" else "none",
        )
        return oracle, "gsa" if method == "oracle-gsa" else "dense"
    if method == "tiny":
        from speed3r_sfm.attention import AttentionConfig
        from speed3r_sfm.models.vggt import VGGT, VGGTConfig

        torch.manual_seed(0)
        attention = AttentionConfig(
            kind="gsa", block_size=16, query_block_size=32, compression_block_size=16, top_k=8
        )
        return VGGT(VGGTConfig.preset("tiny", attention=attention, enable_track=False)), "gsa"
    return method, args.attention


BAD_PAIR_DEG = 5.0


def share_over(rre: torch.Tensor, degrees: float) -> float:
    """Share of view pairs whose relative rotation error exceeds ``degrees`` or is undefined (a view not
    registered): what a median hides when a few views are wrong."""
    return float((~(rre <= degrees)).double().mean())


def finite_median(errors: torch.Tensor) -> float:
    """Median over the pairs of registered views (NaN if none)."""
    finite = errors[torch.isfinite(errors)]
    return float(finite.median()) if finite.numel() else math.nan


def registered_poses(result) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) bool: which views of a ``run_pipeline`` result are registered; (S, 3, 4) float64 their
    cam_from_world (NaN where not registered; a further model holds its registered views only)."""
    rec = result.reconstruction
    images = [rec.find_image_with_name(name) for name in result.image_names]
    registered = torch.tensor([image is not None and image.has_pose for image in images])
    poses = torch.stack(
        [
            torch.from_numpy(image.cam_from_world().matrix()) if posed else torch.full((3, 4), math.nan)
            for image, posed in zip(images, registered.tolist(), strict=True)
        ]
    ).double()
    return registered, poses


def evaluate_pipeline(
    method: str, views: RenderedViews, folder: Path, args: argparse.Namespace, seed: int
) -> dict:
    model, attention = build_model(method, views, args, seed)
    width = getattr(args, "model_width", None)
    preprocessing = Preprocessing("crop", width) if width and isinstance(model, str) else None
    start = time.perf_counter()
    result = run_pipeline(
        folder,
        None,
        model=model,
        attention=attention,
        device=args.device,
        shared_camera=args.camera == "shared",
        camera_params=known_camera_params(views, args),
        preprocessing=preprocessing,
        chunk_size=getattr(args, "chunk_size", None),
        chunk_overlap=getattr(args, "chunk_overlap", None),
    )
    wall = time.perf_counter() - start
    rec = result.reconstruction
    registered, poses = registered_poses(result)
    points = (
        torch.from_numpy(np.stack([p.xyz for p in rec.points3D.values()])) if rec.num_points3D() else None
    )
    ff_metrics, ff_rre, ff_rte = evaluate_reconstruction(views, result.feedforward_cam_from_world)
    _, head_rre, _ = evaluate_reconstruction(views, result.head_cam_from_world)
    ba_metrics, ba_rre, ba_rte = evaluate_reconstruction(views, poses, registered, points=points)
    report = result.report
    return {
        "seed": seed,
        "wall_s": wall,
        "median_rre_feedforward": float(ff_rre.median()),
        "median_rre_camera_head": float(head_rre.median()),
        "pose_source": result.report["poses"]["source"],
        "median_rte_feedforward": float(ff_rte.median()),
        "median_rre_ba": finite_median(ba_rre),
        "pairs_rre_over_5deg": share_over(ba_rre, BAD_PAIR_DEG),
        "registered": float(registered.double().mean()),
        "median_rte_ba": finite_median(ba_rte),
        "rre_reduction": 1.0 - finite_median(ba_rre) / max(float(ff_rre.median()), 1e-12),
        "feedforward": ff_metrics,
        "ba": ba_metrics,
        "reprojection_error_px": report["reprojection_error_px"],
        "counts": report["counts"],
        "timings_s": {k: v for k, v in report["timings_s"].items()},
        "gsa": report["gsa_records"],
        "attention": report["attention"],
        "gsa_guidance": report["gsa_guidance"],
        "focal_length_true": float(views.intrinsics[0, 0, 0]) * image_scale(args),
        "focal_length_ba": [float(c.mean_focal_length()) for c in rec.cameras.values()],
    }


def _attention_note(report: dict) -> str:
    """What attention each model method ran, from its per-scene results."""
    notes = []
    for method, scenes in report.get("per_scene", {}).items():
        kinds = {(r["attention"], r["gsa_guidance"]) for r in scenes if "attention" in r}
        for attention, guided in sorted(kinds):
            how = "" if attention == "dense" else (" (records guide)" if guided else " (records unused)")
            notes.append(f"{method}: {attention}{how}")
    return f" Attention: {'; '.join(notes)}." if notes else ""


def _input_note(settings: dict) -> str:
    width = settings.get("model_width")
    note = f" Model input: {width} px wide (crop mode; `--model-width`)." if width else ""
    if settings.get("fov") is not None:
        note += f" Field of view: {settings['fov']:g} deg horizontal for every scene (`--fov`)."
    if settings.get("chunk_size"):
        overlap = settings.get("chunk_overlap") or max(1, settings["chunk_size"] // 4)
        note += (
            f" Chunked inference (`--chunk-size`): ordered chunks of {settings['chunk_size']} views, "
            f"overlap {overlap}, composed by Sim(3)."
        )
    if settings.get("known_intrinsics"):
        note += (
            " Intrinsics known (`--known-intrinsics`): the renders' K given to both methods "
            "(`camera_params`; COLMAP's `--ImageReader.camera_params`) and held fixed in bundle adjustment."
        )
    return note


def evaluate_sift(views: RenderedViews, folder: Path, args: argparse.Namespace, seed: int) -> dict:
    images = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()) for p in sorted(folder.iterdir())]
    )
    sfm = run_sift_baseline(
        images.permute(0, 3, 1, 2).float() / 255.0,
        num_threads=args.sift_threads,
        camera_params=known_camera_params(views, args),
    )
    metrics, rre, rte = evaluate_reconstruction(views, sfm.cam_from_world, sfm.registered, points=sfm.points)
    finite = torch.isfinite(rre)
    return {
        "seed": seed,
        "wall_s": sfm.time_s,
        "median_rre": finite_median(rre) if finite.any() else None,
        "registered": float(sfm.registered.double().mean()),
        "pairs_rre_over_5deg": share_over(rre, BAD_PAIR_DEG),
        "num_models": sfm.num_models,
        "points": int(sfm.points.shape[0]),
        "reprojection_error_px": {"final": sfm.reprojection_error_px},
        "metrics": metrics,
    }


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    per_method: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        views = load_scene(seed, args)
        with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
            folder = Path(tmp) / "images"
            folder.mkdir()
            write_images(views, seed, folder, args)
            for method in args.methods:
                if method == "sift":
                    row = evaluate_sift(views, folder, args, seed)
                else:
                    try:
                        row = evaluate_pipeline(method, views, folder, args, seed)
                    except ReconstructionError as error:  # a scene that failed: it counts as the worst one
                        registered = (error.report or {}).get("counts", {}).get("registered_images", 0)
                        row = {
                            "seed": seed,
                            "error": f"ReconstructionError: {error}",
                            "failed": True,
                            "registered": registered / args.views,
                            "pairs_rre_over_5deg": 1.0,
                        }
                    except Exception as error:  # report, e.g., "the default model is not shipped yet"
                        row = {"seed": seed, "error": f"{type(error).__name__}: {error}"}
                per_method[method].append(row)
                print(f"{method} seed {seed}: " + json.dumps(_short(row)), flush=True)
    report = {
        "date": DATE,
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "per_scene": per_method,
        "summary": summarize(per_method),
    }
    write(report, Path(args.out))
    return report


def _short(row: dict) -> dict:
    keys = (
        "median_rre_feedforward",
        "median_rre_ba",
        "pairs_rre_over_5deg",
        "registered",
        "rre_reduction",
        "wall_s",
        "median_rre",
        "error",
    )
    out = {k: row[k] for k in keys if k in row}
    if "reprojection_error_px" in row:
        out["reproj_final"] = row["reprojection_error_px"]["final"]
    return out


def _mean(values) -> float:
    """Mean of the values that are not None (NaN if none)."""
    kept = [float(v) for v in values if v is not None]
    return float(np.mean(kept)) if kept else math.nan


def _median(values) -> float:
    kept = [float(v) for v in values if v is not None]
    return float(np.median(kept)) if kept else math.nan


def summarize(per_method: dict[str, list[dict]]) -> dict:
    out = {}
    for method, rows in per_method.items():
        good = [r for r in rows if "error" not in r]
        if not good:
            out[method] = {"error": rows[0]["error"] if rows else "no scenes"}
            continue
        if method == "sift":
            out[method] = {
                "wall_s": _mean([r["wall_s"] for r in good]),
                "median_rre": _median([r["median_rre"] for r in good]),
                "registered": _mean([r["registered"] for r in good]),
                "registered_min": min(r["registered"] for r in good),
                "pairs_rre_over_5deg_max": max(r["pairs_rre_over_5deg"] for r in good),
                "reprojection_error_px": _mean([r["reprojection_error_px"]["final"] for r in good]),
                "points3D": _mean([r["points"] for r in good]),
            }
            continue
        post_model = [r["timings_s"]["total"] - r["timings_s"]["model"] for r in good]
        worst = good + [r for r in rows if r.get("failed")]  # failed scenes count in the worst-scene columns
        out[method] = {
            "median_rre_feedforward": _median([r["median_rre_feedforward"] for r in good]),
            "median_rre_ba": _median([r["median_rre_ba"] for r in good]),
            "rre_reduction_min": float(min(r["rre_reduction"] for r in good)),
            "pairs_rre_over_5deg_max": max(r["pairs_rre_over_5deg"] for r in worst),
            "registered_min": min(r["registered"] for r in worst),
            "failed_scenes": len(worst) - len(good),
            "median_rte_feedforward": _median([r["median_rte_feedforward"] for r in good]),
            "median_rte_ba": _median([r["median_rte_ba"] for r in good]),
            "reprojection_error_px": _mean([r["reprojection_error_px"]["final"] for r in good]),
            "reprojection_error_initial_px": _mean([r["reprojection_error_px"]["initial"] for r in good]),
            "points3D": _mean([r["counts"]["points3D"] for r in good]),
            "wall_s": _mean([r["wall_s"] for r in good]),
            "model_s": _mean([r["timings_s"]["model"] for r in good]),
            "pipeline_without_model_s": _mean(post_model),
        }
    if "sift" in out and "wall_s" in out["sift"]:
        for method, row in out.items():
            if method != "sift" and "wall_s" in row:
                row["speedup_vs_sift"] = out["sift"]["wall_s"] / row["wall_s"]
    return out


def _fmt(value, pattern="{:.3f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return pattern.format(value)


def _size_note(settings: dict) -> str:
    if settings.get("render_scale", 1) > 1:
        k = settings["render_scale"]
        return f"rendered {k}x larger ({settings['width'] * k}x{settings['height'] * k}, sharp)"
    return f"written {settings['upscale']}x larger (bicubic)"


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    st = report["settings"]
    load = f"{report['load_average_before'][0]:.2f} / {report['load_average_after'][0]:.2f}"
    columns = [
        "method",
        "RRE feed-forward",
        "RRE after BA",
        "pairs > 5° after BA (worst scene)",
        "views registered (worst scene)",
        "reduction (worst scene)",
        "RTE ff → BA",
        "reproj. error initial → final (px)",
        "points",
        "model (s)",
        "pipeline w/o model (s)",
        "total (s)",
        "speed-up vs SIFT",
    ]
    lines = [
        f"# The pycolmap pipeline on held-out synthetic scenes ({report['date']})",
        "",
        "Machine: " + ", ".join(f"{k}: {v}" for k, v in report["machine"].items()) + f"; load average "
        f"before/after: {load} (a load near or above the core count means other jobs shared the cores; "
        "wall-clock timings are noisy).",
        "",
        f"Scenes: seeds {st['seeds']}, {st['trajectory']} trajectory, {st['views']} views at "
        f"{st['width']}x{st['height']} (supersample {st['supersample']}), {_size_note(st)}, as "
        f"{st.get('image_format', 'png').upper()}. Oracle noise: "
        f"{st['rotation_noise']} deg per rotation axis, {st['translation_noise']} m on camera centres. "
        f"Cameras: ours {st.get('camera', 'per-image')} intrinsics, the SIFT baseline one shared camera. "
        "Generated by `benchmarks/pipeline_synthetic.py`." + _attention_note(report) + _input_note(st),
        "",
        "Median RRE / RTE: median over all view pairs of the relative rotation / translation-direction error "
        '(degrees; speed3r_sfm.eval.metrics). "pairs > 5°": share of view pairs whose RRE after BA is '
        "above 5 degrees or undefined (a view not registered), in the worst scene: a median hides a few "
        'wrong views. "pipeline w/o model": everything but the backbone call (reading, keypoints, '
        "matching, tracks, BA).",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for method, row in report["summary"].items():
        if "error" in row:
            lines.append(f"| {method} | {row['error']} |" + " |" * (len(columns) - 2))
        elif method == "sift":
            cells = ["sift (pycolmap incremental)", "–", _fmt(row["median_rre"])]
            cells += [_fmt(100 * row["pairs_rre_over_5deg_max"], "{:.0f}") + " %"]
            cells += [_fmt(100 * row["registered_min"], "{:.0f}") + " %", "–", "–"]
            cells += ["– → " + _fmt(row.get("reprojection_error_px"), "{:.2f}")]
            cells += [_fmt(row.get("points3D"), "{:.0f}"), "–", "–"]
            lines.append("| " + " | ".join(cells + [_fmt(row["wall_s"], "{:.1f}"), "1.0"]) + " |")
        else:
            cells = [
                method,
                _fmt(row["median_rre_feedforward"]),
                _fmt(row["median_rre_ba"]),
                _fmt(100 * row["pairs_rre_over_5deg_max"], "{:.0f}") + " %",
                _fmt(100 * row["registered_min"], "{:.0f}") + " %",
                _fmt(100 * row["rre_reduction_min"], "{:.0f}") + " %",
                f"{_fmt(row['median_rte_feedforward'])} → {_fmt(row['median_rte_ba'])}",
                f"{_fmt(row['reprojection_error_initial_px'], '{:.2f}')} → "
                f"{_fmt(row['reprojection_error_px'], '{:.2f}')}",
                _fmt(row["points3D"], "{:.0f}"),
                _fmt(row["model_s"], "{:.2f}"),
                _fmt(row["pipeline_without_model_s"], "{:.1f}"),
                _fmt(row["wall_s"], "{:.1f}"),
                _fmt(row.get("speedup_vs_sift"), "{:.1f}") + "×",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if "tiny" in report["summary"]:
        lines += [
            "",
            "`tiny`: random weights, so its poses and errors mean nothing; the row times the GSA path.",
        ]
    lines += ["", "## Per scene", ""]
    for method, rows in report["per_scene"].items():
        lines.append(f"### {method}")
        lines.append("")
        for row in rows:
            lines.append(f"- seed {row['seed']}: " + json.dumps(_short(row)))
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["oracle", "oracle-gsa", "tiny", "sift"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[HELDOUT_SEED_START, HELDOUT_SEED_START + 1])
    parser.add_argument("--views", type=int, default=24)
    parser.add_argument("--height", type=int, default=392)
    parser.add_argument("--width", type=int, default=518)
    parser.add_argument("--supersample", type=int, default=2)
    parser.add_argument(
        "--upscale", type=int, default=1, help="write the images this many times larger (bicubic)"
    )
    parser.add_argument(
        "--render-scale",
        type=int,
        default=1,
        help="render the images this many times larger (sharp detail; instead of --upscale)",
    )
    parser.add_argument("--image-format", default="png", choices=["png", "jpg"], help="jpg: quality 92")
    parser.add_argument("--trajectory", default="orbit")
    parser.add_argument("--rotation-noise", type=float, default=1.25)
    parser.add_argument("--translation-noise", type=float, default=0.03)
    parser.add_argument("--attention", default="auto", choices=["auto", "gsa", "dense"])
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--camera",
        default="shared",
        choices=["shared", "per-image"],
        help="our pipeline's intrinsics: one camera for all views (as the SIFT baseline, whose views "
        "share one camera) or one per image (reconstruct()'s default, as COLMAP's)",
    )
    parser.add_argument(
        "--model-width",
        type=int,
        default=None,
        help="checkpoint methods: the model's input width in crop mode, a multiple of 14 (default: the "
        "model's own; the default model: 294)",
    )
    parser.add_argument(
        "--known-intrinsics",
        action="store_true",
        help="give both methods the renders' intrinsics (camera_params), held fixed in bundle adjustment",
    )
    parser.add_argument(
        "--fov", type=float, default=None, help="horizontal field of view of every scene (default: its own)"
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="model methods: run the backbone in chunks of this many views",
    )
    parser.add_argument("--chunk-overlap", type=int, default=None, help="views shared by consecutive chunks")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--sift-threads", type=int, default=-1)
    parser.add_argument("--cache", default=str(RESULTS.parents[1] / "outputs" / "pipeline_bench_cache"))
    parser.add_argument("--out", default=str(RESULTS / "pipeline_synthetic"))
    args = parser.parse_args()
    if args.upscale > 1 and args.render_scale > 1:
        parser.error("--upscale and --render-scale exclude each other")
    if args.fov is not None and args.render_scale > 1:
        parser.error("--fov works with the cached renders only (not --render-scale)")
    run(args)


if __name__ == "__main__":
    main()
