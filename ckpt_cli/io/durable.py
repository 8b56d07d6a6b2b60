"""fsync helpers shared by the writers: data first, then the directory entries, then publish."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path | str) -> None:
    """fsync one file or directory (a read-only descriptor is enough on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, data: bool = True) -> None:
    """fsync every file below `root` (unless `data` is False) and every directory, children first."""
    for dirpath, _, files in os.walk(root, topdown=False):
        if data:
            for f in files:
                fsync_path(os.path.join(dirpath, f))
        fsync_path(dirpath)
