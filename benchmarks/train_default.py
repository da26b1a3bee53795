"""Train, distil, evaluate and ship the offline default model (GPU; no LightningCLI/jsonargparse needed).

Stages (each resumable; run them in order, as separate device calls if needed)::

    python benchmarks/train_default.py dense    --minutes 8 --total-minutes 15   # repeat until done
    python benchmarks/train_default.py distil   --minutes 6 --total-minutes 6
    python benchmarks/train_default.py evaluate --views 24 100 --scenes 4
    python benchmarks/train_default.py ship
    python benchmarks/train_default.py pose --minutes 4.5                   # stage 3: relative pose
    python benchmarks/train_default.py evaluate --candidate pose --views 24 --scenes 4
    python benchmarks/train_default.py ship --candidate pose

- ``dense``: pipelines/train_tiny_dense_synthetic.yaml. Each call trains for at most ``--minutes`` (the
  Trainer's ``max_time`` is the training time already done, read from ``last.ckpt``, plus ``--minutes``,
  capped at ``--total-minutes``) and resumes from ``<run-dir>/dense/checkpoints/last.ckpt`` if it exists.
  The cosine schedule spans ``--total-minutes``. At the end of each call the teacher weights are exported
  to ``<run-dir>/teacher.safetensors`` (float16, ~14 MB) + ``.json``.
- ``distil``: pipelines/distill_gsa_synthetic.yaml, teacher ``<run-dir>/teacher.safetensors``; exports
  ``<run-dir>/student.safetensors`` + ``.json``.
- ``evaluate``: the accuracy harness (benchmarks/accuracy.py, speed3r_sfm/eval) on held-out synthetic
  scenes (seeds from HELDOUT_SEED_START) at each ``--views``: dense teacher, training-free GSA (teacher
  weights, GSA gates at init) and distilled GSA. Writes benchmarks/results/accuracy_default_model_*.md/json
  and ``<run-dir>/evaluation.json``.
- ``pose``: pipelines/finetune_pose_synthetic.yaml: the shipped default fine-tuned dense on windows of
  consecutive views with the patch-correspondence loss; exports ``<run-dir>/pose_dense.safetensors``.
  ``evaluate --candidate pose`` compares it (dense and as training-free GSA) with the shipped default;
  ``ship --candidate pose`` ships it as GSA (gates at their training-free init) with a new model card.
- ``ship``: copies the student to speed3r_sfm/weights/default.safetensors + default.json (keeping the
  shipped sidecar's pipeline settings the student does not set, e.g. ``input_warnings``) and writes
  speed3r_sfm/weights/MODEL_CARD.md (data, steps, time, accuracy table; the replaced card's Limitations
  section is kept under the new one, marked as measured on the previous weights). ``ship --candidate pose``
  keeps it the same way.

``--set KEY=VALUE`` overrides entries of the stage's YAML (dotted keys, YAML values). ``--out DIR`` (e.g.
``--out $OUT`` on the device machine) copies the small artefacts of the stage there (weights ≤ 16 MB each,
logs, tables) so that they come back; put them back into ``<run-dir>`` (and carry it) when a later call
runs on a fresh machine. Every stage appends to ``<run-dir>/stages.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from speed3r_sfm.training.backbone import load_exported, sidecar  # noqa: E402
from speed3r_sfm.training.runner import fit, load_config  # noqa: E402

PIPELINES = REPO / "pipelines"
STAGE_CONFIG = {
    "dense": "train_tiny_dense_synthetic.yaml",
    "distil": "distill_gsa_synthetic.yaml",
    "pose": "finetune_pose_synthetic.yaml",
}
STAGE_WEIGHTS = {
    "dense": "teacher.safetensors",
    "distil": "student.safetensors",
    "pose": "pose_dense.safetensors",
}
STAGE_DIR = {"dense": "dense", "distil": "gsa", "pose": "pose"}
SHIPPED = REPO / "speed3r_sfm" / "weights" / "default.safetensors"


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def read_stage_log(run_dir: Path) -> list[dict]:
    path = run_dir / "stages.json"
    return json.loads(path.read_text()) if path.exists() else []


def append_stage_log(run_dir: Path, entry: dict) -> None:
    entries = read_stage_log(run_dir)
    entries.append(entry)
    (run_dir / "stages.json").write_text(json.dumps(entries, indent=2) + "\n")


def stage_offset(stage_dir: Path) -> float:
    """Training seconds done before the stage restarted from its exported weights (0 normally)."""
    path = stage_dir / "offset_seconds"
    return float(path.read_text()) if path.exists() else 0.0


def trained_seconds(checkpoint: Path) -> float:
    """Training time recorded by the Trainer's Timer in a checkpoint (0 if absent)."""
    if not checkpoint.exists():
        return 0.0
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    timer = state.get("callbacks", {}).get("Timer", {})
    return float(timer.get("time_elapsed", {}).get("train", 0.0))


