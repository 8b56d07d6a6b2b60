"""Bad input that used to lose data or publish a wrong checkpoint (issue 11, items 1-5, 13, and --out a file or a
symlink). Every case is built at run time from a tiny numpy model and asserts the exit code, the one-line
message, that no traceback was printed, that every source is untouched (a hash of all its files before and
after) and that nothing looks published at --out."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.tiny import TINY_QWEN3, write_tiny_model
from tests.cli_helpers import error_line, run
from tests.test_resume import leaves

LOCK = ".ckpt-lock"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny HF model and its MaxText checkpoint, made once; cases work on copies."""
    root = tmp_path_factory.mktemp("bad-input")
    src = write_tiny_model(root / "src")
    hf_to_maxtext(str(src), root / "mt", ToMaxTextOptions())
    return root


@pytest.fixture
def src(made, tmp_path) -> Path:
    return Path(shutil.copytree(made / "src", tmp_path / "src"))


@pytest.fixture
def mt(made, tmp_path) -> Path:
    return Path(shutil.copytree(made / "mt", tmp_path / "mt"))


def tree_hash(path: Path) -> str:
    """Every file's relative path, kind and bytes (links by target), in one hash; '' when nothing is there."""
    if not path.exists() and not path.is_symlink():
        return ""
    h = hashlib.sha256()
    paths = [path] if not path.is_dir() or path.is_symlink() else sorted(path.rglob("*"))
    for p in paths:
        h.update(str(p.relative_to(path) if p != path else ".").encode())
        if p.is_symlink():
            h.update(b"link:" + os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def published(out: Path, keep: list[Path] = ()) -> bool:
    """Anything at --out (or beside it) that looks like a finished checkpoint, or a partial one (not one of
    `keep`, the sources)."""
    partial = out.with_name(out.name + ".partial")
    real = out if not out.is_symlink() else None
    return bool(real and ((real / "0" / "commit_success.txt").exists() or (real / "config.json").exists()
                          or list(real.glob("*.safetensors")))) or (partial.exists() and partial not in keep)


def refused(args, code: int, words: list[str], keep: list[Path], out: Path | None = None) -> str:
    """Run `ckpt ARGS`; assert the exit code, one line holding `words`, no traceback, `keep` untouched, and
    (for `out`) nothing published and no lock file left. Returns the line."""
    before = {p: tree_hash(p) for p in keep}
    r = run(*args)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    assert r.exit_code == code, r.output
    line = error_line(r) if code != 1 else r.stdout
    for w in words:
        assert w in line, line
    for p in keep:
        assert tree_hash(p) == before[p], f"{p} changed"
    if out is not None:
        assert not published(out, keep) or out in keep
        assert not out.with_name(out.name + LOCK).exists()
    return line


# ------------------------------------------------------------------------------ 1: --out overlaps the source


def test_hf_to_maxtext_out_is_the_source(src):
    refused(["convert", "hf-to-maxtext", src, "--out", src, "--overwrite"], 3, ["is the source"], [src])


def test_hf_to_maxtext_out_is_the_source_through_dotdot(src):
    refused(["convert", "hf-to-maxtext", src, "--out", f"{src}/../{src.name}/", "--overwrite"], 3,
            ["is the source"], [src])
    assert not src.with_name("src.partial").exists()


def test_hf_to_maxtext_out_contains_the_source(src, tmp_path):
    (tmp_path / "keep.txt").write_text("notes")
    refused(["convert", "hf-to-maxtext", src, "--out", tmp_path, "--overwrite"], 3, ["contains the source"],
            [src, tmp_path])


def test_hf_to_maxtext_out_inside_the_source(src):
    refused(["convert", "hf-to-maxtext", src, "--out", src / "mt"], 3, ["is inside the source"], [src], src / "mt")


def test_out_inside_the_source_through_a_symlinked_parent(src, tmp_path):
    (tmp_path / "link").symlink_to(src)
    refused(["convert", "hf-to-maxtext", src, "--out", tmp_path / "link" / "mt"], 3, ["is inside the source"],
            [src, tmp_path / "link"])
    assert not (src / "mt").exists()


def test_source_file_linked_from_inside_out(src, tmp_path):
    """A source folder of links: a shard that lives inside --out is caught (resolved paths)."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.move(src / "model.safetensors", out / "model.safetensors")
    (out / "config.json").write_text((src / "config.json").read_text())
    (src / "model.safetensors").symlink_to(out / "model.safetensors")
    refused(["convert", "hf-to-maxtext", src, "--out", out, "--overwrite"], 3, ["contains the source"], [src, out])


def test_maxtext_to_hf_out_is_the_source(mt):
    refused(["convert", "maxtext-to-hf", mt, "--out", mt, "--overwrite"], 3, ["is the source"], [mt])


def test_maxtext_to_hf_out_inside_the_source(mt):
    refused(["convert", "maxtext-to-hf", mt, "--out", mt / "hf"], 3, ["is inside the source"], [mt], mt / "hf")


def test_maxtext_to_hf_out_is_the_hf_config(mt, src, tmp_path):
    refused(["convert", "maxtext-to-hf", mt, "--hf-config", src / "config.json", "--out", src, "--overwrite"], 3,
            ["contains the source"], [mt, src])


@pytest.mark.parametrize("inside", ["hf", "maxtext"])
def test_save_golden_inside_a_source(mt, src, inside):
    golden = (src if inside == "hf" else mt / "0") / "golden.npz"
    refused(["verify-logits", "--maxtext", mt, "--hf", src, "--save-golden", golden], 3,
            ["--save-golden", "is inside the source"], [mt, src])


# ------------------------------------------------------------------------------ 2: OUT.partial is ckpt's only


def test_hf_source_named_out_partial(src, tmp_path):
    source = src.rename(tmp_path / "o.partial")
    refused(["convert", "hf-to-maxtext", source, "--out", tmp_path / "o"], 3, ["o.partial is the folder --out",
            "is written in before it is published"], [source], tmp_path / "o")


def test_maxtext_source_named_out_partial(mt, tmp_path):
    """Used to delete the source before reading it, and publish all-zero weights with exit 0."""
    source = mt.rename(tmp_path / "hf.partial")
    refused(["convert", "maxtext-to-hf", source, "--out", tmp_path / "hf"], 3, ["hf.partial"], [source],
            tmp_path / "hf")


@pytest.mark.parametrize("resume", [False, True])
def test_foreign_partial_is_never_deleted(src, tmp_path, resume):
    partial = tmp_path / "mt.partial"
    partial.mkdir()
    (partial / "thesis.tex").write_text("years of work")
    refused(["convert", "hf-to-maxtext", src, "--out", tmp_path / "mt", *(["--resume"] if resume else [])], 3,
            [str(partial), "was not made by ckpt", ".ckpt-partial"], [src, partial])
    assert not (tmp_path / "mt").exists()


def test_foreign_partial_of_maxtext_to_hf(mt, tmp_path):
    partial = tmp_path / "hf.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"someone else's")
    refused(["convert", "maxtext-to-hf", mt, "--out", tmp_path / "hf"], 3, ["was not made by ckpt"], [mt, partial])


# ------------------------------------------------------------------------------ 3: --overwrite of a non-checkpoint


def test_overwrite_refuses_a_folder_of_notes(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(["convert", "hf-to-maxtext", src, "--out", out, "--overwrite"], 3, ["--overwrite", "holds notes.txt",
            "not a checkpoint"], [src, out])


def test_overwrite_refuses_an_hf_folder_with_other_files(mt, src, tmp_path):
    out = Path(shutil.copytree(src, tmp_path / "hf"))
    (out / "experiments").mkdir()
    (out / "experiments" / "run1.log").write_text("mine")
    refused(["convert", "maxtext-to-hf", mt, "--out", out, "--overwrite"], 3,
            ["holds experiments, which is not part of an HF model folder"], [mt, out])


def test_overwrite_refuses_a_checkpoint_with_other_files(src, mt, tmp_path):
    (mt / "0" / "eval-results.json").write_text("{}")
    refused(["convert", "hf-to-maxtext", src, "--out", mt, "--overwrite"], 3,
            ["holds 0/eval-results.json, which is not part of an Orbax checkpoint step"], [src, mt])


def test_overwrite_replaces_a_checkpoint(src, mt, tmp_path):
    r = run("convert", "hf-to-maxtext", src, "--out", mt, "--overwrite", "--no-scan", "-q")
    assert r.exit_code == 0, r.output
    assert "params/decoder/layers_0/mlp/wo/kernel" in leaves(mt)
    hf = tmp_path / "hf"
    assert run("convert", "maxtext-to-hf", mt, "--out", hf, "-q").exit_code == 0
    r = run("convert", "maxtext-to-hf", mt, "--out", hf, "--overwrite", "--dtype", "f32", "-q")     # an HF folder
    assert r.exit_code == 0, r.output
    assert json.loads((hf / "config.json").read_text())["dtype"] == "float32"
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(f"*{LOCK}"))


def test_overwrite_of_an_hf_folder_of_links_keeps_their_targets(mt, src, tmp_path):
    """An HF folder whose files link elsewhere (hub local_dir downloads) is a checkpoint; the targets survive."""
    out = tmp_path / "hf"
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).symlink_to(f)
    before = tree_hash(src)
    r = run("convert", "maxtext-to-hf", mt, "--out", out, "--overwrite", "-q")
    assert r.exit_code == 0, r.output
    assert tree_hash(src) == before and not (out / "model.safetensors").is_symlink()


# ------------------------------------------------------------------------------ 12 (part): --out a file or a symlink


@pytest.mark.parametrize("direction", ["hf-to-maxtext", "maxtext-to-hf"])
def test_out_is_a_file(src, mt, tmp_path, direction):
    out = tmp_path / "out"
    out.write_text("a file of mine")
    source = src if direction == "hf-to-maxtext" else mt
    refused(["convert", direction, source, "--out", out, "--overwrite"], 3, ["is a file, not a folder"],
            [source, out])


@pytest.mark.parametrize("direction", ["hf-to-maxtext", "maxtext-to-hf"])
def test_out_is_a_symlink(src, mt, tmp_path, direction):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "out").symlink_to(target)
    source = src if direction == "hf-to-maxtext" else mt
    refused(["convert", direction, source, "--out", tmp_path / "out"], 3, ["is a symbolic link"],
            [source, tmp_path / "out", target])


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "maxtext").mkdir()
    (tmp_path / "maxtext" / "notes.txt").write_text("mine")
    refused(["demo", "--out", tmp_path], 3, ["holds maxtext, which is not a checkpoint", "holds notes.txt"],
            [tmp_path])


def test_demo_refuses_other_files(tmp_path):
    (tmp_path / "report.pdf").write_text("mine")
    refused(["demo", "--out", tmp_path], 3, ["holds report.pdf", "did not write"], [tmp_path])


# ------------------------------------------------------------------------------ 4: one run at a time per --out


def ckpt(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ckpt_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def bigger(tmp_path_factory) -> tuple[Path, Path]:
    """A model big enough (~6 MB) that a conversion holds its lock for a while, and its solo conversion."""
    root = tmp_path_factory.mktemp("bigger")
    cfg = TINY_QWEN3 | {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "vocab_size": 4000}
    src = write_tiny_model(root / "src", cfg)
    hf_to_maxtext(str(src), root / "solo", ToMaxTextOptions())
    return src, root / "solo"


def test_second_run_on_the_same_out_fails_at_once_naming_the_holder(bigger, tmp_path):
    bigger, solo = bigger
    out = tmp_path / "out"
    lock = out.with_name(out.name + LOCK)
    before = tree_hash(bigger)
    first = ckpt("convert", "hf-to-maxtext", bigger, "--out", out, "-q")
    deadline = time.time() + 60
    while time.time() < deadline and first.poll() is None and f"pid {first.pid}" not in _read(lock):
        time.sleep(0.001)
    assert first.poll() is None, "the first run ended before its lock was seen"
    first.send_signal(signal.SIGSTOP)       # holds the lock, paused mid-run
    try:
        start = time.time()
        second = ckpt("convert", "hf-to-maxtext", bigger, "--out", out, "--overwrite", "-q")
        _, err = second.communicate(timeout=60)
        waited = time.time() - start
    finally:
        first.send_signal(signal.SIGCONT)
    _, first_err = first.communicate(timeout=120)
    assert second.returncode == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert f"pid {first.pid}" in lines[0] and "another ckpt run" in lines[0]
    assert waited < 30
    assert first.returncode == 0, first_err
    assert tree_hash(bigger) == before and not lock.exists() and not out.with_name("out.partial").exists()
    _same_leaves(out, solo)


def test_two_runs_racing_on_the_same_out(bigger, tmp_path):
    """Started together: exactly one publishes, the other exits 3 (naming the winner's pid when it ran while the
    winner held the lock); the output equals a solo run's, element for element."""
    bigger, solo = bigger
    out = tmp_path / "out"
    procs = [ckpt("convert", "hf-to-maxtext", bigger, "--out", out, "-q") for _ in range(2)]
    results = [(p, *p.communicate(timeout=180)) for p in procs]
    winners = [p for p, _, _ in results if p.returncode == 0]
    losers = [(p, err) for p, _, err in results if p.returncode != 0]
    assert len(winners) == 1 and len(losers) == 1, [(p.returncode, e) for p, _, e in results]
    loser, err = losers[0]
    assert loser.returncode == 3 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"pid {winners[0].pid}" in err or "exists and is not empty" in err, err
    assert not out.with_name(out.name + LOCK).exists() and not out.with_name("out.partial").exists()
    _same_leaves(out, solo)


def test_lock_held_in_process(src, mt, tmp_path):
    from ckpt_cli.io.outdir import OutputLock

    out = tmp_path / "out"
    with OutputLock(out):
        line = refused(["convert", "hf-to-maxtext", src, "--out", out], 3, [f"pid {os.getpid()}"], [src])
        assert "lock file" in line
        refused(["convert", "maxtext-to-hf", mt, "--out", out, "--resume"], 3, [f"pid {os.getpid()}"], [mt])
        refused(["plan", "hf-to-maxtext", src, "--out", out, "--read-gbps", "1", "--write-gbps", "1"], 1,
                ["no-go", f"pid {os.getpid()}"], [src])
    assert not out.with_name(out.name + LOCK).exists()
    assert run("convert", "hf-to-maxtext", src, "--out", out, "-q").exit_code == 0


def test_a_stale_lock_file_is_taken_over(src, tmp_path):
    out = tmp_path / "out"
    lock = out.with_name(out.name + LOCK)
    lock.write_text("ckpt lock, pid 999999\n")          # left by a killed run: no process holds it
    assert run("convert", "hf-to-maxtext", src, "--out", out, "-q").exit_code == 0
    assert not lock.exists()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _same_leaves(out: Path, solo: Path) -> None:
    a, b = leaves(out), leaves(solo)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


# ------------------------------------------------------------------------------ 5: disk full keeps the progress


def test_disk_full_after_a_snapshot_keeps_the_progress_hf_to_maxtext(src, tmp_path, monkeypatch):
    from ckpt_cli.io import orbax as orbax_io

    monkeypatch.setattr(orbax_io, "BATCH_BYTES", 2048)
    monkeypatch.setattr(orbax_io, "SNAPSHOT_BYTES", 8192)
    solo = tmp_path / "solo"
    hf_to_maxtext(str(src), solo, ToMaxTextOptions())
    real = orbax_io.OrbaxWriter._wait_oldest

    class Full:         # what tensorstore reports when the disk is full
        def result(self):
            raise ValueError("IO error: Error writing file: [OS error 28: No space left on device]")

    def wait_oldest(self):
        if self.snapshots_queued >= 2:
            future, _, _ = self.pending.popleft()
            future.result()
            orbax_io._result(Full(), "committing writes")
        return real(self)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(orbax_io.OrbaxWriter, "_wait_oldest", wait_oldest)
        refused(["convert", "hf-to-maxtext", src, "--out", out], 3,
                ["disk full", f"progress kept in {out}.partial", "free some space", "--resume"], [src])
    assert (tmp_path / "out.partial" / "ckpt-progress.json").is_file() and not out.exists()
    r = run("convert", "hf-to-maxtext", src, "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    assert "resuming:" in r.stderr
    _same_leaves(out, solo)


def test_disk_full_after_a_snapshot_keeps_the_progress_maxtext_to_hf(mt, tmp_path, monkeypatch):
    from ckpt_cli.io import hf_writer

    monkeypatch.setattr(hf_writer, "SNAPSHOT_BYTES", 1)     # a snapshot after every write
    solo = tmp_path / "solo"
    assert run("convert", "maxtext-to-hf", mt, "--out", solo, "-q").exit_code == 0
    real = os.pwrite
    writes = {"n": 0}

    def pwrite(fd, data, offset):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".safetensors"):
            writes["n"] += 1
            if writes["n"] > 8:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", pwrite)
        refused(["convert", "maxtext-to-hf", mt, "--out", out, "-q"], 3,
                ["No space left on device", f"progress kept in {out}.partial", "--resume"], [mt])
    assert (tmp_path / "out.partial" / "ckpt-progress.json").is_file() and not out.exists()
    r = run("convert", "maxtext-to-hf", mt, "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    assert "resuming:" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in solo.iterdir()}


# ------------------------------------------------------------------------- 13: plan says no-go where convert refuses

FAST = ["--read-gbps", "1", "--write-gbps", "1"]


def test_plan_no_go_on_a_non_empty_out(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(["plan", "hf-to-maxtext", src, "--out", out, *FAST], 1, ["no-go", "exists and is not empty"], [src, out])
    refused(["plan", "hf-to-maxtext", src, "--out", out, "--overwrite", *FAST], 1, ["no-go", "holds notes.txt"],
            [src, out])


def test_plan_no_go_on_out_overlapping_the_source(src, mt):
    refused(["plan", "hf-to-maxtext", src, "--out", src, "--overwrite", *FAST], 1, ["no-go", "is the source"], [src])
    refused(["plan", "maxtext-to-hf", mt, "--out", mt / "hf", *FAST], 1, ["no-go", "is inside the source"], [mt])


def test_plan_no_go_on_a_foreign_partial(mt, tmp_path):
    partial = tmp_path / "hf.partial"
    partial.mkdir()
    (partial / "x").write_text("mine")
    refused(["plan", "maxtext-to-hf", mt, "--out", tmp_path / "hf", *FAST], 1, ["no-go", "was not made by ckpt"],
            [mt, partial])


def test_plan_go_where_convert_goes(src, tmp_path):
    r = run("plan", "hf-to-maxtext", src, "--out", tmp_path / "out", *FAST)
    assert r.exit_code == 0 and "go: " in r.stdout, r.output
    assert not (tmp_path / ("out" + LOCK)).exists() and not (tmp_path / "out").exists()
