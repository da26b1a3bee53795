"""Loop closure of ordered chunks: detection, the pose graph (against exact and hand-checked cases),
verification, and the correction of an injected drift with an oracle backbone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import test_chunked_pipeline as chunked  # tests/ is on sys.path (pytest's rootdir import)
import torch
from PIL import Image

from speed3r_sfm.data.colmap_dataset import to_uint8_image
from speed3r_sfm.data.synthetic import make_cameras, make_scene, render_views
from speed3r_sfm.eval.metrics import relative_pose_errors
from speed3r_sfm.geometry import apply_sim3, compose_sim3, invert_sim3, sim3_cam_from_world
from speed3r_sfm.pipeline.chunked import predict_chunked
from speed3r_sfm.pipeline.chunking import plan_chunks
from speed3r_sfm.pipeline.cli import summary_text
from speed3r_sfm.pipeline.inputs import find_images, load_views
from speed3r_sfm.pipeline.loop_closure import (
    Edge,
    Loop,
    LoopOptions,
    close_loops,
    find_loops,
    loop_views,
    placing_chunks,
    rotation_deg,
    solve_corrections,
)
from speed3r_sfm.pipeline.reconstruct import PipelineOptions, run_pipeline

F64 = torch.float64
CHUNK, OVERLAP, VIEWS, ChunkOracle = chunked.CHUNK, chunked.OVERLAP, chunked.VIEWS, chunked.ChunkOracle
scene = chunked.scene  # the 12-view forward scene, its images in order (a module fixture)


def _rotation(axis: list[float], degrees: float) -> torch.Tensor:
    """Rodrigues' formula, written out (the reference for the solver)."""
    k = torch.tensor(axis, dtype=F64)
    k = k / k.norm()
    cross = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=F64)
    angle = math.radians(degrees)
    return torch.eye(3, dtype=F64) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def _sim3(scale: float, axis: list[float], degrees: float, shift: list[float]):
    return torch.tensor(scale, dtype=F64), _rotation(axis, degrees), torch.tensor(shift, dtype=F64)


def _identity():
    return _sim3(1.0, [0, 0, 1], 0.0, [0, 0, 0])


def _close(a, b, tol=1e-9) -> bool:
    return all(torch.allclose(x.double(), y.double(), atol=tol, rtol=0) for x, y in zip(a, b, strict=True))


def test_pose_graph_recovers_consistent_corrections_exactly():
    truth = [
        _identity(),
        _sim3(1.3, [1, 2, 0], 20.0, [0.5, -1.0, 2.0]),
        _sim3(0.7, [0, 1, 1], -35.0, [3.0, 0.0, -1.0]),
        _sim3(2.0, [1, 0, 0], 60.0, [-2.0, 1.0, 0.5]),
    ]
    pairs = [(0, 1), (1, 2), (2, 3), (0, 2), (1, 3), (0, 3)]
    anchor = torch.tensor([0.3, -2.0, 5.0], dtype=F64)  # where an edge is measured: no matter when exact
    edges = [Edge(a, b, compose_sim3(invert_sim3(truth[a]), truth[b]), 1.0 + a, anchor * a) for a, b in pairs]
    for found, expected in zip(solve_corrections(4, edges), truth, strict=True):
        assert _close(found, expected)
    # one node: the identity
    assert _close(solve_corrections(1, [])[0], _identity())


