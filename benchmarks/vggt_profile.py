"""Full VGGT forward at many views: total time, time per stage and peak memory.

VGGT-1B shape with random weights (or the tiny preset, 84x56 input), camera + depth heads, 518x392 input,
bf16 autocast, ``torch.inference_mode()``. Stages are timed with CUDA events recorded by forward hooks
(wall clock on the CPU): the DINOv2 encoder, the frame blocks, the global blocks split into their attention
kernel and the rest (norms, projections, qk-norm, RoPE, MLP), the camera head, the depth head, and "other"
(total minus the stages). Peak memory is ``torch.cuda.max_memory_allocated`` over the timed call (weights
and inputs included), also per stage. Variants switch the inference options of ``VGGTConfig`` on the same
model; each is compared with the first one (depth and pose differences).

    python benchmarks/vggt_profile.py --views 1000 2000                     # GSA, H100: about 5 minutes
    python benchmarks/vggt_profile.py --views 100 250 --attention gsa dense --dense-max-views 250
    python benchmarks/vggt_profile.py --preset tiny --device cpu --views 4 --out /tmp/vggt_profile.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from speed3r_sfm.attention import AttentionConfig, build_global_attention
from speed3r_sfm.models.vggt import VGGT, VGGTConfig

RESULTS = Path(__file__).parent / "results"
GIB = 1024**3
GSA = AttentionConfig(kind="gsa")

# Inference options compared on the same weights (see VGGTConfig). "exact": the defaults, upstream float32
# numerics outside the bf16 matmuls, kept layers stored in bf16; "fast-heads": the DPT heads in bf16 autocast
# too; "kept-fp32": kept layers in float32 (upstream); "bf16-residual": fast-heads + bf16 residual stream;
# "compiled": fast-heads + torch.compile'd token-wise parts of the blocks.
VARIANTS: dict[str, dict] = {
    "exact": {},
    "fast-heads": {"dense_heads_autocast": True},
    "kept-fp32": {"intermediate_dtype": None},
    "bf16-residual": {"dense_heads_autocast": True, "autocast_residual": True},
    "compiled": {"dense_heads_autocast": True, "compile_inference": True},
}
STAGES = ("encoder", "frame", "global_attention", "global_rest", "camera_head", "depth_head", "other")


class StageTimer:
    """Times modules through forward hooks: CUDA events on the GPU, perf_counter on the CPU. On CUDA also the
    peak memory allocated while each stage runs: at every hook the peak since the previous hook is read
    (and reset) and credited to the stages running then."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[str, list] = defaultdict(list)
        self.peaks: dict[str, float] = defaultdict(float)
        self.active: list[str] = []
        self.handles: list = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _credit_peak(self) -> None:
        if not self.cuda:
            return
        peak = torch.cuda.max_memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
        for name in self.active + ["call"]:
            self.peaks[name] = max(self.peaks[name], peak)

    def watch(self, name: str, module: torch.nn.Module) -> None:
        starts: list = []

        def before(*_):
            self._credit_peak()
            self.active.append(name)
            starts.append(self._now())

        def after(*_):
            self.marks[name].append((starts.pop(), self._now()))
            self._credit_peak()
            self.active.remove(name)

        self.handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def start(self) -> None:
        self.marks.clear()
        self.peaks.clear()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def finish(self) -> tuple[dict[str, float], dict[str, float]]:
        """(seconds per stage, peak GiB per stage and for the whole "call")."""
        self._credit_peak()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = {}
        for name, pairs in self.marks.items():
            if self.cuda:
                seconds[name] = sum(a.elapsed_time(b) for a, b in pairs) / 1000
            else:
                seconds[name] = sum(b - a for a, b in pairs)
        if not self.cuda:  # the process's peak resident memory instead
            self.peaks["call"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        return seconds, dict(self.peaks)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def build_model(preset: str, device: torch.device) -> VGGT:
    config = VGGTConfig.preset(preset, enable_point=False, enable_track=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = VGGT(config).eval()
    return model


def set_global_attention(model: VGGT, attention: AttentionConfig | None) -> None:
    c = model.config
    for i, block in enumerate(model.aggregator.global_blocks):
        block.attn.attend = build_global_attention(
            attention, dim=c.embed_dim, num_heads=c.num_heads, layer_index=i
        ).to(block.attn.qkv.weight.device)


def watch_stages(model: VGGT, timer: StageTimer) -> None:
    aggregator = model.aggregator
    timer.watch("encoder", aggregator.patch_embed)
    for block in aggregator.frame_blocks:
        timer.watch("frame", block)
    for block in aggregator.global_blocks:
        timer.watch("global_block", block)
        timer.watch("global_attention", block.attn.attend)
    timer.watch("camera_head", model.camera_head)
    timer.watch("depth_head", model.depth_head)


def timed_forward(
    model: VGGT, images: torch.Tensor, device: torch.device, keep_outputs: bool = False
) -> tuple[float, dict[str, torch.Tensor]]:
    """Seconds of one forward, and (``keep_outputs``) its depth and pose encoding copied to the CPU."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        out = model(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    kept = {key: out[key].float().cpu() for key in ("depth", "pose_enc")} if keep_outputs else {}
    return elapsed, kept


def stage_row(seconds: dict[str, float], total: float) -> dict[str, float]:
    row = {name: seconds.get(name, 0.0) for name in STAGES if name != "other"}
    row["global_rest"] = seconds.get("global_block", 0.0) - row["global_attention"]
    row["other"] = total - sum(row.values())
    return row


def profile_run(
    model: VGGT, images: torch.Tensor, device: torch.device, reps: int, warmup: int
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Warm-up calls, then ``reps`` timed calls with stage hooks. Returns the stages and peaks of the median
    call, and the depth and pose encoding of the last call (on the CPU)."""
    first = None
    for _ in range(warmup):
        elapsed, _ = timed_forward(model, images, device)
        first = elapsed if first is None else first
    timer = StageTimer(device)
    watch_stages(model, timer)
    runs = []
    try:
        for rep in range(reps):
            timer.start()
            total, outputs = timed_forward(model, images, device, keep_outputs=rep == reps - 1)
            seconds, peaks = timer.finish()
            runs.append(
                {
                    "total_s": total,
                    "stages_s": stage_row(seconds, total),
                    "peak_gib": peaks.pop("call"),
                    "stage_peak_gib": peaks,
                }
            )
    finally:
        timer.remove()
    median = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]
    row = {**median, "reps": reps, "all_total_s": [r["total_s"] for r in runs], "first_call_s": first}
    return row, outputs


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


def apply_variant(model: VGGT, overrides: dict, defaults: dict) -> None:
    """Set the variant's config fields on the model's (shared) config, others back to their defaults."""
    for name, value in {**defaults, **overrides}.items():
        setattr(model.config, name, value)


def dense_layer_seconds(views: int) -> float | None:
    """Dense SDPA time of one global-attention layer at ``views`` views, from attention_speed.json."""
    path = RESULTS / "attention_speed.json"
    if not path.exists():
        return None
    for row in json.loads(path.read_text()).get("layer", []):
        if row.get("views") == views and isinstance(row.get("dense_s"), float):
            return row["dense_s"]
    return None


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model = build_model(args.preset, device)
    height, width = (392, 518) if args.preset == "vggt-1b" else (56, 84)
    fields = {name for overrides in VARIANTS.values() for name in overrides}
    defaults = {name: getattr(model.config, name) for name in fields}
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": args.date,
        "preset": args.preset,
        "image_hw": [height, width],
        "heads": "camera + depth",
        "gsa_config": {k: v for k, v in GSA.__dict__.items() if k not in ("kind", "gsa_layers")},
        "command": args.command,
    }
    rows = []
    warm: set[tuple] = set()
    for views in args.views:
        images = torch.rand(views, 3, height, width, device=device)
        for attention_name in args.attention:
            if attention_name == "dense" and views > args.dense_max_views:
                continue
            set_global_attention(model, GSA if attention_name == "gsa" else None)
            reference = None  # outputs of the first variant, which the others are compared with
            for variant in args.variants:
                apply_variant(model, VARIANTS[variant], defaults)
                # The first call at a new shape compiles (FlexAttention, and torch.compile'd blocks with
                # compile_inference): warm up once per shape and compile setting.
                key = (views, attention_name, model.config.compile_inference)
                warmup = args.warmup if key not in warm else 0
                reps = args.reps if args.reps else (1 if views >= 500 else 3)
                row = {"views": views, "attention": attention_name, "variant": variant}
                try:
                    result, outputs = profile_run(model, images, device, reps, warmup)
                    row.update(result)
                    warm.add(key)
                    if reference is None:
                        reference = (variant, outputs)
                    else:
                        row["compared_with"] = reference[0]
                        for name in ("depth", "pose_enc"):
                            row[f"{name}_rel_err"] = relative_error(outputs[name], reference[1][name])
                except torch.OutOfMemoryError as err:
                    row["total_s"] = "OOM"
                    row["error"] = str(err).splitlines()[0][:200]
                except Exception as err:  # e.g. a compile failure: record it, go on with the others
                    row["total_s"] = "error"
                    row["error"] = (
                        f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                    )
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                dense = dense_layer_seconds(views) if args.preset == "vggt-1b" else None
                if dense is not None and isinstance(row.get("total_s"), float) and attention_name == "gsa":
                    depth = model.config.depth
                    estimate = row["total_s"] - row["stages_s"]["global_attention"] + depth * dense
                    row["dense_estimate_s"] = estimate
                    row["speedup_vs_dense_estimate"] = estimate / row["total_s"]
                rows.append(row)
                print(json.dumps(row), flush=True)
                save(args.out, {**meta, "rows": rows})  # after every row: a timeout keeps what was measured
        del images
    return {**meta, "rows": rows}


