"""Conversions as plain functions (the CLI is a thin shell over these)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ckpt_cli import __version__, engine, registry
from ckpt_cli.dtypes import output_dtype
from ckpt_cli.errors import ConfigMismatchError, DiskFull, Interrupted, OutputError, SourceError
from ckpt_cli.families import detect_family, family_named
from ckpt_cli.io import hf, outdir, remote_stream
from ckpt_cli.io.location import BucketURL
from ckpt_cli.io.orbax import OrbaxWriter, StorageOptions, read_progress
from ckpt_cli.io.outdir import partial_dir
from ckpt_cli.plan import ConversionPlan, build_to_maxtext, rename_sources


@dataclass(frozen=True)
class ToMaxTextOptions:
    """Options of hf-to-maxtext; the CLI flags map one to one."""

    model: str | None = None
    scan_layers: bool = True
    dtype: str = "bf16"
    load_method: str = "safetensors"
    revision: str | None = None
    storage: StorageOptions = field(default_factory=StorageOptions)
    overwrite: bool = False
    workers: int = 2
    mtp: bool = False               # DeepSeek-V3: also convert the multi-token-prediction layer
    max_disk: int | None = None     # repo sources: most local bytes the downloaded shards may take at once
    resume: bool = False            # take up an interrupted run's OUT.partial when it was the same conversion


@dataclass
class Result:
    plan: ConversionPlan
    stats: engine.Stats
    out: Path
    source: str
    notes: list[str]


def plan_to_maxtext(source: hf.HFSource, opts: ToMaxTextOptions) -> ConversionPlan:
    """The plan for a resolved HF source, with the config checked against --model when given."""
    model_name = opts.model or source.model_name
    family = detect_family(source.config, model_name)
    if model_name:
        spec = registry.lookup(model_name)
        if spec.family != family.name:
            raise ConfigMismatchError(f"{model_name} is a {spec.family} model, but config.json describes "
                                      f"a {family.name} model")
        registry.check_against(spec, family.model_config(source.config), family.reference_keys)
    features = frozenset({"mtp"}) if opts.mtp else frozenset()
    return build_to_maxtext(family, source.config, opts.scan_layers, output_dtype(opts.dtype), features)


def with_source_names(plan: ConversionPlan, source: hf.HFSource, names: Collection[str]) -> ConversionPlan:
    """The plan reading the names the source's files actually use (the family decides, e.g. the text prefix
    of a multimodal Gemma3); unchanged when they are the family's own."""
    rename, notes = family_named(plan.family).source_names(source.config, names)
    return plan if rename is None else rename_sources(plan, rename, notes)


def open_reader(source: hf.HFSource, load_method: str, dtype: np.dtype | None = None):
    if load_method == "safetensors":
        qcfg = source.config.get("quantization_config") or {}
        block = tuple(qcfg.get("weight_block_size") or (128, 128))
        files = remote_stream.RemoteFolder(source.remote) if source.remote else source.folder
        return hf.SafetensorsReader(files, dequant_dtype=dtype, block=block)
    if load_method == "transformers":
        return hf.TransformersReader(source.folder)
    raise SourceError(f"unknown load method {load_method!r}: choose safetensors or transformers")


def mxfp4_notes(plan: ConversionPlan, reader) -> list[str]:
    """A note naming how many MXFP4 weights the plan dequantizes (none for other sources)."""
    packed = getattr(reader, "mxfp4", {})
    names = {task.source.name for t in plan.tensors for task in t.tasks if task.source.name in packed}
    if not names:
        return []
    return [f"{len(names)} MXFP4 weight(s) (*_blocks + *_scales, e.g. {min(names)}) dequantized one expert at a "
            f"time into {np.dtype(plan.dtype).name}"]


