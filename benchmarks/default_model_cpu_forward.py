"""Forward time of the shipped default model on the CPU at N views, dense against GSA, for one or two code
trees (e.g. before and after a change: ``git worktree add /tmp/old COMMIT``).

Each (tree, attention, views) measurement runs in a fresh subprocess (``torch.set_num_threads(--threads)``,
one warm-up at 4 views, then ``--repeats`` timed ``model.predict`` calls, without GSA records, on random
images at the model's input size, median kept); the trees alternate so that both see the same machine load.

    python benchmarks/default_model_cpu_forward.py --trees /tmp/old . --labels before after \
        --views 24 48 96 --out benchmarks/results/default_model_cpu_forward
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

RUN_ONE = r"""
import json, sys, time, torch
from speed3r_sfm.pipeline.backbone import load_backbone
attention, views, repeats, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
backbone = load_backbone("default", attention=attention, device="cpu")
size = backbone.preprocessing.target_size
height = round(size * 3 / 4 / 14) * 14  # a 4:3 photo, cropped as the pipeline does
images = torch.rand(1, views, 3, height, size, generator=torch.Generator().manual_seed(0))
times = []
model = backbone.module  # its predict() without GSA records: the same work in every tree
with torch.inference_mode():
    model.predict(images[:, :4])
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(images)
        times.append(time.perf_counter() - start)
print(json.dumps({"times_s": times, "input": [height, size]}))
"""


def measure(tree: Path, attention: str, views: int, repeats: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
    args = [sys.executable, "-c", RUN_ONE, attention, str(views), str(repeats), str(threads)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", nargs="+", default=["."], help="code trees (one or two)")
    p.add_argument("--labels", nargs="+", default=None, help="names of the trees in the table")
    p.add_argument("--views", type=int, nargs="+", default=[24, 48, 96])
    p.add_argument("--attention", nargs="+", default=["dense", "gsa"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = p.parse_args()
    trees = [Path(t) for t in args.trees]
    if args.labels is not None and len(args.labels) != len(trees):
        p.error("--labels needs one name per tree")
    rows = []
    for views in args.views:
        for attention in args.attention:
            for tree in trees:
                result = measure(tree, attention, views, args.repeats, args.threads)
                row = {"tree": str(tree), "attention": attention, "views": views, **result}
                row["median_s"] = statistics.median(result["times_s"])
                print(json.dumps(row), flush=True)
                rows.append(row)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "threads": args.threads,
        "command": "python " + " ".join(sys.argv),
    }
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        labels = dict(zip(map(str, trees), args.labels or map(str, trees), strict=True))
        Path(args.out).with_suffix(".md").write_text(markdown(meta, rows, trees, labels))


def markdown(meta: dict, rows: list[dict], trees: list[Path], labels: dict[str, str]) -> str:
    def cell(tree: Path, attention: str, views: int) -> float:
        match = [r for r in rows if (r["tree"], r["attention"], r["views"]) == (str(tree), attention, views)]
        return match[0]["median_s"] if match else float("nan")

    views = sorted({r["views"] for r in rows})
    attentions = list(dict.fromkeys(r["attention"] for r in rows))
    columns = [(t, a) for a in attentions for t in trees]
    lines = [
        "# Default model forward on the CPU: dense vs GSA",
        "",
        f"Date {meta['date']}; {meta['machine']}; {meta['threads']} threads. Command: `{meta['command']}`.",
        f"Input {rows[0]['input'][0]}x{rows[0]['input'][1]} per view, random images; median of the timed "
        "runs, each measurement in a fresh process.",
        "",
        "| views | " + " | ".join(f"{a} ({labels[str(t)]})" for t, a in columns) + " |",
        "|---:|" + "---:|" * len(columns),
    ]
    for n in views:
        lines.append(f"| {n} | " + " | ".join(f"{cell(t, a, n):.2f} s" for t, a in columns) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
