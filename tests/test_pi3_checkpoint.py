"""π³ checkpoints: round trip in the official format, clear errors for mismatched or unreachable files."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file, save_file

from speed3r_sfm.attention import AttentionConfig
from speed3r_sfm.models.checkpoint import CheckpointDownloadError, CheckpointMismatchError
from speed3r_sfm.models.pi3 import Pi3, Pi3Config

TINY = Pi3Config.preset("tiny")


def official_format_file(model: Pi3, path) -> None:
    """A flat safetensors file keyed like the official ``model.safetensors``."""
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))


def test_round_trip_in_official_format(tmp_path):
    torch.manual_seed(0)
    model = Pi3(TINY).eval()
    path = tmp_path / "model.safetensors"
    official_format_file(model, path)
    stored = load_file(str(path))
    assert "image_mean" in stored and "register_token" in stored and "encoder.mask_token" not in stored

    torch.manual_seed(1)  # different random init: everything must come from the file
    loaded = Pi3.from_pretrained(path, config=TINY)
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.rand(1, 3, 3, 28, 42)
    with torch.no_grad():
        expected, actual = model(images), loaded(images)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    # A folder holding model.safetensors works as well.
    assert torch.equal(Pi3.from_pretrained(tmp_path, config=TINY).register_token, model.register_token)


def test_mismatched_checkpoint_names_keys_and_file(tmp_path):
    model = Pi3(TINY)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    del state["camera_head.fc_rot.weight"]
    state["encoder.mask_token"] = torch.zeros(1, 64)
    state["point_head.proj.weight"] = torch.zeros(10, 64)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointMismatchError) as info:
        Pi3.from_pretrained(path, config=TINY)
    message = str(info.value)
    assert str(path) in message
    assert "camera_head.fc_rot.weight" in message and "encoder.mask_token" in message
    assert "point_head.proj.weight: (10, 64) vs (588, 64)" in message
    assert info.value.missing == ["camera_head.fc_rot.weight"]


def test_tiny_checkpoint_does_not_load_into_full_size_config(tmp_path):
    path = tmp_path / "model.safetensors"
    official_format_file(Pi3(TINY), path)
    with torch.device("meta"), pytest.raises(CheckpointMismatchError) as info:
        Pi3.from_pretrained(path, config=Pi3Config.preset("pi3"))  # on meta: no 3.8 GB allocation
    assert "encoder.pos_embed: (1, 17, 64) vs (1, 1370, 1024)" in str(info.value)
    assert "missing keys" in str(info.value)  # decoder blocks 4..35
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        Pi3.from_pretrained(path, config=Pi3Config.preset("tiny", decoder_depth=6))


def test_gsa_model_loads_dense_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    official_format_file(Pi3(TINY), path)
    model = Pi3.from_pretrained(path, config=TINY, attention=AttentionConfig(kind="gsa"))
    assert model.config.attention.kind == "gsa"
    gates = {key: value for key, value in model.state_dict().items() if ".attn.attend." in key}
    assert set(gates) == {f"decoder.{i}.attn.attend.gate.{p}" for i in (1, 3) for p in ("weight", "bias")}
    assert all(torch.count_nonzero(value) == 0 for value in gates.values())  # training-free init
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        Pi3.from_pretrained(path, config=TINY, attention=AttentionConfig(kind="gsa"), allow_missing=None)


def test_unreachable_hub_checkpoint_explains_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointDownloadError) as info:
        Pi3.from_pretrained("yyfz233/Pi3", config=TINY)
    message = str(info.value)
    assert "yyfz233/Pi3" in message and "model.safetensors" in message and "local" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Pi3.from_pretrained(tmp_path / "missing.safetensors", config=TINY)
