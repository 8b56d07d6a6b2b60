"""Hub repos without a full local copy, against the fake hub driven by the real huggingface_hub client:
inspect reads headers only, convert streams shards (hub cache or a --max-disk bound), offline mode uses
the cache, and hub refusals are one-line errors that never show a token."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ckpt_cli.cli.app import app
from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.io import remote_stream as stream
from ckpt_cli.io.orbax import OrbaxCheckpoint
from ckpt_cli.io.safetensors import read_header
from tests.hub_server import FAKE_TOKEN, fake_hub, set_hf_offline  # noqa: F401 (fixture)

runner = CliRunner()
REPO = "org/tiny-qwen3"


def run(*args: str):
    return runner.invoke(app, list(args))


def header_len(path: Path) -> int:
    with open(path, "rb") as fh:
        return struct.unpack("<Q", fh.read(8))[0]


def shard_gets(hub) -> list[tuple[str, str | None]]:
    """(file, Range header) of every content GET of a safetensors file."""
    return [(p.rsplit("/", 1)[-1], r) for m, p, r in hub.requests if m == "GET" and p.endswith(".safetensors")]


def same_checkpoints(a: Path, b: Path) -> None:
    ca, cb = OrbaxCheckpoint(a), OrbaxCheckpoint(b)
    assert sorted(ca.paths) == sorted(cb.paths)
    for path in ca.paths:
        x, y = ca.array(path).read().result(), cb.array(path).read().result()
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), path


@pytest.fixture
def hub(fake_hub, hf_models):  # noqa: F811
    """The fake hub serving a sharded bf16 tiny Qwen3 (several ~40 KB shards) as REPO."""
    hub, _ = fake_hub
    hub.add_repo(REPO, hf_models("qwen3", "bfloat16", sharded=True))
    return hub


def test_inspect_reads_headers_only(hub, hf_models):
    src = hf_models("qwen3", "bfloat16", sharded=True)
    shards = sorted(src.glob("*.safetensors"))
    assert len(shards) >= 3
    hub.reset_counters()
    r = run("inspect", REPO, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    # Two range reads per shard: the 8-byte length, then exactly the JSON header; nothing else of a shard.
    gets = shard_gets(hub)
    assert len(gets) == 2 * len(shards)
    for f in shards:
        n = header_len(f)
        assert sorted(rng for name, rng in gets if name == f.name) == ["bytes=0-7", f"bytes=8-{8 + n - 1}"]
    small = sum((src / name).stat().st_size for name in ("config.json", "model.safetensors.index.json"))
    headers = sum(8 + header_len(f) for f in shards)
    assert hub.bytes_served == small + headers == data["fetched"]["bytes"]
    assert hub.bytes_served < sum(f.stat().st_size for f in shards) / 5
    # The listing equals the local headers.
    local = {name: info for f in shards for name, info in read_header(f).items()}
    got = {t["name"]: t for t in data["tensors"]}
    assert set(got) == set(local)
    for name, info in local.items():
        assert got[name]["shape"] == list(info.shape) and got[name]["bytes"] == info.nbytes
        assert got[name]["shard"] == info.file.name and got[name]["dtype"] == "bfloat16"
    assert data["kind"] == "hf-remote" and data["family"] == "qwen3"
    assert data["source"]["repo_id"] == REPO and len(data["source"]["commit"]) == 40


def test_convert_from_repo_equals_local_and_reuses_cache(hub, hf_models, tmp_path):
    src = hf_models("qwen3", "bfloat16", sharded=True)
    hf_to_maxtext(str(src), tmp_path / "local", ToMaxTextOptions())
    hub.reset_counters()
    result = hf_to_maxtext(REPO, tmp_path / "remote", ToMaxTextOptions())
    same_checkpoints(tmp_path / "local", tmp_path / "remote")
    shards = sorted(f.name for f in src.glob("*.safetensors"))
    whole = [name for name, rng in shard_gets(hub) if rng is None]
    assert sorted(whole) == shards                       # every shard fetched once, whole
    assert result.stats.extra["download"]["downloaded_bytes"] == sum((src / s).stat().st_size for s in shards)
    # A second run reads the shards from the hub cache: no shard is fetched again.
    hub.reset_counters()
    again = hf_to_maxtext(REPO, tmp_path / "again", ToMaxTextOptions())
    assert [g for g in shard_gets(hub) if g[1] is None] == []
    assert again.stats.extra["download"]["downloaded_bytes"] == 0
    same_checkpoints(tmp_path / "local", tmp_path / "again")


def test_max_disk_bound_holds(hub, hf_models, tmp_path, monkeypatch):
    src = hf_models("qwen3", "bfloat16", sharded=True)
    sizes = sorted(f.stat().st_size for f in src.glob("*.safetensors"))
    bound = sizes[-1] + sizes[-2] + stream.DIR_OVERHEAD   # room for two shards at most, never three
    out = tmp_path / "mt"
    measured: list[int] = []
    download_dirs: set[Path] = set()

    def dirs() -> list[Path]:
        return list(tmp_path.glob(".ckpt-download-*"))

    original = stream.ShardStream._delete

    def delete(self, shard):  # measure the download dir just before each deletion
        measured.append(stream.tree_bytes(self.tmp))
        original(self, shard)

    monkeypatch.setattr(stream.ShardStream, "_delete", delete)
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            for d in dirs():
                download_dirs.add(d)
                measured.append(stream.tree_bytes(d))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        result = hf_to_maxtext(REPO, out, ToMaxTextOptions(max_disk=bound))
    finally:
        stop.set()
        poller.join()
    stats = result.stats.extra["download"]
    assert stats["downloaded_bytes"] == sum(sizes)
    assert 0 < stats["peak_download_disk"] <= bound
    assert measured and max(measured) <= bound < sum(sizes)
    assert download_dirs and not dirs()                   # the private directory is gone
    hf_to_maxtext(str(src), tmp_path / "local", ToMaxTextOptions())
    same_checkpoints(tmp_path / "local", out)
    # Nothing went to the hub cache.
    assert not list(Path(remote_cache()).rglob("*.safetensors"))


def remote_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def test_max_disk_too_small_is_refused_up_front(hub, hf_models, tmp_path):
    src = hf_models("qwen3", "bfloat16", sharded=True)
    largest = max(f.stat().st_size for f in src.glob("*.safetensors"))
    hub.reset_counters()
    out = tmp_path / "mt"
    r = run("convert", "hf-to-maxtext", REPO, "--out", str(out), "--max-disk", str(largest // 2))
    assert r.exit_code == 3, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --max-disk") and "largest shard" in lines[0]
    assert [g for g in shard_gets(hub) if g[1] is None] == []       # no shard was downloaded
    assert not out.exists() and not out.with_name("mt.partial").exists()
    assert not list(tmp_path.glob(".ckpt-download-*"))
    # plan says the same, as a no-go
    r = run("plan", "hf-to-maxtext", REPO, "--max-disk", str(largest // 2), "--json", "--read-gbps", "1",
            "--write-gbps", "1", "--out", str(out))
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["go"] is False and "--max-disk" in data["verdict"]


def test_offline_mode_uses_the_cache(hub, tmp_path, monkeypatch):
    hf_to_maxtext(REPO, tmp_path / "online", ToMaxTextOptions())
    set_hf_offline(monkeypatch, True)
    hub.reset_counters()
    result = hf_to_maxtext(REPO, tmp_path / "offline", ToMaxTextOptions())
    assert hub.requests == [] and hub.bytes_served == 0
    assert "download" not in result.stats.extra
    same_checkpoints(tmp_path / "online", tmp_path / "offline")
    r = run("inspect", REPO, "--json")
    assert r.exit_code == 0, r.output
    assert hub.requests == []
    # A repo never fetched cannot be used offline: one line, exit 4.
    r = run("inspect", "org/never-seen", "--json")
    assert r.exit_code == 4 and "cannot be reached" in r.stderr


def test_gated_repo_needs_a_token_and_never_prints_it(fake_hub, hf_models, tmp_path, monkeypatch):  # noqa: F811
    hub, _ = fake_hub
    hub.add_repo("org/gated", hf_models("qwen3", "bfloat16", sharded=True), gated=True)
    for args in (["inspect", "org/gated"], ["convert", "hf-to-maxtext", "org/gated", "--out", str(tmp_path / "a")],
                 ["plan", "hf-to-maxtext", "org/gated", "--read-gbps", "1", "--write-gbps", "1"]):
        r = run(*args)
        assert r.exit_code == 4, r.output
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert lines == ["error: org/gated is gated: accept its licence on the hub and set HF_TOKEN "
                         "(or run `hf auth login`)"]
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    r = run("convert", "hf-to-maxtext", "org/gated", "--out", str(tmp_path / "b"), "--json")
    assert r.exit_code == 0, r.output
    assert FAKE_TOKEN not in r.stdout + r.stderr
    assert FAKE_TOKEN not in (tmp_path / "b" / "0" / "_CHECKPOINT_METADATA").read_text()
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_for_this_test")
    shutil.rmtree(Path(remote_cache()), ignore_errors=True)
    r = run("inspect", "org/gated")
    assert r.exit_code == 4 and "hf_wrong_token_for_this_test" not in r.stdout + r.stderr


def test_revision_is_honoured(hub):
    sha = hub.commit_sha(REPO)
    r = run("inspect", REPO, "--revision", sha, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["source"]["commit"] == sha
    r = run("inspect", REPO, "--revision", "v9")
    assert r.exit_code == 4 and "revision v9 not found" in r.stderr


def test_plan_of_a_repo_reads_no_tensor_data(hub, hf_models):
    src = hf_models("qwen3", "bfloat16", sharded=True)
    hub.reset_counters()
    r = run("plan", "hf-to-maxtext", REPO, "--json", "--read-gbps", "1", "--write-gbps", "1")
    assert r.exit_code in (0, 1), r.output
    data = json.loads(r.stdout)
    assert data["source_kind"] == "remote"
    assert data["bytes"]["download"] == sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert [g for g in shard_gets(hub) if g[1] is None] == []
    assert all(rng is not None for _, rng in shard_gets(hub))


def test_cli_subprocess_against_the_fake_hub(hub, tmp_path):
    """The installed entry point, configured by environment only, inspects a repo."""
    r = subprocess.run([sys.executable, "-m", "ckpt_cli", "inspect", REPO, "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["kind"] == "hf-remote" and data["totals"]["tensors"] == 25


def test_resume_from_a_repo_downloads_only_what_is_left(hub, hf_models, tmp_path, monkeypatch):
    from ckpt_cli.errors import Interrupted
    from ckpt_cli.io import orbax as orbax_io

    src = hf_models("qwen3", "bfloat16", sharded=True)
    sizes = {f.name: f.stat().st_size for f in src.glob("*.safetensors")}
    monkeypatch.setattr(orbax_io, "BATCH_BYTES", 2048)
    monkeypatch.setattr(orbax_io, "SNAPSHOT_BYTES", 8192)
    out = tmp_path / "mt"
    total = hf_to_maxtext(str(src), tmp_path / "local", ToMaxTextOptions()).stats.tasks
    real, calls = orbax_io.OrbaxWriter.write, {"n": 0}

    def write(self, path, index, array):
        calls["n"] += 1
        if calls["n"] == total * 2 // 3:
            raise KeyboardInterrupt
        return real(self, path, index, array)

    monkeypatch.setattr(orbax_io.OrbaxWriter, "write", write)
    bound = sum(sorted(sizes.values())[-2:]) + stream.DIR_OVERHEAD
    with pytest.raises(Interrupted):
        hf_to_maxtext(REPO, out, ToMaxTextOptions(max_disk=bound))
    monkeypatch.setattr(orbax_io.OrbaxWriter, "write", real)
    result = hf_to_maxtext(REPO, out, ToMaxTextOptions(max_disk=bound, resume=True))
    assert result.stats.extra["resumed_tasks"] > 0
    assert result.stats.extra["download"]["downloaded_bytes"] < sum(sizes.values())   # finished shards skipped
    same_checkpoints(tmp_path / "local", out)
