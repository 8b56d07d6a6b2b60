"""Conversions as plain functions (the CLI is a thin shell over these)."""

from __future__ import annotations

import datetime as _dt
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ckpt_cli import __version__, engine, registry
from ckpt_cli.dtypes import output_dtype
from ckpt_cli.errors import ConfigMismatchError, OutputError, SourceError
from ckpt_cli.families import detect_family
from ckpt_cli.io import hf
from ckpt_cli.io.orbax import OrbaxWriter, StorageOptions
from ckpt_cli.plan import ConversionPlan, build_to_maxtext


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


@dataclass
class Result:
    plan: ConversionPlan
    stats: engine.Stats
    out: Path
    source: str
    notes: list[str]


def plan_to_maxtext(source: hf.HFSource, opts: ToMaxTextOptions) -> ConversionPlan:
    """The plan for a resolved HF source, with the config checked against --model when given."""
    family = detect_family(source.config)
    model_name = opts.model or source.model_name
    if model_name:
        spec = registry.lookup(model_name)
        if spec.family != family.name:
            raise ConfigMismatchError(f"{model_name} is a {spec.family} model, but config.json describes "
                                      f"a {family.name} model")
        registry.check_against(spec, source.config, family.reference_keys)
    features = frozenset({"mtp"}) if opts.mtp else frozenset()
    return build_to_maxtext(family, source.config, opts.scan_layers, output_dtype(opts.dtype), features)


def open_reader(source: hf.HFSource, load_method: str, dtype: np.dtype | None = None):
    if load_method == "safetensors":
        qcfg = source.config.get("quantization_config") or {}
        block = tuple(qcfg.get("weight_block_size") or (128, 128))
        return hf.SafetensorsReader(source.folder, dequant_dtype=dtype, block=block)
    if load_method == "transformers":
        return hf.TransformersReader(source.folder)
    raise SourceError(f"unknown load method {load_method!r}: choose safetensors or transformers")


def provenance(plan: ConversionPlan, source: hf.HFSource, opts: ToMaxTextOptions) -> dict:
    """What we carry inside the checkpoint so maxtext-to-hf needs no flags."""
    return {
        "tool": "ckpt", "version": __version__, "direction": plan.direction, "family": plan.family,
        "model_name": opts.model or source.model_name, "source": source.label, "repo_id": source.repo_id,
        "revision": source.revision, "dtype": np.dtype(plan.dtype).name, "scan_layers": plan.scan_layers,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "hf_config": plan.hf_config,
    }


def check_free_space(out: Path, nbytes: int) -> None:
    """Refuse up front when the output's filesystem cannot hold the planned bytes."""
    probe = out if out.exists() else out.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < nbytes * 1.02:
        raise OutputError(f"not enough free disk at {probe}: the output needs up to {nbytes / 1e9:.2f} GB, "
                          f"{free / 1e9:.2f} GB free")


def hf_to_maxtext(source_arg: str, out: Path, opts: ToMaxTextOptions, progress=None,
                  on_plan=None) -> Result:
    """Convert an HF checkpoint to a MaxText Orbax checkpoint at `out` (published atomically)."""
    source = hf.resolve(source_arg, opts.revision)
    plan = plan_to_maxtext(source, opts)
    reader = open_reader(source, opts.load_method, plan.dtype)
    engine.validate(plan, reader)
    used = {task.source.name for t in plan.tensors for task in t.tasks}
    used |= {extra for name in used for extra in getattr(reader, "consumed_with", lambda n: [])(name)}
    ignored = sorted(set(reader.names) - used)
    notes = list(plan.notes)
    if ignored:
        notes.append(f"{len(ignored)} source tensor(s) not used: {', '.join(ignored[:4])}"
                     + (" ..." if len(ignored) > 4 else ""))
    if on_plan:
        on_plan(plan, notes)
    out = Path(out)
    check_free_space(out, plan.output_bytes)
    writer = OrbaxWriter(out, opts.storage, overwrite=opts.overwrite)
    try:
        stats = engine.execute(plan, reader, writer, progress=progress, workers=opts.workers)
        writer.finalize({"scan_layers": plan.scan_layers, "ckpt": provenance(plan, source, opts)})
    except BaseException:
        writer.abort()
        raise
    return Result(plan, stats, out, source.label, notes)
