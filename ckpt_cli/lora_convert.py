"""maxtext-to-hf for LoRA: a MaxText LoRA checkpoint back to a PEFT adapter folder, or merged into a base.

A LoRA checkpoint (what `hf-to-maxtext --lora-only` writes, and what MaxText's own LoRA runs save: only the
`kernel_lora_a` / `kernel_lora_b` leaves under params/params, with a `lora` entry in the step's custom metadata)
is planned with the same family rules as the forward direction (ckpt_cli/lora.py), inverted.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ckpt_cli import engine
from ckpt_cli.dtypes import output_dtype
from ckpt_cli.errors import SourceError, UnsupportedError
from ckpt_cli.families.base import Family
from ckpt_cli.lora import (
    A_SUFFIX,
    B_SUFFIX,
    CONFIG_NAME,
    WEIGHTS_NAME,
    delta,
    lora_family,
    lora_rules,
    module_path_regex,
)
from ckpt_cli.plan import ConversionPlan, SourceSlice, build_to_hf, build_to_maxtext


def lora_paths(paths) -> list[str]:
    """The LoRA leaves among a checkpoint's parameter paths."""
    return sorted(p for p in paths if p.endswith((A_SUFFIX, B_SUFFIX)))


def checkpoint_targets(family: Family, cfg: dict, scan: bool, paths, features=frozenset()) -> frozenset[str]:
    """The kernel rule paths whose LoRA leaves a checkpoint holds, checking that every LoRA leaf is one the
    family's LoRA-able kernels have (and that A and B come in pairs, on every layer block)."""
    dims = family.dims(family.model_config(cfg))
    where: dict[str, str] = {}
    for block in family.blocks(dims, family.model_config(cfg), scan, features):
        for rule in block.rules:
            pair = lora_rules(rule)
            if pair:
                for sub in pair:
                    where[f"{block.prefix}/{sub.maxtext}"] = rule.maxtext
    found = lora_paths(paths)
    unknown = [p for p in found if p not in where]
    if unknown:
        raise UnsupportedError(f"{unknown[0]}: a LoRA leaf beside no kernel that {family.name}'s LoRA covers in "
                               f"this tree (attention and dense MLP kernels of decoder layers)")
    targets = frozenset(where[p] for p in found)
    missing = sorted(p for p, rule in where.items() if rule in targets and p not in found)
    if missing:
        raise SourceError(f"{missing[0]}: missing from the LoRA checkpoint (its pair or another layer block has "
                          "it)")
    return targets


def checkpoint_lora(ckpt, family: Family, cfg: dict, scan: bool, features=frozenset()):
    """(rank, alpha, targets) of a LoRA checkpoint: rank and alpha from MaxText's `lora` metadata (the rank
    also from the leaves' shapes when it has none)."""
    targets = checkpoint_targets(family, cfg, scan, ckpt.paths, features)
    if not targets:
        raise SourceError(f"{ckpt.items}: no LoRA leaves (kernel_lora_a / kernel_lora_b) in this checkpoint")
    meta = ckpt.custom_metadata.get("lora")
    meta = meta if isinstance(meta, dict) else {}
    a_leaf = next(p for p in lora_paths(ckpt.paths) if p.endswith(A_SUFFIX))
    rank = int(ckpt.describe(a_leaf)[0][-1])
    if meta.get("lora_rank") not in (None, 0, rank):
        raise SourceError(f"{ckpt.items}: its lora metadata says rank {meta['lora_rank']}, its {a_leaf} has rank "
                          f"{rank}")
    alpha = meta.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha:
        raise SourceError(f"{ckpt.items}: no lora_alpha in its step metadata (custom_metadata.lora, which MaxText "
                          "LoRA runs and ckpt write): the adapter's scale is unknown")
    return rank, float(alpha), targets


def adapter_config(ckpt, plan: ConversionPlan, rank: int, alpha: float, base: str | None) -> dict:
    """adapter_config.json: the one the adapter was converted from when the checkpoint carries it (the same rank and
    scale), else a plain LoRA config naming the modules the adapter targets."""
    carried = ckpt.provenance.get("lora", {})
    carried = carried.get("adapter_config") if isinstance(carried, dict) else None
    if isinstance(carried, dict) and carried.get("r") == rank and _scale(carried) == alpha / rank:
        return carried
    modules = sorted({t.target.removesuffix(".lora_A.weight").rsplit(".", 1)[-1]
                      for t in plan.tensors if t.target.endswith(".lora_A.weight")})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
            "lora_alpha": alpha, "use_rslora": False, "target_modules": modules, "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True}


