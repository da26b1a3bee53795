"""Chunked inference inside ``reconstruct``: ordered and unordered chunk plans, GSA records merged over
chunks, resume from the chunk file, token descriptors for grouping, and the CLI flags (CPU, tiny sizes)."""

from __future__ import annotations

import importlib
import json
import shutil

import h5py
import numpy as np
import pycolmap
import pytest
import torch
from PIL import Image
from test_token_poses import _oracle_descriptors  # tests/ is on sys.path (pytest's rootdir import)

from speed3r_sfm.cli import main
from speed3r_sfm.data.colmap_dataset import to_uint8_image
from speed3r_sfm.data.synthetic import RenderedViews, make_cameras, make_scene, render_views
from speed3r_sfm.eval.metrics import relative_pose_errors
from speed3r_sfm.models.pi3 import Pi3, Pi3Config
from speed3r_sfm.models.vggt import VGGT, VGGTConfig
from speed3r_sfm.pipeline import cli as pipeline_cli
from speed3r_sfm.pipeline.backbone import Backbone
from speed3r_sfm.pipeline.bundle import BundleOptions
from speed3r_sfm.pipeline.chunked import ChunkFileError
from speed3r_sfm.pipeline.chunking import group_views_by_similarity, plan_chunks
from speed3r_sfm.pipeline.inputs import Preprocessing, find_images, load_views
from speed3r_sfm.pipeline.oracle import SceneOracle, ideal_records
from speed3r_sfm.pipeline.reconstruct import PipelineOptions, ReconstructionError, run_pipeline
from speed3r_sfm.pipeline.records import merge_chunk_summaries, summarize_records
from speed3r_sfm.pipeline.rescue import RescueOptions
from speed3r_sfm.pipeline.view_features import thumbnail_descriptors, token_descriptors

pipeline_inference = importlib.import_module("speed3r_sfm.pipeline.inference")
pipeline_reconstruct = importlib.import_module("speed3r_sfm.pipeline.reconstruct")
pipeline_bundle = importlib.import_module("speed3r_sfm.pipeline.bundle")

