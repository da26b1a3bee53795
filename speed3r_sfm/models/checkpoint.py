"""Reading, resolving, strictly loading and saving model checkpoints (shared by every backbone).

Formats: a bare ``state_dict`` saved with ``torch.save`` (``.pt``/``.pth``/``.bin``; a training dict with a
``"model"`` or ``"state_dict"`` entry is unwrapped), or ``.safetensors``. A checkpoint is named by a local
path or by a Hugging Face Hub id (``owner/name``, optionally ``hf://owner/name/filename``).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from speed3r_sfm.fileio import normal_permissions

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MAX_LISTED = 10


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read or loaded."""


class CheckpointDownloadError(CheckpointError):
    """A Hub checkpoint is neither downloadable nor cached."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes differ from the model's."""

    def __init__(
        self,
        message: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


def _hub_offline() -> bool:
    import huggingface_hub

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or huggingface_hub.is_offline_mode()


def resolve_checkpoint(
    spec: str | os.PathLike,
    default_repo: str | None = None,
    filenames: Iterable[str] = ("model.safetensors",),
    revision: str | None = None,
) -> Path:
    """Local path of a checkpoint.

    ``spec`` is a file, a folder holding one of ``filenames``, a Hub id ``owner/name`` (``filenames`` are
    tried in order) or ``hf://owner/name/filename``. Hub files are downloaded once into the Hugging Face
    cache (``HF_HOME``); with ``HF_HUB_OFFLINE=1`` only the cache is used. ``default_repo`` is only used in
    messages. Raises :class:`CheckpointError` (or ``FileNotFoundError`` for a missing local path) with
    instructions to pass a local file.
    """
    filenames = tuple(filenames)
    text = os.fspath(spec)
    if text.startswith("hf://"):
        parts = text[len("hf://") :].split("/")
        if len(parts) < 3:
            raise ValueError(f"expected hf://owner/name/filename, got {text!r}")
        return _download("/".join(parts[:2]), ("/".join(parts[2:]),), revision)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in filenames:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"checkpoint folder {path} holds none of {list(filenames)}")
    if looks_like_hub_id(text):
        return _download(text, filenames, revision)
    hint = f" (or a Hub id such as {default_repo!r})" if default_repo else ""
    raise FileNotFoundError(
        f"checkpoint file {path} does not exist; pass an existing .pt/.safetensors file{hint}"
    )


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` (not a checkpoint file name) or ``hf://owner/name/filename``."""
    if text.startswith("hf://"):
        return True
    return bool(_HUB_ID.match(text)) and not text.endswith(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,))


def _download(repo_id: str, filenames: tuple[str, ...], revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError

    offline = _hub_offline()
    cache_only = offline
    problems = []
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=cache_only))
        except RemoteEntryNotFoundError:
            problems.append(f"{filename}: not in the repository")
        except GatedRepoError as error:
            raise CheckpointDownloadError(
                f"{repo_id} is gated on the Hugging Face Hub: accept its terms and log in (`hf auth login`), "
                f"or pass a local checkpoint file path. ({error})"
            ) from error
        except RepositoryNotFoundError as error:
            raise CheckpointDownloadError(
                f"Hugging Face Hub repository {repo_id!r} does not exist (or is private); "
                "pass a local checkpoint file path instead."
            ) from error
        except (OSError, ValueError) as error:  # offline, not cached, connection errors
            problems.append(
                f"{filename}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            )
            cache_only = True  # unreachable: the other names from the cache only, without the same timeouts
    reason = (
        "offline mode (HF_HUB_OFFLINE is set) and not in the local cache"
        if offline
        else "the Hub could not be reached or the download failed, and it is not in the local cache"
    )
    raise CheckpointDownloadError(
        f"Could not get a checkpoint of {repo_id!r} from the Hugging Face Hub: {reason}.\n"
        f"  tried: {'; '.join(problems)}\n"
        f"Download it where the Hub is reachable (e.g. `hf download {repo_id} {filenames[0]}`), copy the "
        f"file here and pass its local path instead of the Hub id (--model /path/to/{filenames[0]}, "
        f"model='/path/to/{filenames[0]}')."
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``d (bare or wrapped) state_dict, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return strip_wrapper_prefix(load_file(path, device="cpu"))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as error:
        # pickle's errors on other files: torch's message is a paragraph about weights_only, or a bare
        # opcode number
        if isinstance(error, pickle.UnpicklingError | KeyError | IndexError | EOFError | UnicodeDecodeError):
            why = "not a torch.save file, or it holds objects other than tensors (weights_only=True)"
        else:
            why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (a state_dict saved with torch.save): {why}"
        ) from error
    return _unwrap_state_dict(data, path)


def _unwrap_state_dict(data: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(data, Mapping) and not all(isinstance(v, torch.Tensor) for v in data.values()):
        for key in ("model", "state_dict"):
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if (
        not isinstance(data, Mapping)
        or not data
        or not all(isinstance(v, torch.Tensor) for v in data.values())
    ):
        kind = sorted(data)[:10] if isinstance(data, Mapping) else type(data).__name__
        raise CheckpointError(f"{path} holds no state_dict of tensors (found {kind})")
    return strip_wrapper_prefix(dict(data))


WRAPPER_PREFIXES = ("module.", "model.")  # DistributedDataParallel; a wrapping module (Lightning's "model")


def strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without a prefix that every key shares (:data:`WRAPPER_PREFIXES`, possibly nested)."""
    for prefix in WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            return strip_wrapper_prefix({key[len(prefix) :]: value for key, value in state.items()})
    return state


def load_state_dict_checked(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str | os.PathLike | None = None,
    allow_missing: Callable[[str], bool] | None = None,
    ignore_unexpected: Callable[[str], bool] | None = None,
) -> None:
    """Strict ``load_state_dict`` with a readable error.

    Raises :class:`CheckpointMismatchError` listing missing keys, unexpected keys and shape mismatches (file
    shape vs model shape), naming ``source``. Keys of the model for which ``allow_missing(key)`` is true may
    be absent (they keep their initial values); file keys for which ``ignore_unexpected(key)`` is true are
    skipped.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not (allow_missing and allow_missing(k))]
    unexpected = [
        k for k in state_dict if k not in expected and not (ignore_unexpected and ignore_unexpected(k))
    ]
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        name = f"checkpoint {os.fspath(source)}" if source is not None else "the state_dict"
        lines = [f"{name} does not match {type(model).__name__}:"]
        lines += _listing(
            "missing keys (in the model, not in the file)",
            [f"{k} {tuple(expected[k].shape)}" for k in missing],
        )
        lines += _listing(
            "unexpected keys (in the file, not in the model)",
            [f"{k} {tuple(state_dict[k].shape)}" for k in unexpected],
        )
        lines += _listing("shape mismatches (file vs model)", [f"{k}: {a} vs {b}" for k, a, b in mismatched])
        lines.append("Check that the model config (preset, enabled heads, attention) matches the checkpoint.")
        raise CheckpointMismatchError("\n".join(lines), missing, unexpected, mismatched)
    model.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = [f"    {item}" for item in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        shown.append(f"    ... and {len(items) - _MAX_LISTED} more")
    return [f"  {len(items)} {title}:", *shown]


def save_checkpoint(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a bare state_dict as ``.safetensors`` (tensors sharing memory are stored as separate copies, so
    every key is present) or, for ``.pt``/``.pth``, with ``torch.save`` — the two official formats."""
    path = Path(path)
    state = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, nn.Module)
        else model_or_state_dict
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import save_file

        tensors, seen = {}, set()
        for key, value in state.items():
            value = value.detach().cpu()
            storage = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
            if storage in seen or not value.is_contiguous():
                value = value.contiguous().clone()
            seen.add(storage)
            tensors[key] = value
        save_file(tensors, path, metadata={"format": "pt", **(metadata or {})})
        normal_permissions(path)
    elif path.suffix in TORCH_SUFFIXES:
        torch.save({key: value.detach().cpu() for key, value in state.items()}, path)
    else:
        raise ValueError(f"unsupported checkpoint suffix {path.suffix!r} for {path}; use .safetensors or .pt")
    return path