def _scale(cfg: dict) -> float | None:
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or not isinstance(alpha, (int, float)):
        return None
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def plan_adapter_to_hf(ckpt, arch, dtype: str | None):
    """The MaxText -> PEFT plan of a LoRA checkpoint, its rank and alpha, checked against the checkpoint."""
    from ckpt_cli import to_hf

    scan = to_hf.detect_scan(ckpt)
    rank, alpha, targets = checkpoint_lora(ckpt, arch.family, arch.config, scan)
    fam = lora_family(arch.family, rank, targets)
    forward = build_to_maxtext(fam, arch.config, scan, output_dtype(dtype or "bf16"))
    to_hf.check_checkpoint(forward, ckpt)
    name = dtype or to_hf.stored_dtype(forward, ckpt) or "bf16"
    plan = build_to_hf(fam, arch.config, scan, output_dtype(name))
    return plan, rank, alpha, targets


def maxtext_adapter_to_peft(ckpt, out: Path, opts, progress=None, on_plan=None):
    """Write the LoRA leaves of `ckpt` as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
    at `out`, published atomically (the caller holds the output lock)."""
    from ckpt_cli import to_hf
    from ckpt_cli.convert import HFResult, check_free_space
    from ckpt_cli.io.hf_writer import HFFolderWriter
    from ckpt_cli.io.orbax_blocks import BlockReader
    from ckpt_cli.io.safetensors import PlannedTensor

    arch = to_hf.resolve_architecture(ckpt, opts.model, opts.hf_config)
    plan, rank, alpha, targets = plan_adapter_to_hf(ckpt, arch, opts.dtype)
    engine.validate(plan, ckpt)
    base = ckpt.provenance.get("repo_id") or arch.model_name or ckpt.provenance.get("source_folder")
    cfg = adapter_config(ckpt, plan, rank, alpha, base)
    notes = [f"LoRA adapter: r={rank}, MaxText alpha={alpha:g} (scale {alpha / rank:g}), on "
             f"{', '.join(sorted(t.removesuffix('/kernel') for t in targets))}"]
    if on_plan:
        on_plan(plan, notes)
    check_free_space(out, plan.output_bytes)
    planned = [PlannedTensor(t.target, t.dtype, t.shape) for t in plan.tensors]
    writer = HFFolderWriter(out, planned, 1 << 62, overwrite=opts.overwrite, names=[WEIGHTS_NAME])
    try:
        stats = engine.execute(plan, BlockReader(ckpt), writer, progress=progress, workers=opts.workers)
        files = writer.finalize({CONFIG_NAME: cfg}, {})
    except BaseException:
        writer.abort()
        raise
    stats.extra["shards"] = 1
    return HFResult(plan, stats, out, str(ckpt.items), notes, files, arch.origin)


class MergedMaxTextReader:
    """A MaxText checkpoint Reader serving W + scale·A·B for each kernel a LoRA checkpoint adapts (in MaxText's
    own layout: the B columns already carry the kernel's output transforms), float64 then one rounding to
    float32; every other parameter as the base reader serves it."""

    def __init__(self, base, lora_reader, pairs_by_kernel: dict[str, tuple[str, str]], scale: float):
        self.base, self.lora, self.pairs, self.scale = base, lora_reader, pairs_by_kernel, scale

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    def describe(self, name: str):
        return self.base.describe(name)

    def order_key(self, source):
        return self.base.order_key(source)

    def read(self, source: SourceSlice) -> np.ndarray:
        x = self.base.read(source)
        pair = self.pairs.get(source.name)
        if pair is None:
            return x
        a = self.lora.read(SourceSlice(pair[0], index=source.index, axes=source.axes))
        b = self.lora.read(SourceSlice(pair[1], index=source.index, axes=source.axes))
        full, _ = self.base.describe(source.name)
        layer_shape = tuple(n for i, n in enumerate(full) if i not in source.axes)
        d = delta(a, b, self.scale).reshape(layer_shape)
        if source.rows is not None:
            axis = source.rows_axis - sum(1 for a_ in source.axes if a_ < source.rows_axis)
            idx = [slice(None)] * d.ndim
            idx[axis] = slice(*source.rows)
            d = d[tuple(idx)]
        d = d + x               # a new float64 array (d may be a view of the layer's delta)
        return d.astype(np.float32)


