"""MaxText checkpoints written straight into a gs:// or s3:// bucket through tensorstore's gcs / s3 kvstores.

The layout is the local one (`OUT/0/items` with OCDBT + zarr3, `OUT/0/_CHECKPOINT_METADATA`), streamed slice
by slice with the same memory bound: only the OCDBT data objects are uploaded while converting, the
manifest is kept in memory until the end.

What "atomic" means on an object store. There is no rename, so the checkpoint is written in place, and
completion is marked as Orbax marks it on GCS (its `CommitFileTemporaryPath`):

1. `OUT/.ckpt-partial` is written first: the prefix is ckpt's unfinished output (ckpt removes it, and only
   it, when a later run finds it, or when this run fails).
2. The OCDBT data objects (`OUT/0/items/d/...`) are uploaded while converting. Without a manifest they are
   no readable checkpoint: Orbax, MaxText and ckpt see no `_METADATA` and refuse the prefix.
3. Once every data object is uploaded: `manifest.ocdbt`, then `_METADATA`, `items/commit_success.txt`,
   `0/_CHECKPOINT_METADATA`, and last `0/commit_success.txt`, the object that says the checkpoint is
   complete; then the `.ckpt-partial` marker is deleted.

Each object is written by one PUT (atomic per object on GCS and S3: a reader sees the old object, none, or
the whole new one). So a reader that sees `0/commit_success.txt` sees a complete checkpoint; a reader that
sees `_METADATA` sees complete arrays (the manifest is written after all data and before `_METADATA`).

`--resume`: every `SNAPSHOT_BYTES` committed, the in-memory OCDBT manifest is saved beside the marker as
`OUT/.ckpt-progress/manifest.<n>` and then `OUT/.ckpt-progress.json` (one PUT: the conversion's key, the slice
writes committed, that manifest's name and the data objects it may refer to) replaces the previous record;
the previous manifest copy is deleted after. The manifest is read before the data objects are listed, so
every object it refers to is in the list. A rerun with `--resume` and the same key loads that manifest,
deletes the data objects the record does not list (written after the snapshot, referred to by nothing),
and writes only the slices not recorded. Without `--resume`, or for another conversion, the prefix's
objects are removed and the run starts afresh.

Not supported on buckets (refused with one line): `--overwrite` (replacing a checkpoint in place would
destroy the old one before the new one is complete). No lock keeps two runs from writing the same prefix at
once: object stores have no `flock`.

Credentials and endpoints are tensorstore's: Application Default Credentials / GOOGLE_APPLICATION_CREDENTIALS
for GCS, the AWS environment variables and profiles for S3. `AWS_ENDPOINT_URL(_S3)` points S3 at an
S3-compatible store; `CKPT_GCS_ENDPOINT` (or TENSORSTORE_GCS_HTTP_URL, STORAGE_EMULATOR_HOST) at a GCS
emulator or private endpoint.
"""

from __future__ import annotations

import json
import time

import numpy as np
import tensorstore as ts

from ckpt_cli.errors import OutputError, SourceError, UnsupportedError
from ckpt_cli.io.location import BucketURL, apply_gcs_endpoint
from ckpt_cli.io.orbax import HANDLER, OrbaxWriter, StorageOptions, _as_key, array_spec, tree_metadata
from ckpt_cli.io.outdir import PARTIAL_MARKER

COMMIT = "commit_success.txt"
PROGRESS_RECORD = ".ckpt-progress.json"       # beside the marker: what an interrupted run committed (--resume)
PROGRESS_DIR = ".ckpt-progress"               # the manifest copies the records name
_COMMIT_TEXT = b"Checkpoint commit was successful."


def bucket_context() -> ts.Context:
    """No cache (nothing written is re-read); bounded retries so a dead endpoint fails in seconds, not minutes."""
    retries = {"max_retries": 6, "initial_delay": "0.5s", "max_delay": "8s"}
    return ts.Context({"cache_pool": {"total_bytes_limit": 0}, "gcs_request_retries": retries,
                       "s3_request_retries": retries})


