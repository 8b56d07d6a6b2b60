"""This machine: free RAM and disk where the output goes, and short probes of its read, durable-write and
transform rates (what `ckpt plan` prices time with)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PROBE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Rates:
    """Throughputs in GB/s, and where each came from ("probe", "flag" or "assumed")."""

    read_gbps: float
    write_gbps: float
    cpu_gbps: float
    net_gbps: float | None = None
    basis: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Machine:
    """Free RAM and free disk (bytes) where the output goes, and the CPU count."""

    available_ram: int
    free_disk: int
    disk_path: str
    cpus: int


def this_machine(out: Path | None) -> Machine:
    """Free RAM (MemAvailable) and free disk where the output goes."""
    probe = existing(Path(out).resolve().parent if out else Path.cwd())
    return Machine(available_ram(), shutil.disk_usage(probe).free, str(probe), os.cpu_count() or 1)


MAX_DEFAULT_WORKERS = 16
RAM_PER_WORKER = 512 * 1024 * 1024    # what one more reader thread may hold at its peak, with room to spare


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(cpus: int | None = None, ram: int | None = None) -> int:
    """The reader/transform threads of a conversion when --workers is not given: one per core (reads, numpy and
    tensorstore release the GIL, and the reverse direction is CPU bound at 2), at most 16, and no more than
    available memory affords at RAM_PER_WORKER each; never fewer than 1."""
    cpus = usable_cpus() if cpus is None else cpus
    ram = available_ram() if ram is None else ram
    return max(1, min(cpus, MAX_DEFAULT_WORKERS, ram // RAM_PER_WORKER))


def available_ram() -> int:
    """MemAvailable: what can be allocated without swapping (page cache that can be dropped included)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def probe_rates(probe_file: Path | None, out: Path | None, writer: str, workers: int,
                read_gbps: float | None = None, write_gbps: float | None = None,
                net_gbps: float | None = None) -> Rates:
    """This machine's read, durable-write and transform rates, measured briefly unless given."""
    basis = {}
    if read_gbps is None:
        read_gbps = _probe_read(probe_file) if probe_file else None
        basis["read"] = "probe" if read_gbps else "assumed"
        read_gbps = read_gbps or 1.0
    else:
        basis["read"] = "flag"
    if write_gbps is None:
        write_gbps = _probe_write(existing(Path(out).resolve().parent if out else Path.cwd()), writer)
        basis["write"] = "probe"
    else:
        basis["write"] = "flag"
    cpu = _probe_cpu() * max(1, min(workers, os.cpu_count() or 1))
    basis["cpu"] = "probe"
    basis["net"] = "flag" if net_gbps else "unknown"
    return Rates(read_gbps, write_gbps, cpu, net_gbps, basis)


def _probe_read(path: Path) -> float | None:
    """pread up to 64 MB from the middle of a source file, as it is cached right now."""
    size = path.stat().st_size
    n = min(PROBE_BYTES, size)
    if n < 1 << 20:
        return None
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        done, offset = 0, (size - n) // 2
        while done < n:
            done += len(os.pread(fd, min(8 << 20, n - done), offset + done))
    finally:
        os.close(fd)
    return n / max(time.perf_counter() - start, 1e-6) / 1e9


def _probe_write(where: Path, writer: str) -> float:
    """The durable write rate, the way the output will be written (through OrbaxWriter, or pwrite).

    A durable write costs its bytes plus a fixed flush latency (large on virtual disks, whose host
    persists only when asked). A conversion pays that latency once, not per 64 MB, so the rate is the
    slope between a small and a large timed write (32 and 96 MB), not one write's bytes over its time.
    """
    small = _timed_write(where, writer, PROBE_BYTES // 2)
    large = _timed_write(where, writer, PROBE_BYTES * 3 // 2)
    slope = PROBE_BYTES / max(large - small, 1e-6)
    average = PROBE_BYTES * 3 // 2 / max(large, 1e-6)
    return min(max(slope, average), 4 * average) / 1e9      # noise guard: never below one write's average


def _timed_write(where: Path, writer: str, nbytes: int) -> float:
    """Seconds to write and make durable `nbytes` in 8 MB pieces."""
    import ml_dtypes

    from ckpt_cli.io import orbax as orbax_io

    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-probe-", dir=where))
    try:
        pieces = nbytes // (8 << 20)
        rows = (8 << 20) // (1024 * 2)
        block = np.random.default_rng(0).integers(0, 1 << 15, (rows, 1024), dtype=np.uint16)
        start = time.perf_counter()
        if writer == "orbax":
            w = orbax_io.OrbaxWriter(tmp / "probe", orbax_io.StorageOptions())
            w.create("probe", (pieces, rows, 1024), np.dtype(ml_dtypes.bfloat16), (1, rows, 1024))
            for i in range(pieces):
                w.write("probe", (i,), block.view(ml_dtypes.bfloat16))
            w.finalize({})
        else:
            fd = os.open(tmp / "probe.bin", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for i in range(pieces):
                    os.pwrite(fd, block.tobytes(), i * block.nbytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _probe_cpu() -> float:
    """One thread's transpose rate on a 32 MB bf16 matrix (the engine's commonest transform)."""
    from ckpt_cli.transforms import transpose2d

    x = np.random.default_rng(0).integers(0, 1 << 15, (4096, 4096), dtype=np.uint16)
    transpose2d(x[:256])
    start = time.perf_counter()
    transpose2d(x)
    return x.nbytes / max(time.perf_counter() - start, 1e-6) / 1e9


def existing(path: Path) -> Path:
    """The nearest existing ancestor (where a not yet created output's disk is measured)."""
    while not path.exists():
        path = path.parent
    return path
