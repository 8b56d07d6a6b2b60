"""Kimi K2 (kimi-k2-1t) at full width, cut to a few layers, from a synthetic fp8 source like the release.

hidden 7168, 384 routed experts of width 2048 (+1 shared), vocabulary 163840, 64 MLA heads; the first layer
dense, the others MoE. Every attention and MLP projection is float8_e4m3fn with a float32 `weight_scale_inv`
per 128x128 block (as moonshotai/Kimi-K2-Instruct stores them), the rest bf16. The source is written streaming,
one tensor at a time (never whole in RAM).

Measures, in one run:

1. `cp -r` of the source, then `sync` (durable, as the conversion is): the baseline;
2. `ckpt convert hf-to-maxtext SOURCE --out OUT` (bf16, scanned), wall time and peak RSS;
3. `ckpt verify-logits --maxtext OUT --hf SOURCE --dtype bf16` (MoE layers stream their experts), wall time,
   peak RSS and the memory plan it prints up front.

Everything generated is deleted at the end (also on failure). Usage:

    python benchmarks/bench_kimi_experts.py --dir /tmp/kimi-bench --layers 2 [--vocab 32768]

Disk: the source is 22.3 GB and the bf16 output 39.8 GB (with --vocab 32768: 18.5 GB and 36.0 GB), the copy
for the baseline is removed before the conversion.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.synth import du, gb, hf_tensors, random_bf16, run_measured  # noqa: E402
from ckpt_cli import registry  # noqa: E402
from ckpt_cli.families.deepseek import fp8_released  # noqa: E402
from ckpt_cli.io.safetensors import PlannedTensor, StreamingSafetensorsWriter  # noqa: E402

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
BLOCK = 128


class RandomPool:
    """Random values made once (64 MB) and handed out as consecutive windows of a cycle through them: tensors of
    random-looking values at memory-copy speed, each tensor (each expert) a different window. On a machine shared
    by many (2 cores), drawing 17 GB of fresh random values would take a large part of the benchmark's time."""

    def __init__(self, values: np.ndarray):
        self.pool = values.reshape(-1)
        self.pos = 0
        self.step = 4099   # coprime with the pool size: successive windows start at different offsets

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape))
        out = np.empty(n, dtype=self.pool.dtype)
        done = 0
        while done < n:
            k = min(n - done, self.pool.size - self.pos)
            out[done:done + k] = self.pool[self.pos:self.pos + k]
            done += k
            self.pos = (self.pos + k) % self.pool.size
        self.pos = (self.pos + self.step) % self.pool.size
        return out.reshape(shape)


def e4m3_pool(rng: np.random.Generator, size: int = 64 << 20) -> RandomPool:
    """e4m3 values of magnitude 2^-4..2^1 (random sign and mantissa; exponent field 3..8: never NaN)."""
    r = rng.integers(0, 1 << 8, size, dtype=np.uint8)
    exponent = (r >> np.uint8(3)) % np.uint8(6) + np.uint8(3)
    return RandomPool(((r & np.uint8(0x87)) | (exponent << np.uint8(3))).view(E4M3))


def bf16_pool(rng: np.random.Generator, size: int = 32 << 20) -> RandomPool:
    """bf16 weights of magnitude ~1e-5..0.06, as `synth.random_bf16` makes them."""
    return RandomPool(random_bf16(rng, (size,)))


