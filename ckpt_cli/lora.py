"""LoRA adapters: a PEFT adapter (adapter_config.json + adapter_model.safetensors) <-> MaxText's LoRA leaves.

MaxText 0.2.5 trains LoRA through Qwix: every kernel its module-path regex picks gets two parameters beside it,
`kernel_lora_a` and `kernel_lora_b`, created per `dot_general` call with the contracting dims of the kernel
flattened into A and the others into B: a query kernel `(E, N, D)` gets A `(E, r)` and B `(r, N*D)`, the out
kernel `(N, D, E)` gets A `(N*D, r)` and B `(r, E)`, an MLP kernel `(E, F)` A `(E, r)` and B `(r, F)`. They have
the kernel's dtype, and in a scanned stack they gain the layer axis where parameters do (param_scan_axis 1):
A `(E, L, r)`, B `(r, L, N*D)`. The forward adds `x·A·B·alpha/r`; to_maxtext's adapter mode writes
`A = lora_A.T`, `B = lora_B.T` (the PEFT tensors transposed) under the kernel's path.

The adapter's rows are planned from the family's own table: each LoRA-able kernel rule (an HF Linear weight
transposed into the kernel, then only transforms of its output columns: the Llama 3.1 RoPE permutation, a folded
query scale) yields an A rule (the transpose) and a B rule (the transpose, then the same output transforms, the
permutation applied head by head on the flat `N*D` axis). So W + s·B·A converts to the converted W plus
s·A'·B' exactly as the base kernel does, and the engine runs the adapter like any other plan.

The scale: PEFT uses alpha/r (alpha/sqrt(r) with `use_rslora`); Qwix always alpha/r. The MaxText alpha ckpt
records (the `lora` custom metadata MaxText's `sync_lora_metadata` reads) is therefore alpha, or alpha·sqrt(r)
for an rsLoRA adapter: same product, tensors untouched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_cli.errors import SourceError, UnsupportedError
from ckpt_cli.families.base import Family, Rule

RANK = "Lr"                           # the dim name of the LoRA rank in planned shapes
PEFT_PREFIX = "base_model.model."     # PEFT's prefix of every saved adapter tensor
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
A_SUFFIX, B_SUFFIX = "kernel_lora_a", "kernel_lora_b"
# Transforms of a kernel's output columns, and what its LoRA B gets for each (B's columns are a flat N*D axis).
_OUT_SIDE = {"rope-interleave": "rope-interleave-heads", "query-scale": "query-scale",
             "query-pre-attn-scale": "query-pre-attn-scale"}
# The kernels MaxText 0.2.5's LoRA module paths (configs/post_train/lora_module_path.yml) reach: attention
# query/key/value/out (MLA: query, wkv_a, wkv_b, out) and the dense or shared-expert MLP's wi_0/wi_1/wo.
LORA_MODULES = frozenset({"query", "key", "value", "out", "wkv_a", "wkv_b", "wi_0", "wi_1", "wo"})
# adapter_config.json fields that change what the adapter computes, and the value that means "not used"
_REFUSED = {"use_dora": (False, None), "bias": ("none", None), "lora_bias": (False, None),
            "modules_to_save": (None, []), "layers_to_transform": (None, []), "layers_pattern": (None, [], ""),
            "rank_pattern": (None, {}), "alpha_pattern": (None, {}), "fan_in_fan_out": (False, None),
            "target_parameters": (None, []), "trainable_token_indices": (None, {}, []),
            "use_qalora": (False, None), "alora_invocation_tokens": (None, [])}


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter: its folder, config and the numbers that matter."""

    folder: Path
    config: dict
    rank: int
    alpha: float
    rslora: bool
    label: str

    @property
    def scale(self) -> float:
        """What PEFT multiplies B·A by: alpha/r, or alpha/sqrt(r) for rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def maxtext_alpha(self) -> float:
        """The alpha MaxText (Qwix: alpha/r) needs for the same scale."""
        return self.alpha * math.sqrt(self.rank) if self.rslora else self.alpha

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS_NAME

    @property
    def target_modules(self) -> str:
        t = self.config.get("target_modules")
        return ", ".join(t) if isinstance(t, list) else str(t)


def check_adapter_config(cfg: object, where: str) -> tuple[int, float, bool]:
    """(r, alpha, rslora) of an adapter_config.json, or a one-line error for what ckpt cannot carry."""
    if not isinstance(cfg, dict):
        raise SourceError(f"{where}: not a PEFT adapter config (a JSON object)")
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise UnsupportedError(f"{where}: peft_type {kind!r}: only LoRA adapters convert (MaxText 0.2.5 has LoRA)")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise SourceError(f"{where}: r must be a positive integer, found {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise SourceError(f"{where}: lora_alpha must be a number, found {alpha!r}")
    for key, unused in _REFUSED.items():
        if cfg.get(key) not in unused:
            raise UnsupportedError(f"{where}: {key} = {cfg[key]!r}: MaxText 0.2.5's LoRA has one rank and alpha for "
                                   "plain A/B pairs on whole layers, nothing else (no DoRA, biases, saved modules, "
                                   "per-module ranks or partial layers)")
    return r, float(alpha), bool(cfg.get("use_rslora", False))


def resolve_adapter(arg: str | Path, revision: str | None = None) -> Adapter:
    """A PEFT adapter from a local folder or a hub repo id (only its config and weights are fetched)."""
    folder = Path(arg).expanduser()
    if not folder.exists():
        from ckpt_cli.io import hf

        hf.check_repo_id(str(arg))
        folder = hf.download(str(arg), revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    if not folder.is_dir():
        raise SourceError(f"{arg}: not a PEFT adapter folder (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise SourceError(f"{arg}: no {CONFIG_NAME} (a PEFT LoRA adapter folder holds it beside {WEIGHTS_NAME})")
    if not (folder / WEIGHTS_NAME).is_file():
        found = "adapter_model.bin (pickle, not read)" if (folder / "adapter_model.bin").exists() else "nothing"
        raise SourceError(f"{arg}: no {WEIGHTS_NAME} (found {found})")
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON ({exc})") from None
    r, alpha, rslora = check_adapter_config(cfg, str(path))
    return Adapter(folder, cfg, r, alpha, rslora, str(arg))


def lora_rules(rule: Rule) -> tuple[Rule, Rule] | None:
    """The A and B rules of a kernel rule MaxText 0.2.5 can put LoRA beside, or None.

    LoRA-able: a kernel of one of the LORA_MODULES, from one HF Linear weight `(out, in)` per layer (no experts,
    parts or variables), transposed into the kernel, then only transforms of its output columns.
    """
    parts = rule.maxtext.split("/")
    if (len(parts) < 2 or parts[-2] not in LORA_MODULES or parts[-1] != "kernel" or not rule.hf.endswith(".weight")
            or rule.experts or rule.part
            or rule.collection or len(rule.hf_shape) != 2 or not rule.steps or rule.steps[0] != "transpose"
            or not set(rule.steps[1:]) <= set(_OUT_SIDE)):
        return None
    out, inp = rule.hf_shape
    base, stem = rule.maxtext[: -len("kernel")], PEFT_PREFIX + rule.hf[: -len(".weight")]
    a = Rule(base + A_SUFFIX, stem + ".lora_A.weight", (inp, RANK), (RANK, inp), ("transpose",))
    b = Rule(base + B_SUFFIX, stem + ".lora_B.weight", (RANK, out), (out, RANK),
             ("transpose", *(_OUT_SIDE[s] for s in rule.steps[1:])))
    return a, b


def lora_family(family: Family, rank: int, targets: Collection[str] | None = None) -> Family:
    """The family whose plan is the adapter tree: for each block, the A and B rules of its LoRA-able kernels
    (only those whose rule path is in `targets`, when given); no top-level rules."""

    def blocks(dims, cfg, scan, features=frozenset()):
        out = []
        for block in family.blocks(dims, cfg, scan, features):
            rules = tuple(x for r in block.rules if (targets is None or r.maxtext in targets)
                          for pair in [lora_rules(r)] if pair for x in pair)
            if rules:
                out.append(dataclasses.replace(block, rules=rules))
        return out

    return dataclasses.replace(family, dims=lambda cfg: family.dims(cfg) | {RANK: rank},
                               top_rules=lambda dims, cfg: (), blocks=blocks)


def _layer_names(family: Family, cfg: dict, features: frozenset[str]) -> dict[str, tuple[str, int, str]]:
    """Every adapter tensor name the family's LoRA-able kernels could have: name -> (rule path, layer, A or B)."""
    cfg = family.model_config(cfg)
    dims = family.dims(cfg)
    names: dict[str, tuple[str, int, str]] = {}
    for block in family.blocks(dims, cfg, False, features):
        for rule in block.rules:
            pair = lora_rules(rule)
            if pair:
                for sub, kind in zip(pair, "AB", strict=True):
                    for layer in block.hf_layers:
                        names[sub.hf.format(layer=layer)] = (rule.maxtext, layer, kind)
    return names


