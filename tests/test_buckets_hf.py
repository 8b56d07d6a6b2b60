"""HF folders in gs:// and s3:// (maxtext-to-hf --out, hf-to-maxtext / inspect from a bucket) against the
emulators on 127.0.0.1 (fake-gcs-server, moto server)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from ckpt_cli.io import object_upload
from ckpt_cli.io.bucket import list_keys, open_store
from ckpt_cli.io.location import BucketURL, location
from ckpt_cli.io.outdir import PARTIAL_MARKER
from ckpt_cli.io.safetensors import read_header
from tests import bucket_servers
from tests.cli_helpers import error_line, run

gcs_emulator, s3_emulator, emulator = bucket_servers.gcs_emulator, bucket_servers.s3_emulator, bucket_servers.emulator

_buckets = iter(f"ckpt-hf-{i}" for i in range(10**6))
SHARD = "40KB"      # several shards from the tiny model


@pytest.fixture(scope="session")
def local_mt(hf_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("local-mt") / "mt"
    result = run("convert", "hf-to-maxtext", hf_models("qwen3"), "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def local_hf(local_mt, tmp_path_factory):
    """The local maxtext-to-hf output: what every bucket folder must hold, tensor for tensor."""
    out = tmp_path_factory.mktemp("local-hf") / "hf"
    result = run("convert", "maxtext-to-hf", local_mt, "--out", out, "--shard-size", SHARD, "--quiet")
    assert result.exit_code == 0, result.output
    return out


def download(url: BucketURL, dest):
    """Every object under the prefix, copied into a local folder (for checking only)."""
    store = open_store(url)
    dest.mkdir(parents=True, exist_ok=True)
    for key in list_keys(url):
        (dest / key).write_bytes(bytes(store.read(key).result().value))
    return dest


def tensors(folder) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_folder(got, expected):
    """The same tensors (bit for bit), the same config and side files; the index maps every tensor to its shard."""
    a, b = tensors(got), tensors(expected)
    assert sorted(a) == sorted(b) and a
    for name in b:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for name in ("config.json", "generation_config.json"):
        if (expected / name).exists():
            assert (got / name).read_bytes() == (expected / name).read_bytes(), name
    index = json.loads((got / "model.safetensors.index.json").read_text())
    for name, shard in index["weight_map"].items():
        assert name in read_header(got / shard), (name, shard)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in a.values())


def test_maxtext_to_hf_into_bucket(emulator, local_mt, local_hf, tmp_path, monkeypatch):
    """Shards streamed into the bucket: the same tensors as the local folder, nothing written locally, no
    marker or progress record left; transformers' layout (index + shards + config)."""
    monkeypatch.chdir(tmp_path)
    url = f"{emulator.make_bucket(next(_buckets))}/hf/qwen3"
    result = run("convert", "maxtext-to-hf", local_mt, "--out", url, "--shard-size", SHARD, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["out"] == url
    # shards laid out in write order: at most one write is held ahead of an upload (the memory bound)
    assert 0 < record["stats"]["max_buffered_bytes"] <= max(v.nbytes for v in tensors(local_hf).values())
    assert list(tmp_path.iterdir()) == []
    dest = location(url, "--out", buckets=True)
    keys = list_keys(dest)
    assert PARTIAL_MARKER not in keys and ".ckpt-progress.json" not in keys
    assert sum(k.endswith(".safetensors") for k in keys) >= sum(1 for _ in local_hf.glob("*.safetensors")) > 1
    assert_same_folder(download(dest, tmp_path.parent / f"{tmp_path.name}-dl"), local_hf)


def test_stream_layout():
    """Shards in write order, `lanes` filled side by side, none over the size but a lone larger tensor."""
    from ckpt_cli.io.bucket_hf import stream_layout
    from ckpt_cli.io.safetensors import PlannedTensor

    sizes = [10, 10, 10, 10, 10, 10, 50, 10, 10, 10]        # float32 elements: 40 bytes, a 200-byte one
    ts = [PlannedTensor(f"t{i}", np.float32, (n,)) for i, n in enumerate(sizes)]
    one = stream_layout(ts, 100, 1)
    assert [[t.name for t in s] for s in one] == [["t0", "t1"], ["t2", "t3"], ["t6"], ["t4", "t5"], ["t7", "t8"],
                                                  ["t9"]]
    four = stream_layout(ts, 100, 4)
    assert [[t.name for t in s] for s in four] == [["t6"], ["t0", "t4"], ["t1", "t5"], ["t2", "t7"], ["t3", "t8"],
                                                   ["t9"]]
    for layout in (one, four):
        assert sorted(t.name for s in layout for t in s) == sorted(t.name for t in ts)
        assert all(sum(t.nbytes for t in s) <= 100 or len(s) == 1 for s in layout)
        assert all([int(t.name[1:]) for t in s] == sorted(int(t.name[1:]) for t in s) for s in layout)


def test_object_upload_in_parts(emulator, monkeypatch):
    """An object larger than a part goes up in several parts (S3 multipart, GCS resumable chunks) and appears
    whole only when closed; an aborted upload leaves nothing."""
    monkeypatch.setattr(object_upload, "PART_BYTES", 5 << 20)     # S3's smallest part; a GCS chunk multiple
    url = location(f"{emulator.make_bucket(next(_buckets))}/big", "--out", buckets=True)
    data = np.random.default_rng(0).integers(0, 255, (11 << 20) + 12345, dtype=np.uint8)
    up = object_upload.ObjectUpload(url / "obj")
    for piece in np.array_split(data, 7):
        up.write(piece)
    assert list_keys(url) == []                  # not visible before completion
    up.close()
    assert len(up.parts) == 3
    assert bytes(open_store(url).read("obj").result().value) == data.tobytes()
    up = object_upload.ObjectUpload(url / "gone")
    up.write(data[: 6 << 20])
    up.abort()
    assert list_keys(url) == ["obj"]


def test_maxtext_to_hf_bucket_refusals(emulator, local_mt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bucket = emulator.make_bucket(next(_buckets))
    open_store(location(bucket, "--out", buckets=True)).write("taken/notes.txt", b"mine").result()
    missing = f"{emulator.scheme}://no-such-bucket-{next(_buckets)}/x"
    for args, code, why in (([missing], 3, "does not exist"),
                            ([f"{bucket}/taken"], 3, "exists and is not empty (notes.txt)"),
                            ([f"{bucket}/y", "--overwrite"], 2, "does not replace a folder in a bucket"),
                            ([bucket], 3, "not the bucket itself")):
        result = run("convert", "maxtext-to-hf", local_mt, "--out", *args)
        assert result.exit_code == code and why in error_line(result), (args, result.output)
    assert list_keys(location(bucket, "--out", buckets=True)) == ["taken/notes.txt"]
    assert list(tmp_path.iterdir()) == []


def test_interrupted_bucket_export_resumed(emulator, local_mt, local_hf, tmp_path, monkeypatch):
    """Ctrl-C after two shards: the complete shards and the progress record stay (no folder: no config.json);
    the same command with --resume uploads only the other shards, and the folder equals an uninterrupted one."""
    monkeypatch.chdir(tmp_path)
    url = f"{emulator.make_bucket(next(_buckets))}/hf"
    dest = location(url, "--out", buckets=True)
    real_close = object_upload.ObjectUpload.close
    closed: list[str] = []

    def close(self):
        if len(closed) == 2:
            raise KeyboardInterrupt
        real_close(self)
        closed.append(self.url.name)

    monkeypatch.setattr(object_upload.ObjectUpload, "close", close)
    result = run("convert", "maxtext-to-hf", local_mt, "--out", url, "--shard-size", SHARD)
    assert result.exit_code == 130 and "--resume" in result.stderr, result.output
    keys = list_keys(dest)
    assert sorted(k for k in keys if k.endswith(".safetensors")) == sorted(closed)
    assert PARTIAL_MARKER in keys and ".ckpt-progress.json" in keys and "config.json" not in keys
    monkeypatch.setattr(object_upload.ObjectUpload, "close", real_close)
    started: list[str] = []
    real_init = object_upload.ObjectUpload.__init__

    def init(self, url, *args, **kwargs):
        started.append(url.name)
        real_init(self, url, *args, **kwargs)

    monkeypatch.setattr(object_upload.ObjectUpload, "__init__", init)
    result = run("convert", "maxtext-to-hf", local_mt, "--out", url, "--shard-size", SHARD, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming: 2 of" in result.stderr
    assert not set(started) & set(closed) and started
    assert PARTIAL_MARKER not in list_keys(dest)
    assert_same_folder(download(dest, tmp_path.parent / f"{tmp_path.name}-dl"), local_hf)


def upload_folder(folder, url: str) -> BucketURL:
    """A local HF folder copied into the bucket object by object (as a user mirrors a hub model)."""
    dest = location(url, "--out", buckets=True)
    store = open_store(dest)
    for f in sorted(folder.iterdir()):
        if f.is_file():
            store.write(f.name, f.read_bytes()).result()
    return dest


def test_hf_folder_in_bucket_as_source(emulator, hf_models, local_mt, tmp_path):
    """hf-to-maxtext, inspect and plan read an HF folder in the bucket in place: the same checkpoint, tree and
    plan as from the local folder; the bytes fetched are the headers and tensors, never whole files twice."""
    src = hf_models("qwen3", sharded=True)
    url = upload_folder(src, f"{emulator.make_bucket(next(_buckets))}/hub/qwen3")
    out = tmp_path / "mt"
    result = run("convert", "hf-to-maxtext", str(url), "--out", out, "--json")
    assert result.exit_code == 0, result.output
    from ckpt_cli.io.orbax import OrbaxCheckpoint

    got, expected = OrbaxCheckpoint(out), OrbaxCheckpoint(local_mt)
    assert sorted(got.paths) == sorted(expected.paths)
    for path in expected.paths:
        np.testing.assert_array_equal(got.array(path).read().result(), expected.array(path).read().result(), path)
    assert got.provenance["source"] == str(url) and got.provenance["hf_config"] == expected.provenance["hf_config"]
    remote = json.loads(run("inspect", str(url), "--json").stdout)
    local = json.loads(run("inspect", src, "--json").stdout)
    assert remote["kind"] == "hf-bucket" and remote["tensors"] == local["tensors"] and remote["family"] == "qwen3"
    assert 0 < remote["fetched"]["bytes"] < 64 * 1024          # config, index, headers: no tensor data
    human = run("inspect", str(url))
    assert human.exit_code == 0 and "Hugging Face folder in a bucket" in human.stdout
    plans = [json.loads(run("plan", "hf-to-maxtext", s, "--out", tmp_path / "p", "--read-gbps", "1",
                            "--write-gbps", "1", "--json").stdout) for s in (str(url), src)]
    assert plans[0]["source_kind"] == "bucket" and plans[0]["go"] is True
    for key in ("tensors", "tasks", "parameters"):
        assert plans[0][key] == plans[1][key], key
    assert plans[0]["bytes"]["read"] == plans[1]["bytes"]["read"] > 0
    result = run("convert", "hf-to-maxtext", str(url), "--out", tmp_path / "t", "--load-method", "transformers")
    assert result.exit_code == 2 and "reads a local folder" in error_line(result), result.output


def test_bucket_tensor_reads_are_ranged(emulator, hf_models, monkeypatch):
    """A tensor (or a row range of it) is fetched as exactly its bytes; a large one as several ranges at once."""
    from ckpt_cli.io import bucket_safetensors
    from ckpt_cli.io.safetensors import SafetensorsFolder

    src = hf_models("qwen3")
    url = upload_folder(src, f"{emulator.make_bucket(next(_buckets))}/m")
    local = SafetensorsFolder(src)
    folder = bucket_safetensors.BucketSafetensorsFolder(url)
    name = "model.embed_tokens.weight"
    info = folder.info(name)
    before = folder.bytes_fetched
    np.testing.assert_array_equal(folder.read(name, (3, 7)), local.read(name, (3, 7)))
    row = info.nbytes // info.shape[0]
    assert folder.bytes_fetched - before == 4 * row
    monkeypatch.setattr(bucket_safetensors, "RANGE_BYTES", 1000)
    requests = folder.requests
    np.testing.assert_array_equal(folder.read(name), local.read(name))
    assert folder.requests - requests == -(-info.nbytes // 1000)


def test_failed_upload_keeps_complete_shards(emulator, local_mt, tmp_path, monkeypatch):
    """A request that fails for good after two shards: one line (exit 3) saying what was kept and how to finish;
    the complete shards and the record stay, the open upload is dropped."""
    from ckpt_cli.errors import OutputError

    monkeypatch.chdir(tmp_path)
    url = f"{emulator.make_bucket(next(_buckets))}/hf"
    real_close = object_upload.ObjectUpload.close
    closed: list[str] = []

    def close(self):
        if len(closed) == 2:
            raise OutputError(f"{self.url}: uploading {self.url.name} failed (HTTP 503: unavailable)")
        real_close(self)
        closed.append(self.url.name)

    monkeypatch.setattr(object_upload.ObjectUpload, "close", close)
    result = run("convert", "maxtext-to-hf", local_mt, "--out", url, "--shard-size", SHARD, "--quiet")
    line = error_line(result)
    assert result.exit_code == 3 and "HTTP 503" in line and f"progress kept in {url}" in line and "--resume" in line
    keys = list_keys(location(url, "--out", buckets=True))
    assert sorted(k for k in keys if k.endswith(".safetensors")) == sorted(closed)
    assert PARTIAL_MARKER in keys and "config.json" not in keys
