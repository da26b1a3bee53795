"""The in-place, chunked inference path of the shared blocks, VGGT and π³ against the autograd path."""

from __future__ import annotations

import pytest
import torch

from speed3r_sfm.attention import AttentionConfig, ViewLayout
from speed3r_sfm.models.layers.block import Block, token_ranges
from speed3r_sfm.models.layers.rope import RotaryPositionEmbedding2D, patch_positions
from speed3r_sfm.models.pi3 import Pi3, Pi3Config
from speed3r_sfm.models.vggt import VGGT, VGGTConfig
from speed3r_sfm.models.vggt import aggregator as aggregator_module

GSA = AttentionConfig(
    kind="gsa", block_size=2, compression_block_size=2, query_block_size=4, top_k=2, backend="gather"
)


def tiny_vggt(**overrides) -> VGGT:
    torch.manual_seed(0)
    return VGGT(VGGTConfig.preset("tiny", **overrides)).eval()


def rope_block(cast_qk_before_rope: bool, dim: int = 64, heads: int = 4) -> Block:
    torch.manual_seed(0)
    block = Block(
        dim,
        heads,
        init_values=0.5,
        qk_norm=True,
        rope=RotaryPositionEmbedding2D(),
        cast_qk_before_rope=cast_qk_before_rope,
    )
    with torch.no_grad():  # non-trivial norms and LayerScale
        for module in (block.norm1, block.norm2, block.attn.q_norm, block.attn.k_norm):
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.5, 0.5)
    return block.eval()


def test_token_ranges_cover_the_sequence_in_whole_periods():
    assert token_ranges(10, None) == [slice(0, 10)]
    assert token_ranges(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert token_ranges(33, 20, multiple=11) == [slice(0, 11), slice(11, 22), slice(22, 33)]
    assert token_ranges(33, 5, multiple=11) == [slice(0, 11), slice(11, 22), slice(22, 33)]


def test_rope_table_and_rotate_into_match_per_call_positions():
    rope = RotaryPositionEmbedding2D()
    positions = patch_positions(1, 2, 3, 5)[0]  # one view: 5 special + 6 patch tokens
    table = rope.table(positions)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3 * 11, 64)  # three views in a row
    per_call = rope(x, positions.repeat(3, 1).expand(2, -1, -1))
    assert torch.equal(rope(x, table), per_call)  # same operations, bit for bit
    out = torch.empty(2, 3 * 11, 4, 64, dtype=torch.bfloat16).transpose(1, 2)  # strided target
    rope.rotate_into(x, table, out)
    # computed in float32 and rounded once to bf16 (a fused multiply-add may flip a rounding: 1 ulp)
    torch.testing.assert_close(out, per_call.to(torch.bfloat16), rtol=2**-8, atol=1e-6)
    assert table.cos_sin(torch.float32, 64)[0] is table.cos_sin(torch.float32, 64)[0]  # computed once


@pytest.mark.parametrize("cast_qk_before_rope", [False, True])  # VGGT, π³
@pytest.mark.parametrize("token_chunk", [None, 22])
def test_inplace_block_matches_forward(cast_qk_before_rope, token_chunk):
    block = rope_block(cast_qk_before_rope)
    positions = patch_positions(1, 2, 3, 5)
    table = block.attn.rope.table(positions[0])
    x = torch.randn(2, 3 * 11, 64)
    calls = []
    with torch.no_grad():
        expected = block(x, positions.repeat(1, 3, 1))
        out = block(
            x.clone(),
            rope_table=table,
            inplace=True,
            token_chunk=token_chunk,
            before_update=lambda t: calls.append(t.clone()),
        )
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(calls[0], x)  # before_update sees the input, before any update
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected_bf16 = block(x, positions.repeat(1, 3, 1))
            out_bf16 = block(x.clone(), rope_table=table, inplace=True, token_chunk=token_chunk)
    assert out_bf16.dtype == torch.float32  # the residual stream keeps its dtype
    torch.testing.assert_close(out_bf16, expected_bf16, rtol=0.02, atol=0.02)
    torch.testing.assert_close(out_bf16, expected, rtol=0.05, atol=0.05)


def test_inplace_block_refuses_autograd():
    block = rope_block(False)
    with pytest.raises(RuntimeError, match="inference"):
        block(torch.randn(1, 11, 64), inplace=True)


def test_vggt_inference_matches_autograd_path_with_gsa_and_chunks():
    images = torch.rand(1, 3, 3, 28, 42)
    model = tiny_vggt(
        attention=GSA, aggregator_chunk_frames=2, global_ffn_chunk_tokens=20, frames_chunk_size=2
    )
    with torch.no_grad():
        fast, _ = model.aggregator(images)
        records: list = []
        model.aggregator(images, records=records)
    with torch.enable_grad():
        reference, _ = model.aggregator(images)
    for a, b in zip(fast, reference, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-5)
    assert [r["layer_index"] for r in records] == list(range(4))  # one GSA record per global block
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast_bf16, _ = model.aggregator(images)
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference_bf16, _ = model.aggregator(images)
    for a, b, c in zip(fast_bf16, reference_bf16, reference, strict=True):
        assert a.dtype == torch.bfloat16 and b.dtype == torch.float32  # "auto": kept in bf16 at inference
        torch.testing.assert_close(a.float(), b.detach(), rtol=0.03, atol=0.03)
        torch.testing.assert_close(a.float(), c.detach(), rtol=0.1, atol=0.1)


