"""Benchmark: both directions at 2 workers, at every core, and at the default (no --workers), beside the disk's
durable floor (`cp -r` + `sync -f` of the same bytes), all measured in the same run.

Makes a synthetic checkpoint of a registry model (random bf16 weights, real names and shapes), converts it
HF -> MaxText and back with each worker count, and prints wall time (start-up and final fsync included), peak
RSS and the ratio to the durable copy of that direction's input. Each output is compared with the first one of
its direction (bit-identical whatever the worker count). The input is page-cached before each run, and the page
cache is flushed (`sync`) between runs.

Usage: python benchmarks/bench_workers.py [--model qwen3-4b] [--layers N] [--shard-gb 4] [--dir DIR] [--runs 1]
                                         [--counts 1,2]
  (on a 16-core machine: --model qwen3-8b gives a 16 GB checkpoint, as in issue 16's measurement)
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synth import du, gb, run_measured, write_synthetic  # noqa: E402


def warm_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def durable_copy(src: Path, dst: Path):
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    warm_tree(src)
    r = run_measured(["sh", "-c", f'cp -r "{src}" "{dst}" && sync -f "{dst}"'])
    shutil.rmtree(dst)
    return r


def same_tree(a: Path, b: Path) -> bool:
    """Two outputs hold the same tensors: an HF folder's safetensors byte for byte; a MaxText checkpoint's arrays
    one by one (OCDBT names its data files at random, so its bytes differ from run to run)."""
    if (a / "config.json").is_file():
        files = sorted(f.name for f in a.glob("*.safetensors"))
        return files == sorted(f.name for f in b.glob("*.safetensors")) and all(
            filecmp.cmp(a / f, b / f, shallow=False) for f in files)
    from ckpt_cli.io.orbax import OrbaxCheckpoint
    from ckpt_cli.plan import SourceSlice

    x, y = OrbaxCheckpoint(a), OrbaxCheckpoint(b)
    return sorted(x.paths) == sorted(y.paths) and all(
        x.read(SourceSlice(p)).tobytes() == y.read(SourceSlice(p)).tobytes() for p in x.paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-4b")
    ap.add_argument("--layers", type=int, default=None, help="keep only this many decoder layers (full width)")
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--counts", default=None, help="worker counts to run, e.g. 1,2 (default: 2 and every core)")
    args = ap.parse_args()
    from ckpt_cli.machine import default_workers, usable_cpus

    cores = usable_cpus()
    counts = sorted({int(n) for n in args.counts.split(",")} if args.counts else {2, cores})
    root = args.dir or Path(tempfile.mkdtemp(prefix="ckpt-bench-workers-"))
    src = root / f"{args.model}-hf"
    if not (src / "config.json").exists():
        print(f"writing synthetic {args.model} (bf16, random) ...", flush=True)
        write_synthetic(src, args.model, int(args.shard_gb * 1e9), layers=args.layers)
    print(f"{args.model}{f' ({args.layers} layers)' if args.layers else ''}: {gb(du(src))} bf16; {cores} usable "
          f"cores; default --workers here: {default_workers()}")
    ckpt = [sys.executable, "-m", "ckpt_cli", "convert"]
    for run in range(args.runs):
        first: dict[str, Path] = {}
        print(f"\nrun {run + 1}/{args.runs}")
        floor_hf = durable_copy(src, root / "cp-hf")
        print(f"  cp -r + sync of the HF folder      : {floor_hf.wall_s:7.2f} s  (durable floor, hf-to-maxtext)")
        for workers in [*counts, None]:
            label = f"--workers {workers}" if workers else f"default ({default_workers()})"
            out = root / f"mt-{workers or 'default'}"
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            warm_tree(src)
            flags = ["--workers", str(workers)] if workers else []
            r = run_measured([*ckpt, "hf-to-maxtext", str(src), "--out", str(out), "-q", *flags])
            assert r.returncode == 0, f"hf-to-maxtext {label} failed"
            same = "" if "hf" not in first else f"; identical to {first['hf'].name}: {same_tree(first['hf'], out)}"
            first.setdefault("hf", out)
            print(f"  hf-to-maxtext {label:<20}: {r.wall_s:7.2f} s  peak RSS {gb(r.peak_rss)}  "
                  f"= {r.wall_s / floor_hf.wall_s:.2f}x durable cp -r{same}")
        mt_input = first["hf"]
        floor_mt = durable_copy(mt_input, root / "cp-mt")
        print(f"  cp -r + sync of the MaxText ckpt   : {floor_mt.wall_s:7.2f} s  (durable floor, maxtext-to-hf)")
        for workers in [*counts, None]:
            label = f"--workers {workers}" if workers else f"default ({default_workers()})"
            out = root / f"hf-{workers or 'default'}"
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            warm_tree(mt_input)
            flags = ["--workers", str(workers)] if workers else []
            r = run_measured([*ckpt, "maxtext-to-hf", str(mt_input), "--out", str(out), "-q", *flags])
            assert r.returncode == 0, f"maxtext-to-hf {label} failed"
            same = "" if "mt" not in first else f"; identical to {first['mt'].name}: {same_tree(first['mt'], out)}"
            first.setdefault("mt", out)
            print(f"  maxtext-to-hf {label:<20}: {r.wall_s:7.2f} s  peak RSS {gb(r.peak_rss)}  "
                  f"= {r.wall_s / floor_mt.wall_s:.2f}x durable cp -r{same}")
        if not args.keep:
            for d in [*root.glob("mt-*"), *root.glob("hf-*")]:
                shutil.rmtree(d)
    if not args.keep and args.dir is None:
        shutil.rmtree(root)
    os.sync()


if __name__ == "__main__":
    main()