def provenance(plan: ConversionPlan, source: hf.HFSource, opts: ToMaxTextOptions) -> dict:
    """What we carry inside the checkpoint so maxtext-to-hf needs no flags."""
    return {
        "tool": "ckpt", "version": __version__, "direction": plan.direction, "family": plan.family,
        "model_name": opts.model or source.model_name, "source": source.label, "repo_id": source.repo_id,
        "source_folder": str(Path(source.folder).resolve()),
        "revision": source.revision, "dtype": np.dtype(plan.dtype).name, "scan_layers": plan.scan_layers,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "hf_config": plan.hf_config,
    }


def progress_key(plan: ConversionPlan, source: hf.HFSource, opts: ToMaxTextOptions) -> str:
    """What must match for `--resume` to take up an interrupted run: the same source files (names, sizes,
    modification times, or the hub commit), the same plan (every target, shape, dtype, chunk, transform
    and source slice) and the same storage options."""
    files = {}
    if source.remote is not None:
        files["commit"] = getattr(source.remote, "commit", None)
    else:
        for f in sorted(Path(source.folder).glob("*.safetensors")):
            st = f.stat()
            files[f.name] = [st.st_size, st.st_mtime_ns]
    ident = {"tool": __version__, "source": source.label, "files": files,
             "storage": dataclasses.asdict(opts.storage), "load_method": opts.load_method,
             "plan": [[t.target, list(t.shape), np.dtype(t.dtype).name, list(t.chunk_shape), t.chain.describe(),
                       [[k.source.name, repr(k.source.index), repr(k.source.rows)]
                        + ([repr(k.source.part)] if k.source.part else []) for k in t.tasks]]
                      for t in plan.tensors]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def check_free_space(out: Path, nbytes: int) -> None:
    """Refuse up front when the output's filesystem cannot hold the planned bytes."""
    probe = out if out.exists() else out.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < nbytes * 1.02:
        raise OutputError(f"not enough free disk at {probe}: the output needs up to {nbytes / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB free")


def source_paths(source: hf.HFSource) -> list[Path]:
    """What hf-to-maxtext reads from a local source: its folder and (resolved, so links count) its files."""
    folder = Path(source.folder)
    if source.remote is not None:
        return [folder] if folder.exists() else []
    return outdir.read_paths(folder)


def kept_or_not(full: DiskFull, kept: bool, partial: Path) -> DiskFull:
    """The one line for a full disk: whether the progress was kept, and what to do."""
    if kept:
        return DiskFull(f"{full}: progress kept in {partial}; free some space, then run the same command with "
                        f"--resume to finish it")
    return DiskFull(f"{full}: nothing kept (no progress snapshot yet); free some space, then run it again")


def hf_to_maxtext(source_arg: str, out: Path, opts: ToMaxTextOptions, progress=None,
                  on_plan=None) -> Result:
    """Convert an HF checkpoint to a MaxText Orbax checkpoint at `out` (published atomically).

    `out` must not overlap the source; the run holds `out`'s lock throughout (see io/outdir.py)."""
    source = hf.resolve(source_arg, opts.revision, stream=opts.load_method == "safetensors")
    if isinstance(out, BucketURL):          # written in place, completed by marker objects (io/bucket.py)
        from ckpt_cli.io import bucket

        bucket.check_output(out, opts.overwrite, opts.resume)
        return _hf_to_maxtext(source, out, opts, progress, on_plan)
    target = outdir.output_path(out)
    outdir.check_not_overlapping(target, source_paths(source))
    with outdir.OutputLock(target):
        outdir.check_output(target, opts.overwrite)
        result = _hf_to_maxtext(source, target, opts, progress, on_plan)
    result.out = Path(out)
    return result


def _hf_to_maxtext(source: hf.HFSource, out: Path | BucketURL, opts: ToMaxTextOptions, progress, on_plan) -> Result:
    plan = plan_to_maxtext(source, opts)
    reader = open_reader(source, opts.load_method, plan.dtype)
    plan = with_source_names(plan, source, reader.names)
    engine.validate(plan, reader)
    used = {task.source.name for t in plan.tensors for task in t.tasks}
    used |= {extra for name in used for extra in getattr(reader, "consumed_with", lambda n: [])(name)}
    ignored = sorted(set(reader.names) - used)
    notes = list(plan.notes) + mxfp4_notes(plan, reader)
    if ignored:
        notes.append(f"{len(ignored)} source tensor(s) not used: {', '.join(ignored[:4])}"
                     + (" ..." if len(ignored) > 4 else ""))
    key = progress_key(plan, source, opts)
    local = isinstance(out, Path)
    # downloads under --max-disk go beside a local --out; beside the temp folder for a bucket one
    near = out if local else Path(tempfile.gettempdir()) / "ckpt-bucket-output"
    done = read_progress(out, key, opts.storage) if opts.resume else None
    if opts.resume:
        notes.append(f"resuming: {len(done)} of {sum(len(t.tasks) for t in plan.tensors)} slice writes were "
                     f"already durable in {partial_dir(out)}" if done is not None else
                     f"--resume: no interrupted run of this conversion in {partial_dir(out)}; starting afresh")
    elif local and partial_dir(out).exists():
        notes.append(f"an interrupted run's {partial_dir(out)} was removed (pass --resume to take it up)")
    stream = (remote_stream.ShardStream(reader.files, plan, reader, opts.max_disk, skip=done or frozenset())
              if source.remote else None)
    if stream:
        notes += stream.prepare(near, plan.output_bytes if local else 0)     # refuses an impossible --max-disk up front
    elif opts.max_disk is not None:
        notes.append("--max-disk applies to hub repos only; this source is read in place")
    if on_plan:
        on_plan(plan, notes)
    if local:
        check_free_space(out, plan.output_bytes - (remote_stream.tree_bytes(partial_dir(out)) if done else 0))
        writer = OrbaxWriter(out, opts.storage, overwrite=opts.overwrite, progress_key=key, resume=done is not None)
    else:
        from ckpt_cli.io.bucket import BucketOrbaxWriter

        writer = BucketOrbaxWriter(out, opts.storage)
    try:
        if stream:
            stream.start(near)
        stats = engine.execute(plan, reader, stream.track(writer) if stream else writer, progress=progress,
                               workers=opts.workers, skip=writer.done)
        writer.finalize({"scan_layers": plan.scan_layers, "ckpt": provenance(plan, source, opts)})
    except KeyboardInterrupt as exc:
        if writer.abort(keep=True):
            raise Interrupted(f"progress kept in {partial_dir(out)}: run the same command with --resume "
                              "to finish it") from exc
        raise
    except BaseException as exc:
        full = outdir.disk_full(exc)
        kept = writer.abort(keep=full is not None)
        if full is not None:
            raise kept_or_not(full, kept, partial_dir(out)) from None
        raise
    finally:
        if stream:
            stream.close()
    if stream:
        stats.extra["download"] = stream.stats
    return Result(plan, stats, out, source.label, notes)


@dataclass(frozen=True)
class ToHFOptions:
    """Options of maxtext-to-hf; the CLI flags map one to one."""

    model: str | None = None
    hf_config: Path | None = None
    dtype: str | None = None            # None: the config's own dtype (bf16 or f32), else bf16
    shard_size: int = 5 * 10**9         # bytes of tensor data per safetensors shard, at most
    tokenizer: str | None = None        # local folder/file or hub repo id
    overwrite: bool = False
    workers: int = 2
    resume: bool = False                # take up an interrupted run's OUT.partial when it was the same conversion


@dataclass
class HFResult(Result):
    files: list[str] = field(default_factory=list)
    config_origin: str = ""


def plan_to_hf(ckpt, opts: ToHFOptions):
    """The MaxText -> HF plan for an opened checkpoint, after checking every parameter against the config.

    Returns (plan, architecture).
    """
    from ckpt_cli import to_hf
    from ckpt_cli.plan import build_to_hf

    arch = to_hf.resolve_architecture(ckpt, opts.model, opts.hf_config)
    scan = to_hf.detect_scan(ckpt)
    dtype = output_dtype(opts.dtype or to_hf.default_dtype(arch.config))
    features = to_hf.detect_features(arch, ckpt, scan)
    to_hf.check_checkpoint(build_to_maxtext(arch.family, arch.config, scan, dtype, features), ckpt)
    return build_to_hf(arch.family, arch.config, scan, dtype, features), arch


def hf_side_files(ckpt, arch, opts: ToHFOptions, notes: list[str]) -> tuple[dict[str, Path], dict | Path | None]:
    """Tokenizer files and generation config for the output: from --tokenizer, else the carried source folder."""
    from ckpt_cli import to_hf
    from ckpt_cli.io.tokenizer import GENERATION_CONFIG, resolve_tokenizer, tokenizer_files

    tokenizer: dict[str, Path] = {}
    generation: dict | Path | None = None
    folder = to_hf.source_folder(ckpt)
    if folder is not None:
        tokenizer = tokenizer_files(folder)
        if (folder / GENERATION_CONFIG).is_file():
            generation = folder / GENERATION_CONFIG
    if opts.tokenizer:
        tokenizer, gen = resolve_tokenizer(opts.tokenizer)
        generation = generation or gen
    if not tokenizer:
        notes.append("no tokenizer files written (pass --tokenizer PATH_OR_REPO to copy them)")
    return tokenizer, generation or to_hf.derived_generation_config(arch.config)


def checkpoint_files(items: Path) -> dict[str, list[int]]:
    """Names, sizes and modification times of a checkpoint's files: the step directory's, and the items
    directory's two levels down (metadata, manifests, OCDBT data files, array metadata; not chunk trees)."""
    files: dict[str, list[int]] = {}

    def walk(folder: Path, prefix: str, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            if e.is_file():
                st = e.stat()
                files[prefix + e.name] = [st.st_size, st.st_mtime_ns]
            elif e.is_dir() and depth > 0:
                walk(Path(e.path), f"{prefix}{e.name}/", depth - 1)

    walk(items.parent, "../", 0)
    walk(items, "", 2)
    return files


def hf_progress_key(plan: ConversionPlan, ckpt, opts: ToHFOptions, json_files: dict, copies: dict) -> str:
    """What must match for maxtext-to-hf `--resume` to take up an interrupted run: the same checkpoint (its
    path and files), the same plan (every target, shape, dtype, transform and source slice), the same
    shards and the same files written beside them."""
    remote = isinstance(ckpt.items, BucketURL)      # a bucket's checkpoint: named by URL and commit time
    ident = {"tool": __version__, "source": str(ckpt.items) if remote else str(Path(ckpt.items).resolve()),
             "files": ckpt.step_metadata.get("commit_timestamp_nsecs") if remote else checkpoint_files(ckpt.items),
             "shard_size": opts.shard_size, "json_files": json_files,
             "copies": {name: str(Path(src).resolve()) for name, src in sorted(copies.items())},
             "plan": [[t.target, list(t.shape), np.dtype(t.dtype).name, t.chain.describe(),
                       [[k.source.name, repr(k.source.index), repr(k.source.rows), repr(k.source.part),
                         repr(k.index), repr(k.span), repr(k.part)] for k in t.tasks]]
                      for t in plan.tensors]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def maxtext_to_hf(source_arg: str | BucketURL, out: Path, opts: ToHFOptions, progress=None, on_plan=None) -> HFResult:
    """Convert a MaxText checkpoint (run, step or items dir) to an HF safetensors folder at `out` (atomically).

    `out` must not overlap anything read (the checkpoint, --hf-config, the files copied beside the weights);
    the run holds `out`'s lock throughout (see io/outdir.py)."""
    from ckpt_cli.io.orbax import OrbaxCheckpoint

    remote = isinstance(source_arg, BucketURL)      # a gs:// or s3:// checkpoint: read in place, nothing local
    ckpt = OrbaxCheckpoint(source_arg if remote else Path(source_arg))
    target = outdir.output_path(out)
    reads = [] if remote else [Path(source_arg), ckpt.items]
    outdir.check_not_overlapping(target, [*reads, *([opts.hf_config] if opts.hf_config else [])])
    with outdir.OutputLock(target):
        outdir.check_output(target, opts.overwrite)
        result = _maxtext_to_hf(ckpt, source_arg, target, opts, progress, on_plan)
    result.out = Path(out)
    return result


def _maxtext_to_hf(ckpt, source_arg: str, out: Path, opts: ToHFOptions, progress, on_plan) -> HFResult:
    from ckpt_cli import to_hf
    from ckpt_cli.io.hf_writer import HFFolderWriter
    from ckpt_cli.io.hf_writer import read_progress as read_hf_progress
    from ckpt_cli.io.orbax_blocks import BlockReader
    from ckpt_cli.io.safetensors import PlannedTensor
    from ckpt_cli.plan import write_key

    plan, arch = plan_to_hf(ckpt, opts)
    engine.validate(plan, ckpt)
    notes = list(plan.notes)
    if arch.origin != "carried":
        notes.append(f"architecture from {arch.origin}")
    if arch.config.get("quantization_config"):
        notes.append(f"config.json drops quantization_config: the weights are written as plain "
                     f"{np.dtype(plan.dtype).name}")
    big = [t.target for t in plan.tensors if t.nbytes > opts.shard_size]
    if big:
        notes.append(f"{len(big)} tensor(s) larger than the shard size get a shard of their own: {big[0]}"
                     + (" ..." if len(big) > 1 else ""))
    tokenizer, generation = hf_side_files(ckpt, arch, opts, notes)
    json_files = {"config.json": to_hf.output_config(arch.config, plan.dtype)}
    copies = dict(tokenizer)
    if isinstance(generation, dict):
        json_files["generation_config.json"] = generation
    elif generation is not None:
        copies["generation_config.json"] = generation
    outdir.check_not_overlapping(out, copies.values())
    key = hf_progress_key(plan, ckpt, opts, json_files, copies)
    task_bytes = {write_key(t.target, t.target_index(task)): math.prod(t.task_shape(task)) * np.dtype(t.dtype).itemsize
                  for t in plan.tensors for task in t.tasks}
    partial = partial_dir(out)
    done, why_not = read_hf_progress(out, key, task_bytes) if opts.resume else (None, "")
    check_free_space(out, plan.output_bytes - sum(task_bytes[k] for k in done or ()))
    planned = [PlannedTensor(t.target, t.dtype, t.shape) for t in plan.tensors]
    if not opts.resume and partial.exists():
        notes.append(f"an interrupted run's {partial} was removed (pass --resume to take it up)")
    writer = None
    try:
        try:
            writer = HFFolderWriter(out, planned, opts.shard_size, overwrite=opts.overwrite, progress_key=key,
                                    done=done)
        except OutputError as exc:
            if done is None:
                raise
            done, why_not = None, str(exc)      # its shards are not this conversion's: start afresh
            writer = HFFolderWriter(out, planned, opts.shard_size, overwrite=opts.overwrite, progress_key=key)
        if opts.resume:
            notes.append(f"resuming: {len(done)} of {len(task_bytes)} writes were already durable in {partial}"
                         if done is not None else f"--resume: {why_not}; starting afresh")
        if on_plan:
            on_plan(plan, notes)
        reader = BlockReader(ckpt)
        stats = engine.execute(plan, reader, writer, progress=progress, workers=opts.workers, skip=writer.done)
        files = writer.finalize(json_files, copies)
    except KeyboardInterrupt as exc:
        kept = writer.abort(keep=True) if writer is not None else done is not None and partial.is_dir()
        if kept:
            raise Interrupted(f"progress kept in {partial}: run the same command with --resume to finish it") from exc
        raise
    except BaseException as exc:
        full = outdir.disk_full(exc)
        kept = writer.abort(keep=full is not None) if writer is not None else False
        if full is not None:
            raise kept_or_not(full, kept, partial) from None
        raise
    stats.extra["shards"] = len(writer.files)
    stats.extra["blocks_read"] = reader.blocks_read
    return HFResult(plan, stats, out, str(source_arg), notes, files, arch.origin)