def copy_out(out: str | None, paths: Sequence[Path]) -> None:
    if not out:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    for path in paths:
        if path.exists():
            shutil.copy2(path, Path(out) / path.name)


def stage_config(stage: str, args: argparse.Namespace) -> tuple[dict, Path, float]:
    """The stage's config (pipelines YAML + run-dir paths and time budget), its last.ckpt and the training
    seconds already done."""
    run_dir = Path(args.run_dir)
    stage_dir = run_dir / STAGE_DIR[stage]
    last = stage_dir / "checkpoints" / "last.ckpt"
    offset = stage_offset(stage_dir)  # training done before a restart from exported weights
    done = trained_seconds(last)
    total = args.total_minutes * 60.0 - offset
    max_time = min(total, done + args.minutes * 60.0)
    overrides = {
        "trainer": {
            "max_time": {"seconds": max_time},
            "default_root_dir": str(stage_dir),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(stage_dir), "name": "logs"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(stage_dir / "checkpoints"),
                        "save_last": True,
                        "enable_version_counter": False,
                        "save_top_k": 0,
                        "every_n_train_steps": 250,
                    },
                }
            ],
        },
        "model": {
            "optim": {"total_time": total},
            "export_path": str(run_dir / STAGE_WEIGHTS[stage]),
        },
        "data": {"num_workers": args.workers},
    }
    if stage == "distil":
        overrides["model"]["distill"] = {"teacher_checkpoint": str(run_dir / STAGE_WEIGHTS["dense"])}
    if args.devices:
        overrides["trainer"]["devices"] = args.devices
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return load_config(PIPELINES / STAGE_CONFIG[stage], overrides), last, done + offset


