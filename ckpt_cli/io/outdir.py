"""Where a writing command writes: the checks made before it writes, the lock it holds, and OUT.partial.

The rules, shared by every command that writes (convert in both directions, demo, verify-logits
--save-golden) and checked by `plan`:

- `--out` never overlaps what the command reads: not the source, not inside it, not containing it, compared
  as resolved paths (symlinks and `..`), and the source is never `OUT.partial` either.
- `--out` is a folder or nothing yet; a file or a symbolic link is refused.
- An existing, non-empty `--out` is replaced only with `--overwrite`, and only when it is a checkpoint:
  an Orbax one (ckpt's or MaxText's: run, step or items folder) or an HF model folder. Anything else
  (notes, other files) is refused, naming what is in the way.
- `OUT.partial` is ckpt's only when it holds `PARTIAL_MARKER`, written first thing after the folder is
  made; ckpt never deletes or takes up a `.partial` without it (an empty one excepted).
- One run at a time per `--out`: an exclusive `flock` on `OUT.ckpt-lock` (beside OUT, never inside what is
  published) is held for the whole run; a second run fails at once naming the holder's pid. The holder
  removes the file when done (only while it still holds it); one left by a killed run is stale and reused.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from ckpt_cli.errors import DiskFull, OutputError
from ckpt_cli.io.durable import fsync_path

PARTIAL_MARKER = ".ckpt-partial"
LOCK_SUFFIX = ".ckpt-lock"
_LOCK_TAG = b"ckpt lock, pid "
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

# An HF model folder: config.json and weights, and otherwise only the files a model repo carries.
_HF_FILES = ("*.json", "*.safetensors", "*.bin", "*.model", "*.tiktoken", "*.jinja", "merges.txt", "vocab.txt",
             "tokenizer*", "README*", "LICENSE*", "USE_POLICY*", "NOTICE*", ".gitattributes", PARTIAL_MARKER)
_HF_DIRS = (".cache",)      # huggingface_hub's download bookkeeping in a local_dir
_STEP_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")


def partial_dir(out: Path) -> Path:
    """Where a run writes before it publishes: OUT.partial, beside OUT."""
    return out.with_name(out.name + ".partial")


def lock_path(out: Path) -> Path:
    """The lock file of a run writing OUT: OUT.ckpt-lock, beside OUT."""
    return out.with_name(out.name + LOCK_SUFFIX)


def output_path(out: Path | str) -> Path:
    """`--out` as the resolved path every check, lock and write uses; refuses a symbolic link (a dangling one
    too), a file, and a path with no name (`/`)."""
    out = Path(out).expanduser()
    if out.is_symlink():
        raise OutputError(f"--out {out} is a symbolic link (to {os.readlink(out)}): give a real folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    resolved = _resolve(out)
    if not resolved.name:
        raise OutputError(f"--out {out} is the root folder")
    return resolved


def check_not_overlapping(out: Path, sources: Iterable[Path | str], flag: str = "--out") -> None:
    """Refuse an `out` that is, is inside or contains a source (resolved paths), or whose OUT.partial is one."""
    out_r = _resolve(out)
    partial = _resolve(partial_dir(out_r))
    for source in sources:
        src = _resolve(Path(source))
        if src == out_r:
            raise OutputError(f"{flag} {out} is the source {source} (this command reads it): choose another {flag}")
        if out_r in src.parents:
            raise OutputError(f"{flag} {out} contains the source {source} (this command reads it): choose "
                              f"another {flag}")
        if src in out_r.parents:
            raise OutputError(f"{flag} {out} is inside the source {source} (this command reads it): choose "
                              f"a {flag} outside it")
        if src == partial or partial in src.parents:
            raise OutputError(f"the source {source} is {'inside ' if src != partial else ''}the folder {flag} "
                              f"{out} is written in before it is published, which this command replaces: rename "
                              f"the source or choose another {flag}")


def check_output(out: Path, overwrite: bool) -> None:
    """What must hold before anything is written to `out` (an `output_path`): absent, empty, or with
    --overwrite a checkpoint; and an existing OUT.partial must be ckpt's."""
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"{out} exists and is not empty (use --overwrite to replace it)")
        why = not_replaceable(out)
        if why:
            raise OutputError(f"--overwrite: {out} is not a checkpoint ({why}); ckpt replaces only an empty "
                              f"folder or a checkpoint: move it away or choose another --out")
    check_partial(out)


