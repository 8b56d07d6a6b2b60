"""Tests of tests/hub_server.py (FakeHub) driven by the real huggingface_hub client."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

try:
    from tests.hub_server import (
        FAKE_TOKEN,
        FakeHub,
        fake_hub,  # noqa: F401 - pytest fixture
        hub_env,
        make_tiny_model_repo,
        set_hf_offline,
    )
except ImportError:  # tests/ is not a package and the rootdir is not on sys.path
    from hub_server import (  # type: ignore[no-redef]
        FAKE_TOKEN,
        FakeHub,
        fake_hub,  # noqa: F401 - pytest fixture
        hub_env,
        make_tiny_model_repo,
        set_hf_offline,
    )

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import HfApi, HfFileSystem, constants, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

REPO = "tiny-org/tiny-llama"
SHARDED = "tiny-org/tiny-sharded"
GATED = "gated-org/gated-llama"


@pytest.fixture
def hub(fake_hub, tmp_path_factory):  # noqa: F811 - uses the imported fixture
    """The fake hub with three repos: full (single + sharded files), sharded only, gated."""
    hub, endpoint = fake_hub
    base = tmp_path_factory.mktemp("repos")
    hub.add_repo(REPO, make_tiny_model_repo(base / "full"))
    hub.add_repo(SHARDED, make_tiny_model_repo(base / "sharded", single=False))
    hub.add_repo(GATED, make_tiny_model_repo(base / "gated", sharded=False), gated=True)
    return hub


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy


def _raw(hub: FakeHub, path: str, method: str = "GET", headers: dict | None = None):
    req = urllib.request.Request(hub.endpoint + path, method=method, headers=headers or {})
    try:
        with _opener().open(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# --------------------------------------------------------------------------------------------------


def test_env_points_at_fake_hub(fake_hub, tmp_path):  # noqa: F811
    hub, endpoint = fake_hub
    assert endpoint.startswith("http://127.0.0.1:")
    assert constants.ENDPOINT == endpoint == os.environ["HF_ENDPOINT"]
    assert constants.HF_HUB_CACHE == os.path.join(os.environ["HF_HOME"], "hub")
    assert HfApi().endpoint == endpoint
    assert huggingface_hub.hf_hub_url("a/b", "c.json") == f"{endpoint}/a/b/resolve/main/c.json"
    assert not huggingface_hub.is_offline_mode()


def test_model_info_and_listing(hub):
    api = HfApi()
    info = api.model_info(REPO)
    assert info.id == REPO
    assert info.sha == hub.commit_sha(REPO) and len(info.sha) == 40
    names = sorted(s.rfilename for s in info.siblings)
    assert names == sorted(p.name for p in hub.repos[REPO].iterdir())
    assert info.config["model_type"] == "llama"
    # 4096*16 embed + 16 norm + 16*16 q, counted once per file (single + 2 shards)
    assert info.safetensors.parameters == {"F32": 2 * (4096 * 16 + 16 + 256)}
    assert not info.gated

    info = api.model_info(REPO, revision="main", files_metadata=True)
    by_name = {s.rfilename: s for s in info.siblings}
    local = hub.repos[REPO] / "model.safetensors"
    assert by_name["model.safetensors"].size == local.stat().st_size
    assert by_name["model.safetensors"].lfs is not None
    assert by_name["model.safetensors"].lfs.size == local.stat().st_size
    assert by_name["config.json"].lfs is None and by_name["config.json"].blob_id

    # revision given as the commit sha works too
    assert api.model_info(REPO, revision=info.sha).sha == info.sha

    files = api.list_repo_files(REPO)
    assert files == sorted(names)
    assert api.file_exists(REPO, "config.json")
    assert not api.file_exists(REPO, "nope.json")
    assert api.repo_exists(REPO) and not api.repo_exists("tiny-org/missing")

    paths = api.get_paths_info(REPO, ["config.json", "model.safetensors", "missing.bin"])
    assert [p.path for p in paths] == ["config.json", "model.safetensors"]
    assert paths[1].lfs is not None and paths[1].size == local.stat().st_size

    refs = api.list_repo_refs(REPO)
    assert refs.branches[0].target_commit == info.sha
    assert api.list_repo_commits(REPO)[0].commit_id == info.sha


def test_tree_pagination_and_subfolders(fake_hub, tmp_path):  # noqa: F811
    hub, _ = fake_hub
    root = tmp_path / "many"
    (root / "sub" / "deep").mkdir(parents=True)
    for i in range(7):
        (root / f"f{i}.txt").write_text(str(i))
    (root / "sub" / "a.txt").write_text("a")
    (root / "sub" / "deep" / "b.txt").write_text("b")
    hub.add_repo("org/many", root)
    hub.tree_page_size = 3
    api = HfApi()
    hub.reset_counters()
    files = api.list_repo_files("org/many")
    assert files == sorted([f"f{i}.txt" for i in range(7)] + ["sub/a.txt", "sub/deep/b.txt"])
    tree_gets = [r for r in hub.requests if "/tree/" in r[1]]
    assert len(tree_gets) == 4  # 11 entries (9 files + 2 folders), 3 a page
    top = list(api.list_repo_tree("org/many", path_in_repo="sub"))
    assert sorted((type(e).__name__, e.path) for e in top) == [("RepoFile", "sub/a.txt"), ("RepoFolder", "sub/deep")]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("org/many", path_in_repo="nope"))
    fs = HfFileSystem()
    assert sorted(fs.ls("org/many/sub", detail=False)) == ["org/many/sub/a.txt", "org/many/sub/deep"]
    assert fs.cat("org/many/sub/deep/b.txt") == b"b"
    assert len(fs.find("org/many")) == 9


def test_hf_hub_download_bytes_equal(hub, tmp_path):
    for name in ("config.json", "model.safetensors", "model.safetensors.index.json"):
        path = hf_hub_download(REPO, name)
        assert Path(path).read_bytes() == (hub.repos[REPO] / name).read_bytes()
        assert f"snapshots{os.sep}{hub.commit_sha(REPO)}" in path
    # The plain HTTP path: HEAD then one whole-file GET, no xet.
    hub.reset_counters()
    path = hf_hub_download(REPO, "model-00002-of-00002.safetensors")
    assert [(m, p.rsplit("/", 1)[-1], r) for m, p, r in hub.requests] == [
        ("HEAD", "model-00002-of-00002.safetensors", None),
        ("GET", "model-00002-of-00002.safetensors", None),
    ]
    assert hub.bytes_served == Path(path).stat().st_size
    # local_dir download
    out = hf_hub_download(REPO, "config.json", local_dir=tmp_path / "local")
    assert Path(out).read_bytes() == (hub.repos[REPO] / "config.json").read_bytes()


def test_snapshot_download_allow_patterns(hub, tmp_path):
    hub.reset_counters()
    folder = Path(snapshot_download(SHARDED, allow_patterns=["*.json", "model-00001-*"]))
    got = sorted(p.name for p in folder.iterdir())
    assert got == ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    for name in got:
        assert (folder / name).read_bytes() == (hub.repos[SHARDED] / name).read_bytes()
    assert not any("model-00002" in p for _, p, _ in hub.requests)

    folder2 = Path(snapshot_download(REPO, local_dir=tmp_path / "snap", allow_patterns="*.safetensors"))
    assert sorted(p.name for p in folder2.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors",
    ]


def test_hffs_ranged_header_read(hub):
    local = hub.repos[REPO] / "model.safetensors"
    size = local.stat().st_size
    raw = local.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    fs = HfFileSystem()
    hub.reset_counters()
    with fs.open(f"{REPO}/model.safetensors", "rb", block_size=1024) as f:
        head = f.read(8)
        (header_len,) = struct.unpack("<Q", head)
        header = json.loads(f.read(header_len))
        f.seek(size - 16)
        tail = f.read(16)
    assert header_len == n
    assert header["model.norm.weight"]["dtype"] == "F32"
    assert tail == raw[-16:]
    ranged = [r for m, p, r in hub.requests if m == "GET" and "/resolve/" in p]
    assert ranged and all(r is not None and r.startswith("bytes=") for r in ranged)
    assert 8 + n <= hub.bytes_served < size // 10


def test_get_safetensors_metadata_sharded(hub):
    hub.reset_counters()
    meta = HfApi().get_safetensors_metadata(SHARDED)
    assert meta.sharded
    assert meta.weight_map["model.norm.weight"] == "model-00002-of-00002.safetensors"
    assert meta.parameter_count == {"F32": 4096 * 16 + 16 + 256}
    ranges = sorted(r for m, p, r in hub.requests if m == "GET" and p.endswith(".safetensors"))
    assert ranges == ["bytes=0-100000", "bytes=0-100000"]


@pytest.mark.parametrize(
    ("range_header", "status", "content_range", "piece"),
    [
        ("bytes=0-7", 206, "bytes 0-7/{size}", slice(0, 8)),
        ("bytes=10-", 206, "bytes 10-{last}/{size}", slice(10, None)),
        ("bytes=-5", 206, "bytes {tail5}-{last}/{size}", slice(-5, None)),
        ("bytes=5-999999999", 206, "bytes 5-{last}/{size}", slice(5, None)),
        ("bytes={size}-", 416, "bytes */{size}", None),
        ("bytes=0-1,4-5", 200, None, slice(None)),  # multi-range: ignored, whole file
        ("items=0-1", 200, None, slice(None)),
    ],
    ids=["a-b", "a-", "suffix", "end-past-eof", "unsatisfiable", "multi-range", "other-unit"],
)
def test_raw_ranges(hub, range_header, status, content_range, piece):
    local = hub.repos[REPO] / "config.json"
    data = local.read_bytes()
    size = len(data)
    fmt = {"size": size, "last": size - 1, "tail5": size - 5}
    code, headers, body = _raw(hub, f"/{REPO}/resolve/main/config.json", headers={"Range": range_header.format(**fmt)})
    assert code == status
    if content_range is not None:
        assert headers["Content-Range"] == content_range.format(**fmt)
    if piece is not None:
        assert body == data[piece]
        assert int(headers["Content-Length"]) == len(body)
    assert headers["X-Repo-Commit"] == hub.commit_sha(REPO)
    assert not any(k.lower().startswith("x-xet") for k in headers)


def test_head_headers(hub):
    code, headers, body = _raw(hub, f"/{REPO}/resolve/main/model.safetensors", method="HEAD")
    local = hub.repos[REPO] / "model.safetensors"
    assert code == 200 and body == b""
    assert int(headers["Content-Length"]) == local.stat().st_size
    assert headers["ETag"].strip('"') == HfApi().get_paths_info(REPO, "model.safetensors")[0].lfs.sha256
    assert headers["X-Repo-Commit"] == hub.commit_sha(REPO)
    assert headers["Accept-Ranges"] == "bytes"
    assert "Link" not in headers


def test_gated_repo(hub):
    # Metadata is public, like on the Hub.
    assert HfApi().model_info(GATED).gated == "manual"
    assert "config.json" in HfApi().list_repo_files(GATED)
    with pytest.raises(GatedRepoError) as err:
        hf_hub_download(GATED, "config.json")
    assert err.value.response.status_code == 401
    assert isinstance(err.value, RepositoryNotFoundError) and isinstance(err.value, HfHubHTTPError)
    with pytest.raises(GatedRepoError) as err:
        hf_hub_download(GATED, "config.json", token="hf_wrong_token")
    assert err.value.response.status_code == 403
    with pytest.raises(GatedRepoError):
        HfFileSystem(token=False).cat(f"{GATED}/config.json")

    path = hf_hub_download(GATED, "model.safetensors", token=FAKE_TOKEN)
    assert Path(path).read_bytes() == (hub.repos[GATED] / "model.safetensors").read_bytes()


def test_gated_repo_token_from_env(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    path = hf_hub_download(GATED, "config.json")
    assert Path(path).read_bytes() == (hub.repos[GATED] / "config.json").read_bytes()
    assert HfFileSystem().cat(f"{GATED}/config.json") == Path(path).read_bytes()


def test_offline_mode_reuses_cache(hub, monkeypatch):
    online = hf_hub_download(REPO, "config.json")
    snap = snapshot_download(SHARDED, allow_patterns="*.json")
    set_hf_offline(monkeypatch, True)
    assert huggingface_hub.is_offline_mode()
    hub.reset_counters()
    assert hf_hub_download(REPO, "config.json") == online
    assert snapshot_download(SHARDED, allow_patterns="*.json") == snap
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO, "model.safetensors")  # never downloaded
    assert hub.requests == [] and hub.bytes_served == 0
    set_hf_offline(monkeypatch, False)
    assert hf_hub_download(REPO, "model.safetensors")


def test_not_found_errors(hub):
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError) as err:
        api.model_info("tiny-org/missing")
    assert not isinstance(err.value, GatedRepoError)
    assert err.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tiny-org/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_files("tiny-org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "config.json", repo_type="dataset")
    with pytest.raises(RemoteEntryNotFoundError) as err:
        hf_hub_download(REPO, "missing.json")
    assert isinstance(err.value, EntryNotFoundError) and err.value.response.status_code == 404
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="v9")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="v9")
    with pytest.raises(FileNotFoundError):
        HfFileSystem().cat(f"{REPO}/missing.json")
    code, headers, _ = _raw(hub, f"/{REPO}/resolve/main/..%2F..%2Fetc%2Fpasswd")
    assert code == 404 and headers["X-Error-Code"] == "EntryNotFound"
    code, _, _ = _raw(hub, f"/{REPO}/resolve/main/config.json", method="DELETE")
    assert code == 405


def test_subprocess_recipe(hub, tmp_path):
    """A fresh interpreter configured only by environment variables reaches the fake hub."""
    code = (
        "import sys, huggingface_hub as h\n"
        "p = h.hf_hub_download(sys.argv[1], 'config.json')\n"
        "print(h.constants.ENDPOINT, p)\n"
    )
    env = hub_env(hub.endpoint, tmp_path / "sub_home")
    out = subprocess.run(
        [sys.executable, "-c", code, REPO], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    endpoint, path = out.stdout.split()
    assert endpoint == hub.endpoint
    assert path.startswith(str(tmp_path / "sub_home"))


def test_standalone_start_stop_is_bounded(tmp_path):
    root = make_tiny_model_repo(tmp_path / "r", sharded=False)
    hub = FakeHub({"o/r": root}, gated={"o/r"}, token="t")
    with hub:
        code, _, _ = _raw(hub, "/o/r/resolve/main/config.json")
        assert code == 401
        code, _, body = _raw(hub, "/o/r/resolve/main/config.json", headers={"Authorization": "Bearer t"})
        assert code == 200 and body == (root / "config.json").read_bytes()
        # An idle keep-alive connection must not block stop().
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", int(hub.endpoint.rsplit(":", 1)[1]), timeout=5)
        conn.request("GET", "/o/r/resolve/main/config.json", headers={"Authorization": "Bearer t"})
        conn.getresponse().read()
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 3
    conn.close()
    with pytest.raises(OSError):
        _opener().open(hub.endpoint + "/api/models/o/r", timeout=2)
