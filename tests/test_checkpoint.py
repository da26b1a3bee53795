"""Checkpoints: reading, strict loading with readable errors, both official formats, Hub resolution."""

from __future__ import annotations

import socket

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file

from speed3r_sfm.models.checkpoint import (
    CheckpointDownloadError,
    CheckpointError,
    CheckpointMismatchError,
    load_state_dict_checked,
    read_state_dict,
    resolve_checkpoint,
    save_checkpoint,
)
from speed3r_sfm.models.vggt import VGGT, VGGTConfig


def tiny(seed: int = 0, **overrides) -> VGGT:
    torch.manual_seed(seed)
    return VGGT(VGGTConfig.preset("tiny", **overrides)).eval()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip_in_official_format_gives_equal_outputs(tmp_path, suffix):
    model = tiny(0)
    path = save_checkpoint(model, tmp_path / f"model{suffix}")
    raw = torch.load(path, weights_only=True) if suffix == ".pt" else load_file(path)
    assert isinstance(raw, dict) and sorted(raw) == sorted(model.state_dict())  # bare, official names
    assert all(isinstance(v, torch.Tensor) for v in raw.values())
    assert "aggregator._resnet_mean" not in raw and "track_head.tracker.updateformer.virual_tracks" in raw

    reloaded = VGGT.from_pretrained(path, config=VGGTConfig.preset("tiny"))
    assert not reloaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    images = torch.rand(1, 2, 3, 28, 42)
    queries = torch.tensor([[4.0, 7.0], [30.0, 20.0]])
    with torch.no_grad():
        a, b = model(images, query_points=queries), reloaded(images, query_points=queries)
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
        assert torch.equal(a[key], b[key]), key


def test_training_dict_and_ddp_prefix_are_unwrapped(tmp_path):
    state = tiny(0).state_dict()
    torch.save({"model": state, "optimizer": {"lr": 1e-4}, "epoch": 3, "steps": 10}, tmp_path / "train.pt")
    assert list(read_state_dict(tmp_path / "train.pt")) == list(state)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    assert list(read_state_dict(tmp_path / "ddp.pth")) == list(state)


def test_wrapper_prefixes_are_stripped_in_both_formats(tmp_path):
    """``module.`` (DistributedDataParallel) and ``model.`` (a wrapping module) prefixes, also nested, in
    ``.pt`` and ``.safetensors`` files alike (a ``module.`` safetensors file had been rejected)."""
    state = tiny(0).state_dict()
    for prefix in ("module.", "model.", "module.model."):
        wrapped = {f"{prefix}{k}": v for k, v in state.items()}
        for suffix in (".pt", ".safetensors"):
            path = save_checkpoint(wrapped, tmp_path / f"w{suffix}")
            assert sorted(read_state_dict(path)) == sorted(state), (prefix, suffix)
    mixed = {**state, "model.extra": torch.zeros(1)}  # not every key: nothing is stripped
    assert "aggregator.camera_token" in read_state_dict(save_checkpoint(mixed, tmp_path / "m.pt"))


def test_a_gsa_checkpoint_loads_into_a_dense_model(tmp_path):
    from speed3r_sfm.attention import AttentionConfig

    gsa = AttentionConfig(
        kind="gsa", block_size=2, compression_block_size=2, query_block_size=2, top_k=1, backend="gather"
    )
    torch.manual_seed(0)
    source = VGGT(VGGTConfig.preset("tiny", enable_track=False, attention=gsa)).eval()
    path = save_checkpoint(source, tmp_path / "gsa.pt")
    dense = VGGT.from_pretrained(
        path, config=VGGTConfig.preset("tiny", enable_track=False), attention=AttentionConfig(kind="dense")
    )
    assert not any("attend.gate" in key for key in dense.state_dict())
    assert torch.equal(dense.aggregator.camera_token, source.aggregator.camera_token)


def test_mismatched_checkpoint_lists_missing_unexpected_and_shapes(tmp_path):
    state = tiny(0).state_dict()
    del state["camera_head.embed_pose.bias"]
    state["aggregator.extra_weight"] = torch.zeros(3)
    state["depth_head.norm.weight"] = torch.zeros(7)
    path = save_checkpoint(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointMismatchError) as info:
        VGGT.from_pretrained(path, config=VGGTConfig.preset("tiny"))
    message = str(info.value)
    assert str(path) in message
    assert "1 missing keys" in message and "camera_head.embed_pose.bias (128,)" in message
    assert "1 unexpected keys" in message and "aggregator.extra_weight (3,)" in message
    assert "depth_head.norm.weight: (7,) vs (128,)" in message
    assert info.value.missing == ["camera_head.embed_pose.bias"]
    assert info.value.mismatched == [("depth_head.norm.weight", (7,), (128,))]


def test_wrong_preset_lists_many_keys_compactly():
    with pytest.raises(CheckpointMismatchError, match=r"and \d+ more") as info:
        load_state_dict_checked(
            tiny(0), tiny(0, depth=5, dpt_layers=(0, 1, 2, 4)).state_dict(), source="x.pt"
        )
    assert "checkpoint x.pt does not match VGGT" in str(info.value)


