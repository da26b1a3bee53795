"""Backbones for training: build VGGT or π³ from a small spec, load and export their weights.

A :class:`BackboneSpec` names the architecture (``"vggt"`` or ``"pi3"``), a preset (the backbones' own
presets plus the training presets of ``TRAINING_PRESETS``), field overrides and the global attention.
Exported weights are a safetensors file plus a JSON sidecar with the full model config, so they can be
loaded without knowing the preset (:func:`load_exported`).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attention import AttentionConfig, is_gsa_parameter
from ..models.checkpoint import load_state_dict_checked, read_state_dict, save_checkpoint
from ..models.layers.dinov2 import DinoConfig
from ..models.pi3 import Pi3, Pi3Config
from ..models.vggt import VGGT, VGGTConfig

MODEL_NAMES = ("vggt", "pi3")
EXPORT_FORMAT = "speed3r-sfm/weights-v1"

OFFICIAL_PRESETS = {"vggt": ("vggt-1b", "tiny"), "pi3": ("pi3", "tiny")}  # the model configs' own
# Training presets, as overrides of the backbone's "tiny" preset. "small" is the model shipped as the
# offline default: ~6.9 M parameters (13.8 MB in float16), 224 px wide inputs (16 x 21 patches at 224 x 294).
TRAINING_PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("vggt", "small"): {
        "img_size": 224,
        "embed_dim": 128,
        "depth": 8,
        "num_heads": 2,
        "dino": {"img_size": 224, "embed_dim": 128, "depth": 4, "num_heads": 2, "num_register_tokens": 4},
        "dpt_features": 64,
        "dpt_out_channels": (32, 64, 128, 128),
        "dpt_layers": (1, 3, 5, 7),
        "camera_trunk_depth": 2,
        "camera_num_heads": 4,
        "enable_track": False,
        "enable_point": False,
    },
    ("pi3", "small"): {
        "encoder": {
            "img_size": 224,
            "embed_dim": 128,
            "depth": 4,
            "num_heads": 2,
            "num_register_tokens": 4,
            "with_mask_token": False,
        },
        "decoder_depth": 12,
        "decoder_num_heads": 2,
        "head_embed_dim": 128,
        "head_depth": 2,
        "head_num_heads": 2,
        "camera_dim": 128,
    },
}

_NESTED = {"dino": DinoConfig, "encoder": DinoConfig, "attention": AttentionConfig}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (nested dicts are merged, other values replaced)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_from_dict(config_cls: type, data: dict[str, Any]) -> Any:
    """A VGGTConfig / Pi3Config from a (possibly JSON-decoded) dict: nested dataclasses from dicts, lists
    back to tuples where the field's default is a tuple. Unknown keys raise ``TypeError``."""
    defaults = config_cls()
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise TypeError(f"unknown {config_cls.__name__} fields {unknown}; valid fields: {sorted(valid)}")
    kwargs = {}
    for key, value in data.items():
        if key in _NESTED and isinstance(value, dict):
            nested = dict(value)
            if key == "attention" and nested.get("gsa_layers") is not None:
                nested["gsa_layers"] = tuple(nested["gsa_layers"])
            value = _NESTED[key](**nested)
        elif isinstance(value, list) and isinstance(getattr(defaults, key), tuple):
            value = tuple(value)
        kwargs[key] = value
    return config_cls(**kwargs)


def _config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


