"""What CLI tests share: run `ckpt` in-process, read its one-line error, copy an HF folder with a changed config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from ckpt_cli.cli.app import app
from tests.conftest import read_config

runner = CliRunner()


def run(*args):
    """`ckpt ARGS...` in this process (arguments may be paths)."""
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The run's stderr, which must be exactly one `error: ...` line."""
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def with_config(src: Path, dest: Path, **changes) -> Path:
    """A copy of an HF folder whose config.json has `changes` applied."""
    shutil.copytree(src, dest)
    cfg = read_config(dest) | changes
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest
