"""benchmarks/pose_candidate.py, train_default.py ship: candidate defaults keep the pipeline settings."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from speed3r_sfm.pipeline.backbone import load_backbone
from speed3r_sfm.training.backbone import BackboneSpec, export_weights, read_weights, sidecar

ROOT = Path(__file__).resolve().parents[1]


def test_candidate_keeps_the_weights_and_takes_the_shipped_pipeline_keys(tmp_path, load_benchmark):
    torch.manual_seed(0)
    spec = BackboneSpec(name="vggt", preset="small")
    source = export_weights(spec.build(), spec, tmp_path / "pose_dense.safetensors", "float16")
    write_candidate = load_benchmark("pose_candidate").write_candidate
    target = write_candidate(source, tmp_path / "cand" / "model.safetensors", width=224)

    meta = json.loads(sidecar(target).read_text())
    shipped = json.loads((ROOT / "speed3r_sfm" / "weights" / "default.json").read_text())
    assert meta["preprocessing"] == {"mode": "crop", "target_size": 224, "patch_size": 14}
    for key in ("pipeline_attention", "gsa_from_views", "gsa_guidance"):
        assert meta[key] == shipped[key]
    assert meta["config"]["descriptor_layer"] == 3
    assert meta["config"]["attention"] == shipped["config"]["attention"]

    before, after = read_weights(source), read_weights(target)
    shared = set(before) & set(after)
    assert shared == set(before)  # only the GSA gates (at their init) are new
    assert all(torch.equal(before[k], after[k]) for k in shared)

    backbone = load_backbone(str(target), "auto", "cpu", None, num_views=24)
    assert backbone.preprocessing.target_size == 224
    assert backbone.attention == shipped["pipeline_attention"]


def test_a_shipped_student_keeps_the_shipped_pipeline_settings_it_does_not_set(load_benchmark):
    student_sidecar = load_benchmark("train_default").student_sidecar
    shipped = json.loads((ROOT / "speed3r_sfm" / "weights" / "default.json").read_text())
    student = {
        "format": shipped["format"],
        "config": {"attention": {"kind": "gsa"}},
        "info": {"global_step": 10, "teacher_checkpoint": "/run/teacher.safetensors"},
        "gsa_guidance": True,  # the student's own setting wins
    }
    stages = [{"stage": "distil", "global_step": 10, "config": {"lr": 1}}]

    meta, kept = student_sidecar(student, shipped, stages, width=294)

    assert meta["input_warnings"] == shipped["input_warnings"]
    assert meta["pipeline_attention"] == shipped["pipeline_attention"]
    assert meta["gsa_guidance"] is True and "gsa_guidance" not in kept
    assert "gsa_guidance_why" not in meta  # the shipped explanation of the shipped setting goes with it
    assert meta["pipeline_attention_why"] == shipped["pipeline_attention_why"]
    assert "input_warnings" in kept and "preprocessing" not in kept
    assert meta["preprocessing"] == {"mode": "crop", "target_size": 294, "patch_size": 14}
    assert meta["info"]["stages"] == [{"stage": "distil", "global_step": 10}]
    assert "teacher_checkpoint" not in meta["info"] and "teacher_checkpoint" in student["info"]
    assert student_sidecar(student, {}, stages, width=294)[1] == []


def test_a_new_model_card_keeps_the_limitations_measured_on_the_weights_it_replaces(tmp_path, load_benchmark):
    previous_limitations = load_benchmark("train_default").previous_limitations
    shipped = (ROOT / "speed3r_sfm" / "weights" / "MODEL_CARD.md").read_text()
    kept = previous_limitations(ROOT / "speed3r_sfm" / "weights" / "MODEL_CARD.md", "2027-01-01")
    assert kept[0] == "Measured on the weights shipped before 2027-01-01, to be measured again on these:"
    assert kept[2] in shipped and "low_colour" in kept[2] and "## " not in kept[2]
    card = tmp_path / "MODEL_CARD.md"
    card.write_text("# Model\n\n## Limitations\n\nNarrow lenses fail.\n\n## Later\n\nother\n")
    assert previous_limitations(card, "d")[2] == "Narrow lenses fail."
    card.write_text("# Model\n\n## Training\n\nsteps\n")
    assert previous_limitations(card, "d") == [] and previous_limitations(tmp_path / "none.md", "d") == []
