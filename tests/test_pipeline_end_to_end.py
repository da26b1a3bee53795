"""End-to-end tests of ``reconstruct`` on a rendered synthetic scene, with the ground-truth oracle (with
pose noise) as the backbone, the tiny VGGT with GSA, the output project, the CLI entry point and failures.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import os
import re
from unittest import mock

import numpy as np
import pycolmap
import pytest
import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix
from PIL import Image

from speed3r_sfm.attention import AttentionConfig
from speed3r_sfm.cli import main
from speed3r_sfm.data.colmap_dataset import to_uint8_image
from speed3r_sfm.data.synthetic import make_cameras, make_scene, render_views
from speed3r_sfm.eval.metrics import relative_pose_errors
from speed3r_sfm.geometry import camera_centers, compose_poses, intrinsics_to_colmap, resize_intrinsics
from speed3r_sfm.models.prediction import Prediction
from speed3r_sfm.models.vggt import VGGT, VGGTConfig
from speed3r_sfm.pipeline import cli as pipeline_cli
from speed3r_sfm.pipeline import export as pipeline_export
from speed3r_sfm.pipeline import matching as pipeline_matching
from speed3r_sfm.pipeline.backbone import (
    Backbone,
    DeviceNotAvailableError,
    ModelNotAvailableError,
    load_backbone,
    resolve_device,
)
from speed3r_sfm.pipeline.bundle import triangulator_options
from speed3r_sfm.pipeline.export import OutputExistsError, OutputPathError
from speed3r_sfm.pipeline.inputs import LOW_COLOUR_SCORE, InputError, Preprocessing, select_images
from speed3r_sfm.pipeline.oracle import SceneOracle
from speed3r_sfm.pipeline.reconstruct import (
    PipelineOptions,
    PipelineResult,
    ReconstructionError,
    reconstruct,
    run_pipeline,
)

# the module, not the function of the same name that speed3r_sfm.pipeline exports
pipeline_reconstruct = importlib.import_module("speed3r_sfm.pipeline.reconstruct")
pipeline_rescue = importlib.import_module("speed3r_sfm.pipeline.rescue")
pipeline_passes = importlib.import_module("speed3r_sfm.pipeline.passes")
pipeline_stages = importlib.import_module("speed3r_sfm.pipeline.stages")

SEED, VIEWS, HEIGHT, WIDTH = 11, 8, 168, 224
NOISE_DEG = 1.5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Many small tensor ops: one thread is faster and steadier on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def scene_data(tmp_path_factory):
    scene = make_scene(SEED)
    k, poses = make_cameras(scene, VIEWS, HEIGHT, WIDTH, trajectory="forward")
    views = render_views(scene, k, poses, HEIGHT, WIDTH)
    folder = tmp_path_factory.mktemp("images")
    for i in range(VIEWS):
        Image.fromarray(to_uint8_image(views.images[i])).save(folder / f"view_{i:02d}.png")
    return {"scene": scene, "views": views, "folder": folder}


def _oracle(data, **kwargs) -> SceneOracle:
    views = data["views"]
    defaults = dict(
        preprocessing=Preprocessing("crop", WIDTH),
        depth=list(views.depth),
        rotation_noise_deg=NOISE_DEG,
        translation_noise=0.03,
        depth_noise=0.01,
        seed=3,
    )
    defaults.update(kwargs)
    sizes = defaults.pop("original_sizes", [(WIDTH, HEIGHT)] * VIEWS)
    intrinsics = defaults.pop("intrinsics", views.intrinsics)
    return SceneOracle(intrinsics, views.cam_from_world, sizes, **defaults)


def _report_of(*args, **kwargs) -> dict:
    """The report of ``run_pipeline(*args, **kwargs)`` with random weights: a reconstruction or, usually,
    ``ReconstructionError`` (no 3D point), which carries it."""
    try:
        return run_pipeline(*args, **kwargs).report
    except ReconstructionError as error:
        return error.report


def _poses(rec: pycolmap.Reconstruction, names: list[str]) -> torch.Tensor:
    return torch.stack(
        [torch.from_numpy(rec.find_image_with_name(n).cam_from_world().matrix()) for n in names]
    )


def _median_rre(poses: torch.Tensor, gt: torch.Tensor) -> float:
    rre, _ = relative_pose_errors(poses, gt)
    return float(rre.median())


@pytest.fixture(scope="module")
def oracle_project(scene_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("projects") / "oracle"
    result = run_pipeline(scene_data["folder"], output, model=_oracle(scene_data), attention="dense")
    return result, output


def test_bundle_adjustment_meets_the_accuracy_targets(scene_data, oracle_project):
    result, _ = oracle_project
    gt = scene_data["views"].cam_from_world.double()
    before = _median_rre(result.feedforward_cam_from_world, gt)
    after = _median_rre(_poses(result.reconstruction, result.image_names), gt)
    report = result.report
    assert before > 1.5  # the noise makes the feed-forward poses clearly wrong
    assert after <= 0.7 * before  # BA lowers the median rotation error by >= 30 %
    assert after <= 1.0
    assert report["reprojection_error_px"]["final"] <= 1.0
    assert report["reprojection_error_px"]["initial"] > report["reprojection_error_px"]["final"]
    assert result.reconstruction.num_reg_images() == VIEWS
    assert result.reconstruction.num_points3D() > 300


def test_project_files_read_back(scene_data, oracle_project):
    result, output = oracle_project
    assert sorted(p.name for p in output.iterdir()) == ["database.db", "points.ply", "report.json", "sparse"]
    assert {"cameras.bin", "images.bin", "points3D.bin"} <= {
        p.name for p in (output / "sparse" / "0").iterdir()
    }
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".oracle")]  # no temp debris
    rec = pycolmap.Reconstruction(output / "sparse" / "0")
    assert rec.num_images() == VIEWS and rec.num_points3D() == result.reconstruction.num_points3D()
    assert sorted(im.name for im in rec.images.values()) == sorted(result.image_names)
    # points.ply holds the points after bundle adjustment
    ply = pycolmap.Reconstruction()
    ply.import_PLY(output / "points.ply")
    ply_xyz = np.stack([p.xyz for p in ply.points3D.values()])
    final_xyz = np.stack([p.xyz for p in rec.points3D.values()])
    assert len(ply_xyz) == len(final_xyz)
    assert np.allclose(np.sort(ply_xyz, axis=0), np.sort(final_xyz, axis=0), atol=1e-4)
    report = json.loads((output / "report.json").read_text())
    for key in ("timings_s", "counts", "reprojection_error_px", "ba_rounds", "images", "database"):
        assert key in report
    assert report["counts"]["points3D"] == rec.num_points3D()
    assert report["timings_s"]["model"] >= 0 and report["timings_s"]["bundle adjustment"] > 0


def test_database_has_keypoints_matches_and_two_view_geometries(oracle_project):
    result, output = oracle_project
    rec = result.reconstruction
    with pycolmap.Database.open(output / "database.db") as db:
        assert db.num_images() == VIEWS and db.num_cameras() == VIEWS
        for image_id, image in rec.images.items():
            keypoints = db.read_keypoints(image_id)
            assert keypoints.shape[0] == image.num_points2D()
            xy = np.stack([p.xy for p in image.points2D])
            assert np.allclose(keypoints[:, :2], xy, atol=1e-3)
        pair_ids, geometries = db.read_two_view_geometries()
        assert len(pair_ids) >= VIEWS - 1 and db.num_inlier_matches() > 0
        for pair_id, geometry in zip(pair_ids, geometries, strict=True):
            id1, id2 = pycolmap.pair_id_to_image_pair(pair_id)
            assert geometry.config == pycolmap.TwoViewGeometryConfiguration.CALIBRATED
            inliers = geometry.inlier_matches
            assert db.exists_matches(id1, id2) and len(inliers) <= len(db.read_matches(id1, id2))
            # inliers are observations of one 3D point in the final reconstruction
            p1 = [rec.image(id1).points2D[int(a)].point3D_id for a in inliers[:20, 0]]
            p2 = [rec.image(id2).points2D[int(b)].point3D_id for b in inliers[:20, 1]]
            assert p1 == p2


def test_colmap_mapper_continues_from_the_database(scene_data, oracle_project, tmp_path):
    """COLMAP's incremental mapper continues from sparse/0 with its defaults, and rebuilds the model from
    scratch with ``mapper_options`` (thresholds for the database's few hundred keypoints per image)."""
    import shutil

    from speed3r_sfm.pipeline import mapper_options

    result, output = oracle_project
    for name, options, model in (
        ("continued", pycolmap.IncrementalPipelineOptions(), output / "sparse" / "0"),
        ("scratch", mapper_options(), ""),
    ):
        (tmp_path / name).mkdir()
        shutil.copy(output / "database.db", tmp_path / name / "database.db")  # the mapper writes into it
        models = pycolmap.incremental_mapping(
            tmp_path / name / "database.db", scene_data["folder"], tmp_path / name, options, input_path=model
        )
        assert len(models) == 1 and models[0].num_reg_images() == VIEWS, name
        gt = scene_data["views"].cam_from_world.double()
        assert _median_rre(_poses(models[0], result.image_names), gt) <= 1.0


def test_gsa_records_guide_keypoints_and_matches(scene_data, tmp_path):
    oracle = _oracle(scene_data, records="ideal", block_size=24, query_block_size=24)
    result = run_pipeline(scene_data["folder"], None, model=oracle, attention="gsa")
    records = result.report["gsa_records"]
    assert records is not None and records["layers"] == 1
    assert records["matches_in_selected_block"] > 0.5
    gt = scene_data["views"].cam_from_world.double()
    assert _median_rre(_poses(result.reconstruction, result.image_names), gt) <= 1.0
    assert result.report["reprojection_error_px"]["final"] <= 1.0


def test_mixed_sizes_in_pad_mode_map_back_to_each_original(scene_data, tmp_path):
    """Half of the views are upscaled on disk: their cameras must come out in their own pixels."""
    views = scene_data["views"]
    folder = tmp_path / "mixed"
    folder.mkdir()
    big = (WIDTH * 3 // 2, HEIGHT * 3 // 2)
    intrinsics, sizes = [], []
    for i in range(VIEWS):
        image = Image.fromarray(to_uint8_image(views.images[i]))
        k = views.intrinsics[i].double()
        if i % 2:
            image = image.resize(big, Image.Resampling.BICUBIC)
            k = resize_intrinsics(k, (HEIGHT, WIDTH), (big[1], big[0]))
        image.save(folder / f"view_{i:02d}.png")
        intrinsics.append(k)
        sizes.append(image.size)
    oracle = _oracle(
        scene_data,
        scene=scene_data["scene"],
        depth=None,
        intrinsics=torch.stack(intrinsics),
        original_sizes=sizes,
        preprocessing=Preprocessing("pad", 224),
        rotation_noise_deg=0.5,
        translation_noise=0.01,
    )
    result = run_pipeline(folder, None, model=oracle, attention="dense", camera_model="PINHOLE")
    rec = result.reconstruction
    assert result.report["reprojection_error_px"]["final"] <= 1.0
    for i, name in enumerate(result.image_names):
        camera = rec.find_image_with_name(name).camera
        assert (camera.width, camera.height) == sizes[i]
        k_true = intrinsics_to_colmap(intrinsics[i]).numpy()
        k = camera.calibration_matrix()
        assert abs(k[0, 0] / k_true[0, 0] - 1) < 0.02 and abs(k[1, 1] / k_true[1, 1] - 1) < 0.02
        assert np.allclose(k[:2, 2], k_true[:2, 2], atol=0.5)  # principal point not refined: exact mapping
    gt = views.cam_from_world.double()
    assert _median_rre(_poses(rec, result.image_names), gt) <= 1.0


def test_shared_camera_and_no_bundle_adjustment(scene_data, tmp_path):
    oracle = _oracle(scene_data, rotation_noise_deg=0.0, translation_noise=0.0)
    result = run_pipeline(
        scene_data["folder"],
        tmp_path / "out",
        model=oracle,
        attention="dense",
        ba=False,
        shared_camera=True,
        camera_model="SIMPLE_PINHOLE",
    )
    rec = result.reconstruction
    assert rec.num_cameras() == 1 and rec.cameras[1].model_name == "SIMPLE_PINHOLE"
    assert result.report["bundle_adjustment"] is False and result.report["ba_rounds"] == []
    assert "filtering" in result.report["timings_s"] and "bundle adjustment" not in result.report["timings_s"]
    assert rec.num_points3D() > 100 and result.report["reprojection_error_px"]["final"] < 2.0
    # without BA the poses are the (here exact) predicted ones
    assert torch.allclose(_poses(rec, result.image_names), result.feedforward_cam_from_world, atol=1e-9)


def test_existing_output_is_refused_before_any_work(scene_data, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    oracle = _oracle(scene_data)
    with pytest.raises(OutputExistsError, match="overwrite"):
        reconstruct(scene_data["folder"], output, model=oracle)
    assert oracle.calls == 0 and (output / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("where", ["the image folder", "its parent"])
def test_output_that_holds_the_images_is_refused_even_with_overwrite(scene_data, where):
    folder = scene_data["folder"]
    before = sorted(p.name for p in folder.iterdir())
    output = folder if where == "the image folder" else folder.parent
    oracle = _oracle(scene_data)
    with pytest.raises(OutputExistsError, match="holds the input images"):
        reconstruct(folder, output, model=oracle, overwrite=True)
    assert oracle.calls == 0 and sorted(p.name for p in folder.iterdir()) == before


def test_images_in_subfolders_keep_their_relative_names(scene_data, tmp_path, capsys, caplog):
    """``recursive`` and ``image_list`` (the CLI's text file): COLMAP names are paths relative to the
    folder, in the undistorted copy too; an output inside a folder read recursively is refused."""
    folder = tmp_path / "images"
    names = []
    for i, path in enumerate(sorted(scene_data["folder"].iterdir())):
        name = f"cam{i // 4}/{path.name}"  # natural order of the relative paths = the views' order
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(path.read_bytes())
        names.append(name)
    oracle = _oracle(scene_data, rotation_noise_deg=0.0, translation_noise=0.0)
    with pytest.raises(OutputExistsError, match="lies inside the image folder"):
        reconstruct(folder, folder / "out", model=oracle, recursive=True)
    assert oracle.calls == 0
    result = run_pipeline(
        folder, tmp_path / "out", model=oracle, attention="dense", recursive=True, undistort=True
    )
    rec = result.reconstruction
    assert result.image_names == names and rec.num_reg_images() == VIEWS
    assert sorted(image.name for image in rec.images.values()) == names
    undistorted = pycolmap.Reconstruction(tmp_path / "out" / "undistorted" / "sparse" / "0")
    for image in undistorted.images.values():
        assert (tmp_path / "out" / "undistorted" / "images" / image.name).is_file()
    # one camera per folder (COLMAP's PER_FOLDER): cam0's four views share camera 1, cam1's camera 2
    per_folder = run_pipeline(
        folder, None, model=oracle, attention="dense", recursive=True, shared_camera="per_folder"
    ).reconstruction
    cameras = {image.name: image.camera_id for image in per_folder.images.values()}
    assert per_folder.num_cameras() == 2 and per_folder.num_reg_images() == VIEWS
    assert {cameras[n] for n in names[:4]} == {1} and {cameras[n] for n in names[4:]} == {2}
    # per folder without subfolders: one camera, and the run says how to get one per subfolder
    with caplog.at_level(logging.WARNING, logger="speed3r_sfm"):
        flat = run_pipeline(
            scene_data["folder"], None, model=oracle, attention="dense", shared_camera="per_folder"
        )
    assert flat.reconstruction.num_cameras() == 1
    assert "per_folder' with every image in one folder" in caplog.text and "recursive=True" in caplog.text
    # a text file naming the views of cam1 only, as the CLI takes it
    listing = tmp_path / "cam1.txt"
    listing.write_text("\n".join(names[4:]) + "\n")
    oracle_views = scene_data["views"]
    oracle = SceneOracle(
        oracle_views.intrinsics[4:],
        oracle_views.cam_from_world[4:],
        [(WIDTH, HEIGHT)] * 4,
        preprocessing=Preprocessing("crop", WIDTH),
        depth=list(oracle_views.depth[4:]),
    )
    backbone = Backbone(oracle, oracle.preprocessing, "oracle", torch.device("cpu"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_reconstruct, "load_backbone", lambda *args, **kwargs: backbone)
        code = pipeline_cli.reconstruct_command(
            str(folder), str(tmp_path / "cam1"), attention="dense", image_list=str(listing), quiet=True
        )
        assert code == 0
        rec = pycolmap.Reconstruction(tmp_path / "cam1" / "sparse" / "0")
        assert sorted(image.name for image in rec.images.values()) == names[4:]
        listing.write_text("cam1/missing.png\n")
        code = pipeline_cli.reconstruct_command(
            str(folder), str(tmp_path / "bad"), image_list=str(listing), quiet=True
        )
    assert code == 1 and "cam1/missing.png" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_overwrite_replaces_projects_only_and_never_the_current_folder(scene_data, tmp_path, monkeypatch):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    oracle = _oracle(scene_data)
    for overwrite in (False, True):  # without overwrite too: the error had suggested it, then refused it
        with pytest.raises(OutputExistsError, match=r"holds more than a speed3r-sfm project \(thesis.txt\)"):
            reconstruct(scene_data["folder"], precious, model=oracle, overwrite=overwrite)
    project = tmp_path / "project"
    (project / "sparse").mkdir(parents=True)
    monkeypatch.chdir(project)
    with pytest.raises(OutputExistsError, match="is the current folder"):
        reconstruct(scene_data["folder"], ".", model=oracle, overwrite=True)
    assert oracle.calls == 0 and (precious / "thesis.txt").read_text() == "years of work"
    # an empty folder made beforehand is used as it is, named relative to the current folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    result = run_pipeline(scene_data["folder"], "empty", model=_oracle(scene_data), attention="dense")
    assert result.output_dir == tmp_path / "empty" and (tmp_path / "empty" / "report.json").is_file()
    # a model a COLMAP mapper run added beside sparse/0 is not the project's: it had been deleted silently
    (tmp_path / "empty" / "sparse" / "1").mkdir()
    with pytest.raises(OutputExistsError, match=r"holds more than a speed3r-sfm project \(sparse/1\)"):
        reconstruct(scene_data["folder"], tmp_path / "empty", model=_oracle(scene_data), overwrite=True)


def test_an_output_holding_listed_input_images_is_refused(scene_data, tmp_path):
    """The COLMAP layout project/images + project/database.db, reconstructed into project itself through an
    image list: overwriting it would delete the images."""
    project = tmp_path / "proj"
    (project / "images").mkdir(parents=True)
    names = []
    for path in sorted(scene_data["folder"].iterdir()):
        (project / "images" / path.name).write_bytes(path.read_bytes())
        names.append(f"proj/images/{path.name}")
    (project / "database.db").write_bytes(b"")
    oracle = _oracle(scene_data)
    with pytest.raises(OutputExistsError, match="holds the input image"):
        reconstruct(tmp_path, project, model=oracle, image_list=names, overwrite=True)
    assert oracle.calls == 0 and len(list((project / "images").iterdir())) == VIEWS


def test_an_output_that_cannot_be_created_is_refused_before_any_work(scene_data, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    oracle = _oracle(scene_data)
    with pytest.raises(OutputPathError, match="afile is a file, not a folder"):
        reconstruct(scene_data["folder"], tmp_path / "afile" / "out", model=oracle)

    def read_only(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(OutputPathError, match="is a symbolic link"):
        reconstruct(scene_data["folder"], tmp_path / "link", model=oracle)

    monkeypatch.setattr(pipeline_export.tempfile, "mkdtemp", read_only)
    with pytest.raises(OutputPathError, match=r"no folder can be made in .* \(Operation not permitted\)"):
        reconstruct(scene_data["folder"], tmp_path / "new" / "out", model=oracle)
    assert oracle.calls == 0 and not (tmp_path / "new").exists()


def test_images_without_texture_give_an_error_not_an_empty_project(scene_data, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(VIEWS):  # distinct files (duplicates are skipped), no texture to match
        Image.new("RGB", (WIDTH, HEIGHT), (100 + i, 100, 100)).save(flat / f"view_{i:02d}.png")
    with pytest.raises(
        ReconstructionError, match=r"no reconstruction from the 8 images .*nothing was written"
    ):
        reconstruct(flat, tmp_path / "out", model=_oracle(scene_data), attention="dense")
    assert not (tmp_path / "out").exists()
    oracle = _oracle(scene_data)
    backbone = Backbone(oracle, oracle.preprocessing, "oracle", torch.device("cpu"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_reconstruct, "load_backbone", lambda *args, **kwargs: backbone)
        code = pipeline_cli.reconstruct_command(str(flat), str(tmp_path / "out"), quiet=True)
    assert code == 1 and "error: no reconstruction from the 8 images" in capsys.readouterr().err


def test_a_failure_while_writing_leaves_no_project_and_no_debris(scene_data, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(pipeline_export, "write_database", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        reconstruct(scene_data["folder"], tmp_path / "new", model=_oracle(scene_data), attention="dense")
    assert list(tmp_path.iterdir()) == []
    # an existing project asked to be overwritten stays intact when the new one fails
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text("{}")
    with pytest.raises(RuntimeError, match="simulated"):
        reconstruct(scene_data["folder"], old, model=_oracle(scene_data), attention="dense", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / "report.json").read_text() == "{}"


def test_overwrite_replaces_the_project(scene_data, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "report.json").write_text("{}")  # a project (of an earlier run)
    (output / "undistorted").mkdir()  # written by an earlier run with --undistort, not by this one
    reconstruct(scene_data["folder"], output, model=_oracle(scene_data), attention="dense", overwrite=True)
    assert not (output / "undistorted").exists() and json.loads((output / "report.json").read_text())
    # a COLMAP project with its images and dense model beside the sparse one is not replaced
    (output / "images").mkdir()
    (output / "dense").mkdir()
    with pytest.raises(OutputExistsError, match=r"holds more than a speed3r-sfm project \(dense, images\)"):
        reconstruct(scene_data["folder"], output, model=_oracle(scene_data), overwrite=True)
    assert (output / "images").is_dir() and (output / "dense").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_track_head_rejects_candidates_it_disagrees_with(scene_data, monkeypatch):
    """Noise-free oracle whose stand-in track head is exact except in view 5, where it is 30 px off: every
    refined match into view 5 is rejected, the others are kept, and the reconstruction still has every
    view."""
    oracle = _oracle(scene_data, rotation_noise_deg=0.0, translation_noise=0.0, depth_noise=0.0, tracks=True)

    def predict(images):
        prediction = oracle(images)
        exact = prediction.extras["tracker"]

        def shifted(view, points, targets):
            tracks, vis, conf = exact(view, points, targets)
            tracks = tracks.clone()
            if view != 5:
                tracks[5] += 30.0
            return tracks, vis, conf

        prediction.extras["tracker"] = shifted
        return prediction

    predict.preprocessing = oracle.preprocessing
    seen = []
    check = pipeline_matching.check_with_tracks

    def spy(tracker, source_view, source_point, source_xy, target_view, target_xy, *args):
        result = check(tracker, source_view, source_point, source_xy, target_view, target_xy, *args)
        seen.append((source_view, target_view, result))
        return result

    monkeypatch.setattr(pipeline_matching, "check_with_tracks", spy)
    result = run_pipeline(scene_data["folder"], None, model=predict, attention="dense")
    ((source_view, target_view, outcome),) = seen
    into_five = (target_view == 5) & (source_view != 5)
    assert into_five.sum() > 20 and not outcome.keep[into_five].any()
    others = ~into_five
    assert outcome.keep[others].float().mean() > 0.95
    assert outcome.distance[others & outcome.keep].median() < 0.3  # refined matches vs exact tracks
    stats = result.report["counts"]["track_verification"]
    assert stats["ran"] and stats["checked"] == source_view.numel()
    assert stats["kept"] == int(outcome.keep.sum())
    assert stats["kept"] + stats["rejected_too_far"] + stats["rejected_not_visible"] == stats["checked"]
    assert result.report["counts"]["refined_matches"] == stats["kept"]
    assert result.reconstruction.num_reg_images() == VIEWS  # view 5 is still matched from its own side


def test_tiny_vggt_track_head_reaches_the_match_check(scene_data):
    """The tiny VGGT's track head (untrained: every track is accepted) checks the refined matches of the
    oracle's geometry; load_backbone and run_pipeline hand it over only when the model has a track head."""
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.preset("tiny")).eval()
    backbone = load_backbone(model, "dense", "cpu")
    assert (
        load_backbone(
            VGGT(VGGTConfig.preset("tiny", enable_track=False)), "dense", "cpu"
        ).predict_with_tracker
        is None
    )
    oracle = _oracle(scene_data)

    def predict(images):
        prediction = oracle(images)
        prediction.extras["tracker"] = backbone.predict_with_tracker(images).extras["tracker"]
        return prediction

    predict.preprocessing = oracle.preprocessing
    options = PipelineOptions()
    options.matching.track_tolerance, options.matching.min_track_visibility = float("inf"), 0.0
    result = run_pipeline(scene_data["folder"], None, model=predict, attention="dense", options=options)
    stats = result.report["counts"]["track_verification"]
    assert (
        stats["ran"] and stats["checked"] == stats["kept"] == result.report["counts"]["refined_matches"] > 100
    )
    assert math.isfinite(stats["median_distance_px"])
    report = _report_of(scene_data["folder"], None, model=model, attention="dense", options=options)
    assert report["counts"]["track_verification"]["ran"] is True  # the model's own track head
    options.matching.track_verification = False
    report = _report_of(scene_data["folder"], None, model=model, attention="dense", options=options)
    assert report["counts"]["track_verification"]["ran"] is False


def _tiny_gsa_vggt() -> VGGT:
    """The tiny VGGT with GSA in every global block and random weights (seed 0)."""
    torch.manual_seed(0)
    attention = AttentionConfig(
        kind="gsa", block_size=8, query_block_size=16, compression_block_size=16, top_k=4
    )
    return VGGT(VGGTConfig.preset("tiny", attention=attention, enable_track=False))


def test_tiny_vggt_runs_the_gsa_path_end_to_end(scene_data, tmp_path):
    model = _tiny_gsa_vggt()
    report = _report_of(scene_data["folder"], tmp_path / "tiny", model=model, attention="gsa")
    assert report["gsa_records"]["layers"] == 4 and report["gsa_records"]["block_size"] == 8
    assert report["preprocessing"] == {
        "mode": "crop",
        "target_size": 84,
        "pixel_limit": 255000,
        "patch_size": 14,
    }
    assert report["counts"]["keypoints"] > 0 and report["counts"]["candidate_matches"] > 0
    readjusted = report["readjustment"]  # on by default (BundleOptions.readjust)
    assert readjusted["ran"] and readjusted["registered_after"] >= 0


def test_gsa_without_guidance_runs_gsa_and_matches_geometrically(scene_data):
    """A model whose selection should not guide (``gsa_guidance`` False): GSA in the forward pass, no records
    asked for, texture keypoints and geometric view pairs, and the report says so."""
    from speed3r_sfm.pipeline.backbone import load_backbone

    model = _tiny_gsa_vggt()
    model.gsa_guidance = False
    backbone = load_backbone(model, "auto", "cpu")
    assert backbone.attention == "gsa" and not backbone.guided
    assert backbone.predict(torch.rand(1, 2, 3, 56, 84)).attention is None
    cpu = torch.device("cpu")
    assert not Backbone(backbone.predict, backbone.preprocessing, "m", cpu, attention="dense").guided
    assert Backbone(backbone.predict, backbone.preprocessing, "m", cpu, attention="gsa").guided
    report = _report_of(scene_data["folder"], None, model=model, attention="gsa")
    assert report["attention"] == "gsa" and report["gsa_guidance"] is False
    assert report["gsa_records"] is None and report["counts"]["keypoints"] > 0
    model.gsa_guidance = True
    guided = _report_of(scene_data["folder"], None, model=model, attention="gsa")
    assert guided["gsa_guidance"] is True and guided["gsa_records"]["layers"] == 4


def test_default_model_runs_dense_and_gsa():
    from speed3r_sfm.pipeline.backbone import load_backbone

    for attention in ("gsa", "dense"):
        backbone = load_backbone("default", attention=attention, device="cpu")
        height, width = 224, 294
        prediction = backbone.predict(torch.rand(1, 3, 3, height, width))
        assert prediction.depth.shape == (1, 3, height, width)
        assert torch.isfinite(prediction.cam_from_world).all()
        assert prediction.attention is None  # its GSA selection does not guide (sidecar: gsa_guidance)
        assert backbone.attention == attention and not backbone.guided
        assert prediction.extras["descriptors"].shape[:2] == (1, 3)  # token poses need them either way


def test_auto_attention_follows_the_model(tmp_path):
    """ "auto": the shipped default declares dense, and that its GSA records must not guide (its selection
    is untrained); a GSA module or GSA weights without a declaration run GSA with guidance; dense ones
    dense."""
    import json
    import shutil

    from speed3r_sfm.attention import AttentionConfig
    from speed3r_sfm.models.vggt import VGGT, VGGTConfig
    from speed3r_sfm.pipeline.backbone import (
        DEFAULT_WEIGHTS,
        OFFICIAL_GSA_FROM_VIEWS,
        gsa_threshold,
        load_backbone,
        official_attention,
    )

    sidecar = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert sidecar["pipeline_attention"] == "dense" and sidecar["gsa_guidance"] is False
    default = load_backbone("default", attention="auto", device="cpu")
    assert default.attention == "dense" and not default.guided
    # "auto" runs GSA from gsa_from_views views per pass on, a threshold per device type
    threshold = gsa_threshold(sidecar, torch.device("cpu"))
    assert threshold == sidecar["gsa_from_views"]["cpu"]
    assert gsa_threshold(sidecar, torch.device("cuda")) > threshold  # GSA's first call compiles on CUDA
    assert gsa_threshold({"gsa_from_views": {"cpu": 7}}, torch.device("mps")) == 7
    assert gsa_threshold({"gsa_from_views": 9}, torch.device("cuda")) == 9
    assert gsa_threshold({}, torch.device("cpu")) is None
    # official checkpoints: GSA, on CUDA from OFFICIAL_GSA_FROM_VIEWS views per pass (its compilation)
    cuda_from = OFFICIAL_GSA_FROM_VIEWS["cuda"]
    assert official_attention(cuda_from - 1, torch.device("cuda")) == "dense"
    assert official_attention(cuda_from, torch.device("cuda")) == "gsa"
    assert official_attention(None, torch.device("cuda")) == "gsa"
    assert official_attention(2, torch.device("cpu")) == "gsa"
    assert load_backbone("default", "auto", "cpu", num_views=threshold - 1).attention == "dense"
    assert load_backbone("default", "auto", "cpu", num_views=threshold).attention == "gsa"
    assert load_backbone("default", "dense", "cpu", num_views=threshold).attention == "dense"
    default_gsa = load_backbone("default", attention="gsa", device="cpu")
    assert default_gsa.attention == "gsa" and not default_gsa.guided
    gsa = AttentionConfig(kind="gsa", block_size=16, query_block_size=32, compression_block_size=16, top_k=8)
    gsa_module = VGGT(VGGTConfig.preset("tiny", enable_track=False, attention=gsa))
    assert load_backbone(gsa_module, "auto", "cpu").attention == "gsa"
    assert (
        load_backbone(VGGT(VGGTConfig.preset("tiny", enable_track=False)), "auto", "cpu").attention == "dense"
    )
    # exported GSA weights that declare nothing run as stored
    shutil.copy(DEFAULT_WEIGHTS, tmp_path / "m.safetensors")
    meta = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    del meta["pipeline_attention"], meta["gsa_guidance"]
    (tmp_path / "m.json").write_text(json.dumps(meta))
    backbone = load_backbone(str(tmp_path / "m.safetensors"), "auto", "cpu")
    assert backbone.attention == "gsa" and backbone.guided
    assert backbone.predict(torch.rand(1, 2, 3, 224, 294)).attention is not None


def test_auto_attention_counts_the_views_of_a_pass(scene_data, tmp_path):
    """reconstruct(attention="auto") tells the model how many views a pass holds: the default's sidecar with
    gsa_from_views at the scene's view count runs GSA, one above it dense, and so do chunks of fewer views."""
    import shutil

    from speed3r_sfm.pipeline.backbone import DEFAULT_WEIGHTS

    shutil.copy(DEFAULT_WEIGHTS, tmp_path / "m.safetensors")
    meta = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    model = str(tmp_path / "m.safetensors")
    for threshold, chunk_size, expected in (
        (VIEWS, None, "gsa"),
        (VIEWS + 1, None, "dense"),
        (VIEWS, 4, "dense"),
    ):
        meta["gsa_from_views"] = threshold
        (tmp_path / "m.json").write_text(json.dumps(meta))
        result = run_pipeline(
            scene_data["folder"], None, model=model, attention="auto", chunk_size=chunk_size
        )
        assert result.report["attention"] == expected
    # a skipped file (here a duplicate) does not count: VIEWS + 1 files, VIEWS views, dense
    folder = tmp_path / "with_duplicate"
    shutil.copytree(scene_data["folder"], folder)
    first = sorted(p for p in folder.iterdir() if p.suffix == ".png")[0]
    shutil.copy(first, folder / f"copy_of_{first.name}")
    meta["gsa_from_views"] = VIEWS + 1
    (tmp_path / "m.json").write_text(json.dumps(meta))
    result = run_pipeline(folder, None, model=model, attention="auto")
    assert result.report["attention"] == "dense" and len(result.image_names) == VIEWS
    backbone = load_backbone(model, "auto", "cpu", num_views=VIEWS)  # the rule it chose by
    assert backbone.attention_for_views(VIEWS + 1) == "gsa" and backbone.attention_for_views(VIEWS) == "dense"
    assert load_backbone(backbone.module, "auto", "cpu").attention_for_views is None  # a module runs as built


def test_missing_default_weights_is_a_clear_error(scene_data, monkeypatch, tmp_path):
    from speed3r_sfm.pipeline import backbone as pipeline_backbone

    monkeypatch.setattr(pipeline_backbone, "DEFAULT_WEIGHTS", tmp_path / "default.safetensors")
    with pytest.raises(ModelNotAvailableError, match="default model weights are missing.*facebook/VGGT-1B"):
        reconstruct(scene_data["folder"])


def test_cli_command_prints_a_summary_and_reports_errors(scene_data, tmp_path, monkeypatch, capsys):
    oracle = _oracle(scene_data, tracks=True)
    backbone = Backbone(oracle, oracle.preprocessing, "oracle", torch.device("cpu"))
    monkeypatch.setattr(pipeline_reconstruct, "load_backbone", lambda *args, **kwargs: backbone)
    code = pipeline_cli.reconstruct_command(
        str(scene_data["folder"]), str(tmp_path / "out"), attention="dense"
    )
    out = capsys.readouterr().out
    assert code == 0 and "reconstructed 8/8 images" in out and "reprojection error" in out
    assert str(tmp_path / "out") in out and (tmp_path / "out" / "database.db").exists()
    assert "track head kept" in out
    width, height = Image.open(next(p for p in scene_data["folder"].iterdir() if p.suffix == ".png")).size
    assert f"  8 SIMPLE_RADIAL cameras (one per image); all images are {width}x{height}: if one camera" in out
    first = json.loads((tmp_path / "out" / "report.json").read_text())
    assert first["readjustment"]["ran"]  # on by default
    code = pipeline_cli.reconstruct_command(
        str(scene_data["folder"]),
        str(tmp_path / "no_check"),
        attention="dense",
        track_verification=False,
        readjust=False,
        deterministic=True,
        undistort=True,
        shared_camera=True,
    )
    out = capsys.readouterr().out
    assert code == 0 and "track head kept" not in out
    assert "  1 SIMPLE_RADIAL camera (shared)\n" in out  # no hint
    assert f"undistorted: 8 images, PINHOLE cameras in {tmp_path / 'no_check' / 'undistorted'}" in out
    assert "undistorted" not in first
    report = json.loads((tmp_path / "no_check" / "report.json").read_text())
    assert first["options"]["bundle"]["num_threads"] == -1
    assert report["options"]["bundle"]["num_threads"] == 1  # --deterministic
    assert report["counts"]["track_verification"]["ran"] is False
    assert report["readjustment"] == {"ran": False}
    code = pipeline_cli.reconstruct_command(str(scene_data["folder"]), str(tmp_path / "out"), quiet=True)
    assert code == 1 and "holds a project already" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    code = pipeline_cli.reconstruct_command(str(empty), str(tmp_path / "out2"), quiet=True)
    assert code == 1 and f"no images in {empty}" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out2")


def test_quiet_cli_prints_errors_only(scene_data, tmp_path, monkeypatch, capsys, caplog):
    """--quiet: no progress bar, summary or warnings (a skipped tiny image); without it the skip is logged."""
    import shutil

    oracle = _oracle(scene_data)
    backbone = Backbone(oracle, oracle.preprocessing, "oracle", torch.device("cpu"))
    monkeypatch.setattr(pipeline_reconstruct, "load_backbone", lambda *args, **kwargs: backbone)
    folder = tmp_path / "images"
    shutil.copytree(scene_data["folder"], folder)
    Image.new("RGB", (12, 10)).save(folder / "tiny.png")
    caplog.set_level(logging.INFO)
    code = pipeline_cli.reconstruct_command(str(folder), str(tmp_path / "quiet"), readjust=False, quiet=True)
    captured = capsys.readouterr()
    assert code == 0 and (tmp_path / "quiet" / "sparse" / "0").is_dir()
    assert captured.out == "" and captured.err == "" and caplog.records == []
    assert logging.getLogger("speed3r_sfm").level == logging.NOTSET  # restored
    code = pipeline_cli.reconstruct_command(str(folder), str(tmp_path / "loud"), readjust=False)
    assert code == 0 and "reconstructed 8/8 images (1 skipped)" in capsys.readouterr().out
    assert any("tiny.png" in record.getMessage() for record in caplog.records)


def test_cli_reports_a_missing_checkpoint_device_or_bad_option_cleanly(scene_data, tmp_path, capsys):
    folder, out = str(scene_data["folder"]), str(tmp_path / "out")
    missing = tmp_path / "nowhere" / "model.pt"
    code = pipeline_cli.reconstruct_command(folder, out, model=str(missing), quiet=True)
    assert code == 1 and f"checkpoint file {missing} does not exist" in capsys.readouterr().err
    code = pipeline_cli.reconstruct_command(folder, out, device="gpu", quiet=True)
    assert code == 1 and "unknown device 'gpu'" in capsys.readouterr().err
    for device in ("mps", "meta", "xpu"):  # torch knows them, the pipeline does not run there
        code = pipeline_cli.reconstruct_command(folder, out, device=device, quiet=True)
        assert code == 1 and f"device '{device}' is not supported" in capsys.readouterr().err
    for name, data in (("empty.safetensors", b""), ("notes.pt", b"hi\n")):  # tracebacks / a bare "105"
        (tmp_path / name).write_bytes(data)
        code = pipeline_cli.reconstruct_command(folder, out, model=str(tmp_path / name), quiet=True)
        err = capsys.readouterr().err
        assert code == 1 and str(tmp_path / name) in err and len(err.strip().splitlines()) == 1, err
        assert "not a readable" in err
    small = tmp_path / "small.pt"  # a VGGT of another size: the official architecture does not fit it
    torch.save(VGGT(VGGTConfig.preset("tiny")).state_dict(), small)
    code = pipeline_cli.reconstruct_command(folder, out, model=str(small), quiet=True)
    err = capsys.readouterr().err
    assert code == 1 and f"checkpoint {small} does not match VGGT" in err and "... and" in err
    assert "loads into the official VGGT-1B architecture" in err and len(err.splitlines()) < 40
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_text("x\n")
    code = pipeline_cli.reconstruct_command(folder, out, model=str(corrupt), quiet=True)
    err = capsys.readouterr().err
    assert code == 1 and f"{corrupt} is not a readable PyTorch checkpoint" in err
    assert "weights_only=True)" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(TypeError, match="image_list"):
        reconstruct([scene_data["folder"] / "view_00.png"], None, model=_oracle(scene_data))
    with pytest.raises(ValueError, match="chunk_size must be a whole number of views, got 2.5"):
        reconstruct(scene_data["folder"], None, model=_oracle(scene_data), chunk_size=2.5)
    # yes/no arguments from a config file or the environment: "false" is truthy (overwrite="false" had
    # replaced a project); an empty options dict ran the defaults
    for kwargs, message in (
        (dict(overwrite="false"), "overwrite must be True or False, got 'false'"),
        (dict(ba="false"), "ba must be True or False"),
        (dict(shared_camera="yes"), "shared_camera must be True, False or 'per_folder', got 'yes'"),
        (dict(shared_camera=1), "shared_camera must be True, False or 'per_folder', got 1"),
        (dict(options={}), "options must be a PipelineOptions, got dict"),
    ):
        with pytest.raises(TypeError, match=message):
            reconstruct(scene_data["folder"], tmp_path / "typed", model=_oracle(scene_data), **kwargs)
    assert not (tmp_path / "typed").exists()
    # numpy booleans are booleans (what arr.any() returns)
    rec = reconstruct(
        scene_data["folder"], None, model=_oracle(scene_data), ba=np.False_, shared_camera=np.True_
    )
    assert rec.num_cameras() == 1
    assert resolve_device("cpu:5") == torch.device("cpu")
    code = pipeline_cli.reconstruct_command(folder, out, model="", quiet=True)
    assert code == 1 and "model is empty" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        code = pipeline_cli.reconstruct_command(folder, out, model="nobody/no-such-model", quiet=True)
    assert code == 1 and "Could not get a checkpoint of 'nobody/no-such-model'" in capsys.readouterr().err
    for option, message in (
        (dict(max_keypoints=0), "max_keypoints must be at least 1"),
        (dict(max_image_size=0), "max_image_size must be at least 1"),
        (dict(min_work_scale=2.0), r"min_work_scale must lie in \[0, 1\]"),
    ):
        assert pipeline_cli.reconstruct_command(folder, out, quiet=True, **option) == 1
        assert re.search(message, capsys.readouterr().err)
    if not torch.cuda.is_available():
        code = pipeline_cli.reconstruct_command(folder, out, device="cuda", quiet=True)
        assert code == 1 and "CUDA is not available here" in capsys.readouterr().err
        with pytest.raises(DeviceNotAvailableError, match="CUDA is not available here"):
            reconstruct(scene_data["folder"], None, model=_oracle(scene_data), device="cuda:0")
        with pytest.raises(SystemExit) as exit_:  # the top-level CLI, e.g. the demo: no traceback either
            main(["demo", "--output", str(tmp_path / "demo"), "--device", "cuda"])
        assert exit_.value.code == 1 and "CUDA is not available here" in capsys.readouterr().err
        assert not (tmp_path / "demo").exists()  # checked before the scene is rendered
    assert not os.path.exists(out)


def test_matching_time_limit_skips_pairs_with_a_warning(scene_data, caplog):
    from speed3r_sfm.pipeline import MatchOptions, PipelineOptions

    options = PipelineOptions(matching=MatchOptions(time_limit=0.0))
    with caplog.at_level("WARNING"), pytest.raises(ReconstructionError, match="0 3D points") as failed:
        run_pipeline(
            scene_data["folder"], None, model=_oracle(scene_data), attention="dense", options=options
        )
    assert "time limit" in caplog.text
    assert failed.value.report["counts"]["refined_matches"] == 0


def test_images_with_little_colour_get_the_models_own_warning(scene_data, tmp_path, caplog):
    """A model that declares a weakness on images with little colour or on grayscale ones (the shipped
    default's sidecar ``input_warnings``: ``low_colour``) has it logged, kept in report.json and printed in
    the CLI summary when a run's images are of that kind, and only then; the default model carries the
    warning, and weights fine-tuned from it keep it (``PIPELINE_KEYS``) until their sidecar says otherwise."""
    from speed3r_sfm.pipeline.backbone import DEFAULT_WEIGHTS, load_backbone
    from speed3r_sfm.training.backbone import (
        BackboneSpec,
        export_weights,
        inherit_pipeline_settings,
        load_exported,
    )

    declared = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())["input_warnings"]
    assert "low_colour" in declared
    assert load_backbone("default", device="cpu").input_warnings == declared
    module = load_exported(DEFAULT_WEIGHTS)  # fine-tuning from it: the pipeline settings it keeps
    spec = BackboneSpec(name="vggt", preset="small")
    settings = inherit_pipeline_settings(DEFAULT_WEIGHTS, module)
    fine_tuned = export_weights(module, spec, tmp_path / "fine_tuned.safetensors", pipeline=settings)
    assert load_backbone(str(fine_tuned), device="cpu").input_warnings == declared

    gray = tmp_path / "gray"
    gray.mkdir()
    names = sorted(p.name for p in scene_data["folder"].iterdir())
    for i, name in enumerate(names):  # two of the views kept in colour
        image = Image.open(scene_data["folder"] / name)
        (image if i < 2 else image.convert("L")).save(gray / name)
    model = _oracle(scene_data)
    model.input_warnings = {"low_colour": "trained on colour only", "grayscale": "no gray in training"}
    with caplog.at_level(logging.WARNING, logger="speed3r_sfm"):
        result = run_pipeline(gray, tmp_path / "out", model=model, attention="dense")
    expected = [
        f"{VIEWS - 2} of {VIEWS} images have little colour (median colour score 0.0, below"
        f" {LOW_COLOUR_SCORE}): trained on colour only",
        f"{VIEWS - 2} of {VIEWS} images are grayscale: no gray in training",
    ]
    assert result.report["input_warnings"] == expected
    assert all(message in caplog.text for message in expected)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["input_warnings"] == expected
    assert all(f"warning: {message}" in pipeline_cli.summary_text(result) for message in expected)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="speed3r_sfm"):
        colour = run_pipeline(scene_data["folder"], None, model=model, attention="dense")
    assert colour.report["input_warnings"] == [] and "little colour" not in caplog.text
    model.input_warnings = {}
    assert run_pipeline(gray, None, model=model, attention="dense").report["input_warnings"] == []


def test_views_not_linked_well_enough_are_reported_not_registered(scene_data, tmp_path, capsys):
    """With a link threshold no view pair reaches, only one view stays registered: no reconstruction, and
    the error's report names the others and says why; nothing is written."""
    options = PipelineOptions()
    options.bundle.min_shared_points = 10**6
    output = tmp_path / "weak"
    with pytest.raises(ReconstructionError, match="1 registered") as failed:  # one view: no reconstruction
        run_pipeline(
            scene_data["folder"], output, model=_oracle(scene_data), attention="dense", options=options
        )
    unregistered = failed.value.report["unregistered_images"]
    assert len(unregistered) == VIEWS - 1 and not output.exists()
    assert all("fewer than 1000000 3D points" in entry["why"] for entry in unregistered)
    default = run_pipeline(scene_data["folder"], None, model=_oracle(scene_data), attention="dense")
    assert default.report["unregistered_images"] == [] and default.reconstruction.num_reg_images() == VIEWS
    assert default.report["readjustment"]["ran"] and default.report["readjustment"]["kept"]


class _GroupTurned:
    """The oracle with views ``group`` turned together by ``degrees`` about the vertical axis through their
    centroid: a group of views consistent among themselves but misplaced, like a bad token-pose edge."""

    def __init__(self, oracle: SceneOracle, group: list[int], degrees: float) -> None:
        self.oracle, self.group, self.degrees = oracle, group, degrees
        self.preprocessing, self.name = oracle.preprocessing, "turned oracle"

    def __call__(self, images):
        prediction = self.oracle(images)
        pose = prediction.cam_from_world[0].double()
        pivot = camera_centers(pose[self.group]).mean(0)
        angle = torch.tensor([[0.0, math.radians(self.degrees), 0.0]], dtype=torch.float64)
        turn = axis_angle_to_rotation_matrix(angle)[0]
        world_from_turned = torch.cat([turn.T, (pivot - turn.T @ pivot)[:, None]], dim=1)
        pose[self.group] = compose_poses(pose[self.group], world_from_turned)
        prediction.cam_from_world[0] = pose.to(prediction.cam_from_world.dtype)
        return prediction


@pytest.mark.parametrize("move_weak_group", [False, True])
def test_weakly_linked_views_are_rescued_by_pnp_and_matched_again(scene_data, move_weak_group):
    """Three views placed 30 degrees off get too few matches and are de-registered; the rescue re-poses
    them from their few 2D-3D correspondences (PnP; with ``move_weak_group`` the one without enough moves
    with its group), matches again and registers them all, close to the truth."""
    gt = scene_data["views"].cam_from_world.double()
    model = _GroupTurned(_oracle(scene_data), [5, 6, 7], 30.0)
    options = PipelineOptions()
    options.rescue.enabled = False
    without = run_pipeline(scene_data["folder"], None, model=model, attention="dense", options=options)
    names = sorted(entry["name"] for entry in without.report["unregistered_images"])
    assert names == ["view_05.png", "view_06.png", "view_07.png"]
    assert without.report["rescue"] == {"rounds": []}

    options = PipelineOptions()
    options.rescue.move_weak_group = move_weak_group
    options.rescue.sift = not move_weak_group  # else SIFT poses the view the group would move
    result = run_pipeline(scene_data["folder"], None, model=model, attention="dense", options=options)
    assert result.reconstruction.num_reg_images() == VIEWS and result.report["unregistered_images"] == []
    rounds = result.report["rescue"]["rounds"]
    assert rounds[0]["registered_before"] == VIEWS - 3 and rounds[-1]["registered_after"] == VIEWS
    how = {entry["name"]: entry["how"] for entry in rounds[0]["views"]}
    assert set(how) == set(names) and "pnp" in how.values()
    moved = {h for h in how.values() if h.startswith("with view_0")}
    assert bool(moved) == move_weak_group
    assert _median_rre(result.feedforward_cam_from_world, gt) > 10.0
    assert _median_rre(_poses(result.reconstruction, result.image_names), gt) < 0.5
    assert result.report["counts"]["registered_images"] == VIEWS
    summary = pipeline_cli.summary_text(result)
    assert f"re-posed and matched again: {VIEWS - 3} -> {VIEWS} registered" in summary
    assert result.report["poses"]["contradicted_links"] == []  # dropped for too few points, not a cut
    assert all(r["contradicted_links"] == [] for r in rounds)


@pytest.mark.parametrize("sift_image_size", [640, 160])
def test_views_too_far_off_for_any_match_are_posed_by_sift(scene_data, sift_image_size):
    """Three views turned 60 degrees get no correspondences at all, so PnP has nothing to re-pose them with;
    the SIFT fallback matches them to their registered neighbours, triangulated there, and PnP on those
    places them (also from SIFT copies smaller than the work images: keypoints scaled back to the
    original pixels); matching again registers every view close to the truth."""
    gt = scene_data["views"].cam_from_world.double()
    model = _GroupTurned(_oracle(scene_data), [5, 6, 7], 60.0)
    options = PipelineOptions()
    options.rescue.sift = False
    without = run_pipeline(scene_data["folder"], None, model=model, attention="dense", options=options)
    assert without.reconstruction.num_reg_images() == VIEWS - 3
    tried = ["view_05.png", "view_06.png", "view_07.png"]
    assert without.report["rescue"] == {"rounds": [], "tried": tried}  # nothing to re-pose them by
    for entry in without.report["unregistered_images"]:  # the reason says the rescue was tried
        assert entry["why"].endswith("; the rescue (PnP on the points it sees) could not re-pose it")

    options = PipelineOptions()
    options.rescue.sift_image_size = sift_image_size
    result = run_pipeline(scene_data["folder"], None, model=model, attention="dense", options=options)
    assert result.reconstruction.num_reg_images() == VIEWS and result.report["unregistered_images"] == []
    placed = result.report["rescue"]["rounds"][0]["views"]
    assert [entry["how"] for entry in placed] == ["sift"] * 3
    assert all(entry["correspondences"] == 0 and entry["inliers"] >= 20 for entry in placed)
    assert placed[0]["matched_to"] == ["view_04.png", "view_03.png", "view_02.png"]  # nearest in order
    assert _median_rre(result.feedforward_cam_from_world, gt) > 10.0
    assert _median_rre(_poses(result.reconstruction, result.image_names), gt) < 0.5


def test_sift_rescue_falls_back_to_the_image_order_when_the_pose_tree_hangs_a_view_far_away(
    scene_data, monkeypatch
):
    """A wrong pose-tree link is why a group hangs on few points, and the tree then names the far end of the
    sequence as its nearest views: SIFT to those finds too little, so the rescue tries the views nearest in
    the image order (16-view JPEG orbit of a usability test: 13/16 registered before, 16/16 after)."""
    real = pipeline_reconstruct.apply_token_poses

    def hung_on_view_0(geometry, prediction, options):  # the turned group 5-7 linked to view 0 only
        entry = real(geometry, prediction, options)
        entry["tree_edges"] = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 7), (7, 6), (6, 5)]
        return entry

    real_sift = pipeline_rescue.sift_pose
    tried = []

    def no_overlap_with_view_0(rec, features, view, camera, near, *args):  # as the far side of an orbit
        tried.append((view, list(near)))
        return None if 0 in near else real_sift(rec, features, view, camera, near, *args)

    monkeypatch.setattr(pipeline_reconstruct, "apply_token_poses", hung_on_view_0)
    monkeypatch.setattr(pipeline_rescue, "sift_pose", no_overlap_with_view_0)
    gt = scene_data["views"].cam_from_world.double()
    model = _GroupTurned(_oracle(scene_data), [5, 6, 7], 60.0)
    result = run_pipeline(scene_data["folder"], None, model=model, attention="dense")
    assert tried[:2] == [(5, [0, 1, 2]), (5, [4, 3, 2])]  # the tree's nearest, then the order's
    assert result.reconstruction.num_reg_images() == VIEWS and result.report["unregistered_images"] == []
    placed = result.report["rescue"]["rounds"][0]["views"]
    assert [entry["how"] for entry in placed] == ["sift"] * 3
    assert placed[0]["matched_to"] == ["view_04.png", "view_03.png", "view_02.png"]
    assert _median_rre(_poses(result.reconstruction, result.image_names), gt) < 0.5


@pytest.mark.parametrize("shared_camera", [False, True])
def test_sift_rescue_estimates_the_focal_length_of_a_view_with_its_own_camera(scene_data, shared_camera):
    """Three views turned 60 degrees whose predicted focal length is also 30 % too long: with one camera per
    image, PnP in the rescue estimates their focal length (as COLMAP's mapper does for a new camera) and
    the next pass starts from it; a shared camera keeps the one the registered views refined."""
    views = scene_data["views"]
    intrinsics = views.intrinsics.clone()
    intrinsics[[5, 6, 7], :2, :2] *= 1.3
    model = _GroupTurned(_oracle(scene_data, intrinsics=intrinsics), [5, 6, 7], 60.0)
    result = run_pipeline(
        scene_data["folder"], None, model=model, attention="dense", shared_camera=shared_camera
    )
    assert result.reconstruction.num_reg_images() == VIEWS
    placed = result.report["rescue"]["rounds"][0]["views"]
    assert [entry["how"] for entry in placed] == ["sift"] * 3
    rec, truth = result.reconstruction, float(views.intrinsics[0, 0, 0])
    if shared_camera:
        assert all("focal_length" not in entry for entry in placed)
    else:
        # PnP's start value (30 % off before it): 1.1-2.3 % low since bundle adjustment leaves the turned
        # group out of the first pass (0.6-1.9 % before); the next pass brings the cameras within 1 % (below)
        assert np.allclose([entry["focal_length"] for entry in placed], truth, rtol=0.03)
    cameras = [rec.cameras[rec.find_image_with_name(f"view_0{i}.png").camera_id] for i in (5, 6, 7)]
    assert np.allclose([camera.mean_focal_length() for camera in cameras], truth, rtol=0.01)
    assert _median_rre(_poses(rec, result.image_names), views.cam_from_world.double()) < 0.5


def test_links_cut_in_any_pass_are_reported(scene_data, monkeypatch):
    """A link the first pass found contradicting the feed-forward poses stays in report.json when the
    rescue's pass finds none (it re-joined the views): the report says that a cut happened."""
    calls = []

    def first_pass_contradicts(rec, poses, tree_pairs, max_disagreement):
        calls.append(len(calls))
        return [(6, 7)] if len(calls) == 1 else []

    monkeypatch.setattr(pipeline_passes, "contradicted_pairs", first_pass_contradicts)
    model = _GroupTurned(_oracle(scene_data), [5, 6, 7], 30.0)
    options = PipelineOptions()
    options.bundle.readjust = True
    result = run_pipeline(scene_data["folder"], None, model=model, attention="dense", options=options)
    rounds = result.report["rescue"]["rounds"]
    assert result.report["readjustment"]["ran"] and result.report["readjustment"]["contradicted_links"] == []
    assert len(calls) == 1 + len(rounds) + 1 >= 3  # first pass, rescue rounds, readjustment
    assert all(r["contradicted_links"] == [] for r in rounds)
    assert result.report["poses"]["contradicted_links"] == [[5, 6]]
    assert result.reconstruction.num_reg_images() == VIEWS


def test_rescue_passes_check_links_against_the_poses_they_start_from(scene_data, monkeypatch):
    """A view the rescue re-posed had a wrong feed-forward pose: a later pass checks its links against the
    rescue's pose (in the adjusted poses' frame), not the wrong one. Checked against that, the now right
    link between view 4 and the turned view 5 would be cut and the turned views dropped again."""
    references = []

    def check_the_turned_link(rec, poses, tree_pairs, max_disagreement):
        references.append(poses.clone())
        return original(rec, poses, [(4, 5)], max_disagreement)

    original = pipeline_passes.contradicted_pairs
    monkeypatch.setattr(pipeline_passes, "contradicted_pairs", check_the_turned_link)
    gt = scene_data["views"].cam_from_world.double()
    model = _GroupTurned(_oracle(scene_data), [5, 6, 7], 30.0)
    result = run_pipeline(scene_data["folder"], None, model=model, attention="dense")
    assert result.reconstruction.num_reg_images() == VIEWS
    rounds = result.report["rescue"]["rounds"]
    assert len(references) == 1 + len(rounds) + 1 >= 3  # first pass, rescue rounds, readjustment
    assert all(r["contradicted_links"] == [] for r in rounds)
    assert result.report["readjustment"]["contradicted_links"] == []

    def link_error(poses: torch.Tensor) -> float:  # degrees, relative rotation of views 4 and 5
        relative = poses[5, :, :3] @ poses[4, :, :3].T
        truth = gt[5, :, :3] @ gt[4, :, :3].T
        return math.degrees(math.acos(min(1.0, (float(torch.trace(relative.T @ truth)) - 1) / 2)))

    assert link_error(references[0].double()) > 25.0  # the feed-forward poses
    assert all(link_error(reference.double()) < 5.0 for reference in references[1:])  # the rescue's


def _observation_errors(rec: pycolmap.Reconstruction) -> np.ndarray:
    """Reprojection error (pixels) of every observation, recomputed from the model."""
    errors = []
    for point in rec.points3D.values():
        for element in point.track.elements:
            image = rec.image(element.image_id)
            uv = image.camera.img_from_cam(image.cam_from_world() * point.xyz)
            errors.append(np.linalg.norm(uv - image.points2D[element.point2D_idx].xy))
    return np.array(errors)


def test_filtering_thresholds_are_in_original_pixels_when_work_copies_are_smaller(scene_data, tmp_path):
    """Work copies at a third of the size: the points are measured in work pixels, but the reprojection
    filter keeps COLMAP's meaning (pixels of the original images), not three times as many."""
    folder = tmp_path / "large"
    folder.mkdir()
    views = scene_data["views"]
    size = (WIDTH * 3, HEIGHT * 3)
    for i in range(VIEWS):
        image = Image.fromarray(to_uint8_image(views.images[i])).resize(size, Image.Resampling.BICUBIC)
        image.save(folder / f"view_{i:02d}.png")
    intrinsics = torch.stack(
        [resize_intrinsics(k.double(), (HEIGHT, WIDTH), (size[1], size[0])) for k in views.intrinsics]
    )
    oracle = _oracle(
        scene_data,
        scene=scene_data["scene"],
        depth=None,
        intrinsics=intrinsics,
        original_sizes=[size] * VIEWS,
    )
    options = PipelineOptions(max_image_size=WIDTH)
    options.bundle.max_reproj_error = 2.0
    result = run_pipeline(folder, None, model=oracle, attention="dense", options=options)
    errors = _observation_errors(result.reconstruction)
    assert result.reconstruction.num_reg_images() == VIEWS and errors.size > 300
    assert errors.max() <= 2.0 + 1e-6


def test_runs_repeat_with_single_threaded_bundle_adjustment(scene_data):
    """Two runs on the same images give the same poses and points, bit for bit, once Ceres runs on one
    thread: the re-triangulation's RANSAC has a fixed seed (pycolmap's default, -1, draws a new one every
    run) and no least-squares fit goes through MKL's lstsq (its last bits differed from call to call)."""
    options = PipelineOptions()
    options.bundle.num_threads = 1
    assert triangulator_options(options.bundle).random_seed == 0
    folder = scene_data["folder"]
    runs = [
        run_pipeline(folder, None, model=_oracle(scene_data), attention="dense", options=options)
        for _ in range(2)
    ]
    first, second = (run.reconstruction for run in runs)
    names = runs[0].image_names
    assert torch.equal(_poses(first, names), _poses(second, names))
    assert first.num_points3D() == second.num_points3D() > 0
    assert first.compute_num_observations() == second.compute_num_observations()
    xyz = [np.stack([p.xyz for _, p in sorted(rec.points3D.items())]) for rec in (first, second)]
    assert np.array_equal(xyz[0], xyz[1])


def _bend(rec: pycolmap.Reconstruction, image_ids: list[int], degrees: float) -> None:
    """Turn the given images together about the vertical through their centres' centroid and drop the
    observations that no longer fit (4 px): what a first adjustment locked into a wrong join leaves."""
    centres = np.stack([rec.image(i).projection_center() for i in image_ids])
    pivot = centres.mean(axis=0)
    turn = pycolmap.Rotation3d(
        axis_angle_to_rotation_matrix(torch.tensor([[0.0, math.radians(degrees), 0.0]]))[0].numpy()
    )
    world_from_turned = pycolmap.Rigid3d(turn, pivot - turn * pivot)
    for image_id in image_ids:
        frame = rec.frame(rec.image(image_id).frame_id)
        frame.rig_from_world = frame.rig_from_world * world_from_turned
    pycolmap.ObservationManager(rec).filter_all_points3D(4.0, 1.5)


@pytest.mark.parametrize("readjust", [False, True])
def test_readjustment_undoes_a_wrong_join_left_by_the_first_pass(scene_data, monkeypatch, readjust):
    """The first pass ends with views 4-7 turned 8 degrees against the rest and the observations that
    disagree filtered out. Adjusting again from those poses with every observation of the same matches
    back restores the truth; without it the join stays wrong."""
    real = pipeline_reconstruct.match_and_adjust
    matched = []

    def bent_first_pass(geometry, **kwargs):
        matched.append(kwargs.get("matches") is None)
        adjusted = real(geometry, **kwargs)
        if len(matched) == 1:
            _bend(adjusted.rec, [5, 6, 7, 8], 8.0)
        return adjusted

    monkeypatch.setattr(pipeline_reconstruct, "match_and_adjust", bent_first_pass)
    options = PipelineOptions()
    options.bundle.readjust = readjust
    options.bundle.recheck_min_shared_points = 0  # its own test
    result = run_pipeline(
        scene_data["folder"], None, model=_oracle(scene_data), attention="dense", options=options
    )
    gt = scene_data["views"].cam_from_world.double()
    rre, _ = relative_pose_errors(_poses(result.reconstruction, result.image_names), gt)
    entry = result.report["readjustment"]
    if readjust:
        assert matched == [True, False]  # matched once; the readjustment reuses those matches
        assert entry["ran"] and entry["kept"] and entry["registered_after"] == VIEWS
        assert float(rre.max()) < 1.0
        # one round (BundleOptions.readjust_rounds), at the final loss scale: it starts near the solution
        rounds = [r for r in result.report["ba_rounds"] if r["round"] != "prefilter"]
        assert len(rounds) == options.bundle.readjust_rounds == 1
        assert rounds[0]["loss_scale_px"] == pytest.approx(options.bundle.loss_scale)
    else:
        assert matched == [True] and entry == {"ran": False}
        assert float(rre.max()) > 6.0


@pytest.mark.parametrize(("recheck", "turn"), [(0, 10.0), (0, 0.0), (40, 10.0), (40, 5.0), (40, 0.0)])
def test_a_view_on_few_points_is_posed_again_by_sift(scene_data, monkeypatch, recheck, turn):
    """The readjustment ends with the last view held by 35 observations and turned ``turn`` degrees, as a
    view whose few matches were found around a wrong feed-forward pose agrees with it. The re-check
    (``recheck_min_shared_points``) poses it again by SIFT: turned, it is matched and adjusted again and
    joins right; not turned, SIFT agrees with its pose and the model stays as it was. Without the re-check
    a turned view stays off; if SIFT cannot pose it (simulated), the model stays as it was."""
    real = pipeline_passes.readjust
    kept_models = []

    def thinned_readjustment(*args, **kwargs):
        adjusted, entry = real(*args, **kwargs)
        rec = adjusted.rec
        observed = [k for k, p in enumerate(rec.image(VIEWS).points2D) if p.has_point3D()]
        for k in observed[35:]:
            rec.delete_observation(VIEWS, k)
        frame = rec.frame(rec.image(VIEWS).frame_id)
        rotation = axis_angle_to_rotation_matrix(torch.tensor([[0.0, math.radians(turn), 0.0]]))[0].numpy()
        frame.rig_from_world = (
            pycolmap.Rigid3d(pycolmap.Rotation3d(rotation), np.zeros(3)) * frame.rig_from_world
        )
        kept_models.append(pycolmap.Reconstruction(rec))
        return adjusted, entry

    monkeypatch.setattr(pipeline_passes, "readjust", thinned_readjustment)
    options = PipelineOptions()
    options.bundle.recheck_min_shared_points = recheck
    gt = scene_data["views"].cam_from_world.double()
    name = f"view_{VIEWS - 1:02d}.png"

    def run():
        kept_models.clear()
        result = run_pipeline(scene_data["folder"], None, model=_oracle(scene_data), options=options)
        rre, _ = relative_pose_errors(_poses(result.reconstruction, result.image_names), gt)
        return result, float(rre.max())

    def unchanged(result) -> bool:  # the readjusted model, as the readjustment left it
        [before] = kept_models
        return (
            all(
                np.array_equal(before.image(i).cam_from_world().matrix(), image.cam_from_world().matrix())
                for i, image in result.reconstruction.images.items()
                if image.has_pose
            )
            and result.reconstruction.num_points3D() == before.num_points3D()
        )

    result, worst = run()
    entry = result.report["recheck"]
    assert result.reconstruction.num_reg_images() == VIEWS
    if not recheck:
        assert entry == {"views": []} and unchanged(result) and "re-check" not in result.report["timings_s"]
        assert (worst > 5.0) == (turn > 0)
        return
    assert entry["views"] == [name] and result.report["timings_s"]["re-check"] > 0
    if turn == 0.0:  # SIFT agrees: nothing adjusted again
        assert entry["turned_deg"][name] < 1.0 and not entry["kept"] and unchanged(result)
        assert worst < 0.5
        return
    assert entry["turned_deg"][name] == pytest.approx(turn, abs=1.0) and entry["kept"]
    assert worst < 1.0 and result.reconstruction.image(VIEWS).num_points3D > 35
    line = f"  views on few shared points posed again by SIFT: {name} ({entry['turned_deg'][name]:.1f} deg)"
    assert line in pipeline_cli.summary_text(result).splitlines()

    # a new adjustment that registers fewer views is not kept (simulated: it loses the first view)
    real_adjust = pipeline_reconstruct.match_and_adjust
    calls = []

    def losing_one_in_the_recheck(geometry, **kwargs):
        adjusted = real_adjust(geometry, **kwargs)
        calls.append(kwargs.get("matches") is None)
        if len(calls) == 3:  # the first pass, the readjustment, the re-check
            adjusted.rec.deregister_frame(adjusted.rec.image(1).frame_id)
        return adjusted

    monkeypatch.setattr(pipeline_reconstruct, "match_and_adjust", losing_one_in_the_recheck)
    result, worst = run()
    assert calls == [True, False, True]
    assert not result.report["recheck"]["kept"] and result.report["recheck"]["turned_deg"][name] > 3.0
    assert unchanged(result) and worst > 3.0 and result.reconstruction.num_reg_images() == VIEWS
    monkeypatch.setattr(pipeline_reconstruct, "match_and_adjust", real_adjust)

    monkeypatch.setattr(pipeline_rescue, "sift_pose", lambda *args, **kwargs: None)
    result, worst = run()
    assert result.report["recheck"] == {"views": [name], "kept": False, "turned_deg": {}}
    assert unchanged(result) and worst > 3.0


def test_the_recheck_needs_bundle_adjustment(scene_data):
    """Without bundle adjustment nothing is re-checked, even views on no shared point at all."""
    options = PipelineOptions()
    options.bundle.recheck_min_shared_points = 10**6
    result = run_pipeline(scene_data["folder"], None, model=_oracle(scene_data), options=options, ba=False)
    assert result.report["recheck"] == {"views": []}
    assert torch.allclose(
        _poses(result.reconstruction, result.image_names), result.feedforward_cam_from_world
    )


@pytest.mark.parametrize("ba", [True, False])
def test_progress_bar_total_is_known_from_the_start(scene_data, tmp_path, monkeypatch, ba):
    """The bar's total counts every stage that will run (the readjustment too), so it never grows."""
    bars = []

    class RecordingBar(pipeline_stages.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.first_total = self.total
            bars.append(self)

    monkeypatch.setattr(pipeline_stages, "tqdm", RecordingBar)
    oracle = _oracle(scene_data)
    run_pipeline(scene_data["folder"], tmp_path / "o", model=oracle, attention="dense", ba=ba, progress=True)
    (bar,) = bars
    assert bar.n == bar.total == bar.first_total == 7 + ba


def _colmap_params(k: torch.Tensor) -> list[float]:
    """PINHOLE parameters of an integer-centre K (COLMAP's pixel centres are at +0.5)."""
    return [float(k[0, 0]), float(k[1, 1]), float(k[0, 2]) + 0.5, float(k[1, 2]) + 0.5]


def test_known_intrinsics_replace_the_predicted_ones_and_stay_fixed(scene_data, tmp_path):
    """``camera_params`` (as COLMAP's --ImageReader.camera_params): the cameras carry exactly the given
    intrinsics, bundle adjustment keeps them, and poses come out right although the model's focal length is
    15 % off."""
    views = scene_data["views"]
    params = _colmap_params(views.intrinsics[0].double())
    wrong = views.intrinsics.clone()
    wrong[:, 0, 0] *= 1.15
    wrong[:, 1, 1] *= 1.15
    oracle = _oracle(scene_data, intrinsics=wrong)
    text = ",".join(f"{p:.10g}" for p in params)
    result = run_pipeline(
        scene_data["folder"], tmp_path / "out", model=oracle, camera_model="PINHOLE", camera_params=text
    )
    rec = result.reconstruction
    assert rec.num_reg_images() == VIEWS and rec.num_cameras() == VIEWS
    assert all(camera.has_prior_focal_length for camera in rec.cameras.values())
    for camera in pycolmap.Reconstruction(tmp_path / "out" / "sparse" / "0").cameras.values():
        assert np.allclose(camera.params, params, rtol=1e-9)
    with pycolmap.Database.open(tmp_path / "out" / "database.db") as db:  # COLMAP's mapper trusts them
        assert all(camera.has_prior_focal_length for camera in db.read_all_cameras())
    assert result.report["camera_params"] == pytest.approx(params, rel=1e-9)
    gt = views.cam_from_world.double()
    assert _median_rre(_poses(rec, result.image_names), gt) <= 0.5
    # without them the cameras start from the model's focal length and bundle adjustment refines it
    free = run_pipeline(scene_data["folder"], None, model=oracle, camera_model="PINHOLE").reconstruction
    assert not any(np.allclose(c.params, params, rtol=1e-6) for c in free.cameras.values())


def test_known_intrinsics_leave_the_model_stages_on_the_predicted_ones(scene_data, monkeypatch):
    """Token poses and matching unproject the predicted depth with the intrinsics it was predicted with
    (with the known ones instead, the default model's feed-forward poses were worse and two of six scenes
    hinged or lost views: ``benchmarks/results/known_intrinsics.md``); only the COLMAP cameras carry the
    known intrinsics."""
    views = scene_data["views"]
    params = _colmap_params(views.intrinsics[0].double())
    predicted = views.intrinsics.clone().double()
    predicted[:, :2, :2] *= 1.15
    seen = {}

    def spy(module, name: str, geometry_arg: int):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen[name] = args[geometry_arg].intrinsics.clone()
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    spy(pipeline_reconstruct, "apply_token_poses", 0)  # apply_token_poses(geometry, prediction, options)
    spy(pipeline_passes, "match_views", 3)  # match_views(views, grays, keypoints, geometry, ...)
    result = run_pipeline(
        scene_data["folder"],
        None,
        model=_oracle(scene_data, intrinsics=predicted.float()),
        camera_model="PINHOLE",
        camera_params=params,
    )
    assert set(seen) == {"apply_token_poses", "match_views"}
    for intrinsics in seen.values():  # model input = original size here (crop to WIDTH)
        assert torch.allclose(intrinsics, predicted, atol=1e-3)
    for camera in result.reconstruction.cameras.values():
        assert np.allclose(camera.params, params, rtol=1e-9)


def test_known_intrinsics_are_checked_before_any_work(scene_data, tmp_path):
    oracle = _oracle(scene_data)
    with pytest.raises(ValueError, match=r"SIMPLE_RADIAL takes 4 finite numbers, f, cx, cy, k"):
        run_pipeline(scene_data["folder"], tmp_path / "out", model=oracle, camera_params="200,112,84")
    assert not (tmp_path / "out").exists()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, path in enumerate(sorted(scene_data["folder"].iterdir())[:3]):
        image = Image.open(path)
        (image.resize((WIDTH * 2, HEIGHT * 2)) if i == 0 else image).save(mixed / path.name)
    with pytest.raises(InputError, match="camera_params .* one size"):
        run_pipeline(mixed, tmp_path / "out", model=oracle, camera_params="200,112,84,0")
    assert not (tmp_path / "out").exists()
    # values that cannot be the images' camera: a PINHOLE's fx,fy,cx,cy read as SIMPLE_RADIAL's f,cx,cy,k
    # (k = 84 had run, 2 of 12 views registered, exit 0), a distortion that folds the image, a principal
    # point outside it
    for model, text, why in (
        ("SIMPLE_RADIAL", "200,200,112,84", "puts the image border .* times as far from the centre"),
        ("SIMPLE_RADIAL", "200,112,84,20", "puts the image border"),
        ("SIMPLE_RADIAL", "200,112,84,-2", "folds the image"),
        ("PINHOLE", "200,200,600,84", r"principal point \(600, 84\) outside the image"),
    ):
        with pytest.raises(InputError, match=f"do not fit the {WIDTH}x{HEIGHT} images as {model} .*{why}"):
            run_pipeline(
                scene_data["folder"], tmp_path / "out", model=oracle, camera_model=model, camera_params=text
            )
        assert oracle.calls == 0 and not (tmp_path / "out").exists()


def test_undistort_writes_the_splatting_layout_beside_the_project(scene_data, tmp_path):
    """``undistort=True``: OUT/undistorted has every registered image (undistorted) and PINHOLE cameras with
    the project's poses in sparse/0, the folder 3DGS / gsplat / nerfstudio read."""
    output = tmp_path / "out"
    result = run_pipeline(scene_data["folder"], output, model=_oracle(scene_data), undistort=True)
    project = pycolmap.Reconstruction(output / "sparse" / "0")
    undistorted = pycolmap.Reconstruction(output / "undistorted" / "sparse" / "0")
    assert {c.model.name for c in undistorted.cameras.values()} == {"PINHOLE"}
    names = sorted(project.images[i].name for i in project.reg_image_ids())
    assert sorted(p.name for p in (output / "undistorted" / "images").iterdir()) == names
    for name in names:
        before, after = project.find_image_with_name(name), undistorted.find_image_with_name(name)
        assert np.allclose(before.cam_from_world().matrix(), after.cam_from_world().matrix(), atol=1e-12)
        with Image.open(output / "undistorted" / "images" / name) as image:
            assert image.size == (after.camera.width, after.camera.height)
    assert undistorted.num_points3D() == project.num_points3D()
    entry = result.report["undistorted"]
    assert entry["images"] == len(names) and entry["path"] == "undistorted"
    assert json.loads((output / "report.json").read_text())["undistorted"]["images"] == len(names)
    with pytest.raises(ValueError, match="output_dir"):
        run_pipeline(scene_data["folder"], None, model=_oracle(scene_data), undistort=True)


def test_a_failing_undistortion_leaves_no_project(scene_data, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("undistorter crashed (simulated)")

    monkeypatch.setattr(pycolmap, "undistort_images", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        run_pipeline(scene_data["folder"], tmp_path / "out", model=_oracle(scene_data), undistort=True)
    assert list(tmp_path.iterdir()) == []


def test_sparse_model_holds_registered_images_only_and_the_database_all(scene_data, tmp_path, monkeypatch):
    """sparse/0 is written as COLMAP's mapper writes it (no camera or rig of an unregistered image: they
    had been left behind); database.db keeps every image. A project with the points.glb that `export`
    writes by default is still replaced with overwrite. The loss of a view is simulated."""
    real = pipeline_reconstruct.adjust_rescue_readjust

    def lose_the_last_view(adjust, **kwargs):
        result = real(adjust, **kwargs)
        rec = result.adjusted.rec
        rec.deregister_frame(rec.image(VIEWS).frame_id)
        result.adjusted.dropped = [VIEWS]
        return result

    monkeypatch.setattr(pipeline_reconstruct, "adjust_rescue_readjust", lose_the_last_view)
    out = tmp_path / "out"
    result = run_pipeline(scene_data["folder"], out, model=_oracle(scene_data))
    model = pycolmap.Reconstruction(out / "sparse" / "0")
    assert model.num_reg_images() == model.num_images() == VIEWS - 1
    assert model.num_cameras() == model.num_rigs() == VIEWS - 1  # one camera per image
    assert {im.camera_id for im in model.images.values()} == set(model.cameras)
    assert result.reconstruction.num_cameras() == VIEWS  # the returned object is untouched
    with pycolmap.Database.open(out / "database.db") as db:
        assert db.num_images() == db.num_cameras() == VIEWS
    (out / "points.glb").write_bytes(b"glTF")
    run_pipeline(scene_data["folder"], out, model=_oracle(scene_data), overwrite=True)
    assert not (out / "points.glb").exists() and (out / "database.db").is_file()


def test_many_unregistered_views_warn_of_unrelated_views(scene_data, monkeypatch, caplog, tmp_path):
    """A quarter of the views or more left unregistered: the run says that views of another scene degrade
    the model's predictions for the rest (a scene kept from two mixed in one folder was 5 deg off, 0.8 deg
    alone) and what to do; the project lists the unregistered views in unregistered_images.txt, an
    ``image_list`` that a run of their own takes. The log and the summary name the first five, then count
    the rest. The loss of the views is simulated."""
    real = pipeline_reconstruct.adjust_rescue_readjust
    dropped = list(range(3, VIEWS + 1))  # six views

    def lose_views(adjust, **kwargs):
        result = real(adjust, **kwargs)
        for image_id in dropped:
            result.adjusted.rec.deregister_frame(result.adjusted.rec.image(image_id).frame_id)
        result.adjusted.dropped = dropped
        return result

    monkeypatch.setattr(pipeline_reconstruct, "adjust_rescue_readjust", lose_views)
    with caplog.at_level(logging.WARNING):
        result = run_pipeline(scene_data["folder"], tmp_path / "out", model=_oracle(scene_data))
    assert (
        f"6 of {VIEWS} views registered in no model. If they show another scene, reconstruct each"
        in caplog.text
    )
    lost = result.image_names[2:]
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("not registered:")]
    assert [m.split(":")[1].strip() for m in named[:5]] == lost[:5]
    assert named[5:] == ["not registered: 1 more (report.json unregistered_images)"]
    summary = pipeline_cli.summary_text(result).splitlines()
    assert [line for line in summary if line.startswith("  not registered: ")] == [
        f"  not registered: {name} ({entry['why']})"
        for name, entry in zip(lost[:5], result.report["unregistered_images"], strict=False)
    ]
    assert f"  1 more not registered; all listed in {tmp_path / 'out' / 'unregistered_images.txt'}" in summary
    listed = tmp_path / "out" / "unregistered_images.txt"
    assert [line for line in listed.read_text().splitlines() if not line.startswith("#")] == lost
    selected = select_images(scene_data["folder"], image_list=listed)
    assert [path.relative_to(scene_data["folder"]).as_posix() for path in selected] == lost

    monkeypatch.setattr(pipeline_reconstruct, "adjust_rescue_readjust", real)
    run_pipeline(scene_data["folder"], tmp_path / "out", model=_oracle(scene_data), overwrite=True)
    assert not listed.exists()  # every view registered: no list


class _OraclesByViewCount:
    """A model answering each call with the oracle built for that many views (a run's views, or the views
    a first run left unregistered)."""

    name = "oracle"

    def __init__(self, oracles: dict[int, SceneOracle]) -> None:
        self.oracles = oracles
        self.preprocessing = next(iter(oracles.values())).preprocessing
        self.calls: list[int] = []

    def __call__(self, images: torch.Tensor) -> Prediction:
        self.calls.append(images.shape[-4])
        return self.oracles[images.shape[-4]](images)


def _oracles_with_the_last_views(scene_data, lost: int) -> _OraclesByViewCount:
    """The scene's oracle for a run of all views, and one for a run of its last ``lost`` views alone."""
    views = scene_data["views"]
    tail = slice(VIEWS - lost, VIEWS)
    subset = SceneOracle(
        views.intrinsics[tail],
        views.cam_from_world[tail],
        [(WIDTH, HEIGHT)] * lost,
        Preprocessing("crop", WIDTH),
        depth=list(views.depth[tail]),
        rotation_noise_deg=NOISE_DEG,
        translation_noise=0.03,
        seed=3,
    )
    return _OraclesByViewCount({VIEWS: _oracle(scene_data), lost: subset})


def test_views_a_run_left_unregistered_become_a_further_model(scene_data, monkeypatch, tmp_path, caplog):
    """The views a run did not register (simulated: the last four) are reconstructed on their own when at
    least ``min_model_views`` are left: written as sparse/1, listed in report.json and the CLI summary; the
    one view that further run also loses (simulated) is registered in no model, warned of once and listed in
    unregistered_images.txt. With fewer left, or ``max_models=1``, nothing more runs; overwrite replaces such
    a project, not one with a sparse/N its report does not list."""
    real = pipeline_reconstruct.adjust_rescue_readjust
    lost = 4

    def lose_views(adjust, **kwargs):
        result = real(adjust, **kwargs)
        rec = result.adjusted.rec
        dropped = (
            range(VIEWS - lost + 1, VIEWS + 1) if rec.num_images() == VIEWS else [lost]
        )  # first / further
        for image_id in dropped:
            rec.deregister_frame(rec.image(image_id).frame_id)
        result.adjusted.dropped = list(dropped)
        return result

    monkeypatch.setattr(pipeline_reconstruct, "adjust_rescue_readjust", lose_views)
    model = _oracles_with_the_last_views(scene_data, lost)
    options = PipelineOptions(min_model_views=lost - 1)
    with caplog.at_level(logging.INFO):
        result = run_pipeline(
            scene_data["folder"], tmp_path / "out", model=model, options=options, undistort=True
        )

    names = result.image_names[VIEWS - lost :]
    assert model.calls == [VIEWS, lost]
    assert result.reconstruction.num_reg_images() == VIEWS - lost
    [further] = result.further_models
    assert sorted(further.image_names) == names and further.reconstruction.num_reg_images() == lost - 1
    entry = result.report["further_models"][0]
    assert (
        entry["path"] == "sparse/1"
        and entry["images"] == names[:-1]
        and entry["registered_images"] == lost - 1
    )
    assert result.report["registered_in_no_model"] == names[-1:]
    written = pycolmap.Reconstruction(tmp_path / "out" / "sparse" / "1")
    assert sorted(written.image(i).name for i in written.reg_image_ids()) == names[:-1]
    undistorted = pycolmap.Reconstruction(tmp_path / "out" / "undistorted" / "sparse" / "1")
    assert {c.model.name for c in undistorted.cameras.values()} == {"PINHOLE"}
    assert sorted(undistorted.image(i).name for i in undistorted.reg_image_ids()) == names[:-1]
    everything = sorted(p.name for p in (tmp_path / "out" / "undistorted" / "images").iterdir())
    assert everything == sorted(set(result.image_names) - {names[-1]})
    assert result.report["undistorted"]["images"] == VIEWS - 1
    assert pycolmap.Reconstruction(tmp_path / "out" / "sparse" / "0").num_reg_images() == VIEWS - lost
    listed = (tmp_path / "out" / "unregistered_images.txt").read_text().splitlines()
    assert [line for line in listed if not line.startswith("#")] == names[-1:]
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "not registered:" in r.getMessage()]
    assert [level for level, message in lines if names[-1] in message] == [logging.INFO, logging.WARNING]
    stage_lines = [r for r in caplog.records if r.name.endswith(".stages")]
    assert [r.getMessage().split(":")[0] for r in stage_lines].count(
        "read images"
    ) == 1  # not the further run's
    assert not any(level == logging.WARNING for level, message in lines if names[-1] not in message)
    summary = pipeline_cli.summary_text(result)
    assert summary.startswith(
        f"reconstructed {VIEWS - lost}/{VIEWS} images; {VIEWS - 1}/{VIEWS} in 2 models\n"
    )
    assert f"further model sparse/1: {lost - 1} images (views sparse/0 did not register)" in summary
    assert "  sparse/0: " in summary  # the counts of the first model
    assert f"  all listed in {tmp_path / 'out' / 'unregistered_images.txt'}" in summary.splitlines()
    assert f"not registered: {names[-1]}" in summary and f"not registered: {names[0]}" not in summary
    assert "PINHOLE cameras in" in summary and "(images/, sparse/0/, sparse/1/)" in summary

    # an overwrite: a sparse/N its report does not list is not the project's; the listed one is
    (tmp_path / "out" / "sparse" / "2").mkdir()
    with pytest.raises(OutputExistsError, match=r"holds more than a speed3r-sfm project \(sparse/2\)"):
        run_pipeline(scene_data["folder"], tmp_path / "out", model=model, options=options, overwrite=True)
    (tmp_path / "out" / "sparse" / "2").rmdir()
    model.calls.clear()
    for fewer in (
        PipelineOptions(min_model_views=lost + 1),
        PipelineOptions(min_model_views=lost - 1, max_models=1),
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            alone = run_pipeline(
                scene_data["folder"], tmp_path / "out", model=model, options=fewer, overwrite=True
            )
        assert alone.further_models == [] and alone.report["registered_in_no_model"] == names
        assert all(f"not registered: {name}" in caplog.text for name in names)
    assert model.calls == [VIEWS, VIEWS]
    assert sorted(p.name for p in (tmp_path / "out" / "sparse").iterdir()) == ["0"]
    # the further run's quieter logging is not an argument of the public function, and does not outlive it
    assert not [name for name in inspect.signature(run_pipeline).parameters if name.startswith("_")]
    assert pipeline_reconstruct._MAKING_FURTHER_MODEL.get() is False


def test_further_models_share_the_database_ids_as_colmaps_models_do(scene_data, monkeypatch, tmp_path):
    """A further model (the last four views, simulated lost by the first run) has the image and camera ids
    its views have in database.db, whose keypoints of those views are that model's 2D points, matched and
    verified among them (not against sparse/0's keypoints): COLMAP's point triangulator reads sparse/1 with
    the database. The returned further reconstruction is the one written."""
    real = pipeline_reconstruct.adjust_rescue_readjust
    lost = 4

    def lose_views(adjust, **kwargs):
        result = real(adjust, **kwargs)
        if result.adjusted.rec.num_images() == VIEWS:
            for image_id in range(VIEWS - lost + 1, VIEWS + 1):
                result.adjusted.rec.deregister_frame(result.adjusted.rec.image(image_id).frame_id)
            result.adjusted.dropped = list(range(VIEWS - lost + 1, VIEWS + 1))
        return result

    monkeypatch.setattr(pipeline_reconstruct, "adjust_rescue_readjust", lose_views)
    model = _oracles_with_the_last_views(scene_data, lost)
    out = tmp_path / "out"
    result = run_pipeline(
        scene_data["folder"], out, model=model, options=PipelineOptions(min_model_views=lost)
    )
    [further] = result.further_models
    written = pycolmap.Reconstruction(out / "sparse" / "1")
    assert written.num_reg_images() == further.reconstruction.num_reg_images() == lost
    first_ids = {name: k + 1 for k, name in enumerate(result.image_names)}
    with pycolmap.Database.open(out / "database.db") as db:
        assert db.num_images() == VIEWS
        for image_id, image in written.images.items():
            assert image_id == first_ids[image.name] == db.read_image_with_name(image.name).image_id
            assert image.camera_id == db.read_image(image_id).camera_id
            assert db.read_camera(image.camera_id).params == pytest.approx(image.camera.params)
            xy = np.stack([p.xy for p in image.points2D])
            assert np.allclose(db.read_keypoints(image_id)[:, :2], xy, atol=1e-3)
            assert np.allclose(xy, np.stack([p.xy for p in further.reconstruction.image(image_id).points2D]))
        ids = sorted(written.images)
        pair_ids, geometries = db.read_two_view_geometries()
        pairs = {
            pycolmap.pair_id_to_image_pair(pair_id): g
            for pair_id, g in zip(pair_ids, geometries, strict=True)
        }
        within = [pair for pair in pairs if pair[0] in ids and pair[1] in ids]
        assert len(within) >= lost - 1
        for id1, id2 in within:  # inliers are observations of one 3D point of sparse/1
            inliers = pairs[(id1, id2)].inlier_matches
            p1 = [written.image(id1).points2D[int(a)].point3D_id for a in inliers[:20, 0]]
            p2 = [written.image(id2).points2D[int(b)].point3D_id for b in inliers[:20, 1]]
            assert p1 == p2
        # no match between a view of sparse/1 and one of sparse/0: their keypoints are another run's
        assert not any((id1 in ids) != (id2 in ids) for id1, id2 in pairs)
        assert all(not db.exists_matches(i, j) for i in ids for j in range(1, VIEWS - lost + 1))
    bare = pycolmap.Reconstruction(written)
    for point_id in list(bare.points3D):
        bare.delete_point3D(point_id)
    retriangulated = pycolmap.triangulate_points(
        bare, out / "database.db", scene_data["folder"], tmp_path / "tri"
    )
    assert (
        retriangulated.num_reg_images() == lost
        and retriangulated.num_points3D() >= 0.5 * written.num_points3D()
    )


def test_only_further_models_a_report_lists_count_as_the_projects(tmp_path):
    """check_output: sparse/N folders are the project's only where its report.json lists them as further
    models by their path (sparse/1 ...); other names, non-strings, a report that is not JSON or is nested too
    deep to read leave them foreign, so overwrite refuses the folder."""
    from speed3r_sfm.pipeline.export import check_output

    project = tmp_path / "out"
    for name in ("0", "1", "mine"):
        (project / "sparse" / name).mkdir(parents=True)
    report = project / "report.json"
    for listed, foreign in (
        ([{"path": "sparse/1"}], "sparse/mine"),
        ([{"path": "sparse/1"}, {"path": "mine"}, {"path": "sparse/mine"}], "sparse/mine"),
        ([{"path": 1}, {"path": "sparse/../mine"}], "sparse/1, sparse/mine"),
    ):
        report.write_text(json.dumps({"further_models": listed}))
        with pytest.raises(OutputExistsError, match=re.escape(f"project ({foreign})")):
            check_output(project, overwrite=True)
    (project / "sparse" / "mine").rmdir()
    report.write_text(json.dumps({"further_models": [{"path": "sparse/1"}]}))
    assert check_output(project, overwrite=True) == project
    for broken in ("not json", "[" * 100_000 + "]" * 100_000, json.dumps({"further_models": 3})):
        report.write_text(broken)
        with pytest.raises(OutputExistsError, match=re.escape("project (sparse/1)")):
            check_output(project, overwrite=True)


def test_further_models_stop_when_a_run_fails_or_registers_too_few():
    """further_models: each run takes what the last one left, while enough are left; a run that fails (a
    ReconstructionError or any other error) or registers fewer than min_model_views ends it, its views
    registered in no model."""

    def fake(registered: int, left: list[str]) -> PipelineResult:
        rec = mock.Mock()
        rec.num_reg_images.return_value = registered
        report = {"unregistered_images": [{"name": name, "why": ""} for name in left]}
        return PipelineResult(rec, report, None, [], torch.zeros(0, 3, 4), torch.zeros(0, 3, 4))

    names = [f"v{i}" for i in range(30)]
    runs = iter([fake(15, names[15:]), fake(12, names[27:])])
    calls = []

    def run(subset):
        calls.append(list(subset))
        return next(runs)

    models, left = pipeline_reconstruct.further_models(run, names, PipelineOptions(min_model_views=10))
    assert [m.reconstruction.num_reg_images() for m in models] == [15, 12]
    assert calls == [names, names[15:]] and left == names[27:]  # 3 left: fewer than 10, no third run

    def failing(subset):
        raise ReconstructionError("no reconstruction")

    assert pipeline_reconstruct.further_models(failing, names, PipelineOptions()) == ([], names)

    def broken(subset):  # any other error of a further run leaves the first model as it is
        raise ValueError("out of memory")

    assert pipeline_reconstruct.further_models(broken, names, PipelineOptions()) == ([], names)
    too_few = pipeline_reconstruct.further_models(
        lambda subset: fake(9, names[9:]), names, PipelineOptions(min_model_views=10)
    )
    assert too_few == ([], names)
    capped = pipeline_reconstruct.further_models(run, names, PipelineOptions(max_models=1))
    assert capped == ([], names)


def test_views_without_a_baseline_are_named_as_the_cause():
    """Copies of one view (a still camera): many matches, no 3D point; the error had blamed small or
    textureless images."""
    import tempfile

    from speed3r_sfm.data.synthetic import render_scene

    views = render_scene(3, 1, 147, 196, "forward")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        base = to_uint8_image(views.images[0]).astype(np.int16)
        for i in range(6):
            noisy = np.clip(base + rng.integers(-2, 3, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(f"{folder}/still_{i}.png")
        with pytest.raises(ReconstructionError, match="the camera may not have moved between the views"):
            reconstruct(folder)


@pytest.mark.parametrize("second_registers_more", [True, False])
def test_views_left_unregistered_get_a_pass_with_the_adjusted_camera_held_fixed(
    scene_data, monkeypatch, second_registers_more
):
    """When views stay unregistered with one predicted camera for all, steps 4-6, the rescue and the
    readjustment run again from the feed-forward poses with the first pass's matches and its adjusted camera
    held fixed (``fixed_camera_pass``); kept only if it registers more views. The first pass's loss of a
    view is simulated."""
    real = pipeline_reconstruct.adjust_rescue_readjust
    calls = []

    def spy(adjust, **kwargs):
        result = real(adjust, **kwargs)
        calls.append((adjust, kwargs, result))
        if len(calls) == 1 or not second_registers_more:
            rec = result.adjusted.rec
            rec.deregister_frame(rec.image(VIEWS).frame_id)
            result.adjusted.dropped = [VIEWS]
        return result

    monkeypatch.setattr(pipeline_reconstruct, "adjust_rescue_readjust", spy)
    result = run_pipeline(scene_data["folder"], None, model=_oracle(scene_data), shared_camera=True)
    assert len(calls) == 2
    (_, _, first), (adjust, kwargs, second) = calls
    camera = adjust.keywords["calibration"]
    assert camera.has_prior_focal_length
    assert np.allclose(camera.params, first.adjusted.rec.cameras[1].params, rtol=1e-12)
    assert kwargs["matches"] is first.first_matches  # no second matching
    entry = result.report["fixed_camera_pass"]
    assert entry["ran"] and entry["registered_before"] == VIEWS - 1
    if second_registers_more:
        assert entry["kept"] and entry["registered_after"] == VIEWS
        assert result.reconstruction.num_reg_images() == VIEWS
        assert result.reconstruction.cameras[1].has_prior_focal_length
        assert result.report["unregistered_images"] == []
        summary = pipeline_cli.summary_text(result)
        assert f"camera held fixed: {VIEWS - 1} -> {VIEWS} registered images" in summary
    else:
        assert not entry["kept"] and result.reconstruction is first.adjusted.rec
        assert [e["name"] for e in result.report["unregistered_images"]] == [result.image_names[VIEWS - 1]]
    # off, or one camera per image (they may be different cameras): one pass
    options = PipelineOptions()
    options.bundle.fixed_camera_pass = False
    for shared, settings in ((True, options), (False, None)):
        calls.clear()
        off = run_pipeline(
            scene_data["folder"], None, model=_oracle(scene_data), shared_camera=shared, options=settings
        )
        assert len(calls) == 1 and off.report["fixed_camera_pass"] == {"ran": False}


def test_api_arguments_of_the_wrong_kind_say_what_to_pass(scene_data):
    import speed3r_sfm

    assert speed3r_sfm.ReconstructionError is ReconstructionError  # exported at the top level
    from speed3r_sfm.models.checkpoint import CheckpointError
    from speed3r_sfm.pipeline.backbone import DeviceNotAvailableError

    # every error a caller can fix, to catch without knowing the submodules
    for error in (
        InputError,
        OutputExistsError,
        ModelNotAvailableError,
        DeviceNotAvailableError,
        CheckpointError,
    ):
        assert getattr(speed3r_sfm, error.__name__) is error
    assert set(speed3r_sfm.__all__) >= {"InputError", "OutputPathError", "CheckpointError", "reconstruct"}
    with pytest.raises(TypeError, match="options must be a PipelineOptions, got dict"):
        reconstruct(scene_data["folder"], model=_oracle(scene_data), options={"keypoints": {}})
    with pytest.raises(TypeError, match="preprocessing must be a Preprocessing, got str"):
        reconstruct(scene_data["folder"], model=_oracle(scene_data), preprocessing="pad")
    # a near miss of a known model name is named; CAMERA_MODELS, which the docstring points to, is public
    with pytest.raises(ModelNotAvailableError, match=r"defualt does not exist \(did you mean 'default'\?\)"):
        reconstruct(scene_data["folder"], model="defualt")
    with pytest.raises(ModelNotAvailableError) as unknown:
        reconstruct(scene_data["folder"], model="weights/run3.pt")
    assert "did you mean" not in str(unknown.value)
    with pytest.raises(ModelNotAvailableError, match=r"\(did you mean 'facebook/VGGT-1B'\?\)"):
        reconstruct(scene_data["folder"], model="facebook_VGGT-1b")
    from speed3r_sfm.pipeline import CAMERA_MODELS

    assert "SIMPLE_RADIAL" in CAMERA_MODELS and "PINHOLE" in CAMERA_MODELS
