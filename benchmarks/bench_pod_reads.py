"""Benchmark (issue 18): bytes each host reads restoring a checkpoint, and what read chunks cost the conversion.

One synthetic Qwen3-0.6B-shaped HF folder (random bf16, full width, `--layers` decoder layers) is converted three
ways in one run:
  before       ckpt with one chunk per layer slice (`--target-mesh fsdp=1,tensor=1`: exactly the layout ckpt wrote
               before read chunks)
  after        ckpt's default (zarr3 sharding codec: read chunks cut 16 ways along the dims MaxText shards)
  maxtext-like the same weights saved by Orbax as MaxText's converter saves them (16 devices, arrays sharded 16
               ways along axis 0, else 1: every chunk holds all layers)
Then hosts x devices (1x16, 2x4, 4x4; MaxText's default FSDP over all devices) read their slices
(tests/pod_reads.py: jax shardings from MaxText's logical-axis rules, tensorstore reads, a batch per host as Orbax
does, bytes counted by tensorstore), and the reverse conversion (maxtext-to-hf, one layer at a time) runs on each.
Prints bytes read / array bytes (all hosts together), conversion wall time and peak RSS.

Usage: python benchmarks/bench_pod_reads.py [--layers 4] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from bench_to_hf import RESAVE  # noqa: E402
from synth import gb, run_measured, write_synthetic  # noqa: E402

from tests.pod_reads import array_bytes, measure  # noqa: E402

CASES = [(1, "fsdp=16"), (2, "fsdp=8"), (4, "fsdp=16")]     # hosts x devices: 1x16, 2x4, 4x4


def ckpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "ckpt_cli", *args]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-pod-", dir=args.dir))
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    try:
        src = write_synthetic(root / "hf", "qwen3-0.6b", layers=args.layers)
        runs = {}
        for name, extra in (("before", ["--target-mesh", "fsdp=1,tensor=1"]), ("after", [])):
            runs[name] = run_measured(ckpt("convert", "hf-to-maxtext", str(src), "--out", str(root / name),
                                           "--quiet", *extra), env)
            assert runs[name].returncode == 0, name
        mtx = root / "maxtext-like"
        jax_env = {k: v for k, v in env.items() if k != "XLA_FLAGS"}
        subprocess.run([sys.executable, "-c", RESAVE, str(root / "before"), str(mtx)], check=True, env=jax_env)
        items = {"before": root / "before" / "0" / "items", "after": root / "after" / "0" / "items",
                 "maxtext-like": mtx / "0" / "items"}
        total = array_bytes(str(items["after"]))
        print(f"Qwen3-0.6B shapes, {args.layers} layers, bf16: {gb(total)} of arrays")
        print("bytes read, all hosts together / array bytes")
        print(f"{'hosts x devices':16}" + "".join(f"{n:>14}" for n in items))
        reads = {n: measure(p, CASES, root, readers=2) for n, p in items.items()}
        for hosts, mesh in CASES:
            case = f"{hosts}x{mesh}"
            devices = int(mesh.split("=")[1]) // hosts
            cells = [sum(h["bytes_read"] for h in reads[n][case]) / total for n in items]
            print(f"{f'{hosts} x {devices}':16}" + "".join(f"{c:14.3f}" for c in cells))
        print(f"\n{'hf-to-maxtext':16}{'wall s':>10}{'peak RSS GB':>14}")
        for name, r in runs.items():
            print(f"{name:16}{r.wall_s:10.2f}{r.peak_rss / 1e9:14.3f}")
        print(f"\n{'maxtext-to-hf from':20}{'wall s':>10}{'peak RSS GB':>14}")
        for name in items:
            extra = ["--hf-config", str(src / "config.json")] if name == "maxtext-like" else []
            r = run_measured(ckpt("convert", "maxtext-to-hf", str(items[name].parent.parent), "--out",
                                  str(root / f"hf-{name}"), "--quiet", *extra), env)
            assert r.returncode == 0, name
            print(f"{name:20}{r.wall_s:10.2f}{r.peak_rss / 1e9:14.3f}")
        sizes = {n: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for n, p in items.items()}
        print("\non disk: " + ", ".join(f"{n} {gb(s)}" for n, s in sizes.items()))
        print(json.dumps({"reads": {n: {c: sum(h["bytes_read"] for h in v) / total for c, v in r.items()}
                                    for n, r in reads.items()}}))
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
