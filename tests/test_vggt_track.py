"""Track head building blocks: sampling conventions, correlation window, embeddings, update transformer."""

from __future__ import annotations

import math

import torch

from speed3r_sfm.models.heads.embeddings import pixel_sincos_table
from speed3r_sfm.models.heads.tracker import (
    BaseTrackerPredictor,
    CorrelationPyramid,
    bilinear_sample,
    motion_embedding,
    sample_at_points,
)
from speed3r_sfm.models.heads.update_former import AttnBlock, EfficientUpdateFormer


def test_bilinear_sample_uses_integer_pixel_centres():
    maps = torch.arange(2 * 4 * 5, dtype=torch.float64).reshape(2, 4, 5)[None].repeat(1, 1, 1, 1)
    maps = maps.reshape(1, 2, 4, 5)
    points = torch.tensor([[[0.0, 0.0], [4.0, 3.0], [2.0, 1.0], [1.5, 2.25]]], dtype=torch.float64)
    out = bilinear_sample(maps, points)
    assert out.shape == (1, 2, 4)
    assert out[0, :, 0].tolist() == maps[0, :, 0, 0].tolist()
    assert out[0, :, 1].tolist() == maps[0, :, 3, 4].tolist()
    assert out[0, :, 2].tolist() == maps[0, :, 1, 2].tolist()
    # the map is linear in x and y (value = 20c + 5y + x), so bilinear sampling is exact
    torch.testing.assert_close(
        out[0, :, 3], torch.tensor([5 * 2.25 + 1.5, 20 + 5 * 2.25 + 1.5], dtype=torch.float64)
    )
    outside = bilinear_sample(maps, torch.tensor([[[-3.0, 1.0]]], dtype=torch.float64), padding_mode="zeros")
    assert outside.abs().max() == 0
    border = sample_at_points(maps, torch.tensor([[[-3.0, 1.0]]], dtype=torch.float64))
    assert border[0, 0].tolist() == maps[0, :, 1, 0].tolist()


def test_correlation_window_is_x_major_and_levels_are_pooled():
    channels, radius = 4, 2
    maps = torch.zeros(1, 1, channels, 16, 16)
    feature = torch.tensor([1.0, 0.0, 0.0, 0.0])
    maps[0, 0, :, 6, 9] = feature  # one matching pixel at (x=9, y=6)
    pyramid = CorrelationPyramid(maps, num_levels=2, radius=radius)
    assert pyramid.levels[1].shape == (1, 1, channels, 8, 8)
    corr = pyramid.sample(feature.view(1, 1, 1, channels), torch.tensor([[[[8.0, 6.0]]]]))
    size = (2 * radius + 1) ** 2
    assert corr.shape == (1, 1, 1, 2 * size)
    level0 = corr[0, 0, 0, :size]
    dx, dy = 1, 0  # the match is one pixel right of the track
    assert int(level0.argmax()) == (dx + radius) * (2 * radius + 1) + (dy + radius)
    assert math.isclose(float(level0.max()), 1 / math.sqrt(channels), rel_tol=1e-6)
    # level 1: the match is averaged into pooled pixel (4, 3) with weight 1/4; the track sits at (4, 3)
    level1 = corr[0, 0, 0, size:]
    assert int(level1.argmax()) == radius * (2 * radius + 1) + radius
    assert math.isclose(float(level1.max()), 0.25 / math.sqrt(channels), rel_tol=1e-6)


def test_correlation_chunking_over_frames_is_exact():
    torch.manual_seed(0)
    maps = torch.randn(1, 5, 8, 12, 10)
    feats, coords = torch.randn(1, 5, 3, 8), torch.rand(1, 5, 3, 2) * 9
    full = CorrelationPyramid(maps, 2, 2).sample(feats, coords)
    chunked = CorrelationPyramid(maps, 2, 2, max_elements=3 * 12 * 10 * 2).sample(feats, coords)
    torch.testing.assert_close(full, chunked)


def test_motion_embedding_formula():
    flows = torch.tensor([[0.5, -2.0]])
    out = motion_embedding(flows, 8)
    assert out.shape == (1, 16)
    freqs = [0.0, 250.0, 500.0, 750.0]  # 2k · 1000 / 8
    for axis, value in enumerate((0.5, -2.0)):
        for k, f in enumerate(freqs):
            assert math.isclose(float(out[0, 8 * axis + 2 * k]), math.sin(f * value), abs_tol=1e-4)
            assert math.isclose(float(out[0, 8 * axis + 2 * k + 1]), math.cos(f * value), abs_tol=1e-4)


def test_pixel_sincos_table_encodes_column_then_row():
    table = pixel_sincos_table(8, height=3, width=5)
    assert table.shape == (1, 8, 3, 5)
    row, col = 2, 3
    omega = [1.0, 10000**-0.5]
    expected = [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
    expected += [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
    torch.testing.assert_close(table[0, :, row, col], torch.tensor(expected))


def test_attention_block_residual_is_taken_after_the_first_norm():
    block = AttnBlock(16, 4)
    for linear in (block.attn.out_proj, block.mlp.fc2):
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
    x = torch.randn(2, 5, 16) * 3 + 1
    torch.testing.assert_close(block(x), block.norm1(x))


def test_update_former_shapes_and_point_permutation_equivariance():
    torch.manual_seed(0)
    former = EfficientUpdateFormer(
        input_dim=20,
        hidden_size=32,
        output_dim=6,
        time_depth=2,
        space_depth=2,
        num_heads=4,
        num_virtual_tracks=3,
    ).eval()
    x = torch.randn(2, 7, 4, 20)
    out = former(x)
    assert out.shape == (2, 7, 4, 6)
    permutation = torch.randperm(7)
    torch.testing.assert_close(former(x[:, permutation]), out[:, permutation], rtol=1e-4, atol=1e-5)


def test_tracker_keeps_query_frame_and_scales_by_stride():
    torch.manual_seed(0)
    tracker = BaseTrackerPredictor(
        latent_dim=16,
        hidden_size=32,
        stride=2,
        corr_levels=2,
        corr_radius=2,
        depth=2,
        num_heads=4,
        num_virtual_tracks=4,
        max_scale=64,
    ).eval()
    queries = torch.tensor([[[3.0, 5.0], [20.5, 11.0]]])
    with torch.no_grad():
        tracks, vis, conf = tracker(queries, torch.randn(1, 3, 16, 12, 14), iterations=3)
    assert len(tracks) == 3 and tracks[-1].shape == (1, 3, 2, 2)
    for track in tracks:
        assert torch.equal(track[:, 0], queries)
    assert vis.shape == conf.shape == (1, 3, 2)


def test_tracks_stay_float32_under_autocast():
    torch.manual_seed(0)
    tracker = BaseTrackerPredictor(
        latent_dim=16,
        hidden_size=32,
        corr_levels=2,
        corr_radius=2,
        depth=2,
        num_heads=4,
        num_virtual_tracks=4,
    ).eval()
    queries = torch.tensor([[[3.25, 5.5], [20.5, 11.0]]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tracks, vis, conf = tracker(queries, torch.randn(1, 2, 16, 12, 14), iterations=2)
    assert tracks[-1].dtype == vis.dtype == conf.dtype == torch.float32
    assert torch.equal(tracks[-1][:, 0], queries)
