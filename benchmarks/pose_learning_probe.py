"""Does a training recipe teach the small VGGT content-based relative pose? (diagnosis for the default model)

Trains ``pipelines/train_tiny_dense_synthetic.yaml`` with ``--override`` (JSON merged into the config) for
``--minutes``, then predicts held-out 2-view pairs of ``forward`` and ``orbit`` trajectories and compares the
predicted rotation angle of view 1 relative to view 0 with the true one: median error, the correlation of
predicted and true angles, and the error of the best constant prediction (the true angles' median). A recipe
that has not learned relative pose from image content stays at the constant baseline (the shipped
default's teacher predicts ~56 degrees for every view; see benchmarks/results/pose_learning_probe*.json).

    python benchmarks/pose_learning_probe.py NAME --minutes 5 --override '{"model": {"loss": {"point": 1}}}'
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from speed3r_sfm.data.synthetic import render_scene  # noqa: E402
from speed3r_sfm.training.runner import build, load_config, merge  # noqa: E402

PROBE_SEED_START = 950_000  # between the validation (900,000+) and evaluation (1,000,000+) seeds


def rotation_angle_deg(rotation: torch.Tensor) -> torch.Tensor:
    cos = ((rotation.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos))


@torch.no_grad()
def probe(model: torch.nn.Module, height: int, width: int, pairs: int, device: torch.device) -> dict:
    """Per trajectory kind: median rotation error of view 1 relative to view 0 over ``pairs`` held-out
    pairs, correlation of predicted and true relative angles, and the best constant predictor's error."""
    model = model.to(device).eval()
    results = {}
    for kind in ("forward", "orbit"):
        errors, truth, predicted = [], [], []
        for k in range(pairs):
            gt = render_scene(PROBE_SEED_START + k, 8, height, width, kind, device=device)
            idx = [0, 1 + k % 7]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pred = model.predict(gt.images[idx][None].to(device))
            g = gt.cam_from_world[idx].double().cpu()
            p = pred.cam_from_world[0].double().cpu()
            r_true = g[1, :, :3] @ g[0, :, :3].T
            r_pred = p[1, :, :3] @ p[0, :, :3].T
            errors.append(rotation_angle_deg(r_pred @ r_true.T).item())
            truth.append(rotation_angle_deg(r_true).item())
            predicted.append(rotation_angle_deg(r_pred).item())
        errors_t, truth_t, pred_t = map(torch.tensor, (errors, truth, predicted))
        results[kind] = {
            "median_error_deg": errors_t.median().item(),
            "corr_true_pred_angle": torch.corrcoef(torch.stack([truth_t, pred_t]))[0, 1].item(),
            "constant_baseline_error_deg": (truth_t - truth_t.median()).abs().median().item(),
            "median_true_angle_deg": truth_t.median().item(),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--override", default="{}", help="JSON merged into the training config")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--weights", default=None, help="probe these exported weights instead of training")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run_dir = REPO / "outputs" / "probe" / args.name
    base = {
        "trainer": {
            "max_time": {"seconds": args.minutes * 60},
            "accelerator": "auto",
            "precision": "bf16-mixed" if device.type == "cuda" else "32-true",
            "val_check_interval": 100_000,
            "num_sanity_val_steps": 0,
            "callbacks": [],
            "enable_checkpointing": False,
            "default_root_dir": str(run_dir),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run_dir), "name": "logs"},
            },
        },
        "model": {"export_path": None, "optim": {"total_time": args.minutes * 60}},
        "data": {"val_batches": 0, "num_workers": 3},
    }
    override = json.loads(args.override)
    if args.weights:
        from speed3r_sfm.training.backbone import load_exported

        result = {
            "name": args.name,
            "weights": args.weights,
            "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "probe": probe(load_exported(args.weights), 224, 294, args.pairs, device),
        }
        write(result, Path(args.out))
        return
    config = merge(load_config(REPO / "pipelines" / "train_tiny_dense_synthetic.yaml", base), override)
    trainer, module, datamodule = build(config)
    start = time.time()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.time() - start
    h, w = config["data"]["height"], config["data"]["width"]
    result = {
        "name": args.name,
        "override": override,
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "train_seconds": seconds,
        "steps": trainer.global_step,
        "probe": probe(module.model, h, w, args.pairs, device),
    }
    write(result, Path(args.out))


def write(result: dict, out: Path) -> None:
    print(json.dumps(result, indent=2))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pose_learning_probe_{result['name']}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