def bucket_error(exc: Exception, url: BucketURL, what: str) -> OutputError:
    """A tensorstore failure on a bucket as one line: missing bucket, permission, credentials, unreachable."""
    msg = str(exc)
    head = msg.split(" [", 1)[0]
    if "NoSuchBucket" in msg or ("NOT_FOUND" in msg and what != "reading"):
        return OutputError(f"{url}: the bucket {url.scheme}://{url.bucket} does not exist (or is not visible "
                           f"with these credentials)")
    if "http_response_code='403'" in msg or "PERMISSION_DENIED" in msg or "AccessDenied" in msg:
        return OutputError(f"{url}: permission denied while {what} ({head})")
    if "http_response_code='401'" in msg or "UNAUTHENTICATED" in msg or "credentials" in msg.lower():
        return OutputError(f"{url}: no valid credentials while {what} (GCS: gcloud auth application-default login "
                           f"or GOOGLE_APPLICATION_CREDENTIALS; S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                           f"AWS_PROFILE)")
    if "resolve host" in msg or "Could not connect" in msg or "Couldn't connect" in msg or "CURL error" in msg:
        return OutputError(f"{url}: cannot reach the object store while {what} ({head})")
    return OutputError(f"{url}: {what} failed: {head}")


def has_credentials(url: BucketURL) -> bool:
    """Whether any of the store's standard credential sources is there (without a network call, but for
    boto3's instance-metadata probe): tensorstore goes on anonymously without them, which a public source
    bucket allows but no write does. An endpoint override (an emulator) needs none."""
    import os
    from pathlib import Path

    if url.scheme == "gs":
        if url.endpoint():
            return True
        config = Path(os.environ.get("CLOUDSDK_CONFIG") or Path.home() / ".config" / "gcloud")
        if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") or (config / "application_default_credentials.json"
                                                                 ).is_file():
            return True
        try:           # a GCE / GKE machine: its metadata server has credentials
            return "Google" in Path("/sys/class/dmi/id/product_name").read_text()
        except OSError:
            return bool(os.environ.get("GCE_METADATA_HOST"))
    try:
        import boto3
    except ImportError:
        return bool(os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")
                    or (Path.home() / ".aws" / "credentials").is_file())
    try:
        return boto3.Session().get_credentials() is not None
    except Exception:  # noqa: BLE001 - a broken profile: no usable credentials
        return False


def check_credentials(url: BucketURL, flag: str = "--out") -> None:
    """Refuse a write to a bucket with no credentials at all, in one line, before anything is written."""
    if not has_credentials(url):
        how = ("gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS=KEY.json" if url.scheme == "gs"
               else "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role")
        raise OutputError(f"{flag} {url}: no {'GCS' if url.scheme == 'gs' else 'AWS'} credentials found ({how})")


def open_store(url: BucketURL, context: ts.Context | None = None) -> ts.KvStore:
    """The kvstore of the prefix `url` (errors as one line)."""
    apply_gcs_endpoint()
    try:
        return ts.KvStore.open(url.kvstore(), context=context or bucket_context()).result()
    except ValueError as exc:
        raise bucket_error(exc, url, "opening") from None


def _do(future, url: BucketURL, what: str):
    try:
        return future.result()
    except ValueError as exc:
        raise bucket_error(exc, url, what) from None


def list_keys(url: BucketURL, context: ts.Context | None = None) -> list[str]:
    """Every object under the prefix `url/`, as keys relative to it."""
    store = open_store(url, context)
    keys = sorted(k.decode() for k in _do(store.list(), url, "listing"))
    if not keys:    # tensorstore's gcs driver lists a prefix it may not read as empty: a read says why
        _do(store.read(PARTIAL_MARKER), url, "listing")
    return keys


def clear(store: ts.KvStore) -> ts.Future:
    """Delete every object of a prefix ckpt owns, its `.ckpt-partial` marker last (a failure part way keeps
    the marker, so the leftovers stay recognisably ckpt's)."""
    marker = PARTIAL_MARKER.encode()
    _wait(store.delete_range(ts.KvStore.KeyRange(exclusive_max=marker)))
    _wait(store.delete_range(ts.KvStore.KeyRange(inclusive_min=marker + b"\x00")))
    return _delete(store, marker)


def _delete(store: ts.KvStore, key: bytes) -> ts.Future:
    return store.delete_range(ts.KvStore.KeyRange(key, key + b"\x00"))


