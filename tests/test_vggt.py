"""VGGT backbone: output keys/shapes, official key list on the meta device, memory paths, predict()."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import pytest
import torch

from speed3r_sfm.models.heads.dpt import DPTHead, ResidualConvUnit
from speed3r_sfm.models.prediction import Prediction
from speed3r_sfm.models.vggt import VGGT, VGGTConfig, pose_encoding_to_extrinsics_intrinsics

OFFICIAL_LIST = Path(__file__).parent / "data" / "vggt_state_dict.txt"
OFFICIAL_PARAMS = 1_256_537_516


def official_keys() -> list[tuple[str, tuple[int, ...]]]:
    keys = []
    for line in OFFICIAL_LIST.read_text().splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("\t")
            if value.startswith("("):
                keys.append((name, tuple(int(d) for d in re.findall(r"\d+", value))))
    return keys


def tiny_model(**overrides) -> VGGT:
    torch.manual_seed(0)
    return VGGT(VGGTConfig.preset("tiny", **overrides)).eval()


QUERIES = torch.tensor([[10.0, 20.0], [40.5, 30.25], [83.0, 55.0]])


def test_tiny_forward_official_keys_and_shapes():
    model = tiny_model()
    images = torch.rand(1, 3, 3, 56, 84)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # all work on this thread, so its CPU time does not depend on machine load
    try:
        with torch.no_grad():
            model(images[:, :2])  # warm-up: first-call setup of the CPU kernels
            start = time.thread_time()
            out = model(images, query_points=QUERIES)
            elapsed = time.thread_time() - start
    finally:
        torch.set_num_threads(threads)
    assert elapsed < 1.0, f"tiny forward took {elapsed:.2f} s of CPU"
    expected = {
        "pose_enc": (1, 3, 9),
        "depth": (1, 3, 56, 84, 1),
        "depth_conf": (1, 3, 56, 84),
        "world_points": (1, 3, 56, 84, 3),
        "world_points_conf": (1, 3, 56, 84),
        "track": (1, 3, 3, 2),
        "vis": (1, 3, 3),
        "conf": (1, 3, 3),
        "images": (1, 3, 3, 56, 84),
    }
    assert set(out) == set(expected) | {"pose_enc_list"}
    for key, shape in expected.items():
        assert out[key].shape == shape, key
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]).all(), key
    assert len(out["pose_enc_list"]) == 4 and torch.equal(out["pose_enc_list"][-1], out["pose_enc"])
    assert torch.equal(out["images"], images)
    assert (out["depth"] > 0).all() and (out["depth_conf"] > 1).all() and (out["world_points_conf"] > 1).all()
    assert (out["pose_enc"][..., 7:] >= 0).all()  # FoV through ReLU
    assert torch.equal(out["track"][0, 0], QUERIES)  # frame 0 is the query frame
    for key in ("vis", "conf"):
        assert ((out[key] >= 0) & (out[key] <= 1)).all()


def test_batched_4d_input_and_training_mode_without_images():
    model = tiny_model(enable_track=False).train()
    out = model(torch.rand(2, 3, 28, 42))  # (S, 3, H, W) gets a batch dimension
    assert "images" not in out and "track" not in out
    assert out["depth"].shape == (1, 2, 28, 42, 1)
    assert out["pose_enc"].requires_grad


def test_single_view_and_shape_errors():
    model = tiny_model()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 3, 28, 28))["pose_enc"].shape == (1, 1, 9)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model(torch.rand(1, 2, 3, 30, 42))
    with pytest.raises(ValueError, match="images must be"):
        model(torch.rand(2, 1, 28, 42))


def test_full_size_keys_and_shapes_equal_official_list_on_meta():
    with torch.device("meta"):
        model = VGGT(VGGTConfig.preset("vggt-1b"))
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    official = official_keys()
    assert len(official) == 1797
    assert dict(ours) == dict(official)
    assert [k for k, _ in ours] == [k for k, _ in official]  # same order, so saved files match too
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS
    assert {name for name, _ in model.named_buffers()} == {
        "aggregator._resnet_mean",
        "aggregator._resnet_std",
    }


def test_heads_can_be_disabled_and_track_needs_queries():
    model = tiny_model(enable_track=False, enable_point=False)
    assert model.track_head is None and model.point_head is None
    assert not any(k.startswith(("track_head.", "point_head.")) for k in model.state_dict())
    with torch.no_grad():
        out = model(torch.rand(1, 2, 3, 28, 42), query_points=QUERIES[:1] / 2)
    assert (
        {"pose_enc", "depth", "depth_conf"} <= set(out) and "world_points" not in out and "track" not in out
    )


def test_aggregator_keeps_only_the_layers_the_heads_read():
    model = tiny_model(depth=6, dpt_layers=(1, 2, 4, 5))
    assert model.layers_needed() == {1, 2, 4, 5}
    assert tiny_model(
        depth=6, dpt_layers=(0, 1, 2, 3), enable_depth=False, enable_point=False
    ).layers_needed() == {5}
    with torch.no_grad():
        outputs, start = model.aggregator(torch.rand(1, 2, 3, 28, 42), keep={1, -1})
    assert start == 5
    assert [o is not None for o in outputs] == [False, True, False, False, False, True]
    assert outputs[1].shape == (1, 2, 5 + 2 * 3, 128)


def test_inference_chunking_gives_the_same_outputs():
    images = torch.rand(1, 3, 3, 28, 42)
    plain = tiny_model(aggregator_chunk_frames=None, global_ffn_chunk_tokens=None, frames_chunk_size=None)
    chunked = tiny_model(aggregator_chunk_frames=2, global_ffn_chunk_tokens=7, frames_chunk_size=2)
    with torch.no_grad():
        a = plain(images, query_points=QUERIES / 2)
        b = chunked(images, query_points=QUERIES / 2)
        c, _ = chunked.aggregator(images)
    with torch.enable_grad():
        d, _ = plain.aggregator(images)  # autograd path: no chunking, no in-place updates
    for key in (
        "pose_enc",
        "depth",
        "depth_conf",
        "world_points",
        "world_points_conf",
        "track",
        "vis",
        "conf",
    ):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    for x, y in zip(c, d, strict=True):
        torch.testing.assert_close(x, y.detach(), rtol=1e-4, atol=1e-5)


def test_bfloat16_intermediates_and_autocast():
    model = tiny_model(intermediate_dtype="bfloat16", enable_track=False)
    images = torch.rand(1, 2, 3, 28, 28)
    with torch.no_grad():
        outputs, _ = model.aggregator(images)
        assert all(o.dtype == torch.bfloat16 for o in outputs)
        reference = tiny_model(enable_track=False)(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
    assert out["depth"].dtype == torch.float32 and out["pose_enc"].dtype == torch.float32  # heads in fp32
    torch.testing.assert_close(out["depth"], reference["depth"], rtol=0.1, atol=0.05)
    with pytest.raises(ValueError, match="not a torch floating dtype"):
        VGGTConfig.preset("tiny", intermediate_dtype="int8")


def test_gradient_checkpointing_matches_plain_backward():
    images = torch.rand(1, 2, 3, 28, 28)
    grads = []
    for enabled in (False, True):
        model = tiny_model(gradient_checkpointing=enabled, enable_track=False, enable_point=False).train()
        assert model.gradient_checkpointing is enabled
        out = model(images)
        (out["depth"].mean() + out["pose_enc"].square().mean()).backward()
        grads.append(model.aggregator.global_blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_global_attention_sees_every_view_with_the_same_position_grid():
    model = tiny_model()
    layouts, positions = [], []

    def capture(module, args):
        positions.append(args[1])
        layouts.append(args[2])

    model.aggregator.global_blocks[0].register_forward_pre_hook(capture)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 3, 28, 42), return_attention=True)
    assert out["attention"] == []  # dense attention records nothing
    layout = layouts[0]
    assert (layout.num_views, layout.tokens_per_view, layout.num_special, layout.patch_grid) == (
        3,
        11,
        5,
        (2, 3),
    )
    per_view = positions[0].reshape(3, 11, 2)
    assert torch.equal(per_view[0], per_view[2])
    expected = [[0, 0]] * 5 + [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]
    assert per_view[1].tolist() == expected


def test_reference_frame_uses_its_own_special_tokens():
    model = tiny_model()
    with torch.no_grad():
        model.aggregator.camera_token[:, 0] = 5.0
        model.aggregator.camera_token[:, 1] = -5.0
    tokens = model.aggregator._special_tokens(batch=2, frames=3).reshape(2, 3, 5, -1)
    assert (tokens[:, 0, 0] == 5).all() and (tokens[:, 1:, 0] == -5).all()
    assert torch.equal(tokens[:, 1:, 1:], model.aggregator.register_token[0, 1].expand(2, 2, -1, -1))


def test_predict_returns_prediction_consistent_with_forward():
    model = tiny_model(enable_track=False, cpu_bf16_heads=False, cpu_bf16_aggregator=False)  # as forward
    images = torch.rand(1, 2, 3, 28, 42)
    prediction = model.predict(images)
    with torch.no_grad():
        out = model(images)
    assert isinstance(prediction, Prediction)
    cam_from_world, intrinsics = pose_encoding_to_extrinsics_intrinsics(out["pose_enc"], (28, 42))
    torch.testing.assert_close(prediction.cam_from_world, cam_from_world)
    # the focal lengths are upstream's; the principal point is the image centre in the Prediction's
    # integer-centre convention, ((W - 1)/2, (H - 1)/2) as pi3's (upstream's (W/2, H/2) is half a pixel off)
    torch.testing.assert_close(prediction.intrinsics[..., :2, :2], intrinsics[..., :2, :2])
    principal_point = prediction.intrinsics[..., :2, 2]
    assert (principal_point == torch.tensor([20.5, 13.5])).all()
    assert prediction.depth.shape == (1, 2, 28, 42) and prediction.world_points.shape == (1, 2, 28, 42, 3)
    torch.testing.assert_close(prediction.depth, out["depth"][..., 0])
    torch.testing.assert_close(prediction.world_points_conf, out["world_points_conf"])
    assert prediction.attention is None and prediction.image_size == (28, 42)


def test_feature_tracker_tracks_points_of_any_view():
    model = tiny_model(enable_point=False, cpu_bf16_aggregator=False)  # float32, as forward
    images = torch.rand(1, 4, 3, 56, 84)
    with torch.no_grad():
        own = model(images, query_points=QUERIES)
    prediction = model.predict(images, with_tracker=True)
    tracker = prediction.extras["tracker"]
    assert tracker.num_views == 4 and "tracker" not in model.predict(images).extras
    # query view 0 is the model's own track head, exactly
    tracks, vis, conf = tracker(0, QUERIES)
    assert tracks.shape == (4, 3, 2) and vis.shape == conf.shape == (4, 3)
    assert torch.allclose(tracks, own["track"][0], atol=1e-5)
    assert torch.allclose(vis, own["vis"][0], atol=1e-5) and torch.allclose(conf, own["conf"][0], atol=1e-5)
    # another query view: it is the tracker's first frame, outputs come back in the views' order. The
    # tracker does not depend on the order of the other frames (no temporal position), so the reference
    # reorders them differently: query view, then the others backwards.
    features = model(images, with_track_features=True)["track_features"]
    for view in (1, 3):
        tracks, vis, conf = tracker(view, QUERIES)
        assert torch.equal(tracks[view], QUERIES)  # the query frame keeps its points
        order = [view] + [f for f in reversed(range(4)) if f != view]
        with torch.no_grad():
            ref_tracks, ref_vis, ref_conf = model.track_head.tracker(QUERIES[None], features[:, order], 4)
        for position, frame in enumerate(order):
            assert torch.allclose(tracks[frame], ref_tracks[-1][0, position], atol=1e-4)
            assert torch.allclose(vis[frame], ref_vis[0, position], atol=1e-5)
            assert torch.allclose(conf[frame], ref_conf[0, position], atol=1e-5)
    # several views per call: the same as one call each where no padding is needed
    many = tracker.track_views([(1, QUERIES, None), (3, QUERIES, None), (2, QUERIES[:2], None)])
    for (tracks, vis, conf), view in zip(many[:2], (1, 3), strict=True):
        single = tracker(view, QUERIES)
        assert torch.allclose(tracks, single[0], atol=1e-4) and torch.allclose(vis, single[1], atol=1e-5)
        assert torch.allclose(conf, single[2], atol=1e-5)
    assert many[2][0].shape == (4, 2, 2) and torch.equal(many[2][0][2], QUERIES[:2])
    # only through some target views: the tracker on those frames alone; the others are not answered
    tracks, vis, _ = tracker(2, QUERIES, [0, 3])
    with torch.no_grad():
        ref_tracks, ref_vis, _ = model.track_head.tracker(QUERIES[None], features[:, [2, 0, 3]], 4)
    assert torch.allclose(tracks[[2, 0, 3]], ref_tracks[-1][0], atol=1e-4)
    assert torch.allclose(vis[[2, 0, 3]], ref_vis[0], atol=1e-5)
    assert torch.isnan(tracks[1]).all() and (vis[1] == 0).all()
    batched = tracker.track_views([(2, QUERIES, [0, 3]), (1, QUERIES, [3, 2, 3])])
    assert torch.allclose(batched[0][0], tracks, atol=1e-4, equal_nan=True)
    with pytest.raises(IndexError, match="targets"):
        tracker(2, QUERIES, [7])
    # chunks of query points (the virtual tracks mix the points of one call, so values may differ)
    chunked = dataclasses.replace(tracker, chunk=2)
    tracks, vis, _ = chunked(2, QUERIES)
    assert tracks.shape == (4, 3, 2) and torch.equal(tracks[2], QUERIES) and vis.shape == (4, 3)
    assert chunked(2, torch.zeros(0, 2))[0].shape == (4, 0, 2)
    with pytest.raises(IndexError, match="query_frame 4"):
        tracker(4, QUERIES)
    without_head = tiny_model(enable_track=False).predict(images, with_tracker=True)
    assert "tracker" not in without_head.extras


def test_predict_without_point_head_unprojects_depth():
    model = tiny_model(enable_point=False, enable_track=False)
    with torch.no_grad():  # a fixed camera: each of the 4 refinement steps adds the bias
        model.camera_head.pose_branch.fc2.weight.zero_()
        encoding = torch.tensor([0.1, -0.2, 0.3, 0.1, 0.2, -0.1, 0.9, 1.0, 1.2])
        model.camera_head.pose_branch.fc2.bias.copy_(encoding / 4)
    prediction = model.predict(torch.rand(1, 2, 3, 28, 42))
    torch.testing.assert_close(prediction.extras["pose_enc"][0, 1], encoding)
    rotation, translation = prediction.cam_from_world[..., :3], prediction.cam_from_world[..., 3]
    camera = (
        torch.einsum("bsij,bshwj->bshwi", rotation, prediction.world_points) + translation[:, :, None, None]
    )
    torch.testing.assert_close(camera[..., 2], prediction.depth, rtol=1e-4, atol=1e-4)
    pixels = torch.einsum("bsij,bshwj->bshwi", prediction.intrinsics, camera)
    u = pixels[..., 0] / pixels[..., 2]
    torch.testing.assert_close(u[0, 0, 3], torch.arange(42.0), rtol=1e-4, atol=1e-3)  # integer pixel centres
    with pytest.raises(ValueError, match="camera head"):
        tiny_model(enable_camera=False).predict(torch.rand(1, 2, 3, 28, 42))


def test_residual_conv_unit_skip_adds_relu_of_input():
    unit = ResidualConvUnit(4)
    torch.nn.init.zeros_(unit.conv2.weight)
    torch.nn.init.zeros_(unit.conv2.bias)
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(unit(x), torch.relu(x))


def test_dpt_pos_embed_matches_formula():
    x = torch.zeros(1, 8, 3, 4)
    out = DPTHead._add_pos_embed(x, aspect_ratio=2.0)
    span_x, span_y = 2 / 5**0.5, 1 / 5**0.5
    u = torch.linspace(-span_x * 3 / 4, span_x * 3 / 4, 4, dtype=torch.float64)[2]
    v = torch.linspace(-span_y * 2 / 3, span_y * 2 / 3, 3, dtype=torch.float64)[1]
    omega = 1.0 / 100.0 ** torch.tensor([0.0, 0.5], dtype=torch.float64)
    expected = torch.cat([(u * omega).sin(), (u * omega).cos(), (v * omega).sin(), (v * omega).cos()]) * 0.1
    torch.testing.assert_close(out[0, :, 1, 2].double(), expected, rtol=0, atol=1e-7)


def test_presets_and_config_round_trip():
    config = VGGTConfig.preset("tiny", enable_track=False)
    assert VGGTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown VGGT preset"):
        VGGTConfig.preset("vggt-2b")
    with pytest.raises(TypeError, match="unknown VGGTConfig fields"):
        VGGTConfig.preset("tiny", not_a_field=1)
    with pytest.raises(ValueError, match="out of range"):
        VGGTConfig.preset("tiny", dpt_layers=(0, 1, 2, 9))