def adapter_targets(family: Family, cfg: dict, names: Collection[str],
                    features: frozenset[str] = frozenset()) -> frozenset[str]:
    """The kernel rule paths an adapter's tensors target (e.g. 'self_attention/query/kernel'), after checking
    that each tensor is the A or B of a kernel MaxText 0.2.5 puts LoRA beside, and that every layer has both."""
    known = _layer_names(family, cfg, features)
    unknown = sorted(n for n in names if n not in known)
    if unknown:
        n = unknown[0]
        raise UnsupportedError(
            f"adapter tensor {n}{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}: MaxText 0.2.5 has "
            f"no LoRA leaf for it in a {family.name} tree (its LoRA module paths reach the attention query/key/"
            "value/out (MLA: wkv_a/wkv_b) and dense or shared-expert MLP kernels only: not expert, router, "
            "embedding, head, norm or other projection weights)")
    hit: dict[str, set[tuple[int, str]]] = {}
    for n in names:
        path, layer, kind = known[n]
        hit.setdefault(path, set()).add((layer, kind))
    everything: dict[str, set[tuple[int, str]]] = {}
    for path, layer, kind in known.values():
        everything.setdefault(path, set()).add((layer, kind))
    for path, got in hit.items():
        missing = sorted(everything[path] - got)
        if missing:
            layer, kind = missing[0]
            raise UnsupportedError(f"the adapter has {path.removesuffix('/kernel')} LoRA on some layers only (no "
                                   f"lora_{kind} for layer {layer}): MaxText 0.2.5's LoRA covers every layer")
    if not hit:
        raise SourceError("the adapter holds no LoRA tensors (lora_A / lora_B)")
    return frozenset(hit)


