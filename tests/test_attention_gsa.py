"""GSA on the CPU: fast paths against the explicit-mask reference (float64), dense limits, gate, records."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speed3r_sfm.attention import (
    AttentionConfig,
    DenseAttention,
    GlobalSparseAttention,
    ViewLayout,
    build_global_attention,
    is_gsa_parameter,
    reset_gsa_parameters,
)
from speed3r_sfm.attention.blocks import BlockGeometry
from speed3r_sfm.attention.lse import merge_by_lse
from speed3r_sfm.attention.reference import reference_gsa, reference_selection_mask
from speed3r_sfm.attention.selection import Selection, kv_block_lists
from speed3r_sfm.attention.sparse_gather import gather_block_attention
from speed3r_sfm.models.layers.block import Block

# (views, tokens per view, special tokens, block, compression block, query block, top_k)
LAYOUTS = [
    (5, 37, 3, 8, 16, 16, 3),  # partial key blocks, query blocks straddle views
    (4, 21, 0, 4, 8, 32, 2),  # no special tokens, query blocks cover up to 3 views
    (3, 40, 5, 5, 10, 8, 4),  # blocks align with views exactly
]


def _config(layout, **overrides) -> AttentionConfig:
    _, _, _, bs, cbs, qbs, top_k = layout
    fields = dict(kind="gsa", block_size=bs, compression_block_size=cbs, query_block_size=qbs, top_k=top_k)
    return AttentionConfig(**{**fields, **overrides})


def _inputs(layout, batch=2, heads=3, dim=8, dtype=torch.float64, seed=0):
    views, tokens, _, *_ = layout
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, views * tokens, dim, generator=gen, dtype=dtype) for _ in range(3)]


def _module(config, heads=3, dim=8, random_gate=False, dtype=torch.float64) -> GlobalSparseAttention:
    module = GlobalSparseAttention(config, num_heads=heads, head_dim=dim, layer_index=0).to(dtype)
    if random_gate:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            module.gate.weight.copy_(0.3 * torch.randn(module.gate.weight.shape, generator=gen))
            module.gate.bias.copy_(torch.randn(module.gate.bias.shape, generator=gen))
    return module


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("own_view", [True, False])
def test_gather_path_matches_reference(layout, per_head, own_view):
    config = _config(layout, backend="gather", per_head_selection=per_head, include_own_view=own_view)
    module = _module(config, random_gate=True)
    q, k, v = _inputs(layout)
    view_layout = ViewLayout(*layout[:3], records=[])
    out = module(q, k, v, view_layout)
    ref, selection = reference_gsa(q, k, v, ViewLayout(*layout[:3]), config, module.gate)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    record = view_layout.records[0]
    assert torch.equal(record["selected_blocks"].long(), selection.blocks)
    torch.testing.assert_close(record["selected_scores"], selection.scores, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(record["block_importance"], selection.importance, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("grad", [False, True])
def test_gather_path_in_many_chunks_matches_reference(grad):
    """Chunks of 5 of the 12 query blocks: the reused gather buffers (inference) and the fresh copies
    (autograd) give the selection-branch output in every chunk, the last (shorter) one included."""
    layout = LAYOUTS[0]
    config = _config(layout, backend="gather")
    module = _module(config, random_gate=True)
    q, k, v = _inputs(layout)
    geom = BlockGeometry.from_layout(ViewLayout(*layout[:3]), config.block_size, config.query_block_size)
    _, selection = reference_gsa(q, k, v, ViewLayout(*layout[:3]), config, module.gate)
    ids, valid = kv_block_lists(geom, selection, config.include_own_view)
    assert geom.num_query_blocks == 12
    one_block = q.shape[0] * q.shape[1] * ids.shape[-1] * config.block_size * q.shape[-1]
    mask = reference_selection_mask(ViewLayout(*layout[:3]), 8, 16, selection.blocks, True)
    scale = q.shape[-1] ** -0.5
    logits = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    expected = torch.softmax(logits, -1) @ v
    q, k_r, v_r = q.clone().requires_grad_(grad), geom.relayout(k), geom.relayout(v)
    with torch.set_grad_enabled(grad):
        out = gather_block_attention(q, k_r, v_r, geom, ids, valid, scale, chunk_elements=5 * one_block)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert out.requires_grad == grad


def test_gather_path_in_bf16_on_the_cpu_uses_bf16_matmuls(monkeypatch):
    """CPU bf16 inference: masked scores and two bf16 matmuls per chunk, not SDPA; within bf16 rounding of
    a float64 reference on the same (bf16-rounded) inputs."""
    import speed3r_sfm.attention.sparse_gather as gather_module

    layout = LAYOUTS[0]
    config = _config(layout, backend="gather")
    module = _module(config, random_gate=True)
    q, k, v = (x.bfloat16().double() for x in _inputs(layout))
    geom = BlockGeometry.from_layout(ViewLayout(*layout[:3]), config.block_size, config.query_block_size)
    _, selection = reference_gsa(q, k, v, ViewLayout(*layout[:3]), config, module.gate)
    ids, valid = kv_block_lists(geom, selection, config.include_own_view)
    mask = reference_selection_mask(ViewLayout(*layout[:3]), 8, 16, selection.blocks, True)
    scale = q.shape[-1] ** -0.5
    logits = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    expected = torch.softmax(logits, -1) @ v

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA called on the CPU bf16 inference path")

    monkeypatch.setattr(gather_module.F, "scaled_dot_product_attention", no_sdpa)
    q16, k16, v16 = q.bfloat16(), geom.relayout(k).bfloat16(), geom.relayout(v).bfloat16()
    one_block = q.shape[0] * q.shape[1] * ids.shape[-1] * config.block_size * q.shape[-1]
    with torch.no_grad():
        out = gather_block_attention(q16, k16, v16, geom, ids, valid, scale, chunk_elements=5 * one_block)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    error = (out.double() - expected).abs()
    assert error.max() < 3e-2 and error.mean() < 4e-3


def test_training_free_output_is_the_selection_branch():
    layout = LAYOUTS[0]
    config = _config(layout, backend="gather")
    module = _module(config)
    assert module.gate.is_training_free()
    q, k, v = _inputs(layout)
    with torch.no_grad():
        fast = module(q, k, v, ViewLayout(*layout[:3]))
    ref, selection = reference_gsa(q, k, v, ViewLayout(*layout[:3]), config, module.gate)
    mask = reference_selection_mask(ViewLayout(*layout[:3]), 8, 16, selection.blocks, True)
    scale = q.shape[-1] ** -0.5
    selection_only = (
        torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")), -1) @ v
    )
    torch.testing.assert_close(fast, selection_only, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref, selection_only, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS[:2])
@pytest.mark.parametrize("own_view", [True, False])
@pytest.mark.parametrize("backend", ["gather", "reference"])
def test_top_k_all_blocks_equals_dense(layout, own_view, backend):
    views, tokens, special, bs, *_ = layout
    blocks = views * -(-(tokens - special) // bs)
    config = _config(layout, top_k=blocks, include_own_view=own_view, backend=backend)
    q, k, v = _inputs(layout)
    out = _module(config)(q, k, v, ViewLayout(*layout[:3]))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-10, atol=1e-10)


def test_fewer_blocks_differ_from_dense():
    layout = LAYOUTS[0]
    q, k, v = _inputs(layout)
    out = _module(_config(layout, top_k=1, backend="gather"))(q, k, v, ViewLayout(*layout[:3]))
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-3


@pytest.mark.parametrize("per_head", [True, False])
def test_gradients_match_reference(per_head):
    layout = LAYOUTS[0]
    config = _config(layout, backend="gather", per_head_selection=per_head)
    fast_module = _module(config, random_gate=True)
    ref_module = _module(config, random_gate=True)
    q, k, v = _inputs(layout)
    weight = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(3))
    grads = []
    for module, run in ((fast_module, "fast"), (ref_module, "reference")):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        if run == "fast":
            out = module(*leaves, ViewLayout(*layout[:3]))
        else:
            out, _ = reference_gsa(*leaves, ViewLayout(*layout[:3]), config, module.gate)
        (out * weight).sum().backward()
        grads.append([t.grad for t in leaves] + [module.gate.weight.grad, module.gate.bias.grad])
    for fast, ref in zip(*grads, strict=True):
        assert fast is not None and fast.abs().max() > 0
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-10)


def test_training_free_gate_gets_gradients():
    layout = LAYOUTS[0]
    module = _module(_config(layout, backend="gather"))
    q, k, v = _inputs(layout)
    module(q, k, v, ViewLayout(*layout[:3])).square().sum().backward()
    assert module.gate.weight.grad.abs().max() > 0 and module.gate.bias.grad.abs().max() > 0


def test_reference_backend_and_selection_reuse():
    layout = LAYOUTS[0]
    config = _config(layout, backend="reference")
    module = _module(config, random_gate=True)
    q, k, v = _inputs(layout)
    records: list = []
    out = module(q, k, v, ViewLayout(*layout[:3], records=records))
    blocks = records[0]["selected_blocks"].long()
    again, _ = reference_gsa(q, k, v, ViewLayout(*layout[:3]), config, module.gate, Selection(blocks, blocks))
    torch.testing.assert_close(out, again, rtol=0, atol=0)


def test_records_format():
    layout = (6, 45, 5, 8, 16, 32, 3)
    config = _config(layout, backend="gather")
    q, k, v = _inputs(layout, batch=1, heads=2)
    records: list = []
    view_layout = ViewLayout(6, 45, 5, patch_grid=(5, 8), records=records)
    _module(config, heads=2)(q, k, v, view_layout)
    _module(config, heads=2)(q, k, v, ViewLayout(6, 45, 5))  # records=None: nothing recorded
    assert len(records) == 1
    rec = records[0]
    geom = BlockGeometry(6, 45, 5, 8, 32)
    nb, t = geom.blocks_per_view, geom.num_query_blocks
    assert (rec["blocks_per_view"], rec["block_size"], rec["query_block_size"]) == (nb, 8, 32)
    assert rec["patch_grid"] == (5, 8) and rec["num_views"] == 6 and rec["num_special"] == 5
    assert rec["block_importance"].shape == (1, 6, nb) and rec["block_importance"].dtype == torch.float32
    assert rec["selected_blocks"].shape == (1, 2, t, 3) and rec["selected_blocks"].dtype == torch.int32
    assert rec["query_block_views"].shape == (t, 2) and rec["query_block_views"].dtype == torch.int32
    # Own views are always attended, so the selected blocks lie in other views.
    views = rec["selected_blocks"].long() // nb
    first, last = rec["query_block_views"][:, 0, None].long(), rec["query_block_views"][:, 1, None].long()
    assert ((views < first) | (views > last)).all()
    assert torch.all(rec["selected_scores"][..., :-1] >= rec["selected_scores"][..., 1:])
    # Importance is a mean of probabilities over query blocks of other views.
    assert (rec["block_importance"] > 0).all() and rec["block_importance"].sum() < 6 * nb


def test_relayout_positions_and_padding():
    geom = BlockGeometry(num_views=3, tokens_per_view=13, num_special=2, block_size=4, query_block_size=8)
    x = torch.arange(1, geom.num_tokens + 1, dtype=torch.float64).view(1, 1, -1, 1)
    relaid = geom.relayout(x)[0, 0, :, 0]
    valid = geom.kv_token_is_valid()
    assert relaid.shape == (geom.kv_len,) and torch.all(relaid[~valid] == 0)
    specials = [v * 13 + i + 1 for v in range(3) for i in range(2)]
    patches = [v * 13 + 2 + i + 1 for v in range(3) for i in range(11)]
    assert relaid[valid].tolist() == specials + patches
    partial = geom.kv_block_is_partial()
    per_block = valid.view(-1, 4).all(dim=1)
    assert torch.equal(partial, ~per_block)


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_flex_cpu_inference_matches_reference(layout):
    """Compiled FlexAttention on the CPU (inference only); eager flex is never used. Checked on AVX2 as
    well as AVX-512 (ATEN_CPU_CAPABILITY=avx2 picks the AVX2 kernels)."""
    config = _config(layout, backend="flex")
    module = _module(config, dim=16, dtype=torch.float32)
    q, k, v = _inputs(layout, dim=16, dtype=torch.float64)
    records: list = []
    with torch.no_grad():
        out = module(q.float(), k.float(), v.float(), ViewLayout(*layout[:3], records=records))
    blocks = records[0]["selected_blocks"].long()
    ref, _ = reference_gsa(
        q, k, v, ViewLayout(*layout[:3]), config, module.gate.double(), Selection(blocks, blocks)
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_flex_cpu_refuses_the_shape_its_avx2_kernel_gets_wrong():
    layout = LAYOUTS[0]  # 8-token key blocks
    module = _module(_config(layout, backend="flex"), dim=16, dtype=torch.float32)
    q, k, v = _inputs(layout, dim=16, dtype=torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match="backend 'gather'"):
        module(q, k, v, ViewLayout(*layout[:3]))


def test_build_global_attention_and_per_layer_choice():
    config = AttentionConfig(kind="gsa", gsa_layers=[1, 3])
    assert config.gsa_layers == (1, 3)
    kinds = [type(build_global_attention(config, dim=64, num_heads=4, layer_index=i)) for i in range(4)]
    assert kinds == [DenseAttention, GlobalSparseAttention, DenseAttention, GlobalSparseAttention]
    assert isinstance(build_global_attention(None, dim=64, num_heads=4, layer_index=0), DenseAttention)
    assert list(DenseAttention().state_dict()) == []
    with pytest.raises(ValueError):
        AttentionConfig(kind="gsa", block_size=64, compression_block_size=96)


def test_dense_checkpoint_loads_into_gsa_block_and_gsa_roundtrip():
    torch.manual_seed(0)
    dense = Block(32, 4, attend=DenseAttention())
    gsa_config = AttentionConfig(
        kind="gsa", block_size=4, compression_block_size=8, query_block_size=8, top_k=2
    )
    gsa = Block(32, 4, attend=build_global_attention(gsa_config, dim=32, num_heads=4, layer_index=0))
    result = gsa.load_state_dict(dense.state_dict(), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys
    assert all(is_gsa_parameter(key) for key in result.missing_keys)
    assert set(result.missing_keys) == {"attn.attend.gate.weight", "attn.attend.gate.bias"}
    assert not is_gsa_parameter("attn.qkv.weight")
    # With every block selected, the GSA block reproduces the dense block.
    layout = ViewLayout(num_views=3, tokens_per_view=10, num_special=2)
    gsa.attn.attend.config.top_k = 6
    x = torch.randn(1, 30, 32)
    torch.testing.assert_close(gsa(x, layout=layout), dense(x, layout=layout), rtol=1e-5, atol=1e-5)
    # GSA checkpoints keep trained gates.
    with torch.no_grad():
        gsa.attn.attend.gate.bias.fill_(0.5)
    copy = Block(32, 4, attend=build_global_attention(gsa_config, dim=32, num_heads=4, layer_index=0))
    copy.load_state_dict(gsa.state_dict(), strict=True)
    assert torch.equal(copy.attn.attend.gate.bias, gsa.attn.attend.gate.bias)
    assert reset_gsa_parameters(copy) == 1 and copy.attn.attend.gate.is_training_free()


def test_errors():
    module = _module(_config(LAYOUTS[0]))
    q, k, v = _inputs(LAYOUTS[0])
    with pytest.raises(ValueError, match="ViewLayout"):
        module(q, k, v, None)
    with pytest.raises(ValueError, match="does not match"):
        module(q, k, v, ViewLayout(4, 37, 3))


def test_merge_by_lse_equals_attention_over_the_union():
    q, k, v = _inputs(LAYOUTS[0])
    logits = q @ k.transpose(-1, -2)
    first = torch.zeros(k.shape[2], dtype=torch.bool)
    first[torch.randperm(k.shape[2], generator=torch.Generator().manual_seed(4))[:50]] = True
    parts = []
    for keys in (first, ~first):
        part = logits.masked_fill(~keys, float("-inf"))
        parts += [torch.softmax(part, -1) @ v, torch.logsumexp(part, -1)]
    torch.testing.assert_close(merge_by_lse(*parts), torch.softmax(logits, -1) @ v, rtol=1e-10, atol=1e-10)


def test_auto_backend_uses_flex_on_cuda_only_where_its_kernels_compile():
    """Triton's FlexAttention kernels need head dims and key blocks of at least 16 (8-token blocks failed to
    compile on an H200); "auto" runs the gather path there. Decided from the device type alone."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def backend(block_size: int, head_dim: int, device: torch.device) -> str:
        config = AttentionConfig(kind="gsa", block_size=block_size, compression_block_size=256)
        module = GlobalSparseAttention(config, num_heads=2, head_dim=head_dim, layer_index=0)
        return module.backend_for(device)

    assert backend(16, 16, cuda) == "flex" and backend(128, 64, cuda) == "flex"
    assert backend(8, 16, cuda) == "gather" and backend(16, 8, cuda) == "gather"
    assert backend(128, 64, cpu) == "gather"
