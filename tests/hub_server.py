"""A local stand-in for the Hugging Face Hub, for tests that drive the real ``huggingface_hub`` client.

The machine has no access to huggingface.co. :class:`FakeHub` serves model repos from folders on disk
over HTTP on ``127.0.0.1`` and speaks the subset of the Hub HTTP API that ``huggingface_hub`` (checked
against 2.4.0) uses to read repos. The server part is standard library only (``http.server`` +
``threading``).

Routes
------
* ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}``: ``HfApi.model_info`` /
  ``repo_info`` (``?blobs=true`` adds ``size``/``blobId``/``lfs`` to ``siblings``, as
  ``files_metadata=True`` asks). The answer also carries ``sha``, ``gated``, ``config`` (``architectures``
  and ``model_type`` of ``config.json``) and ``safetensors`` (parameter count per dtype).
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=..&expand=..``: ``list_repo_tree`` /
  ``list_repo_files`` / ``HfFileSystem.ls``; paginated with a ``Link: <...>; rel="next"`` header like
  the Hub (``FakeHub.tree_page_size`` entries a page, 1000 by default).
* ``POST /api/models/{repo}/paths-info/{rev}``: ``get_paths_info`` / ``HfFileSystem.info``.
* ``GET /api/models/{repo}/refs`` and ``GET /api/models/{repo}/commits/{rev}``: ``list_repo_refs`` /
  ``list_repo_commits`` (one branch ``main``, one commit).
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: ``hf_hub_download``, ``snapshot_download``,
  ``HfFileSystem`` reads, ``HfApi.get_safetensors_metadata``. Answers carry ``X-Repo-Commit``, ``ETag``
  (sha256 for LFS-like files such as ``*.safetensors``, the git blob sha1 otherwise, as the Hub does),
  ``Content-Length`` and ``Accept-Ranges: bytes``, and never any ``X-Xet-*`` header or ``xet-auth``
  link, so the client always takes its plain HTTP download path. ``Range: bytes=a-b`` / ``bytes=a-`` /
  ``bytes=-n`` get ``206`` with ``Content-Range``; an unsatisfiable range gets ``416`` with
  ``Content-Range: bytes */size``; a malformed or multi-part range is ignored (``200``, whole file), as
  RFC 9110 allows. No redirects are made: content is served by the hub itself.
* Uploads (the legacy, non-Xet path ``HfApi.create_repo`` / ``create_branch`` / ``upload_folder`` /
  ``create_commit`` take with ``HF_HUB_DISABLE_XET=1``), each needing ``Authorization: Bearer <token>``
  (``401`` without one, ``403`` with another token than ``FakeHub.token``): ``POST /api/repos/create``
  (a new repo in a private temporary folder; ``409`` if it exists), ``POST /api/models/{repo}/branch/{b}``
  (a copy of main; ``409`` if it exists), ``POST /api/models/{repo}/preupload/{rev}`` (``lfs`` for the
  LFS-like files above, else ``regular``), ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer;
  objects already stored get no action), ``PUT /_fake_lfs/{oid}`` (sha256 checked) and
  ``POST /api/models/{repo}/commit/{rev}`` (ndjson; files written into main's or the branch's folder).
  ``hub.created`` holds the create payloads, ``hub.commits`` one record per commit, ``hub.branches`` the
  branch folders.
* ``GET /api/agent-harnesses``: an empty registry. ``huggingface_hub`` fetches it once per process,
  the first time it builds request headers, so the first test of a process sees it in ``requests``.

Revisions: ``main`` and the repo's fake commit sha (40 hex digits, ``sha1(repo_id)`` unless given).

Errors (raised by the real client, checked in ``tests/test_hub_server.py``)
---------------------------------------------------------------------------
* Unknown repo (any route): ``404`` + ``X-Error-Code: RepoNotFound`` ->
  ``huggingface_hub.errors.RepositoryNotFoundError``. Datasets and Spaces are never found.
* Unknown revision: ``404`` + ``X-Error-Code: RevisionNotFound`` -> ``RevisionNotFoundError``.
* Unknown file or folder: ``404`` + ``X-Error-Code: EntryNotFound`` (+ ``X-Repo-Commit`` on resolve routes,
  so the client caches the miss under ``.no_exist``) -> ``RemoteEntryNotFoundError``, a subclass of both
  ``HfHubHTTPError`` and ``EntryNotFoundError`` (2.4 has no plain ``EntryNotFoundError`` from the server).
* Gated repo, file content (``resolve`` routes) only, as on the Hub: its metadata, listings and
  ``paths-info`` stay public (``model_info(...).gated == "manual"``).

  - no ``Authorization`` header: ``401`` + ``X-Error-Code: GatedRepo``;
  - a bearer token other than ``FakeHub.token``: ``403`` + ``X-Error-Code: GatedRepo`` (the Hub's answer
    to a user who is not on the authorized list);

  both make the client raise ``huggingface_hub.errors.GatedRepoError`` (a subclass of
  ``RepositoryNotFoundError`` and ``HfHubHTTPError``; ``err.response.status_code`` tells 401 from 403).
  ``hf_hub_download`` re-raises it as is when the file is not cached. With ``Authorization: Bearer
  <FakeHub.token>`` (or any bearer token when ``FakeHub.token`` is None) the content is served.
  Tokens are never required on public repos.

Pointing ``huggingface_hub`` at the endpoint
--------------------------------------------
``huggingface_hub.constants`` reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_OFFLINE``,
``HF_HUB_DISABLE_XET``... once, when it is first imported, and the rest of the library reads
``constants.X`` at call time. So:

* In a **subprocess** (e.g. running the ``ckpt`` CLI): only the environment matters. Pass
  ``env=hub_env(endpoint, hf_home)`` to ``subprocess.run``: it sets ``HF_ENDPOINT``, ``HF_HOME``,
  ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_DISABLE_UPDATE_CHECK=1``, adds
  ``127.0.0.1`` to ``NO_PROXY`` and drops ``HF_TOKEN``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` & co; add
  ``HF_TOKEN`` / ``HF_HUB_OFFLINE=1`` yourself when wanted. (Inside the ``fake_hub`` fixture,
  ``os.environ`` already holds all that, so ``subprocess.run`` inherits it.)
* **In the pytest process**, setting environment variables is not enough once ``huggingface_hub`` has
  been imported (and pytest plugins or the package under test may import it first). Use the
  ``fake_hub`` fixture, or call ``configure_hf_env(monkeypatch, endpoint, hf_home)``, which sets the
  environment as above *and* ``monkeypatch.setattr``\\ s the derived ``huggingface_hub.constants``
  (``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_URL_HOSTS``, ``HF_HOME``, ``HF_HUB_CACHE`` and
  the other cache/token paths, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``,
  ``HF_HUB_DISABLE_TELEMETRY``, ...). Everything is restored when the test ends, and the fixture clears
  ``HfFileSystem``'s instance cache. Offline mode: ``set_hf_offline(monkeypatch, True)`` (patches
  ``constants.HF_HUB_OFFLINE``, which is what ``huggingface_hub.is_offline_mode()`` returns, and sets
  ``HF_HUB_OFFLINE=1`` for subprocesses).

  ``HfApi()``, ``hf_hub_download``, ``snapshot_download`` and ``HfFileSystem()`` then reach the fake hub
  with no ``endpoint=`` argument. Objects created *before* the patch keep their endpoint (``HfApi``
  stores it at construction). Libraries that copy a constant at their own import time (e.g.
  ``transformers``' cache path variables) are not covered: point those at the endpoint / cache
  explicitly, or run them in a subprocess.

Usage (``tests`` is a package, so import from ``tests.hub_server``; importing the fixture into a test
module registers it, or list ``"tests.hub_server"`` in a conftest's ``pytest_plugins``)::

    import huggingface_hub
    from tests.hub_server import FAKE_TOKEN, fake_hub, make_tiny_model_repo  # noqa: F401 (fixture)

    def test_download(fake_hub, tmp_path):  # noqa: F811
        hub, endpoint = fake_hub
        hub.add_repo("org/tiny", make_tiny_model_repo(tmp_path / "tiny"))
        hub.add_repo("org/gated", make_tiny_model_repo(tmp_path / "gated"), gated=True)
        path = huggingface_hub.hf_hub_download("org/tiny", "config.json")
        huggingface_hub.hf_hub_download("org/gated", "config.json", token=FAKE_TOKEN)

``FakeHub`` also works on its own: ``with FakeHub({"org/tiny": folder}) as hub: ...`` (``hub.endpoint``);
then point the client at it with ``configure_hf_env`` / ``hub_env``.

Counters: ``hub.bytes_served`` is the total of file-content body bytes written for ``GET`` on resolve
routes (partial content included, headers and API JSON excluded); ``hub.requests`` logs
``(method, path, range_header)`` for every request, ``path`` as sent (percent-encoded, no query string).
``hub.reset_counters()`` clears both.

Bounds: the server binds 127.0.0.1 only, on a free port; each connection has a socket timeout
(``FakeHub.socket_timeout``, 30 s), request bodies are capped, and ``stop()`` shuts down the accept loop,
closes every open connection and joins the handler threads with a timeout.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import posixpath
import re
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

FAKE_TOKEN = "hf_fake_test_token_0123456789"
FAKE_DATE = "2024-01-01T00:00:00.000Z"

# Extensions that the Hub's default .gitattributes stores in LFS (served with a sha256 ETag and
# `lfs` metadata in listings); any file of 10 MiB or more is treated as LFS too.
_LFS_SUFFIXES = tuple(
    ".safetensors .bin .pt .pth .ckpt .h5 .msgpack .onnx .ot .npy .npz .gguf .pkl .pickle .joblib .model"
    " .tflite .arrow .parquet .zip .gz .tar .tgz .xz .zst .7z .bz2 .mlmodel .pb .wasm".split()
)
_LFS_MIN_SIZE = 10 * 1024 * 1024
_CHUNK = 256 * 1024
_MAX_BODY = 8 * 1024 * 1024
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


# --------------------------------------------------------------------------------------------------
# Repo contents
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FileMeta:
    size: int
    blob_id: str  # git blob sha1 (of the LFS pointer for LFS files)
    etag: str
    lfs_sha256: str | None
    pointer_size: int | None


@dataclass
class _Repo:
    repo_id: str
    root: Path
    gated: bool
    sha: str

    def files(self) -> list[str]:
        """Posix paths of the repo files, sorted; `.git` folders are skipped, empty folders are invisible."""
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if d != ".git")
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                out.append(name if rel_dir == "." else f"{rel_dir}/{name}")
        return sorted(out)

    def dirs(self, files: list[str]) -> set[str]:
        out: set[str] = set()
        for f in files:
            parent = posixpath.dirname(f)
            while parent:
                out.add(parent)
                parent = posixpath.dirname(parent)
        return out

    def local_path(self, rel: str) -> Path | None:
        """The file behind repo path `rel`, or None if `rel` is not a plain file path of the repo."""
        if not rel or rel.startswith("/") or "\x00" in rel or "\\" in rel:
            return None
        parts = rel.split("/")
        if any(p in ("", ".", "..", ".git") for p in parts):
            return None
        path = self.root.joinpath(*parts)
        return path if path.is_file() else None


def _git_blob_sha1(data_iter: Iterator[bytes], size: int) -> str:
    h = hashlib.sha1(f"blob {size}\0".encode())
    for chunk in data_iter:
        h.update(chunk)
    return h.hexdigest()


def _iter_file(path: Path, start: int = 0, length: int | None = None) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        remaining = length
        while remaining is None or remaining > 0:
            chunk = f.read(_CHUNK if remaining is None else min(_CHUNK, remaining))
            if not chunk:
                return
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk


def _is_lfs(rel: str, size: int) -> bool:
    return rel.lower().endswith(_LFS_SUFFIXES) or size >= _LFS_MIN_SIZE


def _safetensors_param_counts(path: Path) -> dict[str, int]:
    """Element count per dtype from a safetensors header ({} if the file is not a readable safetensors)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return {}
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                return {}
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return {}
    counts: dict[str, int] = {}
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        count = 1
        for dim in info.get("shape", []):
            count *= int(dim)
        counts[info.get("dtype", "?")] = counts.get(info.get("dtype", "?"), 0) + count
    return counts


