"""GSA's compiled FlexAttention path on the GPU against the float64 reference (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speed3r_sfm.attention import AttentionConfig, GlobalSparseAttention, ViewLayout
from speed3r_sfm.attention.lse import sdpa_with_lse
from speed3r_sfm.attention.reference import reference_gsa
from speed3r_sfm.attention.selection import Selection

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VIEWS, TOKENS, SPECIAL = 6, 255, 5  # 250 patches: two key blocks of 128 per view, the second partial


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _setup(dtype, block_size=128, seed=0, random_gate=True, **overrides):
    fields = {"compression_block_size": 256, "query_block_size": 128, "top_k": 3, **overrides}
    config = AttentionConfig(kind="gsa", block_size=block_size, backend="flex", **fields)
    module = GlobalSparseAttention(config, num_heads=4, head_dim=64, layer_index=0).cuda()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if random_gate:
        with torch.no_grad():
            module.gate.weight.copy_(
                0.2 * torch.randn(module.gate.weight.shape, generator=gen, device="cuda")
            )
            module.gate.bias.copy_(torch.randn(module.gate.bias.shape, generator=gen, device="cuda"))
    qkv = [torch.randn(1, 4, VIEWS * TOKENS, 64, generator=gen, device="cuda") for _ in range(3)]
    return config, module, [t.to(dtype) for t in qkv]


def _reference(q, k, v, config, module, blocks):
    gate = GlobalSparseAttention(config, num_heads=4, head_dim=64, layer_index=0).double().cuda().gate
    gate.load_state_dict(module.gate.state_dict())
    layout = ViewLayout(VIEWS, TOKENS, SPECIAL)
    selection = Selection(blocks, blocks)
    return reference_gsa(q.double(), k.double(), v.double(), layout, config, gate, selection)[0]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 1e-2), (torch.float32, 2e-3)])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("special_kernel", ["auto", "flex"])
def test_flex_forward_matches_reference(dtype, tol, per_head, special_kernel):
    config, module, (q, k, v) = _setup(dtype, per_head_selection=per_head, special_kernel=special_kernel)
    records: list = []
    with torch.no_grad():
        out = module(q, k, v, ViewLayout(VIEWS, TOKENS, SPECIAL, records=records))
    assert out.dtype == dtype and torch.isfinite(out).all()
    blocks = records[0]["selected_blocks"].long()
    assert (blocks >= 0).all()
    assert _rel(out, _reference(q, k, v, config, module, blocks)) < tol


def test_flex_inference_block_64_matches_reference():
    config, module, (q, k, v) = _setup(torch.bfloat16, block_size=64)
    records: list = []
    with torch.no_grad():
        out = module(q, k, v, ViewLayout(VIEWS, TOKENS, SPECIAL, records=records))
    blocks = records[0]["selected_blocks"].long()
    assert _rel(out, _reference(q, k, v, config, module, blocks)) < 1e-2


def test_sdpa_with_lse_matches_explicit():
    gen = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (
        torch.randn(1, 4, n, 64, device="cuda", generator=gen, dtype=torch.bfloat16) for n in (3000, 900, 900)
    )
    result = sdpa_with_lse(q, k, v, 0.125)
    assert result is not None
    logits = (q.double() @ k.double().transpose(-1, -2)) * 0.125
    assert _rel(result[0], torch.softmax(logits, -1) @ v.double()) < 1e-2
    torch.testing.assert_close(result[1].double(), torch.logsumexp(logits, -1), atol=2e-2, rtol=1e-3)


def test_flex_training_free_skip_equals_full_computation():
    _, module, (q, k, v) = _setup(torch.bfloat16, random_gate=False, special_kernel="flex")
    layout = ViewLayout(VIEWS, TOKENS, SPECIAL)
    with torch.no_grad():
        skipped = module(q, k, v, layout)  # narrow BlockMask, no compression branch
    full = module(q, k, v, layout)  # gradients enabled: full-width BlockMask, both branches
    torch.testing.assert_close(skipped, full.detach(), rtol=0, atol=1e-6)


def test_flex_top_k_all_equals_dense():
    _, module, (q, k, v) = _setup(torch.bfloat16, random_gate=False, top_k=VIEWS * 2)
    with torch.no_grad():
        out = module(q, k, v, ViewLayout(VIEWS, TOKENS, SPECIAL))
    assert _rel(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float())) < 1e-2


@pytest.mark.parametrize("per_head", [True, False])
def test_flex_bf16_gradients_match_reference(per_head):
    config, module, qkv = _setup(torch.bfloat16, per_head_selection=per_head)
    leaves = [t.clone().requires_grad_(True) for t in qkv]
    weight = torch.randn(qkv[0].shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
    records: list = []
    out = module(*leaves, ViewLayout(VIEWS, TOKENS, SPECIAL, records=records))
    (out.float() * weight).sum().backward()
    blocks = records[0]["selected_blocks"].long()
    ref_leaves = [t.detach().double().requires_grad_(True) for t in qkv]
    gate = GlobalSparseAttention(config, num_heads=4, head_dim=64, layer_index=0).double().cuda().gate
    gate.load_state_dict(module.gate.state_dict())
    ref, _ = reference_gsa(
        *ref_leaves, ViewLayout(VIEWS, TOKENS, SPECIAL), config, gate, Selection(blocks, blocks)
    )
    (ref * weight.double()).sum().backward()
    for fast, slow in zip(
        [t.grad for t in leaves] + [module.gate.weight.grad, module.gate.bias.grad],
        [t.grad for t in ref_leaves] + [gate.weight.grad, gate.bias.grad],
        strict=True,
    ):
        assert _rel(fast, slow) < 2e-2


def test_flex_block_64_gradients_match_reference_or_are_refused_on_hopper():
    config, module, qkv = _setup(torch.bfloat16, block_size=64, top_k=4)
    leaves = [t.clone().requires_grad_(True) for t in qkv]
    records: list = []
    if torch.cuda.get_device_capability() == (9, 0):
        # Measured on an H100 (torch 2.11): flex's backward has no tile configuration for 64-key blocks.
        with pytest.raises(ValueError, match="multiple of 128"):
            module(*leaves, ViewLayout(VIEWS, TOKENS, SPECIAL))
        return
    out = module(*leaves, ViewLayout(VIEWS, TOKENS, SPECIAL, records=records))
    out.float().square().sum().backward()
    blocks = records[0]["selected_blocks"].long()
    ref_leaves = [t.detach().double().requires_grad_(True) for t in qkv]
    gate = GlobalSparseAttention(config, num_heads=4, head_dim=64, layer_index=0).double().cuda().gate
    gate.load_state_dict(module.gate.state_dict())
    ref, _ = reference_gsa(
        *ref_leaves, ViewLayout(VIEWS, TOKENS, SPECIAL), config, gate, Selection(blocks, blocks)
    )
    ref.square().sum().backward()
    for fast, slow in zip([t.grad for t in leaves], [t.grad for t in ref_leaves], strict=True):
        assert _rel(fast, slow) < 2e-2
