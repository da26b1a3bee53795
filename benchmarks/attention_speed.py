"""Dense SDPA vs Global Sparse Attention on the GPU: one global-attention layer, and the full VGGT-1B model.

Layer: B=1, 16 heads x 64, bf16, views x 1041 tokens (5 special), inference; dense and GSA in the same run,
median time of CUDA-event-timed calls after a warm-up (which includes torch.compile), peak allocated memory
(inputs included), and the ratio. GSA is timed at its training-free init (compression branch skipped: its
gate is exactly 0) and with a non-zero gate (both branches).

Model: VGGT-1B shape with random weights, camera + depth heads, 518x392 images, bf16 autocast, inference.

    python benchmarks/attention_speed.py --parts layer sweep train model
    python benchmarks/attention_speed.py --render benchmarks/results/attention_speed.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from speed3r_sfm.attention import AttentionConfig, GlobalSparseAttention, ViewLayout, build_global_attention

RESULTS = Path(__file__).parent / "results"
GIB = 1024**3


def cuda_time(fn: Callable[[], object], reps: int, warmup: int) -> tuple[float, float, float]:
    """(median seconds, first warm-up seconds, peak GiB allocated during the timed calls)."""
    first = 0.0
    for i in range(warmup):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i == 0:
            first = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times), first, torch.cuda.max_memory_allocated() / GIB


def gsa_module(config: AttentionConfig, gated: bool) -> GlobalSparseAttention:
    module = GlobalSparseAttention(config, num_heads=16, head_dim=64, layer_index=0).cuda()
    if gated:
        with torch.no_grad():
            module.gate.bias.fill_(0.1)  # non-zero gate: both branches computed
    return module


class Recorder:
    def __init__(self, path: Path, meta: dict) -> None:
        self.path = path
        self.data = {**meta, "layer": [], "sweep": [], "train": [], "model": [], "notes": []}
        if path.exists():
            old = json.loads(path.read_text())
            for key in ("layer", "sweep", "train", "model", "notes"):
                self.data[key] = old.get(key, [])

    def add(self, part: str, row: dict) -> None:
        self.data[part] = [r for r in self.data[part] if r.get("key") != row.get("key")] + [row]
        self.path.write_text(json.dumps(self.data, indent=1))
        print(part, json.dumps(row), flush=True)


def layer_inputs(views: int, tokens: int) -> list[torch.Tensor]:
    return [torch.randn(1, 16, views * tokens, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]


def bench_layer(
    rec: Recorder, views_list: list[int], config: AttentionConfig, tokens: int, special: int
) -> None:
    dense_warm = False
    for views in views_list:
        q, k, v = layer_inputs(views, tokens)
        layout = ViewLayout(views, tokens, special)
        row = {"key": f"layer-{views}", "views": views, "tokens": views * tokens}
        with torch.inference_mode():
            for name, gated in (("gsa", False), ("gsa_gated", True)):
                module = gsa_module(config, gated)
                try:
                    run = functools.partial(module, q, k, v, layout)
                    t, first, mem = cuda_time(run, reps=5, warmup=2)
                    row.update({f"{name}_s": t, f"{name}_first_s": first, f"{name}_peak_gib": mem})
                except torch.OutOfMemoryError:
                    row[f"{name}_s"] = "OOM"
                torch.cuda.empty_cache()
            reps = 3 if views <= 500 else 1
            try:
                t, _, mem = cuda_time(
                    functools.partial(F.scaled_dot_product_attention, q, k, v),
                    reps=reps,
                    warmup=0 if dense_warm else 1,
                )
                dense_warm = True
                row.update({"dense_s": t, "dense_peak_gib": mem, "dense_reps": reps})
            except torch.OutOfMemoryError:
                row["dense_s"] = "OOM"
        if isinstance(row.get("dense_s"), float):
            for name in ("gsa", "gsa_gated"):
                if isinstance(row.get(f"{name}_s"), float):
                    row[f"{name}_speedup"] = row["dense_s"] / row[f"{name}_s"]
        rec.add("layer", row)
        del q, k, v
        torch.cuda.empty_cache()


SWEEP = {
    "default": {},
    "specials-in-flex": {"special_kernel": "flex"},
    "shared-heads": {"per_head_selection": False},
    "block64-top16": {"block_size": 64, "top_k": 16},
    "top16": {"top_k": 16},
    "top4": {"top_k": 4},
    "no-own-view": {"include_own_view": False},
    "compression128": {"compression_block_size": 128},
    "warps8": {"flex_kernel_options": {"num_warps": 8}},
    "stages2": {"flex_kernel_options": {"num_stages": 2}},
    "tma": {"flex_kernel_options": {"USE_TMA": True}},
    "no-tma": {"flex_kernel_options": {"fwd_USE_TMA": False}},
}


def bench_sweep(rec: Recorder, views: int, base: AttentionConfig, tokens: int, special: int, names) -> None:
    q, k, v = layer_inputs(views, tokens)
    for name in names:
        fields = {**base.__dict__, **SWEEP[name]}
        config = AttentionConfig(**fields)
        layout = ViewLayout(views, tokens, special)
        row = {"key": f"sweep-{name}-{views}", "name": name, "views": views, "overrides": SWEEP[name]}
        with torch.inference_mode():
            for label, gated in (("gsa", False), ("gsa_gated", True)):
                module = gsa_module(config, gated)
                t, first, mem = cuda_time(functools.partial(module, q, k, v, layout), reps=5, warmup=2)
                row.update({f"{label}_s": t, f"{label}_first_s": first, f"{label}_peak_gib": mem})
            records: list = []
            with_records = ViewLayout(views, tokens, special, records=records)
            module = gsa_module(config, False)
            t, _, _ = cuda_time(functools.partial(module, q, k, v, with_records), reps=3, warmup=1)
            row["gsa_with_records_s"] = t
        rec.add("sweep", row)


def _train_step(fn, leaves, grad) -> None:
    for t in leaves:
        t.grad = None
    fn().backward(grad)


def bench_train(
    rec: Recorder, views_list: list[int], config: AttentionConfig, tokens: int, special: int
) -> None:
    """Forward + backward of one layer (training sizes)."""
    for views in views_list:
        q, k, v = [t.requires_grad_(True) for t in layer_inputs(views, tokens)]
        grad = torch.randn_like(q)
        layout = ViewLayout(views, tokens, special)
        module = gsa_module(config, gated=False)
        row = {"key": f"train-{views}", "views": views}

        gsa_step = functools.partial(_train_step, functools.partial(module, q, k, v, layout), (q, k, v), grad)
        t, first, mem = cuda_time(gsa_step, reps=5, warmup=2)
        row.update({"gsa_fwd_bwd_s": t, "gsa_first_s": first, "gsa_peak_gib": mem})
        dense = functools.partial(F.scaled_dot_product_attention, q, k, v)
        t, _, mem = cuda_time(functools.partial(_train_step, dense, (q, k, v), grad), reps=5, warmup=1)
        row.update({"dense_fwd_bwd_s": t, "dense_peak_gib": mem, "speedup": t / row["gsa_fwd_bwd_s"]})
        rec.add("train", row)


def profile_layer(views: int, config: AttentionConfig, tokens: int, special: int, out_dir: Path) -> None:
    """Kernel-time breakdown of one GSA call (training-free and gated) under the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = layer_inputs(views, tokens)
    layout = ViewLayout(views, tokens, special)
    for gated in (False, True):
        module = gsa_module(config, gated)
        with torch.inference_mode():
            for _ in range(2):
                module(q, k, v, layout)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                module(q, k, v, layout)
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
        name = f"attention_profile_{views}_{'gated' if gated else 'training_free'}.txt"
        (out_dir / name).write_text(table)
        print(table, flush=True)