def _wait(future):
    return future.result()


def check_output(url: BucketURL, overwrite: bool, resume: bool) -> None:
    """What must hold before a conversion writes into `url`: a named prefix, no --overwrite, and nothing there
    but an interrupted run of ckpt's own (which the run then resumes with `resume`, or replaces)."""
    if not url.path:
        raise OutputError(f"--out {url}: give a path inside the bucket ({url}/NAME), not the bucket itself")
    check_credentials(url)
    if overwrite:
        raise UnsupportedError(f"--overwrite {url}: ckpt does not replace a checkpoint in a bucket (an object store "
                               f"cannot swap it atomically); delete it first or choose another --out")
    keys = list_keys(url)
    if keys and PARTIAL_MARKER not in keys:
        more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
        raise OutputError(f"{url} exists and is not empty ({keys[0]}{more}): choose another --out (ckpt never "
                          f"replaces a checkpoint in a bucket)")


class BucketOrbaxWriter(OrbaxWriter):
    """`OrbaxWriter` into a bucket prefix: the same arrays, batches and commits; written in place and
    completed by its marker objects (see the module docstring); no progress snapshots."""

    def __init__(self, out: BucketURL, opts: StorageOptions, progress_key: str | None = None,
                 resume: bool = False):      # not super().__init__: that one is file-only
        self.out = out
        self.opts = opts
        self.overwrite = False
        self.tmp = out
        self.items = out / "0" / "items"
        self.progress_key = progress_key
        self.context = bucket_context()
        self.store = open_store(out, self.context)
        self.manifest = {"driver": "memory", "path": f"ckpt-manifest-{id(self)}/"}
        self.done: set[tuple] = set()
        self.resumed = False
        self.snapshots = 0
        self.snapshots_queued = 0
        keys = sorted(k.decode() for k in _do(self.store.list(), out, "listing"))
        if PARTIAL_MARKER in keys:          # an interrupted run of ckpt's: resumed, or its objects go first
            done, _ = read_progress(out, progress_key, opts) if resume else (None, "")
            if done is not None:
                self._reopen_bucket(done, keys)
            else:
                _do(clear(self.store), out, "removing an interrupted run's objects")
        elif keys:
            raise OutputError(f"{out} is not empty: nothing written")
        if not self.resumed:
            self._put(PARTIAL_MARKER, b"made by ckpt; removed when the checkpoint is complete\n")
        self._init_batches()

    def _reopen_bucket(self, done: set[tuple], keys: list[str]) -> None:
        """Take up the interrupted run: its manifest into memory, the data objects it wrote after its last
        snapshot (referred to by nothing) deleted."""
        progress = json.loads(self._get(PROGRESS_RECORD))
        if self.opts.use_ocdbt:
            mem = _do(ts.KvStore.open(self.manifest, context=self.context), self.out, "loading the manifest")
            _do(mem.write("manifest.ocdbt", self._get(progress["manifest"])), self.out, "loading the manifest")
        kept = set(progress["files"])
        for key in keys:
            if key.startswith("0/") and key not in kept:
                _do(_delete(self.store, key.encode()), self.out, f"removing {key}")
        self.snapshots = int(progress.get("snapshot", 0))
        self.done = done
        self.resumed = True

    def _get(self, key: str) -> bytes:
        result = _do(self.store.read(key), self.out, f"reading {key}")
        if result.state != "value":
            raise OutputError(f"{self.out}/{key}: missing")
        return bytes(result.value)

    def _snapshot(self) -> None:
        """Save the manifest, then the record naming it, the committed writes and the data objects (see the
        module docstring); then drop the previous manifest copy."""
        self.since_snapshot = 0
        self.snapshots += 1
        self.snapshots_queued += 1
        record: dict = {"key": self.progress_key, "done": [*self.done, *self.committed], "snapshot": self.snapshots}
        previous = f"{PROGRESS_DIR}/manifest.{self.snapshots - 1}"
        if self.opts.use_ocdbt:
            record["manifest"] = f"{PROGRESS_DIR}/manifest.{self.snapshots}"
            self._put(record["manifest"], self._manifest_bytes())      # read before listing: see the docstring
        record["files"] = sorted(k for k in list_keys(self.out, self.context) if k.startswith("0/"))
        self._put(PROGRESS_RECORD, json.dumps(record).encode())
        if self.opts.use_ocdbt:
            _do(_delete(self.store, previous.encode()), self.out, f"removing {previous}")

    def _put(self, key: str, data: bytes) -> None:
        _do(self.store.write(key, data), self.out, f"writing {key}")

    def _start_writeback(self) -> None:
        """Nothing to do: an object is durable once its upload returns."""

    def finalize(self, custom_metadata: dict) -> None:
        """The step scalar, then the manifest, Orbax metadata and the commit markers, the last one last."""
        self.flush()
        spec = array_spec(self.items, "step", (), np.dtype(np.int64), (), self.opts, self.manifest)
        step = _do(ts.open(spec, context=self.context), self.out, "writing step")
        _do(step.write(np.int64(0)), self.out, "writing step")
        if self.opts.use_ocdbt:
            self._put("0/items/manifest.ocdbt", self._manifest_bytes())
        self._put("0/items/_METADATA", json.dumps(tree_metadata(self.arrays, self.opts), indent=1).encode())
        self._put(f"0/items/{COMMIT}", _COMMIT_TEXT)
        self._put("0/_CHECKPOINT_METADATA", json.dumps({
            "item_handlers": {"items": HANDLER}, "metrics": {}, "performance_metrics": {},
            "init_timestamp_nsecs": self.init_ns, "commit_timestamp_nsecs": time.time_ns(),
            "custom_metadata": custom_metadata}, indent=1).encode())
        self._put(f"0/{COMMIT}", _COMMIT_TEXT)
        _do(self.store.delete_range(ts.KvStore.KeyRange(f"{PROGRESS_DIR}/", f"{PROGRESS_DIR}0")), self.out,
            f"removing {PROGRESS_DIR}")
        _do(_delete(self.store, PROGRESS_RECORD.encode()), self.out, f"removing {PROGRESS_RECORD}")
        _do(_delete(self.store, PARTIAL_MARKER.encode()), self.out, f"removing {PARTIAL_MARKER}")

    def abort(self, keep: bool = False) -> bool:
        """Remove every object this run wrote (the prefix held none but an interrupted run's before)."""
        for txn in (self.txn, self.create_txn):
            if txn is not None and txn.open:
                txn.abort()
        self.txn = self.create_txn = None
        for future, _, _ in self.pending:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - already failing; the removal below is what matters
                pass
        self.pending.clear()
        if keep and self.progress_key is not None and self.snapshots_queued:
            return True         # the last snapshot stands: --resume takes it up
        try:
            clear(self.store).result()
        except ValueError:
            pass        # the marker stays: the next run into this prefix removes what is left
        return False


