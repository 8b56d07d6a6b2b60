"""Safetensors: headers parsed directly; each tensor (or row range) mapped on its own.

A read maps just that tensor's byte range (MAP_POPULATE, one syscall for the page faults) and
returns a zero-copy view; the mapping is released when the last view of it is dropped, so the file
pages count in RSS only while the engine holds that slice, never for the whole file. The only copy
is the one the transform or the writer makes. A folder is a single `model.safetensors`, a sharded
set with `model.safetensors.index.json`, or any `*.safetensors` files.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_cli.dtypes import SAFETENSORS_NAMES, numpy_dtype_of_safetensors
from ckpt_cli.errors import OutputError, SourceError
from ckpt_cli.io.outdir import os_error

MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def parse_header(raw_len: bytes, raw_header: bytes, file: Path, file_size: int | None) -> dict[str, TensorInfo]:
    """Parse a safetensors header (the 8-byte length and the JSON) into TensorInfo records.

    As strict as the safetensors library: a JSON object with no repeated name, each tensor a known dtype,
    a shape of non-negative integers and `data_offsets` [begin, end] of non-negative integers matching
    that shape; sorted by offset, the tensors tile the data region from 0 to its end with no gap or
    overlap (so no tensor can point into the header); with `file_size`, the region ends where the file does.
    """
    (n,) = struct.unpack("<Q", raw_len)
    try:
        header = json.loads(raw_header[:n], object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{file}: not a safetensors file (bad header: {exc})") from None
    except _DuplicateKey as exc:
        raise SourceError(f"{file}: bad safetensors header: {exc.args[0]!r} appears twice") from None
    if not isinstance(header, dict):
        raise SourceError(f"{file}: bad safetensors header: not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise SourceError(f"{file}: bad safetensors header: __metadata__ must map names to strings")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise SourceError(f"{file}: bad safetensors header: tensor {name} is not an object")
        dtype = numpy_dtype_of_safetensors(meta.get("dtype"), name)
        shape, offsets = meta.get("shape"), meta.get("data_offsets")
        if not isinstance(shape, list) or not all(_natural(s) for s in shape):
            raise SourceError(f"{file}: bad safetensors header: tensor {name} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(x) for x in offsets)
                and offsets[0] <= offsets[1]):
            raise SourceError(f"{file}: bad safetensors header: tensor {name} has data_offsets {offsets!r} "
                              "(two non-negative integers, begin <= end)")
        shape = tuple(shape)
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise SourceError(f"{file}: tensor {name} has {end - begin} bytes for shape {shape} {dtype}")
        if file_size is not None and base + end > file_size:
            raise SourceError(f"{file} is truncated: tensor {name} ends at byte {base + end}, "
                              f"the file has {file_size}")
        out[name] = TensorInfo(name, file, dtype, shape, base + begin, base + end)
    pos = base
    for info in sorted(out.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != pos:
            what = "overlaps the tensor before it" if info.begin < pos else f"leaves a gap of {info.begin - pos} bytes"
            raise SourceError(f"{file}: bad safetensors header: tensor {info.name} (data_offsets "
                              f"{info.begin - base}..{info.end - base}) {what}")
        pos = info.end
    if file_size is not None and pos != file_size:
        raise SourceError(f"{file}: bad safetensors header: its tensors cover {pos - base} bytes of data, the "
                          f"file holds {file_size - base}")
    return out


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: a dict, refusing a repeated key (json.loads would keep the last one silently)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _natural(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def regular_file(path: Path, what: str = "file") -> int:
    """The size of `path` (symlinks followed) when it is a regular file; a one-line SourceError otherwise.

    Checked before opening: a FIFO would block the open forever, a device would stream endless bytes.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceError(f"missing {what} {path}") from None
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SourceError(f"{path} is a directory, expected a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(f"{path} is not a regular file (a FIFO, socket or device): refused as a {what}")
    return st.st_size


def inside(folder: Path, name: str, what: str) -> Path:
    """`folder / name` when `name` is a plain relative path (no `..` part, not absolute): what a checkpoint's
    metadata may name; a one-line SourceError naming the entry otherwise. (Links inside the folder are the
    folder's own business: a hub-cache snapshot links every file into its blobs.)"""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "\0" in name \
            or ".." in re.split(r"[/\\]", name) or Path(name).is_absolute():
        raise SourceError(f"{what} names {name!r}, which is not a file inside {folder}: refused")
    return Path(folder) / name


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Read the header of one local safetensors file, checking it against the file size."""
    size = regular_file(file, "safetensors file")
    try:
        with open(file, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise SourceError(f"{file} is truncated: no safetensors header")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SourceError(f"{file} is truncated or not safetensors (header length {n}, file {size} bytes)")
            raw = fh.read(n)
    except FileNotFoundError:
        raise SourceError(f"missing file {file}") from None
    except IsADirectoryError:
        raise SourceError(f"{file} is a directory, expected a safetensors file") from None
    return parse_header(raw_len, raw, file, size)


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when there is one.

    Every shard the index names must be a file inside the folder: a name with `..`, an absolute path or a
    symbolic link leading out is refused, naming the entry.
    """
    index = folder / INDEX_NAME
    if index.exists():
        regular_file(index, "index")
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SourceError(f"{index}: unreadable index ({exc})") from None
        files = sorted(set(map(str, weight_map.values())))
        paths = [inside(folder, f, INDEX_NAME) for f in files]
        missing = [f for f, p in zip(files, paths, strict=True) if not p.exists()]
        if missing:
            raise SourceError(f"{folder}: shard {missing[0]} named in {INDEX_NAME} is missing")
        return paths
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    if not files:
        raise SourceError(f"{folder}: no safetensors files (model.safetensors or an index) found")
    return files


class SafetensorsFolder:
    """All tensors of a local folder of safetensors shards, read one tensor at a time."""

    local = True    # data can be read at any time (a streamed repo's only while its shard is there)
    local_files = True      # its shards are local files (not a bucket's objects)

    def __init__(self, folder: Path, files: Iterable[Path] | None = None):
        self.folder = Path(folder)
        self.tensors: dict[str, TensorInfo] = {}
        for f in files if files is not None else shard_files(self.folder):
            for name, info in read_header(f).items():
                if name in self.tensors:
                    raise SourceError(f"tensor {name} appears in both {self.tensors[name].file.name} and {f.name}")
                self.tensors[name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise SourceError(f"tensor {name} is missing from {self.folder}") from None

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """One tensor, or rows [start, stop) of its axis 0, as a read-only zero-copy view."""
        info = self.info(name)
        if rows is None:
            return map_range(info.file, info.begin, info.nbytes).view(info.dtype).reshape(info.shape)
        start, stop = rows
        row = int(np.prod(info.shape[1:], dtype=np.int64)) * info.dtype.itemsize
        data = map_range(info.file, info.begin + start * row, (stop - start) * row)
        return data.view(info.dtype).reshape((stop - start, *info.shape[1:]))

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.read(name, (start, stop))


def map_range(file: Path, offset: int, nbytes: int) -> np.ndarray:
    """A read-only uint8 view of `nbytes` at `offset`, backed by its own mapping (unmapped when dropped)."""
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        with open(file, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if offset + nbytes > size:
                raise SourceError(f"{file} is truncated: wanted {nbytes} bytes at offset {offset}, file has {size}")
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fh.fileno(), offset - start + nbytes, flags=flags, prot=mmap.PROT_READ, offset=start)
    except FileNotFoundError:
        raise SourceError(f"missing file {file}") from None
    return np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=offset - start)


def read_range(file: Path, offset: int, nbytes: int) -> np.ndarray:
    """pread `nbytes` at `offset` into a new uint8 array; a short read means a truncated file."""
    buf = np.empty(nbytes, dtype=np.uint8)
    view = memoryview(buf)
    fd = os.open(file, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise SourceError(f"{file} is truncated: wanted {nbytes} bytes at offset {offset}")
            done += got
    finally:
        os.close(fd)
    return buf


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to be written into a safetensors file: name, dtype, shape."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def safetensors_layout(tensors: Iterable[PlannedTensor], metadata: dict[str, str] | None = None
                       ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A safetensors file's head (8-byte length + JSON header, padded to 8 bytes) with the tensors' data laid
    out in the order given, and each tensor's (begin, end) in the data section."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for t in tensors:
        header[t.name] = {"dtype": SAFETENSORS_NAMES[np.dtype(t.dtype)], "shape": list(t.shape),
                          "data_offsets": [pos, pos + t.nbytes]}
        offsets[t.name] = (pos, pos + t.nbytes)
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


class StreamingSafetensorsWriter:
    """Writes a safetensors file whose header is known up front; tensors arrive in any order.

    The header (names, dtypes, shapes, offsets) is written first, then each tensor (or a range of its
    rows, `write_rows`) is written at its offset with pwrite as it is produced, so no tensor is held
    longer than its own write.
    """

    def __init__(self, path: Path, tensors: Iterable[PlannedTensor], metadata: dict[str, str] | None = None,
                 reopen: bool = False):
        """`reopen`: continue a file an interrupted run began (its header must be this one, byte for byte);
        its data is kept, and the caller accounts for the tensors already in it (`filled`)."""
        self.path = Path(path)
        tensors = sorted(tensors, key=lambda t: t.name)
        head, self.offsets = safetensors_layout(tensors, metadata)
        self.base = len(head)
        self.total = self.base + sum(t.nbytes for t in tensors)
        self.written: set[str] = set()
        self.filled: dict[str, int] = {}   # bytes written so far per tensor (row writes add up)
        self.shapes = {t.name: tuple(t.shape) for t in tensors}
        try:
            if reopen:
                self.fd = os.open(self.path, os.O_RDWR)
                if os.pread(self.fd, len(head), 0) != head or os.fstat(self.fd).st_size > self.total:
                    os.close(self.fd)
                    raise OutputError(f"{self.path}: not the file this conversion writes (its header differs)")
            else:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.pwrite(self.fd, head, 0)
        except OSError as exc:
            raise OutputError(f"cannot {'reopen' if reopen else 'write'} {self.path}: {exc.strerror}") from None

    def write(self, name: str, array: np.ndarray) -> None:
        begin, end = self.offsets[name]
        self._pwrite(name, begin, end - begin, array)

    def write_rows(self, name: str, start: int, array: np.ndarray) -> None:
        """Write rows [start, start + len(array)) of a tensor (axis 0) at their offset in the file."""
        begin, end = self.offsets[name]
        shape = self.shapes[name]
        if not shape or tuple(array.shape[1:]) != shape[1:] or start < 0 or start + len(array) > shape[0]:
            raise ValueError(f"{name}: rows {start}:{start + len(array)} of shape {array.shape[1:]} do not fit "
                             f"{shape}")
        row = (end - begin) // shape[0] if shape[0] else 0
        self._pwrite(name, begin + start * row, len(array) * row, array)

    def write_part(self, name: str, start: int, stop: int, inner: tuple, array: np.ndarray) -> None:
        """Write `array` at `block[inner]` of rows [start, stop) of a tensor, keeping the rest of the block.

        For parts that are not contiguous on disk (a strided index): the block is read back (what other
        parts already wrote; zeros where nothing was written yet), the part placed, the block written.
        Only the part's bytes count as filled, so `close` still sees every element written exactly once
        when the parts tile the tensor.
        """
        begin, end = self.offsets[name]
        shape = self.shapes[name]
        if not shape or not 0 <= start < stop <= shape[0]:
            raise ValueError(f"{name}: rows {start}:{stop} do not fit {shape}")
        dtype = np.dtype(array.dtype)
        row = (end - begin) // shape[0]
        offset, nbytes = begin + start * row, (stop - start) * row
        raw = self._pread(self.base + offset, nbytes)
        block = raw.view(dtype).reshape((stop - start, *shape[1:]))
        if block[inner].shape != array.shape:
            raise ValueError(f"{name}: a part of shape {array.shape} does not fit {block[inner].shape} at {inner}")
        block[inner] = array
        self._pwrite(name, offset, nbytes, block, counted=array.nbytes)

    def _pread(self, offset: int, nbytes: int) -> np.ndarray:
        """Bytes at `offset` of the file being written; past its current end (not written yet), zeros."""
        buf = np.zeros(nbytes, dtype=np.uint8)
        view = memoryview(buf)
        done = 0
        try:
            while done < nbytes:
                got = os.preadv(self.fd, [view[done:]], offset + done)
                if got == 0:
                    break
                done += got
        except OSError as exc:
            raise OutputError(f"cannot read back {self.path}: {exc.strerror}") from None
        return buf

    def _pwrite(self, name: str, offset: int, nbytes: int, array: np.ndarray, counted: int | None = None) -> None:
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        if len(data) != nbytes:
            raise ValueError(f"{name}: {len(data)} bytes, planned {nbytes}")
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], self.base + offset + done)
        except OSError as exc:
            raise os_error(exc, f"cannot write {self.path}") from None
        self.count(name, nbytes if counted is None else counted)

    def count(self, name: str, nbytes: int) -> None:
        """Count `nbytes` of a tensor as written (by `_pwrite`, or by the interrupted run a reopened file
        continues)."""
        self.filled[name] = self.filled.get(name, 0) + nbytes
        if self.filled[name] >= self.offsets[name][1] - self.offsets[name][0]:
            self.written.add(name)

    def close(self) -> None:
        """Check every tensor was written, fsync, close."""
        missing = {n for n, (b, e) in self.offsets.items() if self.filled.get(n, 0) != e - b}
        try:
            if not missing:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
        if missing:
            raise ValueError(f"{self.path}: tensors never written: {sorted(missing)[:3]}")


def save_file(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write a dict of arrays as one safetensors file (small files: demo models, tests)."""
    writer = StreamingSafetensorsWriter(path, [PlannedTensor(k, v.dtype, v.shape) for k, v in tensors.items()],
                                        metadata)
    for name, arr in tensors.items():
        writer.write(name, arr)
    writer.close()


def iter_names(folder: SafetensorsFolder) -> Iterator[str]:
    """Tensor names in on-disk order (file, then offset): the order that reads sequentially."""
    yield from (t.name for t in sorted(folder.tensors.values(), key=lambda t: (str(t.file), t.begin)))