# --------------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------------


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, extra: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = dict(extra or {})


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: FakeHub):
        self.hub = hub
        self._conn_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._handler_threads: set[threading.Thread] = set()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address):  # noqa: ANN001 - socketserver signature
        with self._conn_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):  # noqa: ANN001
        me = threading.current_thread()
        with self._conn_lock:
            self._handler_threads.add(me)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._handler_threads.discard(me)

    def shutdown_request(self, request):  # noqa: ANN001
        with self._conn_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self, join_timeout: float) -> None:
        with self._conn_lock:
            conns = list(self._conns)
            threads = list(self._handler_threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(join_timeout)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    server: _Server

    def setup(self) -> None:
        self.timeout = self.server.hub.socket_timeout
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    # -- dispatch -----------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _not_allowed(self) -> None:
        self.close_connection = True
        self._send_error(_HubError(405, None, f"Method {self.command} is not supported by the fake hub"))

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        raw_path, _, query = self.path.partition("?")
        hub._log(method, raw_path, self.headers.get("Range"))
        self._response_started = False
        try:
            body = self._read_body() if method == "POST" else b""
            self._route(method, raw_path, parse_qs(query, keep_blank_values=True), body)
        except _HubError as err:
            if self._response_started:
                self.close_connection = True
            else:
                self._send_error(err)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # never leave the client hanging on a bug of the fake hub
            self.close_connection = True
            if not self._response_started:
                try:
                    self._send_error(_HubError(500, None, f"FakeHub internal error: {exc!r}"))
                except OSError:
                    pass

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise _HubError(411, None, "Content-Length required")
        n = int(length)
        if n > _MAX_BODY:
            self.close_connection = True
            raise _HubError(413, None, "Request body too large")
        return self.rfile.read(n)

    def _route(self, method: str, raw_path: str, query: dict[str, list[str]], body: bytes) -> None:
        hub = self.server.hub
        if raw_path == "/api/agent-harnesses" and method in ("GET", "HEAD"):
            return self._send_json({"standardEnvVars": [], "harnesses": {}}, head=method == "HEAD")

        if raw_path == "/api/repos/create" and method == "POST":
            return self._create_repo(body)
        if raw_path.startswith("/_fake_lfs/") and method == "PUT":
            return self._lfs_put(raw_path[len("/_fake_lfs/") :])
        if raw_path.endswith(".git/info/lfs/objects/batch") and method == "POST":
            repo, sub = hub._match_repo(raw_path.lstrip("/")[: -len(".git/info/lfs/objects/batch")])
            if repo is None or sub:
                raise _HubError(404, "RepoNotFound", "Repository not found")
            return self._lfs_batch(repo, body)
        if method == "PUT":
            self.close_connection = True
            raise _HubError(405, None, f"Method PUT is not supported by the fake hub on {raw_path}")
        if raw_path.startswith("/api/"):
            kind, _, rest = raw_path[len("/api/") :].partition("/")
            if kind in ("datasets", "spaces", "kernels"):
                raise _HubError(404, "RepoNotFound", "Repository not found")
            if kind != "models":
                raise _HubError(404, None, f"Unknown route {raw_path}")
            repo, sub = hub._match_repo(rest)
            if repo is None:
                raise _HubError(404, "RepoNotFound", "Repository not found")
            return self._api(method, repo, sub, query, body)

        # /{repo_id}/resolve/{revision}/{path}
        rest = raw_path.lstrip("/")
        if rest.startswith(("datasets/", "spaces/", "kernels/")) and "/resolve/" in rest:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        repo, sub = hub._match_repo(rest)
        if repo is not None and sub.startswith("resolve/") and method in ("GET", "HEAD"):
            return self._resolve(method, repo, sub[len("resolve/") :])
        if repo is None and "/resolve/" in rest:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        raise _HubError(404, None, f"Unknown route {raw_path}")

    # -- helpers ------------------------------------------------------------------------------------

    def _send(self, status: int, headers: Mapping[str, str], body: bytes = b"", head: bool = False) -> None:
        self._response_started = True
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _send_json(self, data: Any, head: bool = False, extra: Mapping[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self._send(200, {"Content-Type": "application/json; charset=utf-8", **(extra or {})}, body, head)

    def _send_error(self, err: _HubError) -> None:
        body = json.dumps({"error": err.message}).encode()
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        headers.update(err.extra)
        self._send(err.status, headers, body, head=self.command == "HEAD")

    def _revision(self, repo: _Repo, raw_rev: str) -> str:
        rev = unquote(raw_rev)
        if rev in ("main", "refs/heads/main", repo.sha):
            return repo.sha
        raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")

    def _bool(self, query: dict[str, list[str]], name: str) -> bool:
        values = query.get(name) or query.get(name + "[]") or []
        return any(v.lower() in ("1", "true", "yes") for v in values)

    # -- API routes ---------------------------------------------------------------------------------

    def _api(self, method: str, repo: _Repo, sub: str, query: dict[str, list[str]], body: bytes) -> None:
        hub = self.server.hub
        head = method == "HEAD"
        if sub == "" and method in ("GET", "HEAD"):
            return self._send_json(hub._model_info(repo, blobs=self._bool(query, "blobs")), head=head)
        first, _, rest = sub.partition("/")
        if first == "revision" and rest and method in ("GET", "HEAD"):
            self._revision(repo, rest)
            return self._send_json(hub._model_info(repo, blobs=self._bool(query, "blobs")), head=head)
        if first == "tree" and rest and method in ("GET", "HEAD"):
            raw_rev, _, raw_path = rest.partition("/")
            self._revision(repo, raw_rev)
            return self._tree(repo, unquote(raw_path).strip("/"), query, head)
        if first == "paths-info" and rest and method == "POST":
            self._revision(repo, rest)
            return self._paths_info(repo, body)
        if first in ("preupload", "commit", "branch") and rest and method == "POST":
            return self._write_api(repo, first, unquote(rest), body)
        if first == "refs" and not rest and method in ("GET", "HEAD"):
            branch = {"name": "main", "ref": "refs/heads/main", "targetCommit": repo.sha}
            data = {"branches": [branch], "converts": [], "tags": [], "pullRequests": []}
            return self._send_json(data, head=head)
        if first == "commits" and rest and method in ("GET", "HEAD"):
            self._revision(repo, rest)
            commit = {
                "id": repo.sha,
                "title": "Initial commit",
                "message": "",
                "authors": [{"user": "fake-user"}],
                "date": FAKE_DATE,
            }
            return self._send_json([commit], head=head)
        raise _HubError(404, None, f"Unknown route for {repo.repo_id}: {sub!r}")

    # -- upload routes ------------------------------------------------------------------------------

    def _check_write(self) -> None:
        hub = self.server.hub
        scheme, _, presented = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise _HubError(401, None, "Invalid username or password.")
        if hub.token is not None and presented.strip() != hub.token:
            raise _HubError(403, None, "You don't have the rights to write to this repository.")

    def _create_repo(self, body: bytes) -> None:
        hub = self.server.hub
        self._check_write()
        payload = json.loads(body or b"{}")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        found, sub = hub._match_repo(repo_id)
        if found is not None and sub == "":      # as the Hub: 409 with the repo's url (exist_ok reads it)
            body = json.dumps({"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"})
            return self._send(409, {"Content-Type": "application/json; charset=utf-8",
                                    "X-Error-Message": "You already created this model repo"}, body.encode())
        folder = hub._upload_root() / "repos" / repo_id
        folder.mkdir(parents=True)
        hub.add_repo(repo_id, folder)
        with hub._lock:
            hub.created[repo_id] = payload
        self._send_json({"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    def _write_api(self, repo: _Repo, action: str, rev: str, body: bytes) -> None:
        hub = self.server.hub
        self._check_write()
        if action == "branch":
            with hub._lock:
                if rev == "main" or (repo.repo_id, rev) in hub.branches:
                    raise _HubError(409, None, f"Reference {rev} already exists")
                folder = hub._upload_root() / "branches" / repo.repo_id / rev
                shutil.copytree(repo.root, folder)
                hub.branches[(repo.repo_id, rev)] = folder
            return self._send_json({})
        folder = hub._branch_folder(repo, rev)
        if action == "preupload":
            files = json.loads(body or b"{}").get("files", [])
            modes = [{"path": f["path"], "shouldIgnore": False, "oid": None,
                      "uploadMode": "lfs" if _is_lfs(f["path"], int(f.get("size", 0))) else "regular"} for f in files]
            return self._send_json({"files": modes})
        paths = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key not in ("file", "lfsFile"):
                continue
            if repo.local_path(value["path"]) is None and any(
                    p in ("", ".", "..", ".git") for p in value["path"].split("/")):
                raise _HubError(400, None, f"invalid path {value['path']!r}")
            target = folder.joinpath(*value["path"].split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            if key == "file":
                target.write_bytes(base64.b64decode(value["content"]))
            else:
                with hub._lock:
                    stored = hub.lfs_objects.get(value["oid"])
                if stored is None:
                    raise _HubError(400, None, f"LFS object {value['oid']} was not uploaded")
                shutil.copyfile(stored, target)
            paths.append(value["path"])
        oid = hashlib.sha1(f"{repo.repo_id}@{rev}:{len(hub.commits)}".encode()).hexdigest()
        with hub._lock:
            hub.commits.append({"repo_id": repo.repo_id, "revision": rev, "paths": sorted(paths), "oid": oid})
            if rev == "main":
                repo.sha = oid
        self._send_json({"commitUrl": f"{hub.endpoint}/{repo.repo_id}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None})

    def _lfs_batch(self, repo: _Repo, body: bytes) -> None:
        hub = self.server.hub
        self._check_write()
        objects = []
        for obj in json.loads(body or b"{}").get("objects", []):
            with hub._lock:
                stored = hub.lfs_objects.get(obj["oid"])
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if stored is None or stored.stat().st_size != obj["size"]:
                entry["actions"] = {"upload": {"href": f"{hub.endpoint}/_fake_lfs/{obj['oid']}"}}
            objects.append(entry)
        self._send_json({"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str) -> None:
        hub = self.server.hub
        if not re.fullmatch(r"[0-9a-f]{64}", oid):
            raise _HubError(400, None, "bad oid")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise _HubError(411, None, "Content-Length required")
        folder = hub._upload_root() / "lfs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / oid
        digest = hashlib.sha256()
        remaining = int(length)
        with open(path.with_suffix(".tmp"), "wb") as f:
            while remaining:
                chunk = self.rfile.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                digest.update(chunk)
                f.write(chunk)
                remaining -= len(chunk)
        if remaining or digest.hexdigest() != oid:
            path.with_suffix(".tmp").unlink()
            raise _HubError(400, None, "the uploaded content does not match its oid")
        path.with_suffix(".tmp").replace(path)
        with hub._lock:
            hub.lfs_objects[oid] = path
        self._send(200, {})

    def _tree(self, repo: _Repo, path: str, query: dict[str, list[str]], head: bool) -> None:
        hub = self.server.hub
        recursive = self._bool(query, "recursive")
        expand = self._bool(query, "expand")
        files = repo.files()
        dirs = repo.dirs(files)
        if path and path not in dirs:
            raise _HubError(404, "EntryNotFound", f'{path} does not exist on "main"')
        prefix = path + "/" if path else ""

        def wanted(p: str) -> bool:
            return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

        entries = [hub._entry(repo, d, is_dir=True, expand=expand) for d in sorted(dirs) if wanted(d)]
        entries += [hub._entry(repo, f, is_dir=False, expand=expand) for f in files if wanted(f)]
        limit = hub.tree_page_size if not expand else min(hub.tree_page_size, 50)
        if "limit" in query:
            limit = max(1, min(limit, int(query["limit"][0])))
        try:
            cursor = int(query.get("cursor", ["0"])[0] or 0)
        except ValueError as exc:
            raise _HubError(400, None, "Invalid cursor") from exc
        page = entries[cursor : cursor + limit]
        extra = {}
        if cursor + limit < len(entries):
            params = {"recursive": str(recursive).lower(), "expand": str(expand).lower()}
            params["cursor"] = str(cursor + limit)
            if "limit" in query:
                params["limit"] = str(limit)
            split = urlsplit(self.path)
            extra["Link"] = f'<{hub.endpoint}{split.path}?{urlencode(params)}>; rel="next"'
        self._send_json(page, head=head, extra=extra)

    def _paths_info(self, repo: _Repo, body: bytes) -> None:
        hub = self.server.hub
        ctype = (self.headers.get("Content-Type") or "").lower()
        if "json" in ctype:
            data = json.loads(body or b"{}")
            paths = data.get("paths", [])
            paths = [paths] if isinstance(paths, str) else list(paths)
            expand = bool(data.get("expand", False))
        else:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths = form.get("paths", []) + form.get("paths[]", [])
            expand = self._bool(form, "expand")
        files = repo.files()
        file_set = set(files)
        dirs = repo.dirs(files)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in file_set:
                out.append(hub._entry(repo, p, is_dir=False, expand=expand))
            elif p in dirs:
                out.append(hub._entry(repo, p, is_dir=True, expand=expand))
        self._send_json(out)

    # -- file content -------------------------------------------------------------------------------

    def _resolve(self, method: str, repo: _Repo, rest: str) -> None:
        hub = self.server.hub
        raw_rev, _, raw_file = rest.partition("/")
        hub._check_gated(repo, self.headers.get("Authorization"))
        sha = self._revision(repo, raw_rev)
        rel = unquote(raw_file)
        local = repo.local_path(rel)
        if local is None:
            raise _HubError(404, "EntryNotFound", "Entry not found", extra={"X-Repo-Commit": sha})
        meta = hub._file_meta(local, rel)
        size = meta.size
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{meta.etag}"',
            "X-Repo-Commit": sha,
        }
        start, end = 0, size - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header is not None:
            parsed = _parse_range(range_header, size)
            if parsed == "unsatisfiable":
                etc = {k: v for k, v in headers.items() if k != "Content-Type"}
                raise _HubError(
                    416,
                    None,
                    "Requested Range Not Satisfiable",
                    extra={**etc, "Content-Range": f"bytes */{size}"},
                )
            if parsed is not None:
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)
        headers["Content-Length"] = str(length)
        self._send(status, headers, head=True)
        if method == "HEAD" or length == 0:
            return
        try:
            for chunk in _iter_file(local, start, length):
                self.wfile.write(chunk)
                hub._count(len(chunk))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            # Client stopped reading (e.g. closed a streaming response early): drop the connection.
            self.close_connection = True


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """(start, end) inclusive, "unsatisfiable", or None to ignore the header (malformed / multi-range)."""
    if "," in header:
        return None
    m = _RANGE_RE.match(header)
    if not m:
        return None
    a, b = m.groups()
    if a == "" and b == "":
        return None
    if a == "":  # suffix range: last n bytes
        n = int(b)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(a)
    if b != "" and int(b) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    end = size - 1 if b == "" else min(int(b), size - 1)
    return start, end


class FakeHub:
    """A local hub serving repos from folders on disk (see the module docstring for routes and errors).

    Args:
        repos: repo id ("org/name") -> folder whose files are the repo's files at revision "main".
        gated: repo ids whose file content needs ``Authorization: Bearer <token>``.
        token: the token that opens gated repos (None: any bearer token does).
    """

    socket_timeout: float = 30.0
    tree_page_size: int = 1000

    def __init__(
        self,
        repos: Mapping[str, str | os.PathLike[str]] | None = None,
        gated: set[str] | frozenset[str] = frozenset(),
        token: str | None = None,
    ):
        self.token = token
        self.bytes_served = 0
        self.requests: list[tuple[str, str, str | None]] = []
        self.endpoint: str | None = None
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self._meta_cache: dict[tuple[str, int, int], _FileMeta] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.created: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.branches: dict[tuple[str, str], Path] = {}
        self.lfs_objects: dict[str, Path] = {}
        self._uploads: Path | None = None
        unknown = set(gated) - set(repos or {})
        if unknown:
            raise ValueError(f"gated repos not in repos: {sorted(unknown)}")
        for repo_id, folder in (repos or {}).items():
            self.add_repo(repo_id, folder, gated=repo_id in gated)

    # -- configuration --------------------------------------------------------------------------------

    def add_repo(
        self, repo_id: str, folder: str | os.PathLike[str], gated: bool = False, sha: str | None = None
    ) -> str:
        """Serve `folder` as model repo `repo_id`; returns its commit sha (sha1 of the repo id by default).

        Pass a new `sha` when a test changes the files of a repo that a client has already cached.
        """
        root = Path(folder)
        if not root.is_dir():
            raise ValueError(f"{root} is not a directory")
        if not repo_id or repo_id.startswith("/") or repo_id.endswith("/") or repo_id.count("/") > 1:
            raise ValueError(f"invalid repo id {repo_id!r}")
        sha = sha or hashlib.sha1(repo_id.encode()).hexdigest()
        if not re.fullmatch(r"[0-9a-f]{40}", sha):
            raise ValueError(f"sha must be 40 lowercase hex digits, got {sha!r}")
        with self._lock:
            self._repos[repo_id] = _Repo(repo_id, root.resolve(), gated, sha)
        return sha

    def commit_sha(self, repo_id: str) -> str:
        return self._repos[repo_id].sha

    @property
    def repos(self) -> dict[str, Path]:
        return {rid: r.root for rid, r in self._repos.items()}

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> str:
        """Start serving on 127.0.0.1:<free port> in a daemon thread; returns "http://127.0.0.1:PORT"."""
        if self._server is not None:
            raise RuntimeError("FakeHub already started")
        self._server = _Server(self)
        port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="FakeHub", daemon=True
        )
        self._thread.start()
        return self.endpoint

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close open connections, join threads (each join bounded by `timeout`)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.close_all_connections(timeout)
        server.server_close()
        if thread is not None:
            thread.join(timeout)
        if self._uploads is not None:
            shutil.rmtree(self._uploads, ignore_errors=True)
            self._uploads = None

    def __enter__(self) -> FakeHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- counters -----------------------------------------------------------------------------------

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_served = 0
            self.requests.clear()

    def _log(self, method: str, path: str, range_header: str | None) -> None:
        with self._lock:
            self.requests.append((method, path, range_header))

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_served += n

    # -- internals used by the handler ----------------------------------------------------------------

    def _upload_root(self) -> Path:
        """Where created repos, branches and LFS objects live (a temporary folder, made on first use)."""
        if self._uploads is None:
            self._uploads = Path(tempfile.mkdtemp(prefix="fakehub-uploads-"))
        return self._uploads

    def _branch_folder(self, repo: _Repo, rev: str) -> Path:
        if rev in ("main", "refs/heads/main", repo.sha):
            return repo.root
        with self._lock:
            folder = self.branches.get((repo.repo_id, rev))
        if folder is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return folder

    def _match_repo(self, rest: str) -> tuple[_Repo | None, str]:
        """Split "org/name/sub/..." into (repo, "sub/...") by the longest registered repo id."""
        with self._lock:
            repos = sorted(self._repos.values(), key=lambda r: -len(r.repo_id))
        for repo in repos:
            if rest == repo.repo_id:
                return repo, ""
            if rest.startswith(repo.repo_id + "/"):
                return repo, rest[len(repo.repo_id) + 1 :]
        return None, rest

    def _check_gated(self, repo: _Repo, authorization: str | None) -> None:
        if not repo.gated:
            return
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise _HubError(
                401,
                "GatedRepo",
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in.",
            )
        if self.token is not None and presented.strip() != self.token:
            raise _HubError(
                403,
                "GatedRepo",
                f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
                f"Visit {self.endpoint}/{repo.repo_id} to ask for access.",
            )

    def _file_meta(self, local: Path, rel: str) -> _FileMeta:
        st = local.stat()
        key = (str(local), st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._meta_cache.get(key)
        if cached is not None:
            return cached
        size = st.st_size
        if _is_lfs(rel, size):
            h = hashlib.sha256()
            for chunk in _iter_file(local):
                h.update(chunk)
            sha256 = h.hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
            meta = _FileMeta(size, _git_blob_sha1(iter([pointer]), len(pointer)), sha256, sha256, len(pointer))
        else:
            blob = _git_blob_sha1(_iter_file(local), size)
            meta = _FileMeta(size, blob, blob, None, None)
        with self._lock:
            self._meta_cache[key] = meta
        return meta

    def _entry(self, repo: _Repo, rel: str, *, is_dir: bool, expand: bool) -> dict[str, Any]:
        if is_dir:
            oid = hashlib.sha1(f"tree {repo.sha} {rel}".encode()).hexdigest()
            entry: dict[str, Any] = {"type": "directory", "oid": oid, "size": 0, "path": rel}
        else:
            local = repo.local_path(rel)
            assert local is not None
            meta = self._file_meta(local, rel)
            entry = {"type": "file", "oid": meta.blob_id, "size": meta.size, "path": rel}
            if meta.lfs_sha256 is not None:
                entry["lfs"] = {"oid": meta.lfs_sha256, "size": meta.size, "pointerSize": meta.pointer_size}
        if expand:
            entry["lastCommit"] = {"id": repo.sha, "title": "Initial commit", "date": FAKE_DATE}
        return entry

    def _model_info(self, repo: _Repo, *, blobs: bool) -> dict[str, Any]:
        files = repo.files()
        siblings = []
        total_size = 0
        params: dict[str, int] = {}
        for rel in files:
            sib: dict[str, Any] = {"rfilename": rel}
            local = repo.local_path(rel)
            if local is None:
                continue
            if blobs:
                meta = self._file_meta(local, rel)
                sib.update(size=meta.size, blobId=meta.blob_id)
                if meta.lfs_sha256 is not None:
                    sib["lfs"] = {"sha256": meta.lfs_sha256, "size": meta.size, "pointerSize": meta.pointer_size}
            total_size += local.stat().st_size
            if rel.endswith(".safetensors"):
                for dtype, n in _safetensors_param_counts(local).items():
                    params[dtype] = params.get(dtype, 0) + n
            siblings.append(sib)
        org, _, _ = repo.repo_id.rpartition("/")
        info: dict[str, Any] = {
            "_id": repo.sha[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": org or None,
            "sha": repo.sha,
            "lastModified": FAKE_DATE,
            "createdAt": FAKE_DATE,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": total_size,
        }
        config_path = repo.local_path("config.json")
        if config_path is not None:
            try:
                config = json.loads(config_path.read_text())
                info["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
            except (OSError, ValueError):
                pass
        if params:
            info["safetensors"] = {"parameters": params, "total": sum(params.values())}
        return info


# --------------------------------------------------------------------------------------------------
# Pointing huggingface_hub at a FakeHub
# --------------------------------------------------------------------------------------------------

# Variables that would override or leak into the configuration below; removed from the environment.
_ENV_TO_DROP = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_OIDC_RESOURCE",
    "HF_OIDC_ID_TOKEN",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HUGGINGFACE_CO_STAGING",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    "HF_HUB_ENABLE_HF_TRANSFER",
    "HF_XET_HIGH_PERFORMANCE",
    "TRANSFORMERS_CACHE",
)


def hub_env(endpoint: str, hf_home: str | os.PathLike[str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a *subprocess* that must use the fake hub at `endpoint` with cache under `hf_home`."""
    env = dict(os.environ if base is None else base)
    for name in _ENV_TO_DROP:
        env.pop(name, None)
    env.update(_env_updates(endpoint, hf_home, env))
    return env


def _env_updates(endpoint: str, hf_home: str | os.PathLike[str], current: Mapping[str, str]) -> dict[str, str]:
    no_proxy = ",".join(x for x in (current.get("NO_PROXY") or current.get("no_proxy"), "127.0.0.1,localhost") if x)
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


def configure_hf_env(monkeypatch: Any, endpoint: str, hf_home: str | os.PathLike[str]) -> None:
    """Point huggingface_hub, in this process and in subprocesses, at `endpoint` with its cache in `hf_home`.

    `monkeypatch` is pytest's fixture: everything is restored at the end of the test.
    """
    from huggingface_hub import constants

    for name in _ENV_TO_DROP:
        monkeypatch.delenv(name, raising=False)
    for name, value in _env_updates(endpoint, hf_home, os.environ).items():
        monkeypatch.setenv(name, value)

    home = str(hf_home)
    endpoint = endpoint.rstrip("/")
    hub_cache = os.path.join(home, "hub")
    assets_cache = os.path.join(home, "assets")
    token_path = os.path.join(home, "token")
    values: dict[str, Any] = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": home,
        "default_cache_path": hub_cache,
        "default_assets_cache_path": assets_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HUGGINGFACE_ASSETS_CACHE": assets_cache,
        "HF_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": assets_cache,
        "HF_TOKEN_PATH": token_path,
        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": os.path.join(home, ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": os.path.join(home, ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": os.path.join(home, ".agent_harnesses.json"),
        "default_xet_cache_path": os.path.join(home, "xet"),
        "HF_XET_CACHE": os.path.join(home, "xet"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "_staging_mode": False,
    }
    if hasattr(constants, "HF_URL_HOSTS"):
        values["HF_URL_HOSTS"] = frozenset(constants.HF_URL_HOSTS | {urlsplit(endpoint).hostname})
    for name, value in values.items():
        if hasattr(constants, name):  # names differ across huggingface_hub versions
            monkeypatch.setattr(constants, name, value)


def set_hf_offline(monkeypatch: Any, offline: bool = True) -> None:
    """Switch huggingface_hub offline mode (HF_HUB_OFFLINE) for this process and its subprocesses."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _clear_hffs_instances() -> None:
    try:
        from huggingface_hub import HfFileSystem
    except ImportError:  # pragma: no cover
        return
    HfFileSystem.clear_instance_cache()


try:
    import pytest
except ImportError:  # pragma: no cover - the helper is usable without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def fake_hub(tmp_path_factory: Any, monkeypatch: Any) -> Iterator[tuple[FakeHub, str]]:
        """A started, empty FakeHub (token=FAKE_TOKEN) with huggingface_hub pointed at it.

        Yields (hub, endpoint); add repos with ``hub.add_repo(...)``. HF_HOME is a fresh temporary folder
        (``os.environ["HF_HOME"]``), so every test starts with an empty cache and no saved token.
        """
        hub = FakeHub(token=FAKE_TOKEN)
        endpoint = hub.start()
        try:
            configure_hf_env(monkeypatch, endpoint, tmp_path_factory.mktemp("hf_home"))
            _clear_hffs_instances()
            yield hub, endpoint
        finally:
            _clear_hffs_instances()
            hub.stop()


# --------------------------------------------------------------------------------------------------
# A tiny repo to serve
# --------------------------------------------------------------------------------------------------


def make_tiny_model_repo(
    folder: str | os.PathLike[str],
    *,
    single: bool = True,
    sharded: bool = True,
    hidden: int = 16,
    big_rows: int = 4096,
) -> Path:
    """Write a tiny Llama-like repo into `folder` and return it: config.json, plus
    model.safetensors (if `single`: a `big_rows` x `hidden` float32 embedding, a norm and a q_proj) and/or
    the same tensors as 2 shards model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json
    (if `sharded`). With the defaults each copy is ~256 KiB, big enough that reading a header by ranges
    costs far less than the file. Needs numpy and safetensors (imported lazily).
    """
    import numpy as np
    from safetensors.numpy import save_file

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": big_rows,
        "num_hidden_layers": 1,
        "torch_dtype": "float32",
    }
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    rng = np.random.default_rng(0)
    embed = rng.standard_normal((big_rows, hidden), dtype=np.float32)
    norm = np.ones((hidden,), dtype=np.float32)
    q = rng.standard_normal((hidden, hidden), dtype=np.float32)
    if single:
        tensors = {
            "model.embed_tokens.weight": embed,
            "model.norm.weight": norm,
            "model.layers.0.self_attn.q_proj.weight": q,
        }
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    if not sharded:
        return root
    shards = {
        "model-00001-of-00002.safetensors": {"model.embed_tokens.weight": embed},
        "model-00002-of-00002.safetensors": {
            "model.norm.weight": norm,
            "model.layers.0.self_attn.q_proj.weight": q,
        },
    }
    weight_map = {}
    total = 0
    for name, tensors in shards.items():
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        for key, arr in tensors.items():
            weight_map[key] = name
            total += arr.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return root
