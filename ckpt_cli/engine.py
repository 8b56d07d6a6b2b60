"""Executes a plan as a stream: read one source slice, transform, cast, write one target slice, drop it.

Reads and transforms run on a small thread pool (file reads, numpy copies and tensorstore all release
the GIL), ordered by where the sources sit on disk; writes are staged from the calling thread. A
byte budget bounds what is held at once, so peak memory depends on the largest slice, not on the
model. The engine knows nothing of model families.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from ckpt_cli.dtypes import is_float
from ckpt_cli.errors import ShapeMismatchError
from ckpt_cli.plan import ConversionPlan, SliceTask, SourceSlice, TensorPlan, write_key
from ckpt_cli.resources import peak_rss_bytes


class Reader(Protocol):
    def describe(self, name: str) -> tuple[tuple[int, ...], np.dtype]: ...   # full shape and dtype of a source
    def read(self, source: SourceSlice) -> np.ndarray: ...
    def order_key(self, source: SourceSlice) -> tuple: ...


class Writer(Protocol):
    def create(self, target: str, shape: tuple[int, ...], dtype: np.dtype, chunk: tuple[int, ...],
               read_chunk: tuple[int, ...] | None = None) -> None: ...
    def write(self, target: str, index: tuple, array: np.ndarray) -> int: ...
    def flush(self) -> None: ...


@dataclass
class Stats:
    """What a run did: counts, bytes and time."""

    tensors: int = 0
    tasks: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    wall_s: float = 0.0
    peak_rss: int = 0
    extra: dict = field(default_factory=dict)


MIN_BUDGET = 192 << 20
ProgressFn = Callable[[int, int], None]   # (bytes done, bytes total)


def source_slice_shape(shape: tuple[int, ...], source: SourceSlice) -> tuple[int, ...]:
    return tuple(s for a, s in enumerate(shape) if a not in source.axes)


def validate(plan: ConversionPlan, reader: Reader) -> None:
    """Every source present with the planned shape and a float dtype, before anything is written."""
    for tensor in plan.tensors:
        for task in tensor.tasks:
            shape, dtype = reader.describe(task.source.name)
            got = source_slice_shape(shape, task.source)
            want = task.source.shape or tensor.source_shape
            if got != want:
                raise ShapeMismatchError(f"tensor {task.source.name}: expected shape {want} "
                                         f"for {tensor.target}, found {got}")
            if not is_float(dtype):
                raise ShapeMismatchError(f"tensor {task.source.name}: expected a float dtype, found {dtype}")


def execute(plan: ConversionPlan, reader: Reader, writer: Writer, progress: ProgressFn | None = None,
            workers: int = 2, budget_bytes: int | None = None, skip: Collection[tuple] = ()) -> Stats:
    """Run every task of the plan once, but those whose write is in `skip` (`plan.write_key`s already
    written by an interrupted run). Returns Stats; raises on the first failure (after cancelling)."""
    start = time.perf_counter()
    for t in plan.tensors:
        writer.create(t.target, t.shape, t.dtype, t.chunk_shape, read_chunk=t.read_chunk)
    jobs = ordered_jobs(plan, reader, skip)
    total = sum(_task_bytes(t, task) for t, task in jobs)
    budget = budget_bytes or default_budget(plan)
    stats = Stats(tensors=len(plan.tensors), tasks=len(jobs))
    if skip:
        stats.extra["resumed_tasks"] = sum(len(t.tasks) for t in plan.tensors) - len(jobs)

    def run(tensor: TensorPlan, task: SliceTask) -> tuple[np.ndarray, int]:
        x = reader.read(task.source)
        nbytes = x.nbytes
        return tensor.apply(x, plan.direction, task), nbytes

    in_flight: deque[tuple[TensorPlan, SliceTask, Future, int]] = deque()
    held = 0
    done = 0
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckpt-io")
    try:
        it = iter(jobs)
        nxt = next(it, None)
        while nxt is not None or in_flight:
            while nxt is not None and (not in_flight or held + task_cost(*nxt) <= budget):
                cost = task_cost(*nxt)
                in_flight.append((nxt[0], nxt[1], pool.submit(run, *nxt), cost))
                held += cost
                nxt = next(it, None)
            tensor, task, fut, cost = in_flight.popleft()
            array, nread = fut.result()
            stats.bytes_read += nread
            writer.write(tensor.target, tensor.target_index(task), array)
            stats.bytes_written += array.nbytes
            done += array.nbytes
            del array
            held -= cost
            if progress:
                progress(done, total)
        writer.flush()
    except BaseException:
        for *_, fut, _ in in_flight:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    stats.wall_s = time.perf_counter() - start
    stats.peak_rss = peak_rss_bytes()
    return stats


def ordered_jobs(plan: ConversionPlan, reader: Reader, skip: Collection[tuple] = ()
                 ) -> list[tuple[TensorPlan, SliceTask]]:
    """The tasks to run, in source order (sequential reads), except that tasks writing parts of one target
    region run back to back, where the first of them would run: the writer then completes each region
    while it is still in the page cache (parts of a safetensors tensor are interleaved on disk)."""
    jobs = [(t, task) for t in plan.tensors for task in t.tasks
            if not skip or write_key(t.target, t.target_index(task)) not in skip]
    keys = [reader.order_key(task.source) for _, task in jobs]
    first: dict[tuple, tuple] = {}
    regions = []
    for (t, task), key in zip(jobs, keys, strict=True):
        region = write_key(t.target, t.target_index(replace(task, part=None))) if task.part else None
        regions.append(region)
        if region is not None and (region not in first or key < first[region]):
            first[region] = key
    order = sorted(range(len(jobs)), key=lambda n: (first[regions[n]] if regions[n] else keys[n], keys[n]))
    return [jobs[n] for n in order]


def _task_bytes(tensor: TensorPlan, task: SliceTask) -> int:
    return math.prod(tensor.task_shape(task)) * np.dtype(tensor.dtype).itemsize


def default_budget(plan: ConversionPlan) -> int:
    """The byte budget of `execute` when none is given: 192 MB, or two of the costliest task if more."""
    return max(MIN_BUDGET, 2 * max(task_cost(t, task) for t in plan.tensors for task in t.tasks))


def task_cost(tensor: TensorPlan, task: SliceTask) -> int:
    """Bytes one task holds at its peak: the source slice (at most 4 bytes an element) and its result."""
    return tensor.read_elements(task) * 4 + math.prod(tensor.task_shape(task)) * np.dtype(tensor.dtype).itemsize
