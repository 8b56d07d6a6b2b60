"""MaxText -> HF specifics: which architecture a checkpoint holds, and the HF files written beside the weights.

The architecture (an HF config.json) comes from, in order: `--hf-config PATH`, the config our
hf-to-maxtext carried in the checkpoint, or `--model NAME`'s reference config. The layout (scanned or
not) comes from the checkpoint itself. Before anything is written, every parameter the config implies
is checked against the checkpoint: present, with the full shape the plan expects, and nothing extra.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_cli import registry
from ckpt_cli.dtypes import dtype_name, is_float
from ckpt_cli.errors import CkptError, ConfigMismatchError, ShapeMismatchError, SourceError
from ckpt_cli.families import Family, detect_family
from ckpt_cli.io.orbax import OrbaxCheckpoint
from ckpt_cli.plan import ConversionPlan, TensorPlan

_SCANNED = re.compile(r"decoder/(layers|dense_layers|moe_layers|layers_remainder|scanned_blocks)/")
# scanned trees that keep some layers unscanned beside the stacked ones (DeepSeek-V4's hash layers)
_MIXED = re.compile(r"decoder/scanned_blocks/")
_UNSCANNED = re.compile(r"decoder/(layers|dense_layers|moe_layers)_\d+/")
_CONFIG_DTYPES = {"bfloat16": "bf16", "float32": "f32"}
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class Architecture:
    """What the checkpoint holds: its HF config and family, and where the config came from."""

    config: dict
    family: Family
    origin: str           # "carried", "--hf-config PATH" or "--model NAME"
    model_name: str | None = None


def load_hf_config(path: Path) -> dict:
    """A config.json file, or a folder holding one."""
    path = Path(path).expanduser()
    file = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError:
        raise SourceError(f"--hf-config {path}: no such file (give a config.json or a folder with one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"--hf-config {file}: not a readable JSON config ({exc})") from None
    if not isinstance(cfg, dict):
        raise SourceError(f"--hf-config {file}: not a config object")
    return cfg


def resolve_architecture(ckpt: OrbaxCheckpoint, model: str | None, hf_config: Path | None) -> Architecture:
    """The checkpoint's HF config: --hf-config, else carried, else --model; --model also checks the others."""
    carried = ckpt.provenance.get("hf_config")
    spec = registry.lookup(model) if model else None
    if hf_config is not None:
        cfg, origin = load_hf_config(hf_config), f"--hf-config {hf_config}"
    elif carried:
        if not isinstance(carried, dict):
            raise SourceError(f"{ckpt.items}: the config.json carried in _CHECKPOINT_METADATA is not a config object")
        cfg, origin = dict(carried), "carried"
    elif spec is not None:
        cfg, origin = registry.reference_config(spec.name), f"--model {spec.name}"
    else:
        raise SourceError(f"{ckpt.items} carries no config.json (not written by ckpt): pass --model NAME "
                          f"(e.g. qwen3-8b) or --hf-config PATH to say which architecture it holds")
    converted_as = ckpt.provenance.get("model_name")
    converted_as = converted_as if converted_as and registry.is_model_name(converted_as) else None
    family = detect_family(cfg, spec.name if spec else converted_as)
    cfg = family.model_config(cfg)     # a multimodal config: the text model the checkpoint holds
    if spec is not None:
        if spec.family != family.name:
            raise ConfigMismatchError(f"{spec.name} is a {spec.family} model, but the {origin} config describes "
                                      f"a {family.name} model")
        if origin != f"--model {spec.name}":
            registry.check_against(spec, cfg, family.reference_keys)
    carried_family = ckpt.provenance.get("family")
    if carried_family and carried_family != family.name:
        # One config can be read by two families (Llama 3.3's is Llama 3.1's): the inverse must be the conversion's.
        raise ConfigMismatchError(f"the checkpoint was converted as a {carried_family} model"
                                  + (f" ({converted_as})" if converted_as else "")
                                  + f", but the {origin} config reads as a {family.name} model"
                                  + (f" ({spec.name})" if spec else ""))
    return Architecture(cfg, family, origin, spec.name if spec else ckpt.provenance.get("model_name"))