def train_stage(stage: str, args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stage_dir = run_dir / STAGE_DIR[stage]
    weights = run_dir / STAGE_WEIGHTS[stage]
    if stage == "distil" and not (run_dir / STAGE_WEIGHTS["dense"]).exists():
        raise SystemExit(f"no teacher at {run_dir / STAGE_WEIGHTS['dense']}: run the dense stage first")
    previous = [e for e in read_stage_log(run_dir) if e["stage"] == stage]
    last = stage_dir / "checkpoints" / "last.ckpt"
    if previous and not last.exists():
        if args.init_from_export:
            if not weights.exists():
                raise SystemExit(f"--init-from-export: {weights} does not exist")
            shutil.rmtree(stage_dir, ignore_errors=True)
            stage_dir.mkdir(parents=True)
            (stage_dir / "offset_seconds").write_text(str(previous[-1]["trained_seconds"]))
        elif not args.fresh:
            raise SystemExit(
                f"{stage}: stages.json lists {len(previous)} earlier call(s) but {last} is missing (a fresh "
                "machine?). Pass --init-from-export to continue from the exported weights (optimizer state "
                "and warm-up restart; the cosine spans the remaining time) or --fresh to start over."
            )
        else:
            shutil.rmtree(stage_dir, ignore_errors=True)
    config, last, done = stage_config(stage, args)
    if stage_offset(stage_dir) and not last.exists():
        config["model"]["init_checkpoint"] = str(weights)
        config["model"]["optim"]["warmup_steps"] = min(50, config["model"]["optim"].get("warmup_steps", 50))
    if done >= args.total_minutes * 60.0 - 1.0 and weights.exists():
        print(f"{stage}: already trained for {done / 60:.1f} min; nothing to do")
        return
    start = time.time()
    trainer, module = fit(config, ckpt_path=str(last) if last.exists() else None)
    wall = time.time() - start
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    entry = {
        "stage": stage,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": _device_name(),
        "resumed_from_seconds": done,
        "trained_seconds": trained_seconds(last) + stage_offset(stage_dir),
        "wall_seconds": wall,
        "global_step": int(trainer.global_step),
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "trainable_parameters": sum(p.numel() for p in module.model.parameters() if p.requires_grad),
        "metrics": metrics,
        "config": {k: config[k] for k in ("model", "data")},
    }
    append_stage_log(run_dir, entry)
    print(json.dumps({k: v for k, v in entry.items() if k != "config"}, indent=2))
    weights = run_dir / STAGE_WEIGHTS[stage]
    copy_out(args.out, [weights, sidecar(weights), run_dir / "stages.json"])


def make_predictor(model: torch.nn.Module, device: torch.device):
    model = model.to(device).eval()

    def predict(images: torch.Tensor):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model.predict(images.to(device))

    return predict


def evaluate_stage(args: argparse.Namespace) -> None:
    import accuracy  # benchmarks/accuracy.py: report writing and machine description

    from speed3r_sfm.data.synthetic import HELDOUT_SEED_START, TRAJECTORIES, render_scene
    from speed3r_sfm.eval.evaluate import evaluate_predictor, summarize

    run_dir = Path(args.run_dir)
    device = torch.device(args.device)
    if args.candidate == "pose":
        pose = run_dir / STAGE_WEIGHTS["pose"]
        gsa = json.loads(sidecar(SHIPPED).read_text())["config"]["attention"]
        methods = {
            "shipped default (before)": lambda: load_exported(SHIPPED),
            "pose-tuned dense": lambda: load_exported(pose),
            "pose-tuned GSA training-free": lambda: load_exported(pose, attention=gsa),
        }
    else:
        teacher, student = run_dir / STAGE_WEIGHTS["dense"], run_dir / STAGE_WEIGHTS["distil"]
        gsa = json.loads(sidecar(student).read_text())["config"]["attention"]
        methods = {
            "dense teacher": lambda: load_exported(teacher),
            "GSA training-free": lambda: load_exported(teacher, attention=gsa),
            "GSA distilled": lambda: load_exported(student),
        }
    seeds = [HELDOUT_SEED_START + i for i in range(args.scenes)]
    kinds = [TRAJECTORIES[i % len(TRAJECTORIES)] for i in range(args.scenes)]
    evaluation = {"date": datetime.date.today().isoformat(), "device": _device_name(), "views": {}}
    written = []
    for views in args.views:
        scenes = [
            render_scene(seed, views, args.height, args.width, kind, device, supersample=args.supersample)
            for seed, kind in zip(seeds, kinds, strict=True)
        ]
        per_method = {}
        for name, build in methods.items():
            predict = make_predictor(build(), device)
            predict(scenes[0].images[None])  # warm-up (kernels, FlexAttention compilation)
            results = [evaluate_predictor(predict, gt, seed) for seed, gt in zip(seeds, scenes, strict=True)]
            per_method[name] = results
            print(
                f"{views} views, {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in summarize(results).items())
            )
            del predict
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report = {
            "date": evaluation["date"],
            "machine": accuracy.machine_description(),
            "settings": {
                "seeds": seeds,
                "trajectories": kinds,
                "views": views,
                "height": args.height,
                "width": args.width,
                "supersample": args.supersample,
                "device": str(device),
            },
            "summary": {m: summarize(r) for m, r in per_method.items()},
            "per_scene": {
                m: [{"seed": r.seed, "time_s": r.time_s, **r.metrics} for r in res]
                for m, res in per_method.items()
            },
        }
        prefix = "default_model" if args.candidate == "distil" else "default_model_pose"
        tag = f"{prefix}_{views}v_{args.width}x{args.height}"
        written += list(accuracy.write_report(report, Path(args.results), tag))
        evaluation["views"][str(views)] = report["summary"]
    name = "evaluation.json" if args.candidate == "distil" else f"evaluation_{args.candidate}.json"
    (run_dir / name).write_text(json.dumps(accuracy._json_safe(evaluation), indent=2) + "\n")
    copy_out(args.out, [run_dir / name, *written])


def _table(evaluation: dict) -> list[str]:
    keys = [
        ("AUC@30", "{:.3f}"),
        ("AUC@5", "{:.3f}"),
        ("RRA@30", "{:.3f}"),
        ("RTA@30", "{:.3f}"),
        ("AbsRel", "{:.4f}"),
        ("ATE", "{:.4f}"),
        ("time_s", "{:.3f}"),
    ]
    lines = ["| views | model | " + " | ".join(k for k, _ in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for views, summary in evaluation["views"].items():
        for method, metrics in summary.items():
            cells = [
                "n/a"
                if metrics.get(k) is None or (isinstance(metrics.get(k), float) and math.isnan(metrics[k]))
                else fmt.format(metrics[k])
                for k, fmt in keys
            ]
            lines.append(f"| {views} | {method} | " + " | ".join(cells) + " |")
    return lines


def previous_limitations(card: Path, date: str) -> list[str]:
    """The "Limitations" section of the model card ``card`` replaces, kept under the new card's own (its
    measurements were made on the weights shipped before ``date``: measure them again, then edit the card);
    [] without a card or such a section."""
    if not card.is_file():
        return []
    lines = card.read_text().splitlines()
    if "## Limitations" not in lines:
        return []
    start = lines.index("## Limitations") + 1
    end = next((k for k in range(start, len(lines)) if lines[k].startswith("## ")), len(lines))
    body = "\n".join(lines[start:end]).strip()
    if not body:
        return []
    return [f"Measured on the weights shipped before {date}, to be measured again on these:", "", body, ""]


def student_sidecar(student: dict, previous: dict, stages: list[dict], width: int) -> tuple[dict, list[str]]:
    """The shipped sidecar of a stage-2 student: its own, with the stage log, the crop preprocessing at the
    trained ``width`` and, of the ``previous`` shipped sidecar's pipeline settings, those the student does not
    set (input warnings, attention choices: kept until measured on the new weights, as fine-tunes keep them).
    Returns it and the names of the keys kept."""
    from speed3r_sfm.training.backbone import PIPELINE_KEYS

    meta = json.loads(json.dumps(student))
    meta["info"]["stages"] = [{k: v for k, v in s.items() if k != "config"} for s in stages]
    meta["info"].pop("teacher_checkpoint", None)
    # The pipeline feeds the model images of the width it was trained at (VGGT "crop" preprocessing).
    meta["preprocessing"] = {"mode": "crop", "target_size": width, "patch_size": 14}
    kept = [key for key in PIPELINE_KEYS if key in previous and key not in meta]
    # an explanation goes with its setting: none for a setting the student sets itself
    kept = [key for key in kept if not (key.endswith("_why") and key.removesuffix("_why") not in kept)]
    meta.update({key: previous[key] for key in kept})
    return meta, kept


def ship_stage(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    student = run_dir / STAGE_WEIGHTS["distil"]
    target = Path(args.weights_dir)
    target.mkdir(parents=True, exist_ok=True)
    size = student.stat().st_size
    if size > 25e6:
        raise SystemExit(f"{student} is {size / 1e6:.1f} MB, above the 25 MB budget")
    stages = read_stage_log(run_dir)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    dense_data = load_config(PIPELINES / STAGE_CONFIG["dense"])["data"]
    shipped = target / "default.json"
    previous = json.loads(shipped.read_text()) if shipped.is_file() else {}
    meta, kept = student_sidecar(
        json.loads(sidecar(student).read_text()), previous, stages, dense_data["width"]
    )
    if kept:
        print(f"kept from the shipped {shipped}: {', '.join(kept)} (edit default.json once measured anew)")
    shutil.copy2(student, target / "default.safetensors")
    shipped.write_text(json.dumps(meta, indent=2) + "\n")

    def last_of(stage):
        entries = [s for s in stages if s["stage"] == stage]
        return entries[-1] if entries else None

    lines = [
        "# Default model: small VGGT with Global Sparse Attention, distilled",
        "",
        f"Weights: `default.safetensors` ({size / 1e6:.1f} MB, {meta['dtype']},"
        f" {meta['parameters']:,} parameters); config: `default.json`"
        " (load with `speed3r_sfm.training.backbone.load_exported`).",
        "",
        "## Training",
        "",
        "Data: procedural synthetic rooms (`speed3r_sfm/data/synthetic.py`) rendered on the GPU during"
        " training at 224x294, seeds below 900,000 (validation 900,000+, evaluation from 1,000,000),"
        " orbit/forward/random trajectories, view-consistent colour jitter.",
        "",
    ]
    for stage, title in (
        ("dense", "Stage 1, dense teacher"),
        ("distil", "Stage 2, GSA student (distillation)"),
    ):
        entry = last_of(stage)
        if entry is None:
            continue
        calls = [s for s in stages if s["stage"] == stage]
        lines += [
            f"- {title} (`pipelines/{STAGE_CONFIG[stage]}`): {entry['global_step']} steps,"
            f" {entry['trained_seconds'] / 60:.1f} min of training in {len(calls)} call(s)"
            f" on {entry['device']}"
            f" (wall {sum(c['wall_seconds'] for c in calls) / 60:.1f} min), "
            f"{entry['trainable_parameters']:,} trainable parameters.",
        ]
    lines += [
        "",
        "## Accuracy (held-out synthetic scenes, `benchmarks/train_default.py evaluate`)",
        "",
        f"Device: {evaluation['device']}, {evaluation['date']}. Tables per view count in"
        " `benchmarks/results/accuracy_default_model_*.md`.",
        "",
        *_table(evaluation),
        "",
    ]
    checks = []
    for views, summary in evaluation["views"].items():
        gap = 100 * (summary["dense teacher"]["AUC@30"] - summary["GSA distilled"]["AUC@30"])
        checks.append(
            f"- {views} views: teacher minus distilled GSA = {gap:+.2f} AUC@30 points"
            f" ({'within' if gap <= 1.0 else 'NOT within'} the 1.0-point target; negative: GSA is better)."
        )
    lines += ["Target (distilled GSA within 1.0 AUC@30 point of the teacher):", "", *checks, ""]
    lines += [
        "## Limitations",
        "",
        "This model is small and briefly trained: it predicts depth (AbsRel above) but has not learned"
        " relative pose from image content; it predicts about the same rotation for every view"
        " (benchmarks/results/default_model_diagnosis.md), so `reconstruct` with it does not give usable"
        " poses. It exists so"
        " that everything runs offline; for real images pass official weights, e.g."
        " `speed3r-sfm reconstruct IMAGES -o OUT --model facebook/VGGT-1B --attention gsa` (they load"
        " strictly; this repository has not yet compared its outputs with upstream on the real weights).",
        "",
        *previous_limitations(target / "MODEL_CARD.md", datetime.date.today().isoformat()),
    ]
    (target / "MODEL_CARD.md").write_text("\n".join(lines))
    print("\n".join(lines))


def ship_pose_stage(args: argparse.Namespace) -> None:
    """Ship the pose-tuned weights as the default: GSA with the shipped attention settings, the gates at
    their training-free init (the fine-tuning ran dense); model card from the stage log and evaluation."""
    from speed3r_sfm.training.backbone import PIPELINE_KEYS, BackboneSpec, export_weights

    run_dir = Path(args.run_dir)
    target = Path(args.weights_dir)
    previous = json.loads(sidecar(SHIPPED).read_text())
    stages = [e for e in read_stage_log(run_dir) if e["stage"] == "pose"]
    if not stages:
        raise SystemExit(f"no pose stage in {run_dir / 'stages.json'}: run the pose stage first")
    evaluation = json.loads((run_dir / "evaluation_pose.json").read_text())
    model = load_exported(run_dir / STAGE_WEIGHTS["pose"], attention=previous["config"]["attention"])
    # the last layer the correspondence loss trained exports the match descriptors (token poses)
    trained_layers = stages[-1]["config"]["model"]["loss"]["correspondence_layers"]
    model.config.descriptor_layer = int(trained_layers[-1])
    pose_entries = [{k: v for k, v in e.items() if k != "config"} for e in stages]
    info = {
        "global_step": stages[-1]["global_step"],
        "gsa": "training-free: gates at their init, weights fine-tuned dense",
        # stages 1-2 from the shipped default (idempotent: an earlier pose ship's entries are replaced)
        "stages": [e for e in previous["info"]["stages"] if e["stage"] != "pose"] + pose_entries,
    }
    staging = run_dir / "ship"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # the input size, what reconstruct(attention="auto") runs and whether the GSA records guide matching
    pipeline = {key: previous[key] for key in PIPELINE_KEYS if key in previous}
    spec = BackboneSpec(name="vggt", preset="small")
    written = export_weights(model, spec, staging / "default.safetensors", "float16", info, pipeline=pipeline)
    meta = json.loads(sidecar(written).read_text())
    size = written.stat().st_size
    if size > 25e6:
        raise SystemExit(f"{written} is {size / 1e6:.1f} MB, above the 25 MB budget")
    entry = stages[-1]
    lines = [
        "# Default model: small VGGT with Global Sparse Attention",
        "",
        f"Weights: `default.safetensors` ({size / 1e6:.1f} MB, float16, {meta['parameters']:,} parameters);"
        " config: `default.json` (load with `speed3r_sfm.training.backbone.load_exported`).",
        "",
        "## Training",
        "",
        "Data: procedural synthetic rooms (`speed3r_sfm/data/synthetic.py`) rendered on the GPU during"
        " training at 224x294, seeds below 900,000 (validation 900,000+, probes 950,000+, evaluation from"
        " 1,000,000), view-consistent colour jitter.",
        "",
        "- Stages 1-2 (earlier): dense teacher from scratch (`pipelines/train_tiny_dense_synthetic.yaml`,"
        " 2843 steps, 14.5 min on an H100), GSA student distilled from it"
        " (`pipelines/distill_gsa_synthetic.yaml`, 442 steps). It learned depth but not relative pose"
        " (`benchmarks/results/default_model_diagnosis.md`).",
        f"- Stage 3, pose fine-tuning (`pipelines/{STAGE_CONFIG['pose']}`): from the stage-2 weights, dense,"
        " on windows of consecutive views of forward/orbit trajectories with the patch-correspondence"
        f" loss; {entry['global_step']} steps, {entry['trained_seconds'] / 60:.1f} min of training on"
        f" {entry['device']} ({entry['date'][:10]}).",
        "- Shipped as GSA with the gates at their training-free init (`info.gsa` in `default.json`),"
        f" exporting the patch tokens of aggregator layer {model.config.descriptor_layer} as match"
        " descriptors (`descriptor_layer`): the pipeline computes its poses from them and the predicted depth"
        " (`speed3r_sfm/pipeline/token_poses.py`). Its sidecar declares `pipeline_attention:"
        f" {meta.get('pipeline_attention', 'gsa')}` and `gsa_guidance:"
        f" {str(meta.get('gsa_guidance', True)).lower()}`"
        ' (what `reconstruct(attention="auto")` runs, and whether the GSA records choose keypoints and view'
        " pairs): its GSA selection is untrained, and matching guided by those records failed where"
        " geometric view pairs succeed.",
        "",
        "## Accuracy (held-out synthetic scenes, `benchmarks/train_default.py evaluate --candidate pose`)",
        "",
        f"Device: {evaluation['device']}, {evaluation['date']}. Tables per view count in"
        " `benchmarks/results/accuracy_default_model_pose_*.md`.",
        "",
        *_table(evaluation),
        "",
        "The table scores the model's own outputs (camera head): its camera head has still not learned"
        " relative pose (AUC@30 near 0; `benchmarks/results/default_model_diagnosis.md`). Its descriptors"
        " have: the poses `reconstruct` starts bundle adjustment from are token poses, computed from"
        " descriptor matches and the predicted depth (`benchmarks/results/token_poses.md`; pipeline figures"
        " in `benchmarks/results/pipeline_default_*.md`).",
        "",
        "## Limitations",
        "",
        "Small and briefly trained on synthetic rooms only: use it to run everything offline and to check a"
        " set-up, not for real photographs. Token poses drift along long sequences (they chain pair poses"
        " along a spanning tree) and bundle adjustment does not always recover: see the per-scene pipeline"
        " figures. For real images pass official weights, e.g."
        " `speed3r-sfm reconstruct IMAGES -o OUT --model facebook/VGGT-1B --attention gsa` (they load"
        " strictly; this repository has not yet compared its outputs with upstream on the real weights).",
        "",
        *previous_limitations(target / "MODEL_CARD.md", datetime.date.today().isoformat()),
    ]
    (staging / "MODEL_CARD.md").write_text("\n".join(lines))
    for name in ("default.safetensors", "default.json", "MODEL_CARD.md"):
        os.replace(staging / name, target / name)
    staging.rmdir()
    print("\n".join(lines))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["dense", "distil", "pose", "evaluate", "ship"])
    p.add_argument(
        "--candidate",
        choices=["distil", "pose"],
        default="distil",
        help="evaluate/ship: the distilled student (stages 1-2) or the pose-tuned model (stage 3)",
    )
    p.add_argument("--run-dir", default=str(REPO / "outputs" / "default_model"))
    p.add_argument("--minutes", type=float, default=8.0, help="training time of this call")
    p.add_argument("--total-minutes", type=float, default=None, help="whole training budget of the stage")
    p.add_argument("--devices", type=int, default=None)
    p.add_argument(
        "--init-from-export", action="store_true", help="last.ckpt lost: continue from exported weights"
    )
    p.add_argument("--fresh", action="store_true", help="last.ckpt lost: start the stage over")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--out", default=None, help="copy the stage's small artefacts here (e.g. $OUT)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config entry of a training stage, e.g. data.synthetic.pool_refresh=4 (YAML value)",
    )
    p.add_argument("--views", type=int, nargs="+", default=[24, 100])
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--height", type=int, default=224)
    p.add_argument("--width", type=int, default=294)
    p.add_argument("--supersample", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--weights-dir", default=str(REPO / "speed3r_sfm" / "weights"), help="where ship writes")
    args = p.parse_args(argv)
    if args.total_minutes is None:
        args.total_minutes = {"dense": 15.0, "distil": 6.0, "pose": 4.5}.get(args.stage, 0.0)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.stage in ("dense", "distil", "pose"):
        train_stage(args.stage, args)
    elif args.stage == "evaluate":
        evaluate_stage(args)
    elif args.candidate == "pose":
        ship_pose_stage(args)
    else:
        ship_stage(args)


if __name__ == "__main__":
    main()
