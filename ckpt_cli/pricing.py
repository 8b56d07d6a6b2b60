"""What a conversion will cost, priced from its plan alone: memory, disk, bytes moved, time, go / no-go.

The memory model follows the engine and the writers rather than guessing:

* `BASELINE_RSS`: the interpreter with numpy, tensorstore, huggingface_hub, typer and rich loaded
  and warmed by a tiny conversion (`ckpt demo` peaks at 80 MB here).
* The engine's window: `engine.execute` admits tasks in read order while their cost (elements x
  (4 + output itemsize)) fits `engine.default_budget(plan)`; the window is simulated over the very
  task list. A finished task waiting for the writer holds its result (its source slice when the
  transform hands the source through); each of the `workers` running tasks also holds its source
  and temporaries (a float32 copy for arithmetic transforms; fp8, MXFP4 and int4 dequantization: the float32
  values of the whole slice read, and a gather temporary, 8 bytes per element read).
* The Orbax writer keeps references to staged slices until their transaction is committed: one open
  transaction and `MAX_PENDING_COMMITS` committing, each up to `BATCH_BYTES` plus one slice; a
  committing batch also has its chunks encoded, and tensorstore keeps a working set of its own:
  `WRITER_FIXED` + `WRITER_PER_BATCH` x (1 + MAX_PENDING_COMMITS) x (BATCH_BYTES + slice). The form was
  measured with the writer alone (batches of 64-256 MB, 0-2 pending commits: within 10%); the constants
  are fitted to whole conversions (tensorstore 0.1.86, glibc malloc, this 2-core machine).
  The safetensors writer pwrites at once and holds nothing; the Orbax reader (tensorstore) has a working
  set of `READER_FIXED` and a raw chunk copy per running read, and BlockReader keeps its layer blocks.
Run-to-run spread of the measured peak here is about +-15% (allocator arenas, writeback timing);
benchmarks/bench_plan.py reports predicted against measured.

Output bytes are the chunk grid (zarr stores edge chunks whole) plus metadata. Time is start-up plus
the longer of reading + transforming (the cores) and durable writing (the disk), from a short probe of
this machine or --read-gbps / --write-gbps: the writers make each committed file durable on a
background thread while the engine goes on, so the disk overlaps the rest (measured: within 1.3x).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_cli import engine
from ckpt_cli.dtypes import FP8
from ckpt_cli.io import orbax as orbax_io
from ckpt_cli.io.remote_stream import DiskNeed
from ckpt_cli.machine import Machine, Rates
from ckpt_cli.plan import TO_MAXTEXT, ConversionPlan, build_to_maxtext

BASELINE_RSS = 80 * 10**6
WRITER_FIXED = 120 * 10**6        # tensorstore's own working set while committing (fitted, see above)
WRITER_PER_BATCH = 1.5            # a staged or committing batch: its slices plus encoded chunk buffers
READER_FIXED = 100 * 10**6        # tensorstore's working set when reading an Orbax checkpoint (fitted)
STARTUP_S = 0.8                   # interpreter, imports, plan and validation before the first byte moves
ZARR_ARRAY_OVERHEAD = 1024        # zarr.json, OCDBT index entries and _METADATA per array
HEADER_BYTES_PER_TENSOR = 160     # safetensors JSON header per tensor
RAM_HEADROOM = 0.9                # plan against 90% of the available RAM


@dataclass(frozen=True)
class Source:
    """What the plan reads, as far as pricing needs it."""

    label: str
    kind: str                                 # local | remote | model | orbax | bucket
    itemsize: dict[str, float]                # bytes per element of each source tensor as stored (MXFP4: 17/32)
    default_itemsize: int = 2                 # for tensors not listed (pricing a model with no data)
    total_bytes: int = 0                      # all tensor bytes of the source
    download: DiskNeed | None = None          # remote sources: what fetching the shards takes
    max_disk: int | None = None
    probe_file: Path | None = None            # a local file to time reads on
    order_key: Callable | None = None         # the reader's order_key (engine order); plan order if None
    fp8: frozenset[str] = frozenset()         # sources dequantized through float32 on the fly (fp8, MXFP4)
    reader_held: int = 0                      # what the reader itself keeps (BlockReader's layer blocks)
    raw_copy: bool = False                    # reads decode a raw chunk copy (tensorstore), not a mapping


# ----------------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class TaskFigures:
    """One task as the memory model sees it (bytes)."""

    cost: int       # what the engine charges against its budget (engine.task_cost)
    result: int     # held while finished and waiting for the writer
    running: int    # held at its peak while a worker runs it
    written: int    # the slice handed to the writer


def task_figures(plan: ConversionPlan, source: Source) -> list[TaskFigures]:
    """Every task in the engine's order (the reader's order_key, else plan order), priced once per shape."""
    jobs = [(t, task) for t in plan.tensors for task in t.tasks]
    if source.order_key is not None:
        jobs.sort(key=lambda j: () if j[0].fill is not None else source.order_key(j[1].source))   # fill: no source
    cache: dict[tuple, TaskFigures] = {}
    out: list[TaskFigures] = []
    for tensor, task in jobs:
        src = source.itemsize.get(task.source.name, source.default_itemsize)
        fp8 = task.source.name in source.fp8
        key = (tensor.slice_shape, tensor.source_shape, task.span, task.part, task.source.part, tensor.dtype,
               tensor.chain, src, fp8)
        if key not in cache:
            n = math.prod(tensor.task_shape(task))
            size = np.dtype(tensor.dtype).itemsize
            exact = tensor.chain.exact
            passes = exact and src == size and all(s.name == "reshape" for s in tensor.chain.steps)
            result = n * (src if passes else size)
            read = tensor.read_elements(task)
            running = (read * src * (2 if source.raw_copy else 1) + (8 * read if fp8 else 0)
                       + n * ((0 if passes else 2 * size) + (0 if exact else 8)))
            cache[key] = TaskFigures(engine.task_cost(tensor, task), math.ceil(result), math.ceil(max(result, running)),
                                     n * size)
        out.append(cache[key])
    return out


def memory(plan: ConversionPlan, source: Source, writer: str, workers: int = 2) -> dict:
    """Peak RSS and its parts (bytes): baseline, the engine's window, the writer's staged batches."""
    tasks = task_figures(plan, source)
    budget = engine.default_budget(plan)
    window: deque[TaskFigures] = deque()
    cost_sum = held_sum = peak_window = 0
    for task in tasks:      # the engine's admission rule: admit while the budget allows, then write the oldest
        while window and cost_sum + task.cost > budget:
            done = window.popleft()
            cost_sum, held_sum = cost_sum - done.cost, held_sum - done.result
        window.append(task)
        cost_sum, held_sum = cost_sum + task.cost, held_sum + task.result
        peak_window = max(peak_window, held_sum)
    # the running tasks' sources and temporaries, at worst the costliest `workers` at once
    peak_window += sum(heapq.nlargest(workers, (t.running - t.result for t in tasks)))
    largest_write = max(t.written for t in tasks)
    staged = 0
    if writer == "orbax":
        batches = (1 + orbax_io.MAX_PENDING_COMMITS) * (orbax_io.BATCH_BYTES + largest_write)
        staged = int(WRITER_FIXED + WRITER_PER_BATCH * batches)
    return {"peak_rss": BASELINE_RSS + peak_window + source.reader_held + staged, "baseline": BASELINE_RSS,
            "engine_budget": budget, "engine_window": peak_window, "reader": source.reader_held, "writer": staged,
            "largest_slice": largest_write}


def largest_tasks(plan: ConversionPlan, count: int = 5) -> list[dict]:
    """The tensors whose slices weigh most in the engine's window (what drives memory)."""
    def largest_slice(t) -> tuple[int, ...]:
        if t.span_axis is None:
            return t.slice_shape
        return max((t.task_shape(k) for k in t.tasks), key=math.prod)

    top = heapq.nlargest(count, plan.tensors, key=lambda t: (math.prod(largest_slice(t)), t.nbytes))
    return [{"tensor": t.target, "bytes": t.nbytes, "slice_shape": list(largest_slice(t)),
             "slice_bytes": math.prod(largest_slice(t)) * np.dtype(t.dtype).itemsize, "slices": len(t.tasks),
             "row_pieces": t.span_axis is not None} for t in top]


