"""Small file-system helpers shared by the writers (projects, datasets, checkpoints)."""

from __future__ import annotations

import os


def current_umask() -> int:
    """The process's file mode creation mask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_permissions(path: str | os.PathLike, folder: bool = False) -> None:
    """Give ``path`` the permissions a plain ``open`` / ``mkdir`` would (0666 / 0777 less the umask):
    ``tempfile.mkdtemp`` and safetensors' writer make theirs private."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())
