"""Conversions as plain functions (the CLI is a thin shell over these)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ckpt_cli import __version__, engine, fp8, registry
from ckpt_cli.dtypes import BF16, FP8, output_dtype
from ckpt_cli.errors import ConfigMismatchError, DiskFull, Interrupted, OutputError, SourceError, UnsupportedError
from ckpt_cli.families import detect_family, family_named
from ckpt_cli.families.base import config_int
from ckpt_cli.io import hf, int4, outdir, remote_stream
from ckpt_cli.io.location import BucketURL, overlapping
from ckpt_cli.io.orbax import OrbaxWriter, StorageOptions, read_progress
from ckpt_cli.io.outdir import partial_dir
from ckpt_cli.io.safetensors import SafetensorsFolder
from ckpt_cli.plan import ConversionPlan, TargetMesh, build_to_maxtext, rename_sources


@dataclass(frozen=True)
class ToMaxTextOptions:
    """Options of hf-to-maxtext; the CLI flags map one to one."""

    model: str | None = None
    scan_layers: bool = True
    dtype: str | None = None        # None: bf16, or fp8 for a model name whose MaxText tree keeps fp8 (-fp8 names)
    load_method: str = "safetensors"
    revision: str | None = None
    storage: StorageOptions = field(default_factory=StorageOptions)
    overwrite: bool = False
    workers: int = 2
    mtp: bool = False               # DeepSeek-V3: also convert the multi-token-prediction layer
    max_disk: int | None = None     # repo sources: most local bytes the downloaded shards may take at once
    resume: bool = False            # take up an interrupted run's OUT.partial when it was the same conversion
    allow_unused: bool = False      # a config declaring fewer layers than the files hold is meant (else refused)
    target_mesh: TargetMesh | None = None  # the mesh read chunks are cut for (None: up to 16 hosts per axis)
    lora: str | None = None         # a PEFT adapter (folder or hub repo): merged into the base, or alone
    lora_only: bool = False         # with lora: write the adapter's MaxText LoRA tree only


@dataclass
class Result:
    plan: ConversionPlan
    stats: engine.Stats
    out: Path
    source: str
    notes: list[str]


_LAYER_NAME = re.compile(r"(?:^|\.)(?:model|language_model)\.layers\.(\d+)\.")


def file_tensor_names(source: hf.HFSource) -> Collection[str] | None:
    """The tensor names a source's safetensors files hold (headers only); None without safetensors files."""
    if source.files is not None:
        return source.files.tensors
    if source.remote is not None:
        return source.remote.tensors
    if any(Path(source.folder).glob("*.safetensors")):
        return SafetensorsFolder(source.folder).tensors
    return None


def check_layer_count(source: hf.HFSource, allow_unused: bool = False) -> None:
    """The config's decoder layer count against the layers the source's files hold (headers only), before
    anything is built per layer: more layers than the files hold is refused at once (a config saying
    10,000,000 layers never allocates a plan), fewer is refused unless `allow_unused` says it is meant."""
    family = detect_family(source.config)
    cfg = family.model_config(source.config)
    names = file_tensor_names(source)
    if names is None:
        return                  # e.g. .bin weights for --load-method transformers: nothing to count cheaply
    found = {int(m.group(1)) for n in names if (m := _LAYER_NAME.search(n))}
    if not found:
        return
    declared = config_int(cfg, "num_hidden_layers")
    held = max(found) + 1
    expected = declared + family.extra.get("extra_layers", lambda c: 0)(cfg)
    if held < declared:
        raise SourceError(f"config.json declares {declared} layers, but the files hold {held} "
                          f"(model.layers.0-{held - 1}): the config does not describe these files")
    if held > expected and not allow_unused:
        dropped = f"layer {expected}" if held - expected == 1 else f"layers {expected}-{held - 1}"
        raise SourceError(f"config.json declares {declared} layer(s), but the files hold {held}: {dropped} would be "
                          "dropped; pass --allow-unused if that is meant")


