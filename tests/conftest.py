"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Callable

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