SEED, VIEWS, HEIGHT, WIDTH = 11, 12, 168, 224
CHUNK, OVERLAP = 6, 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Many small tensor ops: one thread is faster and steadier on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _save(views: RenderedViews, folder, names: list[str]) -> None:
    folder.mkdir()
    for i, name in enumerate(names):
        Image.fromarray(to_uint8_image(views.images[i])).save(folder / name)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A forward trajectory of 12 views saved in order, and the same views under shuffled names."""
    world = make_scene(SEED)
    k, poses = make_cameras(world, VIEWS, HEIGHT, WIDTH, trajectory="forward")
    views = render_views(world, k, poses, HEIGHT, WIDTH)
    root = tmp_path_factory.mktemp("chunked")
    _save(views, root / "ordered", [f"view_{i:02d}.png" for i in range(VIEWS)])
    shuffled = [f"img_{i:02d}.png" for i in torch.randperm(VIEWS, generator=torch.Generator().manual_seed(5))]
    _save(views, root / "shuffled", shuffled)
    trajectory_index = {name: i for i, name in enumerate(shuffled)} | {
        f"view_{i:02d}.png": i for i in range(VIEWS)
    }
    return {"views": views, "root": root, "trajectory_index": trajectory_index}


class ChunkOracle:
    """The ground truth of whichever views a call holds (recognised by their model images), each call in its
    own random Sim(3) frame with pose noise, as a backbone run on one chunk would answer."""

    name = "chunk oracle"

    def __init__(self, scene: dict, folder, noise_deg: float = 0.5, records: str = "none") -> None:
        self.preprocessing = Preprocessing("crop", WIDTH)
        paths = find_images(folder)
        _, model_images, _ = load_views(paths, folder, self.preprocessing)
        index = [scene["trajectory_index"][path.name] for path in paths]
        self.keys = {image.numpy().tobytes(): index[i] for i, image in enumerate(model_images)}
        self.views, self.noise_deg, self.records = scene["views"], noise_deg, records
        self.calls: list[list[int]] = []

    def __call__(self, images: torch.Tensor):
        idx = [self.keys[image.cpu().numpy().tobytes()] for image in images[0]]
        self.calls.append(idx)
        oracle = SceneOracle(
            self.views.intrinsics[idx],
            self.views.cam_from_world[idx],
            [(WIDTH, HEIGHT)] * len(idx),
            self.preprocessing,
            depth=[self.views.depth[i] for i in idx],
            rotation_noise_deg=self.noise_deg,
            translation_noise=0.01 * self.noise_deg,
            seed=len(self.calls),
            records=self.records,  # type: ignore[arg-type]
            block_size=24,
            query_block_size=24,
        )
        return oracle(images)


def _poses(result) -> torch.Tensor:
    rec = result.reconstruction
    names = result.image_names
    return torch.stack(
        [torch.from_numpy(rec.find_image_with_name(n).cam_from_world().matrix()) for n in names]
    )


def _median_rre(poses: torch.Tensor, reference: torch.Tensor) -> float:
    return float(relative_pose_errors(poses, reference)[0].median())


def _gt_in_result_order(scene, result) -> torch.Tensor:
    """Ground-truth poses in the order of ``result.image_names``."""
    index = [scene["trajectory_index"][name] for name in result.image_names]
    return scene["views"].cam_from_world.double()[index]


def test_chunked_reconstruction_matches_the_single_pass(scene, tmp_path):
    folder = scene["root"] / "ordered"
    single = run_pipeline(folder, None, model=ChunkOracle(scene, folder), attention="dense")
    oracle = ChunkOracle(scene, folder)
    output = tmp_path / "chunked"
    result = run_pipeline(
        folder, output, model=oracle, attention="dense", chunk_size=CHUNK, chunk_overlap=OVERLAP
    )
    plan = plan_chunks(VIEWS, CHUNK, OVERLAP)
    assert oracle.calls == plan  # one backbone pass per chunk, never all views at once
    chunking = json.loads((output / "report.json").read_text())["chunking"]
    assert chunking["chunks"] == plan and chunking["num_chunks"] == 3 and chunking["grouping"] == "ordered"
    assert chunking["overlap"] == OVERLAP and chunking["shared_views"] == [2, 4]  # the last one shifted back
    assert min(chunking["sim3_inlier_fraction"]) > 0.7 and chunking["computed_chunks"] == [0, 1, 2]
    assert single.report["chunking"] is None
    assert pycolmap.Reconstruction(output / "sparse" / "0").num_reg_images() == VIEWS
    assert result.report["reprojection_error_px"]["final"] <= 1.0
    gt = scene["views"].cam_from_world.double()
    chunked_poses = _poses(result)
    assert _median_rre(result.feedforward_cam_from_world, gt) < 1.5  # the chunks were composed
    assert _median_rre(chunked_poses, gt) <= 0.5
    assert _median_rre(_poses(single), gt) <= 0.5
    assert _median_rre(chunked_poses, _poses(single)) <= 0.5
    assert "3 chunks of 6 views (overlap 2, ordered)" in pipeline_cli.summary_text(result)


def test_chunked_gsa_records_guide_matching_and_the_chunk_file_resumes(scene, tmp_path):
    folder = scene["root"] / "ordered"
    h5 = tmp_path / "chunks.h5"
    oracle = ChunkOracle(scene, folder, records="ideal")
    kwargs = dict(model=oracle, attention="gsa", chunk_size=CHUNK, chunk_overlap=OVERLAP, chunk_h5=h5)
    first = run_pipeline(folder, None, **kwargs)
    records = first.report["gsa_records"]
    assert records is not None and records["layers"] == 1
    assert records["matches_in_selected_block"] > 0.5
    assert _median_rre(_poses(first), scene["views"].cam_from_world.double()) <= 0.5
    # A re-run reads every chunk, and its GSA records, from the file: no backbone call, same matches.
    calls = len(oracle.calls)
    again = run_pipeline(folder, None, **kwargs)
    assert len(oracle.calls) == calls and again.report["chunking"]["computed_chunks"] == []
    assert again.report["gsa_records"] == records
    assert again.report["counts"]["refined_matches"] == first.report["counts"]["refined_matches"]
    # The file belongs to these images: other images are refused, by name and by pixels
    with pytest.raises(ValueError, match="other images"):
        run_pipeline(scene["root"] / "shuffled", None, **kwargs)
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    with Image.open(changed / "view_03.png") as image:
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed / "view_03.png")
    with pytest.raises(ChunkFileError, match="other pixels for image view_03.png"):
        run_pipeline(changed, None, **kwargs)
    # ... and to this model
    other = ChunkOracle(scene, folder, records="ideal")
    other.name = "another oracle"
    with pytest.raises(ChunkFileError, match="another model"):
        run_pipeline(folder, None, **(kwargs | dict(model=other)))
    assert other.calls == []
    # ... and to this chunk plan: another chunk size is refused before any chunk is computed
    with pytest.raises(ChunkFileError, match="another plan"):
        run_pipeline(folder, None, **(kwargs | dict(chunk_size=CHUNK - 1)))
    assert len(oracle.calls) == calls


def _summary(views: RenderedViews, idx: list[int]):
    records = ideal_records(views.depth[idx], views.intrinsics[idx], views.cam_from_world[idx], 14, 24, 24, 8)
    return summarize_records(records, len(idx))


def test_merged_summary_maps_chunk_records_to_global_views(scene):
    views = scene["views"]
    whole = _summary(views, list(range(6)))
    merged = merge_chunk_summaries([whole], [list(range(6))], 6)
    patches = torch.arange(whole.patch_grid[0] * whole.patch_grid[1])
    blocks = torch.arange(6 * whole.blocks_per_view)
    for view in range(6):
        dense_q = whole.query_block_of_patch(view, patches)
        lazy_q = merged.query_block_of_patch(view, patches)
        assert torch.equal(merged.view_affinity[lazy_q], whole.view_affinity[dense_q])
        grid = merged.selected[lazy_q[:, None], blocks[None, :]]
        assert torch.equal(grid, whole.selected[dense_q[:, None], blocks[None, :]])
    assert torch.equal(merged.importance, whole.importance)

    chunks = [[0, 1, 2, 3], [2, 3, 4, 5]]
    parts = [_summary(views, c) for c in chunks]
    merged = merge_chunk_summaries(parts, chunks, 6)
    affinity = merged.view_affinity[merged.query_block_of_patch(0, patches)]
    assert torch.allclose(affinity.sum(1), torch.ones(len(patches)))
    assert (affinity[:, 4:] == 0).all() and (affinity[:, 1:4] > 0).any()  # view 0 shares no chunk with 4, 5
    # view 2 sits in both chunks: its affinity averages theirs, mapped to global views
    q2 = merged.query_block_of_patch(2, patches)
    a0 = parts[0].view_affinity[parts[0].query_block_of_patch(2, patches)]
    a1 = parts[1].view_affinity[parts[1].query_block_of_patch(0, patches)]
    expected = torch.zeros(len(patches), 6)
    expected[:, :4] += a0
    expected[:, 2:] += a1
    assert torch.allclose(merged.view_affinity[q2], expected / 2)
    far = merged.selected[
        merged.query_block_of_patch(0, patches)[:, None], blocks[None, 4 * merged.blocks_per_view :]
    ]
    assert not far.any() and merged.selected[q2[:, None], blocks[None]].any()
    assert torch.allclose(merged.importance[5], parts[1].importance[3])
    assert torch.allclose(merged.importance[2], (parts[0].importance[2] + parts[1].importance[0]) / 2)
    assert merge_chunk_summaries([parts[0], None], chunks, 6) is None
    with pytest.raises(ValueError, match="cover"):
        merge_chunk_summaries(parts, [[0, 1, 2, 3], [2, 3, 4, 4]], 6)


def test_unordered_collection_with_shuffled_names(scene, tmp_path):
    folder = scene["root"] / "shuffled"
    oracle = ChunkOracle(scene, folder)
    result = run_pipeline(folder, None, model=oracle, attention="dense", chunk_size=CHUNK, ordered=False)
    chunking = result.report["chunking"]
    assert chunking["grouping"] == "image thumbnails" and chunking["overlap"] == 1  # a quarter of 6
    chunks = chunking["chunks"]
    assert sorted({v for c in chunks for v in c}) == list(range(VIEWS)) and chunks != plan_chunks(VIEWS, 6, 1)
    assert result.reconstruction.num_reg_images() == VIEWS
    assert _median_rre(_poses(result), _gt_in_result_order(scene, result)) <= 0.5

    # The tiny VGGT groups by its own tokens (its poses are meaningless: only the grouping is checked).
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.preset("tiny", enable_track=False))
    output = tmp_path / "tiny"
    try:  # random weights: usually no 3D point, and the error carries the report
        report = run_pipeline(
            folder, output, model=model, attention="dense", chunk_size=CHUNK, ordered=False
        ).report
    except ReconstructionError as error:
        report = error.report
        assert not output.exists()
    assert report["chunking"]["grouping"] == "backbone tokens"


def _spread(chunks: list[list[int]], trajectory_index: torch.Tensor) -> float:
    """Mean standard deviation of the trajectory positions inside each chunk."""
    return sum(float(trajectory_index[torch.tensor(c)].float().std()) for c in chunks) / len(chunks)


@pytest.mark.parametrize("family", ["vggt", "pi3"])
def test_token_descriptors_group_neighbouring_views(scene, family):
    torch.manual_seed(0)
    if family == "vggt":
        model, size = VGGT(VGGTConfig.preset("tiny", enable_track=False)).eval(), (84, 112)
        dim = model.config.dino.embed_dim
    else:
        model, size = Pi3(Pi3Config.preset("tiny")).eval(), (112, 140)
        dim = model.config.encoder.embed_dim
    perm = torch.randperm(VIEWS, generator=torch.Generator().manual_seed(1))
    images = torch.nn.functional.interpolate(scene["views"].images[perm], size=size, mode="area")
    features = token_descriptors(model, images, batch_size=5)
    assert features.shape == (VIEWS, 5 * dim) and torch.isfinite(features).all()
    assert torch.allclose(token_descriptors(model, lambda i: images[i], VIEWS), features, atol=1e-5)
    grouped = _spread(group_views_by_similarity(features, 4, 1), perm)
    gen = torch.Generator().manual_seed(2)
    random = (
        sum(_spread(plan_chunks(VIEWS, 4, 1), torch.randperm(VIEWS, generator=gen)) for _ in range(50)) / 50
    )
    assert grouped < 0.6 * random  # neighbours along the trajectory end up in the same chunks


def test_descriptor_errors_are_clear():
    with pytest.raises(TypeError, match="no known image encoder"):
        token_descriptors(torch.nn.Linear(2, 2), torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\(S, 3, H, W\)"):
        thumbnail_descriptors(torch.rand(3, 28, 28))
    assert thumbnail_descriptors(torch.rand(4, 3, 28, 28), size=8).shape == (4, 64)


def test_bad_chunk_arguments_fail_before_any_work(scene, tmp_path, capsys):
    folder = scene["root"] / "ordered"
    oracle = ChunkOracle(scene, folder)
    depths = tmp_path / "depths.h5"  # another HDF5 file (a dataset's depth maps): never written into
    with h5py.File(depths, "w") as file:
        file.create_dataset("00000.png", data=np.zeros((2, 2), np.float32))
    (tmp_path / "notes.h5").write_text("not HDF5")
    for kwargs, message in (
        (dict(chunk_size=6, chunk_h5=depths), "an HDF5 file but not a chunk file"),
        (dict(chunk_size=6, chunk_h5=tmp_path / "notes.h5"), "exists and is not an HDF5 file"),
        (dict(chunk_size=1), "at least 2"),
        (dict(chunk_overlap=0), "at least 1"),
        (dict(chunk_size=4, chunk_overlap=4), "smaller than chunk_size"),
        (dict(chunk_size=6, chunk_h5=tmp_path / "out" / "chunks.h5"), "lies in the output folder"),
        (dict(chunk_size=6, chunk_h5=tmp_path), "is a folder"),
    ):
        with pytest.raises(ValueError, match=message):
            run_pipeline(folder, tmp_path / "out", model=oracle, **kwargs)
    assert oracle.calls == [] and not (tmp_path / "out").exists()
    code = pipeline_cli.reconstruct_command(str(folder), str(tmp_path / "out"), chunk_size=1, quiet=True)
    assert code == 1 and "chunk_size must be at least 2" in capsys.readouterr().err
    code = pipeline_cli.reconstruct_command(
        str(folder), str(tmp_path / "out"), chunk_size=6, chunk_h5=str(tmp_path / "out" / "c.h5"), quiet=True
    )
    assert code == 1 and "keep the chunk file outside it" in capsys.readouterr().err


def test_the_chunk_file_folder_is_created(scene, tmp_path):
    folder = scene["root"] / "ordered"
    h5 = tmp_path / "new" / "deeper" / "chunks.h5"
    result = run_pipeline(folder, None, model=ChunkOracle(scene, folder), chunk_size=CHUNK, chunk_h5=h5)
    assert h5.is_file() and result.report["chunking"]["computed_chunks"] == [0, 1, 2]


def test_automatic_chunk_size_uses_free_gpu_memory(monkeypatch):
    images = torch.zeros(20, 3, 28, 42)
    cpu = Backbone(lambda x: None, Preprocessing(), "m", torch.device("cpu"))
    assert pipeline_inference.resolve_chunk_size(None, cpu, images) is None  # CPU: one pass
    assert pipeline_inference.resolve_chunk_size(7, cpu, images) == 7
    seen = []
    monkeypatch.setattr(
        pipeline_inference, "default_chunk_size", lambda device, tokens: seen.append(tokens) or 16
    )
    cuda = Backbone(lambda x: None, Preprocessing(), "m", torch.device("cuda"))
    assert pipeline_inference.resolve_chunk_size(None, cuda, images) == 16
    assert seen == [2 * 3 + 5]  # patch tokens of a 28 x 42 input plus the special tokens


def test_cli_chunk_flags_reach_run_pipeline(scene, tmp_path, monkeypatch):
    seen = {}

    def fake_run_pipeline(image_dir, output, **kwargs):
        seen.update(kwargs, image_dir=image_dir, output=output)

    monkeypatch.setattr(pipeline_cli, "run_pipeline", fake_run_pipeline)
    folder = str(scene["root"] / "shuffled")
    out = str(tmp_path / "out")
    args = ["reconstruct", folder, "-o", out, "--chunk_size", "8", "--chunk_overlap", "3", "--quiet", "true"]
    main([*args, "--ordered", "false", "--chunk_h5", str(tmp_path / "c.h5")])
    assert seen["image_dir"] == folder and seen["output"] == out
    assert (seen["chunk_size"], seen["chunk_overlap"], seen["ordered"]) == (8, 3, False)
    assert seen["chunk_h5"] == str(tmp_path / "c.h5")
    seen.clear()
    main(["reconstruct", folder, "-o", out, "--quiet", "true"])
    assert (seen["chunk_size"], seen["chunk_overlap"], seen["ordered"], seen["chunk_h5"]) == (
        None,
        None,
        True,
        None,
    )


class DescriptorChunkOracle(ChunkOracle):
    """A chunk oracle whose camera head is far off (``noise_deg``) but whose match descriptors are exact,
    as the shipped default's are: its poses are only right if token poses run inside each chunk."""

    def __init__(self, scene: dict, folder, noise_deg: float = 25.0) -> None:
        super().__init__(scene, folder, noise_deg=noise_deg)
        self.descriptors = _oracle_descriptors(scene["views"])

    def __call__(self, images: torch.Tensor):
        prediction = super().__call__(images)
        prediction.extras["descriptors"] = self.descriptors[self.calls[-1]][None]
        prediction.extras["patch_size"] = 14
        return prediction