def set_global_attention(model, config: AttentionConfig | None) -> None:
    c = model.config
    for i, block in enumerate(model.aggregator.global_blocks):
        block.attn.attend = build_global_attention(
            config, dim=c.embed_dim, num_heads=c.num_heads, layer_index=i
        )
    model.cuda()


def _model_forward(model, images: torch.Tensor) -> None:
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(images)


def bench_model(rec: Recorder, views_list: list[int], config: AttentionConfig, dense_max_views: int) -> None:
    from speed3r_sfm.models.vggt import VGGT, VGGTConfig

    model_config = VGGTConfig.preset(
        "vggt-1b", enable_point=False, enable_track=False, intermediate_dtype="bfloat16"
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = VGGT(model_config).eval()
    height, width = 392, 518
    warm: set[str] = set()
    for views in views_list:
        images = torch.rand(views, 3, height, width, device="cuda")
        row = {"key": f"model-{views}", "views": views, "image_hw": [height, width]}
        runs = [("gsa", config)] + ([("dense", None)] if views <= dense_max_views else [])
        for name, attention in runs:
            set_global_attention(model, attention)

            try:
                reps = 2 if name == "gsa" or views <= 100 else 1
                warmup = 1 if name == "gsa" or name not in warm else 0  # GSA may recompile per shape
                t, first, mem = cuda_time(
                    functools.partial(_model_forward, model, images), reps=reps, warmup=warmup
                )
                warm.add(name)
                row.update({f"{name}_s": t, f"{name}_first_s": first, f"{name}_peak_gib": mem})
            except torch.OutOfMemoryError as err:
                row[f"{name}_s"] = "OOM"
                row[f"{name}_error"] = str(err).splitlines()[0][:200]
            torch.cuda.empty_cache()
        if isinstance(row.get("dense_s"), float) and isinstance(row.get("gsa_s"), float):
            row["speedup"] = row["dense_s"] / row["gsa_s"]
        rec.add("model", row)
        del images
        torch.cuda.empty_cache()


def _fmt(value, spec: str = ".3f", unit: str = "") -> str:
    if isinstance(value, (int, float)):
        return format(value, spec) + unit
    return str(value) if value is not None else "-"


def render_markdown(data: dict) -> str:
    lines = [
        "# Global attention speed: dense SDPA vs GSA",
        "",
        f"Device: {data['device']}; torch {data['torch']}; date {data['date']}.",
        "",
        f"GSA config: `{data['config']}`.",
        "",
        "Times are medians of CUDA-event-timed calls after warm-up (first call = torch.compile included);",
        "memory is peak allocated (inputs included). `GSA` is the training-free init (selection branch only,",
        "the compression gate is exactly 0); `GSA gated` computes both branches and the gate.",
        "",
    ]
    if data["layer"]:
        lines += [
            "## One global-attention layer (B=1, 16 heads x 64, bf16, 1041 tokens/view, inference)",
            "",
            "| views | tokens | dense s | GSA s | speed-up | GSA gated s | speed-up | dense GiB | GSA GiB |"
            " GSA gated GiB | GSA first call s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(data["layer"], key=lambda r: r["views"]):
            lines.append(
                f"| {r['views']} | {r['tokens']} | {_fmt(r.get('dense_s'))} | "
                f"{_fmt(r.get('gsa_s'), '.4f')} | "
                f"{_fmt(r.get('gsa_speedup'), '.1f', 'x')} | {_fmt(r.get('gsa_gated_s'), '.4f')} | "
                f"{_fmt(r.get('gsa_gated_speedup'), '.1f', 'x')} | {_fmt(r.get('dense_peak_gib'), '.1f')} | "
                f"{_fmt(r.get('gsa_peak_gib'), '.1f')} | {_fmt(r.get('gsa_gated_peak_gib'), '.1f')} | "
                f"{_fmt(r.get('gsa_first_s'), '.1f')} |"
            )
        lines.append("")
    for key, title in (
        ("sweep", "GSA variants (one layer)"),
        ("earlier_sweep", "GSA variants, earlier code (v2)"),
    ):
        if not data.get(key):
            continue
        lines += [
            f"## {title}",
            "",
            "| variant | views | GSA s | GSA gated s | with records s | GSA GiB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in data[key]:
            lines.append(
                f"| {r['name']} `{r['overrides']}` | {r['views']} | {_fmt(r.get('gsa_s'), '.4f')} | "
                f"{_fmt(r.get('gsa_gated_s'), '.4f')} | {_fmt(r.get('gsa_with_records_s'), '.4f')} | "
                f"{_fmt(r.get('gsa_peak_gib'), '.1f')} |"
            )
        lines.append("")
    if data["train"]:
        lines += [
            "## Forward + backward of one layer (bf16, training sizes)",
            "",
            "| views | dense s | GSA s | speed-up | dense GiB | GSA GiB |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(data["train"], key=lambda r: r["views"]):
            lines.append(
                f"| {r['views']} | {_fmt(r.get('dense_fwd_bwd_s'), '.4f')} | "
                f"{_fmt(r.get('gsa_fwd_bwd_s'), '.4f')} | "
                f"{_fmt(r.get('speedup'), '.1f', 'x')} | {_fmt(r.get('dense_peak_gib'), '.1f')} | "
                f"{_fmt(r.get('gsa_peak_gib'), '.1f')} |"
            )
        lines.append("")
    if data["model"]:
        lines += [
            "## Full model: VGGT-1B shape, random weights, camera + depth heads, 518x392, bf16 autocast "
            "(kept layers in bf16)",
            "",
            "| views | dense s | GSA s | speed-up | dense GiB | GSA GiB | GSA first call s |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(data["model"], key=lambda r: r["views"]):
            lines.append(
                f"| {r['views']} | {_fmt(r.get('dense_s'), '.2f')} | {_fmt(r.get('gsa_s'), '.2f')} | "
                f"{_fmt(r.get('speedup'), '.1f', 'x')} | {_fmt(r.get('dense_peak_gib'), '.1f')} | "
                f"{_fmt(r.get('gsa_peak_gib'), '.1f')} | {_fmt(r.get('gsa_first_s'), '.1f')} |"
            )
        lines.append("")
    if data.get("history"):
        lines += [
            "## Versions of the GSA fast path (one layer)",
            "",
            "| version | change | views | dense s | GSA s | speed-up | GSA gated s |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in data["history"]:
            lines.append(
                f"| {r['version']} | {r['change']} | {r['views']} | {_fmt(r['dense_s'])} | "
                f"{_fmt(r['gsa_s'], '.4f')} | "
                f"{_fmt(r['speedup'], '.1f', 'x')} | {_fmt(r['gsa_gated_s'], '.4f')} |"
            )
        lines.append("")
    for note in data.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--parts", nargs="+", default=["layer"], choices=["layer", "sweep", "train", "model", "profile"]
    )
    parser.add_argument("--views", nargs="+", type=int, default=[100, 250, 500, 1000, 2000])
    parser.add_argument("--sweep-views", type=int, default=1000)
    parser.add_argument("--sweep", nargs="+", default=list(SWEEP), choices=list(SWEEP))
    parser.add_argument("--train-views", nargs="+", type=int, default=[24, 100])
    parser.add_argument("--model-views", nargs="+", type=int, default=[100, 250, 500, 1000, 2000])
    parser.add_argument("--model-dense-max-views", type=int, default=250)
    parser.add_argument("--tokens", type=int, default=1041)
    parser.add_argument("--special", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "attention_speed.json")
    parser.add_argument("--render", type=Path, help="only write the .md next to this .json")
    args = parser.parse_args()
    if args.render:
        args.render.with_suffix(".md").write_text(render_markdown(json.loads(args.render.read_text())))
        return
    config = AttentionConfig(kind="gsa")
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "config": {k: v for k, v in config.__dict__.items() if k not in ("kind", "gsa_layers")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rec = Recorder(args.out, meta)
    if "layer" in args.parts:
        bench_layer(rec, args.views, config, args.tokens, args.special)
    if "profile" in args.parts:
        profile_layer(args.sweep_views, config, args.tokens, args.special, args.out.parent)
    if "sweep" in args.parts:
        bench_sweep(rec, args.sweep_views, config, args.tokens, args.special, args.sweep)
    if "train" in args.parts:
        bench_train(rec, args.train_views, config, args.tokens, args.special)
    if "model" in args.parts:
        bench_model(rec, args.model_views, config, args.model_dense_max_views)
    args.out.with_suffix(".md").write_text(render_markdown(rec.data))
    print(render_markdown(rec.data))


if __name__ == "__main__":
    main()
