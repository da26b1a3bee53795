"""Ceres threads for the pipeline's bundle adjustments: solve time per thread count.

Runs the pipeline once on each image folder (shipped default model, shared camera), keeps a copy of every
problem it hands to ``bundle.bundle_adjust`` (the reconstruction and the round's settings), then solves each
copy again with every ``--threads`` value, interleaved, ``--repeats`` times. Reported: the median time of
each problem and thread count, their sum per folder, and the Ceres iterations (a thread count may end a
solve in a slightly different place).

    python benchmarks/ba_threads.py FOLDER [FOLDER ...] --threads 1 2 4 8 16 --out OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import pycolmap

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy import machine_description  # noqa: E402

from speed3r_sfm.pipeline import bundle  # noqa: E402
from speed3r_sfm.pipeline.reconstruct import run_pipeline  # noqa: E402


def captured_problems(folder: str, device: str) -> list[tuple[pycolmap.Reconstruction, dict]]:
    """Every bundle adjustment of one pipeline run: (a copy of its input reconstruction, its arguments)."""
    problems = []
    solve = bundle.bundle_adjust

    def capture(rec, options, loss_scale, refine_intrinsics=True):
        settings = {"loss_scale": loss_scale, "refine": refine_intrinsics}
        problems.append((pycolmap.Reconstruction(rec), settings))
        return solve(rec, options, loss_scale, refine_intrinsics)

    bundle.bundle_adjust = capture
    try:
        run_pipeline(folder, None, model="default", device=device, shared_camera=True, progress=False)
    finally:
        bundle.bundle_adjust = solve
    return problems


def time_solve(rec: pycolmap.Reconstruction, settings: dict, threads: int) -> tuple[float, dict]:
    """Wall time of one solve and Ceres's account of it."""
    options = dataclasses.replace(bundle.BundleOptions(), num_threads=threads)
    copy = pycolmap.Reconstruction(rec)
    start = time.perf_counter()
    summary = bundle.bundle_adjust(copy, options, settings["loss_scale"], settings["refine"])
    seconds = time.perf_counter() - start
    ceres = summary.ceres_summary
    return seconds, {
        "steps": ceres.num_successful_steps + ceres.num_unsuccessful_steps,
        "threads_used": ceres.num_threads_used,
        "linear_solver": str(ceres.linear_solver_type_used).rsplit(".", 1)[-1],
        "ceres_s": ceres.total_time_in_seconds,
        "linear_solve_s": ceres.linear_solver_time_in_seconds,
        "jacobians_s": ceres.jacobian_evaluation_time_in_seconds,
        "residuals_s": ceres.residual_evaluation_time_in_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, -1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    rows = []
    for folder in args.folders:
        problems = captured_problems(folder, args.device)
        times = {n: [[] for _ in problems] for n in args.threads}
        ceres = {n: [{} for _ in problems] for n in args.threads}
        for _ in range(args.repeats):
            for index, (rec, settings) in enumerate(problems):
                for n in args.threads:
                    seconds, ceres[n][index] = time_solve(rec, settings, n)
                    times[n][index].append(seconds)
        for n in args.threads:
            medians = [statistics.median(t) for t in times[n]]
            rows.append(
                {
                    "folder": folder,
                    "images": problems[0][0].num_reg_images() if problems else 0,
                    "points3D": [rec.num_points3D() for rec, _ in problems],
                    "threads": n,
                    "solve_s": medians,
                    "total_s": sum(medians),
                    "ceres": ceres[n],
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [
        f"# Bundle adjustment time per Ceres thread count ({report['date'][:10]})",
        "",
        f"Machine: {', '.join(f'{k}: {v}' for k, v in report['machine'].items())}.",
        "",
        f"`{report['command']}`",
        "",
        "Every bundle adjustment of one pipeline run per folder, solved again from a copy of its input, "
        f"median of {args.repeats} interleaved repeats.",
        "",
        "| folder | images | points per solve | threads | solve times (s) | sum (s) | Ceres steps | "
        "linear solves / Jacobians (s, sums) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {Path(row['folder']).name} | {row['images']} | {', '.join(map(str, row['points3D']))} | "
            f"{row['threads']} | {', '.join(f'{t:.2f}' for t in row['solve_s'])} | {row['total_s']:.2f} | "
            f"{', '.join(str(c['steps']) for c in row['ceres'])} | "
            f"{sum(c['linear_solve_s'] for c in row['ceres']):.2f} / "
            f"{sum(c['jacobians_s'] for c in row['ceres']):.2f} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