def merged_reader(base_reader, lora_ckpt, arch, scan: bool, features=frozenset()):
    """(reader, note, identity) for `maxtext-to-hf BASE --lora LORA`: the base checkpoint's reader with the LoRA
    checkpoint's deltas added to every kernel it adapts."""
    from ckpt_cli import to_hf
    from ckpt_cli.io.orbax_blocks import BlockReader

    lora_scan = to_hf.detect_scan(lora_ckpt)
    if lora_scan != scan:
        raise SourceError(f"{lora_ckpt.items}: the LoRA checkpoint is {'scanned' if lora_scan else 'unscanned'}, "
                          f"the base {'scanned' if scan else 'unscanned'}: convert both in one layout")
    rank, alpha, targets = checkpoint_lora(lora_ckpt, arch.family, arch.config, scan, features)
    forward = build_to_maxtext(lora_family(arch.family, rank, targets), arch.config, scan, np.dtype(np.float32),
                               features)
    to_hf.check_checkpoint(forward, lora_ckpt)
    kernels: dict[str, dict[str, str]] = {}
    for t in forward.tensors:
        for suffix, slot in ((A_SUFFIX, 0), (B_SUFFIX, 1)):
            if t.target.endswith(suffix):
                kernels.setdefault(t.target[: -len(suffix)] + "kernel", {})[slot] = t.target
    pairs = {k: (v[0], v[1]) for k, v in kernels.items()}
    reader = MergedMaxTextReader(base_reader, BlockReader(lora_ckpt), pairs, alpha / rank)
    note = (f"LoRA checkpoint {lora_ckpt.items} merged (W + {alpha / rank:g}·A·B) into {len(pairs)} kernel(s): "
            f"{module_path_regex(targets)}")
    return reader, note



class LoraParams:
    """A verify ParamSource: the base checkpoint's params with each adapted kernel of every layer read as
    W + scale·A·B (MaxText's layout, float64 then float32): the forward MaxText runs with the adapter applied."""

    def __init__(self, base, lora_ckpt, family: Family, cfg: dict, scan: bool, progress=None):
        from ckpt_cli.verify.params import OrbaxParams, check_tree

        rank, alpha, targets = checkpoint_lora(lora_ckpt, family, cfg, scan)
        fam = lora_family(family, rank, targets)
        check_tree(lora_ckpt, fam, cfg, scan)
        self.base, self.scale, self.targets = base, alpha / rank, targets
        self.lora = OrbaxParams(lora_ckpt, fam, cfg, scan, progress=progress)

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    def layer(self, i: int) -> dict[str, np.ndarray]:
        leaves = self.base.layer(i)
        if i not in self.lora.layer_sources:      # a layer none of whose kernels is adapted (Qwen3-Next's DeltaNet)
            return leaves
        adapter = self.lora.layer(i)
        for name in adapter:
            if not name.endswith(A_SUFFIX):
                continue
            stem = name[: -len(A_SUFFIX)]
            kernel = stem + "kernel"
            w = leaves[kernel]
            d = delta(adapter[stem + A_SUFFIX], adapter[stem + B_SUFFIX], self.scale).reshape(w.shape)
            leaves[kernel] = (w.astype(np.float64) + d).astype(np.float32)
        return leaves


def apply_peft(model, adapter: Path, say=None):
    """The HF model with a PEFT adapter applied: peft's own PeftModel when peft is installed, else each adapted
    Linear's weight replaced by W + scale·B·A (float64, rounded once), read by module name from the adapter."""
    from ckpt_cli.lora import resolve_adapter

    spec = resolve_adapter(adapter)
    try:
        import peft
    except ImportError:
        peft = None
    from safetensors.numpy import load_file

    tensors = load_file(str(spec.weights))
    stems = {n.removesuffix(".lora_A.weight").removeprefix("base_model.model.") for n in tensors
             if n.endswith(".lora_A.weight")}
    if peft is not None:
        wrapped = peft.PeftModel.from_pretrained(model, str(spec.folder)).eval()
        adapted = {n.removeprefix("base_model.model.") for n, m in wrapped.named_modules()
                   if isinstance(m, peft.tuners.lora.Linear)}
        if stems <= adapted:
            return wrapped
        missed = sorted(stems - adapted)
        model = wrapped.unload()
        if say:
            say(f"peft left {len(missed)} adapted module(s) alone (e.g. {missed[0]}; with transformers 5 it matches "
                "such names to the fused experts instead): the adapter is merged by module name instead")
    elif say:
        say("peft is not installed: the adapter is merged into the HF weights (W + scale·B·A) instead")
    import torch

    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in tensors:
            if not name.endswith(".lora_A.weight"):
                continue
            stem = name.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
            if stem not in modules:
                raise SourceError(f"adapter tensor {name}: the HF model has no module {stem}")
            w = modules[stem].weight
            merged = w.detach().double().numpy() + delta(tensors[stem_b(name)], tensors[name], spec.scale)
            w.copy_(torch.from_numpy(merged).to(w.dtype))
    return model


def stem_b(a_name: str) -> str:
    return a_name.removesuffix(".lora_A.weight") + ".lora_B.weight"