def read_progress(url: BucketURL, key: str | None, opts: StorageOptions) -> tuple[set[tuple] | None, str]:
    """The writes an interrupted run into `url` left committed, if its record has this key and every object it
    names is still there; else None and why not."""
    store = open_store(url)
    result = _do(store.read(PROGRESS_RECORD), url, "reading the progress record")
    if result.state != "value":
        return None, f"no progress record of an interrupted run in {url}"
    try:
        progress = json.loads(bytes(result.value))
        same = isinstance(progress, dict) and key is not None and progress.get("key") == key
        done = {_as_key(k) for k in progress["done"]} if same else set()
        needed = set(progress["files"]) | ({progress["manifest"]} if opts.use_ocdbt else set()) if same else set()
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        return None, f"{url}/{PROGRESS_RECORD} is unreadable"
    if not same:
        return None, f"{url} was left by a different conversion"
    missing = sorted(needed - set(list_keys(url)))
    if missing:
        return None, f"{url}/{missing[0]} is missing, the progress record names it"
    return done, ""


def preflight(url: BucketURL, overwrite: bool, sources=()) -> list[str]:
    """Every reason a conversion into the bucket prefix `url` would be refused before writing (for `plan`)."""
    from ckpt_cli.errors import CkptError
    from ckpt_cli.io.location import overlapping

    reasons = [f"--out {url} overlaps the source {s}" for s in sources if overlapping(url, s)]
    try:
        check_output(url, overwrite, False)
    except CkptError as exc:
        reasons.append(str(exc))
    return reasons


