"""fsync helpers shared by the writers: data first, then the directory entries, then publish."""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path


def fsync_path(path: Path | str) -> None:
    """fsync one file or directory (a read-only descriptor is enough on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, data: bool = True, synced: Collection[str] = ()) -> None:
    """fsync every file below `root` (unless `data` is False, or it is in `synced`, already made durable)
    and every directory, children first."""
    for dirpath, _, files in os.walk(root, topdown=False):
        if data:
            for f in files:
                path = os.path.join(dirpath, f)
                if path not in synced:
                    fsync_path(path)
        fsync_path(dirpath)
