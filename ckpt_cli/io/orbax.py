"""MaxText checkpoints as Orbax writes them, written and read slice by slice with tensorstore.

Layout (maxtext-layout.md §3.5): `OUT/0/items` is an Orbax PyTree checkpoint of
`{"step": 0, "params": {"params": W}, "opt_state": {}}`; each leaf is a zarr3 (or zarr v2) array
inside one OCDBT key-value store (or one directory per array); `OUT/0/_CHECKPOINT_METADATA` carries
`custom_metadata` with `scan_layers` and our provenance. We write into `OUT.partial` and publish by
rename after the completion markers, so an interrupted run never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorstore as ts

from ckpt_cli.dtypes import dtype_name
from ckpt_cli.errors import DiskFull, OutputError, SourceError
from ckpt_cli.io.durable import fsync_tree
from ckpt_cli.io.location import BucketURL
from ckpt_cli.io.outdir import check_output, make_partial, os_error, output_path, partial_dir, publish
from ckpt_cli.io.safetensors import inside, regular_file
from ckpt_cli.io.writeback import NewFiles, Writeback
from ckpt_cli.plan import write_key

HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"
ROOT_KEYS = ("params", "params")
PROGRESS = "ckpt-progress.json"     # in OUT.partial: what an interrupted run had made durable (--resume)
SNAPSHOT_BYTES = 1 << 30            # committed bytes between two progress snapshots
BATCH_BYTES = 64 * 1024 * 1024
MAX_PENDING_COMMITS = 1   # commits in flight while the next batch is staged


@dataclass(frozen=True)
class StorageOptions:
    """How arrays are stored: OCDBT + zarr3 as MaxText does; no compression by default (Orbax uses zstd
    level 1, which saves ~10-25% of bf16 bytes for ~2x the CPU; `compression="zstd"` matches it)."""

    use_ocdbt: bool = True
    use_zarr3: bool = True
    compression: str = "none"      # "none" (fastest; bf16 weights gain ~10% from zstd) or "zstd"
    zstd_level: int = 1


def param_name(path: str) -> str:
    """'decoder/layers/mlp/wo/kernel' -> 'params.params.decoder.layers.mlp.wo.kernel' (Orbax's leaf name)."""
    return ".".join((*ROOT_KEYS, *path.split("/")))


def _context() -> ts.Context:
    # No cache (we never re-read what we write); fsync once at the end instead of per write.
    return ts.Context({"cache_pool": {"total_bytes_limit": 0}, "file_io_sync": False,
                       "data_copy_concurrency": {"limit": max(2, os.cpu_count() or 2)}})


def kvstore_spec(items_dir: Path | BucketURL, name: str, opts: StorageOptions) -> dict:
    """The tensorstore kvstore spec of one leaf of an items directory (local, or a bucket prefix)."""
    if isinstance(items_dir, BucketURL):
        base = items_dir.kvstore()
        if opts.use_ocdbt:
            return {"driver": "ocdbt", "base": base, "path": f"{name}/"}
        return base | {"path": f"{base['path']}{name}/"}
    if opts.use_ocdbt:
        return {"driver": "ocdbt", "base": f"file://{items_dir.resolve()}/", "path": f"{name}/"}
    return {"driver": "file", "path": f"{items_dir.resolve()}/{name}/"}


def array_spec(items_dir: Path, name: str, shape: tuple[int, ...], dtype: np.dtype, chunk: tuple[int, ...],
               opts: StorageOptions, manifest: dict | None = None, create: bool = True,
               read_chunk: tuple[int, ...] | None = None) -> dict:
    """A tensorstore spec creating one zarr3/zarr array (`manifest`: where OCDBT keeps its manifest;
    `create=False` opens an existing one, checking that its metadata is the same).

    zarr3 with a `read_chunk` other than `chunk`: each chunk is one shard of zarr3's `sharding_indexed` codec
    (as Orbax itself writes them) holding read chunks that readers fetch alone, so a host restoring its slice
    reads about its slice. zarr v2 has no such codec: its chunks are the write chunks.
    """
    kv = kvstore_spec(items_dir, name, opts)
    if manifest is not None and opts.use_ocdbt:
        kv["manifest"] = manifest
    if opts.use_zarr3:
        codecs: list[dict] = [{"name": "bytes", "configuration": {"endian": "little"}}]
        if opts.compression == "zstd":
            codecs.append({"name": "zstd", "configuration": {"level": opts.zstd_level, "checksum": False}})
        if read_chunk is not None and tuple(read_chunk) != tuple(chunk):
            codecs = [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": list(read_chunk), "codecs": codecs,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                "index_location": "end"}}]
        metadata = {"shape": list(shape), "data_type": dtype_name(dtype), "fill_value": 0,
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
                    "codecs": codecs}
        return {"driver": "zarr3", "kvstore": kv, "metadata": metadata, "create": create, "open": not create,
                "store_data_equal_to_fill_value": True}
    compressor = {"id": "zstd", "level": opts.zstd_level} if opts.compression == "zstd" else None
    metadata = {"shape": list(shape), "chunks": list(chunk), "dtype": _zarr2_dtype(dtype),
                "compressor": compressor, "fill_value": None}
    return {"driver": "zarr", "kvstore": kv, "metadata": metadata, "create": create, "open": not create,
            "store_data_equal_to_fill_value": True}


def _zarr2_dtype(dtype: np.dtype) -> str:
    """zarr v2's dtype: numpy's type string, or tensorstore's name for the ml_dtypes types numpy has none for
    (their `.str` is a void type)."""
    name = dtype_name(dtype)
    return name if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2") else np.dtype(dtype).str


def _leaf_metadata(keys: tuple[str, ...], value_type: str, skip: bool = False) -> dict:
    return {"key_metadata": [{"key": k, "key_type": 2} for k in keys],
            "value_metadata": {"value_type": value_type, "skip_deserialize": skip}}


def tree_metadata(paths: Iterable[str], opts: StorageOptions) -> dict:
    """Orbax's `_METADATA` for the MaxText state tree with these parameter paths."""
    tree = {"('step',)": _leaf_metadata(("step",), "scalar"),
            "('opt_state',)": _leaf_metadata(("opt_state",), "Dict", skip=True)}
    for path in paths:
        keys = (*ROOT_KEYS, *path.split("/"))
        tree[str(keys)] = _leaf_metadata(keys, "np.ndarray")
    return {"tree_metadata": tree, "use_ocdbt": opts.use_ocdbt, "use_zarr3": opts.use_zarr3,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}


class OrbaxWriter:
    """Creates every array up front, takes slice writes in batched transactions, publishes atomically.

    The OCDBT manifest is kept in memory while writing and written to disk once, at `finalize`. On disk,
    every commit would replace `manifest.ocdbt` by rename (twice per commit); the replaced file's blocks
    are freed inside the commit, and on filesystems mounted with online `discard` (common on cloud VMs)
    that free waits for a synchronous discard queued behind all pending writes. Measured here, commits
    stalled for up to a second with every thread idle. The data files are written to disk as usual.

    Resumable runs (`progress_key` given): every `SNAPSHOT_BYTES` committed, the manifest and the list
    of committed slice writes (`PROGRESS`, tagged with the key) are written to `OUT.partial`, after the
    data files they refer to are durable. `resume=True` reopens such a partial output when its key
    matches, and `done` then names the writes already there; otherwise the run starts afresh.
    """

    def __init__(self, out: Path, opts: StorageOptions, overwrite: bool = False, progress_key: str | None = None,
                 resume: bool = False):
        self.out = output_path(out)
        self.opts = opts
        self.overwrite = overwrite
        check_output(self.out, overwrite)
        self.tmp = partial_dir(self.out)
        self.items = self.tmp / "0" / "items"
        self.progress_key = progress_key
        self.context = _context()
        self.manifest = {"driver": "memory", "path": f"ckpt-manifest-{id(self)}/"}
        self.done: set[tuple] = set()
        self.resumed = resume and self._reopen()
        if not self.resumed:
            make_partial(self.out)
            try:
                self.items.mkdir(parents=True)
            except OSError as exc:
                raise os_error(exc, f"cannot create {self.items}") from None
        self._init_batches()
        self.new_files = NewFiles(self.items)
        self.writeback = Writeback()

    def _init_batches(self) -> None:
        """The state of the arrays, transactions and commits, empty (shared by every destination)."""
        self.committed: list[tuple] = []     # writes committed since the run began, in order
        self.txn_keys: list[tuple] = []
        self.since_snapshot = 0
        self.snapshots_queued = 0
        self.arrays: dict[str, ts.TensorStore] = {}
        self.opening: dict[str, ts.Future] = {}
        self.create_txn: ts.Transaction | None = None
        self.txn: ts.Transaction | None = None
        self.txn_bytes = 0
        self.pending: deque[tuple[ts.Future, int, list[tuple]]] = deque()
        self.init_ns = time.time_ns()

    def create(self, path: str, shape: tuple[int, ...], dtype: np.dtype, chunk: tuple[int, ...],
               read_chunk: tuple[int, ...] | None = None) -> None:
        """Start creating one leaf array (metadata only). Creations run concurrently until the first write,
        in one transaction, so all their metadata lands in one commit. Each write covers whole `chunk`s;
        readers fetch `read_chunk`s (zarr3)."""
        spec = array_spec(self.items, param_name(path), shape, dtype, chunk, self.opts, self.manifest,
                          create=not self.resumed, read_chunk=read_chunk)
        if self.resumed:                # the arrays exist already (created in the interrupted run's first commit)
            self.opening[path] = ts.open(spec, context=self.context)
            return
        if self.create_txn is None:
            self.create_txn = ts.Transaction()
        self.opening[path] = ts.open(spec, context=self.context, transaction=self.create_txn)

    def _array(self, path: str) -> ts.TensorStore:
        if self.opening:
            for p, future in self.opening.items():
                self.arrays[p] = _result(future, f"{'opening' if self.resumed else 'creating'} {p}")
            self.opening.clear()
            if self.create_txn is not None:
                _result(self.create_txn.commit_async(), "creating arrays")
                self.create_txn = None
            self.arrays = {p: a.with_transaction(None) for p, a in self.arrays.items()}
        return self.arrays[path]

    def write(self, path: str, index: tuple, array: np.ndarray) -> int:
        """Stage one slice; returns the bytes now waiting in unfinished commits (for the engine's budget)."""
        if self.txn is None:
            self.txn = ts.Transaction()
        _result(self._array(path).with_transaction(self.txn)[index].write(
            array, can_reference_source_data_indefinitely=True), f"writing {path}")
        self.txn_bytes += array.nbytes
        self.txn_keys.append(write_key(path, index))
        if self.txn_bytes >= BATCH_BYTES:
            self._commit()
        return self.pending_bytes

    @property
    def pending_bytes(self) -> int:
        return self.txn_bytes + sum(n for _, n, _ in self.pending)

    def _commit(self) -> None:
        if self.txn is None:
            return
        while len(self.pending) >= MAX_PENDING_COMMITS:
            self._wait_oldest()
        self.pending.append((self.txn.commit_async(), self.txn_bytes, self.txn_keys))
        self.txn, self.txn_bytes, self.txn_keys = None, 0, []

    def _wait_oldest(self) -> None:
        future, nbytes, keys = self.pending.popleft()
        _result(future, "committing writes")
        self.committed += keys
        self.since_snapshot += nbytes
        self._start_writeback()
        if self.progress_key is not None and self.since_snapshot >= SNAPSHOT_BYTES:
            self._snapshot()

    def _snapshot(self) -> None:
        """Queue the manifest and the list of committed writes behind the data files they refer to."""
        self.since_snapshot = 0
        self.snapshots_queued += 1
        files = {}
        if self.opts.use_ocdbt:
            files["manifest.ocdbt"] = self._manifest_bytes()
        # No commit is in flight here: the files on disk are exactly those the committed writes made.
        sizes = snapshot_files(self.items, skip=files) | {name: len(data) for name, data in files.items()}
        progress = {"key": self.progress_key, "done": [*self.done, *self.committed], "files": sizes}
        # One job: a progress file never lands after its manifest failed to.
        rel = self.items.relative_to(self.tmp).as_posix()
        jobs = {f"{rel}/{name}": data for name, data in files.items()}
        jobs[PROGRESS] = json.dumps(progress).encode()
        self.writeback.snapshot(self.tmp, jobs)

    def _reopen(self) -> bool:
        """Take up an interrupted run's OUT.partial if its progress snapshot has our key."""
        done, _ = read_progress(self.out, self.progress_key, self.opts)
        if done is None:
            return False
        if self.opts.use_ocdbt:
            store = _result(ts.KvStore.open(self.manifest, context=self.context), "reading the OCDBT manifest")
            _result(store.write("manifest.ocdbt", (self.items / "manifest.ocdbt").read_bytes()),
                    "reading the OCDBT manifest")
        self.done = done
        return True

    def _start_writeback(self) -> None:
        """Hand the newly committed data files to the writeback thread, which makes them durable now."""
        self.writeback.persist(self.new_files.take())

    def flush(self) -> None:
        """Commit everything staged and wait for it."""
        if self.opening:
            self._array(next(iter(self.opening)))
        self._commit()
        while self.pending:
            self._wait_oldest()

    def finalize(self, custom_metadata: dict) -> None:
        """Write the step scalar, Orbax metadata and completion markers, fsync, and publish by rename."""
        self.flush()
        spec = array_spec(self.items, "step", (), np.dtype(np.int64), (), self.opts, self.manifest)
        spec["open"] = True         # a resumed run may find it from an interrupted finalize
        step = _result(ts.open(spec, context=self.context), "writing step")
        _result(step.write(np.int64(0)), "writing step")
        self.new_files.close()
        self.writeback.close()          # first: a queued progress snapshot would overwrite the final manifest
        if self.opts.use_ocdbt:
            self._write_manifest()
        _write_json(self.items / "_METADATA", tree_metadata(self.arrays, self.opts))
        for leftover in (PROGRESS, f"{PROGRESS}.ckpt-tmp", "0/items/manifest.ocdbt.ckpt-tmp"):
            (self.tmp / leftover).unlink(missing_ok=True)
        fsync_tree(self.tmp, synced=self.writeback.synced)
        (self.items / "commit_success.txt").write_text("Checkpoint commit was successful.")
        step_dir = self.tmp / "0"
        _write_json(step_dir / "_CHECKPOINT_METADATA", {
            "item_handlers": {"items": HANDLER}, "metrics": {}, "performance_metrics": {},
            "init_timestamp_nsecs": self.init_ns, "commit_timestamp_nsecs": time.time_ns(),
            "custom_metadata": custom_metadata})
        (step_dir / "commit_success.txt").write_text("Checkpoint commit was successful.")
        fsync_tree(self.tmp, data=False)
        publish(self.tmp, self.out, self.overwrite)

    def _manifest_bytes(self) -> bytes:
        store = _result(ts.KvStore.open(self.manifest, context=self.context), "reading the OCDBT manifest")
        data = bytes(_result(store.read("manifest.ocdbt"), "reading the OCDBT manifest").value)
        if not data:
            raise OutputError("the OCDBT manifest was not written")
        return data

    def _write_manifest(self) -> None:
        """Copy the in-memory OCDBT manifest to `items/manifest.ocdbt` (fsynced with the tree)."""
        data = self._manifest_bytes()
        try:
            (self.items / "manifest.ocdbt").write_bytes(data)
        except OSError as exc:
            raise os_error(exc, f"cannot write {self.items / 'manifest.ocdbt'}") from None

    def abort(self, keep: bool = False) -> bool:
        """Drop everything written so far (interrupt or error): no partial output survives, unless `keep`
        and it has a progress snapshot, which `--resume` takes up. Returns whether OUT.partial was kept."""
        for txn in (self.txn, self.create_txn):
            if txn is not None and txn.open:
                txn.abort()
        self.txn = self.create_txn = None
        for future, _, _ in self.pending:     # commits in flight would recreate files after the removal
            try:
                future.result()
            except Exception:  # noqa: BLE001 - already failing; the removal below is what matters
                pass
        self.pending.clear()
        self.new_files.close()
        # A queued snapshot is what --resume will need: let the writeback thread finish it (and the fsyncs
        # before it, at most a few batches); otherwise drop its queue.
        self.writeback.close(cancel=not (keep and self.snapshots_queued))
        if keep and self.progress_key is not None and (self.tmp / PROGRESS).is_file():
            return True
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def read_progress(out: Path, key: str | None, opts: StorageOptions) -> tuple[set[tuple] | None, str]:
    """The writes an interrupted run left durable in OUT.partial, if its snapshot has this key and every file
    the snapshot names is still there with the size it recorded; else None and why not."""
    tmp = partial_dir(Path(out))
    try:
        progress = json.loads((tmp / PROGRESS).read_text())
        same = isinstance(progress, dict) and key is not None and progress.get("key") == key
        done = {_as_key(k) for k in progress["done"]} if same else set()
        files = progress.get("files") if same else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return None, f"no readable progress of an interrupted run in {tmp}"
    if not same:
        return None, f"{tmp} was left by a different conversion"
    if not isinstance(files, dict) or (opts.use_ocdbt and "manifest.ocdbt" not in files):
        return None, f"{tmp / PROGRESS} does not list the files it relies on"
    items = tmp / "0" / "items"
    for name, size in files.items():
        try:
            found = inside(items, name, PROGRESS).stat().st_size
        except (OSError, SourceError):
            found = None
        if found != size:
            return None, (f"{items / str(name)} is {'missing' if found is None else f'{found} bytes'}, the progress "
                          f"snapshot recorded {size}")
    return done, ""


def snapshot_files(items: Path, skip: Iterable[str] = ()) -> dict[str, int]:
    """Every file under the items directory, by relative path, with its size (a progress snapshot's record)."""
    found: dict[str, int] = {}
    for dirpath, _, names in os.walk(items):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), items)
            if rel not in skip and not name.endswith(".ckpt-tmp"):
                try:
                    found[rel] = os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    pass
    return found