def test_vggt_forward_matches_autograd_path_under_bf16_autocast():
    images = torch.rand(1, 2, 3, 28, 42)
    model = tiny_vggt(enable_track=False, frames_chunk_size=1, aggregator_chunk_frames=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            fast = model(images)
        reference = model(images)
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        assert fast[key].dtype == torch.float32
        torch.testing.assert_close(fast[key], reference[key].detach(), rtol=0.05, atol=0.02, msg=key)


def test_kept_layer_dtype_and_allocation_after_the_global_attention(monkeypatch):
    model = tiny_vggt(enable_track=False)
    images = torch.rand(1, 2, 3, 28, 28)
    events = []
    for i, block in enumerate(model.aggregator.global_blocks):
        block.attn.attend.register_forward_hook(lambda *args, i=i: events.append(("attention", i)))
    kept_dtype = aggregator_module.Aggregator._kept_dtype
    monkeypatch.setattr(
        aggregator_module.Aggregator,
        "_kept_dtype",
        lambda self, tokens: events.append(("kept", len(events))) or kept_dtype(self, tokens),
    )
    with torch.no_grad():
        outputs, _ = model.aggregator(images, keep={1, 3})
    assert [e[0] for e in events] == ["attention", "attention", "kept", "attention", "attention", "kept"]
    assert outputs[1].dtype == torch.float32  # no autocast: the stream's dtype
    config = VGGTConfig.preset("tiny", intermediate_dtype=None)
    assert config.storage_dtype is None and VGGTConfig.preset("tiny").intermediate_dtype == "auto"


def test_dense_heads_autocast_switch():
    images = torch.rand(1, 2, 3, 28, 42)
    exact = tiny_vggt(enable_track=False)
    fast = tiny_vggt(enable_track=False, dense_heads_autocast=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = exact(images), fast(images)
    for key in ("depth", "depth_conf", "world_points", "world_points_conf"):
        assert b[key].dtype == torch.float32
        torch.testing.assert_close(b[key], a[key], rtol=0.05, atol=0.01, msg=key)
    torch.testing.assert_close(b["pose_enc"], a["pose_enc"])  # the camera head stays in float32


def test_bf16_heads_in_predict_on_cpus_with_native_bf16(monkeypatch):
    from speed3r_sfm.models.vggt import model as vggt_module

    images = torch.rand(1, 2, 3, 28, 42)
    model = tiny_vggt(enable_track=False, cpu_bf16_aggregator=False)  # the heads alone
    with torch.no_grad():
        exact = model(images)
        fast = model(images, bf16_heads=True)
    for key in ("depth", "depth_conf", "world_points", "world_points_conf"):
        assert fast[key].dtype == torch.float32
        assert not torch.equal(fast[key], exact[key]), key  # the heads did run in bf16...
        torch.testing.assert_close(fast[key], exact[key], rtol=0.05, atol=0.01, msg=key)  # ...to bf16
    assert torch.equal(fast["pose_enc"], exact["pose_enc"])  # the camera head stays in float32

    monkeypatch.setattr(vggt_module, "cpu_has_native_bf16", lambda: True)  # any CPU can run bf16 autocast
    assert torch.equal(model.predict(images).depth, fast["depth"][..., 0])
    model.config.cpu_bf16_heads = False
    assert torch.equal(model.predict(images).depth, exact["depth"][..., 0])
    model.config.cpu_bf16_heads = True
    monkeypatch.setattr(vggt_module, "cpu_has_native_bf16", lambda: False)
    assert torch.equal(model.predict(images).depth, exact["depth"][..., 0])


def test_bf16_aggregator_in_predict_on_cpus_with_native_bf16(monkeypatch, attention_dtypes):
    from speed3r_sfm.models.vggt import model as vggt_module

    images = torch.rand(1, 2, 3, 28, 42)
    model = tiny_vggt(enable_track=False, cpu_bf16_heads=False)
    seen = attention_dtypes(model.aggregator)
    monkeypatch.setattr(vggt_module, "cpu_has_native_bf16", lambda: False)
    exact = model.predict(images)
    assert set(seen) == {torch.float32}
    monkeypatch.setattr(vggt_module, "cpu_has_native_bf16", lambda: True)  # any CPU can run bf16 autocast
    seen.clear()
    fast = model.predict(images)
    assert seen and set(seen) == {torch.bfloat16}  # frame and global attention got bf16 q, k, v
    for key in ("depth", "depth_conf", "world_points", "cam_from_world", "intrinsics"):
        a, b = getattr(exact, key), getattr(fast, key)
        assert b.dtype == a.dtype == torch.float32, key
        assert not torch.equal(a, b), key
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.02, msg=key)
    model.config.cpu_bf16_aggregator = False
    assert torch.equal(model.predict(images).depth, exact.depth)
    model.config.cpu_bf16_aggregator = True
    monkeypatch.setattr(vggt_module, "cpu_has_native_bf16", lambda: False)
    assert torch.equal(model.predict(images).depth, exact.depth)


def test_aggregator_keeps_the_callers_autocast(attention_dtypes):
    """Without bf16_aggregator the aggregator runs under the caller's autocast (``predict``'s bf16 on CUDA,
    a training step's), not in float32."""
    model = tiny_vggt(enable_track=False)
    seen = attention_dtypes(model.aggregator)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.rand(1, 2, 3, 28, 42))
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    with torch.no_grad():
        model(torch.rand(1, 2, 3, 28, 42))
    assert seen and set(seen) == {torch.float32}


