"""gs:// and s3:// destinations against real emulators on 127.0.0.1 (fake-gcs-server, moto server)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorstore as ts

from ckpt_cli.io.bucket import list_keys, open_store
from ckpt_cli.io.location import BucketURL, location
from ckpt_cli.io.orbax import OrbaxCheckpoint, kvstore_spec, param_name
from ckpt_cli.io.outdir import PARTIAL_MARKER
from tests import bucket_servers
from tests.cli_helpers import error_line, run

gcs_emulator, s3_emulator, emulator = bucket_servers.gcs_emulator, bucket_servers.s3_emulator, bucket_servers.emulator

_buckets = iter(f"ckpt-test-{i}" for i in range(10**6))


@pytest.fixture(scope="session")
def local_mt(hf_models, tmp_path_factory):
    """The tiny Qwen3 converted to a local folder: what every bucket output must equal."""
    out = tmp_path_factory.mktemp("local-mt") / "mt"
    result = run("convert", "hf-to-maxtext", hf_models("qwen3"), "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


def _restore(url: BucketURL, ckpt: OrbaxCheckpoint) -> dict[str, np.ndarray]:
    """Every parameter read back from the bucket with tensorstore alone (Orbax's layout, zarr3 over OCDBT)."""
    items = url / "0" / "items"
    out = {}
    for path in ckpt.paths:
        spec = {"driver": "zarr3", "kvstore": kvstore_spec(items, param_name(path), ckpt.opts), "open": True}
        out[path] = ts.open(spec).result().read().result()
    return out


def test_hf_to_maxtext_into_bucket_equals_local(emulator, hf_models, local_mt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"{emulator.make_bucket(next(_buckets))}/runs/qwen3"
    result = run("convert", "hf-to-maxtext", hf_models("qwen3"), "--out", url, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["out"] == url
    assert list(tmp_path.iterdir()) == []                       # nothing local (no folder named gs: / s3:)
    dest = location(url, "--out", buckets=True)
    keys = list_keys(dest)
    assert PARTIAL_MARKER not in keys
    for key in ("0/commit_success.txt", "0/_CHECKPOINT_METADATA", "0/items/_METADATA", "0/items/manifest.ocdbt",
                "0/items/commit_success.txt"):
        assert key in keys, keys
    assert all(k.startswith("0/items/d/") for k in keys if k.count("/") > 2)
    local = OrbaxCheckpoint(local_mt)
    meta = json.loads(open_store(dest).read("0/items/_METADATA").result().value)
    assert meta == local.metadata
    step = json.loads(open_store(dest).read("0/_CHECKPOINT_METADATA").result().value)
    assert step["custom_metadata"]["scan_layers"] is True
    restored = _restore(dest, local)
    assert sorted(restored) == sorted(local.paths)
    for path, value in restored.items():
        expected = local.array(path).read().result()
        assert value.dtype == expected.dtype and value.shape == expected.shape, path
        np.testing.assert_array_equal(value, expected, err_msg=path)


def test_bucket_destination_refusals(emulator, hf_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = hf_models("qwen3")
    bucket = emulator.make_bucket(next(_buckets))
    missing = f"{emulator.scheme}://no-such-bucket-{next(_buckets)}/x"
    cases = [
        ([missing], 3, "does not exist"),
        ([f"{bucket}/x", "--overwrite"], 2, "does not replace a checkpoint in a bucket"),
        ([f"{bucket}/x", "--resume"], 2, "not supported yet"),
        ([bucket], 3, "not the bucket itself"),
    ]
    for args, code, why in cases:
        result = run("convert", "hf-to-maxtext", src, "--out", *args)
        assert result.exit_code == code, (args, result.output)
        assert why in error_line(result), (args, result.stderr)
    # a prefix holding objects ckpt did not make is never touched
    store = open_store(location(f"{bucket}/taken", "--out", buckets=True))
    store.write("notes.txt", b"mine").result()
    result = run("convert", "hf-to-maxtext", src, "--out", f"{bucket}/taken")
    assert result.exit_code == 3 and "exists and is not empty (notes.txt)" in error_line(result)
    assert [k.decode() for k in store.list().result()] == ["notes.txt"]
    assert list(tmp_path.iterdir()) == []


def test_interrupted_run_objects_are_replaced(emulator, hf_models, local_mt, monkeypatch, tmp_path):
    """A prefix left by an interrupted run (its .ckpt-partial marker, data objects, no manifest) is ckpt's:
    the next run removes it and writes a complete checkpoint."""
    monkeypatch.chdir(tmp_path)
    url = f"{emulator.make_bucket(next(_buckets))}/q"
    store = open_store(location(url, "--out", buckets=True))
    store.write(PARTIAL_MARKER, b"made by ckpt").result()
    store.write("0/items/d/stale", b"x" * 100).result()
    result = run("convert", "hf-to-maxtext", hf_models("qwen3"), "--out", url, "--quiet")
    assert result.exit_code == 0, result.output
    keys = [k.decode() for k in store.list().result()]
    assert "0/items/d/stale" not in keys and PARTIAL_MARKER not in keys and "0/commit_success.txt" in keys