PROBE_OBJECTS = 4
PROBE_OBJECT_BYTES = 16 << 20


def probe_write_gbps(url: BucketURL, writer: str) -> float:
    """The bucket's write rate (GB/s), measured the way the output will be written: `PROBE_OBJECTS` objects of
    `PROBE_OBJECT_BYTES` uploaded at once (tensorstore PUTs for a MaxText checkpoint, streamed multipart /
    resumable uploads for HF shards) under `OUT/.ckpt-probe-<id>/`, removed afterwards."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from ckpt_cli.io.object_upload import ObjectUpload

    check_credentials(url)
    probe = url / f".ckpt-probe-{os.getpid()}-{time.monotonic_ns()}"
    data = np.random.default_rng(0).integers(0, 255, PROBE_OBJECT_BYTES, dtype=np.uint8).tobytes()
    store = open_store(probe)
    start = time.perf_counter()
    try:
        if writer == "orbax":
            futures = [store.write(f"p{i}", data) for i in range(PROBE_OBJECTS)]
            for f in futures:
                _do(f, url, "probing the write rate")
        else:
            def one(i: int) -> None:
                up = ObjectUpload(probe / f"p{i}")
                try:
                    up.write(data)
                    up.close()
                except BaseException:
                    up.abort()
                    raise

            with ThreadPoolExecutor(PROBE_OBJECTS) as pool:
                list(pool.map(one, range(PROBE_OBJECTS)))
        seconds = time.perf_counter() - start
    finally:
        try:
            _wait(store.delete_range(ts.KvStore.KeyRange()))
        except ValueError:
            pass
    return PROBE_OBJECTS * PROBE_OBJECT_BYTES / max(seconds, 1e-6) / 1e9


# --------------------------------------------------------------------------------------- sources


def read_checkpoint_meta(url: BucketURL) -> tuple[BucketURL, dict, dict]:
    """An Orbax checkpoint in a bucket (run, step or items prefix; a run's latest step with items/_METADATA):
    its items prefix, `_METADATA` and the step's `_CHECKPOINT_METADATA` (or {})."""
    context = bucket_context()
    try:
        keys = set(list_keys(url, context))
    except OutputError as exc:
        raise SourceError(str(exc)) from None
    if PARTIAL_MARKER in keys:
        raise SourceError(f"{url}: an interrupted conversion (it holds ckpt's {PARTIAL_MARKER}), not a complete "
                          f"checkpoint")
    if "_METADATA" in keys:
        items, rel = url, ""
    elif "items/_METADATA" in keys:
        items, rel = url / "items", "items/"
    else:
        steps = sorted(int(k.split("/", 1)[0]) for k in keys
                       if k.endswith("/items/_METADATA") and k.count("/") == 2 and k.split("/", 1)[0].isdigit())
        if not steps:
            why = "nothing there (no such bucket or prefix)" if not keys else "no _METADATA in it, in items/ or in " \
                                                                             "a step prefix"
            raise SourceError(f"{url}: not an Orbax checkpoint ({why})")
        items, rel = url / str(steps[-1]) / "items", f"{steps[-1]}/items/"
    store = open_store(url, context)

    def read(key: str) -> bytes | None:
        try:
            result = store.read(key).result()
        except ValueError as exc:
            raise SourceError(str(bucket_error(exc, url, "reading"))) from None
        return bytes(result.value) if result.state == "value" else None

    try:
        metadata = json.loads(read(f"{rel}_METADATA") or b"")
    except json.JSONDecodeError as exc:
        raise SourceError(f"{items}: unreadable Orbax _METADATA ({exc})") from None
    if rel:                                 # the step prefix is the items prefix's parent
        step = read(rel.removesuffix("items/") + "_CHECKPOINT_METADATA")
    else:                                   # an items prefix named directly
        result = _do(open_store(url.parent, context).read("_CHECKPOINT_METADATA"), url, "reading")
        step = bytes(result.value) if result.state == "value" else None
    try:
        step_metadata = json.loads(step) if step else {}
    except json.JSONDecodeError:
        step_metadata = {}
    return items, metadata, step_metadata
