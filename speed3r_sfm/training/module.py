"""LightningModule wrapping a VGGT or π³ backbone (dense or GSA): supervised training, fine-tuning and
distillation from a frozen dense teacher.

- Optimiser: AdamW (no weight decay on biases, norms, tokens, position embeddings and GSA gates) with a
  per-step linear warm-up then cosine decay to ``min_lr_ratio · lr``. The cosine's progress is the larger
  of ``step / total_steps`` and, when the Trainer has ``max_time`` (and ``schedule_on_time``), the
  fraction of that time already used, so a time-bounded run still ends at the low learning rate; both
  survive a resume (the Trainer's Timer state is in the checkpoint).
- Precision, clipping, DDP: Trainer options (``precision="bf16-mixed"``, ``gradient_clip_val``,
  ``strategy="ddp"``). Losses are computed in float32 with autocast off.
- ``gradient_checkpointing`` sets the backbone's activation checkpointing; ``freeze`` /
  ``train_only`` take fnmatch patterns of parameter names (e.g. ``"aggregator.patch_embed*"``).
- Validation logs the supervised loss, pose AUC@30 and AUC@5 (``eval.metrics``, pairs of views) and depth
  AbsRel (per-image median scaling).
- Checkpoints never contain the teacher (it is rebuilt from ``distill.teacher_checkpoint``).
  :meth:`export_weights` writes the (student) backbone alone as safetensors + JSON sidecar; with
  ``export_path`` this happens at the end of ``fit``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..attention import is_gsa_parameter
from ..eval.metrics import depth_errors, pose_auc, relative_pose_errors
from ..models.pi3 import cam_from_world_from_c2w
from ..models.vggt import pose_encoding_to_extrinsics_intrinsics
from . import backbone as bb
from ._lightning import pl
from .distill import DistillConfig, Distiller, build_teacher, init_student_from_teacher
from .losses import LossConfig, NormalizedTarget, build_criterion, normalize_ground_truth


@dataclass
class OptimConfig:
    """AdamW and the warm-up + cosine schedule.

    The cosine's progress is the largest of: ``(step - warmup) / (total_steps - warmup)`` (``total_steps``
    None: the Trainer's ``max_steps``, if set); with ``schedule_on_time``, the training time used
    (the Trainer's Timer, restored on resume) over ``total_time`` seconds, or over the Trainer's
    ``max_time`` when ``total_time`` is None. A run split over several time-bounded calls sets
    ``total_time`` to the whole budget and raises ``max_time`` call by call.
    """

    lr: float = 2e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    total_steps: int | None = None
    min_lr_ratio: float = 0.01
    schedule_on_time: bool = True
    total_time: float | None = None

    @classmethod
    def from_any(cls, value: OptimConfig | dict[str, Any] | None) -> OptimConfig:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        data = dict(value)
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)


EXPORT_DTYPES = ("float16", "bfloat16", "float32")


def check_batch(batch: dict[str, Any]) -> None:
    """Raise a ValueError naming the problem unless ``batch`` has the layout of ``training/data.py``:
    ``images`` (B, V, 3, H, W) floats in [0, 1], ``depth`` (B, V, H, W) (0 = invalid), ``intrinsics``
    (B, V, 3, 3), ``cam_from_world`` (B, V, 3, 4) world-to-camera (OpenCV axes), optional ``has_depth``
    (B,)."""
    layout = "see the batch layout in speed3r_sfm/training/data.py"
    missing = [k for k in ("images", "depth", "intrinsics", "cam_from_world") if k not in batch]
    if missing:
        raise ValueError(f"the batch has no {missing} (it has {sorted(batch)}); {layout}")
    images = batch["images"]
    if images.ndim != 5 or images.shape[2] != 3:
        raise ValueError(f"batch images must be (B, V, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"batch images must be floats in [0, 1], got {images.dtype}")
    if float(images.detach().amax()) > 1.0 + 1e-3:
        raise ValueError(
            f"batch images must be floats in [0, 1], got values up to {float(images.amax()):g}; "
            "divide 0-255 images by 255"
        )
    b, v, _, h, w = images.shape
    for key, shape in (
        ("depth", (b, v, h, w)),
        ("intrinsics", (b, v, 3, 3)),
        ("cam_from_world", (b, v, 3, 4)),
    ):
        if tuple(batch[key].shape) != shape:
            raise ValueError(
                f"batch {key} must be {shape} for images {tuple(images.shape)}, got "
                f"{tuple(batch[key].shape)}; {layout}"
            )


def warmup_cosine_factor(step: int, warmup_steps: int, progress: float, min_ratio: float) -> float:
    """LR multiplier: (step + 1) / warmup_steps during warm-up, then
    min_ratio + (1 − min_ratio) · (1 + cos(π · progress)) / 2 with progress clamped to [0, 1]."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _plain(value: Any) -> Any:
    """Dataclasses → dicts, tuples → lists (checkpoint hyper-parameters must be plain types)."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class ReconstructionModule(pl.LightningModule):
    """Backbone + losses (+ distillation teacher). See the module docstring.

    Args:
        backbone: :class:`~.backbone.BackboneSpec` (model name, preset, overrides, attention).
        init_checkpoint: weights to start from (.safetensors/.pt/.ckpt, or "default": the shipped weights);
            GSA gates may be missing.
        loss: :class:`~.losses.LossConfig`.
        optim: :class:`OptimConfig`.
        distill: :class:`~.distill.DistillConfig`; None trains without a teacher.
        freeze: fnmatch patterns of parameters to freeze.
        train_only: if set, freeze every parameter not matching one of these patterns.
        gradient_checkpointing: activation checkpointing of the backbone's blocks while training.
        export_path: write the backbone's weights here (safetensors + .json) when ``fit`` ends.
        export_dtype: dtype of exported parameters ("float16", "bfloat16" or "float32").
        float32_matmul_precision: ``torch.set_float32_matmul_precision`` when fitting on CUDA ("high":
            TF32 for the float32 parts, e.g. the heads, which run outside autocast); None leaves it.
    """

    def __init__(
        self,
        backbone: bb.BackboneSpec | None = None,
        init_checkpoint: str | None = None,
        loss: LossConfig | None = None,
        optim: OptimConfig | None = None,
        distill: DistillConfig | None = None,
        freeze: list[str] | None = None,
        train_only: list[str] | None = None,
        gradient_checkpointing: bool = False,
        export_path: str | None = None,
        export_dtype: str = "float16",
        float32_matmul_precision: str | None = "high",
    ) -> None:
        super().__init__()
        self.spec = bb.BackboneSpec.from_any(backbone)
        self.loss_config = LossConfig.from_any(loss)
        self.optim_config = OptimConfig.from_any(optim)
        self.distill_config = DistillConfig.from_any(distill)
        self.export_path = export_path
        self.export_dtype = export_dtype
        self.float32_matmul_precision = float32_matmul_precision
        self.save_hyperparameters(
            _plain(
                {
                    "backbone": self.spec,
                    "init_checkpoint": init_checkpoint,
                    "loss": self.loss_config,
                    "optim": self.optim_config,
                    "distill": self.distill_config,
                    "freeze": freeze,
                    "train_only": train_only,
                    "gradient_checkpointing": gradient_checkpointing,
                    "export_path": export_path,
                    "export_dtype": export_dtype,
                    "float32_matmul_precision": float32_matmul_precision,
                }
            )
        )
        if export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype must be one of {EXPORT_DTYPES}, got {export_dtype!r}")
        if export_path is not None and not str(export_path).endswith(".safetensors"):
            raise ValueError(f"export_path {export_path} must end in .safetensors")
        for name, patterns in (("freeze", freeze), ("train_only", train_only)):
            if isinstance(patterns, str):  # one pattern, not its characters
                raise TypeError(f"{name} takes a list of patterns, e.g. [{patterns!r}]")
        self.model = self.spec.build()
        self.trained_size: list[int] | None = None  # (H, W) of the training batches, for the export
        self.pipeline_settings: dict[str, Any] = {}  # kept from an exported init checkpoint's sidecar
        if init_checkpoint == "default":  # the shipped weights, wherever the package is installed
            from speed3r_sfm.pipeline.backbone import DEFAULT_WEIGHTS

            init_checkpoint = str(DEFAULT_WEIGHTS)
        if init_checkpoint:
            bb.load_weights(
                self.model, init_checkpoint, allow_missing_gsa=True, ignore_gsa=not bb.uses_gsa(self.model)
            )
            self.pipeline_settings = bb.inherit_pipeline_settings(init_checkpoint, self.model)
        self.distiller: Distiller | None = None
        if self.distill_config is not None:
            teacher = build_teacher(self.spec, self.distill_config.teacher_checkpoint)
            if self.distill_config.init_student_from_teacher and not init_checkpoint:
                init_student_from_teacher(self.model, teacher)
            self.distiller = Distiller(teacher, self.model, self.spec.name, self.distill_config)
        self.model.gradient_checkpointing = gradient_checkpointing
        bb.freeze_parameters(self.model, list(freeze or []))
        if train_only:
            names = [n for n, _ in self.model.named_parameters()]
            keep = set()
            for pattern in train_only:
                hits = fnmatch.filter(names, pattern)
                if not hits:
                    raise ValueError(f"train_only pattern {pattern!r} matches no parameter")
                keep.update(hits)
            for name, param in self.model.named_parameters():
                if name not in keep and param.requires_grad:
                    param.requires_grad_(False)
        track_head = getattr(self.model, "track_head", None)
        if track_head is not None:  # no loss trains it: frozen, or DDP waits for gradients that never come
            track_head.requires_grad_(False)
        self.frozen = sorted(n for n, p in self.model.named_parameters() if not p.requires_grad)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("every parameter is frozen: check freeze / train_only")
        self.criterion = build_criterion(self.spec.name, self.loss_config)

    # ------------------------------------------------------------------ forward and losses

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        return self.model(images)

    def target(self, batch: dict[str, Any]) -> NormalizedTarget:
        """Normalised ground truth of a batch (samples without depth get no valid pixel)."""
        depth = batch["depth"].float()
        valid = depth > 0
        if "has_depth" in batch:
            valid = valid & batch["has_depth"].to(torch.bool).view(-1, 1, 1, 1)
        return normalize_ground_truth(
            depth, batch["intrinsics"], batch["cam_from_world"], valid, self.loss_config.min_valid_pixels
        )

    def _supervised(self, out: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        with torch.autocast(device_type=batch["images"].device.type, enabled=False):
            return self.criterion(out, self.target(batch))

    def _step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any], dict[str, torch.Tensor]]:
        check_batch(batch)
        images = batch["images"]
        logs: dict[str, torch.Tensor] = {}
        if self.distiller is not None:
            out, terms = self.distiller(self.model, images)
            logs.update({f"distill/{k}": v for k, v in terms.items()})
            loss = terms["distill"]
            weight = self.distill_config.supervised_weight
        else:
            out = self.model(images)
            loss = None
            weight = 1.0
        if weight > 0:
            sup = self._supervised(out, batch)
            logs.update({f"sup/{k}": v for k, v in sup.items()})
            loss = weight * sup["loss"] if loss is None else loss + weight * sup["loss"]
        logs["loss"] = loss
        return loss, out, logs

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.trained_size = [int(v) for v in batch["images"].shape[-2:]]  # (H, W) the export runs at
        loss, _, logs = self._step(batch)
        b, s = batch["images"].shape[:2]
        self.log_dict({f"train/{k}": v.detach() for k, v in logs.items()}, batch_size=b)
        self.log("train/views", float(s), batch_size=b)
        self.log("train/batch_size", float(b), batch_size=b)
        if "render_s" in batch:
            self.log("train/render_s", float(batch["render_s"]), batch_size=b)
        self.log("train/loss_step", loss.detach(), prog_bar=True, batch_size=b, logger=False)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, out, logs = self._step(batch)
        b, s, _, h, w = batch["images"].shape
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, batch_size=b, sync_dist=True)
        cam_from_world, depth = self.predicted_geometry(out, (h, w))
        aucs30, aucs5, abs_rels = [], [], []
        for i in range(b):
            if s < 2:  # one view per sample: no pair to score (NaN, as abs_rel without depth)
                aucs30.append(float("nan"))
                aucs5.append(float("nan"))
            else:
                rre, rte = relative_pose_errors(cam_from_world[i].float(), batch["cam_from_world"][i].float())
                aucs30.append(pose_auc(rre, rte, 30))
                aucs5.append(pose_auc(rre, rte, 5))
            gt_depth = batch["depth"][i]
            if bool(batch.get("has_depth", torch.ones(b, dtype=torch.bool))[i]) and bool(
                (gt_depth > 0).any()
            ):
                abs_rels.append(depth_errors(depth[i].float(), gt_depth.float())["abs_rel"])
        pairs = b * s * (s - 1) // 2
        self.log("val/auc30", float(sum(aucs30) / b), batch_size=pairs, sync_dist=True, prog_bar=True)
        self.log("val/auc5", float(sum(aucs5) / b), batch_size=pairs, sync_dist=True)
        # always logged (NaN without depth) so that every rank reduces the same metrics under DDP
        abs_rel = sum(abs_rels) / len(abs_rels) if abs_rels else float("nan")
        self.log("val/abs_rel", float(abs_rel), batch_size=max(1, len(abs_rels)), sync_dist=True)

    def predicted_geometry(
        self, out: dict[str, Any], image_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, 3, 4) predicted cam_from_world and (B, S, H, W) depth of a forward output."""
        if self.spec.name == "vggt":
            cam_from_world, _ = pose_encoding_to_extrinsics_intrinsics(out["pose_enc"].float(), image_size)
            if "depth" in out:
                return cam_from_world, out["depth"][..., 0]
            points = out["world_points"].float()
            rot, trans = cam_from_world[..., None, None, 2, :3], cam_from_world[..., None, None, 2, 3]
            return cam_from_world, (points * rot).sum(-1) + trans
        return cam_from_world_from_c2w(out["camera_poses"].float()), out["local_points"][..., 2]

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        c = self.optim_config
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            plain = p.ndim < 2 or "token" in name or "pos_embed" in name or is_gsa_parameter(name)
            (no_decay if plain else decay).append(p)
        groups = [
            g
            for g in (
                {"params": decay, "weight_decay": c.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            )
            if g["params"]
        ]
        optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def schedule_progress(self, step: int) -> float:
        """Cosine progress in [0, 1] after warm-up (see the module docstring)."""
        c = self.optim_config
        progress = 0.0
        trainer = self._trainer
        total = c.total_steps or (
            trainer.max_steps if trainer is not None and trainer.max_steps > 0 else None
        )
        if total:
            progress = (step - c.warmup_steps) / max(1, total - c.warmup_steps)
        if c.schedule_on_time and trainer is not None:
            timer = next((cb for cb in trainer.callbacks if isinstance(cb, pl.callbacks.Timer)), None)
            if timer is not None:
                elapsed = timer.time_elapsed("train")
                remaining = timer.time_remaining("train")
                duration = c.total_time or (None if remaining is None else elapsed + remaining)
                if duration:
                    progress = max(progress, elapsed / duration)
        return progress

    def lr_factor(self, step: int) -> float:
        c = self.optim_config
        return warmup_cosine_factor(step, c.warmup_steps, self.schedule_progress(step), c.min_lr_ratio)

    def on_fit_start(self) -> None:
        if self.float32_matmul_precision and self.device.type == "cuda":
            torch.set_float32_matmul_precision(self.float32_matmul_precision)
        warmup, max_steps = self.optim_config.warmup_steps, self.trainer.max_steps
        if 0 < max_steps < warmup:
            pl.utilities.rank_zero_warn(
                f"model.optim.warmup_steps ({warmup}) > trainer.max_steps ({max_steps}): the learning rate "
                f"stays in its warm-up and ends at {max_steps / warmup:.1%} of model.optim.lr; lower "
                "model.optim.warmup_steps for a short run"
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=1)

    # ------------------------------------------------------------------ checkpoints and export

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("distiller.")]:
            del state[key]
        # how the pipeline runs these weights: kept with them, not only in the init checkpoint's sidecar
        checkpoint[bb.CHECKPOINT_PIPELINE_KEY] = {
            "settings": self.pipeline_settings_as_trained(),
            "descriptor_layer": getattr(self.model.config, "descriptor_layer", None),
            "trained_size": self.trained_size,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get(bb.CHECKPOINT_PIPELINE_KEY)
        if stored:  # also when the init checkpoint has moved since (init_checkpoint=None)
            self.pipeline_settings = dict(stored.get("settings") or {})
            if stored.get("descriptor_layer") is not None and hasattr(self.model.config, "descriptor_layer"):
                self.model.config.descriptor_layer = stored["descriptor_layer"]
            self.trained_size = stored.get("trained_size")
        if self.distiller is not None:
            state = checkpoint["state_dict"]
            for key, value in self.distiller.state_dict().items():
                state.setdefault(f"distiller.{key}", value)

    def export_weights(self, path: str | os.PathLike, dtype: str | None = None) -> os.PathLike:
        """Write the backbone (the student when distilling) to ``path`` (.safetensors) + ``.json``."""
        info = {
            "global_step": int(self.global_step),
            "distilled": self.distiller is not None,
            "teacher_checkpoint": self.distill_config.teacher_checkpoint if self.distill_config else None,
        }
        dtype = dtype or self.export_dtype
        pipeline = self.pipeline_settings_as_trained()
        return bb.export_weights(self.model, self.spec, path, dtype, info=info, pipeline=pipeline)

    def pipeline_settings_as_trained(self) -> dict[str, Any]:
        """The pipeline settings, the input width replaced by the one the weights were trained at (the data
        module's size, else the training batches'; for a VGGT trained without an init checkpoint's settings,
        its crop preprocessing at that width)."""
        pipeline = dict(self.pipeline_settings)
        size = getattr(getattr(self._trainer, "datamodule", None), "size", None) if self._trainer else None
        size = size or self.trained_size
        if size is not None and "preprocessing" not in pipeline and self.spec.name == "vggt":
            # trained without an init checkpoint's settings: VGGT's crop convention at the width trained at
            patch = self.model.config.patch_size
            pipeline["preprocessing"] = {"mode": "crop", "target_size": int(size[1]), "patch_size": patch}
        elif "preprocessing" in pipeline and size is not None:
            pipeline["preprocessing"] = {**pipeline["preprocessing"], "target_size": int(size[1])}
        return pipeline

    def on_train_end(self) -> None:
        if self.export_path and self.trainer.is_global_zero:
            written = self.export_weights(self.export_path)
            pl.utilities.rank_zero_info(
                f"exported the backbone to {written} (and its .json); use it with "
                f"speed3r-sfm reconstruct IMAGES -o OUT --model {written}"
            )