def test_pose_graph_spreads_a_loop_error_over_the_chain():
    """A chain 0-1-2 that says "no change" and a loop 0-2 that says "turn by 12 degrees about z, scale by
    1.21": with equal weights the chain and the loop share the disagreement, by hand 8 degrees and
    1.21**(2/3) at node 2 and half that at node 1 (least squares of l1, l2 - l1, l2 - 12 for angles about one
    axis: l1 = 4, l2 = 8; chordal rotations split angles almost, not exactly, so)."""
    loop = _sim3(1.21, [0, 0, 1], 12.0, [0, 0, 0])
    edges = [Edge(0, 1, _identity()), Edge(1, 2, _identity()), Edge(0, 2, loop)]
    x = solve_corrections(3, edges)
    assert rotation_deg(x[1][1]) == pytest.approx(4.0, abs=0.02)
    assert rotation_deg(x[2][1]) == pytest.approx(8.0, abs=0.02)
    assert float(x[1][0]) == pytest.approx(1.21 ** (1 / 3)) and float(x[2][0]) == pytest.approx(
        1.21 ** (2 / 3)
    )
    # a heavy loop is (almost) met, the chain absorbs the rest
    heavy = solve_corrections(3, [*edges[:2], Edge(0, 2, loop, 1e6)])
    assert rotation_deg(heavy[2][1]) == pytest.approx(12.0, abs=1e-3)


def _turn_about(point: torch.Tensor, degrees: float):
    """The rigid motion turning by ``degrees`` about the vertical line through ``point``."""
    rot = _rotation([0, 0, 1], degrees)
    return torch.tensor(1.0, dtype=F64), rot, point - rot @ point


def test_corrections_do_not_tear_chunks_apart_where_they_meet():
    """Eight chunks around a 10 m circle, each composed 2 deg off the one before about their junction (the
    drift of chunk alignment), and a loop from the last back to the first that measures the whole drift:
    measured at the junctions, the corrections keep neighbouring chunks together there; measured at the world
    origin, 10 m away, the same rotations would move them apart by decimetres."""
    n, radius = 8, 10.0
    angles = torch.arange(n, dtype=F64) * (2 * math.pi / n)
    junctions = torch.stack([radius * angles.cos(), radius * angles.sin(), torch.zeros(n, dtype=F64)], -1)
    drift = [_identity()]  # composed = drift_k(true) for the content of chunk k
    for k in range(1, n):
        drift.append(compose_sim3(drift[-1], _turn_about(junctions[k], 2.0)))
    composed_junction = [apply_sim3(*drift[k], junctions[k]) for k in range(n)]  # where the chunks meet
    loop = invert_sim3(drift[-1])  # X_0^-1 X_7: chunk 7's composed place back to where chunk 0 has it
    place = apply_sim3(*drift[-1], junctions[-1] + torch.tensor([0.0, -2.0, 0.0], dtype=F64))

    def tears(anchored: bool) -> float:
        edges = [Edge(k - 1, k, _identity(), 1.0, composed_junction[k]) for k in range(1, n)]
        edges.append(Edge(0, n - 1, loop, 10.0, place))
        if not anchored:
            edges = [Edge(e.a, e.b, e.relative, e.weight) for e in edges]
        x = solve_corrections(n, edges)
        gaps = [
            apply_sim3(*x[k - 1], composed_junction[k]) - apply_sim3(*x[k], composed_junction[k])
            for k in range(1, n)
        ]
        return max(float(gap.norm()) for gap in gaps)

    assert tears(anchored=True) < 0.02 and tears(anchored=False) > 0.1


def test_placing_chunks_is_the_first_chunk_of_each_view():
    plan = plan_chunks(12, 6, 2)  # [0..5], [4..9], [6..11]
    assert placing_chunks(plan, 12).tolist() == [0] * 6 + [1] * 4 + [2] * 2
    with pytest.raises(ValueError, match="view 3 is in no chunk"):
        placing_chunks([[0, 1, 2], [4, 5]], 6)


