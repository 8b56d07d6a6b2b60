"""An HF model folder written straight into a gs:// or s3:// prefix: each shard one streamed upload.

The shards are laid out for streaming: tensors go into shards, and into each shard's data section, in the
order the engine writes them (`order`, the plan's job order), not sorted by name as in a local folder
(`stream_layout`: on GCS four shards are filled side by side, so four uploads run at once). So each
shard's bytes arrive (nearly) in order: a shard is one sequential upload (`ObjectUpload`: S3
multipart, GCS resumable), started at its first write and completed at its last, and only the writes that
arrive ahead of the upload's position are held in memory (`max_buffered` records the most held at once).
Nothing is staged on local disk. The index maps every tensor to its shard, as transformers reads it.

What "published atomically" means here (the same convention as the MaxText checkpoints of io/bucket.py):

1. `OUT/.ckpt-partial` is written first: the prefix is ckpt's unfinished output.
2. Each shard appears whole or not at all (an unfinished multipart / resumable upload is no object).
   After each one, `OUT/.ckpt-progress.json` (one PUT) records the shards complete so far.
3. After the last shard: the index, generation config and tokenizer files, then `config.json` last: a
   folder with `config.json` is complete (transformers loads nothing without it). Then the progress record
   and the marker are deleted.

`--resume` (a rerun finds the marker and a progress record of the same conversion) keeps the shards the
record names (each must still be there, at its planned size) and writes only the others; open uploads of
the interrupted run are aborted (S3) or left to expire (GCS sessions, invisible). A different conversion's
leftovers under the marker are removed and the run starts afresh.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ckpt_cli.errors import OutputError
from ckpt_cli.io import bucket
from ckpt_cli.io.hf_writer import shard_file_names
from ckpt_cli.io.location import BucketURL
from ckpt_cli.io.object_upload import PARALLEL_PARTS, GcsSession, ObjectUpload, s3_client
from ckpt_cli.io.outdir import PARTIAL_MARKER
from ckpt_cli.io.safetensors import INDEX_NAME, PlannedTensor, safetensors_layout

PROGRESS = ".ckpt-progress.json"     # beside the marker: the shards an interrupted run completed
# Shards filled (and uploaded) at once. A GCS resumable upload appends its chunks one after another, so
# parallel streams come from several shards; an S3 multipart upload already sends its parts in parallel.
LANES = {"gs": 4, "s3": 1}


def stream_layout(tensors: list[PlannedTensor], shard_bytes: int, lanes: int = 1) -> list[list[PlannedTensor]]:
    """Tensors, given in write order, packed into shards of at most `shard_bytes` (a larger tensor alone) that
    `lanes` at a time are filled together: each tensor goes to the emptiest shard of the current group, and
    when even that one is full the group is closed and a new one opened (a tensor larger than a shard gets
    one of its own). Every shard lists its tensors in
    write order, so each is written front to back."""
    shards: list[list[PlannedTensor]] = []
    group: list[list[PlannedTensor]] = []
    sizes: list[int] = []
    for t in tensors:
        if t.nbytes > shard_bytes:          # a shard of its own, uploaded beside the group
            shards.append([t])
            continue
        if group:
            lane = min(range(len(group)), key=sizes.__getitem__)
            if sizes[lane] + t.nbytes > shard_bytes and group[lane]:
                shards += [g for g in group if g]
                group, sizes = [], []
        if not group:
            group, sizes = [[] for _ in range(lanes)], [0] * lanes
        lane = min(range(len(group)), key=sizes.__getitem__)
        group[lane].append(t)
        sizes[lane] += t.nbytes
    shards += [g for g in group if g]
    return shards or [[]]


class _Shard:
    """One shard's upload: writes land at their offset; the run of them from the upload's position is sent."""

    def __init__(self, url: BucketURL, tensors: list[PlannedTensor]):
        self.url = url
        self.head, self.offsets = safetensors_layout(tensors, {"format": "pt"})
        self.shapes = {t.name: tuple(t.shape) for t in tensors}
        self.size = sum(t.nbytes for t in tensors)
        self.cursor = 0                              # data bytes sent to the upload so far
        self.pending: dict[int, np.ndarray] = {}     # data offset -> bytes that arrived ahead of the cursor
        self.blocks: dict[tuple[int, int], list] = {}   # strided parts: (offset, bytes) -> [block, filled]
        self.upload: ObjectUpload | None = None
        self.complete = False

    @property
    def total(self) -> int:
        return len(self.head) + self.size


class BucketHFWriter:
    """The engine's Writer for an HF folder in a bucket (see the module docstring)."""

    def __init__(self, out: BucketURL, tensors: list[PlannedTensor], shard_bytes: int, order: list[str],
                 progress_key: str, resume: bool = False):
        if not out.path:
            raise OutputError(f"--out {out}: give a path inside the bucket ({out}/NAME), not the bucket itself")
        bucket.check_credentials(out)
        self.out = out
        self.progress_key = progress_key
        self.planned = {t.name: t for t in tensors}
        names = order + sorted(set(self.planned) - set(order))      # tensors nothing writes: none in a valid plan
        groups = stream_layout([self.planned[n] for n in names], shard_bytes, LANES[out.scheme])
        self.files = shard_file_names(len(groups))
        self.shards = {f: _Shard(out / f, g) for f, g in zip(self.files, groups, strict=True)}
        self.weight_map = {t.name: f for f, g in zip(self.files, groups, strict=True) for t in g}
        self.context = bucket.bucket_context()
        self.store = bucket.open_store(out, self.context)
        self.pool = ThreadPoolExecutor(max_workers=2 * PARALLEL_PARTS, thread_name_prefix="ckpt-upload")
        self.client = s3_client() if out.scheme == "s3" else GcsSession()
        self.lock = threading.Lock()
        self.buffered = 0
        self.max_buffered = 0
        self.done: set[tuple] = set()
        self.task_keys: dict[str, list[tuple]] = {}
        self.resumed: list[str] = []
        self.why_not = ""
        keys = set(bucket.list_keys(out, self.context))
        if keys and PARTIAL_MARKER not in keys:
            first = sorted(keys)[0]
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            raise OutputError(f"{out} exists and is not empty ({first}{more}): choose another --out (ckpt never "
                              f"replaces a folder in a bucket)")
        if keys:
            kept = self._resumable(keys) if resume else []
            self._drop_open_uploads()
            if not kept:
                bucket._do(bucket.clear(self.store), out, "removing an interrupted run's objects")
            self.resumed = kept
        if not self.resumed:
            self._put(PARTIAL_MARKER, b"made by ckpt; removed when the folder is complete\n")
        for name in self.resumed:
            self.shards[name].complete = True

    def resume_keys(self, task_keys: dict[str, list[tuple]]) -> set[tuple]:
        """The writes (plan write keys, per target) the resumed shards already hold: the engine skips them."""
        self.task_keys = task_keys
        self.done = {k for name in self.resumed for t in self.shards[name].offsets for k in task_keys.get(t, ())}
        return self.done

    def _resumable(self, keys: set[str]) -> list[str]:
        """The shards an interrupted run of this conversion completed (its progress record names them, and each
        is there at its planned size); [] with `why_not` set otherwise."""
        raw = bucket._do(self.store.read(PROGRESS), self.out, "reading the progress record")
        if raw.state != "value":
            self.why_not = f"no progress record in {self.out}"
            return []
        try:
            progress = json.loads(bytes(raw.value))
            same, shards = progress["key"] == self.progress_key, list(progress["shards"])
        except (ValueError, TypeError, KeyError):
            self.why_not = f"{self.out / PROGRESS} is unreadable"
            return []
        if not same:
            self.why_not = f"{self.out} was left by a different conversion"
            return []
        for name in shards:
            if name not in self.shards or name not in keys or self._size(name) != self.shards[name].total:
                self.why_not = f"{self.out / str(name)} is missing or not the size the progress record implies"
                return []
        return shards

    def _size(self, name: str) -> int | None:
        if self.out.scheme == "s3":
            try:
                return self.client.head_object(Bucket=self.out.bucket, Key=(self.out / name).path)["ContentLength"]
            except Exception:  # noqa: BLE001 - a shard we cannot see is a shard we rewrite
                return None
        from urllib.parse import quote

        resp = self.client.http.get(f"{self.client.base}/storage/v1/b/{self.out.bucket}/o/"
                                    f"{quote((self.out / name).path, safe='')}", headers=self.client.headers(),
                                    timeout=60)
        return int(resp.json()["size"]) if resp.status_code == 200 else None

    def _drop_open_uploads(self) -> None:
        """Abort the unfinished S3 multipart uploads under this prefix (an interrupted run's; GCS sessions are
        not listable and expire by themselves)."""
        if self.out.scheme != "s3":
            return
        try:
            listing = self.client.list_multipart_uploads(Bucket=self.out.bucket, Prefix=self.out.path + "/")
            for up in listing.get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=self.out.bucket, Key=up["Key"], UploadId=up["UploadId"])
        except Exception:  # noqa: BLE001 - best effort: an unfinished upload is never a visible object
            pass

    # ----------------------------------------------------------------------------------- the Writer protocol

    def create(self, target: str, shape: tuple[int, ...], dtype: np.dtype, chunk: tuple[int, ...],
               read_chunk: tuple[int, ...] | None = None) -> None:
        t = self.planned.get(target)
        if t is None or tuple(t.shape) != tuple(shape) or np.dtype(t.dtype) != np.dtype(dtype):
            raise AssertionError(f"{target}: not planned as {shape} {np.dtype(dtype)}")

    def write(self, target: str, index: tuple, array: np.ndarray) -> int:
        """Place `array` at `tensor[index]` and send whatever is now contiguous from the shard's position."""
        shard = self.shards[self.weight_map[target]]
        kind, offset, nbytes, inner, start, stop = _locate(shard, target, index)
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        if kind == "part":
            block = shard.blocks.get((offset, nbytes))
            if block is None:
                block = shard.blocks[(offset, nbytes)] = [np.zeros(nbytes, np.uint8), 0]
                self._held(nbytes)
            rows = block[0].view(array.dtype).reshape((stop - start, *shard.shapes[target][1:]))
            rows[inner] = array
            block[1] += array.nbytes
            if block[1] < nbytes:
                return 0
            del shard.blocks[(offset, nbytes)]
            self._held(-nbytes)
            data = block[0]
        elif data.nbytes != nbytes:
            raise AssertionError(f"{target}{index}: {data.nbytes} bytes where {nbytes} are planned")
        shard.pending[offset] = data
        self._held(data.nbytes)
        self._drain(shard)
        return 0

    def flush(self) -> None:
        """Nothing to do: every full part is already on its way."""

    def _held(self, nbytes: int) -> None:
        self.buffered += nbytes
        self.max_buffered = max(self.max_buffered, self.buffered)

    def _drain(self, shard: _Shard) -> None:
        while shard.cursor in shard.pending and not shard.complete:
            if shard.upload is None:
                shard.upload = ObjectUpload(shard.url, self.client, self.pool)
                shard.upload.write(shard.head)
            data = shard.pending.pop(shard.cursor)
            shard.upload.write(data)
            shard.cursor += data.nbytes
            self._held(-data.nbytes)
            if shard.cursor == shard.size:
                shard.upload.close()
                shard.complete = True
                self._record()

    def _record(self) -> None:
        """The progress record: the shards complete so far (each a whole object now)."""
        done = [name for name, s in self.shards.items() if s.complete]
        self._put(PROGRESS, json.dumps({"key": self.progress_key, "shards": done}).encode())

    def _put(self, key: str, data: bytes) -> None:
        bucket._do(self.store.write(key, data), self.out, f"writing {key}")

    # ----------------------------------------------------------------------------------- completion

    def finalize(self, json_files: dict[str, dict], copy_files: dict[str, Path]) -> list[str]:
        """Index, JSON and tokenizer files, `config.json` last; then the record and marker go. Returns the names."""
        unfinished = [name for name, s in self.shards.items() if not s.complete]
        if unfinished:
            raise AssertionError(f"{unfinished[0]}: not every byte was written")
        self.pool.shutdown(wait=True)
        names = list(self.files)
        files = dict(json_files)
        if len(self.files) > 1:
            files = {INDEX_NAME: {"metadata": {"total_size": sum(t.nbytes for t in self.planned.values())},
                                  "weight_map": dict(sorted(self.weight_map.items()))}, **files}
        config = files.pop("config.json", None)
        for name, data in files.items():
            self._put(name, (json.dumps(data, indent=2) + "\n").encode())
            names.append(name)
        for name, src in copy_files.items():
            try:
                data = Path(src).read_bytes()
            except OSError as exc:
                raise OutputError(f"cannot read {src}: {exc.strerror}") from None
            self._put(name, data)
            names.append(name)
        if config is not None:
            self._put("config.json", (json.dumps(config, indent=2) + "\n").encode())
            names.append("config.json")
        for key in (PROGRESS, PARTIAL_MARKER):
            bucket._do(bucket._delete(self.store, key.encode()), self.out, f"removing {key}")
        return sorted(names)

    def abort(self, keep: bool = False) -> bool:
        """Drop the open uploads; keep the complete shards and the record when `keep` and there is one (for
        --resume), else remove every object of this prefix. Returns whether anything was kept."""
        for shard in self.shards.values():
            if shard.upload is not None and not shard.complete:
                shard.upload.abort()
        self.pool.shutdown(wait=True, cancel_futures=True)
        if keep and any(s.complete for s in self.shards.values()):
            return True
        try:
            bucket.clear(self.store).result()
        except ValueError:
            pass        # the marker stays: the next run into this prefix removes what is left
        return False


def _locate(shard: _Shard, target: str, index: tuple) -> tuple:
    """Where `tensor[index]` goes in the shard's data section: ("whole" | "rows" | "part", offset, bytes,
    the index within the rows, first row, last row + 1). A part is a strided index on some axis."""
    shape = shard.shapes[target]
    begin, end = shard.offsets[target]
    first = index[0] if index else slice(None)
    if isinstance(first, slice):
        start, stop, step = first.indices(shape[0]) if shape else (0, 0, 1)
        inner0: int | slice = slice(None) if step == 1 else slice(0, None, step)
    else:
        start, stop, step, inner0 = int(first), int(first) + 1, 1, 0
    inner = (inner0, *index[1:])
    rest_whole = all(s == slice(None) for s in index[1:])
    if not shape or step == 1 and rest_whole and (start, stop) == (0, shape[0]):
        return "whole", begin, end - begin, inner, 0, shape[0] if shape else 0
    row = (end - begin) // shape[0] if shape[0] else 0
    kind = "rows" if step == 1 and rest_whole else "part"
    return kind, begin + start * row, (stop - start) * row, inner, start, stop