def module_path_regex(targets: Collection[str]) -> str:
    """A MaxText `lora_module_path` regex matching exactly these kernels' modules (rule paths relative to a
    decoder layer, e.g. 'self_attention/query/kernel'), in scanned and unscanned trees."""
    modules = sorted({t.removesuffix("/kernel") for t in targets})
    return r"decoder/layers(?:_[0-9]+|/[0-9]+)?/(?:.*/)?(" + "|".join(re.escape(m) for m in modules) + ")"


def lora_metadata(adapter: Adapter, targets: Collection[str]) -> dict:
    """The `lora` custom metadata MaxText writes with a LoRA run (config.lora) and `sync_lora_metadata` reads."""
    return {"enable_lora": True, "lora_rank": adapter.rank, "lora_alpha": adapter.maxtext_alpha,
            "lora_module_path": module_path_regex(targets), "lora_weight_qtype": None, "lora_tile_size": None,
            "lora_restore_path": ""}


def pairs(plan_tensors, suffix_a: str, suffix_b: str, key: Callable[[str], str]) -> dict[str, tuple[str, str]]:
    """base name -> (A name, B name) over planned tensor names ending in the two suffixes."""
    found: dict[str, dict[str, str]] = {}
    for t in plan_tensors:
        for suffix, slot in ((suffix_a, "a"), (suffix_b, "b")):
            if t.endswith(suffix):
                found.setdefault(key(t[: -len(suffix)]), {})[slot] = t
    return {base: (d["a"], d["b"]) for base, d in found.items() if len(d) == 2}


def delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """scale · a @ b in float64 (a rank-r product: exact enough that one rounding of W + delta follows)."""
    return (a.astype(np.float64) @ b.astype(np.float64)) * scale


def adapter_reader(adapter: Adapter):
    """The engine Reader of an adapter's tensors (its one safetensors file)."""
    from ckpt_cli.io import hf
    from ckpt_cli.io.safetensors import SafetensorsFolder

    return hf.SafetensorsReader(SafetensorsFolder(adapter.folder, [adapter.weights]))