def save(path: Path, data: dict) -> None:
    """The .json and its rendered .md."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    path.with_suffix(".md").write_text(render_markdown(data))


def _fmt(value, spec: str = ".2f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else ("-" if value is None else str(value))


def render_markdown(data: dict) -> str:
    lines = [
        "# VGGT forward profile: time per stage and peak memory",
        "",
        f"Device: {data['device']}; torch {data['torch']}; date {data['date']}; preset `{data['preset']}`, "
        f"random weights, {data['heads']} heads, {data['image_hw'][1]}x{data['image_hw'][0]} input, bf16 "
        "autocast, `torch.inference_mode()`.",
        "",
        f"Command: `{data['command']}`",
        "",
        "Stage times are sums of CUDA-event intervals around the modules (forward hooks) in the timed call; "
        "`global rest` is the global blocks minus their attention kernel (norms, qkv, qk-norm, RoPE, output "
        "projection, MLP); `other` is the total minus all stages (embedding copies, kept-layer copies, ...). "
        "Peak: `torch.cuda.max_memory_allocated` over the call (weights, inputs included; on the CPU the "
        "process's peak RSS). Variants: "
        + "; ".join(f"`{name}` {overrides or '(defaults)'}" for name, overrides in VARIANTS.items())
        + ".",
        "",
        "| views | attention | variant | total s | first call s | peak GiB | encoder s | frame s "
        "| global attn s | global rest s | camera s | depth s | other s | vs dense (est.) "
        "| depth rel. diff | pose rel. diff |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        s = r.get("stages_s", {})
        speedup = r.get("speedup_vs_dense_estimate")
        lines.append(
            f"| {r['views']} | {r['attention']} | {r['variant']} | {_fmt(r.get('total_s'))} | "
            f"{_fmt(r.get('first_call_s'), '.1f')} | {_fmt(r.get('peak_gib'), '.1f')} | "
            + " | ".join(_fmt(s.get(name)) for name in STAGES)
            + f" | {_fmt(speedup, '.1f') + 'x' if speedup else '-'} | "
            f"{_fmt(r.get('depth_rel_err'), '.1e')} | {_fmt(r.get('pose_enc_rel_err'), '.1e')} |"
        )
    lines += [
        "",
        "Peak memory per stage (GiB, max over the stage's calls):",
        "",
        "| views | attention | variant | "
        + " | ".join(n for n in STAGES if n not in ("global_rest", "other"))
        + " | global block |",
        "|---:|---|---|" + "---:|" * 6,
    ]
    for r in data["rows"]:
        p = r.get("stage_peak_gib", {})
        names = [n for n in STAGES if n not in ("global_rest", "other")] + ["global_block"]
        lines.append(
            f"| {r['views']} | {r['attention']} | {r['variant']} | "
            + " | ".join(_fmt(p.get(n), ".1f") for n in names)
            + " |"
        )
    lines += [
        "",
        "- `vs dense (est.)`: (total - GSA attention time + depth x dense SDPA layer time from "
        "attention_speed.json) / total, as in attention_speed.md.",
        "- `depth/pose rel. diff`: relative L2 difference of the depth maps and pose encodings from the "
        "first variant's at the same views (random weights, so only indicative of the numerics).",
        "- Before this change (attention_speed.md, run 4, same model and input, kept layers in bf16): "
        "17.11 s and 60.9 GiB at 1000 views, out of memory at 2000 views.",
    ]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"- {r['views']} views, {r['attention']}, {r['variant']}: {r['error']}")
    for note in data.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--views", nargs="+", type=int, default=[1000, 2000])
    parser.add_argument("--attention", nargs="+", default=["gsa"], choices=["gsa", "dense"])
    parser.add_argument("--dense-max-views", type=int, default=250)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["exact", "fast-heads", "bf16-residual", "compiled"],
        choices=list(VARIANTS),
        help="the first is the reference of the depth/pose differences",
    )
    parser.add_argument("--preset", default="vggt-1b", choices=["vggt-1b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=0, help="timed calls (0: 1 at >= 500 views, else 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--out", type=Path, default=RESULTS / "vggt_profile.json")
    parser.add_argument("--render", type=Path, help="only write the .md next to this .json")
    args = parser.parse_args(argv)
    if args.render:
        args.render.with_suffix(".md").write_text(render_markdown(json.loads(args.render.read_text())))
        return {}
    args.command = "python benchmarks/vggt_profile.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data = run(args)
    print(render_markdown(data))
    return data


if __name__ == "__main__":
    main()