def not_replaceable(folder: Path) -> str | None:
    """Why --overwrite must not replace this non-empty folder; None when it is a checkpoint: an Orbax
    run, step or items folder (ckpt's or MaxText's), or an HF model folder."""
    if (folder / "_METADATA").is_file():
        return None                     # an Orbax items folder: everything in it is Orbax's
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    if (folder / "config.json").is_file() and any(fnmatch.fnmatch(e.name, "*.safetensors") or e.name.endswith(".bin")
                                                   for e in entries):
        for e in entries:
            if e.is_dir(follow_symlinks=False) and e.name in _HF_DIRS:
                continue
            # a link to a file counts (hub local_dir downloads link into the cache); replacing removes the link only
            if not (e.is_file() and any(fnmatch.fnmatch(e.name, p) for p in _HF_FILES)):
                return f"it holds {e.name}, which is not part of an HF model folder"
        return None
    if _is_step_dir(folder):
        return _foreign_in_step(folder)
    steps = [e for e in entries if e.name.isdigit() and e.is_dir(follow_symlinks=False)]
    if not steps:
        return (f"it holds {entries[0].name}{f' and {len(entries) - 1} more' if len(entries) > 1 else ''}, and no "
                f"config.json with weights, Orbax _METADATA or step folder")
    for e in entries:
        if e.name == PARTIAL_MARKER:
            continue
        if not (e.name.isdigit() and e.is_dir(follow_symlinks=False) and _is_step_dir(Path(e.path))):
            return f"it holds {e.name}, which is not a checkpoint step folder"
        why = _foreign_in_step(Path(e.path))
        if why:
            return why
    return None


def _is_step_dir(folder: Path) -> bool:
    return (folder / "items" / "_METADATA").is_file()


def _foreign_in_step(step: Path) -> str | None:
    for e in sorted(os.scandir(step), key=lambda e: e.name):
        if e.is_dir(follow_symlinks=False) and (Path(e.path) / "_METADATA").is_file():
            continue            # an Orbax item (items, or another item of a CheckpointManager step)
        if e.is_file(follow_symlinks=False) and e.name in _STEP_FILES:
            continue
        return f"it holds {Path(step.name) / e.name}, which is not part of an Orbax checkpoint step"
    return None


# --------------------------------------------------------------------------------------- OUT.partial


def check_partial(out: Path) -> None:
    """Refuse an OUT.partial that ckpt did not make (no marker; an empty folder is fine): never deleted."""
    p = partial_dir(out)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise OutputError(f"{p} is in the way and was not made by ckpt (not a folder): ckpt will not delete it; "
                          f"move it away or choose another --out")
    if p.is_dir() and not (p / PARTIAL_MARKER).is_file() and any(p.iterdir()):
        raise OutputError(f"{p} was not made by ckpt (no {PARTIAL_MARKER} marker in it): ckpt will not delete "
                          f"it; move it away or choose another --out")


def remove_partial(out: Path) -> None:
    """Delete an interrupted run's OUT.partial, only if it is ckpt's (see `check_partial`)."""
    check_partial(out)
    p = partial_dir(out)
    if p.is_dir():
        shutil.rmtree(p)


def make_partial(out: Path) -> Path:
    """A fresh OUT.partial (an old one of ckpt's is removed), marked as ckpt's before anything goes in it."""
    remove_partial(out)
    p = partial_dir(out)
    try:
        p.mkdir(parents=True)
        (p / PARTIAL_MARKER).write_text("made by ckpt; removed when the output is published\n")
    except OSError as exc:
        raise os_error(exc, f"cannot create {p}") from None
    return p


def unmark(partial: Path) -> None:
    """Remove the marker just before the folder is published (what is published carries no trace of it)."""
    (partial / PARTIAL_MARKER).unlink(missing_ok=True)