@dataclass
class BackboneSpec:
    """What to build. ``overrides`` replace config fields (nested dicts merge into ``dino``/``encoder``);
    ``attention`` holds :class:`AttentionConfig` fields (None: the preset's, i.e. dense)."""

    name: str = "vggt"
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    attention: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.name!r}; choose one of {MODEL_NAMES}")
        presets = (*OFFICIAL_PRESETS[self.name], *(p for n, p in TRAINING_PRESETS if n == self.name))
        if self.preset not in presets:
            raise ValueError(f"unknown {self.name} preset {self.preset!r}; choose one of {presets}")
        self.overrides = dict(self.overrides or {})
        if isinstance(self.attention, AttentionConfig):
            self.attention = dataclasses.asdict(self.attention)
        if self.attention is not None:  # a misspelt key fails here, not after the CLI printed the config
            known = {f.name for f in dataclasses.fields(AttentionConfig)}
            unknown = sorted(set(self.attention) - known)
            if unknown:
                raise ValueError(f"unknown attention options {unknown}; AttentionConfig has {sorted(known)}")

    @property
    def config_cls(self) -> type:
        return VGGTConfig if self.name == "vggt" else Pi3Config

    def config(self) -> VGGTConfig | Pi3Config:
        """The full model config."""
        cls = self.config_cls
        training = TRAINING_PRESETS.get((self.name, self.preset))
        base = cls.preset("tiny") if training is not None else cls.preset(self.preset)
        data = _config_dict(base)
        if training is not None:
            data = _merge(data, training)
        data = _merge(data, self.overrides)
        if self.attention is not None:
            data["attention"] = dict(self.attention)
        return config_from_dict(cls, data)

    def with_attention(self, attention: dict[str, Any] | AttentionConfig | None) -> BackboneSpec:
        if isinstance(attention, AttentionConfig):
            attention = dataclasses.asdict(attention)
        return dataclasses.replace(self, overrides=dict(self.overrides), attention=attention)

    def build(self) -> nn.Module:
        """A freshly initialised model."""
        config = self.config()
        return VGGT(config) if self.name == "vggt" else Pi3(config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_any(cls, value: BackboneSpec | dict[str, Any] | None) -> BackboneSpec:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        return cls(**value)


def uses_gsa(model: nn.Module) -> bool:
    return model.config.attention.kind == "gsa"


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Backbone weights from a ``.safetensors``/``.pt`` state_dict or a Lightning ``.ckpt`` of
    :class:`~speed3r_sfm.training.module.ReconstructionModule` (its ``model.`` entries)."""
    path = Path(path)
    if path.suffix != ".ckpt":
        return read_state_dict(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    data = torch.load(path, map_location="cpu", weights_only=True)
    state = data.get("state_dict") if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    if not weights:
        raise ValueError(f"{path} holds no 'model.*' weights (keys: {sorted(state)[:5]}...)")
    return weights


def load_weights(
    model: nn.Module, path: str | os.PathLike, allow_missing_gsa: bool = True, ignore_gsa: bool = False
) -> None:
    """Strictly load backbone weights into ``model``. GSA parameters absent from the file keep their
    training-free init when ``allow_missing_gsa``; GSA parameters in the file that the model lacks (a GSA
    checkpoint loaded into a dense model) are skipped when ``ignore_gsa``."""
    state = read_weights(path)
    load_state_dict_checked(
        model,
        state,
        source=path,
        allow_missing=is_gsa_parameter if allow_missing_gsa else None,
        ignore_unexpected=is_gsa_parameter if ignore_gsa else None,
    )


def export_weights(
    model: nn.Module,
    spec: BackboneSpec,
    path: str | os.PathLike,
    dtype: str | torch.dtype = "float16",
    info: dict[str, Any] | None = None,
    pipeline: dict[str, Any] | None = None,
) -> Path:
    """Write the model's weights (parameters cast to ``dtype``, buffers as they are) to a ``.safetensors``
    file and the JSON sidecar ``<path>.json`` (model name, full config, dtype, parameter count, ``info``, and
    the ``pipeline`` settings: :data:`PIPELINE_KEYS`)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"export path {path} must end in .safetensors")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    parameters = {name for name, _ in model.named_parameters()}
    state = {
        key: (value.detach().to(dtype) if key in parameters and value.is_floating_point() else value.detach())
        for key, value in model.state_dict().items()
    }
    config = model.config
    meta = {
        "format": EXPORT_FORMAT,
        "model": spec.name,
        "preset": spec.preset,
        "config": _config_dict(config),
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "info": info or {},
        **{key: value for key, value in (pipeline or {}).items() if key in PIPELINE_KEYS},
    }
    save_checkpoint(state, path, metadata={"speed3r_sfm": json.dumps({"model": spec.name})})
    sidecar(path).write_text(json.dumps(meta, indent=2) + "\n")
    return path


# sidecar entries that tell the pipeline how to run exported weights (``pipeline/backbone.py``)
PIPELINE_KEYS = (
    "preprocessing",
    "pipeline_attention",
    "pipeline_attention_why",
    "gsa_from_views",
    "gsa_from_views_why",
    "gsa_guidance",
    "gsa_guidance_why",
    # inputs the model was measured to fail on; a fine-tune keeps them until they are measured again (a
    # model fine-tuned for such inputs: edit its sidecar)
    "input_warnings",
    "pipeline_settings_from",
)