def detect_scan(ckpt: OrbaxCheckpoint) -> bool:
    """Scanned or not: the step's custom_metadata, else the tree (`decoder/layers/...` vs `decoder/layers_0/...`)."""
    scanned = any(_SCANNED.match(p) for p in ckpt.paths)
    unscanned = any(_UNSCANNED.match(p) for p in ckpt.paths) and not any(_MIXED.match(p) for p in ckpt.paths)
    declared = ckpt.scan_layers
    if declared is None:
        declared = ckpt.provenance.get("scan_layers")
    if declared is not None:
        if (declared and unscanned and not scanned) or (not declared and scanned and not unscanned):
            raise SourceError(f"{ckpt.items}: its metadata says scan_layers={str(bool(declared)).lower()}, but "
                              f"its tree is {'unscanned (decoder/layers_0/...)' if unscanned else 'scanned'}")
        return bool(declared)
    if scanned == unscanned:
        raise SourceError(f"{ckpt.items}: cannot tell whether the layers are scanned (no scan_layers metadata, "
                          f"and the tree has {'both' if scanned else 'neither'} decoder/layers/ and "
                          f"decoder/layers_<i>/)")
    return scanned


def detect_features(arch: Architecture, ckpt: OrbaxCheckpoint, scan: bool) -> frozenset[str]:
    """The family's optional parts (e.g. DeepSeek's MTP layer) whose parameters are all in the checkpoint."""
    from ckpt_cli.errors import CkptError
    from ckpt_cli.plan import build_to_maxtext

    def targets(features: frozenset[str]) -> set[str]:
        plan = build_to_maxtext(arch.family, arch.config, scan, np.dtype(np.float32), features)
        return {t.target for t in plan.tensors}

    found: set[str] = set()
    if not arch.family.features:
        return frozenset()
    base = targets(frozenset())
    for feature in sorted(arch.family.features):
        try:
            added = targets(frozenset({feature})) - base
        except CkptError:       # the config cannot have this part
            continue
        if added and added <= set(ckpt.paths):
            found.add(feature)
    return frozenset(found)


def default_dtype(cfg: dict) -> str:
    """The output dtype when --dtype is not given: the config's own (bf16 or f32), else bf16."""
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return _CONFIG_DTYPES.get(str(name).removeprefix("torch."), "bf16")


