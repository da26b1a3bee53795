"""π³ backbone: shapes, official key/shape list, permutation equivariance, camera head, checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from speed3r_sfm.attention import AttentionConfig, DenseAttention, ViewLayout
from speed3r_sfm.data.images import preprocess_images
from speed3r_sfm.models.intrinsics import intrinsics_from_local_points
from speed3r_sfm.models.pi3 import Pi3, Pi3Config, cam_from_world_from_c2w, svd_orthogonalize
from speed3r_sfm.models.pi3 import model as pi3_model

OFFICIAL_LIST = Path(__file__).parent / "data" / "pi3_state_dict.txt"


def official_state_dict_list() -> tuple[list[tuple[str, tuple[int, ...]]], dict[str, int]]:
    """(ordered (key, shape) list, parameter count per submodule) of the official Pi3() state_dict."""
    keys, counts = [], {}
    for line in OFFICIAL_LIST.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.split("\t")
        if value.startswith("("):
            keys.append((name, tuple(int(d) for d in re.findall(r"\d+", value))))
        else:
            counts[name] = int(value)
    return keys, counts


def tiny_model(**overrides) -> Pi3:
    torch.manual_seed(0)
    return Pi3(Pi3Config.preset("tiny", **overrides)).eval()


def test_tiny_forward_shapes_and_consistency():
    model = tiny_model()
    images = torch.rand(2, 3, 3, 28, 42)
    with torch.no_grad():
        out = model(images)
    assert set(out) == {"points", "local_points", "conf", "camera_poses"}
    assert out["points"].shape == (2, 3, 28, 42, 3)
    assert out["local_points"].shape == (2, 3, 28, 42, 3)
    assert out["conf"].shape == (2, 3, 28, 42, 1)
    assert out["camera_poses"].shape == (2, 3, 4, 4)
    for value in out.values():
        assert value.dtype == torch.float32
        assert torch.isfinite(value).all()
    assert (out["local_points"][..., 2] > 0).all()
    poses = out["camera_poses"].double()
    assert torch.equal(out["camera_poses"][..., 3, :], torch.tensor([0.0, 0, 0, 1]).expand(2, 3, 4))
    rotation = poses[..., :3, :3]
    eye = torch.eye(3, dtype=torch.float64).expand_as(rotation)
    torch.testing.assert_close(rotation @ rotation.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    homogeneous = torch.cat(
        [out["local_points"].double(), torch.ones(2, 3, 28, 42, 1, dtype=torch.float64)], -1
    )
    expected = torch.einsum("bnij,bnhwj->bnhwi", poses, homogeneous)[..., :3]
    torch.testing.assert_close(out["points"].double(), expected, atol=1e-5, rtol=1e-5)
    # An unbatched (N, 3, H, W) input is one sequence.
    with torch.no_grad():
        single = model(images[0])
    torch.testing.assert_close(single["points"][0], out["points"][0], atol=1e-5, rtol=1e-5)


def test_predict_converts_to_common_prediction():
    model = tiny_model(cpu_bf16=False)  # float32, as forward
    images = torch.rand(1, 3, 3, 28, 42)
    with torch.no_grad():
        out = model(images)
        pred = model.predict(images)
    assert pred.cam_from_world.shape == (1, 3, 3, 4)
    assert pred.intrinsics.shape == (1, 3, 3, 3)
    assert pred.depth.shape == pred.depth_conf.shape == pred.world_points_conf.shape == (1, 3, 28, 42)
    assert pred.world_points.shape == (1, 3, 28, 42, 3)
    assert pred.image_size == (28, 42) and pred.num_views == 3
    torch.testing.assert_close(pred.depth, out["local_points"][..., 2])
    torch.testing.assert_close(pred.world_points, out["points"])
    torch.testing.assert_close(pred.depth_conf, torch.sigmoid(out["conf"][..., 0]))
    assert ((pred.depth_conf > 0) & (pred.depth_conf < 1)).all()
    # cam_from_world is the inverse of camera_poses: it maps world points back to local points.
    rotation, translation = pred.cam_from_world[..., :3], pred.cam_from_world[..., 3]
    back = torch.einsum("bnij,bnhwj->bnhwi", rotation, pred.world_points) + translation[:, :, None, None]
    torch.testing.assert_close(back, out["local_points"], atol=1e-4, rtol=1e-4)
    # Principal point fixed at the image centre in the integer-pixel-centre convention.
    torch.testing.assert_close(pred.intrinsics[..., 0, 2], torch.full((1, 3), 20.5))
    torch.testing.assert_close(pred.intrinsics[..., 1, 2], torch.full((1, 3), 13.5))
    expected_k = intrinsics_from_local_points(out["local_points"], pred.depth_conf, fix_principal_point=True)
    torch.testing.assert_close(pred.intrinsics, expected_k)
    assert torch.isfinite(pred.intrinsics).all()


def test_cam_from_world_inverts_rigid_pose():
    torch.manual_seed(1)
    rotation = svd_orthogonalize(torch.randn(5, 9, dtype=torch.float64))
    c2w = torch.eye(4, dtype=torch.float64).repeat(5, 1, 1)
    c2w[:, :3, :3], c2w[:, :3, 3] = rotation, torch.randn(5, 3, dtype=torch.float64)
    w2c = torch.cat([cam_from_world_from_c2w(c2w), c2w[:, 3:]], dim=1)
    torch.testing.assert_close(w2c, torch.linalg.inv(c2w))


def test_rejects_sizes_off_the_patch_grid():
    model = tiny_model()
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model(torch.rand(1, 2, 3, 30, 42))
    with pytest.raises(ValueError, match=r"\(B, N, 3, H, W\)"):
        model(torch.rand(1, 2, 1, 28, 42))


def test_full_size_state_dict_matches_official_list():
    expected, _ = official_state_dict_list()
    assert len(expected) == 1210
    with torch.device("meta"):
        model = Pi3(Pi3Config.preset("pi3"))
    actual = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    assert len(actual) == len(set(actual)) == 1210
    missing, unexpected = set(expected) - set(actual), set(actual) - set(expected)
    assert not missing and not unexpected, (
        f"missing: {sorted(missing)[:10]}, unexpected: {sorted(unexpected)[:10]}"
    )
    assert "encoder.mask_token" not in dict(actual)


def test_full_size_parameter_count():
    _, counts = official_state_dict_list()
    with torch.device("meta"):
        model = Pi3()
    assert sum(p.numel() for p in model.parameters()) == counts["TOTAL_PARAMS"] == 958_696_732
    buffers = dict(model.named_buffers())
    assert set(buffers) == {"image_mean", "image_std"} and sum(b.numel() for b in buffers.values()) == 6
    assert set(model.state_dict()) >= set(buffers)  # persistent
    # The list's per-submodule line for register_token (10240) contradicts its shape (1, 1, 5, 1024) and the
    # total; every module line is checked.
    assert model.register_token.shape == (1, 1, 5, 1024)
    for name, count in counts.items():
        if name not in ("TOTAL_PARAMS", "register_token"):
            module = (
                model.get_submodule(name) if not name.endswith(("_token", "_tokens", "pos_embed")) else None
            )
            numel = (
                model.get_parameter(name).numel()
                if module is None
                else sum(p.numel() for p in module.parameters())
            )
            assert numel == count, name


def test_mean_std_buffers_are_imagenet():
    model = tiny_model()
    torch.testing.assert_close(model.image_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(model.image_std.flatten(), torch.tensor([0.229, 0.224, 0.225]))


class RecordingAttention(DenseAttention):
    """Dense attention that records the layout it was called with."""

    def __init__(self, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index

    def forward(self, q, k, v, layout=None):
        assert layout is not None
        if layout.records is not None:
            layout.records.append({"layer": self.layer_index, "layout": layout, "tokens": q.shape[2]})
        return super().forward(q, k, v, layout)


def test_global_blocks_go_through_attention_hook(monkeypatch):
    calls = []

    def build(config, *, dim, num_heads, layer_index):
        calls.append((dim, num_heads, layer_index))
        return RecordingAttention(layer_index)

    monkeypatch.setattr(pi3_model, "build_global_attention", build)
    model = tiny_model(decoder_depth=6)
    assert calls == [(64, 2, 0), (64, 2, 1), (64, 2, 2)]
    for index, block in enumerate(model.decoder):
        assert isinstance(block.attn.attend, RecordingAttention) == (index % 2 == 1)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 3, 28, 42), return_attention=True)
    records = out["attention"]
    assert [r["layer"] for r in records] == [0, 1, 2]
    layout: ViewLayout = records[0]["layout"]
    assert (layout.num_views, layout.tokens_per_view, layout.num_special) == (3, 5 + 6, 5)
    assert layout.patch_grid == (2, 3)
    assert records[0]["tokens"] == 3 * (5 + 6)  # all views of one sequence in one attention call
    with torch.no_grad():
        assert "attention" not in model(torch.rand(1, 2, 3, 28, 42))


def test_permutation_equivariance():
    model = tiny_model().double()
    images = torch.rand(1, 5, 3, 28, 42, dtype=torch.float64)
    permutation = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        out = model(images)
        permuted = model(images[:, permutation])
    for key in ("points", "local_points", "conf", "camera_poses"):
        torch.testing.assert_close(permuted[key], out[key][:, permutation], atol=1e-10, rtol=1e-9, msg=key)
    assert out["camera_poses"].dtype == torch.float64
    # The views are not interchangeable: different views give different outputs (no trivial equivariance).
    assert not torch.allclose(out["local_points"][:, 0], out["local_points"][:, 1])


def _horn_rotation(target: np.ndarray) -> np.ndarray:
    """Rotation maximising trace(Rᵀ·target), by Horn's quaternion eigenvector method (float64)."""
    s = target.T
    n = np.array(
        [
            [s[0, 0] + s[1, 1] + s[2, 2], s[1, 2] - s[2, 1], s[2, 0] - s[0, 2], s[0, 1] - s[1, 0]],
            [s[1, 2] - s[2, 1], s[0, 0] - s[1, 1] - s[2, 2], s[0, 1] + s[1, 0], s[2, 0] + s[0, 2]],
            [s[2, 0] - s[0, 2], s[0, 1] + s[1, 0], -s[0, 0] + s[1, 1] - s[2, 2], s[1, 2] + s[2, 1]],
            [s[0, 1] - s[1, 0], s[2, 0] + s[0, 2], s[1, 2] + s[2, 1], -s[0, 0] - s[1, 1] + s[2, 2]],
        ]
    )
    w, x, y, z = np.linalg.eigh(n)[1][:, -1]
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def test_svd_orthogonalize_gives_closest_rotation():
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(64, 9, generator=generator)
    raw[:8] = -raw[:8]  # include matrices of negative determinant
    rotations = svd_orthogonalize(raw)
    assert rotations.dtype == torch.float32
    eye = torch.eye(3).expand(64, 3, 3)
    torch.testing.assert_close(rotations @ rotations.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.det(rotations), torch.ones(64), atol=1e-5, rtol=0)
    assert (torch.det(raw.reshape(64, 3, 3)) < 0).any()
    rows = torch.nn.functional.normalize(raw.double().reshape(64, 3, 3), dim=-1).numpy()
    reference = torch.from_numpy(np.stack([_horn_rotation(m) for m in rows])).float()
    torch.testing.assert_close(rotations, reference, atol=1e-4, rtol=0)
    # A rotation with rescaled rows is mapped back to itself.
    scaled = reference * torch.tensor([2.0, 0.5, 3.0]).reshape(1, 3, 1)
    torch.testing.assert_close(svd_orthogonalize(scaled.reshape(64, 9)), reference, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_same_gradients(monkeypatch):
    monkeypatch.setattr(pi3_model, "build_global_attention", lambda config, **kw: RecordingAttention(0))
    images = torch.rand(1, 2, 3, 28, 28)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(gradient_checkpointing=checkpointing).train()
        block_runs: list[int] = []
        model.decoder[0].register_forward_pre_hook(lambda module, args, runs=block_runs: runs.append(1))
        out = model(images, return_attention=True)
        loss = out["points"].square().mean() + out["conf"].mean() + out["camera_poses"].sum()
        loss.backward()
        assert len(block_runs) == (2 if checkpointing else 1)  # recomputed in backward
        assert len(out["attention"]) == 2  # one record per global block, not one per run
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_heads_in_float32():
    model = tiny_model()
    images = torch.rand(1, 2, 3, 28, 42)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert all(value.dtype == torch.float32 for value in out.values())
    rotation = out["camera_poses"][..., :3, :3]
    torch.testing.assert_close(torch.det(rotation), torch.ones(1, 2), atol=1e-5, rtol=0)


def test_gsa_selecting_every_block_matches_dense():
    """Through the hook, GSA (training-free init) that keeps every key block reproduces dense attention."""
    gsa = AttentionConfig(
        kind="gsa", block_size=2, compression_block_size=2, query_block_size=4, top_k=64, backend="gather"
    )
    dense_model = tiny_model()
    sparse_model = Pi3(Pi3Config.preset("tiny", attention=gsa)).eval()
    missing, unexpected = sparse_model.load_state_dict(dense_model.state_dict(), strict=False)
    assert not unexpected and missing and all(".attn.attend." in key for key in missing)
    assert {key.split(".")[1] for key in missing} == {"1", "3"}  # the global blocks
    images = torch.rand(1, 3, 3, 28, 42)
    with torch.no_grad():
        dense, sparse = dense_model(images), sparse_model(images, return_attention=True)
    assert [record["layer_index"] for record in sparse["attention"]] == [0, 1]
    for key in ("points", "local_points", "conf", "camera_poses"):
        torch.testing.assert_close(sparse[key], dense[key], atol=1e-4, rtol=1e-4, msg=key)


def test_pixel_limit_preprocessing_feeds_pi3():
    frames = [Image.new("RGB", (1920, 1080), color) for color in ((200, 30, 30), (30, 200, 30))]
    images, _ = preprocess_images(frames, mode=Pi3.preprocessing_mode)
    assert images.shape == (2, 3, 378, 672)  # the official loader's size for 16:9
    assert images.shape[-1] * images.shape[-2] <= 255_000
    with torch.no_grad():
        out = tiny_model()(images)
    assert out["points"].shape == (1, 2, 378, 672, 3)


def test_predict_runs_bf16_on_cpus_with_native_bf16(monkeypatch, attention_dtypes):
    from speed3r_sfm.models.pi3 import model as pi3_module

    torch.manual_seed(0)
    model = tiny_model()
    images = torch.rand(1, 3, 3, 28, 42)
    seen = attention_dtypes(model)
    monkeypatch.setattr(pi3_module, "cpu_has_native_bf16", lambda: False)
    exact = model.predict(images)
    assert set(seen) == {torch.float32}
    monkeypatch.setattr(pi3_module, "cpu_has_native_bf16", lambda: True)  # any CPU can run bf16 autocast
    seen.clear()
    fast = model.predict(images)
    assert seen and set(seen) == {torch.bfloat16}
    for key in ("depth", "world_points", "cam_from_world", "intrinsics"):
        a, b = getattr(exact, key), getattr(fast, key)
        assert b.dtype == a.dtype == torch.float32, key  # the heads stay float32
        assert not torch.equal(a, b), key
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.05, msg=key)
    model.config.cpu_bf16 = False
    assert torch.equal(model.predict(images).depth, exact.depth)


def test_a_model_cast_to_bfloat16_runs():
    """Lightning's precision="bf16-true" casts the model: the float32 heads met bfloat16 weights, and the
    camera head's SVD has no bfloat16 kernel."""
    torch.manual_seed(0)
    model = Pi3(Pi3Config.preset("tiny")).eval()
    images = torch.rand(1, 2, 3, 28, 42)
    with torch.no_grad():
        full = model(images)
        half = model.to(torch.bfloat16)(images.bfloat16())
    for key in ("local_points", "conf", "camera_poses"):
        assert half[key].dtype == torch.bfloat16
        error = (half[key].float() - full[key]).abs().max() / full[key].abs().max()
        assert error < 0.03, key
