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


def test_bucket_checkpoint_as_source(emulator, hf_models, local_mt, tmp_path):
    """maxtext-to-hf and inspect read a MaxText checkpoint in the bucket in place: the same HF folder and the
    same tree as from the local copy; an interrupted or absent one is refused in one line."""
    url = f"{emulator.make_bucket(next(_buckets))}/mt"
    assert run("convert", "hf-to-maxtext", hf_models("qwen3"), "--out", url, "--quiet").exit_code == 0
    for src, out in ((url, tmp_path / "from-bucket"), (f"{url}/0/items", tmp_path / "from-items"),
                     (local_mt, tmp_path / "from-local")):
        result = run("convert", "maxtext-to-hf", src, "--out", out, "--quiet")
        assert result.exit_code == 0, result.output
    for name in ("model.safetensors", "config.json"):
        expected = (tmp_path / "from-local" / name).read_bytes()
        assert (tmp_path / "from-bucket" / name).read_bytes() == expected, name
        assert (tmp_path / "from-items" / name).read_bytes() == expected, name
    remote = json.loads(run("inspect", url, "--json").stdout)
    local = json.loads(run("inspect", local_mt, "--json").stdout)
    assert remote["tensors"] == local["tensors"] and remote["tensors"]
    assert remote["scan_layers"] is True
    planned = run("plan", "maxtext-to-hf", url, "--out", tmp_path / "p", "--read-gbps", "1", "--write-gbps", "1",
                  "--json")
    local_plan = run("plan", "maxtext-to-hf", local_mt, "--out", tmp_path / "p", "--read-gbps", "1",
                     "--write-gbps", "1", "--json")
    assert planned.exit_code == 0 and local_plan.exit_code == 0, planned.output
    assert json.loads(planned.stdout)["source"] == url
    remote_p, local_p = json.loads(planned.stdout), json.loads(local_plan.stdout)
    assert remote_p["go"] is True and remote_p["source_kind"] == "orbax"
    for key in ("tensors", "tasks", "parameters"):
        assert remote_p[key] == local_p[key], key
    assert remote_p["bytes"]["written"] == local_p["bytes"]["written"] > 0
    # an interrupted run's prefix, and nothing at all
    store = open_store(location(f"{url}-broken", "--out", buckets=True))
    store.write(PARTIAL_MARKER, b"made by ckpt").result()
    for src, why in ((f"{url}-broken", "an interrupted conversion"), (f"{url}-none", "not an Orbax checkpoint")):
        result = run("convert", "maxtext-to-hf", src, "--out", tmp_path / "x")
        assert result.exit_code == 2 and why in error_line(result), result.output
        result = run("inspect", src)
        assert result.exit_code == 2 and why in error_line(result), result.output
    assert not (tmp_path / "x").exists()


def test_failed_object_store_request_is_one_line(emulator):
    """A request the store refuses for good in the middle of a run (here: a bucket that is gone) becomes an
    OutputError naming the step, not a tensorstore traceback."""
    from ckpt_cli.errors import OutputError
    from ckpt_cli.io.orbax import _result

    url = location(f"{emulator.scheme}://gone-{next(_buckets)}/x", "--out", buckets=True)
    future = ts.KvStore.open(url.kvstore()).result().write("k", b"v")
    with pytest.raises(OutputError, match="the object store failed while committing writes: NOT_FOUND"):
        _result(future, "committing writes")


def test_verify_logits_from_bucket(emulator, hf_models, local_mt):
    """verify-logits reads the MaxText side from the bucket: the same logits, so the same metrics, as local."""
    url = f"{emulator.make_bucket(next(_buckets))}/mt"
    src = hf_models("qwen3")
    assert run("convert", "hf-to-maxtext", src, "--out", url, "--quiet").exit_code == 0
    records = []
    for mt in (url, local_mt):
        result = run("verify-logits", "--maxtext", mt, "--hf", src, "--tokens", "1,2,3,4,5", "--json")
        assert result.exit_code == 0, result.output
        records.append(json.loads(result.stdout))
    assert records[0]["passed"] is True and records[0]["maxtext"] == url
    assert records[0]["prompts"] == records[1]["prompts"] and records[0]["summary"] == records[1]["summary"]
    assert records[0]["maxtext_bytes_read"] == records[1]["maxtext_bytes_read"] > 0


def test_aborted_bucket_write_leaves_nothing(emulator):
    """A run that fails or is interrupted after uploading data objects removes them all, marker last."""
    from ckpt_cli.io.bucket import BucketOrbaxWriter
    from ckpt_cli.io.orbax import StorageOptions

    url = location(f"{emulator.make_bucket(next(_buckets))}/a", "--out", buckets=True)
    writer = BucketOrbaxWriter(url, StorageOptions())
    assert list_keys(url) == [PARTIAL_MARKER]
    writer.create("decoder/w", (64, 32), np.dtype(np.float32), (64, 32))
    writer.write("decoder/w", (slice(None), slice(None)), np.ones((64, 32), np.float32))
    writer.flush()
    assert any(k.startswith("0/items/d/") for k in list_keys(url))
    assert writer.abort(keep=True) is False
    assert list_keys(url) == []


def test_interrupted_bucket_conversion_resumed(emulator, hf_models, local_mt, monkeypatch, tmp_path):
    """Ctrl-C after some snapshots: the marker, the record and the objects stay; the same command with --resume
    loads the saved manifest, writes only the slices not recorded, and the checkpoint equals a local run's."""
    from ckpt_cli.io import bucket, orbax

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(orbax, "BATCH_BYTES", 64 * 1024)        # many commits, a snapshot after each
    monkeypatch.setattr(orbax, "SNAPSHOT_BYTES", 1)
    url = f"{emulator.make_bucket(next(_buckets))}/resumed"
    dest = location(url, "--out", buckets=True)
    real_write = bucket.BucketOrbaxWriter.write
    calls = []

    def write(self, path, index, array):
        calls.append(path)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real_write(self, path, index, array)

    monkeypatch.setattr(bucket.BucketOrbaxWriter, "write", write)
    src = hf_models("qwen3")
    result = run("convert", "hf-to-maxtext", src, "--out", url)
    assert result.exit_code == 130 and "with --resume" in result.stderr, result.output
    keys = list_keys(dest)
    assert PARTIAL_MARKER in keys and bucket.PROGRESS_RECORD in keys and "0/commit_success.txt" not in keys
    monkeypatch.setattr(bucket.BucketOrbaxWriter, "write", real_write)
    result = run("convert", "hf-to-maxtext", src, "--out", url, "--resume", "--json")
    assert result.exit_code == 0, result.output
    done = int(result.stderr.split("resuming: ")[1].split(" ")[0])
    assert 0 < done < 20
    keys = list_keys(dest)
    assert not [k for k in keys if k.startswith(".ckpt")] and "0/commit_success.txt" in keys
    local = OrbaxCheckpoint(local_mt)
    for path, value in _restore(dest, local).items():
        np.testing.assert_array_equal(value, local.array(path).read().result(), err_msg=path)
    # without --resume an interrupted prefix is removed and written afresh
    monkeypatch.setattr(bucket.BucketOrbaxWriter, "write", write)
    calls.clear()
    assert run("convert", "hf-to-maxtext", src, "--out", f"{url}-2").exit_code == 130
    monkeypatch.setattr(bucket.BucketOrbaxWriter, "write", real_write)
    result = run("convert", "hf-to-maxtext", src, "--out", f"{url}-2")
    assert result.exit_code == 0 and "resuming" not in result.stderr, result.output
