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
    assert list(tmp_path.iterdir()) == []
    dest = location(url, "--out", buckets=True)
    keys = list_keys(dest)
    assert PARTIAL_MARKER not in keys and ".ckpt-progress.json" not in keys
    assert sum(k.endswith(".safetensors") for k in keys) == sum(1 for _ in local_hf.glob("*.safetensors")) > 1
    assert_same_folder(download(dest, tmp_path.parent / f"{tmp_path.name}-dl"), local_hf)


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