def _as_key(key: list) -> tuple:
    """A write key read back from JSON (lists where write_key had tuples)."""
    target, index = key
    return (target, tuple(tuple(i) if isinstance(i, list) else i for i in index))


def _result(future, what: str):
    try:
        return future.result()
    except ValueError as exc:  # tensorstore reports I/O failures (ENOSPC, EACCES) as ValueError
        msg = str(exc)
        if "No space left" in msg or "ENOSPC" in msg:
            raise DiskFull(f"disk full while {what}") from None
        if "Permission denied" in msg or "Read-only" in msg:
            raise OutputError(f"cannot write output while {what}: permission denied") from None
        if "http_response_code" in msg or "CURL error" in msg:     # a gs:// or s3:// request that failed for good
            raise OutputError(f"the object store failed while {what}: {msg.split(' [', 1)[0]}") from None
        raise


def _write_json(path: Path, obj: dict) -> None:
    try:
        path.write_text(json.dumps(obj, indent=1))
    except OSError as exc:
        raise os_error(exc, f"cannot write {path}") from None


# Where MaxText 0.2.5 keeps a non-parameter variable (e.g. DeepSeek-V3's router bias, collection MoEBiasVar)
# outside `params/params/`, by precedence (MaxText's own restore order): a pure-NNX training run's
# `nnx_aux/model/<path>` (train_state_nnx.to_checkpoint_dict), then its Flax collection beside `params`,
# `params/<Collection>/<path>` (its converter to_maxtext and Linen train states).
NNX_AUX = ("nnx_aux", "model")
_RNG_KEYS = frozenset({"rngs", "dropout"})   # RNG streams NNX keeps in nnx_aux: state, not weights


