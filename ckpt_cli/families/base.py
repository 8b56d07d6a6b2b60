"""What a model family is: a validated table of tensor rules plus how layers group into blocks.

A family module declares its mapping as data (rows of MaxText leaf, HF name template, shapes as
dimension expressions, named transforms). Python is only for what a table cannot say: reading
dimensions from a config, which layers form which block, refusing unsupported config features.
Nothing here reads tensor data; the plan builder turns a family into a frozen plan.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

from ckpt_cli import transforms as T
from ckpt_cli.errors import SourceError

Dims = dict[str, int]
SLOTS = frozenset({"layer", "expert"})


@dataclass(frozen=True)
class Rule:
    """One MaxText leaf and where it comes from in HF, per layer (or global)."""

    maxtext: str                    # leaf path, relative to the block for per-layer rules
    hf: str                         # HF tensor name template with {layer} / {expert} slots
    maxtext_shape: tuple[str, ...]  # per-layer MaxText shape (without the expert axis) as dim expressions
    hf_shape: tuple[str, ...]       # HF tensor shape as dim expressions
    steps: tuple[str, ...]          # transform names, HF -> MaxText order
    experts: str | None = None      # dim of an expert axis stacked at 0 (one HF tensor per expert)
    dtype: str | None = None        # "f32": stored float32 in MaxText whatever the output dtype (Gemma norms)

    @property
    def slots(self) -> frozenset[str]:
        return frozenset(f for _, f, _, _ in string.Formatter().parse(self.hf) if f)


def row(maxtext: str, hf: str, maxtext_shape: str, hf_shape: str, steps: str = "", experts: str | None = None,
        dtype: str | None = None) -> Rule:
    """Table-row shorthand: shapes and steps as comma-separated strings."""
    split = lambda s: tuple(p.strip() for p in s.split(",") if p.strip())  # noqa: E731
    return Rule(maxtext, hf, split(maxtext_shape), split(hf_shape), split(steps), experts, dtype)


@dataclass(frozen=True)
class Block:
    """A group of decoder layers stored under one prefix.

    Stacked (scanned): every leaf gains a layer axis at index 1 (experts keep axis 0), and scan index
    s holds HF layer `hf_layers[s]`. Unstacked: one layer, per-layer shapes.
    """

    prefix: str
    hf_layers: tuple[int, ...]
    stacked: bool
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Family:
    """Everything the planner needs from one model family."""

    name: str                                        # MaxText-style family name, e.g. "qwen3"
    model_types: tuple[str, ...]                     # HF config model_type values it accepts
    dims: Callable[[dict], Dims]                     # HF config -> dimension table
    top_rules: Callable[[Dims, dict], tuple[Rule, ...]]
    blocks: Callable[[Dims, dict, bool, frozenset[str]], list[Block]]   # (dims, config, scan, features)
    check_config: Callable[[dict, frozenset[str]], list[str]] = lambda cfg, features: []  # notes; raises on refusal
    features: frozenset[str] = frozenset()          # optional parts a user can ask for (e.g. "mtp")
    reference_keys: tuple[str, ...] = ()             # config keys compared against reference models
    notes: str = ""
    # The config of the model converted, from a source's config.json (e.g. a multimodal config's text part).
    model_config: Callable[[dict], dict] = lambda cfg: cfg
    # For a source whose files name the model's tensors differently (source config, file tensor names):
    # (plan name -> file name, or None when the names agree; notes).
    source_names: Callable[[dict, Collection[str]], tuple[Callable[[str], str] | None, list[str]]] = (
        lambda cfg, names: (None, []))
    extra: dict = field(default_factory=dict)


def eval_dim(expr: str, dims: Dims) -> int:
    """'N*D' -> dims['N'] * dims['D']; integers are literals; a name may itself contain '+' ('C+R')."""
    value = 1
    for part in expr.split("*"):
        part = part.strip()
        value *= int(part) if part.isdigit() else dims[part]
    return value


def eval_shape(exprs: Sequence[str], dims: Dims) -> tuple[int, ...]:
    return tuple(eval_dim(e, dims) for e in exprs)


def uniform_blocks(rules: tuple[Rule, ...], num_layers: int, scan: bool, scanned_prefix: str = "decoder/layers",
                   unscanned_prefix: str = "decoder/layers_{i}", first_layer: int = 0) -> list[Block]:
    """All layers alike: one stacked block, or one block per layer."""
    layers = tuple(range(first_layer, first_layer + num_layers))
    if scan:
        return [Block(scanned_prefix, layers, True, rules)]
    return [Block(unscanned_prefix.format(i=i), (hf,), False, rules) for i, hf in enumerate(layers)]


def config_int(cfg: dict, key: str, default: int | None = None) -> int:
    """An integer field of an HF config, or a SourceError naming it."""
    value = cfg.get(key, default)
    if value is None:
        raise SourceError(f"config.json has no {key}")
    return int(value)


def head_dim(cfg: dict) -> int:
    """`head_dim` when present, else hidden_size / num_attention_heads."""
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    return config_int(cfg, "hidden_size") // config_int(cfg, "num_attention_heads")


def validate_rules(rules: Iterable[Rule], dims: Dims) -> None:
    """Strict checks of a family table: known transforms, known slots, consistent sizes, one-to-one."""
    seen_mt: set[str] = set()
    seen_hf: set[str] = set()
    for r in rules:
        unknown = [s for s in r.steps if s not in STEP_NAMES]
        if unknown:
            raise AssertionError(f"{r.maxtext}: unknown transform {unknown}")
        if not r.slots <= SLOTS:
            raise AssertionError(f"{r.maxtext}: unknown template slots {set(r.slots) - SLOTS}")
        if ("expert" in r.slots) != (r.experts is not None):
            raise AssertionError(f"{r.maxtext}: the {{expert}} slot and the experts axis go together")
        if r.maxtext in seen_mt or r.hf in seen_hf:
            raise AssertionError(f"{r.maxtext} / {r.hf}: mapping is not one-to-one")
        seen_mt.add(r.maxtext)
        seen_hf.add(r.hf)
        if math.prod(eval_shape(r.maxtext_shape, dims)) != math.prod(eval_shape(r.hf_shape, dims)):
            raise AssertionError(f"{r.maxtext}: element counts differ between {r.maxtext_shape} and {r.hf_shape}")
        if not re.fullmatch(r"[A-Za-z0-9_/]+", r.maxtext):
            raise AssertionError(f"{r.maxtext}: bad leaf path")
        if r.dtype not in (None, "f32"):
            raise AssertionError(f"{r.maxtext}: unknown stored dtype {r.dtype!r}")


STEP_NAMES = frozenset({"transpose", "reshape", "rope-interleave", "query-scale", "offset+1", "embedding-scale"})


def resolve_steps(names: Sequence[str], dims: Dims) -> T.Chain:
    """Transform names of a table row -> a Chain (dimension-dependent factors filled in)."""
    steps: list[T.Transform] = []
    for name in names:
        if name == "transpose":
            steps.append(T.Linear())
        elif name == "reshape":
            steps.append(T.Reshape())
        elif name == "rope-interleave":
            steps.append(T.RopeInterleave())
        elif name == "query-scale":
            steps.append(T.query_scale(dims["D"]))
        elif name == "offset+1":
            steps.append(T.Offset(1.0))
        elif name == "embedding-scale":
            steps.append(T.embedding_scale(dims["E"]))
        else:
            raise AssertionError(f"unknown transform {name}")
    return T.Chain(tuple(steps))
