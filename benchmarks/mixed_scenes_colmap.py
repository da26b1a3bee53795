"""COLMAP's own tools on a two-scene project: the models share database.db's ids.

Writes forward 1000000 + orbit 1000002 (12 + 12 views, the harness cache) into one folder, runs
``speed3r-sfm reconstruct --undistort true`` on it, then COLMAP's incremental mapper continuing from
``sparse/1`` with the project's database.db (a copy). One JSON row per run::

    python benchmarks/mixed_scenes_colmap.py --out benchmarks/results/mixed_scenes_colmap_cpu.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pycolmap

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mixed_scenes  # noqa: E402
from pipeline_synthetic import record  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", default="outputs/pipeline_bench_cache")
    parser.add_argument("--out", required=True, help="a .jsonl file the row is appended to")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, out, work = Path(tmp) / "images", Path(tmp) / "out", Path(tmp) / "mapper"
        folder.mkdir()
        work.mkdir()
        mixed_scenes.write(mixed_scenes.load("forward1000000", args.cache), 12, folder, "a")
        mixed_scenes.write(mixed_scenes.load("orbit1000002", args.cache), 12, folder, "b")
        start = time.perf_counter()
        command = [
            "speed3r-sfm",
            "reconstruct",
            str(folder),
            "-o",
            str(out),
            "--undistort",
            "true",
            "--quiet",
            "true",
        ]
        subprocess.run(command, check=True)
        row: dict = {
            "date": datetime.date.today().isoformat(),
            "reconstruct_s": round(time.perf_counter() - start, 1),
        }
        for k in (0, 1):
            model = pycolmap.Reconstruction(out / "sparse" / str(k))
            undistorted = pycolmap.Reconstruction(out / "undistorted" / "sparse" / str(k))
            row[f"sparse/{k}"] = sorted({model.images[i].name[0] for i in model.reg_image_ids()})
            row[f"sparse/{k}_registered"] = model.num_reg_images()
            row[f"undistorted/sparse/{k}"] = [
                undistorted.num_reg_images(),
                sorted({c.model.name for c in undistorted.cameras.values()}),
            ]
        with pycolmap.Database.open(out / "database.db") as db:
            row["database"] = {"images": db.num_images(), "verified_pairs": db.num_verified_image_pairs()}
        shutil.copy(out / "database.db", work / "database.db")  # the mapper writes into it
        models = pycolmap.incremental_mapping(
            work / "database.db",
            folder,
            work,
            pycolmap.IncrementalPipelineOptions(),
            input_path=out / "sparse" / "1",
        )
        row["mapper_from_sparse1"] = [
            [m.num_reg_images(), sorted({m.images[i].name[0] for i in m.reg_image_ids()})]
            for m in models.values()
        ]
    record(row, args.out)


if __name__ == "__main__":
    main()