def legacy_layout(t: TensorPlan, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The axis order that reads a leaf stored in an older ckpt layout as planned, or None.

    Earlier ckpt versions stacked a scanned non-parameter variable (DeepSeek-V3's router bias) on axis 1, as parameters
    are, `(X, Lm)`; MaxText 0.2.5 stacks variables on axis 0, `(Lm, X)`, which is what ckpt writes now. When
    Lm == X the two cannot be told apart by shape and the leaf is read as MaxText 0.2.5's.
    """
    if t.collection is None or t.stack_axes != (0,) or len(t.shape) < 2 or tuple(shape) == tuple(t.shape):
        return None
    old = (t.shape[1], t.shape[0], *t.shape[2:])
    return (1, 0, *range(2, len(t.shape))) if tuple(shape) == old else None


def read_legacy_layouts(forward: ConversionPlan, ckpt: OrbaxCheckpoint) -> list[str]:
    """Present every leaf stored in an older ckpt layout (see `legacy_layout`) as planned; one note if any."""
    found = []
    for t in forward.tensors:
        if t.target in ckpt.paths:
            axes = legacy_layout(t, ckpt.describe(t.target)[0])
            if axes is not None:
                ckpt.read_transposed(t.target, axes)
                found.append(t)
    if not found:
        return []
    t = found[0]
    return [f"{len(found)} scanned variable(s) in the layout earlier ckpt versions wrote (layers on axis 1, e.g. "
            f"{t.target} {(t.shape[1], t.shape[0], *t.shape[2:])}) read as MaxText 0.2.5's {tuple(t.shape)}"]


def stored_dtype(forward: ConversionPlan, ckpt: OrbaxCheckpoint) -> str | None:
    """'bf16' or 'f32': how the checkpoint stores its largest parameter (None for any other dtype)."""
    biggest = max(forward.tensors, key=lambda t: t.nbytes)
    return _CONFIG_DTYPES.get(dtype_name(ckpt.describe(biggest.target)[1]))


def check_checkpoint(forward: ConversionPlan, ckpt: OrbaxCheckpoint) -> list[str]:
    """Every parameter the plan reads is present with its full shape and a float dtype; nothing is left over.

    Fails on the first offending parameter with one line naming it. A leaf in an older ckpt layout is
    read as planned; returns the note saying so (or no notes).
    """
    notes = read_legacy_layouts(forward, ckpt)
    for t in forward.tensors:
        if t.target not in ckpt.paths:
            raise ShapeMismatchError(f"{t.target}: missing from the checkpoint (the {forward.family} config "
                                     f"expects shape {t.shape})")
        shape, dtype = ckpt.describe(t.target)
        if tuple(shape) != tuple(t.shape):
            raise ShapeMismatchError(f"{t.target}: expected shape {tuple(t.shape)}, found {tuple(shape)}")
        if not is_float(dtype):
            raise ShapeMismatchError(f"{t.target}: expected a float dtype, found {dtype}")
    extra = sorted(set(ckpt.paths) - {t.target for t in forward.tensors})
    if extra:
        raise ShapeMismatchError(f"{extra[0]}: in the checkpoint but not in the {forward.family} config "
                                 f"({len(extra)} such parameter(s)); the config does not describe this checkpoint")
    return notes + changed_constants(forward, ckpt)


def changed_constants(forward: ConversionPlan, ckpt: OrbaxCheckpoint) -> list[str]:
    """A note when a leaf HF has no tensor for (`fill`, written as that constant on import, e.g. DeepSeek-V4's
    mhc_norm scales) holds other values: MaxText trained it, and the HF model, which computes with the constant,
    will differ. These leaves are small (one vector a layer); each is read whole."""
    from ckpt_cli.plan import SourceSlice

    changed = [t for t in forward.tensors if t.fill is not None
               and not np.all(np.asarray(ckpt.read(SourceSlice(t.target)), np.float32) == np.float32(t.fill))]
    if not changed:
        return []
    return [f"{len(changed)} MaxText leaf/leaves with no Hugging Face tensor are not all {changed[0].fill:g} (e.g. "
            f"{changed[0].target}): trained in MaxText, they are not written, and the HF model computes with "
            f"{changed[0].fill:g} there"]


def output_config(cfg: dict, dtype: np.dtype) -> dict:
    """config.json for the output: the source config with `dtype` (and `torch_dtype` if present) set, no
    `quantization_config` (the weights written are plain bf16/f32, e.g. after fp8 sources were dequantized) unless
    fp8 weights are written back as they were kept (`dtype` float8_e4m3fn: then the source's, and bf16),
    and an `architectures` entry (the causal-LM class of its model_type) when it has none."""
    out = dict(cfg)
    name = dtype_name(dtype)
    if name == "float8_e4m3fn":     # fp8 weights written back as the source held them: its quantization_config too
        name = "bfloat16"
    else:
        out.pop("quantization_config", None)
    out["dtype"] = name
    if "torch_dtype" in out:
        out["torch_dtype"] = name
    if not out.get("architectures"):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(out.get("model_type"))
        if arch:
            out["architectures"] = [arch]
    return out


def derived_generation_config(cfg: dict) -> dict | None:
    """A minimal generation_config.json from the token ids the config knows (None when it knows none)."""
    ids = {k: cfg[k] for k in _TOKEN_IDS if cfg.get(k) is not None}
    if not ids:
        return None
    return {"_from_model_config": True, **ids}


def source_folder(ckpt: OrbaxCheckpoint) -> tuple[Path | None, str]:
    """The local folder hf-to-maxtext read from (for tokenizer and generation files), when it still holds the
    model the checkpoint was converted from: a config.json equal to the carried one. Else None and why not
    (the metadata naming the folder is only as trustworthy as whoever shared the checkpoint)."""
    prov = ckpt.provenance
    value = prov.get("source_folder") or prov.get("source")
    if not isinstance(value, str) or not value or not Path(value).is_dir():
        return None, ""
    folder = Path(value)
    carried = prov.get("hf_config")
    try:
        size = (folder / "config.json").stat().st_size if (folder / "config.json").is_file() else -1
        found = json.loads((folder / "config.json").read_text()) if 0 <= size < 1 << 20 else None
        family = detect_family(found) if isinstance(found, dict) else None
    except (OSError, UnicodeDecodeError, ValueError, CkptError):
        found = family = None
    if not carried or family is None or family.model_config(found) != carried:
        return None, (f"tokenizer files not copied from {folder}: it no longer holds the config.json this "
                      "checkpoint was converted from")
    return folder, ""
