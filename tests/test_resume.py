"""--resume: an interrupted hf-to-maxtext keeps its durable progress and a rerun finishes it, identically."""

from __future__ import annotations

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
from typer.testing import CliRunner

from ckpt_cli.cli.app import app
from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.errors import Interrupted
from ckpt_cli.io import orbax as orbax_io
from ckpt_cli.io.orbax import PROGRESS, OrbaxWriter, partial_dir


@pytest.fixture
def snapshots_often(monkeypatch):
    monkeypatch.setattr(orbax_io, "BATCH_BYTES", 2048)
    monkeypatch.setattr(orbax_io, "SNAPSHOT_BYTES", 8192)


def interrupt_after(monkeypatch, writes: int) -> None:
    """Ctrl-C arrives during the writer's `writes`-th slice write."""
    real = OrbaxWriter.write
    calls = {"n": 0}

    def write(self, path, index, array):
        calls["n"] += 1
        if calls["n"] == writes:
            raise KeyboardInterrupt
        return real(self, path, index, array)

    monkeypatch.setattr(OrbaxWriter, "write", write)


def interrupted(src, out, monkeypatch, writes: int = 12, **options) -> None:
    """Run a conversion that Ctrl-C stops at its `writes`-th slice write, after a progress snapshot."""
    with monkeypatch.context() as m:
        interrupt_after(m, writes)
        with pytest.raises(KeyboardInterrupt) as info:     # a plain one (nothing kept) must fail, not stop pytest
            hf_to_maxtext(str(src), out, ToMaxTextOptions(**options))
    assert isinstance(info.value, Interrupted) and "run the same command again" in str(info.value)
    assert (partial_dir(out) / PROGRESS).is_file()


def leaves(out) -> dict[str, np.ndarray]:
    tree = ocp.PyTreeCheckpointer().restore(str(out / "0" / "items"))
    flat: dict[str, np.ndarray] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else k)
        else:
            flat[prefix] = np.asarray(node)

    walk(tree["params"], "")
    return flat


def assert_same_arrays(a, b) -> None:
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].dtype == lb[k].dtype and np.array_equal(la[k].view(np.uint8), lb[k].view(np.uint8)), k


@pytest.mark.parametrize("scan", [True, False])
def test_interrupted_run_is_finished_by_resume_with_identical_arrays(hf_models, tmp_path, monkeypatch,
                                                                      snapshots_often, scan):
    src = hf_models("qwen3", "bfloat16", sharded=True)
    clean = tmp_path / "clean"
    total = hf_to_maxtext(str(src), clean, ToMaxTextOptions(scan_layers=scan)).stats.tasks
    out = tmp_path / "mt"
    interrupted(src, out, monkeypatch, total * 2 // 3, scan_layers=scan)
    assert not out.exists()
    assert not (partial_dir(out) / "0" / "commit_success.txt").exists()      # nothing looks complete
    done = len(json.loads((partial_dir(out) / PROGRESS).read_text())["done"])
    assert 0 < done < total

    result = hf_to_maxtext(str(src), out, ToMaxTextOptions(scan_layers=scan, resume=True))
    assert result.stats.extra["resumed_tasks"] == done and result.stats.tasks == total - done
    assert any(n.startswith(f"resuming: {done} of {total}") for n in result.notes)
    assert not partial_dir(out).exists() and not (out / PROGRESS).exists()
    assert (out / "0" / "commit_success.txt").exists()
    assert_same_arrays(out, clean)


def test_resume_of_a_different_conversion_starts_afresh(hf_models, tmp_path, monkeypatch, snapshots_often):
    src = hf_models("qwen3", "bfloat16", sharded=True)
    out = tmp_path / "mt"
    interrupted(src, out, monkeypatch, dtype="bf16")
    result = hf_to_maxtext(str(src), out, ToMaxTextOptions(dtype="f32", resume=True))
    assert "resumed_tasks" not in result.stats.extra
    assert any(n.startswith("--resume: ") and "different conversion" in n for n in result.notes)
    clean = tmp_path / "clean"
    hf_to_maxtext(str(src), clean, ToMaxTextOptions(dtype="f32"))
    assert_same_arrays(out, clean)


def test_without_resume_the_partial_output_is_removed(hf_models, tmp_path, monkeypatch, snapshots_often):
    src = hf_models("qwen3", "bfloat16", sharded=True)
    out = tmp_path / "mt"
    interrupted(src, out, monkeypatch)
    result = hf_to_maxtext(str(src), out, ToMaxTextOptions())
    assert "resumed_tasks" not in result.stats.extra
    assert any("was removed: starting afresh" in n for n in result.notes)


def test_interrupt_before_any_snapshot_leaves_nothing(hf_models, tmp_path, monkeypatch):
    src = hf_models("qwen3", "bfloat16", sharded=True)
    out = tmp_path / "mt"
    interrupt_after(monkeypatch, 12)                     # default snapshot interval: 1 GB, never reached
    with pytest.raises(KeyboardInterrupt) as info:
        hf_to_maxtext(str(src), out, ToMaxTextOptions())
    assert not isinstance(info.value, Interrupted)
    assert not out.exists() and not partial_dir(out).exists()


def test_cli_reports_the_kept_progress_and_resumes(hf_models, tmp_path, monkeypatch, snapshots_often):
    src = hf_models("llama", "float32", sharded=True)
    out = tmp_path / "mt"
    runner = CliRunner()
    with monkeypatch.context() as m:
        interrupt_after(m, 12)
        r = runner.invoke(app, ["convert", "hf-to-maxtext", str(src), "--out", str(out), "--quiet"])
    assert r.exit_code == 130
    assert "progress kept in" in r.output and "same command again" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["convert", "hf-to-maxtext", str(src), "--out", str(out), "--resume", "--json"])
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert any(n.startswith("resuming: ") for n in record["notes"])
    assert (out / "0" / "commit_success.txt").exists() and not partial_dir(out).exists()


