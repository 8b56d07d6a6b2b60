"""Where a path argument points: a local path, or an object-store URL (gs://BUCKET/PATH, s3://BUCKET/PATH).

Every path argument (SOURCE, --out, --hf-config, --golden, ...) goes through `location` (or `local_path`)
on the raw string the user typed, before anything turns it into a `Path`: `Path("gs://b/x")` is the local
relative path `gs:/b/x`, and writing there would make a local folder named `gs:`. A URL is therefore either
routed to the bucket code (`BucketURL`) or refused with one line, never taken for a local path.

`file:///abs/path` is a local path. Any other `SCHEME://` is refused, and so is a path whose first part is
a known scheme with its colon (`gs:/bucket/x`, a URL that lost a slash).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ckpt_cli.errors import UnsupportedError

BUCKET_SCHEMES = {"gs": "gcs", "s3": "s3"}      # URL scheme -> tensorstore kvstore driver
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)
_KNOWN = ("gs", "s3", "file", "http", "https", "hf", "az", "abfs", "abfss", "wasb", "wasbs", "gcs", "s3a", "s3n",
          "oss", "cos", "r2", "ftp", "sftp", "ssh", "hdfs")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]$")
GCS_ENDPOINT_ENV = "CKPT_GCS_ENDPOINT"           # our override (else TENSORSTORE_GCS_HTTP_URL, STORAGE_EMULATOR_HOST)


@dataclass(frozen=True)
class BucketURL:
    """An object-store location: scheme ('gs' or 's3'), bucket and a key prefix without outer slashes."""

    scheme: str
    bucket: str
    path: str = ""

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.path}" if self.path else f"{self.scheme}://{self.bucket}"

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __truediv__(self, child: str) -> BucketURL:
        child = str(child).strip("/")
        return BucketURL(self.scheme, self.bucket, f"{self.path}/{child}" if self.path else child)

    def with_name(self, name: str) -> BucketURL:
        head = self.path.rsplit("/", 1)[0] if "/" in self.path else ""
        return BucketURL(self.scheme, self.bucket, f"{head}/{name}" if head else name)

    @property
    def parent(self) -> BucketURL:
        return BucketURL(self.scheme, self.bucket, self.path.rsplit("/", 1)[0] if "/" in self.path else "")

    def kvstore(self) -> dict:
        """The tensorstore kvstore spec of this prefix (a trailing slash: a 'folder'), endpoint overrides
        from the environment applied (see `endpoint`; for GCS through the environment, `apply_gcs_endpoint`)."""
        spec: dict = {"driver": BUCKET_SCHEMES[self.scheme], "bucket": self.bucket,
                      "path": f"{self.path}/" if self.path else ""}
        endpoint = self.endpoint()
        if self.scheme == "gs":
            apply_gcs_endpoint()
        elif endpoint:
            spec["endpoint"] = endpoint
            spec["aws_region"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return spec

    def endpoint(self) -> str | None:
        """An S3-compatible store's endpoint (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`); for GCS the emulator
        or private endpoint (`CKPT_GCS_ENDPOINT`, `TENSORSTORE_GCS_HTTP_URL`, `STORAGE_EMULATOR_HOST`), which
        tensorstore's gcs driver reads from `TENSORSTORE_GCS_HTTP_URL` (see `apply_gcs_endpoint`)."""
        if self.scheme == "s3":
            return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        return (os.environ.get(GCS_ENDPOINT_ENV) or os.environ.get("TENSORSTORE_GCS_HTTP_URL")
                or os.environ.get("STORAGE_EMULATOR_HOST") or None)


def overlapping(a: object, b: object) -> bool:
    """Whether two bucket locations are the same prefix or one lies inside the other (False for local paths)."""
    if not isinstance(a, BucketURL) or not isinstance(b, BucketURL):
        return False
    if (a.scheme, a.bucket) != (b.scheme, b.bucket):
        return False
    pa, pb = f"{a.path}/" if a.path else "", f"{b.path}/" if b.path else ""
    return pa.startswith(pb) or pb.startswith(pa)


def apply_gcs_endpoint() -> None:
    """Point tensorstore's gcs driver at the GCS endpoint override, if one is set (it reads only
    TENSORSTORE_GCS_HTTP_URL, once per process: call this before the first gcs kvstore is opened)."""
    endpoint = BucketURL("gs", "x").endpoint()
    if endpoint:
        if "://" not in endpoint:
            endpoint = f"http://{endpoint}"
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = endpoint


def location(arg: str | os.PathLike, flag: str, buckets: bool = False, what: str = "") -> Path | BucketURL:
    """The path argument `arg` of option `flag` as a local Path or, with `buckets`, a BucketURL.

    A URL of a scheme we do not support, a malformed bucket URL, or a bucket URL where this argument
    takes none (`buckets=False`; `what` says what does) is refused with UnsupportedError."""
    if isinstance(arg, Path):
        return arg      # already a local path (an API caller's)
    text = os.fspath(arg)
    match = _URL.match(text)
    if match is None:
        first = text.split("/", 1)[0]
        if first.endswith(":") and first[:-1].lower() in _KNOWN:
            raise UnsupportedError(f"{flag} {text}: looks like a URL with a missing slash (write "
                                   f"{first}//...); a local path cannot start with '{first}'")
        return Path(text)
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "file":
        if not rest.startswith("/"):
            raise UnsupportedError(f"{flag} {text}: a file:// URL needs an absolute path (file:///abs/path)")
        return Path(rest)
    if scheme not in BUCKET_SCHEMES:
        raise UnsupportedError(f"{flag} {text}: unsupported URL scheme {scheme}:// (use a local path, "
                               f"gs://BUCKET/PATH or s3://BUCKET/PATH)")
    bucket, _, path = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise UnsupportedError(f"{flag} {text}: '{bucket}' is not a valid bucket name")
    path = path.strip("/")
    if any(part in ("", ".", "..") for part in path.split("/")) and path:
        raise UnsupportedError(f"{flag} {text}: empty, '.' or '..' parts are not allowed in a bucket path")
    url = BucketURL(scheme, bucket, path)
    if not buckets:
        raise UnsupportedError(f"{flag} {url}: {scheme}:// is not supported here"
                               + (f" ({what})" if what else " (give a local path)"))
    return url


def local_path(arg: str | os.PathLike | None, flag: str, what: str = "") -> Path | None:
    """`location` for an argument that takes local paths only (None stays None)."""
    return None if arg is None else location(arg, flag, buckets=False, what=what)


def is_url(arg: str | os.PathLike | None) -> bool:
    """Whether `arg` is written as SCHEME://... (any scheme)."""
    return isinstance(arg, str) and _URL.match(arg) is not None


def source_arg(arg: str | None, flag: str, what: str = "") -> str | None:
    """A SOURCE-like argument that may also be a repo id or model name: returned as typed unless it is
    written as a URL (or one missing a slash), which is refused here (no bucket source yet)."""
    if arg is not None and (is_url(arg) or isinstance(location(arg, flag, buckets=True), BucketURL)):
        location(arg, flag, buckets=False, what=what)
    return arg