_LORA_LEAVES = ("kernel_lora_a", "kernel_lora_b")


def _param_path(keys: tuple[str, ...]) -> tuple[int, str] | None:
    """(precedence, parameter path) of a leaf of the state tree, or None when it is no model weight.

    A LoRA leaf wrapped as an NNX variable (`.../kernel_lora_a/value`: MaxText 0.2.5's to_maxtext adapter mode, and
    an NNX state saved whole, as Tunix saves `model_params`, at the root: `decoder/.../kernel_lora_a/value`) is
    read at its parameter path."""
    if len(keys) > 1 and keys[-1] == "value" and keys[-2] in _LORA_LEAVES:
        keys = keys[:-1]
        if keys[0] == "decoder":
            return 0, "/".join(keys)
    if len(keys) > 2 and keys[:2] == ROOT_KEYS:
        return 0, "/".join(keys[2:])
    if len(keys) > 2 and keys[0] == "params":
        return 1, "/".join(keys[2:])
    if len(keys) > 2 and keys[:2] == NNX_AUX and not _RNG_KEYS & set(keys):
        return 2, "/".join(keys[2:])
    return None


class OrbaxCheckpoint:
    """A MaxText/Orbax checkpoint opened for slice reads: run dir, step dir or items dir.

    Only model weights are read: `params/params/<path>`, and the non-parameter variables MaxText keeps
    elsewhere (`nnx_aux/model/<path>`, `params/<Collection>/<path>`), each under its path as if it were in
    `params/params`; optimizer state, RNG state and anything else is ignored. Reading metadata opens no
    array data; `read` fetches exactly one slice (whole chunks of one layer when the checkpoint was
    written by ckpt).
    """

    def __init__(self, path: Path | BucketURL):
        if isinstance(path, BucketURL):         # a gs:// or s3:// prefix, read through tensorstore's kvstores
            from ckpt_cli.io.bucket import read_checkpoint_meta

            self.items, self.metadata, self.step_metadata = read_checkpoint_meta(path)
        else:
            self._open_local(Path(path))
        if not isinstance(self.metadata, dict):
            raise SourceError(f"{self.items}: unreadable Orbax _METADATA (not a JSON object)")
        if not isinstance(self.step_metadata, dict):
            self.step_metadata = {}
        self.opts = StorageOptions(use_ocdbt=bool(self.metadata.get("use_ocdbt", True)),
                                   use_zarr3=bool(self.metadata.get("use_zarr3", False)))
        found: dict[str, tuple[int, tuple[str, ...]]] = {}
        try:
            entries = list(self.metadata.get("tree_metadata", {}).values())
            keys_of = [tuple(str(k["key"]) for k in e.get("key_metadata", [])) for e in entries]
        except (AttributeError, KeyError, TypeError):
            raise SourceError(f"{self.items}: unreadable Orbax _METADATA (not a tree of key_metadata)") from None
        for keys in keys_of:
            where = _param_path(keys)
            if where is None:
                continue
            bad = [k for k in keys if not k or k in (".", "..") or "/" in k or "\\" in k or "\0" in k]
            if bad:     # each key names a directory of the items dir: it must stay inside
                raise SourceError(f"{self.items}: _METADATA names parameter key {bad[0]!r}, which is not a "
                                  "plain name: refused")
            if where[0] >= found.get(where[1], (-1,))[0]:
                found[where[1]] = (where[0], keys)
        if not any(rank == 0 for rank, _ in found.values()):
            raise SourceError(f"{self.items}: no params/params arrays in this checkpoint")
        self.paths: list[str] = list(found)
        self.keys: dict[str, tuple[str, ...]] = {p: keys for p, (_, keys) in found.items()}   # where each is stored
        self.context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self._arrays: dict[str, ts.TensorStore] = {}
        self._axes: dict[str, tuple[int, ...]] = {}

    def stored_at(self, path: str) -> str:
        """Where a parameter is stored in the state tree ('params/params/...', 'nnx_aux/model/...')."""
        return "/".join(self.keys[path])

    def read_transposed(self, path: str, axes: tuple[int, ...]) -> None:
        """From now on present `path` with its axes in numpy's `transpose(axes)` order (an older layout read as
        the current one); describe, array and read all see the transposed view."""
        self._axes[path] = tuple(axes)
        self._arrays.pop(path, None)

    def _open_local(self, path: Path) -> None:
        self.items = find_items_dir(path)
        regular_file(self.items / "_METADATA", "Orbax _METADATA")
        try:
            self.metadata = json.loads((self.items / "_METADATA").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{self.items}: unreadable Orbax _METADATA ({exc})") from None
        step_meta = self.items.parent / "_CHECKPOINT_METADATA"
        self.step_metadata: dict = {}
        if step_meta.exists():
            regular_file(step_meta, "_CHECKPOINT_METADATA")
            try:
                self.step_metadata = json.loads(step_meta.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError):
                self.step_metadata = {}

    @property
    def custom_metadata(self) -> dict:
        value = self.step_metadata.get("custom_metadata")
        return value if isinstance(value, dict) else {}

    @property
    def scan_layers(self) -> bool | None:
        value = self.custom_metadata.get("scan_layers")
        return None if value is None else bool(value)

    @property
    def provenance(self) -> dict:
        value = self.custom_metadata.get("ckpt")
        return value if isinstance(value, dict) else {}

    @property
    def strict_reads(self) -> bool:
        """Whether a missing chunk is an error (else it reads as the fill value). Orbax records in `_METADATA`
        whether it stored chunks equal to the fill value (ckpt and MaxText always do): then a missing chunk is
        lost data. Only a writer that says it skipped them (`false`) may leave chunks out."""
        return self.metadata.get("store_array_data_equal_to_fill_value", True) is not False

    def array_spec(self, path: str) -> dict:
        """The tensorstore spec opening one parameter for reads (missing chunks fail, see `strict_reads`)."""
        driver = "zarr3" if self.opts.use_zarr3 else "zarr"
        return {"driver": driver, "kvstore": kvstore_spec(self.items, ".".join(self.keys[path]), self.opts),
                "open": True, "fill_missing_data_reads": not self.strict_reads}

    def array(self, path: str) -> ts.TensorStore:
        if path not in self._arrays:
            if path not in self.paths:
                raise SourceError(f"{self.items}: the checkpoint has no parameter {path}")
            try:
                arr = self.open(path).result()
            except ValueError as exc:
                raise SourceError(f"{self.items}: cannot open {path}: {str(exc).splitlines()[0]}") from None
            if path in self._axes:
                arr = arr[ts.d[self._axes[path]].transpose[tuple(range(arr.rank))]]
            self._arrays[path] = arr
        return self._arrays[path]

    def open(self, path: str) -> ts.Future:
        """Start opening the array stored for `path`, as stored (no transposed view)."""
        return ts.open(self.array_spec(path), context=self.context)

    def describe(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        arr = self.array(name)
        return tuple(arr.shape), np.dtype(arr.dtype.numpy_dtype)

    def read(self, source) -> np.ndarray:
        """One slice: `source.index` placed on `source.axes`, optionally a range on `source.rows_axis`."""
        arr = self.array(source.name)
        idx: list = [slice(None)] * arr.rank
        for axis, i in zip(source.axes, source.index, strict=True):
            idx[axis] = i
        if source.rows is not None:
            idx[source.rows_axis] = slice(*source.rows)
        try:
            return arr[tuple(idx)].read().result()
        except ValueError as exc:
            raise read_error(self.items, source.name, exc) from None

    def order_key(self, source) -> tuple:
        return (self.paths.index(source.name) if source.name in self.paths else 0, source.index, source.rows or ())


def read_error(items: Path, path: str, exc: Exception) -> SourceError:
    """The one-line error for a failed read of parameter `path` (a missing chunk named as such)."""
    msg = str(exc).splitlines()[0]
    if msg.startswith("NOT_FOUND") and "is missing" in msg:
        chunk = msg.split("chunk ", 1)[1].split(" stored", 1)[0] if "chunk " in msg else "?"
        return SourceError(f"{items}: array {path} is missing its chunk {chunk}: the checkpoint is incomplete "
                           "(a chunk file was deleted or never written)")
    return SourceError(f"{items}: cannot read {path}: {msg}")


def find_items_dir(path: Path) -> Path:
    """Accept OUT, OUT/<step> or OUT/<step>/items; pick the latest committed step of a run dir."""
    if not path.exists():
        from ckpt_cli.registry import is_model_name

        hint = f" ({path} is a model name: give it as --model {path})" if is_model_name(str(path)) else ""
        raise SourceError(f"{path}: no such checkpoint directory{hint}")
    if (path / "_METADATA").exists():
        return path
    if (path / "items" / "_METADATA").exists():
        return path / "items"
    steps = sorted((int(p.name), p) for p in path.iterdir() if p.is_dir() and p.name.isdigit()
                   and (p / "items" / "_METADATA").exists())
    if steps:
        return steps[-1][1] / "items"
    if partial_dir(path).exists() or path.name.endswith(".partial"):
        raise SourceError(f"{path}: an interrupted conversion, not a complete checkpoint")
    raise SourceError(f"{path}: not an Orbax checkpoint (no _METADATA in it, in items/ or in a step directory)")
