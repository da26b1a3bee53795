"""Small file-system helpers shared by the writers (projects, datasets, checkpoints)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def current_umask() -> int:
    """The process's file mode creation mask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_permissions(path: str | os.PathLike, folder: bool = False) -> None:
    """Give ``path`` the permissions a plain ``open`` / ``mkdir`` would (0666 / 0777 less the umask):
    ``tempfile.mkdtemp`` and safetensors' writer make theirs private."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


@contextlib.contextmanager
def written_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file next to ``path`` that becomes ``path`` when the block succeeds (removed if not)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