def publish(partial: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished (and fsynced) OUT.partial to OUT, replacing an old OUT only if it still may be
    replaced; the marker goes last, so a crash before the rename leaves a partial ckpt knows as its own."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"--out {out} became a file or a symbolic link while converting: nothing published")
    if out.is_dir() and any(out.iterdir()):
        why = not_replaceable(out) if overwrite else "it is not empty"
        if why:
            raise OutputError(f"{out} changed while converting ({why}): nothing published")
        shutil.rmtree(out)
    unmark(partial)
    os.replace(partial, out)
    fsync_path(out)
    fsync_path(out.parent)


def os_error(exc: OSError, what: str) -> OutputError:
    """An OSError of the output as one line; a full disk (or quota) becomes DiskFull."""
    cls = DiskFull if exc.errno in _DISK_FULL else OutputError
    return cls(f"{what}: {exc.strerror or exc}")


def disk_full(exc: BaseException) -> DiskFull | None:
    """The DiskFull an exception means, if it means one (our own, or a bare OSError ENOSPC/EDQUOT)."""
    if isinstance(exc, DiskFull):
        return exc
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return DiskFull(f"disk full while writing {exc.filename or 'the output'}")
    return None


# --------------------------------------------------------------------------------------- the lock


class OutputLock:
    """An exclusive `flock` on OUT.ckpt-lock held for a whole run; a context manager.

    Acquiring never waits: if another process holds it, OutputError names that process's pid (which it
    wrote into the file). The file records the holder's pid; it is removed on release, but only while
    it is still the file this lock holds, so a lock file someone else holds is never deleted. Folders
    made to hold the lock file are removed again on release when empty.
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self.fd: int | None = None
        self.made: list[Path] = []

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self._make_parents()
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                self.release()
                raise OutputError(f"{self.out} is being written by another ckpt run ({holder}; lock file "
                                  f"{self.path}): wait for it to finish or stop it") from None
            if self._still_ours(fd):
                break
            os.close(fd)            # its holder removed it after we opened it: lock the file now there
        content = os.pread(fd, 256, 0)
        if content and not content.startswith(_LOCK_TAG):
            os.close(fd)
            self.release()
            raise OutputError(f"{self.path} exists and is not a ckpt lock file: move it away or choose another --out")
        os.ftruncate(fd, 0)
        os.pwrite(fd, _LOCK_TAG + f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            if self._still_ours(self.fd):
                self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
        for folder in reversed(self.made):
            try:
                folder.rmdir()
            except OSError:
                break
        self.made = []

    def _make_parents(self) -> None:
        missing = []
        parent = self.path.parent
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                self.release()
                raise os_error(exc, f"cannot create {folder}") from None
            self.made.append(folder)

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            self.release()
            if exc.errno == errno.ELOOP:
                raise OutputError(f"{self.path} is a symbolic link, not a ckpt lock file: move it away") from None
            raise os_error(exc, f"cannot create the lock file {self.path}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            self.release()
            raise OutputError(f"{self.path} is not a ckpt lock file: move it away")
        return fd

    def _still_ours(self, fd: int) -> bool:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def lock_holder(out: Path) -> str | None:
    """Who holds OUT's lock right now ("pid N"), or None; creates and deletes nothing (for `plan`)."""
    try:
        fd = os.open(lock_path(Path(out)), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    content = os.pread(fd, 256, 0)
    if content.startswith(_LOCK_TAG):
        pid = content[len(_LOCK_TAG):].strip().decode(errors="replace")
        if pid.isdigit():
            return f"pid {pid}"
    return "pid not yet recorded"


def read_paths(folder: Path) -> list[Path]:
    """A source folder and the files directly in it (each is resolved when compared: links count)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [folder] if folder.exists() else []
    return [folder, *(p for p in folder.iterdir() if p.is_file())]


def _resolve(path: Path) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as exc:     # a symlink loop
        raise OutputError(f"{path}: cannot resolve the path ({exc})") from None


def preflight(out: Path, overwrite: bool, sources: Iterable[Path | str] = ()) -> list[str]:
    """Every reason a conversion into `out` would be refused before writing, for `plan` (no-go); [] if none."""
    reasons = []
    try:
        resolved = output_path(out)
        check_not_overlapping(resolved, sources)
        check_output(resolved, overwrite)
    except OutputError as exc:
        reasons.append(str(exc))
        resolved = None
    holder = lock_holder(resolved) if resolved is not None else None
    if holder:
        reasons.append(f"{out} is being written by another ckpt run ({holder})")
    return reasons
