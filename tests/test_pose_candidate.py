"""benchmarks/pose_candidate.py: a pose-stage export becomes a candidate default that reconstruct can load."""

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