def test_training_gradients_reach_every_parameter():
    model = tiny_vggt(enable_track=False, enable_point=False, attention=GSA).train()
    out = model(torch.rand(1, 2, 3, 28, 28))
    (out["depth"].mean() + out["pose_enc"].square().mean()).backward()
    missing = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert missing == []  # GSA gates included (the DINO mask token does not require grad)


def test_pi3_inference_matches_autograd_path():
    torch.manual_seed(0)
    model = Pi3(Pi3Config.preset("tiny", global_chunk_tokens=11)).eval()
    images = torch.rand(1, 3, 3, 28, 42)
    with torch.no_grad():
        fast = model(images)
    reference = model(images)
    for key, value in fast.items():
        torch.testing.assert_close(value, reference[key].detach(), rtol=1e-4, atol=1e-5, msg=key)


def test_global_block_is_called_with_positions_and_layout():
    """Hooks on the global blocks still see (tokens, positions, layout) in the in-place path."""
    model = tiny_vggt(enable_track=False)
    seen = []
    model.aggregator.global_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args, kwargs)), with_kwargs=True
    )
    with torch.no_grad():
        model(torch.rand(1, 2, 3, 28, 42))
    (tokens, positions, layout), kwargs = seen[0]
    assert isinstance(layout, ViewLayout) and tokens.shape == (1, 2 * 11, 64)
    assert positions.shape == (1, 22, 2) and kwargs["inplace"] and kwargs["rope_table"].period == 11


@pytest.mark.parametrize("views, tokens, special", [(3, 11, 5), (4, 21, 0), (2, 40, 5)])
def test_gsa_block_aligned_kv_written_per_view_equals_relayout(views, tokens, special):
    from speed3r_sfm.attention import GlobalSparseAttention
    from speed3r_sfm.attention.blocks import BlockGeometry

    config = AttentionConfig(kind="gsa", block_size=4, compression_block_size=8, query_block_size=8, top_k=2)
    gsa = GlobalSparseAttention(config, num_heads=2, head_dim=8, layer_index=0)
    layout = ViewLayout(views, tokens, special)
    q, k, v = (torch.randn(1, 2, views * tokens, 8) for _ in range(3))
    with torch.no_grad():
        buffers = gsa.kv_buffer(k, layout), gsa.kv_buffer(v, layout)
        for first in range(views):  # one view at a time, as Block writes chunks of whole views
            rows = slice(first * tokens, (first + 1) * tokens)
            gsa.write_kv(buffers[0], k[:, :, rows], layout, first)
            gsa.write_kv(buffers[1], v[:, :, rows], layout, first)
        geom = BlockGeometry.from_layout(layout, 4, 8)
        assert torch.equal(buffers[0], geom.relayout(k)) and torch.equal(buffers[1], geom.relayout(v))
        aligned = gsa(q, *buffers, layout, kv_block_aligned=True)
        assert torch.equal(aligned, gsa(q, k, v, layout))
    assert gsa.kv_buffer(k, layout) is None  # with autograd: the plain path


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile_inference", [False, True])
def test_cuda_inference_paths_match_autograd_path(compile_inference):
    """On the GPU (GSA through FlexAttention + cuDNN special tokens, block-aligned k/v, bf16 autocast):
    the in-place path, eager or compiled, against the plain blocks."""
    attention = AttentionConfig(kind="gsa", block_size=64, query_block_size=64, top_k=2)
    model = tiny_vggt(
        attention=attention, global_ffn_chunk_tokens=250, compile_inference=compile_inference
    ).cuda()
    model.requires_grad_(False)  # the reference runs the plain blocks, with GSA's inference kernels
    images = torch.rand(1, 6, 3, 112, 168, device="cuda")  # 8 x 12 patches: 101 tokens per view
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.inference_mode():
            fast = model(images)
        with torch.enable_grad():
            reference = model(images)
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        torch.testing.assert_close(fast[key], reference[key].detach(), rtol=0.05, atol=0.02, msg=key)
