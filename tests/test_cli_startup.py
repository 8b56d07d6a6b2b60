"""Start-up stays light: the CLI module imports no numerical library, so --help, --version and TAB completion
are instant (benchmarks/bench_startup.py measures them)."""

from __future__ import annotations

import os
import subprocess
import sys

HEAVY = ("numpy", "tensorstore", "jax", "torch", "ml_dtypes", "transformers", "safetensors", "orbax")


def _loaded_after(code: str, env: dict | None = None) -> list[str]:
    probe = f"{code}\nimport sys\nprint('LOADED:', *(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                       env={**os.environ, **(env or {})})
    return next(ln for ln in r.stderr.splitlines() if ln.startswith("LOADED:")).split()[1:]


def test_importing_the_cli_imports_no_numerical_library():
    assert _loaded_after("import ckpt_cli.cli.app") == []


def test_help_version_models_and_completion_import_no_numerical_library():
    run = "from ckpt_cli.cli.app import app\ntry:\n    app({args}, prog_name='ckpt')\nexcept SystemExit:\n    pass"
    for args in (["--help"], ["--version"], ["convert", "hf-to-maxtext", "--help"], ["plan", "maxtext-to-hf", "--help"],
                 ["verify-logits", "--help"], ["inspect", "--help"], ["demo", "--help"], ["models", "--help"]):
        assert _loaded_after(run.format(args=args)) == [], args
    completion = {"_CKPT_COMPLETE": "complete_bash", "COMP_WORDS": "ckpt convert hf-to-maxtext qwen3-",
                  "COMP_CWORD": "3"}
    assert _loaded_after(run.format(args=[]), completion) == []
