"""The accuracy harness: oracle, noisy oracle, SIFT baseline and the benchmark CLI on tiny settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from speed3r_sfm.data.synthetic import render_scene
from speed3r_sfm.eval.evaluate import evaluate_predictor, evaluate_reconstruction, oracle_predictor, summarize
from speed3r_sfm.eval.sift_baseline import evaluate_sift_baseline, run_sift_baseline
from speed3r_sfm.models.prediction import Prediction


@pytest.fixture(scope="module")
def views():
    return render_scene(31, 6, 36, 48, "orbit")


def test_oracle_in_a_random_similarity_frame_scores_perfectly(views):
    result = evaluate_predictor(oracle_predictor(views, seed=3), views, seed=31)
    m = result.metrics
    for key in ("RRA@5", "RTA@5", "AUC@5", "AUC@30", "registered", "delta<1.25"):
        assert m[key] == pytest.approx(1.0), key
    assert m["ATE"] < 1e-5 and m["AbsRel"] < 1e-5
    assert 0 < m["Acc"] < 0.05 and 0 < m["Comp"] < 0.05, "only the subsampling floor remains"


def test_noisy_oracle_degrades_every_pose_metric(views):
    clean = evaluate_predictor(oracle_predictor(views), views).metrics
    noisy = evaluate_predictor(
        oracle_predictor(views, rotation_noise_deg=3.0, translation_noise=0.1), views
    ).metrics
    assert noisy["AUC@5"] < clean["AUC@5"] and noisy["AUC@30"] < clean["AUC@30"]
    assert 0.02 < noisy["ATE"] < 0.2
    assert noisy["AbsRel"] < 1e-5, "depth maps were not perturbed"


def test_unregistered_views_count_as_failures(views):
    registered = torch.tensor([True, True, True, True, False, False])
    m, rre, _ = evaluate_reconstruction(views, views.cam_from_world, registered)
    assert m["registered"] == pytest.approx(4 / 6)
    assert m["RRA@5"] == pytest.approx(6 / 15) and m["AUC@30"] == pytest.approx(6 / 15)
    assert m["ATE"] < 1e-5 and math.isnan(m["AbsRel"]) and math.isnan(m["Acc"])
    assert torch.isinf(rre).sum() == 9


def test_summary_pools_pairs_over_scenes(views):
    good = evaluate_predictor(oracle_predictor(views), views)
    bad = evaluate_predictor(oracle_predictor(views, rotation_noise_deg=40.0), views)
    summary = summarize([good, bad])
    pooled = (good.rre < 5).sum() + (bad.rre < 5).sum()
    assert summary["RRA@5"] == pytest.approx(pooled.item() / 30)
    assert summary["ATE"] == pytest.approx((good.metrics["ATE"] + bad.metrics["ATE"]) / 2)


@pytest.mark.slow
def test_sift_baseline_registers_a_short_video():
    views = render_scene(1, 12, 147, 196, "forward")
    sfm = run_sift_baseline(views.images)
    assert sfm.registered.sum() >= 10
    assert sfm.points.shape[0] > 100 and sfm.time_s > 0
    assert 0 < sfm.reprojection_error_px < 4, "COLMAP's mapper filters observations above 4 px"
    result = evaluate_sift_baseline(views)
    assert result.metrics["RRA@5"] > 0.7 and result.metrics["ATE"] < 0.1
    assert math.isnan(result.metrics["AbsRel"]), "SfM gives no depth maps"
    # known intrinsics (COLMAP's pixel centres): the mapper keeps them
    k = views.intrinsics[0].double()
    params = f"{float(k[0, 0])},{float(k[0, 2]) + 0.5},{float(k[1, 2]) + 0.5},0"
    known = run_sift_baseline(views.images, camera_params=params)
    assert known.registered.sum() >= 10
    registered_k = known.intrinsics[known.registered]
    assert torch.allclose(registered_k, k.to(registered_k.dtype).expand_as(registered_k), atol=1e-4)


def test_benchmark_cli_writes_markdown_and_json(tmp_path, load_benchmark):
    bench = load_benchmark("accuracy")
    args = ["--methods", "oracle", "test_metrics_harness:noisy_factory", "--seeds", "5", "6"]
    args += ["--views", "4", "--height", "24", "--width", "32", "--supersample", "1", "--device", "cpu"]
    report = bench.main(args + ["--out", str(tmp_path), "--tag", "tiny"])
    data = json.loads((tmp_path / "accuracy_tiny.json").read_text())
    assert data["settings"]["seeds"] == [5, 6] and data["settings"]["trajectories"] == ["orbit", "forward"]
    assert data["summary"]["oracle"]["AUC@30"] == pytest.approx(1.0)
    assert data["summary"]["test_metrics_harness:noisy_factory"]["ATE"] > 0
    assert report["summary"]["oracle"]["ATE"] == data["summary"]["oracle"]["ATE"]
    md = (tmp_path / "accuracy_tiny.md").read_text()
    assert "| oracle | 1.000 |" in md and "Machine:" in md


def noisy_factory():
    """A model factory as the CLI loads it (module on sys.path via pytest's rootdir-relative import):
    returns a Predictor with made-up geometry."""

    def predict(images: torch.Tensor):
        s, h, w = images.shape[1], images.shape[-2], images.shape[-1]
        eye = torch.eye(3, 4).expand(1, s, 3, 4).clone()
        eye[0, :, 0, 3] = torch.arange(s, dtype=torch.float32)  # cameras on a line
        k = torch.tensor([[w, 0, (w - 1) / 2], [0, w, (h - 1) / 2], [0, 0, 1.0]]).expand(1, s, 3, 3)
        ones = torch.ones(1, s, h, w)
        return Prediction(eye, k, ones, ones, torch.rand(1, s, h, w, 3), ones)

    return predict


def test_pipeline_harness_counts_a_failed_scene_as_the_worst(load_benchmark, monkeypatch):
    """A scene that ends in ReconstructionError is no row of means but the worst scene of its method."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # its own imports
    bench = load_benchmark("pipeline_synthetic")
    good = {
        "median_rre_feedforward": 3.0,
        "median_rre_ba": 0.1,
        "rre_reduction": 0.97,
        "pairs_rre_over_5deg": 0.0,
        "registered": 1.0,
        "median_rte_feedforward": 5.0,
        "median_rte_ba": 0.1,
        "reprojection_error_px": {"initial": 1.0, "final": 0.3},
        "counts": {"points3D": 1000},
        "wall_s": 6.0,
        "timings_s": {"total": 6.0, "model": 2.0},
    }
    failed = {"seed": 2, "error": "ReconstructionError: ...", "failed": True, "registered": 1 / 24}
    failed["pairs_rre_over_5deg"] = 1.0
    summary = bench.summarize({"default": [good, failed]})["default"]
    assert summary["registered_min"] == 1 / 24 and summary["pairs_rre_over_5deg_max"] == 1.0
    assert summary["failed_scenes"] == 1 and summary["median_rre_ba"] == 0.1 and summary["wall_s"] == 6.0
