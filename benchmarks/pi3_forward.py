"""Time and peak memory of a π³ forward pass (random weights) at N views.

GPU (the full model, bf16 autocast as in the official demo):
    python benchmarks/pi3_forward.py --views 10 50 100
CPU smoke run at tiny size:
    python benchmarks/pi3_forward.py --preset tiny --views 4 --height 28 --width 42 --device cpu --output -
Writes a Markdown table (device, torch, date) to benchmarks/results/pi3_forward.md by default.
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
from pathlib import Path

import torch

from speed3r_sfm.attention import AttentionConfig
from speed3r_sfm.models.pi3 import Pi3, Pi3Config

RESULTS = Path(__file__).resolve().parent / "results"  # wherever the script is run from

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=["pi3", "tiny"], default="pi3")
    parser.add_argument("--views", type=int, nargs="+", default=[100])
    parser.add_argument("--height", type=int, default=392)
    parser.add_argument("--width", type=int, default=518)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=list(DTYPES), default="bf16", help="fp32 disables autocast")
    parser.add_argument("--attention", choices=["dense", "gsa"], default="dense")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS / "pi3_forward.md"), help="'-' prints only")
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


def time_forward(model: Pi3, images: torch.Tensor, args: argparse.Namespace) -> list[float]:
    device = images.device
    enabled = args.autocast != "fp32"
    times = []
    for step in range(args.warmup + args.repeats):
        synchronize(device)
        start = time.perf_counter()
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=DTYPES[args.autocast], enabled=enabled),
        ):
            out = model(images)
        synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        if step == 0 and not torch.isfinite(out["points"]).all():
            print("warning: non-finite points with these random weights (timing unaffected)", file=sys.stderr)
        del out
    return times


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    config = Pi3Config.preset(args.preset, attention=AttentionConfig(kind=args.attention))
    torch.manual_seed(0)
    with device:
        model = Pi3(config).eval()
    parameters = sum(p.numel() for p in model.parameters())
    rows = []
    for views in args.views:
        images = torch.rand(1, views, 3, args.height, args.width, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            times = time_forward(model, images, args)
        except torch.OutOfMemoryError:
            rows.append(f"| {views} | out of memory | | |")
            print(f"N={views}: out of memory", file=sys.stderr)
            continue
        finally:
            del images
        memory = peak_memory_gib(device)
        rows.append(f"| {views} | {statistics.median(times):.3f} | {min(times):.3f} | {memory:.2f} |")
        print(f"N={views}: median {statistics.median(times):.3f} s, peak {memory:.2f} GiB", file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    report = "\n".join(
        [
            "# π³ forward: time and peak memory",
            "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- device: {device_name(device)}; torch {torch.__version__}",
            f"- model: preset `{args.preset}` ({parameters:,} parameters, random fp32 weights), "
            f"attention `{args.attention}`, autocast {args.autocast}",
            f"- input: 1 sequence of N views at {args.height}×{args.width} (H×W); "
            f"{args.warmup} warm-up + {args.repeats} timed runs under `torch.inference_mode()`",
            "- peak memory: "
            + ("`torch.cuda.max_memory_allocated`" if device.type == "cuda" else "process max RSS (CPU)"),
            f"- command: `python {' '.join(sys.argv)}`",
            "",
            "| views N | median time (s) | min time (s) | peak memory (GiB) |",
            "|---|---|---|---|",
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