def test_a_snapshot_still_queued_at_the_interrupt_is_kept(hf_models, tmp_path, monkeypatch, snapshots_often):
    """The writeback thread lags behind (slow disk): the interrupt waits for the queued snapshot."""
    import time

    from ckpt_cli.io import writeback

    real = writeback._persist

    def slow(path):
        time.sleep(0.05)
        return real(path)

    monkeypatch.setattr(writeback, "_persist", slow)
    src = hf_models("qwen3", "bfloat16", sharded=True)
    out = tmp_path / "mt"
    interrupted(src, out, monkeypatch, writes=12)
    monkeypatch.setattr(writeback, "_persist", real)
    result = hf_to_maxtext(str(src), out, ToMaxTextOptions(resume=True))
    assert result.stats.extra["resumed_tasks"] > 0


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
@pytest.mark.parametrize("ocdbt", [True, False])
def test_a_data_file_missing_or_cut_means_a_fresh_start(hf_models, tmp_path, monkeypatch, snapshots_often, damage,
                                                        ocdbt):
    """Issue 11 item 7: a data file of OUT.partial that the snapshot relies on, deleted or truncated, is noticed
    before resuming (it was published as an unreadable checkpoint): a fresh start, naming the file."""
    src = hf_models("qwen3", "bfloat16", sharded=True)
    out = tmp_path / "mt"
    storage = orbax_io.StorageOptions(use_ocdbt=ocdbt)
    interrupted(src, out, monkeypatch, storage=storage)
    items = partial_dir(out) / "0" / "items"
    # the oldest data file: written by the first commit, so the snapshot relies on it
    data = min((p for p in items.rglob("*") if p.is_file() and p.name not in ("manifest.ocdbt", "zarr.json")),
               key=lambda p: p.stat().st_mtime_ns)
    if damage == "deleted":
        data.unlink()
    else:
        os.truncate(data, data.stat().st_size // 2)
    result = hf_to_maxtext(str(src), out, ToMaxTextOptions(storage=storage, resume=True))
    assert "resumed_tasks" not in result.stats.extra
    note = next(n for n in result.notes if n.startswith("--resume: "))
    assert note.endswith("starting afresh") and str(data) in note
    clean = tmp_path / "clean"
    hf_to_maxtext(str(src), clean, ToMaxTextOptions(storage=storage))
    assert_same_arrays(out, clean)


def test_cli_resumes_by_default_and_restart_starts_afresh(hf_models, tmp_path, monkeypatch, snapshots_often):
    src = hf_models("qwen3", "bfloat16", sharded=True)
    out = tmp_path / "mt"
    runner = CliRunner()
    interrupted(src, out, monkeypatch)
    r = runner.invoke(app, ["convert", "hf-to-maxtext", str(src), "--out", str(out), "--json"])   # no --resume
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert any(n.startswith("resuming: ") for n in record["notes"]) and record["stats"]["resumed_tasks"] > 0
    again = tmp_path / "again"
    interrupted(src, again, monkeypatch)
    r = runner.invoke(app, ["convert", "hf-to-maxtext", str(src), "--out", str(again), "--restart", "--json"])
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert "resumed_tasks" not in record["stats"]
    assert any("was removed: starting afresh" in n for n in record["notes"])
    r = runner.invoke(app, ["convert", "hf-to-maxtext", str(src), "--out", str(tmp_path / "x"), "--resume",
                            "--restart"])
    assert r.exit_code == 2 and "contradict" in r.output
