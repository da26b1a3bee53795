"""Which Lightning distribution to use: the unified ``lightning`` package or the standalone
``pytorch_lightning`` (e.g. GPU images that ship only ``pytorch-lightning``).

Every training module imports Lightning through here, so the LightningModule, the Trainer and the
callbacks always come from the same package. ``SPEED3R_LIGHTNING=pytorch_lightning`` forces the standalone
package; otherwise ``lightning.pytorch`` is preferred when it is installed.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def _import() -> tuple[ModuleType, str]:
    forced = os.environ.get("SPEED3R_LIGHTNING", "").strip()
    candidates = [forced] if forced else ["lightning.pytorch", "pytorch_lightning"]
    errors = []
    for name in candidates:
        try:
            return importlib.import_module(name), name
        except ImportError as error:
            errors.append(f"{name}: {error}")
    raise ImportError(
        "speed3r_sfm.training needs Lightning: pip install lightning (or pytorch-lightning); "
        + "; ".join(errors)
    )


pl, PACKAGE = _import()
"""The Lightning module (``lightning.pytorch`` or ``pytorch_lightning``) and its import name."""


def translate_class_path(class_path: str) -> str:
    """A ``lightning.pytorch.*`` class path rewritten for the package in use (and vice versa)."""
    for prefix in ("lightning.pytorch.", "pytorch_lightning."):
        if class_path.startswith(prefix):
            return PACKAGE + "." + class_path[len(prefix) :]
    return class_path
