"""Time and peak memory of a VGGT forward pass (random weights, official shapes) at N views.

GPU (the full-size model, bf16 autocast as in the official demo; camera + depth + point heads, no tracks):
    python benchmarks/vggt_forward.py --views 8 32 100
CPU smoke run at tiny size:
    python benchmarks/vggt_forward.py --preset tiny --views 2 --height 56 --width 84 --device cpu --output -
Writes a Markdown table (device, torch, date) to benchmarks/results/vggt_forward.md by default; the
aggregator-only column is comparable to the VGGT README's table (H100, aggregator only).
Without an installed package, run from the repository root with PYTHONPATH=. set.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from speed3r_sfm.attention import AttentionConfig
from speed3r_sfm.models.vggt import VGGT, VGGTConfig

RESULTS = Path(__file__).resolve().parent / "results"  # wherever the script is run from

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=["vggt-1b", "tiny"], default="vggt-1b")
    parser.add_argument("--views", type=int, nargs="+", default=[100])
    parser.add_argument("--height", type=int, default=392)
    parser.add_argument("--width", type=int, default=518)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=list(DTYPES), default="bf16", help="fp32 disables autocast")
    parser.add_argument("--attention", choices=["dense", "gsa"], default="dense")
    parser.add_argument(
        "--intermediate-dtype", default=None, help="dtype of the kept aggregator layers, e.g. bfloat16"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS / "vggt_forward.md"), help="'-' prints only")
    return parser.parse_args()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux; process-wide


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], object], device: torch.device, args: argparse.Namespace
) -> tuple[list[float], float]:
    """Wall times of the timed runs and the peak memory over them."""
    for _ in range(args.warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, peak_memory_gib(device)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    config = VGGTConfig.preset(
        args.preset,
        enable_track=False,
        attention=AttentionConfig(kind=args.attention),
        intermediate_dtype=args.intermediate_dtype,
    )
    torch.manual_seed(0)
    with device:
        model = VGGT(config).eval()
    parameters = sum(p.numel() for p in model.parameters())
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    autocast = dict(device_type=device.type, dtype=DTYPES[args.autocast], enabled=args.autocast != "fp32")

    def forward(images: torch.Tensor) -> None:
        with torch.inference_mode(), torch.autocast(**autocast):
            out = model(images)
        if not torch.isfinite(out["depth"]).all():
            print("warning: non-finite depth with these random weights (timing unaffected)", file=sys.stderr)

    def aggregate(images: torch.Tensor) -> None:
        with torch.inference_mode(), torch.autocast(**autocast):
            model.aggregator(images, keep=model.layers_needed())

    rows = []
    for views in args.views:
        images = torch.rand(1, views, 3, args.height, args.width, device=device)
        try:
            full, full_peak = timed(lambda images=images: forward(images), device, args)
            agg, agg_peak = timed(lambda images=images: aggregate(images), device, args)
        except torch.OutOfMemoryError:
            rows.append(f"| {views} | out of memory | | | |")
            print(f"N={views}: out of memory", file=sys.stderr)
            continue
        finally:
            del images
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(
            f"| {views} | {statistics.median(full):.3f} | {full_peak:.2f} | "
            f"{statistics.median(agg):.3f} | {agg_peak:.2f} |"
        )
        print(
            f"N={views}: forward {statistics.median(full):.3f} s, peak {full_peak:.2f} GiB; "
            f"aggregator {statistics.median(agg):.3f} s, peak {agg_peak:.2f} GiB",
            file=sys.stderr,
        )

    memory_kind = "`torch.cuda.max_memory_allocated`" if device.type == "cuda" else "process max RSS (CPU)"
    report = "\n".join(
        [
            "# VGGT forward: time and peak memory",
            "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- device: {device_name(device)}; torch {torch.__version__}",
            f"- model: preset `{args.preset}` ({parameters:,} parameters, random fp32 weights, "
            f"{weights_gib:.2f} GiB), camera + depth + point heads, attention `{args.attention}`, "
            f"autocast {args.autocast}, kept layers in {args.intermediate_dtype or 'float32'}",
            f"- input: 1 sequence of N views at {args.height}×{args.width} (H×W); "
            f"{args.warmup} warm-up + {args.repeats} timed runs (median) under `torch.inference_mode()`",
            f"- peak memory: {memory_kind}, weights included",
            f"- command: `python {' '.join(sys.argv)}`",
            "",
            "| views N | forward (s) | forward peak (GiB) | aggregator only (s) | aggregator peak (GiB) |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(report)
    if args.output != "-":
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)


if __name__ == "__main__":
    main()
