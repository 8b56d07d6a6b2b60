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

Not supported on buckets (refused with one line): `--overwrite` (replacing a checkpoint in place would
destroy the old one before the new one is complete) and `--resume`. No lock keeps two runs from writing the
same prefix at once: object stores have no `flock`.

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
from ckpt_cli.io.orbax import HANDLER, OrbaxWriter, StorageOptions, array_spec, tree_metadata
from ckpt_cli.io.outdir import PARTIAL_MARKER

COMMIT = "commit_success.txt"
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
    return sorted(k.decode() for k in _do(store.list(), url, "listing"))


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
    """What must hold before a conversion writes into `url`: a named prefix, no --overwrite/--resume, and
    nothing there but an interrupted run of ckpt's own (which the run then replaces)."""
    if not url.path:
        raise OutputError(f"--out {url}: give a path inside the bucket ({url}/NAME), not the bucket itself")
    if overwrite:
        raise UnsupportedError(f"--overwrite {url}: ckpt does not replace a checkpoint in a bucket (an object store "
                               f"cannot swap it atomically); delete it first or choose another --out")
    if resume:
        raise UnsupportedError(f"--resume {url}: resuming into a bucket is not supported yet; run without --resume "
                               f"(an interrupted run's objects are removed and it starts afresh)")
    keys = list_keys(url)
    if keys and PARTIAL_MARKER not in keys:
        more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
        raise OutputError(f"{url} exists and is not empty ({keys[0]}{more}): choose another --out (ckpt never "
                          f"replaces a checkpoint in a bucket)")


class BucketOrbaxWriter(OrbaxWriter):
    """`OrbaxWriter` into a bucket prefix: the same arrays, batches and commits; written in place and
    completed by its marker objects (see the module docstring); no progress snapshots."""

    def __init__(self, out: BucketURL, opts: StorageOptions):      # not super().__init__: that one is file-only
        self.out = out
        self.opts = opts
        self.overwrite = False
        self.tmp = out
        self.items = out / "0" / "items"
        self.progress_key = None
        self.context = bucket_context()
        self.store = open_store(out, self.context)
        self.manifest = {"driver": "memory", "path": f"ckpt-manifest-{id(self)}/"}
        self.done: set[tuple] = set()
        self.resumed = False
        keys = sorted(k.decode() for k in _do(self.store.list(), out, "listing"))
        if PARTIAL_MARKER in keys:          # an interrupted run of ckpt's: its objects go first
            _do(clear(self.store), out, "removing an interrupted run's objects")
        elif keys:
            raise OutputError(f"{out} is not empty: nothing written")
        self._put(PARTIAL_MARKER, b"made by ckpt; removed when the checkpoint is complete\n")
        self._init_batches()

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
        try:
            clear(self.store).result()
        except ValueError:
            pass        # the marker stays: the next run into this prefix removes what is left
        return False


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
