"""Distillation: zero for an identical dense student, positive and differentiable for a GSA student."""

from __future__ import annotations

import math

import pytest
import torch

from speed3r_sfm.attention import GlobalSparseAttention
from speed3r_sfm.training.backbone import BackboneSpec, export_weights, global_attention_modules
from speed3r_sfm.training.distill import (
    AttentionRecorder,
    DistillConfig,
    Distiller,
    attention_distillation_loss,
    build_teacher,
    init_student_from_teacher,
    output_distillation_loss,
)
from speed3r_sfm.training.module import ReconstructionModule

SPEC = {"name": "vggt", "preset": "tiny", "overrides": {"enable_track": False}}
GSA = {
    "kind": "gsa",
    "block_size": 4,
    "compression_block_size": 8,
    "query_block_size": 8,
    "top_k": 1,
    "backend": "gather",
}


@pytest.fixture(autouse=True)
def _fast_cpu_kernels():
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # oneDNN's first-call setup costs seconds on the CPU
    yield
    torch.backends.mkldnn.enabled = enabled


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    torch.manual_seed(0)
    spec = BackboneSpec(**SPEC)
    model = spec.build()
    return str(
        export_weights(model, spec, tmp_path_factory.mktemp("teacher") / "teacher.safetensors", "float32")
    )


def images(views: int = 3) -> torch.Tensor:
    return torch.rand(1, views, 3, 42, 56, generator=torch.Generator().manual_seed(1))


def test_output_and_attention_loss_hand_cases():
    t = {"depth": torch.full((2, 3), 2.0), "pose_enc_list": [torch.zeros(2, 9), torch.ones(2, 9)]}
    s = {
        "depth": torch.full((2, 3), 2.0 * math.e),
        "pose_enc_list": [torch.full((2, 9), 0.5), torch.ones(2, 9)],
    }
    out = output_distillation_loss(s, t, {"depth": "log_l1", "pose_enc_list": "list_l1", "missing": "l1"})
    assert out["depth"].item() == pytest.approx(1.0)
    assert out["pose_enc_list"].item() == pytest.approx(0.25)
    assert out["outputs"].item() == pytest.approx(1.25)
    # keys the user named must exist: "pose_encs" (a typo) had distilled nothing, silently
    with pytest.raises(ValueError, match=r"output_keys \['pose_encs'\] are not outputs of both"):
        output_distillation_loss(s, t, {"depth": "log_l1", "pose_encs": "l1"}, required=True)
    teacher = [torch.randn(1, 2, 5, 4, generator=torch.Generator().manual_seed(2))]
    student = [2 * teacher[0]]
    assert attention_distillation_loss(student, teacher, "mse").item() == pytest.approx(
        teacher[0].square().mean().item()
    )
    assert attention_distillation_loss(student, teacher, "relative_mse").item() == pytest.approx(1.0)
    assert attention_distillation_loss(student, teacher, "cosine").item() == pytest.approx(0.0, abs=1e-6)


def make_distiller(teacher_path: str, attention: dict | None, **config) -> tuple[Distiller, torch.nn.Module]:
    spec = BackboneSpec(**SPEC)
    teacher = build_teacher(spec, teacher_path)
    student = spec.with_attention(attention).build()
    init_student_from_teacher(student, teacher)
    student.train()
    cfg = DistillConfig(teacher_checkpoint=teacher_path, **config)
    return Distiller(teacher, student, "vggt", cfg), student


@pytest.mark.parametrize("kind", ["relative_mse", "cosine"])
def test_dense_student_equal_to_teacher_has_zero_loss(teacher_path, kind):
    distiller, student = make_distiller(teacher_path, None, attention_loss=kind)
    out, terms = distiller(student, images())
    assert set(out) >= {"pose_enc_list", "depth", "world_points"}
    assert terms["attention"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["outputs"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["distill"].item() == pytest.approx(0.0, abs=1e-6)
    assert distiller.teacher.training is False
    distiller.train()
    assert distiller.teacher.training is False and not distiller.teacher.model.training


def test_gsa_student_loss_is_positive_and_reaches_the_gates(teacher_path):
    distiller, student = make_distiller(teacher_path, GSA)
    gsa = [m for _, m in global_attention_modules(student) if isinstance(m, GlobalSparseAttention)]
    assert len(gsa) == student.config.depth and all(m.gate.is_training_free() for m in gsa)
    _, terms = distiller(student, images())
    assert terms["attention"].item() > 1e-4 and terms["outputs"].item() > 1e-6
    terms["distill"].backward()
    for module in gsa:
        grad = module.gate.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None for p in distiller.teacher.parameters())


def test_recorder_ignores_checkpoint_recomputation(teacher_path):
    batch = images()
    losses, grads = [], []
    for checkpointing in (False, True):
        distiller, student = make_distiller(teacher_path, GSA)
        student.gradient_checkpointing = checkpointing
        _, terms = distiller(student, batch)
        terms["distill"].backward()
        losses.append(terms["distill"].item())
        grads.append(student.aggregator.global_blocks[1].attn.qkv.weight.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)

    module = torch.nn.Linear(2, 2)
    recorder = AttentionRecorder([("lin", module)])
    first = module(torch.ones(1, 2))
    module(torch.zeros(1, 2))  # a second call (as in a recomputation) is ignored
    assert torch.equal(recorder.ordered()[0], first)
    recorder.remove()


def test_module_checkpoints_exclude_the_teacher(teacher_path):
    kwargs = {
        "backbone": {**SPEC, "attention": GSA},
        "distill": {"teacher_checkpoint": teacher_path, "supervised_weight": 0.5},
        "freeze": ["aggregator.patch_embed*"],
    }
    module = ReconstructionModule(**kwargs)
    assert any(k.startswith("distiller.") for k in module.state_dict())
    assert not any(p.requires_grad for p in module.model.aggregator.patch_embed.parameters())
    # the student starts from the teacher's weights
    teacher_qkv = module.distiller.teacher.model.aggregator.global_blocks[0].attn.qkv.weight
    assert torch.equal(module.model.aggregator.global_blocks[0].attn.qkv.weight, teacher_qkv)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("distiller.") for k in checkpoint["state_dict"])
    assert any(k.endswith("attn.attend.gate.weight") for k in checkpoint["state_dict"])
    restored = ReconstructionModule(**kwargs)
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"])  # strict
    # a full training step: supervised + distillation terms, all finite
    batch = {
        "images": images(2),
        "depth": torch.rand(1, 2, 42, 56) + 1.0,
        "intrinsics": torch.tensor([[40.0, 0, 27.5], [0, 40.0, 20.5], [0, 0, 1]]).expand(1, 2, 3, 3),
        "cam_from_world": torch.eye(3, 4).expand(1, 2, 3, 4).clone(),
    }
    batch["cam_from_world"][0, 1, 0, 3] = 0.3
    loss, _, logs = restored._step(batch)
    assert torch.isfinite(loss) and {"distill/attention", "distill/outputs", "sup/camera"} <= set(logs)
    expected = logs["distill/distill"] + 0.5 * logs["sup/loss"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