# where a training checkpoint (.ckpt) keeps the pipeline settings of its weights
CHECKPOINT_PIPELINE_KEY = "speed3r_sfm_pipeline"


def inherit_pipeline_settings(path: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """What weights fine-tuned from ``path`` keep of it: the pipeline settings of an exported checkpoint
    (:data:`PIPELINE_KEYS` of its sidecar, and where they came from) or of a training checkpoint (.ckpt,
    :data:`CHECKPOINT_PIPELINE_KEY`) and, where ``model``'s config leaves it unset, its descriptor layer (set
    on ``model``: token poses need it). Empty for other checkpoints."""
    if Path(path).suffix == ".ckpt":
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        stored = data.get(CHECKPOINT_PIPELINE_KEY) or {} if isinstance(data, dict) else {}
        meta = {
            "config": {"descriptor_layer": stored.get("descriptor_layer")},
            **(stored.get("settings") or {}),
        }
    else:
        side = sidecar(path)
        if Path(path).suffix != ".safetensors" or not side.is_file():
            return {}
        meta = json.loads(side.read_text())
        if meta.get("format") != EXPORT_FORMAT:
            return {}
    layer = meta.get("config", {}).get("descriptor_layer")
    if layer is not None and getattr(model.config, "descriptor_layer", 0) is None:
        model.config.descriptor_layer = layer
    settings = {key: meta[key] for key in PIPELINE_KEYS if key in meta}
    if settings:
        settings.setdefault("pipeline_settings_from", str(path))
    return settings


def sidecar(path: str | os.PathLike) -> Path:
    """``weights.safetensors`` -> ``weights.json``."""
    return Path(path).with_suffix(".json")


def load_exported(
    path: str | os.PathLike,
    attention: dict[str, Any] | AttentionConfig | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A model from :func:`export_weights` output, in float32 and eval mode, with the sidecar's
    ``preprocessing``, ``gsa_guidance`` and ``input_warnings`` as attributes (what
    ``reconstruct(model=module)`` reads). ``attention`` replaces the stored global attention (e.g. dense
    weights run as training-free GSA: GSA gates missing from the file keep their init; GSA gates in the file
    are dropped for a dense model)."""
    meta = json.loads(sidecar(path).read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{sidecar(path)} is not a {EXPORT_FORMAT} sidecar")
    cls = VGGTConfig if meta["model"] == "vggt" else Pi3Config
    data = dict(meta["config"])
    if attention is not None:
        data["attention"] = (
            dataclasses.asdict(attention) if isinstance(attention, AttentionConfig) else attention
        )
    config = config_from_dict(cls, data)
    model = VGGT(config) if meta["model"] == "vggt" else Pi3(config)
    load_weights(model, path, allow_missing_gsa=True, ignore_gsa=config.attention.kind != "gsa")
    # what reconstruct(model=<this module>) reads (pipeline.backbone.preprocessing_of, Backbone.gsa_guidance)
    if "preprocessing" in meta:
        model.preprocessing = dict(meta["preprocessing"])
    model.gsa_guidance = bool(meta.get("gsa_guidance", True))
    model.input_warnings = dict(meta.get("input_warnings", {}))
    return model.float().eval().to(device)


def global_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the ``attn.attend`` kernel of every global-attention block, in depth order."""
    if isinstance(model, VGGT):
        return [
            (f"aggregator.global_blocks.{i}.attn.attend", block.attn.attend)
            for i, block in enumerate(model.aggregator.global_blocks)
        ]
    if isinstance(model, Pi3):
        return [
            (f"decoder.{i}.attn.attend", block.attn.attend)
            for i, block in enumerate(model.decoder)
            if i % 2 == 1
        ]
    raise TypeError(f"no global attention known for {type(model).__name__}")


def freeze_parameters(model: nn.Module, patterns: list[str] | tuple[str, ...]) -> list[str]:
    """``requires_grad = False`` for parameters whose name matches one of the fnmatch ``patterns`` (e.g.
    ``"aggregator.patch_embed*"``); returns the frozen names. A pattern matching nothing raises."""
    names = [name for name, _ in model.named_parameters()]
    frozen = []
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise ValueError(f"freeze pattern {pattern!r} matches no parameter of {type(model).__name__}")
        frozen.extend(hits)
    frozen = sorted(set(frozen))
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen
