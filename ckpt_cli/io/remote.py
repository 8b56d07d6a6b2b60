"""Hugging Face repos known from metadata only: listing, config and safetensors headers by HTTP range.

Everything goes through huggingface_hub, so HF_TOKEN / the stored login, HF_HOME, HF_ENDPOINT,
HF_HUB_OFFLINE and --revision are honoured by the client itself; no token is ever read, held or
printed here. `RemoteRepo.open` lists the repo (one API call, sizes included), fetches config.json and
the index, and reads each shard's header with two small range requests (the 8-byte length, then the
JSON): no tensor byte is transferred. A shard already in the hub cache is read locally instead.
Fetching the shards while converting is `remote_stream`'s job.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_cli.errors import RemoteError, SourceError
from ckpt_cli.io.safetensors import (
    INDEX_NAME,
    MAX_HEADER_BYTES,
    TensorInfo,
    inside,
    parse_header,
    read_header,
)

HEADER_THREADS = 8


def is_offline() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub itself reads it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub / HTTP failures into one-line RemoteErrors (never echoing a token)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    bounded_session()
    try:
        yield
    except GatedRepoError:
        raise RemoteError(f"{repo_id} is gated: accept its licence on the hub and set HF_TOKEN "
                          f"(or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise RemoteError(f"{repo_id}: repository not found (or private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise RemoteError(f"{repo_id}: revision {revision} not found") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise RemoteError(f"{repo_id}: not in the local cache and the hub cannot be reached "
                          f"(HF_HUB_OFFLINE is set or there is no network)") from None
    except EntryNotFoundError as exc:
        raise RemoteError(f"{repo_id}: file not found on the hub ({str(exc).splitlines()[0]})") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise RemoteError(f"{repo_id}: the hub answered {status} ({str(exc).splitlines()[0]})") from None
    except HFValidationError:
        raise SourceError(f"{repo_id}: not a valid repo id (expected org/name)") from None
    except _transport_errors() as exc:
        etag, download = hub_timeouts()
        raise RemoteError(f"{repo_id}: the hub did not answer ({type(exc).__name__}) after {RETRIES} tries "
                          f"(timeouts HF_HUB_ETAG_TIMEOUT={etag:g}s, HF_HUB_DOWNLOAD_TIMEOUT={download:g}s)") from None


RETRIES = 3         # tries of one hub call that times out or cannot connect
BACKOFF_S = 0.5     # wait before the second try; doubled before each later one


def hub_timeouts() -> tuple[float, float]:
    """(metadata, download) timeouts in seconds: HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT, as
    huggingface_hub reads them (10 s each by default)."""
    from huggingface_hub import constants

    return float(constants.HF_HUB_ETAG_TIMEOUT), float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


def _bound_timeouts(request) -> None:
    """Request hook: every hub request waits at most the metadata timeout (HEAD) or the download timeout
    (anything else) to connect and between two reads. huggingface_hub sends some requests with no timeout at
    all (`model_info`, `repo_info`: a server that accepts and never answers would hang them forever) and
    retries some metadata requests with 60 s."""
    etag, download = hub_timeouts()
    limit = etag if request.method == "HEAD" else download
    given = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {k: limit if given.get(k) is None else min(float(given[k]), limit)
                                     for k in ("connect", "read", "write", "pool")}


def bounded_session():
    """huggingface_hub's shared HTTP client, with `_bound_timeouts` among its request hooks."""
    from huggingface_hub import get_session

    session = get_session()
    hooks = session.event_hooks
    if _bound_timeouts not in hooks.get("request", []):
        session.event_hooks = {**hooks, "request": [*hooks.get("request", []), _bound_timeouts]}
    return session


def retried(call, *args, **kwargs):
    """`call(*args, **kwargs)`, tried up to RETRIES times while it times out or cannot connect, waiting
    BACKOFF_S, then twice that, between tries; the last failure is raised (hub_errors makes it one line)."""
    for attempt in range(RETRIES):
        try:
            return call(*args, **kwargs)
        except _transport_errors():
            if attempt == RETRIES - 1:
                raise
            time.sleep(BACKOFF_S * 2 ** attempt)
    raise AssertionError("unreachable")


@functools.cache
def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection/timeout errors of the HTTP library huggingface_hub uses (httpx2, httpx or requests)."""
    found: list[type[BaseException]] = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


@dataclass
class RemoteRepo:
    """A hub repo known from metadata only: its files and sizes, config, shards and tensor headers."""

    repo_id: str
    revision: str | None          # what the user asked for (None: main)
    commit: str                   # what it resolved to; every later read pins this commit
    sizes: dict[str, int]         # repo file -> bytes
    config: dict
    config_path: Path             # config.json in the hub cache
    shards: list[str]             # safetensors files, in name order
    tensors: dict[str, TensorInfo] = field(default_factory=dict)   # TensorInfo.file = Path(shard name)
    bytes_fetched: int = 0        # body bytes of config, index and header reads (0 for cached files)
    requests: int = 0             # HTTP requests for content (range reads and small-file downloads)
    cached_shards: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def open(cls, repo_id: str, revision: str | None = None) -> RemoteRepo:
        """List the repo, fetch config.json (+ index) and every shard header: metadata only."""
        from huggingface_hub import HfApi

        if is_offline():
            raise RemoteError(f"{repo_id}: HF_HUB_OFFLINE is set; only a cached copy can be used")
        with hub_errors(repo_id, revision):
            info = retried(HfApi().model_info, repo_id, revision=revision, files_metadata=True,
                           timeout=hub_timeouts()[0])
            sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
            if "config.json" not in sizes:
                raise SourceError(f"{repo_id}: the repo has no config.json")
            repo = cls(repo_id, revision, info.sha, sizes, {}, Path(), [])
            repo.config_path = repo._small_file("config.json")
            repo.config = _load_json(repo.config_path)
            if INDEX_NAME in sizes:
                index_path = repo._small_file(INDEX_NAME)
                try:
                    weight_map = _load_json(index_path)["weight_map"]
                except KeyError:
                    raise SourceError(f"{repo_id}: {INDEX_NAME} has no weight_map") from None
                if not isinstance(weight_map, dict):
                    raise SourceError(f"{repo_id}: {INDEX_NAME} has no weight_map object")
                repo.shards = sorted(set(map(str, weight_map.values())))
                for shard in repo.shards:       # huggingface_hub refuses `..` with a traceback-worthy ValueError
                    inside(Path(repo_id), shard, f"{repo_id}: {INDEX_NAME}")
                missing = [s for s in repo.shards if s not in sizes]
                if missing:
                    raise SourceError(f"{repo_id}: shard {missing[0]} named in {INDEX_NAME} is not in the repo")
            else:
                repo.shards = sorted(f for f in sizes if f.endswith(".safetensors") and "/" not in f)
            if not repo.shards:
                raise SourceError(f"{repo_id}: no safetensors files (model.safetensors or an index) in the repo")
            repo._read_headers()
        return repo

    @property
    def label(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"

    @property
    def snapshot_dir(self) -> Path:
        """The hub-cache folder of this commit (where config.json and cached shards live)."""
        return self.config_path.parent

    @property
    def shard_bytes(self) -> int:
        return sum(self.sizes[s] for s in self.shards)

    def cached_path(self, shard: str) -> Path | None:
        """The shard's file in the hub cache, if it is there already."""
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.repo_id, shard, revision=self.commit)
        return Path(found) if isinstance(found, str) else None

    def _small_file(self, name: str) -> Path:
        """A small repo file through the hub cache (counted as fetched unless it was cached already).

        Asked for at the user's revision, not the commit, so the cache records the ref for offline runs.
        """
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(self.repo_id, name, revision=self.commit), str)
        path = Path(retried(hf_hub_download, self.repo_id, name, revision=self.revision))
        if not cached:
            self.bytes_fetched += path.stat().st_size
            self.requests += 1
        return path

    def _read_headers(self) -> None:
        with ThreadPoolExecutor(max_workers=HEADER_THREADS, thread_name_prefix="ckpt-header") as pool:
            results = list(pool.map(self._header, self.shards))
        for shard, infos in zip(self.shards, results, strict=True):
            for name, info in infos.items():
                if name in self.tensors:
                    raise SourceError(f"tensor {name} appears in both {self.tensors[name].file} and {shard}")
                self.tensors[name] = info

    def _header(self, shard: str) -> dict[str, TensorInfo]:
        """One shard's header: from the hub cache when present, else two range reads (length, then JSON)."""
        local = self.cached_path(shard)
        if local is not None:
            self.cached_shards.add(shard)
            return {n: _rename(i, shard) for n, i in read_header(local).items()}
        with hub_errors(self.repo_id, self.revision):
            raw_len = retried(self._range, shard, 0, 8)
            (n,) = struct.unpack("<Q", raw_len)
            size = self.sizes.get(shard) or None
            if n > MAX_HEADER_BYTES or (size is not None and 8 + n > size):
                raise SourceError(f"{self.repo_id}/{shard} is not safetensors (header length {n})")
            raw = retried(self._range, shard, 8, n)
        try:
            return parse_header(raw_len, raw, Path(shard), size)
        except SourceError as exc:
            msg = str(exc)
            raise SourceError(f"{self.repo_id}/{msg}" if msg.startswith(shard) else
                              f"{self.repo_id}/{shard}: {msg}") from None

    def _range(self, shard: str, offset: int, nbytes: int) -> bytes:
        """Exactly `nbytes` at `offset` of a repo file, streamed: never more, even if Range is ignored."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        url = hf_hub_url(self.repo_id, shard, revision=self.commit)
        headers = {**build_hf_headers(), "Range": f"bytes={offset}-{offset + nbytes - 1}"}
        data = bytearray()
        session = bounded_session()
        timeout = hub_timeouts()[1]
        if hasattr(session, "stream"):     # httpx / httpx2 (huggingface_hub >= 1.0)
            request = session.stream("GET", url, headers=headers, timeout=timeout)
        else:                              # requests (older huggingface_hub)
            request = session.get(url, headers=headers, timeout=timeout, stream=True)
        with request as response:
            hf_raise_for_status(response)
            skip = offset if response.status_code == 200 else 0   # a server ignoring Range sends the whole file
            pieces = response.iter_bytes() if hasattr(response, "iter_bytes") else response.iter_content(1 << 16)
            for piece in pieces:
                if skip:
                    cut = min(skip, len(piece))
                    piece, skip = piece[cut:], skip - cut
                data += piece
                if len(data) >= nbytes:
                    break
        with self._lock:
            self.bytes_fetched += len(data)
            self.requests += 1
        if len(data) < nbytes:
            raise SourceError(f"{self.repo_id}/{shard} is truncated: wanted {nbytes} bytes at offset {offset}")
        return bytes(data[:nbytes])


def _rename(info: TensorInfo, shard: str) -> TensorInfo:
    return TensorInfo(info.name, Path(shard), info.dtype, info.shape, info.begin, info.end)


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: not a JSON object (found a {type(data).__name__})")
    return data