def plan_to_maxtext(source: hf.HFSource, opts: ToMaxTextOptions) -> ConversionPlan:
    """The plan for a resolved HF source, with the config checked against --model when given."""
    check_layer_count(source, opts.allow_unused)
    model_name = opts.model or source.model_name
    family = detect_family(source.config, model_name)
    if model_name:
        spec = registry.lookup(model_name)
        if spec.family != family.name:
            raise ConfigMismatchError(f"{model_name} is a {spec.family} model, but config.json describes "
                                      f"a {family.name} model")
        registry.check_against(spec, family.model_config(source.config), family.reference_keys)
    features = frozenset({"mtp"}) if opts.mtp else frozenset()
    features |= family.source_layouts(source.config, file_tensor_names(source) or ())   # e.g. fused experts
    return build_to_maxtext(family, source.config, opts.scan_layers, output_dtype(store_dtype(opts, model_name)),
                            features, mesh=opts.target_mesh)


def store_dtype(opts: ToMaxTextOptions, model_name: str | None) -> str:
    """--dtype, or when not given bf16, or fp8 for a model name whose MaxText 0.2.5 tree keeps fp8 weights."""
    if opts.dtype is not None:
        return opts.dtype
    return (registry.lookup(model_name).dtype if model_name else None) or "bf16"


def with_source_names(plan: ConversionPlan, source: hf.HFSource, names: Collection[str]) -> ConversionPlan:
    """The plan reading the names the source's files actually use (the family decides, e.g. the text prefix
    of a multimodal Gemma3); unchanged when they are the family's own."""
    rename, notes = family_named(plan.family).source_names(source.config, names)
    return plan if rename is None else rename_sources(plan, rename, notes)


def open_reader(source: hf.HFSource, load_method: str, dtype: np.dtype | None = None):
    if dtype is not None and np.dtype(dtype) == FP8:
        dtype = BF16            # --dtype fp8: what is not kept fp8 is bf16 (kept weights are read raw)
    if load_method == "safetensors":
        qcfg = source.config.get("quantization_config") or {}
        block = tuple(qcfg.get("weight_block_size") or (128, 128))
        group = int4.group_size(qcfg)
        files = source.files or (remote_stream.RemoteFolder(source.remote) if source.remote else source.folder)
        return hf.SafetensorsReader(files, dequant_dtype=dtype, block=block, int4_group=group)
    if load_method == "transformers":
        if source.files is not None:
            from ckpt_cli.errors import UnsupportedError

            raise UnsupportedError(f"--load-method transformers reads a local folder; {source.label} is read in "
                                   f"place with the default --load-method safetensors")
        return hf.TransformersReader(source.folder)
    raise SourceError(f"unknown load method {load_method!r}: choose safetensors or transformers")


def mxfp4_notes(plan: ConversionPlan, reader) -> list[str]:
    """A note naming how many MXFP4 (and int4-packed) weights the plan dequantizes (none for other sources)."""
    notes = []
    for kind, stored in (("MXFP4", "*_blocks + *_scales"), ("int4", "*.weight_packed + _scale + _shape")):
        packed = getattr(reader, kind.lower(), {})
        names = {task.source.name for t in plan.tensors for task in t.tasks if task.source.name in packed}
        if names:
            notes.append(f"{len(names)} {kind} weight(s) ({stored}, e.g. {min(names)}) dequantized one expert at a "
                         f"time into {np.dtype(plan.dtype).name}")
    return notes


def provenance(plan: ConversionPlan, source: hf.HFSource, opts: ToMaxTextOptions) -> dict:
    """What we carry inside the checkpoint so maxtext-to-hf needs no flags."""
    return {
        "tool": "ckpt", "version": __version__, "direction": plan.direction, "family": plan.family,
        "model_name": opts.model or source.model_name, "source": source.label, "repo_id": source.repo_id,
        "source_folder": source.label if source.files is not None else str(Path(source.folder).resolve()),
        "revision": source.revision, "dtype": np.dtype(plan.dtype).name, "scan_layers": plan.scan_layers,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "hf_config": plan.hf_config,
        "target_mesh": (opts.target_mesh or TargetMesh()).describe(),
        "source_layouts": sorted(plan.features & family_named(plan.family).layouts),   # written back alike
    }


