"""fsync helpers shared by the writers: data first, then the directory entries, then publish."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def fsync_path(path: Path | str) -> None:
    """fsync one file or directory (a read-only descriptor is enough on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, data: bool = True, synced: Mapping[str, tuple[int, int]] | None = None) -> None:
    """fsync every file below `root` and every directory, children first.

    `data=False` syncs the directories only. `synced` maps files already made durable to their
    (inode, mtime) at the time: those are skipped unless they have changed since.
    """
    synced = synced or {}
    for dirpath, _, files in os.walk(root, topdown=False):
        if data:
            for f in files:
                path = os.path.join(dirpath, f)
                if path not in synced or synced[path] != file_version(path):
                    fsync_path(path)
        fsync_path(dirpath)


def file_version(path: str) -> tuple[int, int] | None:
    """(inode, mtime in ns) of a file, None if it is gone: what tells a rewritten file from a synced one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def replace_durably(path: Path, data: bytes) -> None:
    """Write `path` as a whole new file (temporary sibling, fsync, rename): never seen half-written."""
    tmp = path.with_name(path.name + ".ckpt-tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
