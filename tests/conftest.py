"""Fixtures shared by several test modules."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from speed3r_sfm.attention import DenseAttention


@pytest.fixture
def attention_dtypes() -> Callable[[torch.nn.Module], list[torch.dtype]]:
    """Hook every :class:`DenseAttention` inside a module; the returned list gets the dtype of q per call."""

    def record(module: torch.nn.Module) -> list[torch.dtype]:
        seen: list[torch.dtype] = []
        for child in module.modules():
            if isinstance(child, DenseAttention):
                child.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].dtype))
        return seen

    return record


@pytest.fixture
def load_benchmark() -> Callable[[str], ModuleType]:
    """Import a script of ``benchmarks/`` by file name (they are scripts, not a package)."""

    def load(name: str) -> ModuleType:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
