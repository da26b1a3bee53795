"""Where a pipeline run's time goes with the model on a CUDA GPU.

Three measurements, each in a fresh process so that one-time costs (CUDA context, kernel compilation) show:

- ``forward``: ``predict`` of the default model on random images (224x294), dense or GSA, the first call and
  the calls after it, synchronised;
- ``token_poses``: the token poses of a scene's prediction with thread pools of 1 to 16 workers;
- ``pipeline``: ``run_pipeline`` on a held-out scene (rendered like ``pipeline_synthetic.py``) run twice in
  one process, per-stage timings of both runs, at a given number of torch CPU threads.

    python benchmarks/cuda_pipeline_profile.py forward --attention gsa --views 96
    python benchmarks/cuda_pipeline_profile.py pipeline --views 24 --threads 4 --attention auto

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def forward(args: argparse.Namespace) -> dict:
    from speed3r_sfm.pipeline.backbone import load_backbone

    if args.model == "vggt-1b-random":  # the official model's shape (time only; random weights)
        from speed3r_sfm.attention import AttentionConfig
        from speed3r_sfm.models.vggt import VGGT, VGGTConfig

        kind = "gsa" if args.attention == "auto" else args.attention
        config = VGGTConfig.preset(
            "vggt-1b", enable_point=False, enable_track=False, attention=AttentionConfig(kind=kind)
        )
        torch.manual_seed(0)
        with torch.device("cuda"):
            module = VGGT(config)
        backbone = load_backbone(module, kind, "cuda")
        size = (392, 518)
    else:
        backbone = load_backbone(args.model, attention=args.attention, device="cuda", num_views=args.views)
        size = (224, 294)
    images = torch.rand(1, args.views, 3, *size, device="cuda")
    calls = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        backbone.predict(images)
        torch.cuda.synchronize()
        calls.append(time.perf_counter() - start)
    found = {
        "calls_s": calls,
        "ran": backbone.attention,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    if args.kernels:
        found["top_kernels"] = top_kernels(lambda: backbone.predict(images), args.kernels)
    return found


def top_kernels(call, count: int) -> list[dict]:
    """The ``count`` CUDA kernels that took the most time in one more ``call()``, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    return [
        {"name": e.key[:120], "calls": e.count, "self_ms": e.self_device_time_total / 1e3}
        for e in events[:count]
        if e.self_device_time_total > 0
    ]


@contextlib.contextmanager
def scene_images(args: argparse.Namespace) -> Iterator[str]:
    """A temporary folder with the images of held-out scene ``args.seed`` (24 or ``args.views`` views at
    518x392), rendered and cached as ``pipeline_synthetic.py`` does."""
    import pipeline_synthetic as harness

    scene = argparse.Namespace(
        cache=args.cache,
        trajectory=args.trajectory,
        views=args.views,
        height=392,
        width=518,
        supersample=2,
        render_scale=1,
        upscale=1,
        image_format="png",
    )
    views = harness.load_scene(args.seed, scene)
    with tempfile.TemporaryDirectory() as folder:
        harness.write_images(views, args.seed, Path(folder), scene)
        yield folder


def pipeline(args: argparse.Namespace) -> dict:
    """Per-stage timings of ``args.repeats`` runs in one process, the model stage split into its parts."""
    # the module, not the function ``speed3r_sfm.pipeline.reconstruct`` that the package exports
    reconstruct = importlib.import_module("speed3r_sfm.pipeline.reconstruct")

    inside: dict[str, float] = {}  # the model stage's parts: the backbone call and the token poses

    def timed(name, function):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                inside[name] = time.perf_counter() - start

        return wrapper

    reconstruct.run_backbone = timed("backbone", reconstruct.run_backbone)
    reconstruct.apply_token_poses = timed("token poses", reconstruct.apply_token_poses)

    runs = []
    with scene_images(args) as folder:
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = reconstruct.run_pipeline(
                folder,
                None,
                model="default",
                attention=args.attention,
                device=args.device,
                shared_camera=True,
            )
            runs.append(
                {
                    "wall_s": time.perf_counter() - start,
                    "timings_s": result.report["timings_s"],
                    "registered": result.reconstruction.num_reg_images(),
                    "attention": result.report.get("attention"),
                    "inside_model_stage_s": dict(inside),
                }
            )
    return {"runs": runs}


def token_pose_workers(args: argparse.Namespace) -> dict:
    """Token poses of a held-out scene's prediction with thread pools of 1, 2, 4, ... workers."""
    import speed3r_sfm.pipeline.token_poses as token_poses_module

    reconstruct = importlib.import_module("speed3r_sfm.pipeline.reconstruct")
    captured = {}
    solve = token_poses_module.token_poses

    def capture(*a, **k):
        captured["call"] = (a, k)
        return solve(*a, **k)

    token_poses_module.token_poses = capture
    with scene_images(args) as folder:
        reconstruct.run_pipeline(
            folder, None, model="default", device=args.device, shared_camera=True, ba=False
        )
    a, k = captured["call"]
    pool = token_poses_module.ThreadPoolExecutor
    found = {}
    for workers in (1, 2, 4, 8, 16):
        token_poses_module.ThreadPoolExecutor = lambda max_workers, n=workers: pool(max_workers=n)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            solve(*a, **k)
            times.append(time.perf_counter() - start)
        found[workers] = times
    token_poses_module.ThreadPoolExecutor = pool
    return {"token_poses_s_by_workers": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["forward", "pipeline", "token_poses"])
    parser.add_argument("--attention", default="auto", choices=["auto", "dense", "gsa"])
    parser.add_argument("--views", type=int, default=24)
    parser.add_argument("--model", default="default", help='forward: "default" or "vggt-1b-random"')
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernels", type=int, default=0, help="forward: list the N slowest CUDA kernels")
    parser.add_argument("--seed", type=int, default=1000000)
    parser.add_argument("--trajectory", default="forward")
    parser.add_argument("--device", default="cuda", help="pipeline: where the model runs")
    parser.add_argument("--cache", default="/tmp/pipeline_bench_cache")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    found = {"forward": forward, "pipeline": pipeline, "token_poses": token_pose_workers}[args.what](args)
    print(
        json.dumps(
            {
                "what": args.what,
                "attention": args.attention,
                "model": args.model,
                "views": args.views,
                "threads": torch.get_num_threads(),
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "torch": torch.__version__,
                **found,
            }
        )
    )


if __name__ == "__main__":
    main()
