"""Benchmark: how close `ckpt plan` comes to what `ckpt convert` then does, on this machine.

For a Qwen3-0.6B-shaped source (one 1.2 GB file) and a sharded multi-GB source (Qwen3-1.7B-shaped,
1 GB shards), both synthetic bf16 made on the fly: run `ckpt plan hf-to-maxtext SRC --out OUT --json`
(its own probes, no rate flags), then `ckpt convert hf-to-maxtext SRC --out OUT` --repeat times
(input page-cached, as in the other benchmarks), and compare predicted against measured:

* peak RSS (the child's own ru_maxrss): bar +-25% of the mean measured, each run listed;
* output bytes on disk (every file under OUT): bar 5%;
* wall time (process start to exit): bar a factor of 2 either way.

The maxtext-to-hf direction is priced and measured --repeat times on the 0.6B output, under the same bars. The ratio
to `cp -r` of the same input, measured in the same run, is printed as the baseline.

Usage: python benchmarks/bench_plan.py [--dir DIR] [--repeat 3] [--models qwen3-0.6b,qwen3-1.7b] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth import du, gb, run_measured, write_synthetic  # noqa: E402

SHARDED = {"qwen3-0.6b": 0, "qwen3-1.7b": 1_000_000_000, "qwen3-4b": 1_000_000_000}


def ckpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "ckpt_cli", *args]


def plan(direction: str, src: Path, out: Path) -> dict:
    r = subprocess.run(ckpt("plan", direction, str(src), "--out", str(out), "--json"), capture_output=True,
                       text=True)
    if r.returncode not in (0, 1):
        raise SystemExit(f"plan failed: {r.stderr}")
    return json.loads(r.stdout)


def measure(cmd: list[str], src: Path, out: Path, repeat: int) -> list[tuple[float, int, int]]:
    """(wall s, peak RSS, output bytes) of each run; the output is removed before each run."""
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        warm_tree(src)
        r = run_measured(cmd)
        if r.returncode != 0:
            raise SystemExit(f"convert failed ({r.returncode}): {' '.join(cmd)}")
        runs.append((r.wall_s, r.peak_rss, du(out)))
    return runs


def warm_tree(root: Path) -> None:
    """Read every file under `root` once (page-cached input, as in the reference measurements)."""
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def within(predicted: float, measured: float, tolerance: float) -> bool:
    return abs(predicted - measured) <= tolerance * measured


def report(label: str, predicted: dict, runs: list[tuple[float, int, int]], cp_s: float | None) -> bool:
    walls, rss, sizes = zip(*runs, strict=True)
    rss_mean, wall_mean = statistics.mean(rss), statistics.mean(walls)
    p_rss, p_bytes, p_time = (predicted["memory"]["peak_rss"], predicted["bytes"]["output_on_disk"],
                              predicted["time"]["estimate_s"])
    ok_rss = within(p_rss, rss_mean, 0.25)
    ok_bytes = within(p_bytes, sizes[-1], 0.05)
    ok_time = 0.5 <= p_time / wall_mean <= 2.0
    print(f"\n{label}")
    print(f"  peak RSS : predicted {gb(p_rss)}, measured mean {gb(rss_mean)} "
          f"(runs {', '.join(gb(x) for x in rss)})  -> {p_rss / rss_mean - 1:+.0%}  {'OK' if ok_rss else 'MISS'}")
    print(f"  output   : predicted {p_bytes:,} B, measured {sizes[-1]:,} B  -> {p_bytes / sizes[-1] - 1:+.2%}  "
          f"{'OK' if ok_bytes else 'MISS'}")
    print(f"  time     : predicted {p_time:.1f} s, measured mean {wall_mean:.1f} s "
          f"(runs {', '.join(f'{x:.1f}' for x in walls)})  -> x{p_time / wall_mean:.2f}  {'OK' if ok_time else 'MISS'}"
          + (f"   [cp -r baseline {cp_s:.2f} s: convert = {wall_mean / cp_s:.1f}x cp]" if cp_s else ""))
    rates = predicted["rates"]
    print(f"  plan used: read {rates['read_gbps']} / write {rates['write_gbps']} / transform {rates['cpu_gbps']} GB/s "
          f"({rates['basis']}); memory parts {json.dumps({k: v for k, v in predicted['memory'].items()})}")
    return ok_rss and ok_bytes and ok_time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", default="qwen3-0.6b,qwen3-1.7b")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="ckpt-bench-plan-"))
    results = {}
    for model in args.models.split(","):
        src = root / f"{model}-synthetic"
        if not (src / "config.json").exists():
            print(f"writing synthetic {model} (bf16, random, shards of {SHARDED[model] or 'one file'}) ...",
                  flush=True)
            write_synthetic(src, model, shard_bytes=SHARDED[model])
        out = root / f"{model}-mt"
        warm_tree(src)
        cp = run_measured(["cp", "-r", str(src), str(root / "cp-copy")])
        shutil.rmtree(root / "cp-copy")
        predicted = plan("hf-to-maxtext", src, out)
        runs = measure(ckpt("convert", "hf-to-maxtext", str(src), "--out", str(out), "--json"), src, out,
                       args.repeat)
        results[model] = report(f"{model} hf-to-maxtext: {gb(du(src))} input, "
                                f"{len(list(src.glob('*.safetensors')))} shard(s)", predicted, runs, cp.wall_s)
        if model == "qwen3-0.6b":
            back = root / f"{model}-hf"
            predicted = plan("maxtext-to-hf", out, back)
            runs = measure(ckpt("convert", "maxtext-to-hf", str(out), "--out", str(back), "--json"), out, back,
                           args.repeat)
            results[f"{model} reverse"] = report(f"{model} maxtext-to-hf", predicted, runs, None)
            shutil.rmtree(back, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    print("\nbars (RSS +-25% of mean, output bytes 5%, time x2): "
          + ", ".join(f"{m} {'met' if ok else 'NOT met'}" for m, ok in results.items()))
    if not args.keep and args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
