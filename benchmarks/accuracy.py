"""Accuracy of reconstruction methods on held-out synthetic scenes, written as markdown + json tables.

Methods (``--methods``):
  oracle               ground truth in a random Sim(3) frame: checks the harness, shows metric floors
  sift                 pycolmap SIFT + exhaustive matching + incremental mapping, unknown intrinsics
  package.module:name  a factory ``name()`` returning a Predictor, i.e. a callable
                       images (1, S, 3, H, W) in [0, 1] -> speed3r_sfm.models.prediction.Prediction

Metrics (see speed3r_sfm/eval/evaluate.py): RRA/RTA@τ and AUC@τ over all pairs (pooled over scenes;
pairs with an unregistered view count as failures), ATE in metres after a Sim(3) fit of camera centres
(registered views only), depth AbsRel / δ<1.25 after per-image median scaling, point-cloud accuracy and
completeness in metres after the ATE alignment. "time" is the method's wall time per scene (models get
one untimed warm-up call first).

Example::

    python benchmarks/accuracy.py --methods oracle sift --views 24 --height 196 --width 259  # CPU table
    python benchmarks/accuracy.py --methods my_pkg.adapters:make_vggt sift --device cuda  # 518x392
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from speed3r_sfm.data.synthetic import HELDOUT_SEED_START, TRAJECTORIES, render_scene
from speed3r_sfm.eval.evaluate import SceneResult, evaluate_predictor, oracle_predictor, summarize
from speed3r_sfm.eval.sift_baseline import evaluate_sift_baseline

DEFAULT_SEEDS = [HELDOUT_SEED_START + i for i in range(3)]
COLUMNS = [
    ("RRA@5", "RRA@5", "{:.3f}"),
    ("RTA@5", "RTA@5", "{:.3f}"),
    ("RRA@30", "RRA@30", "{:.3f}"),
    ("RTA@30", "RTA@30", "{:.3f}"),
    ("AUC@5", "AUC@5", "{:.3f}"),
    ("AUC@30", "AUC@30", "{:.3f}"),
    ("registered", "reg.", "{:.2f}"),
    ("ATE", "ATE (m)", "{:.4f}"),
    ("AbsRel", "AbsRel", "{:.4f}"),
    ("delta<1.25", "δ<1.25", "{:.3f}"),
    ("Acc", "Acc (m)", "{:.4f}"),
    ("Comp", "Comp (m)", "{:.4f}"),
    ("time_s", "time (s)", "{:.2f}"),
]


def load_factory(spec: str) -> Callable[[], Callable]:
    """``package.module:name`` -> the object ``name`` of that module."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise SystemExit(f"model spec {spec!r} must look like package.module:factory (or 'oracle' / 'sift')")
    return getattr(importlib.import_module(module_name), attr)


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("" elsewhere): the same VM size lands on different hosts,
    and their speeds differ (the default model's dense 24-view forward: 2.75 s on an "AMD EPYC" host on
    2026-12-04, 1.75 s on the host of the tables of 2026-12-03)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_description(load_average: bool = True) -> dict[str, str]:
    """Platform, CPU, Python/torch versions and GPU name for a results file (shared by the benchmarks)."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model_name(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if load_average:
        info["load_avg_1m_at_start"] = f"{os.getloadavg()[0]:.2f}"  # other jobs on the machine slow timings
    return info


def _fmt(value: float, pattern: str) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)
    )


def markdown_table(rows: Sequence[tuple[str, dict[str, float]]], first: str) -> str:
    lines = [
        "| " + " | ".join([first] + [title for _, title, _ in COLUMNS]) + " |",
        "|" + "---|" * (len(COLUMNS) + 1),
    ]
    for name, metrics in rows:
        cells = [_fmt(metrics.get(key, math.nan), pattern) for key, _, pattern in COLUMNS]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """Render the held-out scenes, run every method, return the report (also written to --out)."""
    torch.manual_seed(0)
    kinds = args.trajectory or [TRAJECTORIES[i % len(TRAJECTORIES)] for i in range(len(args.seeds))]
    if len(kinds) == 1:
        kinds = kinds * len(args.seeds)
    if len(kinds) != len(args.seeds):
        raise SystemExit(f"--trajectory needs 1 or {len(args.seeds)} values, got {len(kinds)}")
    scenes = [
        render_scene(
            seed, args.views, args.height, args.width, kind, args.device, supersample=args.supersample
        )
        for seed, kind in zip(args.seeds, kinds, strict=True)
    ]
    factories = {m: None if m in ("oracle", "sift") else load_factory(m)() for m in args.methods}
    per_method: dict[str, list[SceneResult]] = {}
    for method, predictor in factories.items():
        if predictor is not None:  # untimed warm-up (CUDA context, kernels, compilation)
            predictor(scenes[0].images[None])
        results = []
        for seed, views in zip(args.seeds, scenes, strict=True):
            if method == "oracle":
                res = evaluate_predictor(oracle_predictor(views.to("cpu"), seed=seed), views.to("cpu"), seed)
            elif method == "sift":
                res = evaluate_sift_baseline(views.to("cpu"), seed, num_threads=args.threads)
            else:
                res = evaluate_predictor(predictor, views, seed)
            results.append(res)
            print(
                f"{method} seed {seed}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.metrics.items()),
                flush=True,
            )
        per_method[method] = results

    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(),
        "settings": {
            "seeds": list(args.seeds),
            "trajectories": kinds,
            "views": args.views,
            "height": args.height,
            "width": args.width,
            "supersample": args.supersample,
            "device": args.device,
        },
        "summary": {m: summarize(r) for m, r in per_method.items()},
        "per_scene": {
            m: [{"seed": r.seed, "time_s": r.time_s, **r.metrics, **r.extras} for r in res]
            for m, res in per_method.items()
        },
    }
    write_report(
        report, Path(args.out), args.tag or f"{args.device}_{args.views}v_{args.width}x{args.height}"
    )
    return report


def _json_safe(value):
    """NaN / inf -> None (strict JSON), recursively."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report: dict, out_dir: Path, tag: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"accuracy_{tag}.json"
    md_path = out_dir / f"accuracy_{tag}.md"
    json_path.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    st = report["settings"]
    machine = ", ".join(f"{k}: {v}" for k, v in report["machine"].items())
    parts = [
        f"# Accuracy on held-out synthetic scenes ({report['date']})",
        "",
        f"Machine: {machine}",
        "",
        f"Scenes: seeds {st['seeds']}, trajectories {st['trajectories']}, {st['views']} views each at "
        f"{st['width']}x{st['height']} (supersample {st['supersample']}). "
        "Generated by benchmarks/accuracy.py.",
        "",
        "Pose metrics pool all pairs of all scenes; pairs with an unregistered view count as failures. "
        "ATE, depth and point metrics are means over scenes (ATE/points only over registered views, after "
        "a Sim(3) fit of camera centres). Acc/Comp use 5k query points against 50k reference points per "
        "direction, so the oracle row shows their sampling floor. Depth: per-image median scaling. "
        "time = the method's wall time per scene.",
        "",
        "## Summary",
        "",
        markdown_table(list(report["summary"].items()), "method"),
        "",
        "## Per scene",
        "",
    ]
    for method, rows in report["per_scene"].items():
        parts += [f"### {method}", "", markdown_table([(str(r["seed"]), r) for r in rows], "seed"), ""]
    md_path.write_text("\n".join(parts))
    return md_path, json_path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--methods", nargs="+", default=["oracle", "sift"], help="oracle, sift or package.module:factory"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=DEFAULT_SEEDS, help="held-out scene seeds")
    p.add_argument(
        "--trajectory", nargs="+", choices=TRAJECTORIES, help="one kind, or one per seed (default: cycle)"
    )
    p.add_argument("--views", type=int, default=24)
    p.add_argument("--height", type=int, default=392, help="model input height (VGGT/π³: multiple of 14)")
    p.add_argument("--width", type=int, default=518)
    p.add_argument("--supersample", type=int, default=2, help="anti-aliasing samples per pixel side")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=-1, help="COLMAP threads for the SIFT baseline (-1: all)")
    p.add_argument("--torch-threads", type=int, help="torch CPU threads (1 avoids stalls on a busy machine)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default=None, help="file name tag (default: device_views_size)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    return run(args)


if __name__ == "__main__":
    main()
