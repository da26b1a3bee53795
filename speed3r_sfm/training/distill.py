"""Distillation of a GSA student from a frozen dense teacher of the same architecture.

The teacher runs under ``no_grad`` in eval mode; the student is trained to match

- its outputs (:func:`output_distillation_loss`: pose encodings of every iteration, depth, points and
  confidences; log-space for positive quantities), and
- per layer, the outputs of the global blocks' attention kernels (``attn.attend``, shape
  (B, heads, N, head_dim)), captured with forward hooks (:class:`AttentionRecorder`) and compared by
  :func:`attention_distillation_loss` (MSE, relative MSE or 1 − cosine).

A student equal to the teacher with dense attention has zero distillation loss; a GSA student gets a
positive loss whose gradient reaches the GSA gates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attention import is_gsa_parameter
from ..models.checkpoint import load_state_dict_checked
from .backbone import BackboneSpec, global_attention_modules, load_weights

# Output key -> comparison: "l1" on values, "log_l1" on logs of positive values, "list_l1" for a list of
# tensors (mean over the list).
VGGT_OUTPUTS = {
    "pose_enc_list": "list_l1",
    "depth": "log_l1",
    "depth_conf": "log_l1",
    "world_points": "l1",
    "world_points_conf": "log_l1",
}
PI3_OUTPUTS = {"local_points": "l1", "points": "l1", "camera_poses": "l1", "conf": "l1"}
ATTENTION_LOSSES = ("mse", "relative_mse", "cosine")


@dataclass
class DistillConfig:
    """``teacher_checkpoint``: dense weights (.safetensors/.pt, or a Lightning .ckpt of this package's
    module). The student starts from them (GSA gates at their training-free init) unless
    ``init_student_from_teacher`` is False. Loss = ``output_weight`` · outputs + ``attention_weight`` ·
    attention (+ the supervised loss times ``supervised_weight``, applied by the module)."""

    teacher_checkpoint: str = ""
    init_student_from_teacher: bool = True
    output_weight: float = 1.0
    attention_weight: float = 1.0
    attention_loss: str = "relative_mse"
    supervised_weight: float = 0.0
    output_keys: list[str] | None = None

    def __post_init__(self) -> None:
        if self.attention_loss not in ATTENTION_LOSSES:
            raise ValueError(f"attention_loss must be one of {ATTENTION_LOSSES}, got {self.attention_loss!r}")

    @classmethod
    def from_any(cls, value: DistillConfig | dict[str, Any] | None) -> DistillConfig | None:
        if value is None or isinstance(value, cls):
            return value
        return cls(**value)


class AttentionRecorder:
    """Forward hooks that keep the first output of each module per forward pass (a recomputation under
    activation checkpointing calls the hook again; it is ignored). Call :meth:`clear` before each pass."""

    def __init__(self, modules: list[tuple[str, nn.Module]]) -> None:
        self.names = [name for name, _ in modules]
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in modules]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if name not in self.outputs:
                self.outputs[name] = output

        return hook

    def clear(self) -> None:
        self.outputs = {}

    def ordered(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"attention outputs not recorded for {missing[:3]} (forward not run?)")
        return [self.outputs[n] for n in self.names]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _compare(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    student, teacher = student.float(), teacher.float()
    if kind == "log_l1":
        return (student.clamp_min(1e-6).log() - teacher.clamp_min(1e-6).log()).abs().mean()
    return (student - teacher).abs().mean()


def output_distillation_loss(
    student: dict[str, Any], teacher: dict[str, Any], keys: dict[str, str], required: bool = False
) -> dict[str, torch.Tensor]:
    """Per-key distances (keys present in both outputs; with ``required`` every key must be) and their sum
    under ``"outputs"``."""
    missing = sorted(k for k in keys if k not in student or k not in teacher)
    if required and missing:
        raise ValueError(
            f"distill output_keys {missing} are not outputs of both student and teacher; they give "
            f"{sorted(set(student) & set(teacher))}"
        )
    terms: dict[str, torch.Tensor] = {}
    for key, kind in keys.items():
        if key in missing:
            continue
        if kind == "list_l1":
            pairs = list(zip(student[key], teacher[key], strict=True))
            terms[key] = torch.stack([_compare(s, t, "l1") for s, t in pairs]).mean()
        else:
            terms[key] = _compare(student[key], teacher[key], kind)
    if not terms:
        raise ValueError(f"no output of {sorted(keys)} is present in both student and teacher outputs")
    terms["outputs"] = torch.stack(list(terms.values())).sum()
    return terms


def attention_distillation_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], kind: str = "relative_mse"
) -> torch.Tensor:
    """Mean over layers of the distance between (B, heads, N, D) attention outputs: ``mse`` =
    mean (s − t)², ``relative_mse`` = mean (s − t)² / mean t², ``cosine`` = mean over tokens of
    1 − cos(s, t) along D."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need as many student as teacher layers (got {len(student)} and {len(teacher)})")
    losses = []
    for s, t in zip(student, teacher, strict=True):
        s, t = s.float(), t.float()
        if kind == "mse":
            losses.append((s - t).square().mean())
        elif kind == "relative_mse":
            losses.append((s - t).square().mean() / t.square().mean().clamp_min(1e-12))
        elif kind == "cosine":
            losses.append((1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean())
        else:
            raise ValueError(f"unknown attention loss {kind!r}; choose one of {ATTENTION_LOSSES}")
    return torch.stack(losses).mean()


class FrozenTeacher(nn.Module):
    """A model that stays in eval mode with frozen parameters (``train()`` is a no-op)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        return self.model(images)


def build_teacher(spec: BackboneSpec, checkpoint: str) -> FrozenTeacher:
    """The dense version of ``spec`` with the weights of ``checkpoint`` (GSA keys in it are ignored)."""
    if not checkpoint:
        raise ValueError("distillation needs distill.teacher_checkpoint")
    model = spec.with_attention({"kind": "dense"}).build()
    load_weights(model, checkpoint, allow_missing_gsa=False, ignore_gsa=True)
    return FrozenTeacher(model)


class Distiller(nn.Module):
    """Teacher + hooks on teacher and student; :meth:`forward` runs both and returns the student's outputs
    and the distillation terms (``distill`` is the weighted total)."""

    def __init__(
        self, teacher: FrozenTeacher, student: nn.Module, model_name: str, config: DistillConfig
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.config = config
        default = VGGT_OUTPUTS if model_name == "vggt" else PI3_OUTPUTS
        keys = config.output_keys
        self.output_keys = default if keys is None else {k: default.get(k, "l1") for k in keys}
        self.keys_required = keys is not None  # named by the user: a typo must not distil nothing
        self._teacher_hooks = AttentionRecorder(global_attention_modules(teacher.model))
        self._student_hooks = AttentionRecorder(global_attention_modules(student))

    def forward(
        self, student: nn.Module, images: torch.Tensor
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        c = self.config
        self._teacher_hooks.clear()
        self._student_hooks.clear()
        teacher_out = self.teacher(images)
        teacher_attention = [t.detach() for t in self._teacher_hooks.ordered()]
        student_out = student(images)
        terms: dict[str, torch.Tensor] = {}
        total = None
        if c.output_weight > 0:
            outputs = output_distillation_loss(student_out, teacher_out, self.output_keys, self.keys_required)
            terms.update({f"out_{k}": v for k, v in outputs.items() if k != "outputs"})
            terms["outputs"] = outputs["outputs"]
            total = c.output_weight * outputs["outputs"]
        if c.attention_weight > 0:
            attention = attention_distillation_loss(
                self._student_hooks.ordered(), teacher_attention, c.attention_loss
            )
            terms["attention"] = attention
            total = (
                c.attention_weight * attention if total is None else total + c.attention_weight * attention
            )
        self._teacher_hooks.clear()
        self._student_hooks.clear()
        if total is None:
            raise ValueError("distillation with output_weight = attention_weight = 0 has no loss")
        terms["distill"] = total
        return student_out, terms

    def remove_hooks(self) -> None:
        self._teacher_hooks.remove()
        self._student_hooks.remove()


def init_student_from_teacher(student: nn.Module, teacher: FrozenTeacher) -> None:
    """Copy the teacher's weights into the student (GSA gates keep their training-free init)."""
    load_state_dict_checked(
        student, teacher.model.state_dict(), source="teacher", allow_missing=is_gsa_parameter
    )


__all__ = [
    "ATTENTION_LOSSES",
    "PI3_OUTPUTS",
    "VGGT_OUTPUTS",
    "AttentionRecorder",
    "DistillConfig",
    "Distiller",
    "FrozenTeacher",
    "attention_distillation_loss",
    "build_teacher",
    "init_student_from_teacher",
    "output_distillation_loss",
]
