"""``speed3r-sfm fit --config pipelines/<name>.yaml``: LightningCLI over :class:`ReconstructionModule` and
:class:`ReconstructionDataModule` (needs ``jsonargparse[signatures]``).

Also runnable as ``python -m speed3r_sfm.training.cli fit --config ...`` (which is what DDP re-launches).
Resume with ``--ckpt_path last`` (the ``last.ckpt`` of the ModelCheckpoint callback) or a path.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from typing import Any

from ._lightning import PACKAGE
from .data import ReconstructionDataModule
from .module import ReconstructionModule

# Lightning's remarks that say nothing about a run of these configs: its own deprecation inside its pytree
# helper, the model summary's size estimate under bf16, and the IterableDataset length remark (the data
# module shards its stream across workers itself)
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",
    r"Precision .* is not supported by the model summary",
    r"Your `IterableDataset` has `__len__` defined",
)


class _NoAdvertisement(logging.Filter):
    """Drops Lightning's "Tip: try installing litlogger" line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def fit_main(argv: list[str] | None = None) -> Any:
    """Run ``fit`` through LightningCLI; ``argv`` are the arguments after ``fit`` (a leading ``"fit"`` is
    accepted too), e.g. ``["--config", "pipelines/train_tiny_dense_synthetic.yaml"]``. Returns the
    LightningCLI object (``.trainer``, ``.model``, ``.datamodule``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "fit":
        args = args[1:]
    LightningCLI = importlib.import_module(f"{PACKAGE}.cli").LightningCLI
    rank_zero = logging.getLogger(f"{PACKAGE}.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvertisement) for f in rank_zero.filters):
        rank_zero.addFilter(_NoAdvertisement())
    with warnings.catch_warnings():
        # the arguments are the command line's own (less the entry point's "fit"); LightningCLI warns
        # whenever both sys.argv and ``args`` are set
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter", category=UserWarning)
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        return LightningCLI(
            ReconstructionModule,
            ReconstructionDataModule,
            subclass_mode_model=False,
            subclass_mode_data=False,
            save_config_kwargs={"overwrite": True},
            args=["fit", *args],
        )


if __name__ == "__main__":
    fit_main()