# ----------------------------------------------------------------------------------------------- disk


def output_bytes(plan: ConversionPlan, writer: str) -> int:
    """Bytes the output takes on disk: the zarr chunk grid (edge chunks are stored whole) or safetensors."""
    if writer == "orbax":
        total = 0
        for t in plan.tensors:
            chunks = math.prod(-(-s // c) for s, c in zip(t.shape, t.chunk_shape, strict=True))
            total += chunks * math.prod(t.chunk_shape) * np.dtype(t.dtype).itemsize + ZARR_ARRAY_OVERHEAD
        return total
    return plan.output_bytes + HEADER_BYTES_PER_TENSOR * len(plan.tensors) + 64 * 1024


def read_bytes(plan: ConversionPlan, source: Source) -> int:
    """Bytes the tasks read as stored (an MXFP4 weight: its packed blocks and scales)."""
    return round(sum(t.read_elements(task) * source.itemsize.get(task.source.name, source.default_itemsize)
                     for t in plan.tensors for task in t.tasks))


# ----------------------------------------------------------------------------------------------- time


def wall_time(plan: ConversionPlan, read: int, written: int, rates: Rates, download: int) -> dict:
    """Seconds: start-up plus the longer of read + transform and durable write (see the module docstring);
    a download, when its rate is known, overlaps the conversion."""
    moved = [t for t in plan.tensors if not (t.chain.exact and all(s.name == "reshape" for s in t.chain.steps))]
    transform = sum(t.nbytes for t in moved)
    parts = {"read_s": read / (rates.read_gbps * 1e9), "write_s": written / (rates.write_gbps * 1e9),
             "transform_s": transform / (rates.cpu_gbps * 1e9)}
    convert_s = max(parts["read_s"] + parts["transform_s"], parts["write_s"])
    if download and rates.net_gbps:
        parts["download_s"] = download / (rates.net_gbps * 1e9)
    total = STARTUP_S + max(convert_s, parts.get("download_s", 0.0))
    return {"estimate_s": round(total, 1), "startup_s": STARTUP_S, **{k: round(v, 2) for k, v in parts.items()},
            "bound_by": max(parts, key=parts.get).removesuffix("_s"),
            "excludes_download": bool(download) and not rates.net_gbps}


# ----------------------------------------------------------------------------------------------- verdict


def price(plan: ConversionPlan, source: Source, rates: Rates, mach: Machine, writer: str | None = None,
          replaced: int = 0, workers: int = 2, refusals: Sequence[str] = (), output_local: bool = True) -> dict:
    """Every figure of a plan and a go / no-go verdict with its reason (JSON-ready). `refusals`: why convert
    would refuse this output before writing (io/outdir.py's checks), each a reason for no-go. `output_local`
    False: the output goes to a bucket, so it takes no local disk."""
    writer = writer or ("orbax" if plan.direction == TO_MAXTEXT else "safetensors")
    mem = memory(plan, source, writer, workers)
    on_disk = output_bytes(plan, writer)
    read = read_bytes(plan, source)
    download = source.download.download if source.download else 0
    dl_disk = 0
    if source.download is not None:
        dl_disk = source.download.peak if source.max_disk is not None else source.download.download
    elif source.kind == "model" and plan.direction == TO_MAXTEXT:
        download = dl_disk = source.total_bytes
    temporary = replaced + (dl_disk if source.max_disk is not None else 0)
    need_disk = (on_disk if output_local else 0) + replaced + dl_disk
    reasons = list(refusals)
    if mem["peak_rss"] > RAM_HEADROOM * mach.available_ram:
        reasons.append(f"needs {_gb(mem['peak_rss'])} of RAM, {_gb(mach.available_ram)} available")
    if need_disk > mach.free_disk:
        reasons.append(f"needs {_gb(need_disk)} of disk at {mach.disk_path}, {_gb(mach.free_disk)} free")
    if source.download and source.max_disk is not None and source.download.download \
            and source.download.minimum > source.max_disk:
        reasons.append(f"--max-disk {_gb(source.max_disk)} cannot hold the largest shard "
                       f"({_gb(source.download.minimum)} needed)")
    go = not reasons
    verdict = ("go: " + f"peak {_gb(mem['peak_rss'])} of {_gb(mach.available_ram)} RAM available, "
               f"{_gb(need_disk)} of {_gb(mach.free_disk)} disk free") if go else "no-go: " + "; ".join(reasons)
    return {
        "memory": mem,
        "bytes": {"source": source.total_bytes, "download": download, "read": read,
                  "written": plan.output_bytes, "output_on_disk": on_disk, "temporary_disk": temporary,
                  "hub_cache": dl_disk if source.max_disk is None else 0},
        "time": wall_time(plan, read, on_disk, rates, download),
        "rates": {"read_gbps": round(rates.read_gbps, 3), "write_gbps": round(rates.write_gbps, 3),
                  "cpu_gbps": round(rates.cpu_gbps, 3), "net_gbps": rates.net_gbps, "basis": rates.basis},
        "largest_tensors": largest_tasks(plan),
        "machine": {"available_ram": mach.available_ram, "free_disk": mach.free_disk, "disk_path": mach.disk_path,
                    "cpus": mach.cpus},
        "go": go, "verdict": verdict,
    }


def _gb(n: float) -> str:
    from ckpt_cli.units import human_bytes

    return human_bytes(n)


# ----------------------------------------------------------------------------------------------- sources


def plan_hf_to_maxtext(source_arg: str | None, opts) -> tuple[ConversionPlan, Source, list[str]]:
    """The plan `convert hf-to-maxtext` would run (same resolution, checks and validation), and its Source.

    With no SOURCE, `opts.model`'s reference config is priced as if its default repo were converted.
    """
    from ckpt_cli import convert, registry
    from ckpt_cli.dtypes import output_dtype
    from ckpt_cli.families import family_named
    from ckpt_cli.io import hf, remote_stream
    from ckpt_cli.plan import build_to_maxtext

    features = frozenset({"mtp"}) if getattr(opts, "mtp", False) else frozenset()
    if source_arg is None:
        spec = registry.lookup(_require_model(opts.model))
        config = registry.reference_config(spec.name)
        plan = build_to_maxtext(family_named(spec.family), config, opts.scan_layers,
                                output_dtype(convert.store_dtype(opts, spec.name)), features)
        size = _config_itemsize(config)
        itemsize, fp8 = _released_fp8(plan, family_named(spec.family), config)
        total = sum(_source_elements(t) * size for t in plan.tensors) + round(sum(
            t.read_elements(task) * (itemsize[task.source.name] - size)
            for t in plan.tensors for task in t.tasks if task.source.name in itemsize))
        notes = [f"no data read: {spec.name}'s reference config, priced as a download of {spec.repo_id} "
                 f"(assumed not cached)" + (f"; {len(fp8)} weights as the release stores them, quantized "
                                            "(fp8 with block scales, or fp4), dequantized on the fly"
                                            if fp8 else ""), *plan.notes]
        return plan, Source(f"{spec.repo_id} (reference config)", "model", itemsize, size, total, fp8=fp8), notes
    src = hf.resolve(source_arg, opts.revision, stream=True)
    plan = convert.plan_to_maxtext(src, opts)
    reader = convert.open_reader(src, "safetensors", plan.dtype)
    plan = convert.with_source_names(plan, src, reader.names)
    if getattr(opts, "lora", None):     # the adapter's own plan and file, or the base's reading W + s·B·A
        plan, reader, _ = convert.with_adapter(plan, reader, src, opts)
    engine.validate(plan, reader)
    tensors = reader.files.tensors
    itemsize: dict[str, float] = {name: info.dtype.itemsize for name, info in tensors.items()}
    fp8 = frozenset(n for n, i in tensors.items() if i.dtype.itemsize == 1 and i.dtype.name.startswith("float8"))
    for name, (blocks, scales) in reader.mxfp4.items():     # priced by their packed bytes, through float32
        if scales in tensors:
            itemsize[name] = (tensors[blocks].nbytes + tensors[scales].nbytes) / math.prod(reader.mxfp4_shape(name))
    for name, (packed, scale, _) in reader.int4.items():     # int4: the packed words and scales, through float32
        if scale in tensors:
            itemsize[name] = (tensors[packed].nbytes + tensors[scale].nbytes) / math.prod(reader.int4_shape(name))
    for name, scale in reader.fp4.items():      # DeepSeek-V4's fp4 experts: packed bytes and scales, through float32
        itemsize[name] = (tensors[name].nbytes + tensors[scale].nbytes) / math.prod(reader.fp4_shape(name))
    fp8 |= frozenset(reader.mxfp4) | frozenset(reader.int4) | frozenset(reader.fp4)
    notes = list(plan.notes)
    if src.files is not None and src.remote is None and not src.files.local_files:   # a bucket: ranged reads
        notes.append(f"{src.label}: {len(src.files.shards())} shard(s) read in place by ranged reads (headers: "
                     f"{src.files.requests} request(s), {_gb(src.files.bytes_fetched)})")
        return plan, Source(src.label, "bucket", itemsize, 2, sum(i.nbytes for i in tensors.values()),
                            order_key=reader.order_key, fp8=fp8), notes
    if src.remote is None:
        files = {i.file for i in tensors.values()}
        largest = max(files, key=lambda f: f.stat().st_size)
        total = sum(f.stat().st_size for f in files)
        return plan, Source(src.label, "local", itemsize, 2, total, probe_file=largest,
                            order_key=reader.order_key, fp8=fp8), notes
    stream = remote_stream.ShardStream(reader.files, plan, reader, opts.max_disk)
    need = stream.disk
    notes.append(f"{src.remote.label}: {len(src.remote.shards)} shard(s), headers read with "
                 f"{src.remote.requests} request(s), {_gb(src.remote.bytes_fetched)} fetched")
    return plan, Source(src.remote.label, "remote", itemsize, 2, src.remote.shard_bytes, need, opts.max_disk,
                        order_key=reader.order_key, fp8=fp8), notes


def _source_elements(t) -> int:
    """Elements of the source behind one target tensor: the target's own count, but for a padded table (more
    rows on the MaxText side, e.g. Gemma's vocabulary) the rows its tasks read."""
    if t.fill is not None:        # a constant leaf: no source
        return 0
    if t.chain.pads:
        return sum(t.read_elements(task) for task in t.tasks)
    return math.prod(t.shape)


def plan_maxtext_to_hf(source_arg: str | None, opts, scan: bool = True) -> tuple[ConversionPlan, Source, list[str]]:
    """The plan `convert maxtext-to-hf` would run, and its Source; with no SOURCE, `opts.model`'s tree
    (as ckpt writes it: `scan`, bf16) is priced."""
    from ckpt_cli import convert, registry
    from ckpt_cli.dtypes import output_dtype
    from ckpt_cli.errors import UnsupportedError
    from ckpt_cli.families import family_named
    from ckpt_cli.io.orbax import OrbaxCheckpoint
    from ckpt_cli.plan import build_to_hf

    if source_arg is None:
        spec = registry.lookup(_require_model(opts.model))
        config = registry.reference_config(spec.name)
        dtype = output_dtype(opts.dtype or spec.dtype or "bf16")
        try:
            plan = build_to_hf(family_named(spec.family), config, scan, dtype)
        except UnsupportedError:
            if not scan:
                raise
            scan = False                # a model ckpt (and MaxText 0.2.5) writes unscanned only: gemma4-e2b, -e4b
            plan = build_to_hf(family_named(spec.family), config, scan, dtype)
        # a -fp8 name's checkpoint keeps its e4m3 weights (one byte) and float32 scales; the rest bf16
        itemsize = {task.source.name: np.dtype(t.dtype).itemsize for t in plan.tensors if t.quant for task in t.tasks}
        total = sum(_source_elements(t) * (np.dtype(t.dtype).itemsize if t.quant else 2) for t in plan.tensors)
        notes = [f"no data read: {spec.name}'s reference config, as {'a scanned' if scan else 'an unscanned'} "
                 f"{'fp8' if itemsize else 'bf16'} MaxText checkpoint", *plan.notes]
        return plan, Source(f"{spec.name} (reference config)", "model", itemsize, 2, total,
                            reader_held=READER_FIXED, raw_copy=True), notes
    from ckpt_cli.io.location import BucketURL, location

    where = location(source_arg, "SOURCE", buckets=True)
    ckpt = OrbaxCheckpoint(where)
    extra: list[str] = []
    if getattr(opts, "lora_only", False):      # a LoRA checkpoint priced as the PEFT adapter it becomes
        from ckpt_cli import to_hf
        from ckpt_cli.lora_convert import plan_adapter_to_hf

        plan = plan_adapter_to_hf(ckpt, to_hf.resolve_architecture(ckpt, opts.model, opts.hf_config), opts.dtype)[0]
    else:
        plan, arch = convert.plan_to_hf(ckpt, opts)
        if getattr(opts, "lora", None):
            from ckpt_cli.lora_convert import merged_reader

            extra.append(merged_reader(ckpt, OrbaxCheckpoint(Path(opts.lora)), arch, plan.scan_layers,
                                       plan.features)[1] + " (its leaves are read beside each layer's kernels)")
    engine.validate(plan, ckpt)
    itemsize = {p: ckpt.describe(p)[1].itemsize for p in ckpt.paths}
    if isinstance(where, BucketURL):    # in a bucket: the arrays' bytes, and no local file to probe
        largest, total = None, sum(math.prod(ckpt.describe(p)[0]) * itemsize[p] for p in ckpt.paths)
    else:
        files = [p for p in ckpt.items.rglob("*") if p.is_file()]
        largest = max(files, key=lambda f: f.stat().st_size) if files else None
        total = sum(f.stat().st_size for f in files)
    return plan, Source(str(source_arg), "orbax", itemsize, 2, total, probe_file=largest, order_key=ckpt.order_key,
                        reader_held=READER_FIXED + _block_bytes(plan, ckpt), raw_copy=True), [*plan.notes, *extra]


def _block_bytes(plan: ConversionPlan, ckpt) -> int:
    """What BlockReader keeps: MAX_BLOCKS blocks of consecutive layers of a tensor whose chunks span layers
    (MaxText's own checkpoints); nothing for one-layer chunks (ckpt's)."""
    from ckpt_cli.io import orbax_blocks

    block = 0
    for name, source in {task.source.name: task.source for t in plan.tensors for task in t.tasks}.items():
        if not source.axes:
            continue
        arr = ckpt.array(name)
        axis = source.axes[-1]
        if arr.chunk_layout.read_chunk.shape[axis] <= 1:
            continue
        itemsize = arr.dtype.numpy_dtype.itemsize
        slice_bytes = math.prod(n for a, n in enumerate(arr.shape) if a not in source.axes) * itemsize
        per_block = min(arr.shape[axis], max(1, orbax_blocks.BLOCK_BYTES // max(1, slice_bytes)))
        block = max(block, per_block * slice_bytes)
    return orbax_blocks.MAX_BLOCKS * block


def _require_model(model: str | None) -> str:
    if not model:
        from ckpt_cli.errors import SourceError

        raise SourceError("give a SOURCE, or --model NAME to price a registered model without any data")
    return model


def _released_fp8(plan: ConversionPlan, family, config: dict) -> tuple[dict[str, float], frozenset[str]]:
    """For a reference config whose release is fp8 (the family says which weights): bytes per element of those
    weights as stored (one e4m3 byte plus a float32 scale per block, ragged edge blocks included), and their
    names (dequantized through float32). Empty for other models."""
    per_element = family.extra.get("released_bytes")      # a family that says its release's bytes itself
    if per_element is not None:
        itemsize = {task.source.name: b for t in plan.tensors for task in t.tasks
                    if t.fill is None and (b := per_element(config, task.source.name, t.source_shape)) is not None}
        return itemsize, frozenset(n for n, b in itemsize.items() if b < 2)     # the quantized ones
    released = family.extra.get("fp8_released")
    quant = config.get("quantization_config") or {}
    if released is None and family.extra.get("fp8_tree") and quant.get("quant_method") == "fp8":
        if np.dtype(plan.dtype) == FP8:     # weights kept fp8: read as one byte, their scales as float32 tensors
            kept = {task.source.name: 1.0 for t in plan.tensors if t.quant == "fp8" for task in t.tasks}
            return kept | {task.source.name: 4.0 for t in plan.tensors if t.quant == "scale" for task in t.tasks}, \
                frozenset()
        kept_plan = build_to_maxtext(family, config, plan.scan_layers, FP8)   # which weights the release stores fp8
        names = {task.source.name for t in kept_plan.tensors if t.quant == "fp8" for task in t.tasks}
        released = lambda cfg, name: name in names   # noqa: E731
    if released is None:
        return {}, frozenset()
    bh, bw = quant.get("weight_block_size") or (128, 128)
    itemsize: dict[str, float] = {}
    for t in plan.tensors:
        for task in t.tasks:
            name = task.source.name
            if name not in itemsize and released(config, name) and len(t.source_shape) == 2:
                rows, cols = t.source_shape
                blocks = -(-rows // bh) * -(-cols // bw)
                itemsize[name] = (rows * cols + 4 * blocks) / (rows * cols)
    return itemsize, frozenset(itemsize)


def _config_itemsize(config: dict) -> int:
    name = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").removeprefix("torch.")
    return {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}.get(name, 2)
