"""An HF safetensors folder in a gs:// or s3:// prefix, read in place by ranged reads (never downloaded whole).

Opening it reads `config.json` and the index (small objects, whole), then each shard's header by two ranged
reads (its 8-byte length, then the JSON). A tensor, or a row range of it, is one ranged read, or several
in parallel for large ones (`RANGE_BYTES` each, all in flight at once: object stores serve concurrent ranges
of one object at full speed where a single stream is slow). The engine's worker threads read several
tensors at once on top of that. Reads go through tensorstore's gcs / s3 kvstores: their credentials and
endpoints (see io/location.py).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import tensorstore as ts

from ckpt_cli.errors import SourceError
from ckpt_cli.io.bucket import bucket_context, bucket_error, list_keys
from ckpt_cli.io.location import BucketURL, apply_gcs_endpoint
from ckpt_cli.io.safetensors import INDEX_NAME, MAX_HEADER_BYTES, SafetensorsFolder, TensorInfo, inside, parse_header

RANGE_BYTES = 32 << 20      # one ranged request at most; larger reads are split and issued together


def is_hf_prefix(keys: list[str]) -> bool:
    """Whether a prefix's keys are an HF folder's: a top-level index or *.safetensors, and no Orbax metadata."""
    top = [k for k in keys if "/" not in k]
    return "_METADATA" not in top and any(k == INDEX_NAME or k.endswith(".safetensors") for k in top)


class BucketSafetensorsFolder(SafetensorsFolder):
    """The tensors of an HF folder in a bucket; `read` is a ranged read of exactly the bytes asked for."""

    local = True            # readable at any time, in any order (no ShardStream)
    local_files = False     # but no local file to map, stat or probe

    def __init__(self, url: BucketURL, keys: list[str] | None = None):
        apply_gcs_endpoint()
        self.url = url
        self.folder = Path(url.path or url.bucket)
        self.context = bucket_context()
        try:
            self.store = ts.KvStore.open(url.kvstore(), context=self.context).result()
        except ValueError as exc:
            raise SourceError(str(bucket_error(exc, url, "opening"))) from None
        self.keys = keys if keys is not None else self._list()
        if not self.keys:
            raise SourceError(f"{url}: nothing there (no such bucket or prefix)")
        self.bytes_fetched = 0
        self.requests = 0
        self.generations: dict[str, str] = {}      # shard -> the store's generation (changes when rewritten)
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shards():
            for name, info in self._header(shard).items():
                if name in self.tensors:
                    raise SourceError(f"tensor {name} appears in both {self.tensors[name].file.name} and {shard}")
                self.tensors[name] = info

    def _list(self) -> list[str]:
        try:
            return list_keys(self.url, self.context)
        except Exception as exc:  # noqa: BLE001 - OutputError from the shared helper: a source here
            raise SourceError(str(exc)) from None

    def object(self, key: str) -> bytes | None:
        """A small object whole (config, index, tokenizer files), or None when it is not there."""
        try:
            result = self.store.read(key).result()
        except ValueError as exc:
            raise SourceError(str(bucket_error(exc, self.url, f"reading {key}"))) from None
        self.requests += 1
        if result.state != "value":
            return None
        self.bytes_fetched += len(result.value)
        return bytes(result.value)

    def config(self) -> dict:
        raw = self.object("config.json")
        if raw is None:
            raise SourceError(f"{self.url}: no config.json")
        try:
            cfg = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{self.url}/config.json: not valid JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise SourceError(f"{self.url}/config.json: not a config object (found a JSON {type(cfg).__name__})")
        return cfg

    def shards(self) -> list[str]:
        """The shard keys: from the index when there is one (each must be there), else every top-level
        *.safetensors."""
        if INDEX_NAME in self.keys:
            raw = self.object(INDEX_NAME) or b""
            try:
                weight_map = json.loads(raw)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SourceError(f"{self.url}/{INDEX_NAME}: unreadable index ({exc})") from None
            files = sorted(set(map(str, weight_map.values())))
            for f in files:
                inside(Path("."), f, INDEX_NAME)
                if f not in self.keys:
                    raise SourceError(f"{self.url}: shard {f} named in {INDEX_NAME} is missing")
            return files
        files = sorted(k for k in self.keys if "/" not in k and k.endswith(".safetensors") and not k.startswith("."))
        if not files:
            raise SourceError(f"{self.url}: no safetensors files (model.safetensors or an index) found")
        return files

    def _range(self, key: str, begin: int, end: int) -> bytes:
        try:
            result = self.store.read(key, byte_range=slice(begin, end)).result()
        except ValueError as exc:
            if "OUT_OF_RANGE" in str(exc) or "out of range" in str(exc).lower():
                raise SourceError(f"{self.url}/{key} is truncated: wanted bytes {begin}-{end}") from None
            raise SourceError(str(bucket_error(exc, self.url, f"reading {key}"))) from None
        if result.state != "value":
            raise SourceError(f"{self.url}/{key}: missing (removed while reading?)")
        if len(result.value) != end - begin:
            raise SourceError(f"{self.url}/{key} is truncated: wanted bytes {begin}-{end}")
        self.requests += 1
        self.bytes_fetched += end - begin
        self.generations.setdefault(key, bytes(result.stamp.generation).hex())
        return bytes(result.value)

    def _header(self, shard: str) -> dict[str, TensorInfo]:
        raw_len = self._range(shard, 0, 8)
        (n,) = struct.unpack("<Q", raw_len)
        if n > MAX_HEADER_BYTES:
            raise SourceError(f"{self.url}/{shard} is not safetensors (header length {n})")
        raw = self._range(shard, 8, 8 + n)
        return parse_header(raw_len, raw, Path(shard), None)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """One tensor, or rows [start, stop) of its axis 0: ranged reads of exactly its bytes, in parallel."""
        info = self.info(name)
        begin, nbytes, shape = info.begin, info.nbytes, info.shape
        if rows is not None:
            row = int(np.prod(shape[1:], dtype=np.int64)) * info.dtype.itemsize
            begin, nbytes, shape = info.begin + rows[0] * row, (rows[1] - rows[0]) * row, (rows[1] - rows[0],
                                                                                           *shape[1:])
        key = info.file.name
        if nbytes <= RANGE_BYTES:
            data = np.frombuffer(self._range(key, begin, begin + nbytes), np.uint8) if nbytes else np.empty(0, np.uint8)
            return data.view(info.dtype).reshape(shape)
        buf = np.empty(nbytes, np.uint8)
        starts = range(0, nbytes, RANGE_BYTES)
        futures = [(s, self.store.read(key, byte_range=slice(begin + s, begin + min(nbytes, s + RANGE_BYTES))))
                   for s in starts]
        for s, future in futures:
            try:
                result = future.result()
            except ValueError as exc:
                raise SourceError(str(bucket_error(exc, self.url, f"reading {key}"))) from None
            part = np.frombuffer(result.value, np.uint8)
            if result.state != "value" or part.nbytes != min(nbytes, s + RANGE_BYTES) - s:
                raise SourceError(f"{self.url}/{key} is truncated: wanted bytes {begin + s}-{begin + nbytes}")
            buf[s:s + part.nbytes] = part
            self.requests += 1
            self.bytes_fetched += part.nbytes
        return buf.view(info.dtype).reshape(shape)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.read(name, (start, stop))

    def identity(self) -> dict[str, str]:
        """What says the shards are the ones read before (for --resume): each shard's store generation."""
        return dict(sorted(self.generations.items()))
