"""maxtext-to-hf --resume: an interrupted run keeps the writes it made durable, and a rerun finishes it with
the same bytes as an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckpt_cli.cli.app import app
from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf
from ckpt_cli.errors import Interrupted
from ckpt_cli.io import hf_writer
from ckpt_cli.io.hf_writer import PROGRESS, HFFolderWriter, partial_dir
from ckpt_cli.plan import write_key

SHARD = "40KB"      # several shards, so an index too


@pytest.fixture(scope="module")
def mt(hf_models, tmp_path_factory):
    """(kind, scan) -> a MaxText checkpoint of a tiny model (made once per module)."""
    cache: dict[tuple, Path] = {}

    def get(kind: str, scan: bool = True) -> Path:
        if (kind, scan) not in cache:
            out = tmp_path_factory.mktemp("mt") / f"{kind}-{'scan' if scan else 'noscan'}"
            hf_to_maxtext(str(hf_models(kind, "bfloat16")), out, ToMaxTextOptions(scan_layers=scan))
            cache[kind, scan] = out
        return cache[kind, scan]

    return get


@pytest.fixture
def snapshots_often(monkeypatch):
    monkeypatch.setattr(hf_writer, "SNAPSHOT_BYTES", 1)     # a snapshot after every write


def opts(**kw) -> ToHFOptions:
    return ToHFOptions(shard_size=40_000, **kw)


def interrupt_after(monkeypatch, writes: int) -> list[tuple]:
    """Ctrl-C arrives during the writer's `writes`-th write; returns the write keys made before it."""
    real = HFFolderWriter.write
    made: list[tuple] = []

    def write(self, target, index, array):
        if len(made) + 1 == writes:
            raise KeyboardInterrupt
        result = real(self, target, index, array)
        made.append(write_key(target, index))
        return result

    monkeypatch.setattr(HFFolderWriter, "write", write)
    return made


def interrupted(src, out, monkeypatch, writes: int, **kw) -> list[tuple]:
    """Run a conversion that Ctrl-C stops at its `writes`-th write, after a progress snapshot."""
    with monkeypatch.context() as m:
        made = interrupt_after(m, writes)
        with pytest.raises(KeyboardInterrupt) as info:     # a plain one (nothing kept) must fail, not stop pytest
            maxtext_to_hf(str(src), out, opts(**kw))
    assert isinstance(info.value, Interrupted) and "run the same command again" in str(info.value)
    assert (partial_dir(out) / PROGRESS).is_file()
    assert not out.exists()
    assert not (partial_dir(out) / "config.json").exists()
    assert not (partial_dir(out) / "model.safetensors.index.json").exists()       # nothing looks complete
    return made


def progress_done(out) -> set[tuple]:
    return {hf_writer.as_key(k) for k in json.loads((partial_dir(out) / PROGRESS).read_text())["done"]}


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def clean_run(src, out, **kw):
    result = maxtext_to_hf(str(src), out, opts(**kw))
    assert len(result.files) > 3 and "model.safetensors.index.json" in result.files
    return result


