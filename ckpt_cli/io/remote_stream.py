"""A hub repo's shards fetched while converting, in the order the engine reads them.

`RemoteFolder` is a SafetensorsFolder over the headers `RemoteRepo` read; a read waits until its shard is
on disk. `ShardStream` downloads the shards on one thread, overlapped with the conversion. A shard already
in the hub cache is read in place. Without a disk bound the others go to the hub cache (kept, reused by
the next run). With `max_disk` they go to a private directory beside the output, a shard is fetched only
when it fits beside those still in use (so two overlap only when the bound holds two), and each is deleted
as soon as every task reading it has been written.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_cli.errors import OutputError, RemoteError
from ckpt_cli.io.remote import RemoteRepo, bounded_session, hub_errors, retried
from ckpt_cli.io.safetensors import SafetensorsFolder, read_range
from ckpt_cli.io.tokenizer import TOKENIZER_PATTERNS
from ckpt_cli.plan import write_key

DIR_OVERHEAD = 16 * 1024   # download bookkeeping files (hub metadata, locks) counted against --max-disk
# Small files fetched whole for a conversion (configs, tokenizer), never the shards.
SIDE_FILES = ["*.json", *TOKENIZER_PATTERNS]


class RemoteFolder(SafetensorsFolder):
    """The tensors of a remote repo; a read waits for its shard, then preads it (no mapping, so a
    finished shard can be deleted and its space comes back at once)."""

    local = False

    def __init__(self, repo: RemoteRepo):
        self.folder = Path(repo.repo_id)
        self.repo = repo
        self.tensors = dict(repo.tensors)
        self.stream: ShardStream | None = None

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        info = self.info(name)
        if self.stream is None:
            raise AssertionError("remote tensors are read only while a ShardStream runs")
        path = self.stream.local_path(info.file.name)
        shape = info.shape
        offset, nbytes = info.begin, info.nbytes
        if rows is not None:
            row = int(np.prod(shape[1:], dtype=np.int64)) * info.dtype.itemsize
            offset, nbytes = info.begin + rows[0] * row, (rows[1] - rows[0]) * row
            shape = (rows[1] - rows[0], *shape[1:])
        return read_range(path, offset, nbytes).view(info.dtype).reshape(shape)


@dataclass(frozen=True)
class DiskNeed:
    """Local disk the downloads of one run take."""

    download: int       # bytes to fetch (needed shards not already in the hub cache)
    cached: int         # bytes of needed shards already in the hub cache (read in place)
    peak: int           # most bytes present at once where the downloads go
    minimum: int        # the smallest --max-disk that can work (the largest shard group one read needs)


class ShardStream:
    """Fetches the shards a plan reads, in read order, on a background thread; frees them once written.

    A shard already in the hub cache is read in place, never fetched again. The others go to the hub
    cache (no bound), or to a private directory under `max_disk`: a shard is fetched only when it fits
    beside the shards still in use, and deleted when the last task that reads it has been written.
    """

    def __init__(self, folder: RemoteFolder, plan, reader, max_disk: int | None = None, skip=frozenset()):
        self.folder = folder
        self.repo = folder.repo
        self.max_disk = max_disk
        consumed = getattr(reader, "consumed_with", lambda name: [])
        jobs = sorted(((t, task) for t in plan.tensors if t.fill is None for task in t.tasks),   # fill: no source
                      key=lambda j: reader.order_key(j[1].source))
        self.order: list[str] = []                 # shards in the order the engine first reads them
        self.pending: dict[str, int] = {}          # shard -> tasks reading it not yet written
        self.task_shards: dict[tuple, tuple[str, ...]] = {}
        group = 0
        for tensor, task in jobs:
            if write_key(tensor.target, tensor.target_index(task)) in skip:
                continue                           # written by the interrupted run this one resumes
            # an MXFP4 weight is not stored under its own name: only its consumed pair is
            names = [n for n in (task.source.name, *consumed(task.source.name)) if n in folder]
            shards = tuple(dict.fromkeys(folder.info(n).file.name for n in names))
            self.task_shards[write_key(tensor.target, tensor.target_index(task))] = shards
            group = max(group, sum(self.repo.sizes[s] for s in shards))
            for s in shards:
                if s not in self.pending:
                    self.order.append(s)
                self.pending[s] = self.pending.get(s, 0) + 1
        self.local: dict[str, Path] = {}
        for s in self.order:
            cached = self.repo.cached_path(s)
            if cached is not None:
                self.local[s] = cached
        fetch = [self.repo.sizes[s] for s in self.order if s not in self.local]
        total = sum(fetch)
        minimum = (max(group, *fetch) if fetch else 0) + DIR_OVERHEAD
        peak = total if max_disk is None else min(total + DIR_OVERHEAD, max(minimum, max_disk))
        self.disk = DiskNeed(total, sum(self.repo.sizes[s] for s in self.local), peak, minimum)
        self.ready: dict[str, threading.Event] = {s: threading.Event() for s in self.order}
        for s in self.local:
            self.ready[s].set()
        self.cond = threading.Condition()
        self.present = 0              # bytes fetched (or being fetched) into the private dir, not yet deleted
        self.peak_disk = 0            # most bytes ever found in the private dir (measured after each fetch)
        self.downloaded = 0
        self.error: BaseException | None = None
        self.closed = False
        self.thread: threading.Thread | None = None
        self.tmp: Path | None = None

    def check(self) -> DiskNeed:
        """Refuse up front when --max-disk cannot hold the largest shard a read needs."""
        if self.max_disk is not None and self.disk.download and self.disk.minimum > self.max_disk:
            raise OutputError(f"--max-disk {_gb(self.max_disk)} cannot hold the largest shard this conversion "
                              f"downloads ({_gb(self.disk.minimum - DIR_OVERHEAD)}); give at least "
                              f"{_gb(self.disk.minimum)}, or leave it out to use the hub cache")
        return self.disk

    def prepare(self, out: Path, output_bytes: int) -> list[str]:
        """Before anything is written: refuse what cannot work (bound, free disk), fetch the small side
        files (tokenizer, generation config) into the hub cache; returns notes for the user."""
        from huggingface_hub import constants, snapshot_download

        need = self.check()
        where = Path(out).resolve().parent if self.max_disk is not None else Path(constants.HF_HUB_CACHE)
        probe = where
        while not probe.exists():
            probe = probe.parent
        want = need.peak + (output_bytes if _same_device(probe, Path(out).resolve().parent) else 0)
        free = shutil.disk_usage(probe).free
        if need.download and free < want:
            raise OutputError(f"not enough free disk at {probe}: the downloads (and output) need up to "
                              f"{_gb(want)}, {_gb(free)} free (bound the downloads with --max-disk)")
        with hub_errors(self.repo.repo_id, self.repo.revision):
            retried(snapshot_download, self.repo.repo_id, revision=self.repo.commit, allow_patterns=SIDE_FILES,
                    tqdm_class=_silent_tqdm())
        if not need.download:
            return [f"every shard of {self.repo.label} is in the hub cache: nothing to download"]
        mode = (f"at most {_gb(self.max_disk)} on disk at once, each shard deleted once written"
                if self.max_disk is not None else "into the hub cache")
        return [f"downloading {len(self.order) - len(self.local)} shard(s), {_gb(need.download)}, from "
                f"{self.repo.label} while converting ({mode})"]

    def start(self, near: Path) -> None:
        """Begin downloading; under a bound, into a private directory beside `near` (same disk as the output)."""
        self.check()
        if self.max_disk is not None and self.disk.download:
            parent = Path(near).resolve().parent
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=".ckpt-download-", dir=parent))
        self.folder.stream = self
        self.thread = threading.Thread(target=self._run, name="ckpt-download", daemon=True)
        self.thread.start()

    def track(self, writer):
        """The writer, wrapped so that a shard is freed once every task reading it has been written."""
        return _TrackingWriter(writer, self)

    def local_path(self, shard: str) -> Path:
        """Block until `shard` is on disk; its path."""
        self.ready[shard].wait()
        if self.error is not None:
            raise self.error
        if shard not in self.local:
            raise RemoteError(f"{self.repo.repo_id}: the download of {shard} was stopped")
        return self.local[shard]

    def written(self, key: tuple) -> None:
        """One task's slice is written: free each shard it was the last reader of (private dir only)."""
        for shard in self.task_shards.get(key, ()):
            self.pending[shard] -= 1
            if self.pending[shard] == 0 and self.tmp is not None and self._fetched(shard):
                self._delete(shard)

    def close(self) -> None:
        """Stop downloading and remove the private directory (the hub cache is left as it is)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=2)
        for event in self.ready.values():
            event.set()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.folder.stream = None

    @property
    def stats(self) -> dict:
        return {"repo_id": self.repo.repo_id, "commit": self.repo.commit, "shards": len(self.order),
                "downloaded_bytes": self.downloaded, "cached_bytes": self.disk.cached, "max_disk": self.max_disk,
                "peak_download_disk": self.peak_disk if self.tmp is not None else None}

    def _fetched(self, shard: str) -> bool:
        path = self.local.get(shard)
        return path is not None and self.tmp is not None and self.tmp in path.parents

    def _run(self) -> None:
        try:
            for shard in self.order:
                if shard in self.local:
                    continue
                size = self.repo.sizes[shard]
                with self.cond:
                    while (self.tmp is not None and self.present
                           and self.present + size + DIR_OVERHEAD > self.max_disk and not self.closed):
                        self.cond.wait()
                    if self.closed:
                        return
                    self.present += size
                path = self._download(shard)
                with self.cond:
                    self.local[shard] = path
                    if self.tmp is not None:
                        self.peak_disk = max(self.peak_disk, tree_bytes(self.tmp))
                self.ready[shard].set()
        except BaseException as exc:  # noqa: BLE001 - handed to the reading threads, which raise it
            self.error = _mapped(exc, self.repo)
            for event in self.ready.values():
                event.set()

    def _download(self, shard: str) -> Path:
        from huggingface_hub import hf_hub_download

        bounded_session()
        path = Path(retried(hf_hub_download, self.repo.repo_id, shard, revision=self.repo.commit,
                            local_dir=self.tmp, tqdm_class=_silent_tqdm()))
        self.downloaded += self.repo.sizes[shard]
        return path

    def _delete(self, shard: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.local[shard])
        with self.cond:
            self.present -= self.repo.sizes[shard]
            self.cond.notify_all()


class _TrackingWriter:
    """Forwards to the engine's writer; tells the stream which task each write finished."""

    def __init__(self, writer, stream: ShardStream):
        self._writer = writer
        self._stream = stream

    def create(self, target, shape, dtype, chunk, read_chunk=None) -> None:
        self._writer.create(target, shape, dtype, chunk, read_chunk=read_chunk)

    def write(self, target: str, index: tuple, array: np.ndarray) -> int:
        result = self._writer.write(target, index, array)
        self._stream.written(write_key(target, index))
        return result

    def flush(self) -> None:
        self._writer.flush()


def _mapped(exc: BaseException, repo: RemoteRepo) -> BaseException:
    """The one-line RemoteError for a hub failure; anything else unchanged."""
    try:
        with hub_errors(repo.repo_id, repo.revision):
            raise exc
    except BaseException as mapped:  # noqa: BLE001
        return mapped


def tree_bytes(path: Path) -> int:
    """Bytes of every file under `path` (apparent sizes; partial downloads included)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _same_device(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return True


def _gb(n: int) -> str:
    from ckpt_cli.units import human_bytes

    return human_bytes(n)


@functools.cache
def _silent_tqdm() -> type:
    """A tqdm class that draws nothing: our own progress bar reports the conversion."""
    from huggingface_hub.utils import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent
