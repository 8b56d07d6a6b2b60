"""Benchmark: how long `ckpt` takes to answer what needs no conversion (help, version, models, TAB completion).

Each command runs --repeat times as a fresh process (the way a shell runs it); the median and the worst are
printed beside, from the same run, `python -c pass` (the interpreter's own floor), `python -c "import typer"` and
the --help of a one-option Typer app (the CLI framework's floor: Typer builds a pydantic adapter per parameter).
Our modules are byte-compiled first and PYTHONDONTWRITEBYTECODE is dropped, as for an installed tool.
Target: every line under 0.5 s (`ckpt models` builds every model's table: it is listed, not held to it).

Usage: python benchmarks/bench_startup.py [--repeat N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth import installed_env  # noqa: E402

TYPER_FLOOR = """
import typer
app = typer.Typer()
@app.command()
def f(x: str, n: int = 1) -> None:
    pass
app()
"""

CASES: list[tuple[str, list[str], dict[str, str]]] = [
    ("ckpt --help", ["--help"], {}),
    ("ckpt --version", ["--version"], {}),
    ("ckpt models", ["models"], {}),
    ("ckpt convert hf-to-maxtext --help", ["convert", "hf-to-maxtext", "--help"], {}),
    ("ckpt convert maxtext-to-hf --help", ["convert", "maxtext-to-hf", "--help"], {}),
    ("ckpt plan hf-to-maxtext --help", ["plan", "hf-to-maxtext", "--help"], {}),
    ("ckpt plan maxtext-to-hf --help", ["plan", "maxtext-to-hf", "--help"], {}),
    ("ckpt verify-logits --help", ["verify-logits", "--help"], {}),
    ("ckpt inspect --help", ["inspect", "--help"], {}),
    ("ckpt demo --help", ["demo", "--help"], {}),
    ("ckpt models --help", ["models", "--help"], {}),
    ("TAB: ckpt convert hf-to-maxtext qwen3-<TAB>", [],
     {"_CKPT_COMPLETE": "complete_bash", "COMP_WORDS": "ckpt convert hf-to-maxtext qwen3-", "COMP_CWORD": "3"}),
    ("TAB: ckpt convert hf-to-maxtext x --dtype <TAB>", [],
     {"_CKPT_COMPLETE": "complete_bash", "COMP_WORDS": "ckpt convert hf-to-maxtext x --dtype ", "COMP_CWORD": "5"}),
]


ENV: dict[str, str] = {}


def timed(argv: list[str], env: dict[str, str], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, env={**ENV, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    ENV.update(installed_env())
    ckpt = shutil.which("ckpt")
    base = [ckpt] if ckpt else [sys.executable, "-m", "ckpt_cli"]
    rows = [("baseline: python -c pass", timed([sys.executable, "-c", "pass"], {}, args.repeat)),
            ("baseline: python -c 'import typer'", timed([sys.executable, "-c", "import typer"], {}, args.repeat)),
            ("baseline: one-option Typer app --help", timed([sys.executable, "-c", TYPER_FLOOR, "--help"], {},
                                                            args.repeat))]
    rows += [(label, timed(base + argv, env, args.repeat)) for label, argv, env in CASES]
    floor = statistics.median(rows[0][1])
    print(f"{'command':<50} {'median':>8} {'worst':>8} {'vs pass':>8}")
    for label, times in rows:
        med = statistics.median(times)
        print(f"{label:<50} {med:>7.3f}s {max(times):>7.3f}s {med / floor:>7.1f}x")
    worst = max(max(t) for label, t in rows if not label.startswith(("baseline", "ckpt models")) or "--help" in label)
    print(f"slowest ckpt command: {worst:.3f} s ({'under' if worst < 0.5 else 'OVER'} the 0.5 s target)")


if __name__ == "__main__":
    main()
