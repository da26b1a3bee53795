"""The default model's aggregator in bf16 on the CPU (``VGGTConfig.cpu_bf16_aggregator``): attention kernel
times, ``predict`` times with the option off and on, and how far depth, confidence, poses and descriptors
move.

Needs a CPU whose oneDNN runs bf16 natively (AVX512-BF16 or AMX); elsewhere the option is off and the script
says so. Timings: median of ``--repeats`` calls after a warm-up, the two settings interleaved.

    python benchmarks/cpu_bf16_aggregator.py --views 24 --out benchmarks/results/cpu_bf16_aggregator
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from speed3r_sfm.attention.dense import chunked_bf16_attention
from speed3r_sfm.models.cpu_features import cpu_has_native_bf16
from speed3r_sfm.pipeline.backbone import load_backbone


def interleaved_times(functions: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, called in turn ``repeats`` times after one warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for fn in functions.values():
        fn()
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def kernel_times(tokens: int, heads: int, head_dim: int, repeats: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, head_dim, generator=generator) for _ in range(3))
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    functions = {
        "sdpa float32": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa bf16": lambda: F.scaled_dot_product_attention(qb, kb, vb),
        "chunked bf16 matmuls": lambda: chunked_bf16_attention(qb, kb, vb),
    }
    return interleaved_times(functions, repeats)


def relative(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    rel = ((b.double() - a.double()).abs() / a.double().abs().clamp_min(1e-6)).flatten()
    sample = rel[:: max(1, rel.numel() // 4_000_000)]
    return {"median": float(sample.median()), "p99": float(sample.quantile(0.99)), "max": float(rel.max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, help="output path without extension (.json and .md)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_has_native_bf16():
        raise SystemExit(
            "this CPU has no native bf16 (AVX512-BF16 or AMX): cpu_bf16_aggregator stays off here"
        )

    backbone = load_backbone("default", attention="dense", device="cpu")
    model = backbone.module
    size = backbone.preprocessing.target_size
    height = round(size * 3 / 4 / 14) * 14
    images = torch.rand(1, args.views, 3, height, size, generator=torch.Generator().manual_seed(0))
    tokens_per_view = (height // 14) * (size // 14) + 1 + model.config.num_register_tokens
    dim, heads = model.config.embed_dim, model.config.num_heads
    kernels = kernel_times(args.views * tokens_per_view, heads, dim // heads, 3 * args.repeats)

    outputs, times = {}, {False: [], True: []}
    with torch.inference_mode():
        for flag in (False, True):
            model.config.cpu_bf16_aggregator = flag
            outputs[flag] = model.predict(images)  # warm-up, kept for the comparison
        for _ in range(args.repeats):
            for flag in (False, True):
                model.config.cpu_bf16_aggregator = flag
                start = time.perf_counter()
                model.predict(images)
                times[flag].append(time.perf_counter() - start)
    exact, fast = outputs[False], outputs[True]
    rotation = torch.einsum("...ij,...kj->...ik", exact.cam_from_world[..., :3], fast.cam_from_world[..., :3])
    angle = torch.rad2deg(torch.arccos(((rotation.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)))
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "views": args.views,
        "input": [height, size],
        "tokens": args.views * tokens_per_view,
        "attention_kernel_s": kernels,
        "predict_s": {
            "float32": statistics.median(times[False]),
            "bf16 aggregator": statistics.median(times[True]),
        },
        "depth_relative": relative(exact.depth, fast.depth),
        "confidence_relative": relative(exact.depth_conf, fast.depth_conf),
        "rotation_change_deg": {"median": float(angle.median()), "max": float(angle.max())},
        "descriptor_max_abs": float(
            (exact.extras["descriptors"].float() - fast.extras["descriptors"].float()).abs().max()
        ),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    ratio = result["predict_s"]["float32"] / result["predict_s"]["bf16 aggregator"]
    lines = [
        "# The default model's aggregator in bf16 on the CPU",
        "",
        f"Date {result['date']}; {result['machine']['platform']}, torch {torch.__version__}, "
        f"{args.threads} threads. "
        f"Generated by `python benchmarks/cpu_bf16_aggregator.py --views {args.views} --out {args.out}`.",
        f"{args.views} random views at {height}x{size} ({result['tokens']} tokens), median of "
        f"{args.repeats} calls (the attention kernels: {3 * args.repeats}, interleaved).",
        "",
        "| attention kernel, one global layer | time (s) |",
        "|---|---:|",
        *[f"| {name} | {seconds:.3f} |" for name, seconds in kernels.items()],
        "",
        "| `predict` | time (s) |",
        "|---|---:|",
        *[f"| {name} | {seconds:.2f} |" for name, seconds in result["predict_s"].items()],
        "",
        f"Speed-up {ratio:.2f}x. Differences of the bf16 aggregator's outputs from float32: depth (relative) "
        f"median {result['depth_relative']['median']:.2e}, p99 {result['depth_relative']['p99']:.2e}, "
        f"max {result['depth_relative']['max']:.2e}; confidence median "
        f"{result['confidence_relative']['median']:.2e}; "
        f"camera-head rotations {result['rotation_change_deg']['median']:.3f} deg median, "
        f"{result['rotation_change_deg']['max']:.3f} max; descriptors "
        f"{result['descriptor_max_abs']:.2e} max abs.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
