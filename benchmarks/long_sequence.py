"""Long synthetic video end to end with chunked sliding-window inference (issue 8): time, peak memory, ATE.

Renders ``--views`` views of a ``forward`` trajectory (on the GPU when there is one), runs
:func:`speed3r_sfm.pipeline.chunked.predict_chunked` with chunks of ``--chunk-size`` (default: from free
GPU memory, :func:`default_chunk_size`) overlapping by ``--overlap``, streams chunk outputs to an h5 file
(``--keep-maps`` off by default: only poses stay in memory), and scores the composed poses (ATE, RRA/RTA,
AUC). ``--model``: ``oracle`` (ground truth in a random Sim(3) frame per chunk, with noise; checks the
composition), ``tiny`` / ``vggt-1b-random`` (tiny VGGT / the VGGT-1B shape with random weights, GSA
or dense: time and memory only) or anything ``load_backbone``
accepts ("default", a Hub id, a checkpoint). Results go to ``benchmarks/results/long_sequence_*.json``.

Under ``torchrun --nproc_per_node N`` the chunks are spread over N processes (one GPU each, NCCL; gloo on
CPU) with :func:`predict_chunked_distributed`; rank 0 composes and reports.

Example (H100, the issue's target)::

    python benchmarks/long_sequence.py --views 5000 --model default --height 224 --width 294
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from speed3r_sfm.data.synthetic import RenderedViews, render_scene
from speed3r_sfm.eval.evaluate import evaluate_reconstruction, oracle_predictor
from speed3r_sfm.pipeline.backbone import load_backbone
from speed3r_sfm.pipeline.chunked import predict_chunked, predict_chunked_distributed
from speed3r_sfm.pipeline.chunking import default_chunk_size


def chunk_oracle(gt: RenderedViews, rotation_noise: float, translation_noise: float):
    """Per chunk, the ground truth of the requested views in a fresh random Sim(3) frame (noisy cameras).
    Views are identified by their first pixel rows (the images are distinct along a trajectory)."""
    keys = {gt.images[i, :, :2].numpy().tobytes(): i for i in range(gt.images.shape[0])}
    count = [0]

    def predict(images: torch.Tensor):
        idx = [keys[im[:, :2].cpu().numpy().tobytes()] for im in images[0]]
        count[0] += 1
        sub = RenderedViews(gt.images[idx], gt.depth[idx], gt.intrinsics[idx], gt.cam_from_world[idx])
        return oracle_predictor(sub, count[0], rotation_noise, translation_noise)(images.cpu())

    return predict


def build_predict(args: argparse.Namespace, gt: RenderedViews, device: torch.device):
    if args.model == "oracle":
        return chunk_oracle(gt, args.rotation_noise, args.translation_noise)
    if args.model == "tiny":
        from speed3r_sfm.attention import AttentionConfig
        from speed3r_sfm.models.vggt import VGGT, VGGTConfig

        torch.manual_seed(0)
        attention = AttentionConfig(
            kind="gsa", block_size=16, query_block_size=32, compression_block_size=16, top_k=8
        )
        model = VGGT(VGGTConfig.preset("tiny", attention=attention, enable_track=False))
        return load_backbone(model, "gsa", device).predict
    if args.model == "vggt-1b-random":
        from speed3r_sfm.attention import AttentionConfig
        from speed3r_sfm.models.vggt import VGGT, VGGTConfig

        config = VGGTConfig.preset(
            "vggt-1b", enable_point=False, enable_track=False, attention=AttentionConfig(kind=args.attention)
        )
        torch.manual_seed(0)
        with torch.device(device):
            model = VGGT(config)
        return load_backbone(model, args.attention, device).predict
    return load_backbone(args.model, args.attention, device).predict


def single_pass(predict, gt: RenderedViews, device: torch.device) -> dict:
    """All views through ``predict`` at once: time, peak GPU memory and metrics (or the error it hit)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            pred = predict(gt.images[None].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
    except torch.OutOfMemoryError as error:
        return {"error": f"out of memory: {str(error).splitlines()[0]}"}
    seconds = time.perf_counter() - start
    metrics, _, _ = evaluate_reconstruction(gt, pred.cam_from_world[0].double().cpu())
    return {
        "inference_s": seconds,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "metrics": metrics,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--views", type=int, default=5000)
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=294)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="default")
    parser.add_argument("--attention", default="gsa", choices=["gsa", "dense"])
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--overlap", type=int, default=None, help="default: a quarter of the chunk")
    parser.add_argument("--keep-maps", action="store_true")
    parser.add_argument("--rotation-noise", type=float, default=0.5)
    parser.add_argument("--translation-noise", type=float, default=0.01)
    parser.add_argument("--h5", default=None, help="chunk file (default: a temporary one); reused to resume")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--compare-single",
        action="store_true",
        help="also run all views in one pass (same model) and report its time, memory and ATE",
    )
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))  # > 1 under torchrun: chunks spread over the ranks
    rank = 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    start = time.perf_counter()
    gt = render_scene(args.seed, args.views, args.height, args.width, "forward", device=device).to("cpu")
    render_s = time.perf_counter() - start
    patch = 14
    tokens = (args.height // patch) * (args.width // patch)
    chunk = args.chunk_size or default_chunk_size(device, tokens)
    overlap = args.overlap if args.overlap is not None else max(1, chunk // 4)
    predict = build_predict(args, gt, device)

    def load(indices: list[int]) -> torch.Tensor:
        return gt.images[indices].to(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        shared = Path(tempfile.gettempdir()) / f"long_sequence_{args.views}v_seed{args.seed}.h5"
        h5 = args.h5 or str(shared if world > 1 else Path(tmp) / "chunks.h5")
        start = time.perf_counter()
        with torch.inference_mode():
            if world > 1:
                pred = predict_chunked_distributed(
                    predict, load, chunk, overlap, h5, num_views=args.views, keep_maps=args.keep_maps
                )
            else:
                pred = predict_chunked(
                    predict, load, chunk, overlap, h5_path=h5, num_views=args.views, keep_maps=args.keep_maps
                )
        if device.type == "cuda":
            torch.cuda.synchronize()
        infer_s = time.perf_counter() - start
        if rank != 0:
            return
        h5_bytes = Path(h5).stat().st_size
        if world > 1 and not args.h5:
            for path in [h5, *(f"{h5}.rank{r}" for r in range(world))]:
                Path(path).unlink(missing_ok=True)
    metrics, _, _ = evaluate_reconstruction(gt, pred.cam_from_world[0])
    single = single_pass(predict, gt, device) if args.compare_single else None
    report = {
        "views": args.views,
        "image_size": [args.height, args.width],
        "model": args.model,
        "chunk_size": chunk,
        "overlap": overlap,
        "chunks": len(pred.extras["chunks"]),
        "render_s": render_s,
        "inference_s": infer_s,
        "views_per_s": args.views / infer_s,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "h5_gib": h5_bytes / 2**30,
        "processes": world,
        "min_chunk_inlier_fraction": min(pred.extras["chunk_inlier_fraction"]),
        "metrics": metrics,
        "single_pass": single,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    print(json.dumps(report, indent=2, default=float))
    name = f"long_sequence_{args.model.replace('/', '_')}_{args.views}v_{device.type}.json"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
