"""Benchmark: MaxText -> HF on a full-size Qwen3-0.6B-shaped checkpoint (random bf16 weights, made on the fly).

Converts the synthetic HF folder to MaxText with ckpt (scanned, one layer per chunk), then back with
`ckpt convert maxtext-to-hf`, and optionally (--maxtext-layout) from the same weights re-saved the way
MaxText saves them (orbax CheckpointManager, 16 simulated devices: every chunk holds all 28 layers).
Prints wall time (interpreter start-up and the final fsync included) and peak RSS of each run, the ratio
to `cp -r` of the same MaxText checkpoint measured in the same run, and checks the output is bit-identical
to the synthetic source.

Usage: python benchmarks/bench_to_hf.py [--dir DIR] [--maxtext-layout] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth import du, gb, run_measured, write_synthetic  # noqa: E402

RESAVE = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=16"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np, orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
src, dst = sys.argv[1], sys.argv[2]
params = ocp.PyTreeCheckpointer().restore(os.path.join(src, "0", "items"))["params"]
mesh = Mesh(np.array(jax.devices()), ("x",))
def shard(x):
    spec = P("x") if x.ndim and x.shape[0] % 16 == 0 else P(None, "x") if x.ndim > 1 and x.shape[1] % 16 == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))
state = {"step": 0, "params": jax.tree_util.tree_map(shard, params), "opt_state": {}}
m = ocp.CheckpointManager(dst, item_names=("items",), options=ocp.CheckpointManagerOptions(
    create=True, enable_async_checkpointing=False),
    item_handlers={"items": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)})
m.save(0, args=ocp.args.Composite(items=ocp.args.PyTreeSave(item=state)), custom_metadata={"scan_layers": True})
m.wait_until_finished()
"""


def warm(folder: Path) -> None:
    """Read every file under `folder` once, so the input is page-cached."""
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def identical(src: Path, out: Path) -> bool:
    from safetensors import safe_open

    a = safe_open(str(src / "model.safetensors"), "np")
    b = safe_open(str(out / "model.safetensors"), "np")
    if set(a.keys()) != set(b.keys()):
        return False
    return all(np.array_equal(a.get_tensor(k).view(np.uint16), b.get_tensor(k).view(np.uint16)) for k in a.keys())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--maxtext-layout", action="store_true", help="also convert a MaxText-saved copy (slow setup)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="ckpt-bench-to-hf-"))
    src = root / "Qwen3-0.6B-synthetic"
    if not (src / "model.safetensors").exists():
        print("writing synthetic Qwen3-0.6B (bf16, random) ...", flush=True)
        write_synthetic(src, "qwen3-0.6b")
    mt = root / "mt"
    if not (mt / "0" / "commit_success.txt").exists():
        r = run_measured([sys.executable, "-m", "ckpt_cli", "convert", "hf-to-maxtext", str(src), "--out", str(mt),
                          "--overwrite", "-q"])
        assert r.returncode == 0
    sources = {"ckpt-written (1 layer/chunk)": (mt, [])}
    if args.maxtext_layout:
        mtx = root / "mt-maxtext-layout"
        if not (mtx / "0" / "commit_success.txt").exists():
            print("re-saving the checkpoint the way MaxText does (orbax, 16 simulated devices) ...", flush=True)
            env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
            r = run_measured([sys.executable, "-c", RESAVE, str(mt), str(mtx)], env=env)
            assert r.returncode == 0
        sources["MaxText-written (28 layers/chunk)"] = (mtx, ["--model", "qwen3-0.6b"])
    warm(mt / "0" / "items")
    cp = run_measured(["cp", "-r", str(mt), str(root / "cp-copy")])
    shutil.rmtree(root / "cp-copy")
    print(f"\nQwen3-0.6B-shaped bf16, {gb(du(mt))} MaxText checkpoint (page-cached)")
    print(f"cp -r of the MaxText checkpoint: {cp.wall_s:6.2f} s  peak RSS {gb(cp.peak_rss)}")
    runs = {}
    for i, (label, (path, flags)) in enumerate(sources.items()):
        out = root / f"hf-{i}"
        shutil.rmtree(out, ignore_errors=True)
        warm(path / "0" / "items")
        r = run_measured([sys.executable, "-m", "ckpt_cli", "convert", "maxtext-to-hf", str(path), "--out", str(out),
                          "--json", "--quiet", *flags])
        assert r.returncode == 0, r.stdout
        runs[label] = (r, out)
    # Compared only now: this process maps the outputs, and a child forked later would inherit its peak RSS.
    for label, (r, out) in runs.items():
        print(f"maxtext-to-hf, {label:<34}: {r.wall_s:6.2f} s  peak RSS {gb(r.peak_rss)}  "
              f"= {r.wall_s / cp.wall_s:.1f}x cp -r; output bit-identical to the source: {identical(src, out)}")
    if not args.keep and args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