class MergedHFReader:
    """An HF Reader serving W + scale·B·A for each LoRA-targeted weight (the rows asked for: B's same rows),
    computed in float64 and rounded once to float32; every other tensor as the base reader serves it."""

    def __init__(self, base, adapter, pairs_by_weight: dict[str, tuple[str, str]], scale: float):
        self.base, self.adapter, self.pairs, self.scale = base, adapter, pairs_by_weight, scale

    def __getattr__(self, name: str):          # names, files, consumed_with, mxfp4 ... are the base reader's
        return getattr(self.base, name)

    def describe(self, name: str):
        return self.base.describe(name)

    def order_key(self, source):
        return self.base.order_key(source)

    def read(self, source):
        from ckpt_cli.plan import SourceSlice

        x = self.base.read(source)
        pair = self.pairs.get(source.name)
        if pair is None:
            return x
        a = self.adapter.read(SourceSlice(pair[0]))
        b = self.adapter.read(SourceSlice(pair[1], rows=source.rows))
        merged = delta(b, a, self.scale)
        merged += x             # in place: one float64 array of the slice at a time
        return merged.astype(np.float32)


def plan_adapter(family: Family, hf_config: dict, adapter: Adapter, scan: bool, dtype,
                 features: frozenset[str] = frozenset(), mesh=None, names: Collection[str] | None = None):
    """The HF -> MaxText plan of an adapter's tree (its tensors' `names`, else read from its file), and its targets."""
    from ckpt_cli.plan import build_to_maxtext

    if names is None:
        names = adapter_reader(adapter).files.tensors
    targets = adapter_targets(family, hf_config, names, features)
    plan = build_to_maxtext(lora_family(family, adapter.rank, targets), hf_config, scan, dtype, features, mesh=mesh)
    return plan, targets


def merge_pairs(adapter_plan) -> dict[str, tuple[str, str]]:
    """HF base weight name -> (its lora_A name, its lora_B name), from an adapter plan's sources."""
    names = [task.source.name for t in adapter_plan.tensors for task in t.tasks]
    return pairs(names, ".lora_A.weight", ".lora_B.weight", lambda stem: stem.removeprefix(PEFT_PREFIX) + ".weight")


def adapter_summary(adapter: Adapter, targets: Collection[str]) -> dict:
    """What provenance records of an adapter (and `inspect` shows)."""
    return {"source": adapter.label, "folder": str(adapter.folder.resolve()), "r": adapter.rank,
            "lora_alpha": adapter.alpha, "use_rslora": adapter.rslora,
            "scale": adapter.scale, "targets": sorted(t.removesuffix("/kernel") for t in targets),
            "adapter_config": adapter.config}


def describe_peft(folder: Path, headers: dict) -> dict | None:
    """What `inspect` shows of a PEFT LoRA adapter folder (None for any other folder): rank, alpha, scale, the
    modules its tensors adapt, tensor count and bytes."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON ({exc})") from None
    r, alpha, rslora = check_adapter_config(cfg, str(path))
    adapter = Adapter(folder, cfg, r, alpha, rslora, str(folder))
    names = [n for n in headers if n.endswith((".lora_A.weight", ".lora_B.weight"))]
    modules = sorted({n.rsplit(".", 3)[-3] for n in names})
    return {"format": "peft", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "scale": adapter.scale,
            "target_modules": cfg.get("target_modules"), "modules": modules,
            "base_model": cfg.get("base_model_name_or_path"), "tensors": len(names),
            "bytes": sum(headers[n].nbytes for n in names)}


def describe_checkpoint(ckpt) -> dict | None:
    """What `inspect` shows of the LoRA leaves of a MaxText checkpoint (None when it has none)."""
    leaves = sorted(p for p in ckpt.paths if p.endswith((A_SUFFIX, B_SUFFIX)))
    if not leaves:
        return None
    meta = ckpt.custom_metadata.get("lora")
    meta = meta if isinstance(meta, dict) else {}
    rank = int(ckpt.describe(next(p for p in leaves if p.endswith(A_SUFFIX)))[0][-1])
    alpha = meta.get("lora_alpha")
    kernels = sorted({p.rsplit("/", 1)[0] for p in leaves})
    modules = sorted({"/".join(k.split("/")[-2:]) for k in kernels})
    return {"format": "maxtext", "r": rank, "lora_alpha": alpha,
            "scale": alpha / rank if isinstance(alpha, (int, float)) and alpha else None, "modules": modules,
            "kernels": len(kernels), "tensors": len(leaves),
            "bytes": sum(math.prod(s) * np.dtype(d).itemsize for s, d in map(ckpt.describe, leaves))}
