"""Turning the ``model=`` argument of :func:`reconstruct` into a predictor and its preprocessing.

``model`` may be

- ``"default"``: the shipped weights (``speed3r_sfm/weights/default.safetensors``, see MODEL_CARD.md);
- a ``.safetensors`` file exported by ``speed3r_sfm.training`` (it has a ``.json`` sidecar);
- a Hugging Face Hub id (``facebook/VGGT-1B``, ``yyfz233/Pi3``, ``owner/name``) or a local checkpoint file or
  folder: the backbone class is recognised from the checkpoint's keys and built with ``attention``;
- a built ``nn.Module`` with ``predict(images, return_attention=...) -> Prediction`` (e.g. the tiny VGGT);
- any callable ``images (1, S, 3, H, W) -> Prediction`` (e.g. the synthetic oracle of tests).

The rest of the pipeline only sees a :class:`Backbone`: a ``predict`` function and the
:class:`~speed3r_sfm.pipeline.inputs.Preprocessing` the backbone expects; it never branches on the
architecture. With GSA, the model's attention records guide keypoints and matching unless the model says
its block selection should not (``gsa_guidance`` in an exported model's sidecar, or a module attribute of
that name; :attr:`Backbone.guided`). The preprocessing comes from the model's ``preprocessing`` attribute
when it has one, else from the backbone's config (VGGT: ``crop`` at its ``img_size``; π³: ``pixel_limit``),
and can be overridden by the caller.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from speed3r_sfm.attention import AttentionConfig
from speed3r_sfm.models.prediction import Prediction

from .inputs import Preprocessing

logger = logging.getLogger(__name__)

AttentionKind = Literal["auto", "gsa", "dense"]
"""``"auto"``: what the model declares: exported weights their sidecar's ``pipeline_attention`` (else their
stored attention; GSA from the sidecar's ``gsa_from_views`` views per pass on, a number or one per device
type), a built module GSA if it has GSA blocks, official checkpoints GSA (on CUDA from
``OFFICIAL_GSA_FROM_VIEWS`` views per pass: :func:`official_attention`)."""
ModelSpec = str | os.PathLike | nn.Module | Callable[[torch.Tensor], Prediction]

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "default.safetensors"
KNOWN_HUB_IDS = {"facebook/VGGT-1B": "vggt", "yyfz233/Pi3": "pi3"}
# Official checkpoints under attention="auto": GSA from this many views per pass on, per device type (others:
# always). On CUDA GSA's FlexAttention compiles on its first call in a process. VGGT-1B shape, bf16, H200,
# first calls dense vs GSA: 1.3 vs 13.9 s at 32 views, 18.8 vs 18.7 s at 256 (then 17.9 vs 3.4 s a call):
# they break even at 256 (cuda_forward_first_call.md).
OFFICIAL_GSA_FROM_VIEWS = {"cuda": 256}


class ModelNotAvailableError(RuntimeError):
    """The requested model cannot be loaded (e.g. the default weights are not shipped yet)."""


@dataclass
class Backbone:
    """What the pipeline needs from a model."""

    predict: Callable[[torch.Tensor], Prediction]  # (1, S, 3, H, W) in [0, 1] -> Prediction (B = 1)
    preprocessing: Preprocessing
    name: str
    device: torch.device
    module: nn.Module | None = None  # the network, when the model is one (its token encoder groups views)
    attention: Literal["gsa", "dense"] = "gsa"  # what it runs (``"auto"`` resolved)
    # the model's GSA records may guide keypoints and matching; False: GSA only makes the forward pass
    # cheaper and the pipeline uses texture keypoints and geometric view pairs, as with dense attention
    gsa_guidance: bool = True
    # ``predict`` plus ``extras["tracker"]`` (models with a track head, e.g. VGGT-1B); None without one
    predict_with_tracker: Callable[[torch.Tensor], Prediction] | None = None
    # what the model's makers measured it to do badly on, by kind of input ("low_colour", "grayscale"),
    # logged when a run's images are of that kind (an exported model's sidecar ``input_warnings``)
    input_warnings: dict[str, str] = field(default_factory=dict)
    # what attention="auto" runs for a number of views per pass (a model loaded by name or path; None: the
    # count does not decide), to choose again when fewer views than files were read
    attention_for_views: Callable[[int], Literal["gsa", "dense"]] | None = None

    @property
    def guided(self) -> bool:
        """GSA records choose keypoints and view pairs (and ``predict`` asks the model for them)."""
        return self.attention == "gsa" and self.gsa_guidance


class DeviceNotAvailableError(ValueError):
    """The device asked for is not there (or not a device)."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; raises :class:`DeviceNotAvailableError`, saying why, for
    a device that is not there (an unknown name, CUDA without a GPU or a CUDA build of torch, a GPU index
    out of range) or that the pipeline does not run on (mps, xpu, meta, ...)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        message = f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        raise DeviceNotAvailableError(message) from error
    if resolved.type == "cpu":
        return torch.device("cpu")  # "cpu:5" names the same device
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceNotAvailableError(
                f"device {device!r}: CUDA is not available here (no GPU, or a CPU build of torch "
                f"{torch.__version__}); use device 'cpu' or 'auto'"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise DeviceNotAvailableError(f"device {device!r}: only {count} CUDA device(s) here")
        return resolved
    raise DeviceNotAvailableError(  # mps, xpu, meta, ...: the pipeline runs on CUDA or the CPU
        f"device {device!r} is not supported: use 'auto', 'cpu', 'cuda' or 'cuda:N'"
    )


def check_model_spec(model: ModelSpec) -> None:
    """Fail at once, before other work, for a model name that cannot load: empty, the shipped weights
    missing, or a path that is not there (Hub ids are checked when they are downloaded)."""
    if not isinstance(model, str | os.PathLike):
        return
    text = os.fspath(model)
    if not text.strip():
        raise ModelNotAvailableError(
            "model is empty: pass 'default', a Hub id ('facebook/VGGT-1B', 'yyfz233/Pi3') or a checkpoint "
            "path"
        )
    if text == "default":
        if not DEFAULT_WEIGHTS.is_file():
            raise ModelNotAvailableError(
                f"the default model weights are missing ({DEFAULT_WEIGHTS}); reinstall speed3r-sfm, or pass "
                "model= a Hub id ('facebook/VGGT-1B', 'yyfz233/Pi3') or a checkpoint path"
            )
        return
    from speed3r_sfm.models.checkpoint import looks_like_hub_id

    if not Path(text).expanduser().exists() and not looks_like_hub_id(text):
        names = {name.lower(): name for name in ["default", *KNOWN_HUB_IDS]}
        known = difflib.get_close_matches(text.lower(), names, n=1, cutoff=0.75)
        guess = f" (did you mean {names[known[0]]!r}?)" if known else ""
        raise ModelNotAvailableError(
            f"checkpoint file {text} does not exist{guess}; pass 'default', a Hub id or an existing "
            ".pt/.safetensors file"
        )


def load_backbone(
    model: ModelSpec,
    attention: AttentionKind = "gsa",
    device: str | torch.device = "auto",
    preprocessing: Preprocessing | None = None,
    num_views: int | None = None,
) -> Backbone:
    """A :class:`Backbone` for ``model`` (see the module docstring) on ``device``; ``num_views``: how many
    views it will see, for an ``"auto"`` that depends on it (``gsa_from_views``)."""
    if attention not in ("auto", "gsa", "dense"):
        raise ValueError(f"attention must be 'auto', 'gsa' or 'dense', got {attention!r}")
    dev = resolve_device(device)
    loaded = isinstance(model, str | os.PathLike) or _is_training_module(model)  # its "auto" rule is known
    if isinstance(model, str | os.PathLike):
        module, name, attention = _load_checkpoint_model(model, attention, num_views, dev)
        model = module
    elif _is_training_module(model):  # the LightningModule of fit: its backbone as its export would run
        model, _, attention = _exported_copy(model, attention, num_views, dev)
        name = "training module"
    else:
        name = type(model).__name__
    guidance = bool(getattr(model, "gsa_guidance", True))  # see Backbone.gsa_guidance
    declared = dict(getattr(model, "input_warnings", {}))  # see Backbone.input_warnings
    if isinstance(model, nn.Module):
        if attention == "auto":
            from speed3r_sfm.training.backbone import uses_gsa

            attention = "gsa" if uses_gsa(model) else "dense"
        model = model.to(dev).eval()
        spec = preprocessing or preprocessing_of(model)
        records = attention == "gsa" and guidance  # Backbone.guided: ask the model for its GSA records
        predict = _module_predict(model, records, dev)
        with_tracker = None
        if getattr(model, "track_head", None) is not None and _accepts(model, "with_tracker"):
            with_tracker = _module_predict(model, records, dev, tracker=True)
        return Backbone(
            predict,
            spec,
            name,
            dev,
            module=model,
            attention=attention,
            gsa_guidance=guidance,
            predict_with_tracker=with_tracker,
            input_warnings=declared,
            attention_for_views=getattr(model, "attention_for_views", None) if loaded else None,
        )
    if callable(model):
        spec = preprocessing or getattr(model, "preprocessing", None) or Preprocessing()
        kind = "gsa" if attention == "auto" else attention  # a callable exports records or it does not
        name = getattr(model, "name", name)
        return Backbone(
            model, spec, name, dev, attention=kind, gsa_guidance=guidance, input_warnings=declared
        )
    raise TypeError(
        f"model must be 'default', a Hub id, a checkpoint path, an nn.Module with predict() or a callable "
        f"returning a Prediction; got {type(model).__name__}"
    )


def preprocessing_of(model: nn.Module) -> Preprocessing:
    """The preprocessing a backbone module expects: its ``preprocessing`` attribute if it has one, else the
    published convention of its family read from its config."""
    explicit = getattr(model, "preprocessing", None)
    if isinstance(explicit, Preprocessing):
        return explicit
    if isinstance(explicit, dict):
        return Preprocessing(**explicit)
    config = getattr(model, "config", None)
    family = type(model).__name__.lower()
    if family == "vggt" and config is not None:
        return Preprocessing(mode="crop", target_size=config.img_size, patch_size=config.patch_size)
    if family == "pi3" and config is not None:
        return Preprocessing(mode="pixel_limit", patch_size=config.patch_size)
    raise ValueError(
        f"cannot tell which preprocessing {type(model).__name__} expects; give the model a `preprocessing` "
        "attribute or pass preprocessing=Preprocessing(mode=..., target_size=...)"
    )


def _accepts(model: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(model.predict).parameters


def _module_predict(
    model: nn.Module, want_records: bool, device: torch.device, tracker: bool = False
) -> Callable:
    if not hasattr(model, "predict"):
        raise TypeError(f"{type(model).__name__} has no predict(images) -> Prediction method")
    kwargs: dict[str, Any] = (
        {"return_attention": True} if (want_records and _accepts(model, "return_attention")) else {}
    )
    if tracker:
        kwargs["with_tracker"] = True

    def predict(images: torch.Tensor) -> Prediction:
        with torch.inference_mode():
            if device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return model.predict(images.to(device), **kwargs)
            return model.predict(images.to(device), **kwargs)

    return predict


def _load_checkpoint_model(
    spec: str | os.PathLike, attention: AttentionKind, num_views: int | None, device: torch.device
) -> tuple[nn.Module, str, Literal["gsa", "dense"]]:
    text = os.fspath(spec)
    check_model_spec(text)
    if text == "default" or _is_exported(text):
        path = DEFAULT_WEIGHTS if text == "default" else Path(text)
        return _load_exported_model(path, attention, num_views, device)
    if Path(text).suffix == ".ckpt":
        return _load_training_checkpoint(Path(text), attention, num_views, device)
    if attention == "auto":
        attention = official_attention(num_views, device)
    attention_config = AttentionConfig(kind=attention)
    family = KNOWN_HUB_IDS.get(text) or _family_of_checkpoint(text)
    from speed3r_sfm.models.checkpoint import CheckpointMismatchError

    try:
        if family == "vggt":
            from speed3r_sfm.attention import is_gsa_parameter
            from speed3r_sfm.models.vggt import VGGT

            module = VGGT.from_pretrained(text, attention=attention_config, allow_missing=is_gsa_parameter)
        else:
            from speed3r_sfm.models.pi3 import Pi3

            module = Pi3.from_pretrained(text, attention=attention_config)
        module.attention_for_views = partial(official_attention, device=device)
        return module, f"{'VGGT' if family == 'vggt' else 'Pi3'} ({text})", attention
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(
            f"{error}\nA checkpoint path or Hub id loads into the official "
            f"{'VGGT-1B' if family == 'vggt' else 'π³'} architecture; weights of another size load as "
            "exported by speed3r-sfm (a .safetensors file with its .json sidecar).",
            error.missing,
            error.unexpected,
            error.mismatched,
        ) from error


def _is_exported(spec: str) -> bool:
    """A local weights file written by ``training.backbone.export_weights`` (with its JSON sidecar; another
    JSON file of that name is not one)."""
    from speed3r_sfm.training.backbone import EXPORT_FORMAT

    path = Path(spec)
    side = path.with_suffix(".json")
    if path.suffix != ".safetensors" or not path.is_file() or not side.is_file():
        return False
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT


def _load_exported_model(
    path: Path, attention: AttentionKind, num_views: int | None, device: torch.device
) -> tuple[nn.Module, str, Literal["gsa", "dense"]]:
    """Our own exported weights (the shipped default or a fine-tuned model), dense or GSA as asked; "auto"
    takes the sidecar's ``pipeline_attention``, else the stored attention, and GSA for ``num_views`` at or
    above the sidecar's ``gsa_from_views`` for ``device`` (:func:`gsa_threshold`); ``path`` exists
    (:func:`check_model_spec`)."""
    from speed3r_sfm.models.checkpoint import CheckpointError
    from speed3r_sfm.training.backbone import load_exported

    side = path.with_suffix(".json")
    try:
        meta = json.loads(side.read_text())
        stored = meta["config"].get("attention", {})
        if attention == "auto":
            attention = _exported_auto_attention(meta, num_views, device)
        wanted = AttentionConfig(kind="dense") if attention == "dense" else None
        if attention == "gsa" and stored.get("kind") != "gsa":
            wanted = AttentionConfig(kind="gsa")
        module = load_exported(path, attention=wanted)
        if "preprocessing" in meta:  # the input size the weights were trained at
            module.preprocessing = _checked_preprocessing(meta["preprocessing"])
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:  # a sidecar edited or of another file
        raise CheckpointError(
            f"{side} does not describe {path.name} ({type(error).__name__}: {error}); use the sidecar that "
            "`fit` exported with these weights"
        ) from error
    module.gsa_guidance = bool(meta.get("gsa_guidance", True))
    module.attention_for_views = partial(_exported_auto_attention, meta, device=device)
    name = "Speed3R default" if path == DEFAULT_WEIGHTS else f"exported ({path})"
    return module, name, attention


def _exported_auto_attention(
    meta: dict, num_views: int | None, device: torch.device
) -> Literal["gsa", "dense"]:
    """``"auto"`` for an exported model with sidecar ``meta`` (see :func:`_load_exported_model`)."""
    stored = meta["config"].get("attention", {})
    attention = meta.get("pipeline_attention") or ("gsa" if stored.get("kind") == "gsa" else "dense")
    threshold = gsa_threshold(meta, device)
    if threshold is not None and num_views is not None and num_views >= threshold:
        attention = "gsa"
    return attention


def _checked_preprocessing(entry: dict) -> Preprocessing:
    """A sidecar's ``preprocessing``: whole-patch sizes (ValueError / TypeError otherwise)."""
    spec = Preprocessing(**entry)
    for name in ("target_size", "patch_size"):
        if not isinstance(getattr(spec, name), int) or getattr(spec, name) < 1:
            raise ValueError(
                f"preprocessing.{name} must be a positive whole number, got {getattr(spec, name)!r}"
            )
    if spec.mode == "crop" and spec.target_size % spec.patch_size:
        raise ValueError(
            f"preprocessing.target_size {spec.target_size} is not a multiple of {spec.patch_size}"
        )
    return spec


def _load_training_checkpoint(
    path: Path, attention: AttentionKind, num_views: int | None, device: torch.device
) -> tuple[nn.Module, str, Literal["gsa", "dense"]]:
    """A Lightning checkpoint of ``speed3r-sfm fit`` (``ReconstructionModule``): its backbone exported in
    float32 with the pipeline settings it trained with (those of its init checkpoint, its input width),
    then run as exported weights are (:func:`_load_exported_model`)."""
    from speed3r_sfm.models.checkpoint import CheckpointError
    from speed3r_sfm.training.module import ReconstructionModule

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no code from the file
        hparams = data["hyper_parameters"]
        init = hparams.get("init_checkpoint")
        if init not in (None, "default") and not Path(init).is_file():
            init = None  # moved since: its weights are in the checkpoint, its pipeline settings are lost
        module = ReconstructionModule.load_from_checkpoint(
            path, map_location="cpu", weights_only=True, distill=None, init_checkpoint=init
        )
    except Exception as error:  # not a checkpoint of ReconstructionModule, or unreadable
        raise CheckpointError(
            f"{path} is not a training checkpoint of speed3r-sfm (`speed3r-sfm fit`): "
            f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        ) from error
    width = data.get("datamodule_hyper_parameters", {}).get("width")
    if module.trained_size is None and width:  # a checkpoint written before trained_size was stored
        module.trained_size = [0, int(width)]
    model, _, attention = _exported_copy(module, attention, num_views, device)
    return model, f"training checkpoint ({path})", attention


def _is_training_module(model: object) -> bool:
    """``speed3r_sfm.training.module.ReconstructionModule`` (not imported here: it needs Lightning)."""
    return all(hasattr(model, name) for name in ("export_weights", "pipeline_settings", "model", "spec"))


def _exported_copy(
    module: nn.Module, attention: AttentionKind, num_views: int | None, device: torch.device
) -> tuple[nn.Module, str, Literal["gsa", "dense"]]:
    """A training module's backbone exported (float32, with its pipeline settings) and loaded back: run as
    the export would be, the module itself left as it is (mode, device)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        exported = module.export_weights(Path(folder) / "weights.safetensors", dtype="float32")
        return _load_exported_model(Path(exported), attention, num_views, device)


def official_attention(num_views: int | None, device: torch.device) -> Literal["gsa", "dense"]:
    """What ``attention="auto"`` runs an official checkpoint with: GSA, what makes them fast, except for
    passes of fewer than ``OFFICIAL_GSA_FROM_VIEWS`` views on a device that names a threshold there."""
    threshold = OFFICIAL_GSA_FROM_VIEWS.get(device.type)
    if threshold is not None and num_views is not None and num_views < threshold:
        return "dense"
    return "gsa"


def gsa_threshold(meta: dict, device: torch.device) -> int | None:
    """Views per pass from which ``attention="auto"`` runs an exported model with GSA on ``device``: the
    sidecar's ``gsa_from_views``, one number or ``{device type: number}`` (a device type it does not name
    takes the ``"cpu"`` entry); None: never by the view count."""
    threshold = meta.get("gsa_from_views")
    if isinstance(threshold, dict):
        threshold = threshold.get(device.type, threshold.get("cpu"))
    return None if threshold is None else int(threshold)


def _family_of_checkpoint(spec: str) -> str:
    """'vggt' or 'pi3' from the keys of a local or Hub checkpoint."""
    from speed3r_sfm.models.checkpoint import CheckpointError, read_state_dict, resolve_checkpoint

    path = resolve_checkpoint(spec, filenames=("model.safetensors", "model.pt"))
    if path.suffix == ".safetensors":
        keys, metadata = _safetensors_keys(path)
        if "speed3r_sfm" in metadata:  # our own export, without the sidecar that describes the model
            raise CheckpointError(
                f"{path} holds weights exported by speed3r-sfm, whose model is described by its sidecar "
                f"{path.with_suffix('.json')}, missing or not of speed3r-sfm: copy it next to the weights"
            )
    else:
        keys = list(read_state_dict(path))
    if any(k.startswith("aggregator.") for k in keys):
        return "vggt"
    if any(k.startswith(("point_decoder.", "camera_decoder.")) for k in keys):
        return "pi3"
    raise CheckpointError(
        f"checkpoint {path} is neither a VGGT nor a π³ checkpoint (keys start with "
        f"{sorted({k.split('.')[0] for k in keys})[:8]}); a path loads the official VGGT-1B or π³ "
        "architecture, or weights exported by speed3r-sfm (.safetensors with its .json sidecar)"
    )


def _safetensors_keys(path: Path) -> tuple[list[str], dict[str, str]]:
    """The tensor names (without a wrapper prefix that all share) and the metadata of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    from speed3r_sfm.models.checkpoint import CheckpointError, strip_wrapper_prefix

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys, metadata = list(handle.keys()), handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    return list(strip_wrapper_prefix(dict.fromkeys(keys))), metadata
