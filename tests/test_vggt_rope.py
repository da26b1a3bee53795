"""2D RoPE (base 100, y/x halves, rotate-half) against a slow float64 reference of rotation matrices."""

from __future__ import annotations

import math

import torch

from speed3r_sfm.models.layers.attention import Attention
from speed3r_sfm.models.layers.rope import RotaryPositionEmbedding2D, patch_positions


def reference_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 100.0) -> torch.Tensor:
    """x (B, H, N, D); positions (B, N, 2) = (y, x). Each head vector is multiplied by a D×D block rotation.

    Channels [0, D/2) carry y and [D/2, D) carry x. Within a half of width h, channel i < h/2 is paired with
    channel i + h/2 and the pair is rotated by angle pos · base^(−2i/h).
    """
    batch, heads, tokens, dim = x.shape
    half = dim // 2
    out = torch.empty_like(x, dtype=torch.float64)
    for b in range(batch):
        for n in range(tokens):
            rotation = torch.zeros(dim, dim, dtype=torch.float64)
            for axis in range(2):
                pos = float(positions[b, n, axis])
                for i in range(half // 2):
                    angle = pos * base ** (-2 * i / half)
                    c, s = math.cos(angle), math.sin(angle)
                    first, second = axis * half + i, axis * half + i + half // 2
                    rotation[first, first], rotation[first, second] = c, -s
                    rotation[second, first], rotation[second, second] = s, c
            out[b, :, n] = x[b, :, n].double() @ rotation.T
    return out


def test_rope_matches_float64_rotation_matrices():
    torch.manual_seed(0)
    positions = torch.randint(0, 38, (2, 7, 2))
    x = torch.randn(2, 3, 7, 64)
    ours = RotaryPositionEmbedding2D(100.0)(x, positions)
    torch.testing.assert_close(ours.double(), reference_rope(x, positions), rtol=0, atol=2e-5)
    # a rotation: norms of each channel pair are preserved, and position 0 is the identity
    zero = torch.zeros(2, 7, 2, dtype=torch.long)
    torch.testing.assert_close(RotaryPositionEmbedding2D(100.0)(x, zero), x)


def test_rope_gives_relative_position_attention_scores():
    torch.manual_seed(1)
    rope = RotaryPositionEmbedding2D(100.0)
    q, k = torch.randn(1, 1, 1, 64, dtype=torch.float64), torch.randn(1, 1, 1, 64, dtype=torch.float64)

    def score(pq, pk):
        return (rope(q, torch.tensor([[pq]])) * rope(k, torch.tensor([[pk]]))).sum()

    torch.testing.assert_close(score((3, 5), (1, 2)), score((12, 20), (10, 17)))


def test_patch_positions_are_row_major_plus_one_with_special_tokens_at_zero():
    positions = patch_positions(2, rows=2, cols=3, num_special=5)
    assert positions.shape == (2, 11, 2)
    assert positions[1].tolist() == [[0, 0]] * 5 + [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]


def test_vggt_attention_rotates_the_float32_qk_norm_output():
    """On CUDA, autocast runs LayerNorm in float32, so the qk-norm output is float32 while v is bf16. VGGT
    applies RoPE to that float32 output; π³ first casts q/k to v's dtype. Emulated here on the CPU."""
    torch.manual_seed(2)
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, q, k, v, layout=None):
            seen["dtypes"] = (q.dtype, k.dtype, v.dtype)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    class Float32Norm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.float())

    rope = RotaryPositionEmbedding2D()
    positions = patch_positions(1, 2, 2, 0)
    for cast_first, expected in ((False, torch.float32), (True, torch.bfloat16)):
        attention = Attention(64, 2, qk_norm=True, rope=rope, attend=Spy(), cast_qk_before_rope=cast_first)
        attention.to(torch.bfloat16)
        attention.q_norm, attention.k_norm = Float32Norm(32), Float32Norm(32)
        calls = []
        handle = rope.register_forward_hook(
            lambda module, args, out, calls=calls: calls.append(args[0].dtype)
        )
        attention(torch.randn(1, 4, 64, dtype=torch.bfloat16), positions)
        handle.remove()
        assert calls == [expected, expected]
        assert seen["dtypes"] == (torch.bfloat16,) * 3  # the kernel always gets q, k, v in one dtype


def test_rope_rounds_angles_to_the_token_dtype_like_upstream():
    """In bf16 both upstreams take cos/sin of bf16-rounded angles pos · 100^(−2i/32)."""
    errors = []
    for i in range(16):
        x = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16)
        x[..., i] = 1.0  # y-half, channel pair (i, i + 16)
        out = RotaryPositionEmbedding2D(100.0)(x, torch.tensor([[[37, 0]]]))
        exact = 37 * 100 ** (-2 * i / 32)
        rounded = float(torch.tensor(exact).to(torch.bfloat16))
        errors.append(abs(rounded - exact))
        assert float(out[0, 0, 0, i]) == float(torch.tensor(math.cos(rounded)).to(torch.bfloat16))
        assert float(out[0, 0, 0, i + 16]) == float(torch.tensor(math.sin(rounded)).to(torch.bfloat16))
    assert max(errors) > 0.01  # the rounding is visible at this position
