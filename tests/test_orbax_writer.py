"""OrbaxWriter: batched commits, the in-memory OCDBT manifest written once, early durable writeback."""

from __future__ import annotations

import os
import threading

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ckpt_cli.io import orbax as orbax_io
from ckpt_cli.io.orbax import OrbaxWriter, StorageOptions, partial_dir
from ckpt_cli.io.writeback import Writeback

rng = np.random.default_rng(7)


def arrays() -> dict[str, np.ndarray]:
    return {"decoder/layers/mlp/wi_0/kernel": rng.standard_normal((8, 3, 64)).astype(ml_dtypes.bfloat16),
            "token_embedder/embedding": rng.standard_normal((32, 8)).astype(np.float32)}


def write_all(writer: OrbaxWriter, data: dict[str, np.ndarray]) -> None:
    """Create each array and write it slice by slice (the stacked one layer by layer, as the engine does)."""
    for path, x in data.items():
        chunk = (x.shape[0], 1, x.shape[2]) if x.ndim == 3 else x.shape
        writer.create(path, x.shape, x.dtype, chunk)
    for path, x in data.items():
        if x.ndim == 3:
            for layer in range(x.shape[1]):
                writer.write(path, (slice(None), layer), np.ascontiguousarray(x[:, layer]))
        else:
            writer.write(path, (slice(None), slice(None)), x)


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(orbax_io, "BATCH_BYTES", 512)      # a commit every slice or two


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """Paths passed to os.fsync, in order, from any thread."""
    seen: list[str] = []
    lock = threading.Lock()
    real = os.fsync

    def spy(fd):
        with lock:
            seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


@pytest.mark.parametrize("zarr3", [True, False])
def test_manifest_is_written_once_and_the_checkpoint_restores(tmp_path, small_batches, fsynced, zarr3):
    out = tmp_path / "ckpt"
    data = arrays()
    writer = OrbaxWriter(out, StorageOptions(use_zarr3=zarr3))
    write_all(writer, data)
    writer.flush()
    items = partial_dir(out) / "0" / "items"
    data_files = sorted(str(p) for p in (items / "d").iterdir())
    assert len(data_files) >= 4                                  # several commits happened
    assert not (items / "manifest.ocdbt").exists()               # the manifest lives in memory until finalize
    writer.finalize({"scan_layers": True})
    assert (out / "0" / "items" / "manifest.ocdbt").is_file() and not partial_dir(out).exists()
    # every committed data file was made durable exactly once, by the writeback thread, before publish
    assert sorted(writer.writeback.synced) == data_files
    assert sorted(p for p in fsynced if p in data_files) == data_files
    restored = ocp.PyTreeCheckpointer().restore(str(out / "0" / "items"))
    assert int(restored["step"]) == 0
    for path, x in data.items():
        node = restored["params"]["params"]
        for key in path.split("/"):
            node = node[key]
        got = np.asarray(node)
        assert got.dtype == x.dtype and np.array_equal(got.view(np.uint8), x.view(np.uint8)), path


def test_without_ocdbt_there_is_no_manifest(tmp_path, small_batches):
    out = tmp_path / "ckpt"
    data = arrays()
    writer = OrbaxWriter(out, StorageOptions(use_ocdbt=False))
    write_all(writer, data)
    writer.finalize({"scan_layers": True})
    assert not (out / "0" / "items" / "manifest.ocdbt").exists()
    restored = ocp.PyTreeCheckpointer().restore(str(out / "0" / "items"))
    got = np.asarray(restored["params"]["params"]["token_embedder"]["embedding"])
    assert np.array_equal(got, data["token_embedder/embedding"])


def test_abort_stops_the_writeback_and_leaves_nothing(tmp_path, small_batches):
    out = tmp_path / "ckpt"
    writer = OrbaxWriter(out, StorageOptions())
    write_all(writer, arrays())
    writer.abort()
    assert not partial_dir(out).exists() and not out.exists()
    assert not writer.writeback._thread.is_alive()


def test_writeback_skips_vanished_files(tmp_path):
    kept = tmp_path / "kept"
    kept.write_bytes(b"x" * 4096)
    wb = Writeback()
    wb.persist([str(kept), str(tmp_path / "missing")])
    wb.close()
    assert set(wb.synced) == {str(kept)} and not wb._thread.is_alive()


def test_writeback_cancel_finishes_the_current_file_and_skips_the_queue(tmp_path, monkeypatch):
    from ckpt_cli.io import writeback

    files = [tmp_path / f"f{i}" for i in range(3)]
    for f in files:
        f.write_bytes(b"x" * 4096)
    started, gate = threading.Event(), threading.Event()
    real = writeback._persist

    def slow(path):
        started.set()
        gate.wait(10)
        return real(path)

    monkeypatch.setattr(writeback, "_persist", slow)
    wb = Writeback()
    wb.persist([str(files[0])])
    assert started.wait(10)                                  # the thread is inside the first file
    wb.persist([str(files[1]), str(files[2])])
    closer = threading.Thread(target=wb.close, kwargs={"cancel": True})
    closer.start()
    while not wb._cancelled:
        pass
    gate.set()
    closer.join(10)
    assert not closer.is_alive() and set(wb.synced) == {str(files[0])}


def test_new_files_reports_renamed_and_replaced_files_and_new_directories(tmp_path):
    from ckpt_cli.io.writeback import NewFiles

    def place(path, data: bytes):                    # the way tensorstore writes: temp file, then rename
        tmp = path.with_name(path.name + ".__lock")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    watch = NewFiles(tmp_path)
    assert watch._fd is not None                     # inotify is available on the machines we test on
    place(tmp_path / "a", b"1")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    place(tmp_path / "sub" / "deeper" / "b", b"2")
    assert sorted(watch.take()) == [str(tmp_path / "a"), str(tmp_path / "sub" / "deeper" / "b")]
    assert watch.take() == []
    place(tmp_path / "a", b"3")                      # replaced after it was reported: reported again
    assert watch.take() == [str(tmp_path / "a")]
    watch.close()


def test_new_files_falls_back_to_listing(tmp_path):
    from ckpt_cli.io.writeback import NewFiles

    watch = NewFiles(tmp_path)
    watch.close()                                    # as if inotify were missing
    (tmp_path / "x").write_bytes(b"1")
    (tmp_path / "y.__lock").write_bytes(b"1")
    assert watch.take() == [str(tmp_path / "x")]
    assert watch.take() == []


def test_chunk_files_of_arrays_without_ocdbt_are_made_durable_early(tmp_path, small_batches):
    writer = OrbaxWriter(tmp_path / "ckpt", StorageOptions(use_ocdbt=False))
    write_all(writer, arrays())
    writer.flush()
    writer.writeback.close()
    items = partial_dir(tmp_path / "ckpt") / "0" / "items"
    chunks = {os.path.join(d, f) for d, _, files in os.walk(items) for f in files if f not in ("zarr.json", ".zarray")}
    assert chunks and chunks <= set(writer.writeback.synced)
    writer.abort()
