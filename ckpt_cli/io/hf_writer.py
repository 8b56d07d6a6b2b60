"""A Hugging Face model folder written streaming: safetensors shards planned up front, published atomically.

Every tensor is assigned to a shard before anything is written (greedy over the names in sorted order,
a shard holds at most `shard_bytes` of tensor data; a tensor larger than that gets a shard of its own).
Each shard's header is written first and tensors, or row ranges of them, are written at their offsets
as the engine produces them, and their writeback to disk is started right away (so the disk works during
the conversion, not only in the final fsync). Everything goes to `OUT.partial`; `finalize` writes the index
and the JSON/tokenizer files, fsyncs, and renames it to `OUT`, so an interrupted run leaves nothing complete.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ckpt_cli.errors import OutputError
from ckpt_cli.io.durable import fsync_path
from ckpt_cli.io.safetensors import INDEX_NAME, PlannedTensor, StreamingSafetensorsWriter

SINGLE_NAME = "model.safetensors"


def assign_shards(tensors: list[PlannedTensor], shard_bytes: int) -> list[list[PlannedTensor]]:
    """Tensors sorted by name, packed greedily into shards of at most `shard_bytes` of tensor data."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in sorted(tensors, key=lambda t: t.name):
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    """`model.safetensors` for one shard, else `model-0000k-of-0000n.safetensors` (transformers' names)."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output unless told to replace it (checked before any work starts)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputError(f"{out} exists and is not empty (use --overwrite to replace it)")


class HFFolderWriter:
    """The engine's Writer for an HF folder: one StreamingSafetensorsWriter per shard."""

    def __init__(self, out: Path, tensors: list[PlannedTensor], shard_bytes: int, overwrite: bool = False):
        self.out = Path(out)
        check_output(self.out, overwrite)
        self.tmp = partial_dir(self.out)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        try:
            self.tmp.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"cannot create {self.tmp}: {exc.strerror}") from None
        self.planned = {t.name: t for t in tensors}
        self.shards = assign_shards(tensors, shard_bytes)
        self.files = shard_file_names(len(self.shards))
        self.weight_map = {t.name: f for f, shard in zip(self.files, self.shards, strict=True) for t in shard}
        self.writers: dict[str, StreamingSafetensorsWriter] = {}
        self.closed: set[str] = set()
        self.part_bytes: dict[tuple, int] = {}     # bytes of strided parts written per block of rows
        try:
            for name, shard in zip(self.files, self.shards, strict=True):
                self.writers[name] = StreamingSafetensorsWriter(self.tmp / name, shard, {"format": "pt"})
        except BaseException:
            self.abort()
            raise

    @property
    def total_size(self) -> int:
        """Bytes of tensor data (what transformers records as the index's total_size)."""
        return sum(t.nbytes for t in self.planned.values())

    def create(self, target: str, shape: tuple[int, ...], dtype: np.dtype, chunk: tuple[int, ...]) -> None:
        t = self.planned.get(target)
        if t is None or tuple(t.shape) != tuple(shape) or np.dtype(t.dtype) != np.dtype(dtype):
            raise AssertionError(f"{target}: not planned as {shape} {np.dtype(dtype)}")

    def write(self, target: str, index: tuple, array: np.ndarray) -> int:
        """Write `array` at `tensor[index]`; returns 0 (no backlog).

        `index` is the whole tensor, a row range or one row (an int) on axis 0, possibly with a strided
        part on one axis (GPT-OSS's interleaved gate/up). Contiguous writes go straight to their offset;
        a strided part is merged into its block of rows, whose writeback starts once every part is in.
        """
        writer = self.writers[self.weight_map[target]]
        shape = self.planned[target].shape
        first = index[0] if index else slice(None)
        if isinstance(first, slice):
            start, stop, step = first.indices(shape[0]) if shape else (0, 0, 1)
            inner0: int | slice = slice(None) if step == 1 else slice(0, None, step)
        else:
            start, stop, step, inner0 = int(first), int(first) + 1, 1, 0
        inner = (inner0, *index[1:])
        contiguous = step == 1 and all(s == slice(None) for s in index[1:])
        begin, end = writer.offsets[target]
        row = (end - begin) // shape[0] if shape and shape[0] else 0
        if contiguous and (start, stop) == (0, shape[0] if shape else 0) or not shape:
            writer.write(target, array)
            _start_writeback(writer.fd, writer.base + begin, end - begin)
        elif contiguous:
            writer.write_rows(target, start, array.reshape((stop - start, *shape[1:])))
            _start_writeback(writer.fd, writer.base + begin + start * row, (stop - start) * row)
        else:
            writer.write_part(target, start, stop, inner, array)
            key = (target, start, stop)
            self.part_bytes[key] = self.part_bytes.get(key, 0) + array.nbytes
            if self.part_bytes[key] >= (stop - start) * row:
                del self.part_bytes[key]
                _start_writeback(writer.fd, writer.base + begin + start * row, (stop - start) * row)
        return 0

    def flush(self) -> None:
        """Nothing to do: every write is a pwrite that already happened."""

    def finalize(self, json_files: dict[str, dict], copy_files: dict[str, Path]) -> list[str]:
        """Write the index and extra files, fsync everything, publish OUT by rename; returns the file names.

        The fsyncs run concurrently, so the filesystem can commit them together.
        """
        names = list(self.files)
        if len(self.files) > 1:
            json_files = {INDEX_NAME: {"metadata": {"total_size": self.total_size},
                                       "weight_map": dict(sorted(self.weight_map.items()))}, **json_files}
        for name, data in json_files.items():
            _write(self.tmp / name, (json.dumps(data, indent=2) + "\n").encode())
            names.append(name)
        for name, src in copy_files.items():
            _copy(Path(src), self.tmp / name)
            names.append(name)
        extra = [self.tmp / n for n in names[len(self.files):]]
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="ckpt-fsync") as pool:
            futures = [pool.submit(self._close_shard, name) for name in self.writers]
            futures += [pool.submit(fsync_path, path) for path in extra]
            for f in futures:
                f.result()
        self.writers = {}
        fsync_path(self.tmp)
        if self.out.exists():
            shutil.rmtree(self.out) if self.out.is_dir() else self.out.unlink()
        os.replace(self.tmp, self.out)
        fsync_path(self.out.parent)
        return sorted(names)

    def _close_shard(self, name: str) -> None:
        """Check, fsync and close one shard (its descriptor is closed even if the check fails)."""
        try:
            self.writers[name].close()
        finally:
            self.closed.add(name)

    def abort(self) -> None:
        """Drop everything written so far: no partial output survives."""
        for name, w in self.writers.items():
            if name not in self.closed:
                try:
                    os.close(w.fd)
                except OSError:
                    pass
        self.writers = {}
        shutil.rmtree(self.tmp, ignore_errors=True)


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing this range back now (Linux: fadvise DONTNEED starts async writeback
    of dirty pages), so the disk works during the conversion and the final fsync has little left."""
    try:
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None


def _copy(src: Path, dst: Path) -> None:
    try:
        shutil.copyfile(src, dst)
    except OSError as exc:
        raise OutputError(f"cannot copy {src} to {dst}: {exc.strerror}") from None
