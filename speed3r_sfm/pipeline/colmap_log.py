"""COLMAP's own (glog) log level, raised while the pipeline calls into it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pycolmap


@contextmanager
def colmap_log_level(level: int = pycolmap.logging.WARNING) -> Iterator[None]:
    """Show COLMAP's messages from ``level`` up (``pycolmap.logging.INFO`` = 0 ... ``FATAL`` = 3) inside
    the block, and restore the caller's level afterwards."""
    previous = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = int(level)
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = previous
