"""One large object streamed into a bucket: S3 multipart uploads, GCS resumable uploads.

tensorstore's kvstores write an object in one PUT from one buffer, which is right for OCDBT data files
and metadata but would hold a whole safetensors shard in memory. An `ObjectUpload` takes the object's
bytes in order (`write`), cuts them into parts of `PART_BYTES` and sends each as soon as it is full:

- S3: CreateMultipartUpload, UploadPart (up to `PARALLEL_PARTS` at once, from a thread pool),
  CompleteMultipartUpload. boto3's client reads credentials, profiles, `AWS_REGION` and
  `AWS_ENDPOINT_URL(_S3)` the standard way.
- GCS: a resumable upload session (JSON API), its chunks sent in order (the protocol appends), each a
  multiple of 256 KiB but the last. Credentials: Application Default Credentials / GOOGLE_APPLICATION_CREDENTIALS
  through google-auth; an emulator endpoint (`CKPT_GCS_ENDPOINT`, ...) is used without credentials.

In both stores the object does not exist until the upload completes, and then appears whole: a reader
never sees a partial shard. `abort` drops an unfinished upload (S3 AbortMultipartUpload; a GCS session is
cancelled with DELETE). Memory: at most `PARALLEL_PARTS + 1` parts per upload.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from ckpt_cli.errors import OutputError
from ckpt_cli.io.location import BucketURL

PART_BYTES = 16 << 20         # S3 parts must be >= 5 MiB (all but the last); GCS chunks a multiple of 256 KiB
PARALLEL_PARTS = 4            # parts of one S3 upload in flight at once
GCS_API = "https://storage.googleapis.com"
_GCS_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"


def s3_client():
    """A boto3 S3 client configured the standard way (environment, profiles, AWS_ENDPOINT_URL(_S3))."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise OutputError("writing large objects to s3:// needs boto3: pip install boto3") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32,
                    connect_timeout=10, read_timeout=120)
    return boto3.client("s3", endpoint_url=endpoint, region_name=region or ("us-east-1" if endpoint else None),
                        config=config)


class GcsSession:
    """The JSON API base URL and authorization headers for GCS requests (emulators: none needed)."""

    def __init__(self):
        import requests

        endpoint = BucketURL("gs", "x").endpoint()
        if endpoint and "://" not in endpoint:
            endpoint = f"http://{endpoint}"
        self.base = (endpoint or GCS_API).rstrip("/")
        self.emulated = endpoint is not None
        self.http = requests.Session()
        self.credentials = None
        if not self.emulated:
            try:
                import google.auth
                import google.auth.exceptions
            except ImportError:
                raise OutputError("writing large objects to gs:// needs google-auth (Application Default "
                                  "Credentials): pip install google-auth") from None
            try:
                self.credentials, _ = google.auth.default(scopes=[_GCS_SCOPE])
            except google.auth.exceptions.DefaultCredentialsError:
                raise OutputError("gs://: no credentials found (run gcloud auth application-default login or set "
                                  "GOOGLE_APPLICATION_CREDENTIALS)") from None
        self.lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        if self.credentials is None:
            return {}
        import google.auth.transport.requests

        with self.lock:
            if not self.credentials.valid:
                self.credentials.refresh(google.auth.transport.requests.Request())
            return {"Authorization": f"Bearer {self.credentials.token}"}


def http_error(url: BucketURL, status: int, body: str, what: str) -> OutputError:
    """An HTTP failure from a bucket as one line (same wording as the tensorstore failures)."""
    if status == 404:
        return OutputError(f"{url}: the bucket {url.scheme}://{url.bucket} does not exist (or is not visible "
                           f"with these credentials)")
    if status == 403:
        return OutputError(f"{url}: permission denied while {what}")
    if status == 401:
        return OutputError(f"{url}: no valid credentials while {what}")
    return OutputError(f"{url}: {what} failed (HTTP {status}: {body.strip()[:200]})")


