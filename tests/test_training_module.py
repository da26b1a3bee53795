"""ReconstructionModule: schedule, freezing, π³ training and validation, export round trip, bf16 autocast."""

from __future__ import annotations

import json
import math

import pytest
import torch

from speed3r_sfm.data.synthetic import render_batch
from speed3r_sfm.training.backbone import BackboneSpec, load_exported
from speed3r_sfm.training.module import OptimConfig, ReconstructionModule, warmup_cosine_factor


@pytest.fixture(autouse=True)
def _fast_cpu_kernels():
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # oneDNN's first-call setup costs seconds on the CPU
    yield
    torch.backends.mkldnn.enabled = enabled


@pytest.fixture(scope="module")
def batch():
    views = render_batch([3, 4], 3, 28, 42, trajectory="orbit", shadows=False)
    return {
        "images": views.images,
        "depth": views.depth,
        "intrinsics": views.intrinsics,
        "cam_from_world": views.cam_from_world,
        "has_depth": torch.tensor([True, False]),
    }


def test_warmup_cosine_factor_hand_values():
    assert warmup_cosine_factor(0, 4, 0.0, 0.1) == pytest.approx(0.25)
    assert warmup_cosine_factor(3, 4, 0.0, 0.1) == pytest.approx(1.0)
    assert warmup_cosine_factor(10, 4, 0.0, 0.1) == pytest.approx(1.0)
    assert warmup_cosine_factor(10, 4, 0.5, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine_factor(10, 4, 1.0, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(10, 4, 7.0, 0.1) == pytest.approx(0.1)  # clamped
    module = ReconstructionModule(
        backbone={"name": "vggt", "preset": "tiny", "overrides": {"enable_track": False}},
        optim=OptimConfig(lr=1.0, warmup_steps=2, total_steps=12, min_lr_ratio=0.0),
    )
    assert module.lr_factor(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_freeze_and_train_only():
    spec = {"name": "vggt", "preset": "tiny", "overrides": {"enable_track": False}}
    module = ReconstructionModule(backbone=spec, freeze=["aggregator.patch_embed*", "camera_head.trunk.*"])
    names = {n for n, p in module.model.named_parameters() if not p.requires_grad}
    assert all(n.startswith(("aggregator.patch_embed", "camera_head.trunk.")) for n in names)
    assert "aggregator.patch_embed.cls_token" in names and "aggregator.camera_token" not in names
    optimizer = module.configure_optimizers()["optimizer"]
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) not in optimised for n, p in module.model.named_parameters() if n in names)
    no_decay = {id(p) for p in optimizer.param_groups[1]["params"]}
    assert id(module.model.aggregator.camera_token) in no_decay
    assert id(module.model.aggregator.frame_blocks[0].attn.qkv.bias) in no_decay
    only = ReconstructionModule(backbone=spec, train_only=["depth_head.*"])
    trainable = [n for n, p in only.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("depth_head.") for n in trainable)
    with pytest.raises(ValueError, match="matches no parameter"):
        ReconstructionModule(backbone=spec, freeze=["no_such_module*"])


def test_pi3_module_trains_validates_and_exports(batch, tmp_path):
    module = ReconstructionModule(backbone={"name": "pi3", "preset": "tiny"}, gradient_checkpointing=True)
    module.train()
    loss, out, logs = module._step(batch)
    assert {"sup/points", "sup/relative_pose", "sup/conf"} <= set(logs)
    loss.backward()
    grads = [p.grad for p in module.model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    module.log_dict = lambda values, **kwargs: logged.update(values)
    module.eval()
    with torch.no_grad():
        module.validation_step(batch, 0)
    assert 0.0 <= logged["val/auc30"] <= 1.0 and logged["val/abs_rel"] > 0
    path = module.export_weights(tmp_path / "pi3.safetensors", dtype="float32")
    loaded = load_exported(path)
    with torch.no_grad():
        a, b = loaded(batch["images"]), module.model(batch["images"])
    assert torch.allclose(a["local_points"], b["local_points"], atol=1e-6)


def test_bf16_autocast_step_with_gsa_and_checkpointing(batch):
    gsa = {"kind": "gsa", "block_size": 3, "compression_block_size": 6, "query_block_size": 8, "top_k": 1}
    module = ReconstructionModule(
        backbone={"name": "vggt", "preset": "tiny", "overrides": {"enable_track": False}, "attention": gsa},
        gradient_checkpointing=True,
    )
    module.train()
    assert module.model.aggregator.gradient_checkpointing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, logs = module._step(batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    gate = module.model.aggregator.global_blocks[0].attn.attend.gate.weight
    assert gate.grad is not None and torch.isfinite(gate.grad).all()


def test_backbone_spec_presets():
    small = BackboneSpec("vggt", "small").config()
    assert (small.embed_dim, small.depth, small.img_size, small.dino.depth) == (128, 8, 224, 4)
    assert not small.enable_track and not small.enable_point
    params = sum(p.numel() for p in BackboneSpec("vggt", "small").build().parameters())
    assert 5e6 < params < 8e6 and params * 2 < 16 * 2**20  # fits one 16 MiB file in float16
    pi3_small = BackboneSpec("pi3", "small").config()
    assert (pi3_small.dim, pi3_small.decoder_depth, pi3_small.encoder.img_size) == (128, 12, 224)
    custom = BackboneSpec("vggt", "tiny", {"dino": {"depth": 1}}, {"kind": "gsa", "top_k": 3}).config()
    assert custom.dino.depth == 1 and custom.dino.embed_dim == 64 and custom.attention.top_k == 3
    with pytest.raises(TypeError, match="unknown VGGTConfig fields"):
        BackboneSpec("vggt", "tiny", {"not_a_field": 1}).config()


def test_weights_fine_tuned_from_the_default_keep_its_pipeline_settings(tmp_path):
    """The shipped sidecar tells the pipeline how to run the default (input size, dense below 64 views, no
    GSA guidance, descriptor layer for token poses); a fine-tuned export from it keeps that."""
    from speed3r_sfm.pipeline.backbone import DEFAULT_WEIGHTS, load_backbone
    from speed3r_sfm.pipeline.inputs import Preprocessing

    spec = {"name": "vggt", "preset": "small", "attention": {"kind": "gsa"}}
    module = ReconstructionModule(backbone=spec, init_checkpoint=str(DEFAULT_WEIGHTS))
    assert module.model.config.descriptor_layer == 3  # not set by the "small" preset
    path = module.export_weights(tmp_path / "tuned.safetensors")
    meta = json.loads(path.with_suffix(".json").read_text())
    shipped = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    for key in ("preprocessing", "pipeline_attention", "gsa_from_views", "gsa_guidance"):
        assert meta[key] == shipped[key], key
    assert meta["pipeline_settings_from"] == str(DEFAULT_WEIGHTS)
    assert meta["config"]["descriptor_layer"] == 3
    tuned = load_backbone(str(path), "auto", "cpu", num_views=24)
    assert tuned.attention == "dense" and not tuned.guided
    assert tuned.preprocessing == Preprocessing("crop", 294, patch_size=14)
    # the shipped weights loaded as a module run as the path does
    as_module = load_backbone(load_exported(DEFAULT_WEIGHTS), "auto", "cpu")
    assert not as_module.guided and as_module.preprocessing == Preprocessing("crop", 294, patch_size=14)
    # a checkpoint without a sidecar passes nothing on
    plain = ReconstructionModule(backbone={"name": "vggt", "preset": "tiny"})
    assert plain.pipeline_settings == {}


def test_training_checkpoints_carry_the_pipeline_settings(batch, tmp_path):
    """A .ckpt keeps how the pipeline runs its weights (the default's settings, descriptor layer, the width
    trained at): fine-tuning again from it kept none of them (token poses off, 224-px input, GSA
    guidance on), and load_from_checkpoint needed the moved init file to get them. The module itself
    passed to reconstruct runs as its export would, and stays in training mode."""
    from speed3r_sfm.pipeline.backbone import DEFAULT_WEIGHTS, load_backbone
    from speed3r_sfm.pipeline.inputs import Preprocessing
    from speed3r_sfm.training._lightning import pl

    spec = {"name": "vggt", "preset": "small"}
    module = ReconstructionModule(backbone=spec, init_checkpoint=str(DEFAULT_WEIGHTS))
    module.train()
    module.trained_size = [56, 84]  # what training_step records from its batches
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "tuned.ckpt")
    for again in (
        ReconstructionModule(backbone=spec, init_checkpoint=str(tmp_path / "tuned.ckpt")),
        ReconstructionModule.load_from_checkpoint(tmp_path / "tuned.ckpt", init_checkpoint=None),
    ):
        assert again.model.config.descriptor_layer == 3
        assert again.pipeline_settings["preprocessing"]["target_size"] == 84
        assert again.pipeline_settings["gsa_guidance"] is False
    from_module = load_backbone(module, "auto", "cpu")
    from_file = load_backbone(str(tmp_path / "tuned.ckpt"), "auto", "cpu")
    for backbone in (from_module, from_file):
        assert backbone.preprocessing == Preprocessing("crop", 84, patch_size=14)
        assert backbone.attention == "dense" and not backbone.guided
    assert module.training  # left as the caller had it


def test_module_options_are_checked_before_training():
    spec = {"name": "vggt", "preset": "tiny", "overrides": {"enable_track": False}}
    with pytest.raises(ValueError, match="export_dtype must be one of"):
        ReconstructionModule(backbone=spec, export_dtype="int8")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        ReconstructionModule(backbone=spec, export_path="weights.pt")
    with pytest.raises(TypeError, match=r"freeze takes a list of patterns, e.g. \['aggregator.\*'\]"):
        ReconstructionModule(backbone=spec, freeze="aggregator.*")


def test_validation_of_single_views_logs_no_pose_score(batch):
    module = ReconstructionModule(
        backbone={"name": "vggt", "preset": "tiny", "overrides": {"enable_track": False}}
    )
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    module.log_dict = lambda values, **kwargs: logged.update(values)
    one_view = {key: value[:, :1] if key != "has_depth" else value for key, value in batch.items()}
    module.eval()
    with torch.no_grad():
        module.validation_step(one_view, 0)  # "pose_auc: no pairs" before
    assert math.isnan(logged["val/auc30"]) and math.isnan(logged["val/auc5"])


def test_unknown_presets_list_every_preset():
    with pytest.raises(
        ValueError, match=r"unknown vggt preset 'smal'; choose one of \('vggt-1b', 'tiny', 'small'\)"
    ):
        BackboneSpec(name="vggt", preset="smal")


def test_batches_of_another_layout_are_named_errors(batch):
    """A custom data module's mistakes: raw tensor errors (or silent training on 0-255 images) before."""
    from speed3r_sfm.training.module import check_batch

    check_batch(batch)
    for change, message in (
        ({"depth": None}, r"the batch has no \['depth'\]"),
        ({"images": (batch["images"] * 255).to(torch.uint8)}, "floats in \\[0, 1\\], got torch.uint8"),
        ({"images": batch["images"] * 255}, "got values up to .*divide 0-255 images by 255"),
        ({"depth": batch["depth"][..., None]}, r"batch depth must be \(2, 3, 28, 42\)"),
        ({"cam_from_world": torch.eye(4).expand(2, 3, 4, 4)}, r"cam_from_world must be \(2, 3, 3, 4\)"),
    ):
        changed = {**batch, **change}
        changed = {k: v for k, v in changed.items() if v is not None}
        with pytest.raises(ValueError, match=message):
            check_batch(changed)


def test_configs_from_hyper_parameters_compare_equal_and_misspelt_attention_keys_fail_early():
    from speed3r_sfm.training.losses import LossConfig

    assert LossConfig.from_any({"correspondence_layers": [1, 3]}) == LossConfig()  # a tuple again
    with pytest.raises(ValueError, match=r"unknown attention options \['topk'\]"):
        BackboneSpec(name="vggt", preset="tiny", attention={"kind": "gsa", "topk": 3})
