"""Benchmark: a synthetic full-size DeepSeek-V2-Lite (deepseek2-16b: 15.7B params, 31 GB bf16, real names and
shapes, random bytes, written streaming) converted on this 24 GiB machine, larger than RAM.

Prints wall time and peak RSS of `ckpt convert hf-to-maxtext` (subprocess, start-up included), the ratio to
`cp -r` of the same input measured in the same run, the RSS bound (1.5 GiB + 3 x the largest source tensor),
and spot-checks the output against the source. Needs about 65 GB of free disk (input + one copy at a time).

Usage: python benchmarks/bench_deepseek_v2_lite.py [--dir DIR] [--keep-source] [--no-scan]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth import gb, run_measured, write_synthetic  # noqa: E402


def spot_check(src: Path, out: Path) -> int:
    """Compare a few expert/attention slices of the output with the source, element for element."""
    import tensorstore as ts

    from ckpt_cli.io.safetensors import SafetensorsFolder

    hf = SafetensorsFolder(src)
    checks = [("decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/wi_0", (5, 7),
               "model.layers.8.mlp.experts.5.gate_proj.weight"),
              ("decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/wo", (63, 25),
               "model.layers.26.mlp.experts.63.down_proj.weight"),
              ("decoder/dense_layers/self_attention/wkv_a/kernel", (slice(None), 0),
               "model.layers.0.self_attn.kv_a_proj_with_mqa.weight")]
    for path, index, name in checks:
        kvstore = {"driver": "ocdbt", "base": f"file://{out}/0/items/",
                   "path": "params.params." + path.replace("/", ".") + "/"}
        arr = ts.open({"driver": "zarr3", "kvstore": kvstore}).result()
        got = arr[index].read().result()
        want = np.ascontiguousarray(hf.read(name).T)
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), path
    return len(checks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--keep-source", action="store_true")
    ap.add_argument("--no-scan", action="store_true")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="ckpt-bench-ds-"))
    root.mkdir(parents=True, exist_ok=True)
    src = root / "DeepSeek-V2-Lite-synthetic"
    if not (src / "model.safetensors.index.json").exists():
        free = shutil.disk_usage(root).free
        if free < 66e9:
            sys.exit(f"needs ~66 GB free at {root}, has {gb(free)}")
        print("writing synthetic DeepSeek-V2-Lite (31 GB bf16, 4 GB shards) ...", flush=True)
        write_synthetic(src, "deepseek2-16b", shard_bytes=4_000_000_000)
    size = sum(f.stat().st_size for f in src.iterdir())
    largest = max(t.nbytes for t in __import__("ckpt_cli.io.safetensors", fromlist=["x"]).SafetensorsFolder(
        src).tensors.values())

    copy = root / "cp-copy"
    shutil.rmtree(copy, ignore_errors=True)
    cp = run_measured(["cp", "-r", str(src), str(copy)])
    shutil.rmtree(copy)
    out = root / "maxtext"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "ckpt_cli", "convert", "hf-to-maxtext", str(src), "--out", str(out), "--json"]
    if args.no_scan:
        cmd.append("--no-scan")
    run = run_measured(cmd)
    assert run.returncode == 0, run.stdout
    checked = spot_check(src, out)
    bound = 1.5 * 2**30 + 3 * largest
    print(f"\ninput: {gb(size)} synthetic DeepSeek-V2-Lite, largest tensor {gb(largest)}; machine RAM 24 GiB")
    print(f"cp -r          : {cp.wall_s:7.1f} s  ({size / cp.wall_s / 1e9:.2f} GB/s)")
    print(f"ckpt convert   : {run.wall_s:7.1f} s  ({size / run.wall_s / 1e9:.2f} GB/s)  "
          f"= {run.wall_s / cp.wall_s:.2f}x cp -r")
    print(f"peak RSS       : {gb(run.peak_rss)}  (bound 1.5 GiB + 3 x largest tensor = {gb(bound)}: "
          f"{'within' if run.peak_rss <= bound else 'EXCEEDED'})")
    print(f"spot checks    : {checked} slices equal to the source")
    shutil.rmtree(out)
    if not args.keep_source and args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