def write_source(folder: Path, layers: int, vocab: int | None = None, shard_bytes: int = 5 * 10**9,
                 seed: int = 0) -> dict:
    """config.json + safetensors shards of the kimi-k2-1t reference config cut to `layers` decoder layers (and,
    with `vocab`, a smaller vocabulary: the width of every layer stays full)."""
    folder.mkdir(parents=True)
    config = registry.reference_config("kimi-k2-1t") | {"num_hidden_layers": layers}
    if vocab:
        config |= {"vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    planned: list[PlannedTensor] = []
    for t in hf_tensors(config):
        if fp8_released(config, t.name):
            rows, cols = t.shape
            planned.append(PlannedTensor(t.name, E4M3, t.shape))
            planned.append(PlannedTensor(t.name + "_scale_inv", np.dtype(np.float32),
                                         (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))))
        else:
            planned.append(t)
    planned.sort(key=lambda t: t.name)
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in planned:
        if size + t.nbytes > shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    rng = np.random.default_rng(seed)
    fp8_values, bf16_values = e4m3_pool(rng), bf16_pool(rng)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        writer = StreamingSafetensorsWriter(folder / name, shard, {"format": "pt"})
        for t in shard:
            if t.dtype == E4M3:
                value = fp8_values.take(t.shape)
            elif t.name.endswith("_scale_inv"):
                value = rng.uniform(0.005, 0.02, t.shape).astype(np.float32)
            elif t.name.endswith("e_score_correction_bias"):
                value = rng.uniform(-0.01, 0.01, t.shape).astype(np.float32).astype(t.dtype)
            else:
                value = bf16_values.take(t.shape)
            writer.write(t.name, value)
            weight_map[t.name] = name
            del value
        writer.close()
    total = sum(t.nbytes for t in planned)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return config


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kimi-experts-bench"))
    ap.add_argument("--layers", type=int, default=2, help="decoder layers kept (the first is dense)")
    ap.add_argument("--vocab", type=int, default=None,
                    help="cut the vocabulary (163840) to this many rows, to fit a smaller disk; layers stay full width")
    ap.add_argument("--zstd", action="store_true",
                    help="convert with --compression zstd (the dequantized bf16 experts shrink to ~55%%) and without "
                         "the free-disk check, which counts the uncompressed bytes: for a disk that cannot hold "
                         "source and uncompressed output together")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--skip-verify", action="store_true")
    args = ap.parse_args()
    if args.dir.exists():
        raise SystemExit(f"{args.dir} exists: give a new --dir")
    src, copy, out = args.dir / "src", args.dir / "src-copy", args.dir / "mt"
    ckpt = [sys.executable, "-m", "ckpt_cli"]
    figures: dict = {"layers": args.layers, "vocab": args.vocab or 163840, "zstd": args.zstd}
    try:
        t = time.perf_counter()
        write_source(src, args.layers, args.vocab)
        figures["generate_s"] = round(time.perf_counter() - t, 1)
        figures["source_bytes"] = du(src)
        print(f"source: {gb(figures['source_bytes'])} in {figures['generate_s']} s ({load()})", flush=True)

        subprocess.run(["sync"], check=True)
        free = shutil.disk_usage(args.dir).free
        print(f"free disk {gb(free)} ({load()})", flush=True)
        t = time.perf_counter()
        subprocess.run(["cp", "-r", str(src), str(copy)], check=True)
        subprocess.run(["sync"], check=True)
        figures["cp_s"] = round(time.perf_counter() - t, 1)
        print(f"cp -r + sync: {figures['cp_s']} s ({gb(figures['source_bytes'] / figures['cp_s'])}/s) ({load()})",
              flush=True)
        shutil.rmtree(copy)
        subprocess.run(["sync"], check=True)

        convert = ckpt
        if args.zstd:
            convert = [sys.executable, "-c", "import runpy, sys, ckpt_cli.convert as c; "
                       "c.check_free_space = lambda *a: None; sys.argv[0] = 'ckpt'; "
                       "runpy.run_module('ckpt_cli', run_name='__main__')"]
        r = run_measured([*convert, "convert", "hf-to-maxtext", str(src), "--out", str(out), "--dtype", "bf16",
                          "--json", "-q", *(["--compression", "zstd"] if args.zstd else [])])
        if r.returncode:
            raise SystemExit(f"convert failed ({r.returncode})")
        figures |= {"convert_s": round(r.wall_s, 1), "convert_peak_rss": r.peak_rss, "out_bytes": du(out)}
        print(f"convert: {r.wall_s:.1f} s ({gb(figures['source_bytes'] / r.wall_s)}/s read, "
              f"{gb(figures['out_bytes'] / r.wall_s)}/s written), peak RSS {gb(r.peak_rss)}, "
              f"{r.wall_s / figures['cp_s']:.2f}x cp -r ({load()})", flush=True)

        if not args.skip_verify:
            r = run_measured([*ckpt, "verify-logits", "--maxtext", str(out), "--hf", str(src), "--dtype", "bf16",
                              "--json"])
            data = json.loads(r.stdout) if r.stdout.strip() else {}
            figures |= {"verify_s": round(r.wall_s, 1), "verify_peak_rss": r.peak_rss,
                        "verify_rc": r.returncode, "verdict": data.get("verdict"),
                        "memory_plan": data.get("memory_plan"), "reference": data.get("reference"),
                        "timings_s": data.get("timings_s")}
            print(f"verify-logits: {r.wall_s:.1f} s, peak RSS {gb(r.peak_rss)}, exit {r.returncode}: "
                  f"{data.get('verdict')} ({load()})", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