def progress_key(plan: ConversionPlan, source: hf.HFSource, opts: ToMaxTextOptions) -> str:
    """What must match for `--resume` to take up an interrupted run: the same source files (names, sizes,
    modification times, or the hub commit), the same plan (every target, shape, dtype, chunk, transform
    and source slice) and the same storage options."""
    files = {}
    if source.files is not None:            # a bucket's shards: their store generations
        files["generations"] = source.files.identity()
    elif source.remote is not None:
        files["commit"] = getattr(source.remote, "commit", None)
    else:
        for f in sorted(Path(source.folder).glob("*.safetensors")):
            st = f.stat()
            files[f.name] = [st.st_size, st.st_mtime_ns]
    if opts.lora:           # the adapter's files too: a merged run's plan is the base's own
        folder = Path(opts.lora).expanduser()
        files["lora"] = [opts.lora, opts.lora_only, *([[f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                                        for f in sorted(folder.glob("adapter_*"))]
                                                      if folder.is_dir() else [])]
    ident = {"tool": __version__, "source": source.label, "files": files,
             "storage": dataclasses.asdict(opts.storage), "load_method": opts.load_method,
             "plan": [[t.target, list(t.shape), np.dtype(t.dtype).name, list(t.chunk_shape), t.read_chunk,
                       t.chain.describe(),
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
    if source.files is not None:            # in a bucket: nothing local
        return []
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

        if overlapping(out, source_arg):
            raise OutputError(f"--out {out} overlaps the source {source_arg}: choose another --out")
        bucket.check_output(out, opts.overwrite, opts.resume)
        return _hf_to_maxtext(source, out, opts, progress, on_plan)
    target = outdir.output_path(out)
    adapter = [Path(opts.lora).expanduser()] if opts.lora and Path(opts.lora).expanduser().exists() else []
    outdir.check_not_overlapping(target, [*source_paths(source), *adapter])
    with outdir.OutputLock(target):
        outdir.check_output(target, opts.overwrite)
        result = _hf_to_maxtext(source, target, opts, progress, on_plan)
    result.out = Path(out)
    return result


def _hf_to_maxtext(source: hf.HFSource, out: Path | BucketURL, opts: ToMaxTextOptions, progress, on_plan) -> Result:
    plan = plan_to_maxtext(source, opts)
    if fp8.is_fp8(plan) and opts.load_method != "safetensors":
        raise UnsupportedError(f"--dtype fp8 keeps the e4m3 bytes and scales of the safetensors files; --load-method "
                               f"{opts.load_method} cannot keep them (use the default, safetensors)")
    reader = open_reader(source, opts.load_method, plan.dtype)
    plan = with_source_names(plan, source, reader.names)
    lora_meta: dict = {}
    if opts.lora:
        plan, reader, lora_meta = with_adapter(plan, reader, source, opts)
    engine.validate(plan, reader)
    plan = fp8.match_source(plan, reader)
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
    kept_in = partial_dir(out) if local else out
    if local:
        done, why_not = read_progress(out, key, opts.storage) if opts.resume else (None, "")
    else:
        from ckpt_cli.io import bucket

        done, why_not = bucket.read_progress(out, key, opts.storage) if opts.resume else (None, "")
    if opts.resume:
        notes.append(f"resuming: {len(done)} of {sum(len(t.tasks) for t in plan.tensors)} slice writes were "
                     f"already durable in {kept_in}" if done is not None else
                     f"--resume: {why_not}; starting afresh")
    elif local and partial_dir(out).exists():
        notes.append(f"an interrupted run's {partial_dir(out)} was removed: starting afresh")
    stream = (remote_stream.ShardStream(reader.files, plan, reader, opts.max_disk, skip=done or frozenset())
              if source.remote and not opts.lora_only else None)     # --lora-only reads no base shard
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

        writer = BucketOrbaxWriter(out, opts.storage, progress_key=key, resume=done is not None)
    try:
        if stream:
            stream.start(near)
        stats = engine.execute(plan, reader, stream.track(writer) if stream else writer, progress=progress,
                               workers=opts.workers, skip=writer.done)
        writer.finalize({"scan_layers": plan.scan_layers, "ckpt": provenance(plan, source, opts) | lora_meta.get(
            "ckpt", {}), **{k: v for k, v in lora_meta.items() if k != "ckpt"}})
    except KeyboardInterrupt as exc:
        if writer.abort(keep=True):
            again = "again" if local else "with --resume"
            raise Interrupted(f"progress kept in {kept_in}: run the same command {again} to finish it") from exc
        raise
    except BaseException as exc:
        full = outdir.disk_full(exc)
        failed_request = not local and isinstance(exc, OutputError)     # the bucket's last snapshot stands
        kept = writer.abort(keep=full is not None or failed_request)
        if full is not None:
            raise kept_or_not(full, kept, partial_dir(out)) from None
        if failed_request and kept:
            raise OutputError(f"{exc}; progress kept in {out}: run the same command with --resume to finish "
                              f"it") from None
        raise
    finally:
        if stream:
            stream.close()
    if stream:
        stats.extra["download"] = stream.stats
    return Result(plan, stats, out, source.label, notes)


def with_adapter(plan: ConversionPlan, reader, source: hf.HFSource, opts: ToMaxTextOptions):
    """(plan, reader, metadata) for --lora: the adapter's own plan and file with --lora-only (metadata: MaxText's
    `lora` entry and the provenance's), else the base plan reading W + scale·B·A for each targeted weight."""
    from ckpt_cli import lora

    adapter = lora.resolve_adapter(opts.lora, opts.revision if opts.lora == source.label else None)
    areader = lora.adapter_reader(adapter)
    aplan, targets = lora.plan_adapter(family_named(plan.family), source.config, adapter, plan.scan_layers,
                                       plan.dtype, plan.features, opts.target_mesh, areader.files.tensors)
    engine.validate(aplan, areader)
    summary = lora.adapter_summary(adapter, targets)
    if opts.lora_only:
        notes = (*plan.notes, f"LoRA adapter {adapter.label}: r={adapter.rank}, alpha={adapter.alpha:g}"
                 + (f" (rsLoRA: recorded as MaxText alpha {adapter.maxtext_alpha:g})" if adapter.rslora else "")
                 + f", on {', '.join(summary['targets'])}")
        return (dataclasses.replace(aplan, notes=notes), areader,
                {"lora": lora.lora_metadata(adapter, targets), "ckpt": {"lora": summary, "lora_only": True}})
    notes = (*plan.notes, f"LoRA adapter {adapter.label} merged (W + {adapter.scale:g}·B·A) into "
             f"{len(lora.merge_pairs(aplan))} weight(s)")
    merged = lora.MergedHFReader(reader, areader, lora.merge_pairs(aplan), adapter.scale)
    return dataclasses.replace(plan, notes=notes), merged, {"ckpt": {"merged_lora": summary}}


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
    lora: str | None = None             # a MaxText LoRA checkpoint merged into SOURCE
    lora_only: bool = False             # SOURCE is a LoRA checkpoint: write it as a PEFT adapter folder


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
    features = to_hf.detect_features(arch, ckpt, scan)
    features |= frozenset(ckpt.provenance.get("source_layouts") or ()) & arch.family.layouts   # the source's own
    kept = fp8.kept_in(ckpt)
    if kept and opts.dtype not in (None, "fp8"):
        raise UnsupportedError(f"--dtype {opts.dtype}: this checkpoint keeps fp8 weights with block scales, and "
                               "maxtext-to-hf writes them as they are (fp8 + weight_scale_inv); leave out --dtype")
    if opts.dtype == "fp8" and not kept:
        raise UnsupportedError("--dtype fp8: this checkpoint holds no fp8 weights with block scales to write back")
    forward = build_to_maxtext(arch.family, arch.config, scan, output_dtype("fp8" if kept else opts.dtype or "bf16"),
                               features)
    notes = tuple(to_hf.check_checkpoint(forward, ckpt))
    name = "fp8" if kept else opts.dtype
    if name is None:   # the checkpoint's own dtype; the config's only when the checkpoint's is neither bf16 nor f32
        said, stored = to_hf.default_dtype(arch.config), to_hf.stored_dtype(forward, ckpt)
        name = stored or said
        if stored and stored != said:
            notes += (f"the checkpoint stores {stored}: writing {stored} (the config says {said}; --dtype {said} "
                      f"casts)",)
    plan = fp8.match_checkpoint(build_to_hf(arch.family, arch.config, scan, output_dtype(name), features), ckpt)
    return dataclasses.replace(plan, notes=(*plan.notes, *notes)), arch


def hf_side_files(ckpt, arch, opts: ToHFOptions, notes: list[str]) -> tuple[dict[str, Path], dict | Path | None]:
    """Tokenizer files and generation config for the output: from --tokenizer, else the carried source folder."""
    from ckpt_cli import to_hf
    from ckpt_cli.io.tokenizer import GENERATION_CONFIG, carried_files, resolve_tokenizer

    tokenizer: dict[str, Path] = {}
    generation: dict | Path | None = None
    folder, why_not = to_hf.source_folder(ckpt)
    if folder is not None:
        tokenizer = carried_files(folder)
        generation = tokenizer.pop(GENERATION_CONFIG, None)
    if opts.tokenizer:
        tokenizer, gen = resolve_tokenizer(opts.tokenizer)
        generation = generation or gen
    elif why_not:
        notes.append(why_not)
    elif tokenizer:
        notes.append(f"tokenizer files copied from {folder}: {', '.join(sorted(tokenizer))}")
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
    if isinstance(out, BucketURL):                  # streamed into the bucket, completed by config.json (bucket_hf.py)
        if opts.overwrite:
            from ckpt_cli.errors import UnsupportedError

            raise UnsupportedError(f"--overwrite {out}: ckpt does not replace a folder in a bucket (an object store "
                                   f"cannot swap it atomically); delete it first or choose another --out")
        if opts.lora or opts.lora_only:
            from ckpt_cli.errors import UnsupportedError

            raise UnsupportedError(f"--out {out}: LoRA conversions (--lora, --lora-only) write a local folder; "
                                   "convert to a local --out, then copy it to the bucket")
        if overlapping(out, source_arg):
            raise OutputError(f"--out {out} overlaps the checkpoint {source_arg}: choose another --out")
        return _maxtext_to_hf(ckpt, source_arg, out, opts, progress, on_plan)
    target = outdir.output_path(out)
    reads = [] if remote else [Path(source_arg), ckpt.items]
    lora_ckpt = OrbaxCheckpoint(Path(opts.lora)) if opts.lora else None
    if lora_ckpt is not None:
        reads += [Path(opts.lora), lora_ckpt.items]
    outdir.check_not_overlapping(target, [*reads, *([opts.hf_config] if opts.hf_config else [])])
    with outdir.OutputLock(target):
        outdir.check_output(target, opts.overwrite)
        if opts.lora_only:
            from ckpt_cli.lora_convert import maxtext_adapter_to_peft

            result = maxtext_adapter_to_peft(ckpt, target, opts, progress, on_plan)
        else:
            result = _maxtext_to_hf(ckpt, source_arg, target, opts, progress, on_plan, lora_ckpt)
    result.out = Path(out)
    return result


def _maxtext_to_hf(ckpt, source_arg: str, out: Path, opts: ToHFOptions, progress, on_plan,
                   lora_ckpt=None) -> HFResult:
    from ckpt_cli import to_hf
    from ckpt_cli.io.hf_writer import HFFolderWriter
    from ckpt_cli.io.hf_writer import read_progress as read_hf_progress
    from ckpt_cli.io.orbax_blocks import BlockReader
    from ckpt_cli.io.safetensors import PlannedTensor
    from ckpt_cli.plan import write_key

    plan, arch = plan_to_hf(ckpt, opts)
    engine.validate(plan, ckpt)
    notes = list(plan.notes)
    merge = None
    if lora_ckpt is not None:
        from ckpt_cli.lora_convert import merged_reader

        merge = lambda reader: merged_reader(reader, lora_ckpt, arch, plan.scan_layers, plan.features)  # noqa: E731
        notes.append(merge(ckpt)[1])          # checks the LoRA checkpoint before anything is written
        json_lora = {"lora": [str(Path(opts.lora).resolve()), checkpoint_files(lora_ckpt.items)]}
    if arch.origin != "carried":
        notes.append(f"architecture from {arch.origin}")
    if arch.config.get("quantization_config") and not fp8.is_fp8(plan):
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
    if not isinstance(out, BucketURL):
        outdir.check_not_overlapping(out, copies.values())
    key = hf_progress_key(plan, ckpt, opts, {**json_files, **(json_lora if merge else {})}, copies)
    if isinstance(out, BucketURL):
        return _maxtext_to_hf_bucket(plan, ckpt, source_arg, out, opts, key, notes, json_files, copies, arch,
                                     progress, on_plan)
    task_bytes = {write_key(t.target, t.target_index(task)): math.prod(t.task_shape(task)) * np.dtype(t.dtype).itemsize
                  for t in plan.tensors for task in t.tasks}
    partial = partial_dir(out)
    done, why_not = read_hf_progress(out, key, task_bytes) if opts.resume else (None, "")
    check_free_space(out, plan.output_bytes - sum(task_bytes[k] for k in done or ()))
    planned = [PlannedTensor(t.target, t.dtype, t.shape) for t in plan.tensors]
    if not opts.resume and partial.exists():
        notes.append(f"an interrupted run's {partial} was removed: starting afresh")
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
        if merge is not None:
            reader = merge(reader)[0]
        stats = engine.execute(plan, reader, writer, progress=progress, workers=opts.workers, skip=writer.done)
        files = writer.finalize(json_files, copies)
    except KeyboardInterrupt as exc:
        kept = writer.abort(keep=True) if writer is not None else done is not None and partial.is_dir()
        if kept:
            raise Interrupted(f"progress kept in {partial}: run the same command again to finish it") from exc
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


def _maxtext_to_hf_bucket(plan, ckpt, source_arg, out: BucketURL, opts: ToHFOptions, key: str, notes: list[str],
                          json_files: dict, copies: dict, arch, progress, on_plan) -> HFResult:
    """maxtext-to-hf into a bucket prefix: shards laid out in the engine's write order and streamed as uploads
    (io/bucket_hf.py); `--resume` keeps the shards an interrupted run of the same conversion completed."""
    from ckpt_cli.io.bucket_hf import BucketHFWriter
    from ckpt_cli.io.orbax_blocks import BlockReader
    from ckpt_cli.io.safetensors import PlannedTensor
    from ckpt_cli.plan import write_key

    reader = BlockReader(ckpt)
    order = list(dict.fromkeys(t.target for t, _ in engine.ordered_jobs(plan, reader)))
    planned = [PlannedTensor(t.target, t.dtype, t.shape) for t in plan.tensors]
    writer = BucketHFWriter(out, planned, opts.shard_size, order, key, resume=opts.resume)
    skip = writer.resume_keys({t.target: [write_key(t.target, t.target_index(task)) for task in t.tasks]
                               for t in plan.tensors})
    if opts.resume:
        notes.append(f"resuming: {len(writer.resumed)} of {len(writer.files)} shard(s) already complete in {out}"
                     if writer.resumed else f"--resume: {writer.why_not or 'nothing to resume'}; starting afresh")
    if on_plan:
        on_plan(plan, notes)
    try:
        stats = engine.execute(plan, reader, writer, progress=progress, workers=opts.workers, skip=skip)
        files = writer.finalize(json_files, copies)
    except KeyboardInterrupt as exc:
        if writer.abort(keep=True):
            raise Interrupted(f"progress kept in {out} (its complete shards): run the same command with "
                              f"--resume to finish it") from exc
        raise
    except OutputError as exc:          # a failed request: the complete shards are kept for --resume
        if writer.abort(keep=True):
            raise OutputError(f"{exc}; progress kept in {out}: run the same command with --resume to finish "
                              f"it") from None
        raise
    except BaseException:
        writer.abort()
        raise
    stats.extra["shards"] = len(writer.files)
    stats.extra["blocks_read"] = reader.blocks_read
    stats.extra["max_buffered_bytes"] = writer.max_buffered
    return HFResult(plan, stats, out, str(source_arg), notes, files, arch.origin)
