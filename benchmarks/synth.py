"""Synthetic full-size checkpoints with real names and shapes and random weights, written streaming.

Used by the benchmarks (never by the test suite): the shapes come from a registry model's reference
config through the conversion plan itself, so every tensor the converter reads exists.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from ckpt_cli import registry
from ckpt_cli.dtypes import FP8
from ckpt_cli.families import detect_family
from ckpt_cli.io.safetensors import PlannedTensor, StreamingSafetensorsWriter
from ckpt_cli.plan import build_to_hf


def hf_tensors(config: dict, fp8: bool = False) -> list[PlannedTensor]:
    """Every HF tensor the plan for this config reads, with its shape, as bf16; with `fp8` (a -fp8 name) the weights
    MaxText's fp8 tree keeps are float8_e4m3fn with their float32 `weight_scale_inv`, as the releases store them."""
    # The reverse plan's targets are the HF tensors whole (a per-task source shape is one expert of a fused
    # expert tensor, or one part of it).
    plan = build_to_hf(detect_family(config), config, True, np.dtype(FP8 if fp8 else np.float32))
    return [PlannedTensor(t.target, np.dtype(t.dtype) if t.quant else np.dtype(ml_dtypes.bfloat16), t.shape)
            for t in plan.tensors]


def write_synthetic(folder: Path, model: str, shard_bytes: int = 0, seed: int = 0, layers: int | None = None) -> Path:
    """Write config.json + safetensors shard(s) of random bf16 weights for a registry model (`layers`: keep only
    the first that many decoder layers, every other dimension full size)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = registry.reference_config(model)
    if layers is not None:
        config["num_hidden_layers"] = layers
        if config.get("layer_types"):
            config["layer_types"] = config["layer_types"][:layers]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = sorted(hf_tensors(config, registry.lookup(model).dtype == "fp8"), key=lambda t: t.name)
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shard_bytes and size + t.nbytes > shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    rng = np.random.default_rng(seed)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        writer = StreamingSafetensorsWriter(folder / name, shard, {"format": "pt"})
        for t in shard:
            writer.write(t.name, random_like(rng, t))
            weight_map[t.name] = name
        writer.close()
    if len(shards) > 1:
        total = sum(t.nbytes for t in tensors)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return folder


def random_like(rng: np.random.Generator, t: PlannedTensor) -> np.ndarray:
    """Random weights of the tensor's dtype: bf16 (below), e4m3 bytes (NaN codes avoided) or float32 block scales."""
    if t.dtype == FP8:
        x = rng.integers(0, 256, t.shape, dtype=np.uint8)
        x[(x & 0x7F) == 0x7F] ^= 1
        return x.view(FP8)
    if t.dtype == np.float32:
        return rng.uniform(1e-4, 1e-3, t.shape).astype(np.float32)
    return random_bf16(rng, t.shape)


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random bf16 weights of magnitude ~1e-5..0.06 (random sign and mantissa, exponent in a narrow band).

    Built from random bits (about 1 GB/s), so multi-GB synthetic checkpoints are quick to make.
    """
    out = np.empty(shape, dtype=np.uint16)
    flat = out.reshape(-1)
    step = 32 << 20
    for i in range(0, flat.size, step):
        n = min(step, flat.size - i)
        r = rng.integers(0, 1 << 16, n, dtype=np.uint16)
        exponent = ((r >> 7) & np.uint16(0x7)) + np.uint16(118)
        flat[i:i + n] = (r & np.uint16(0x807F)) | (exponent << np.uint16(7))
    return out.view(ml_dtypes.bfloat16)


@dataclass
class Run:
    wall_s: float
    peak_rss: int
    returncode: int
    stdout: str


def installed_env(env: dict | None = None) -> dict:
    """The environment of an installed tool: our modules byte-compiled (as `pip install` leaves them) and
    PYTHONDONTWRITEBYTECODE unset, so start-up is not charged for compiling sources on every run."""
    import compileall

    import ckpt_cli

    compileall.compile_dir(Path(ckpt_cli.__file__).parent, quiet=1)
    return {k: v for k, v in (env or os.environ).items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_measured(cmd: list[str], env: dict | None = None) -> Run:
    """Run a command; wall time and the child's own peak RSS.

    Linux charges a child the high-water RSS of the parent it was forked from (kept across exec), so a
    benchmark that generated its input in-process would inflate every child's figure. GNU time, itself
    small, forks the command and reports that grandchild's own peak; without it, wait4's figure is used.
    """
    env = installed_env(env)
    gnu_time = Path("/usr/bin/time")
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        full = [str(gnu_time), "-o", rss.name, "-f", "%M", *cmd] if gnu_time.exists() else cmd
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdout=subprocess.PIPE, text=True, env=env)
        out = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        lines = [ln for ln in rss.read().splitlines() if ln.strip().isdigit()]
        peak = int(lines[-1]) * 1024 if lines else usage.ru_maxrss * 1024
    return Run(wall, peak, proc.returncode, out)


def drop_file(path: Path) -> None:
    """Evict a file from the page cache (best effort)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(folder: Path) -> None:
    """Read every file once so the input is page-cached, as in the reference measurements."""
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def peak_self() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def params_of(model: str) -> int:
    return sum(math.prod(t.shape) for t in hf_tensors(registry.reference_config(model)))