def test_chunks_are_posed_by_their_descriptors_before_they_are_composed(scene, tmp_path):
    folder = scene["root"] / "ordered"
    gt = scene["views"].cam_from_world.double()
    result = run_pipeline(
        folder, None, model=DescriptorChunkOracle(scene, folder), chunk_size=CHUNK, chunk_overlap=OVERLAP
    )
    poses = result.report["poses"]
    assert poses["source"] == "tokens" and poses["chunk_sources"] == ["tokens"] * 3
    plan = plan_chunks(VIEWS, CHUNK, OVERLAP)
    assert all(any(i in chunk and j in chunk for chunk in plan) for i, j in poses["tree_edges"])
    assert len(poses["tree_edges"]) >= VIEWS - 1  # each chunk's spanning tree, in global views
    # token poses of 14-pixel patch matches on 168x224 images are a few degrees off (about 7 deg in one pass
    # over the 12 views); the camera head is 50-65 deg off
    assert _median_rre(result.feedforward_cam_from_world, gt) < 10.0
    assert result.reconstruction.num_reg_images() == VIEWS
    assert _median_rre(_poses(result), gt) <= 0.5
    # resumed from a chunk file, the chunks keep their token poses and the report says so
    h5 = tmp_path / "chunks.h5"
    kwargs = dict(chunk_size=CHUNK, chunk_overlap=OVERLAP, chunk_h5=h5)
    first = run_pipeline(folder, None, model=DescriptorChunkOracle(scene, folder), **kwargs)
    again = run_pipeline(folder, None, model=DescriptorChunkOracle(scene, folder), **kwargs)
    assert again.report["chunking"]["computed_chunks"] == []
    assert again.report["poses"] == first.report["poses"]
    assert again.report["poses"]["chunk_sources"] == ["tokens"] * 3
    assert torch.equal(again.feedforward_cam_from_world, first.feedforward_cam_from_world)

    off = DescriptorChunkOracle(scene, folder)
    options = pipeline_reconstruct.PipelineOptions()
    options.token_poses.enabled = False
    with pytest.raises(ReconstructionError) as failed:  # from the camera head's poses (50-65 deg off)
        run_pipeline(folder, None, model=off, chunk_size=CHUNK, chunk_overlap=OVERLAP, options=options)
    assert failed.value.report["poses"]["source"] == "camera head"  # bundle adjustment cannot recover