@pytest.mark.parametrize("kind,scan", [("qwen3", True), ("qwen3", False), ("gpt-oss", True)])
def test_interrupted_run_is_finished_by_resume_with_identical_bytes(mt, tmp_path, monkeypatch, snapshots_often,
                                                                     kind, scan):
    src = mt(kind, scan)
    total = clean_run(src, tmp_path / "clean").stats.tasks
    out = tmp_path / "hf"
    made = interrupted(src, out, monkeypatch, total * 2 // 3)
    done = progress_done(out)
    assert done == set(made)             # every write before the interrupt was snapshotted; none after it
    assert 0 < len(done) < total

    result = maxtext_to_hf(str(src), out, opts(resume=True))
    assert result.stats.extra["resumed_tasks"] == len(done) and result.stats.tasks == total - len(done)
    assert any(n.startswith(f"resuming: {len(done)} of {total}") for n in result.notes)
    assert not partial_dir(out).exists() and not (out / PROGRESS).exists()
    assert hashes(out) == hashes(tmp_path / "clean")


def test_gpt_oss_region_with_one_part_durable_resumes_the_other(mt, tmp_path, monkeypatch, snapshots_often):
    """gate_up_proj is written in two strided parts; each is recorded on its own. Interrupted between them,
    the progress names the first part only, and the resumed run writes the second into the same block."""
    src = mt("gpt-oss")
    order: list[tuple] = []
    real = HFFolderWriter.write

    def spy(self, target, index, array):
        order.append(write_key(target, index))
        return real(self, target, index, array)

    with monkeypatch.context() as m:
        m.setattr(HFFolderWriter, "write", spy)
        clean_run(src, tmp_path / "clean")
    strided = [n for n, (_, index) in enumerate(order)
               if any(isinstance(i, tuple) and i[2] not in (None, 1) for i in index)]
    assert strided, "gpt-oss has strided parts"
    first = strided[len(strided) // 2]
    partner = order[first + 1]
    assert partner[0] == order[first][0] and first + 1 in strided      # the other part of the same region

    out = tmp_path / "hf"
    interrupted(src, out, monkeypatch, first + 2)           # stopped while writing the partner
    done = progress_done(out)
    assert order[first] in done and partner not in done
    result = maxtext_to_hf(str(src), out, opts(resume=True))
    assert result.stats.extra["resumed_tasks"] == len(done)
    assert hashes(out) == hashes(tmp_path / "clean")


def test_resume_of_a_different_conversion_starts_afresh(mt, tmp_path, monkeypatch, snapshots_often):
    src = mt("qwen3")
    out = tmp_path / "hf"
    interrupted(src, out, monkeypatch, 10, dtype="bf16")
    result = maxtext_to_hf(str(src), out, opts(dtype="f32", resume=True))
    assert "resumed_tasks" not in result.stats.extra
    assert "--resume: " in " ".join(result.notes) and "different conversion" in " ".join(result.notes)
    clean_run(src, tmp_path / "clean", dtype="f32")
    assert hashes(out) == hashes(tmp_path / "clean")


@pytest.mark.parametrize("damage", ["truncated", "not-json", "bad-done", "foreign-write"])
def test_a_damaged_progress_file_means_a_fresh_start_with_a_note(mt, tmp_path, monkeypatch, snapshots_often,
                                                                 damage):
    src = mt("qwen3")
    out = tmp_path / "hf"
    interrupted(src, out, monkeypatch, 10)
    path = partial_dir(out) / PROGRESS
    text = path.read_text()
    progress = json.loads(text)
    path.write_text({"truncated": text[: len(text) // 2],
                     "not-json": "\0\0\0",
                     "bad-done": json.dumps({"key": progress["key"], "done": 7}),
                     "foreign-write": json.dumps({"key": progress["key"],
                                                  "done": [["lm_head.weight", [[0, 3, None]]]]}),
                     }[damage])
    result = maxtext_to_hf(str(src), out, opts(resume=True))
    assert "resumed_tasks" not in result.stats.extra
    note = next(n for n in result.notes if n.startswith("--resume: "))
    assert note.endswith("starting afresh") and str(path) in note
    clean_run(src, tmp_path / "clean")
    assert hashes(out) == hashes(tmp_path / "clean")


def test_a_shard_whose_header_differs_means_a_fresh_start(mt, tmp_path, monkeypatch, snapshots_often):
    src = mt("qwen3")
    out = tmp_path / "hf"
    interrupted(src, out, monkeypatch, 10)
    shard = sorted(partial_dir(out).glob("*.safetensors"))[0]
    with open(shard, "r+b") as fh:
        fh.seek(9)
        fh.write(b"X")
    result = maxtext_to_hf(str(src), out, opts(resume=True))
    assert "resumed_tasks" not in result.stats.extra
    assert any(n.startswith("--resume: ") and "header differs" in n for n in result.notes)
    clean_run(src, tmp_path / "clean")
    assert hashes(out) == hashes(tmp_path / "clean")


def test_ctrl_c_while_reopening_keeps_the_progress(mt, tmp_path, monkeypatch, snapshots_often):
    src = mt("qwen3")
    out = tmp_path / "hf"
    interrupted(src, out, monkeypatch, 10)
    before = progress_done(out)
    with monkeypatch.context() as m:
        def stop(self, key):
            raise KeyboardInterrupt

        m.setattr(HFFolderWriter, "_count_resumed", stop)
        with pytest.raises(KeyboardInterrupt) as info:     # a plain one must fail the test, not stop pytest
            maxtext_to_hf(str(src), out, opts(resume=True))
    assert isinstance(info.value, Interrupted)
    assert progress_done(out) == before
    result = maxtext_to_hf(str(src), out, opts(resume=True))
    assert result.stats.extra["resumed_tasks"] == len(before)
    clean_run(src, tmp_path / "clean")
    assert hashes(out) == hashes(tmp_path / "clean")


def test_resume_with_nothing_to_resume(mt, tmp_path):
    src = mt("qwen3")
    result = maxtext_to_hf(str(src), tmp_path / "hf", opts(resume=True))
    assert any("no interrupted run of this conversion" in n for n in result.notes)
    assert "resumed_tasks" not in result.stats.extra


def test_without_resume_the_partial_output_is_removed(mt, tmp_path, monkeypatch, snapshots_often):
    src = mt("qwen3")
    out = tmp_path / "hf"
    interrupted(src, out, monkeypatch, 10)
    result = maxtext_to_hf(str(src), out, opts())
    assert "resumed_tasks" not in result.stats.extra
    assert any("was removed: starting afresh" in n for n in result.notes)
    assert not partial_dir(out).exists()


def test_interrupt_before_any_snapshot_leaves_nothing(mt, tmp_path, monkeypatch):
    src = mt("qwen3")
    out = tmp_path / "hf"
    interrupt_after(monkeypatch, 10)                     # default snapshot interval: 1 GB, never reached
    with pytest.raises(KeyboardInterrupt) as info:
        maxtext_to_hf(str(src), out, opts())
    assert not isinstance(info.value, Interrupted)
    assert not out.exists() and not partial_dir(out).exists()


def failing_shard_fsync(monkeypatch, nth: int) -> None:
    """The `nth` fsync of a shard file fails (EIO), as after a lost writeback."""
    from ckpt_cli.io import writeback

    real = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".safetensors"):
            calls["n"] += 1
            if calls["n"] == nth:
                raise OSError(5, "Input/output error")
        return real(fd)

    monkeypatch.setattr(writeback.os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_failed_fsync_records_nothing_more_and_fails_the_run(mt, tmp_path, monkeypatch, snapshots_often):
    """After a shard's fsync fails, no later snapshot is written (a later fsync could succeed although the
    data is lost), and the run does not publish."""
    from ckpt_cli.errors import OutputError

    src = mt("qwen3")
    out = tmp_path / "hf"
    with monkeypatch.context() as m:
        failing_shard_fsync(m, 2)
        made = interrupted(src, out, m, 10)
    assert progress_done(out) == set(made[:1])          # the first snapshot only
    with monkeypatch.context() as m:
        failing_shard_fsync(m, 2)
        with pytest.raises(OutputError, match="Input/output error"):
            maxtext_to_hf(str(src), out, opts())
    assert not out.exists() and not partial_dir(out).exists()


def test_cli_reports_the_kept_progress_and_resumes(mt, tmp_path, monkeypatch, snapshots_often):
    src = mt("qwen3")
    out = tmp_path / "hf"
    runner = CliRunner()
    args = ["convert", "maxtext-to-hf", str(src), "--out", str(out), "--shard-size", SHARD]
    with monkeypatch.context() as m:
        interrupt_after(m, 10)
        r = runner.invoke(app, [*args, "--quiet"])
    assert r.exit_code == 130
    assert "progress kept in" in r.output and "same command again" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, [*args, "--resume", "--json"])
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert any(n.startswith("resuming: ") for n in record["notes"])
    assert (out / "config.json").exists() and not partial_dir(out).exists()


SLOW_CLI = """
import sys, time
from ckpt_cli.io import hf_writer
hf_writer.SNAPSHOT_BYTES = 1
real = hf_writer.HFFolderWriter.write
def slow(self, *args):
    time.sleep(0.1)
    return real(self, *args)
hf_writer.HFFolderWriter.write = slow
from ckpt_cli.cli.app import app
app(sys.argv[1:], prog_name="ckpt")
"""


def test_sigterm_keeps_progress_and_resume_finishes(mt, tmp_path):
    """A real SIGTERM to a converting process (slowed down, snapshotting every write)."""
    src = mt("qwen3")
    out = tmp_path / "hf"
    args = ["convert", "maxtext-to-hf", str(src), "--out", str(out), "--shard-size", SHARD, "-q"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    progress = partial_dir(out) / PROGRESS
    deadline = time.time() + 120
    while not progress.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "progress kept in" in err and "same command again" in err and "Traceback" not in err
    assert not out.exists() and progress.is_file()
    done = progress_done(out)
    assert done

    result = maxtext_to_hf(str(src), out, opts(resume=True))
    assert result.stats.extra["resumed_tasks"] == len(done)
    clean_run(src, tmp_path / "clean")
    assert hashes(out) == hashes(tmp_path / "clean")


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_shard_missing_or_shorter_than_the_snapshot_means_a_fresh_start(mt, tmp_path, monkeypatch,
                                                                          snapshots_often, damage):
    """Issue 11 item 7: a shard of OUT.partial deleted or cut below what the snapshot recorded is never
    published as it is (it was: an unreadable checkpoint); the run starts afresh, naming the file."""
    src = mt("qwen3")
    out = tmp_path / "hf"
    interrupted(src, out, monkeypatch, 10)
    shard = max(partial_dir(out).glob("*.safetensors"), key=lambda p: p.stat().st_size)
    if damage == "deleted":
        shard.unlink()
    else:
        os.truncate(shard, shard.stat().st_size - 8)
    result = maxtext_to_hf(str(src), out, opts(resume=True))
    assert "resumed_tasks" not in result.stats.extra
    note = next(n for n in result.notes if n.startswith("--resume: "))
    assert note.endswith("starting afresh") and str(shard) in note
    clean_run(src, tmp_path / "clean")
    assert hashes(out) == hashes(tmp_path / "clean")


def test_cli_resumes_by_default_and_restart_starts_afresh(mt, tmp_path, monkeypatch, snapshots_often):
    """The same command run again (no --resume) takes up OUT.partial and says so; --restart starts afresh."""
    src = mt("qwen3")
    runner = CliRunner()
    for flags, resumed in (([], True), (["--restart"], False)):
        out = tmp_path / f"hf{len(flags)}"
        interrupted(src, out, monkeypatch, writes=5)
        r = runner.invoke(app, ["convert", "maxtext-to-hf", str(src), "--out", str(out), "--shard-size", SHARD,
                                "--json", *flags])
        assert r.exit_code == 0, r.output
        record = json.loads(r.stdout)
        assert ("resumed_tasks" in record["stats"]) == resumed
        assert any(n.startswith("resuming: ") for n in record["notes"]) == resumed
        assert any("starting afresh" in n for n in record["notes"]) != resumed
        assert hashes(out) == hashes(clean_run(src, tmp_path / f"clean{len(flags)}").out)
