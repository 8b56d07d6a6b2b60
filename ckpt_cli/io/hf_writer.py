"""A Hugging Face model folder written streaming: safetensors shards planned up front, published atomically.

Every tensor is assigned to a shard before anything is written (greedy over the names in sorted order,
a shard holds at most `shard_bytes` of tensor data; a tensor larger than that gets a shard of its own).
Each shard's header is written first and tensors, or row ranges of them, are written at their offsets
as the engine produces them, and their writeback to disk is started right away (so the disk works during
the conversion, not only in the final fsync). Everything goes to `OUT.partial`; `finalize` writes the index
and the JSON/tokenizer files, fsyncs, and renames it to `OUT`, so an interrupted run leaves nothing complete.

With a progress key, every `SNAPSHOT_BYTES` written the writeback thread fsyncs the shards written since
the last snapshot and only then replaces `OUT.partial/ckpt-progress.json` (the key and every write made
so far): a crash between the two never records a write whose bytes are not durable. `--resume` reopens
the shards (their headers must match byte for byte) and the engine skips the writes recorded there.
A strided part (GPT-OSS's interleaved gate/up) is recorded on its own: writing one reads back the block
and rewrites it whole, so the parts recorded before it stay in place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ckpt_cli.errors import SourceError
from ckpt_cli.io.durable import fsync_path
from ckpt_cli.io.outdir import PARTIAL_MARKER, check_output, make_partial, os_error, output_path, partial_dir, publish
from ckpt_cli.io.safetensors import INDEX_NAME, PlannedTensor, StreamingSafetensorsWriter, inside
from ckpt_cli.io.writeback import Writeback
from ckpt_cli.plan import write_key

SINGLE_NAME = "model.safetensors"
PROGRESS = "ckpt-progress.json"     # in OUT.partial: the writes an interrupted run had made durable (--resume)
SNAPSHOT_BYTES = 1 << 30            # bytes written between two progress snapshots


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


class HFFolderWriter:
    """The engine's Writer for an HF folder: one StreamingSafetensorsWriter per shard.

    `progress_key` turns on progress snapshots; `done` (the writes `read_progress` found for that key)
    takes up the interrupted run's OUT.partial instead of starting afresh. `names` names the shards when there
    are that many (e.g. a PEFT adapter's one `adapter_model.safetensors`).
    """

    def __init__(self, out: Path, tensors: list[PlannedTensor], shard_bytes: int, overwrite: bool = False,
                 progress_key: str | None = None, done: set[tuple] | None = None, names: list[str] | None = None):
        self.out = output_path(out)
        self.overwrite = overwrite
        check_output(self.out, overwrite)
        self.tmp = partial_dir(self.out)
        self.planned = {t.name: t for t in tensors}
        self.shards = assign_shards(tensors, shard_bytes)
        self.files = names if names and len(names) == len(self.shards) else shard_file_names(len(self.shards))
        self.weight_map = {t.name: f for f, shard in zip(self.files, self.shards, strict=True) for t in shard}
        self.writers: dict[str, StreamingSafetensorsWriter] = {}
        self.closed: set[str] = set()
        self.part_bytes: dict[tuple, int] = {}     # bytes of strided parts written per block of rows
        self.progress_key = progress_key
        self.done: set[tuple] = set(done or ())    # writes the interrupted run made durable
        self.committed: list[tuple] = []            # writes made by this run, in order
        self.since_snapshot = 0
        self.snapshots_queued = 0
        self.dirty: set[str] = set()                # shards written since the last snapshot
        self.writeback: Writeback | None = None
        resume = done is not None
        if resume:
            for leftover in self.tmp.iterdir():     # e.g. an index from an interrupted finalize
                if leftover.name not in (*self.files, PROGRESS, PARTIAL_MARKER):
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        else:
            make_partial(self.out)
        try:
            for name, shard in zip(self.files, self.shards, strict=True):
                self.writers[name] = StreamingSafetensorsWriter(self.tmp / name, shard, {"format": "pt"},
                                                                reopen=resume)
            for key in self.done:
                self._count_resumed(key)
            if progress_key is not None:
                self.writeback = Writeback()
        except BaseException as exc:      # Ctrl-C while reopening: the interrupted run's progress is still good
            self.abort(keep=resume and isinstance(exc, KeyboardInterrupt))
            raise

    @property
    def total_size(self) -> int:
        """Bytes of tensor data (what transformers records as the index's total_size)."""
        return sum(t.nbytes for t in self.planned.values())

    def create(self, target: str, shape: tuple[int, ...], dtype: np.dtype, chunk: tuple[int, ...],
               read_chunk: tuple[int, ...] | None = None) -> None:
        t = self.planned.get(target)
        if t is None or tuple(t.shape) != tuple(shape) or np.dtype(t.dtype) != np.dtype(dtype):
            raise AssertionError(f"{target}: not planned as {shape} {np.dtype(dtype)}")

    def write(self, target: str, index: tuple, array: np.ndarray) -> int:
        """Write `array` at `tensor[index]`; returns 0 (no backlog).

        `index` is the whole tensor, a row range or one row (an int) on axis 0, possibly with a strided
        part on one axis (GPT-OSS's interleaved gate/up). Contiguous writes go straight to their offset;
        a strided part is merged into its block of rows, whose writeback starts once every part is in.
        """
        writer, kind, start, stop, inner, offset, nbytes = self._locate(target, index)
        if kind == "whole":
            writer.write(target, array)
        elif kind == "rows":
            writer.write_rows(target, start, array.reshape((stop - start, *writer.shapes[target][1:])))
        else:
            writer.write_part(target, start, stop, inner, array)
        if kind != "part" or self._part_done(target, start, stop, nbytes, array.nbytes):
            _start_writeback(writer.fd, writer.base + offset, nbytes)
        if self.progress_key is not None:
            self.committed.append(write_key(target, index))
            self.dirty.add(self.weight_map[target])
            self.since_snapshot += array.nbytes
            if self.since_snapshot >= SNAPSHOT_BYTES:
                self._snapshot()
        return 0

    def _locate(self, target: str, index: tuple) -> tuple:
        """Where `tensor[index]` goes: (its shard's writer, "whole", "rows" or "part", the first and last+1
        row on axis 0, the index within those rows, their offset in the data section, their bytes)."""
        writer = self.writers[self.weight_map[target]]
        shape = self.planned[target].shape
        begin, end = writer.offsets[target]
        first = index[0] if index else slice(None)
        if isinstance(first, slice):
            start, stop, step = first.indices(shape[0]) if shape else (0, 0, 1)
            inner0: int | slice = slice(None) if step == 1 else slice(0, None, step)
        else:
            start, stop, step, inner0 = int(first), int(first) + 1, 1, 0
        inner = (inner0, *index[1:])
        if not shape or step == 1 and all(s == slice(None) for s in index[1:]) and (start, stop) == (0, shape[0]):
            return writer, "whole", start, stop, inner, begin, end - begin
        row = (end - begin) // shape[0] if shape[0] else 0
        kind = "rows" if step == 1 and all(s == slice(None) for s in index[1:]) else "part"
        return writer, kind, start, stop, inner, begin + start * row, (stop - start) * row

    def _part_done(self, target: str, start: int, stop: int, region_bytes: int, nbytes: int) -> bool:
        """Count a strided part written into rows [start, stop); whether every part of them is now in."""
        key = (target, start, stop)
        self.part_bytes[key] = self.part_bytes.get(key, 0) + nbytes
        if self.part_bytes[key] < region_bytes:
            return False
        del self.part_bytes[key]
        return True

    def _count_resumed(self, key: tuple) -> None:
        """Account for a write the interrupted run made durable, as if this run had made it."""
        target, index = key_index(key)
        writer, kind, start, stop, _, _, region_bytes = self._locate(target, index)
        nbytes = self._nbytes(target, index)
        writer.count(target, nbytes)
        if kind == "part":
            self._part_done(target, start, stop, region_bytes, nbytes)

    def _nbytes(self, target: str, index: tuple) -> int:
        """Bytes of the write `tensor[index]` (computed on a zero-stride view: nothing allocated)."""
        t = self.planned[target]
        return np.broadcast_to(np.zeros((), t.dtype), t.shape)[index].nbytes

    def _snapshot(self) -> None:
        """Queue the progress file behind an fsync of every shard written since the last one."""
        self.since_snapshot = 0
        self.snapshots_queued += 1
        # Each shard's size now: later writes only grow it, so a resumed run needs at least these bytes.
        sizes = {name: os.fstat(w.fd).st_size for name, w in self.writers.items()}
        progress = {"key": self.progress_key, "done": [*self.done, *self.committed], "files": sizes}
        fds = [self.writers[name].fd for name in sorted(self.dirty)]
        self.dirty.clear()
        self.writeback.snapshot(self.tmp, {PROGRESS: json.dumps(progress).encode()}, sync_fds=fds)

    def flush(self) -> None:
        """Nothing to do: every write is a pwrite that already happened."""

    def finalize(self, json_files: dict[str, dict], copy_files: dict[str, Path]) -> list[str]:
        """Write the index and extra files, fsync everything, publish OUT by rename; returns the file names.

        The fsyncs run concurrently, so the filesystem can commit them together.
        """
        if self.writeback is not None:
            self.writeback.close()      # first: a queued snapshot must not land after the progress is removed
            if self.writeback.sync_error is not None:
                raise os_error(self.writeback.sync_error, f"cannot write {self.tmp}")
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
        for leftover in (PROGRESS, f"{PROGRESS}.ckpt-tmp"):     # kept until the data is durable
            (self.tmp / leftover).unlink(missing_ok=True)
        fsync_path(self.tmp)
        publish(self.tmp, self.out, self.overwrite)
        return sorted(names)

    def _close_shard(self, name: str) -> None:
        """Check, fsync and close one shard (its descriptor is closed even if the check fails)."""
        try:
            self.writers[name].close()
        finally:
            self.closed.add(name)

    def abort(self, keep: bool = False) -> bool:
        """Drop everything written so far (interrupt or error): no partial output survives, unless `keep`
        and it has a progress snapshot, which `--resume` takes up. Returns whether OUT.partial was kept."""
        if self.writeback is not None:
            # A queued snapshot is what --resume will need: let it (and the fsyncs before it) finish.
            self.writeback.close(cancel=not (keep and self.snapshots_queued))
        for name, w in self.writers.items():
            if name not in self.closed:
                try:
                    os.close(w.fd)
                except OSError:
                    pass
        self.writers = {}
        if keep and self.progress_key is not None and (self.tmp / PROGRESS).is_file():
            return True
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def read_progress(out: Path, key: str, valid: Collection[tuple]) -> tuple[set[tuple] | None, str]:
    """The writes an interrupted run left durable in OUT.partial, if its progress file has this key and
    names only writes of this plan (`valid`); else None and why not."""
    tmp = partial_dir(Path(out))
    path = tmp / PROGRESS
    if not path.is_file():
        return None, f"no interrupted run of this conversion in {tmp}"
    try:
        progress = json.loads(path.read_text())
        same = progress["key"] == key
        done = {as_key(k) for k in progress["done"]}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        return None, f"{path} is unreadable ({type(exc).__name__})"
    if not same:
        return None, f"{tmp} was left by a different conversion"
    if not done <= set(valid):
        return None, f"{path} names writes this conversion does not make"
    files = progress.get("files")
    if not isinstance(files, dict):
        return None, f"{path} does not list the shards it relies on"
    for name, size in files.items():
        try:
            found = inside(tmp, name, PROGRESS).stat().st_size
        except (OSError, SourceError):
            found = None
        if found is None or not isinstance(size, int) or found < size:
            return None, (f"{tmp / str(name)} is {'missing' if found is None else f'{found} bytes'}, the progress "
                          f"snapshot recorded {size}")
    return done, ""


def as_key(key: list) -> tuple:
    """A write key read back from JSON (lists where write_key had tuples)."""
    target, index = key
    if not isinstance(target, str):
        raise TypeError("target")
    return (target, tuple(tuple(i) if isinstance(i, list) else i for i in index))


def key_index(key: tuple) -> tuple[str, tuple]:
    """(target, index) of a write key: the inverse of `write_key`."""
    target, index = key
    return target, tuple(slice(*i) if isinstance(i, tuple) else i for i in index)


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
        raise os_error(exc, f"cannot write {path}") from None


def _copy(src: Path, dst: Path) -> None:
    try:
        shutil.copyfile(src, dst)
    except OSError as exc:
        raise os_error(exc, f"cannot copy {src} to {dst}") from None