def s3_error(exc: Exception, url: BucketURL, what: str) -> OutputError:
    """A boto3 failure as one line."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return OutputError(f"{url}: no AWS credentials while {what} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                           f"AWS_PROFILE)")
    if isinstance(exc, EndpointConnectionError):
        return OutputError(f"{url}: cannot reach the object store while {what} ({exc})")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "NoSuchBucket":
            return http_error(url, 404, "", what)
        if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
            return http_error(url, 403, "", what)
        return OutputError(f"{url}: {what} failed ({code or status}: {exc})")
    return OutputError(f"{url}: {what} failed ({type(exc).__name__}: {exc})")


class ObjectUpload:
    """Streams one object's bytes, in order, into `url` (see the module docstring); `close` completes it."""

    def __init__(self, url: BucketURL, client=None, pool: ThreadPoolExecutor | None = None):
        self.url = url
        self.buffer = bytearray()
        self.sent = 0                    # bytes handed to part uploads
        self.parts: list[Future] = []
        self.done = False
        self.slots = threading.BoundedSemaphore(PARALLEL_PARTS)
        # S3 parts go to the shared pool, in parallel; a GCS session's chunks to its own single thread, in order
        self.own_pool = None if url.scheme == "s3" and pool is not None else ThreadPoolExecutor(1, "ckpt-upload")
        self.workers = self.own_pool or pool
        if url.scheme == "s3":
            self.client = client or s3_client()
            try:
                self.upload_id = self.client.create_multipart_upload(Bucket=url.bucket, Key=url.path)["UploadId"]
            except Exception as exc:  # noqa: BLE001 - boto3 raises many kinds; each becomes one line
                raise s3_error(exc, url, f"starting the upload of {url.name}") from None
        else:
            self.session = client or GcsSession()
            from urllib.parse import quote

            resp = self.session.http.post(
                f"{self.session.base}/upload/storage/v1/b/{url.bucket}/o?uploadType=resumable&name="
                f"{quote(url.path, safe='')}", json={"name": url.path}, headers=self.session.headers(), timeout=60)
            if resp.status_code >= 300:
                raise http_error(url, resp.status_code, resp.text, f"starting the upload of {url.name}")
            self.session_uri = resp.headers["Location"]

    def write(self, data) -> None:
        """Append bytes; every full part is sent in the background (at most PARALLEL_PARTS in flight: S3 parts in
        parallel, GCS chunks one after another, as its protocol appends)."""
        self.buffer += memoryview(data).cast("B")
        while len(self.buffer) >= PART_BYTES:
            with memoryview(self.buffer) as view:       # one copy into the part, then the buffer shifts
                part = bytes(view[:PART_BYTES])
            del self.buffer[:PART_BYTES]
            self._send(part, last=False)

    def close(self) -> None:
        """Send what is left and complete the upload: the object appears, whole."""
        self._send(bytes(self.buffer), last=True)
        self.buffer = bytearray()
        etags = [f.result() for f in self.parts]
        if self.url.scheme == "s3":
            parts = [{"PartNumber": n + 1, "ETag": etag} for n, etag in enumerate(etags)]
            try:
                self.client.complete_multipart_upload(Bucket=self.url.bucket, Key=self.url.path,
                                                      UploadId=self.upload_id, MultipartUpload={"Parts": parts})
            except Exception as exc:  # noqa: BLE001
                raise s3_error(exc, self.url, f"completing the upload of {self.url.name}") from None
        self.done = True
        self._shutdown()

    def abort(self) -> None:
        """Drop the unfinished upload (nothing appears); errors are ignored (the run is already failing)."""
        if self.done:
            return
        self.done = True
        for f in self.parts:
            f.cancel()
        for f in self.parts:
            try:
                f.result()
            except BaseException:  # noqa: BLE001 - already failing
                pass
        try:
            if self.url.scheme == "s3":
                self.client.abort_multipart_upload(Bucket=self.url.bucket, Key=self.url.path, UploadId=self.upload_id)
            else:
                self.session.http.delete(self.session_uri, headers=self.session.headers(), timeout=30)
        except Exception:  # noqa: BLE001 - best effort: an abandoned upload is never a visible object
            pass
        self._shutdown()

    def _shutdown(self) -> None:
        if self.own_pool is not None:
            self.own_pool.shutdown(wait=False)

    def _send(self, data: bytes, last: bool) -> None:
        """Queue one part (the last may be short or, on GCS, empty); a part that already failed raises here."""
        for f in self.parts:
            if f.done() and f.exception() is not None:
                f.result()
        if self.url.scheme == "s3" and last and not data and self.parts:
            return
        start = self.sent
        self.sent += len(data)
        number = len(self.parts) + 1
        self.slots.acquire()
        try:
            future = self.workers.submit(self._part, number, start, data, last)
        except BaseException:
            self.slots.release()
            raise
        self.parts.append(future)

    def _part(self, number: int, start: int, data: bytes, last: bool) -> str:
        try:
            if self.url.scheme == "s3":
                try:
                    return self.client.upload_part(Bucket=self.url.bucket, Key=self.url.path,
                                                   UploadId=self.upload_id, PartNumber=number, Body=data)["ETag"]
                except Exception as exc:  # noqa: BLE001
                    raise s3_error(exc, self.url, f"uploading {self.url.name}") from None
            end = start + len(data)
            total = str(end) if last else "*"
            rng = f"bytes {start}-{end - 1}/{total}" if data else f"bytes */{total}"
            resp = self.session.http.put(self.session_uri, data=data, timeout=300,
                                         headers={**self.session.headers(), "Content-Range": rng})
            if resp.status_code not in ((200, 201) if last else (308,)):
                raise http_error(self.url, resp.status_code, resp.text, f"uploading {self.url.name}")
            return ""
        finally:
            self.slots.release()
