"""Run a ``pipelines/*.yaml`` config without LightningCLI / jsonargparse (e.g. on a GPU image that lacks
them): the YAML's ``trainer``, ``model`` and ``data`` sections become the keyword arguments of
``Trainer``, :class:`ReconstructionModule` and :class:`ReconstructionDataModule`; ``class_path`` /
``init_args`` entries (callbacks, logger) are instantiated, with ``lightning.pytorch.*`` paths mapped to the
installed Lightning package.
"""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path
from typing import Any

import yaml

from ._lightning import pl, translate_class_path
from .data import ReconstructionDataModule
from .module import ReconstructionModule


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``override`` wins; lists are replaced)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The YAML config at ``path`` merged with ``overrides`` (nested dicts)."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    return merge(config, overrides or {})


def instantiate(spec: Any) -> Any:
    """``{"class_path": "pkg.mod.Class", "init_args": {...}}`` → ``Class(**init_args)``; other values as
    they are."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        return spec
    module_name, _, name = translate_class_path(spec["class_path"]).rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    return cls(**(spec.get("init_args") or {}))


def build(config: dict[str, Any]) -> tuple[Any, ReconstructionModule, ReconstructionDataModule]:
    """(Trainer, module, datamodule) of a config dict (as LightningCLI would build them)."""
    seed = config.get("seed_everything")
    if seed is not None and seed is not False:
        pl.seed_everything(None if seed is True else int(seed), workers=True)
    trainer_kwargs = dict(config.get("trainer") or {})
    callbacks = [instantiate(c) for c in trainer_kwargs.pop("callbacks", None) or []]
    logger = trainer_kwargs.pop("logger", None)
    if isinstance(logger, list):
        logger = [instantiate(item) for item in logger]
    elif isinstance(logger, dict):
        logger = instantiate(logger)
    if logger is not None:
        trainer_kwargs["logger"] = logger
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs)
    module = ReconstructionModule(**(config.get("model") or {}))
    datamodule = ReconstructionDataModule(**(config.get("data") or {}))
    return trainer, module, datamodule


def fit(config: dict[str, Any], ckpt_path: str | None = None) -> tuple[Any, ReconstructionModule]:
    """Build and ``fit``; ``ckpt_path`` (or the config's top-level ``ckpt_path``) resumes a run."""
    trainer, module, datamodule = build(config)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path or config.get("ckpt_path"))
    return trainer, module