def test_allow_missing_and_disabled_heads(tmp_path):
    path = save_checkpoint(tiny(0), tmp_path / "model.safetensors")
    no_track = VGGT.from_pretrained(path, config=VGGTConfig.preset("tiny", enable_track=False))
    assert no_track.track_head is None  # the file's track-head weights are ignored

    state = tiny(0).state_dict()
    gate = "aggregator.global_blocks.0.attn.attend.gate"
    model = tiny(1)
    model.aggregator.global_blocks[0].attn.attend.register_parameter(
        "gate", torch.nn.Parameter(torch.ones(2))
    )
    with pytest.raises(CheckpointMismatchError, match=gate):
        load_state_dict_checked(model, state)
    load_state_dict_checked(model, state, allow_missing=lambda key: key.endswith(".attend.gate"))
    assert torch.equal(model.aggregator.camera_token, state["aggregator.camera_token"])
    assert torch.equal(model.aggregator.global_blocks[0].attn.attend.gate, torch.ones(2))


def test_shared_tensors_are_saved_as_separate_keys(tmp_path):
    weight = torch.randn(4, 4)
    path = save_checkpoint(
        {"a.weight": weight, "b.weight": weight, "c.view": weight[:2]}, tmp_path / "s.safetensors"
    )
    loaded = load_file(path)
    assert set(loaded) == {"a.weight", "b.weight", "c.view"}
    assert torch.equal(loaded["b.weight"], weight) and torch.equal(loaded["c.view"], weight[:2])
    with pytest.raises(ValueError, match="unsupported checkpoint suffix"):
        save_checkpoint({"a": weight}, tmp_path / "model.npz")


def test_unreadable_files_name_the_file(tmp_path):
    for name in ("broken.safetensors", "broken.pt"):
        (tmp_path / name).write_bytes(b"this is not a checkpoint")
        with pytest.raises(CheckpointError, match=name):
            read_state_dict(tmp_path / name)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no state_dict"):
        read_state_dict(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        resolve_checkpoint(tmp_path / "missing.pt", default_repo="facebook/VGGT-1B")


def test_resolve_local_file_and_folder(tmp_path):
    path = save_checkpoint({"w": torch.zeros(1)}, tmp_path / "model.pt")
    assert resolve_checkpoint(path) == path
    assert resolve_checkpoint(tmp_path, filenames=("model.safetensors", "model.pt")) == path
    with pytest.raises(FileNotFoundError, match="holds none of"):
        resolve_checkpoint(tmp_path, filenames=("model.safetensors",))


def test_offline_hub_gives_a_clear_error_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("the offline path must not open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(CheckpointDownloadError) as info:
        VGGT.from_pretrained("facebook/VGGT-1B")
    message = str(info.value)
    assert "facebook/VGGT-1B" in message and "offline" in message
    assert "model.safetensors" in message and "model.pt" in message
    assert "pass its local path" in message and "--model /path/to/model.safetensors" in message


def test_hub_id_goes_through_hf_hub_download(tmp_path, monkeypatch):
    import huggingface_hub

    path = save_checkpoint(tiny(0), tmp_path / "model.safetensors")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs["local_files_only"]))
        return str(path)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = VGGT.from_pretrained("facebook/VGGT-1B", config=VGGTConfig.preset("tiny"))
    assert calls == [("facebook/VGGT-1B", "model.safetensors", huggingface_hub.is_offline_mode())]
    assert torch.equal(model.aggregator.camera_token, tiny(0).aggregator.camera_token)
    assert resolve_checkpoint("hf://owner/repo/sub/weights.pt") == path
    assert calls[-1][:2] == ("owner/repo", "sub/weights.pt")


def test_an_unreachable_hub_is_asked_once_then_the_cache(tmp_path, monkeypatch):
    """Without a network each file name waited for the same timeouts (49 s for VGGT-1B's two names):
    after the first connection failure the other names come from the cache only."""
    import huggingface_hub

    path = save_checkpoint(tiny(0), tmp_path / "model.pt")
    calls = []

    def unreachable(repo_id, filename, **kwargs):
        calls.append((filename, kwargs["local_files_only"]))
        if filename == "model.pt" and kwargs["local_files_only"]:
            return str(path)  # cached from an earlier download
        raise OSError("Connection to huggingface.co timed out (simulated)")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    assert resolve_checkpoint("facebook/VGGT-1B", filenames=("model.safetensors", "model.pt")) == path
    assert calls == [("model.safetensors", False), ("model.pt", True)]
    calls.clear()
    with pytest.raises(CheckpointDownloadError, match="could not be reached") as info:
        resolve_checkpoint("facebook/VGGT-1B", filenames=("model.safetensors", "other.pt"))
    assert calls == [("model.safetensors", False), ("other.pt", True)]
    assert "--model /path/to/model.safetensors" in str(info.value)


def test_dense_checkpoint_loads_into_a_gsa_model(tmp_path):
    from speed3r_sfm.attention import AttentionConfig

    path = save_checkpoint(tiny(0), tmp_path / "dense.safetensors")
    gsa = AttentionConfig(
        kind="gsa", block_size=2, compression_block_size=2, query_block_size=2, top_k=1, backend="gather"
    )
    model = VGGT.from_pretrained(path, config=VGGTConfig.preset("tiny", enable_track=False), attention=gsa)
    assert any(key.endswith("attend.gate.weight") for key in model.state_dict())
    prediction = model.predict(torch.rand(1, 3, 3, 28, 42), return_attention=True)
    assert len(prediction.attention) == model.config.depth
    assert [record["layer_index"] for record in prediction.attention] == list(range(model.config.depth))
    assert torch.isfinite(prediction.depth).all()