def test_chunk_options_without_chunks_are_reported_unused(scene, tmp_path, caplog):
    folder = scene["root"] / "ordered"
    with caplog.at_level("WARNING"):
        oracle = ChunkOracle(scene, folder)
        run_pipeline(folder, None, model=oracle, chunk_overlap=2, chunk_h5=tmp_path / "c.h5", device="cpu")
    assert "chunk_h5, chunk_overlap not used: one pass over all views (no chunk_size" in caplog.text
    assert not (tmp_path / "c.h5").exists()
    caplog.clear()
    with caplog.at_level("INFO"):  # a short sequence under a video config's chunk size: as asked, INFO
        result = run_pipeline(folder, None, model=ChunkOracle(scene, folder), chunk_size=VIEWS + 4)
    [record] = [r for r in caplog.records if "not used" in r.getMessage()]
    assert record.levelname == "INFO"
    assert (
        f"chunk_size not used: one pass over all views ({VIEWS} views fit in one pass)" in record.getMessage()
    )
    assert result.report["chunking"] is None


def test_views_beyond_a_hinge_that_no_rescue_re_poses_say_so(scene, monkeypatch):
    """Views de-registered beyond a hinge (``bundle.hinged_links``) keep that reason in the report when
    neither the rescue nor the readjustment (which starts from all views and drops no hinge) brings them
    back."""
    folder = scene["root"] / "ordered"
    calls = []

    def first_pass_only(rec, tree_pairs, hinged):
        calls.append(len(calls))
        return [11, 12] if len(calls) == 1 else []  # views 10 and 11

    monkeypatch.setattr(pipeline_bundle, "beyond_contradicted_links", first_pass_only)
    options = PipelineOptions(rescue=RescueOptions(enabled=False), bundle=BundleOptions(readjust=False))
    result = run_pipeline(folder, None, model=ChunkOracle(scene, folder), attention="dense", options=options)
    unregistered = {entry["name"]: entry["why"] for entry in result.report["unregistered_images"]}
    assert set(unregistered) == {"view_10.png", "view_11.png"}
    assert all("a hinge" in why for why in unregistered.values())
    assert len(calls) == 1 and not result.report["readjustment"]["ran"]
    # with the readjustment they come back (it is kept when it registers at least as many views)
    calls.clear()
    options = PipelineOptions(rescue=RescueOptions(enabled=False))
    again = run_pipeline(folder, None, model=ChunkOracle(scene, folder), attention="dense", options=options)
    assert again.report["unregistered_images"] == [] and len(calls) == 1  # the readjustment looks for none