def _descriptors(num_views: int, twins: list[tuple[int, int]], seed: int = 0) -> torch.Tensor:
    """Neighbours along the sequence are similar (a random walk); each pair in ``twins`` shares a
    descriptor, as a place seen twice."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(num_views, 64, generator=g, dtype=F64)
    walk = torch.cumsum(steps, dim=0)
    for i, j in twins:
        walk[j] = walk[i]
    return walk


def test_loops_are_found_between_chunks_that_never_met():
    plan = plan_chunks(40, 10, 4)  # chunks of 10 starting every 6 views: 0, 6, 12, 18, 24, 30
    found = find_loops(_descriptors(40, [(2, 37), (8, 27)]), plan, reference_distance=1, max_loops=10)
    pairs = {(loop.i, loop.j) for loop in found}
    assert (2, 37) in pairs and (8, 27) in pairs
    for loop in found:
        assert not any(loop.i in chunk and loop.j in chunk for chunk in plan)  # never in one chunk
    assert len({(loop.chunk_i, loop.chunk_j) for loop in found}) == len(found)  # one per pair of chunks
    assert [loop.similarity for loop in found] == sorted((loop.similarity for loop in found), reverse=True)
    assert find_loops(_descriptors(40, [(2, 37), (8, 27)]), plan, 1, max_loops=1)[
        0
    ].similarity == pytest.approx(1.0)
    # a sequence without a return: nothing as similar as consecutive views
    assert find_loops(_descriptors(40, []), plan, reference_distance=1, max_loops=10) == []
    # views closer than min_gap (default: a chunk) are neighbours, not a return
    near = _descriptors(40, [(2, 13)])  # 11 views apart, never in one chunk
    assert (2, 13) in {(loop.i, loop.j) for loop in find_loops(near, plan, 1, 10)}
    assert (2, 13) not in {(loop.i, loop.j) for loop in find_loops(near, plan, 1, 10, min_gap=12)}


def test_loop_windows_stay_within_the_views_of_their_chunk():
    placed = placing_chunks(plan_chunks(40, 10, 4), 40)  # 0-9, 10-15, 16-21, 22-27, 28-33, 34-39
    assert loop_views(Loop(1, 31, 0, 4, 1.0), placed, 4) == ([0, 1, 2, 3], [29, 30, 31, 32])
    assert loop_views(Loop(11, 39, 1, 5, 1.0), placed, 4) == ([10, 11, 12, 13], [36, 37, 38, 39])
    assert loop_views(Loop(12, 26, 1, 3, 1.0), placed, 8) == (list(range(10, 16)), list(range(22, 28)))


def test_loop_options_are_checked():
    with pytest.raises(ValueError, match="LoopOptions.window must be at least 1"):
        LoopOptions(window=0)
    for name in (
        "window",
        "max_loops",
        "reference_distance",
        "revisit_links",
    ):  # 2.0 from a config file crashed after the model
        with pytest.raises(TypeError, match=f"LoopOptions.{name} must be an integer, got 2.0"):
            LoopOptions(**{name: 2.0})
    assert LoopOptions(window=np.int64(3)).window == 3
    with pytest.raises(ValueError, match="LoopOptions.revisit_links must be at least 1"):
        LoopOptions(revisit_links=0)
    with pytest.raises(TypeError, match="LoopOptions.enabled must be True or False, got 'false'"):
        LoopOptions(enabled="false")
    with pytest.raises(ValueError, match="min_inlier_fraction"):
        LoopOptions(min_inlier_fraction=1.5)
    with pytest.raises(ValueError, match="loop_weight must be positive"):
        LoopOptions(loop_weight=0.0)


def _composed(scene, folder, oracle):
    paths = find_images(folder)
    _, model_images, _ = load_views(paths, folder, oracle.preprocessing)
    plan = plan_chunks(VIEWS, CHUNK, OVERLAP)

    def load(indices):
        return model_images[indices]

    prediction = predict_chunked(
        oracle, load, CHUNK, OVERLAP, num_views=VIEWS, chunks=plan, keep_maps=("depth", "depth_conf")
    )
    return prediction, load, plan


def _drift(prediction, views: list[int], sim3) -> None:
    """Move ``views`` as a drifted composition would have placed them."""
    cams = prediction.cam_from_world[0]
    cams[views] = sim3_cam_from_world(*sim3, cams[views].double()).float()
    prediction.depth[0, views] *= float(sim3[0])


def test_an_injected_drift_is_corrected_by_a_verified_loop(scene):
    folder = scene["root"] / "ordered"
    oracle = ChunkOracle(scene, folder, noise_deg=0.0)
    prediction, load, plan = _composed(scene, folder, oracle)
    # drift growing along the sequence to 8 degrees (and 10 % of scale) at the end
    for v in range(VIEWS):
        share = v / (VIEWS - 1)
        _drift(prediction, [v], _sim3(1 + 0.1 * share, [0, 1, 0], 8.0 * share, [0.05 * share, 0.0, 0.0]))
    truth = scene["views"].cam_from_world.double()
    before = relative_pose_errors(prediction.cam_from_world[0].double(), truth)[0]
    # view 1 and view 11 look alike (a return): one loop between chunks 0 and 2
    descriptors = _descriptors(VIEWS, [(1, 11)])
    calls = len(oracle.calls)
    sim3_before = prediction.extras["chunk_sim3"]
    closure = close_loops(prediction, oracle, load, descriptors, plan, LoopOptions(window=3))
    after = relative_pose_errors(prediction.cam_from_world[0].double(), truth)[0]
    loop = closure.report["loops"][0]
    assert loop["views"] == [1, 11] and loop["chunks"] == [0, 2] and loop["kept"]
    # what the drift did between the places (about 0.7 deg at views 0-2, 7.6 at views 10-11)
    assert loop["correction_deg"] == pytest.approx(6.9, abs=1.0)
    assert closure.loop_chunks == [[0, 1, 2, 10, 11]] and oracle.calls[calls:] == closure.loop_chunks
    # the ends of the sequence are brought together; what the drift did inside chunk 0 (held fixed) stays
    assert float(before.max()) > 7.5 and float(after.max()) < 2.5
    assert float(after.median()) < 0.5 * float(before.median())
    assert closure.report["chunk_correction_deg"][0] == 0.0
    # each chunk's Sim(3) (for load_view_maps) moved with its correction
    for k, (old, new) in enumerate(zip(sim3_before, prediction.extras["chunk_sim3"], strict=True)):
        turned = rotation_deg(new[1] @ old[1].T)
        assert turned == pytest.approx(closure.report["chunk_correction_deg"][k], abs=1e-6)


class _Reporting:
    """A backbone that reports a token-pose tree over a 3 + 2-view loop chunk (views 0-2 one place, 3-4 the
    other) that joins the places by ``support`` inlier matches, as :func:`posed_by_tokens` would: through one
    edge (2, 3), or with ``revisit`` through three, (0, 3), (2, 3) and (1, 4)."""

    def __init__(self, oracle, support: float, revisit: bool = False) -> None:
        self.oracle, self.support, self.revisit = oracle, support, revisit

    def __call__(self, images):
        prediction = self.oracle(images)
        if self.revisit:
            edges = [[0, 1], [0, 3], [2, 3], [1, 4]]
            support = [100.0, self.support, self.support, self.support]
        else:
            edges, support = [[0, 1], [1, 2], [2, 3], [3, 4]], [100.0, 100.0, self.support, 100.0]
        prediction.extras["chunk_report"] = {"source": "tokens", "tree_edges": edges, "tree_support": support}
        return prediction


def test_a_loop_is_verified_by_the_descriptor_matches_between_its_places(scene):
    folder = scene["root"] / "ordered"
    oracle = ChunkOracle(scene, folder, noise_deg=0.0)
    prediction, load, plan = _composed(scene, folder, oracle)
    descriptors = _descriptors(VIEWS, [(1, 11)])
    options = LoopOptions(window=3, min_support=20.0)
    weak = close_loops(prediction, _Reporting(oracle, 8.0), load, descriptors, plan, options)
    assert weak.loop_chunks == [[0, 1, 2, 10, 11]]  # places of 3 and 2 views: edge (2, 3) links them
    assert not weak.report["loops"][0]["kept"]
    assert weak.report["loops"][0]["why"] == "the two places share too few descriptor matches"
    strong = close_loops(prediction, _Reporting(oracle, 40.0), load, descriptors, plan, options)
    assert strong.report["loops"][0]["kept"]
    # a place that does not align with the composed world (inlier fraction bar above what any fit reaches)
    strict = close_loops(
        prediction, oracle, load, descriptors, plan, LoopOptions(window=3, min_inlier_fraction=1.0)
    )
    assert strict.report["loops"][0]["why"] == "a window does not align with the composed world"


def test_a_loop_whose_places_disagree_is_not_used(scene):
    folder = scene["root"] / "ordered"
    oracle = ChunkOracle(scene, folder, noise_deg=0.0)
    prediction, load, plan = _composed(scene, folder, oracle)
    before = prediction.cam_from_world.clone()
    descriptors = _descriptors(VIEWS, [(1, 11)])
    # the injected drift is larger than a plausible one
    last = (placing_chunks(plan, VIEWS) == 2).nonzero()[:, 0].tolist()
    _drift(prediction, last, _sim3(1.0, [1, 0, 0], 40.0, [0.0, 0.0, 0.0]))
    moved = prediction.cam_from_world.clone()
    closure = close_loops(
        prediction, oracle, load, descriptors, plan, LoopOptions(window=3, max_correction_deg=20.0)
    )
    loop = closure.report["loops"][0]
    assert not loop["kept"] and "no plausible drift" in loop["why"]
    assert torch.equal(prediction.cam_from_world, moved) and not torch.equal(moved, before)
    assert "chunk_correction_deg" not in closure.report
    # one descriptor link between the places does not vouch for a large correction either
    options = LoopOptions(window=3, max_correction_deg=20.0)
    linked = close_loops(prediction, _Reporting(oracle, 40.0), load, descriptors, plan, options)
    loop = linked.report["loops"][0]
    assert not loop["kept"] and loop["crossing_links"] == 1 and "links by 1 pair(s)" in loop["why"]
    assert torch.equal(prediction.cam_from_world, moved)
    revisit = _Reporting(oracle, 40.0, revisit=True)
    strict = LoopOptions(window=3, max_correction_deg=20.0, revisit_links=4)
    loop = close_loops(prediction, revisit, load, descriptors, plan, strict).report["loops"][0]
    assert not loop["kept"] and loop["crossing_links"] == 3 and "links by 3 pair(s)" in loop["why"]
    weak = close_loops(prediction, _Reporting(oracle, 8.0, revisit=True), load, descriptors, plan, options)
    loop = weak.report["loops"][0]  # three links, none with min_support matches
    assert loop["crossing_links"] == 0 and loop["why"] == "the two places share too few descriptor matches"
    assert torch.equal(prediction.cam_from_world, moved)
    # ... but a place seen twice (each view of one pass pairs with one of the other) does: the drift is real
    seen_twice = close_loops(prediction, revisit, load, descriptors, plan, options)
    loop = seen_twice.report["loops"][0]
    assert loop["kept"] and loop["crossing_links"] == 3
    assert loop["correction_deg"] == pytest.approx(40.0, abs=2.0)
    assert not torch.equal(prediction.cam_from_world, moved)
    # a disabled closure runs nothing
    calls = len(oracle.calls)
    off = close_loops(prediction, oracle, load, descriptors, plan, LoopOptions(enabled=False))
    assert off.report["why"] == "disabled" and len(oracle.calls) == calls


def _yaw(degrees: float) -> torch.Tensor:
    return _rotation([0, 1, 0], degrees).float()


@pytest.fixture(scope="module")
def returning(tmp_path_factory):
    """16 views: the 12 of a forward trajectory, then the places of views 0-3 again (turned by 3 degrees,
    moved by 3 cm): a sequence that returns to its start after three chunks of 6."""
    world = make_scene(chunked.SEED)
    k, poses = make_cameras(world, 12, chunked.HEIGHT, chunked.WIDTH, trajectory="forward")
    again = torch.cat([_yaw(3.0) @ poses[:4, :, :3], (_yaw(3.0) @ poses[:4, :, 3:]) + 0.03], dim=-1)
    k, poses = torch.cat([k, k[:4]]), torch.cat([poses, again])
    views = render_views(world, k, poses, chunked.HEIGHT, chunked.WIDTH)
    root = tmp_path_factory.mktemp("returning")
    names = [f"view_{i:02d}.png" for i in range(16)]
    (root / "ordered").mkdir()
    for i, name in enumerate(names):
        Image.fromarray(to_uint8_image(views.images[i])).save(root / "ordered" / name)
    return {"views": views, "root": root, "trajectory_index": {name: i for i, name in enumerate(names)}}


@pytest.mark.parametrize("attention", ["dense", "gsa"])
def test_a_returning_sequence_is_matched_across_its_loop(returning, attention):
    folder = returning["root"] / "ordered"
    oracle = ChunkOracle(returning, folder, records="ideal" if attention == "gsa" else "none")
    result = run_pipeline(
        folder, None, model=oracle, attention=attention, chunk_size=CHUNK, chunk_overlap=OVERLAP
    )
    plan = plan_chunks(16, CHUNK, OVERLAP)
    closure = result.report["chunking"]["loop_closure"]
    kept = [loop for loop in closure["loops"] if loop["kept"]]
    assert any(i < 4 and j >= 12 for i, j in (loop["views"] for loop in kept))  # the return to the start
    assert oracle.calls[: len(plan)] == plan and len(oracle.calls) == len(plan) + len(closure["loops"])
    assert oracle.calls[len(plan) :] == [loop["loop_chunk"] for loop in closure["loops"]]
    moved = max(closure["chunk_correction_deg"])
    assert (
        f"loop closure: {len(kept)} of {closure['candidates']} candidate loop(s) closed, chunks turned by "
        f"up to {moved:.1f} deg" in summary_text(result)
    )
    assert all(loop["correction_deg"] < 5.0 for loop in kept)  # the oracle (0.5 deg pose noise) hardly drifts
    rec = result.reconstruction
    assert rec.num_reg_images() == 16
    index = {image_id: returning["trajectory_index"][image.name] for image_id, image in rec.images.items()}
    across = sum(
        1
        for point in rec.points3D.values()
        if {index[e.image_id] for e in point.track.elements} & {0, 1, 2, 3}
        and {index[e.image_id] for e in point.track.elements} & {12, 13, 14, 15}
    )
    assert across > 50  # points seen on both passes: the loop is in the bundle adjustment
    truth = returning["views"].cam_from_world.double()[[index[i] for i in sorted(index)]]
    poses = torch.stack([torch.from_numpy(rec.image(i).cam_from_world().matrix()) for i in sorted(index)])
    assert float(relative_pose_errors(poses, truth)[0].median()) <= 0.5
    # without loop closure no loop chunk runs
    off = ChunkOracle(returning, folder)
    options = PipelineOptions(loops=LoopOptions(enabled=False))
    report = run_pipeline(
        folder, None, model=off, attention="dense", chunk_size=CHUNK, chunk_overlap=OVERLAP, options=options
    ).report
    assert off.calls == plan and report["chunking"]["loop_closure"] == {
        "candidates": 0,
        "loops": [],
        "why": "disabled",
    }


def test_loop_chunks_resume_from_the_chunk_file(returning, tmp_path):
    folder = returning["root"] / "ordered"
    oracle = ChunkOracle(returning, folder, records="ideal")
    kwargs = dict(
        model=oracle, attention="gsa", chunk_size=CHUNK, chunk_overlap=OVERLAP, chunk_h5=tmp_path / "c.h5"
    )
    first = run_pipeline(folder, None, **kwargs).report
    calls = len(oracle.calls)
    assert calls > len(plan_chunks(16, CHUNK, OVERLAP))  # loop chunks ran
    again = run_pipeline(folder, None, **kwargs).report
    assert len(oracle.calls) == calls  # every chunk and loop chunk read back
    closure, closed_again = first["chunking"]["loop_closure"], again["chunking"]["loop_closure"]
    assert closed_again["loops"] == closure["loops"]
    # the pose graph's least squares may differ in the last bits from run to run (threaded BLAS)
    assert closed_again["chunk_correction_deg"] == pytest.approx(closure["chunk_correction_deg"], abs=1e-9)
    assert again["gsa_records"] == first["gsa_records"]
    assert again["counts"]["refined_matches"] == first["counts"]["refined_matches"]
