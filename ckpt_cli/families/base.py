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
class Part:
    """A part of one axis of a tensor: indices `start, start + step, ...` of axis `axis` (strided), or with
    `blocked`, the `start`-th of `step` equal contiguous blocks of it.

    `axis` counts from the end (-1 is the last axis), so it means the same axis in a whole tensor and in
    a slice of it with leading axes indexed away. Rules whose parts share one HF tensor, with the same
    axis and step and every start in [0, step), together map all of it (e.g. GPT-OSS's interleaved
    gate/up projection: `Part(-1, 0, 2)` is the gate, `Part(-1, 1, 2)` the up projection; Llama 4's
    concatenated one: `Part(-1, 0, 2, blocked=True)` the first half, the gate). A blocked part may span `count`
    consecutive blocks (DeepSeek-V4's hyper-connection weights: rows [4, 4, 16] of 24 are blocks 0, 1 and 2-5
    of 6).
    """

    axis: int
    start: int
    step: int
    blocked: bool = False
    count: int = 1

    def __repr__(self) -> str:   # the count only when it is not 1, so resume keys of older runs still match
        extra = f", count={self.count}" if self.count != 1 else ""
        return f"Part(axis={self.axis}, start={self.start}, step={self.step}, blocked={self.blocked}{extra})"

    @property
    def stop(self) -> int:
        """The block after the last one this part spans (start + 1 for a strided part)."""
        return self.start + self.count

    def slice(self, size: int) -> slice:
        """The slice of an axis of `size` that belongs to this part."""
        if self.blocked:
            return slice(self.start * size // self.step, self.stop * size // self.step)
        return slice(self.start, None, self.step)

    def index(self, shape: tuple[int, ...]) -> tuple:
        """The numpy index selecting this part of an array of `shape`."""
        idx: list = [slice(None)] * len(shape)
        idx[self.axis] = self.slice(shape[self.axis])
        return tuple(idx)

    def length(self, size: int) -> int:
        """Elements of an axis of `size` that belong to this part."""
        return size * self.count // self.step if self.blocked else len(range(self.start, size, self.step))


@dataclass(frozen=True)
class Join:
    """A leaf axis assembled from row ranges of several HF tensors (and split back into them).

    The per-layer MaxText axis `axis` (counting from the end) is `groups` equal groups; each group is, in order, the
    next 1/groups of each piece's rows, and a piece is the next `rows` rows of its HF tensor (consecutive pieces of
    one tensor take consecutive rows of it, and together all of them). E.g. Qwen3.5's `in_proj_qkvz`, grouped per key
    head: pieces (in_proj_qkv, HK*DK) for q, (in_proj_qkv, HK*DK) for k, (in_proj_qkv, HV*DV) for v, (in_proj_z,
    HV*DV) for z: group h is [q_h, k_h, v_h, z_h]. Each row range moves as its own task (the row's `steps` map an HF
    row range to a range of the axis, e.g. `transpose`), so the leaf still streams one layer at a time and nothing is
    read twice. The rule's `hf` is the first piece's tensor and `hf_shape` the pieces stacked (their total rows).
    """

    groups: str
    pieces: tuple[tuple[str, str], ...]   # (HF name template, rows: a dim expression), in group order
    axis: int = -1

    @property
    def names(self) -> tuple[str, ...]:
        """The HF tensors, in order of first use."""
        return tuple(dict.fromkeys(name for name, _ in self.pieces))

    def layout(self, dims: Dims) -> list[tuple[str, int, int]]:
        """Every row range, in order along the leaf's axis: (HF name template, first row, rows)."""
        groups = dims[self.groups]
        sizes = [eval_dim(rows, dims) for _, rows in self.pieces]
        offsets, seen = [], {}
        for (name, _), size in zip(self.pieces, sizes, strict=True):
            offsets.append(seen.get(name, 0))
            seen[name] = offsets[-1] + size
        return [(name, off + g * (size // groups), size // groups)
                for g in range(groups) for (name, _), off, size in zip(self.pieces, offsets, sizes, strict=True)]

    def rows(self, dims: Dims) -> dict[str, int]:
        """Rows of each HF tensor."""
        total: dict[str, int] = {}
        for (name, rows) in self.pieces:
            total[name] = total.get(name, 0) + eval_dim(rows, dims)
        return total


@dataclass(frozen=True)
class Rule:
    """One MaxText leaf and where it comes from in HF, per layer (or global)."""

    maxtext: str                    # leaf path, relative to the block for per-layer rules
    hf: str                         # HF tensor name template with {layer} / {expert} slots
    maxtext_shape: tuple[str, ...]  # per-layer MaxText shape (without the expert axis) as dim expressions
    hf_shape: tuple[str, ...]       # HF tensor shape as dim expressions
    steps: tuple[str, ...]          # transform names, HF -> MaxText order
    experts: str | None = None      # dim of an expert axis stacked at MaxText axis 0: one HF tensor per expert
                                    # ({expert} slot), or without the slot, the HF tensor's own axis 0
    part: Part | None = None        # only this strided part of the HF tensor maps to the leaf
    dtype: str | None = None        # "f32": stored float32 in MaxText whatever the output dtype (Gemma norms)
    collection: str | None = None   # the Flax collection MaxText keeps a non-parameter variable in (e.g.
                                    # "MoEBiasVar"); ckpt writes it under params/params, where MaxText's loaders
                                    # also look, but it stacks its layer axis at 0 as MaxText does for variables
    join: Join | None = None        # the leaf is assembled from row ranges of several HF tensors (see Join)
    fill: float | None = None       # no HF tensor (hf ""): the MaxText leaf is written as this constant, and
                                    # maxtext-to-hf has nothing to write it to (DeepSeek-V4's mhc_norm scales)
    hf_dtype: str | None = None     # the HF tensor's fixed dtype when not a float ("int64": DeepSeek-V4's tid2eid,
                                    # read exactly into a float MaxText leaf and written back as integers)

    @property
    def scan_axis(self) -> int:
        """The axis a stacked (scanned) block adds for its layers: 1 for parameters (MaxText's param_scan_axis),
        0 for a non-parameter variable (MaxText 0.2.5 stacks those on axis 0, e.g. DeepSeek-V3's router bias
        `(Lm, X)`)."""
        return 0 if self.collection else 1

    @property
    def slots(self) -> frozenset[str]:
        names = self.join.names if self.join else (self.hf,)
        return frozenset(f for name in names for _, f, _, _ in string.Formatter().parse(name) if f)

    @property
    def hf_names(self) -> tuple[str, ...]:
        """The HF tensor templates this rule reads (several for a joined leaf)."""
        return self.join.names if self.join else (self.hf,)

    @property
    def hf_expert_axis(self) -> bool:
        """True when the experts are axis 0 of one HF tensor (`hf_shape` then starts with the expert dim)."""
        return self.experts is not None and "expert" not in self.slots


def row(maxtext: str, hf: str, maxtext_shape: str, hf_shape: str, steps: str = "", experts: str | None = None,
        part: Part | None = None, dtype: str | None = None, collection: str | None = None,
        join: Join | None = None, fill: float | None = None, hf_dtype: str | None = None) -> Rule:
    """Table-row shorthand: shapes and steps as comma-separated strings."""
    split = lambda s: tuple(p.strip() for p in s.split(",") if p.strip())  # noqa: E731
    return Rule(maxtext, hf, split(maxtext_shape), split(hf_shape), split(steps), experts, part, dtype, collection,
                join=join, fill=fill, hf_dtype=hf_dtype)


@dataclass(frozen=True)
class Block:
    """A group of decoder layers stored under one prefix.

    Stacked (scanned): every leaf gains a layer axis at its rule's `scan_axis` (1 for parameters, experts
    keeping axis 0; 0 for non-parameter variables), and scan index s holds HF layer `hf_layers[s]`. With `inner`
    set, the stacked layers form a grid of two axes, 1 and 2 (`len(hf_layers) // inner` rows of `inner`; MaxText's
    doubly scanned blocks, e.g. Qwen3-Next's `local_layers`): `hf_layers[s]` sits at `(s // inner, s % inner)`.
    Unstacked: one layer, per-layer shapes.
    """

    prefix: str
    hf_layers: tuple[int, ...]
    stacked: bool
    rules: tuple[Rule, ...]
    inner: int | None = None

    @property
    def stack_dims(self) -> tuple[int, ...]:
        """The sizes of the stacked axes (1, or 1 and 2) of every leaf; () unstacked."""
        if not self.stacked:
            return ()
        n = len(self.hf_layers)
        return (n,) if self.inner is None else (n // self.inner, self.inner)

    @property
    def stack_axes(self) -> tuple[int, ...]:
        """The target axes the layers are stacked on (experts, when present, keep axis 0)."""
        return tuple(range(1, 1 + len(self.stack_dims)))

    def axes_for(self, rule: Rule) -> tuple[int, ...]:
        """The target axes a rule's leaf stacks the layers on: from its `scan_axis` (0 for a variable)."""
        return tuple(range(rule.scan_axis, rule.scan_axis + len(self.stack_dims)))

    def stack_index(self, s: int) -> tuple[int, ...]:
        """Where `hf_layers[s]` sits on the stacked axes."""
        return (s,) if self.inner is None else divmod(s, self.inner)

    def __post_init__(self) -> None:
        if self.inner is not None and (not self.stacked or self.inner < 1 or len(self.hf_layers) % self.inner):
            raise AssertionError(f"{self.prefix}: {len(self.hf_layers)} stacked layers do not form rows of "
                                 f"{self.inner}")


@dataclass(frozen=True)
class Fp8Tree:
    """The tree MaxText 0.2.5's `-fp8` model names keep (`weight_dtype: float8_e4m3fn`, `weight_block_size`): which
    leaves are float8_e4m3fn with a float block scale beside them, as its `unquantized_modules` decides.

    A leaf is kept fp8 when it is a kernel (`.../kernel`) or routed-expert weight (a rule with an experts axis) and
    none of its path components is one of `unquantized`; its scale is the leaf path + `_scale` (`kernel_scale`,
    `wi_0_scale`), read from the HF `<weight>_scale_inv` and multiplied in (MaxText's `dequantize_weight`). Every
    other leaf is bf16 (MaxText's compute `dtype`). The scale gets the kernel's own transforms at block
    granularity (plan.py, `_scale_plan`): a transpose (and reshape) of the block grid, and for a joined leaf
    (`Join`) the same join of the pieces' scale rows, each piece's rows counted in blocks.
    """

    unquantized: frozenset[str]

    def keeps(self, rule: Rule) -> bool:
        """Whether MaxText's fp8 tree stores this leaf float8_e4m3fn with a scale."""
        parts = rule.maxtext.split("/")
        weight = rule.experts is not None or parts[-1] == "kernel"
        return weight and not any(p in self.unquantized for p in parts)


@dataclass(frozen=True)
class Family:
    """Everything the planner needs from one model family."""

    name: str                                        # MaxText-style family name, e.g. "qwen3"
    model_types: tuple[str, ...]                     # HF config model_type values it accepts
    dims: Callable[[dict], Dims]                     # HF config -> dimension table
    top_rules: Callable[[Dims, dict], tuple[Rule, ...]]
    blocks: Callable[[Dims, dict, bool, frozenset[str]], list[Block]]   # (dims, config, scan, features)
    check_config: Callable[[dict, frozenset[str]], list[str]] = lambda cfg, features: []  # notes; raises on refusal
    # Whether a config of one of those model types is this family's when no model name says (several families
    # may share a model_type: Llama 3.1 and Llama 2/3 are both "llama"); the first family that claims it wins.
    claims: Callable[[dict], bool] = lambda cfg: True
    features: frozenset[str] = frozenset()          # optional parts a user can ask for (e.g. "mtp")
    reference_keys: tuple[str, ...] = ()             # config keys compared against reference models
    notes: str = ""
    # The config of the model converted, from a source's config.json (e.g. a multimodal config's text part).
    model_config: Callable[[dict], dict] = lambda cfg: cfg
    # For a source whose files name the model's tensors differently (source config, file tensor names):
    # (plan name -> file name, or None when the names agree; notes).
    source_names: Callable[[dict, Collection[str]], tuple[Callable[[str], str] | None, list[str]]] = (
        lambda cfg, names: (None, []))
    # Source layouts the family reads besides its table's own, decided by the files' tensor names, never asked for:
    # (source config, file tensor names) -> names from `layouts`, passed to `blocks` with the features (e.g.
    # Qwen3.5's experts fused in one tensor per layer, as its bf16 releases store them).
    source_layouts: Callable[[dict, Collection[str]], frozenset[str]] = lambda cfg, names: frozenset()
    layouts: frozenset[str] = frozenset()
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


def config_int(cfg: dict, key: str, default: int | None = None, minimum: int = 1) -> int:
    """An integer field of an HF config (a JSON integer, at least `minimum`), or a SourceError naming it.

    Strings and floats are refused rather than converted: they would be carried as they are into the
    output config.json, which transformers then rejects.
    """
    value = cfg.get(key, default)
    if value is None:
        raise SourceError(f"config.json has no {key}")
    if not isinstance(value, int) or isinstance(value, bool):
        raise SourceError(f"config.json: {key} must be an integer, found {value!r} ({type(value).__name__})")
    if value < minimum:
        raise SourceError(f"config.json: {key} must be at least {minimum}, found {value}")
    return value


def head_dim(cfg: dict) -> int:
    """`head_dim` when present, else hidden_size / num_attention_heads."""
    if cfg.get("head_dim") is not None:
        return config_int(cfg, "head_dim")
    return config_int(cfg, "hidden_size") // config_int(cfg, "num_attention_heads")


def attention_dims(cfg: dict) -> Dims:
    """The dimensions every GQA decoder shares: E, N, K (defaults to N), D, L and V."""
    return {
        "E": config_int(cfg, "hidden_size"), "N": config_int(cfg, "num_attention_heads"),
        "K": config_int(cfg, "num_key_value_heads", cfg.get("num_attention_heads")), "D": head_dim(cfg),
        "L": config_int(cfg, "num_hidden_layers"), "V": config_int(cfg, "vocab_size"),
    }


def validate_rules(rules: Iterable[Rule], dims: Dims) -> None:
    """Strict checks of a family table: known transforms, known slots, consistent sizes, one-to-one.

    One HF tensor may feed several leaves only through parts (`Rule.part`): the rules sharing it must
    agree on everything but the part's start, and their parts must neither overlap nor leave a gap.
    """
    seen_mt: set[str] = set()
    by_hf: dict[str, list[Rule]] = {}
    for r in rules:
        unknown = [s for s in r.steps if s not in STEP_NAMES]
        if unknown:
            raise AssertionError(f"{r.maxtext}: unknown transform {unknown}")
        if not r.slots <= SLOTS:
            raise AssertionError(f"{r.maxtext}: unknown template slots {set(r.slots) - SLOTS}")
        if "expert" in r.slots and r.experts is None:
            raise AssertionError(f"{r.maxtext}: the {{expert}} slot needs an experts axis")
        if r.hf_expert_axis and (not r.hf_shape or r.hf_shape[0] != r.experts):
            raise AssertionError(f"{r.maxtext}: experts on axis 0 of {r.hf} need hf_shape to start with {r.experts}")
        if r.maxtext in seen_mt:
            raise AssertionError(f"{r.maxtext} / {r.hf}: mapping is not one-to-one")
        seen_mt.add(r.maxtext)
        if r.hf_dtype not in (None, "int64"):
            raise AssertionError(f"{r.maxtext}: unknown HF dtype {r.hf_dtype!r}")
        if r.fill is not None or not r.hf:
            if (r.fill is None or r.hf or r.hf_shape or r.steps or r.experts or r.part or r.collection or r.join
                    or not re.fullmatch(r"[A-Za-z0-9_/]+", r.maxtext)):
                raise AssertionError(f"{r.maxtext}: a constant leaf has a leaf path, a fill value and no HF tensor, "
                                     "shape, steps, experts, part or collection")
            continue
        for name in r.hf_names:
            by_hf.setdefault(name, []).append(r)
        if r.join is not None:
            _check_join(r, dims)
        hf_shape = eval_shape(r.hf_shape, dims)
        hf_count = math.prod(hf_shape) // (hf_shape[0] if r.hf_expert_axis else 1)
        if r.part is not None:
            _check_part(r, hf_shape)
            hf_count = hf_count * r.part.count // r.part.step
        if "pad-rows" in r.steps:
            mt_shape = eval_shape(r.maxtext_shape, dims)
            if (r.part or r.experts or len(mt_shape) != len(hf_shape) or mt_shape[1:] != hf_shape[1:]
                    or mt_shape[0] < hf_shape[0] or set(r.steps) - {"pad-rows", *ELEMENTWISE_STEPS}):
                raise AssertionError(f"{r.maxtext}: pad-rows needs {r.maxtext_shape} to be {r.hf_shape} with at "
                                     "least as many rows, and only elementwise steps beside it")
        elif math.prod(eval_shape(r.maxtext_shape, dims)) != hf_count:
            raise AssertionError(f"{r.maxtext}: element counts differ between {r.maxtext_shape} and {r.hf_shape}"
                                 + (f" (part 1/{r.part.step})" if r.part else ""))
        if not re.fullmatch(r"[A-Za-z0-9_/]+", r.maxtext):
            raise AssertionError(f"{r.maxtext}: bad leaf path")
        if r.dtype not in (None, "f32"):
            raise AssertionError(f"{r.maxtext}: unknown stored dtype {r.dtype!r}")
        if r.collection is not None and (r.experts is not None or not re.fullmatch(r"[A-Za-z0-9_]+", r.collection)
                                         or r.collection == "params"):
            raise AssertionError(f"{r.maxtext}: a variable collection ({r.collection!r}) is a name other than "
                                 "'params', on a leaf with no experts axis")
    for hf, group in by_hf.items():
        _check_shared(hf, group)


def _check_join(r: Rule, dims: Dims) -> None:
    """A joined leaf: its first tensor is `hf`, the pieces add up to `hf_shape`'s rows and split evenly into the
    groups, the axis exists, and no part, expert axis or row-mixing step comes with it."""
    j = r.join
    assert j is not None
    groups = dims[j.groups]
    rows = [eval_dim(n, dims) for _, n in j.pieces]
    mt_shape = eval_shape(r.maxtext_shape, dims)
    if (j.names[0] != r.hf or sum(rows) != eval_dim(r.hf_shape[0], dims) or any(n % groups for n in rows)
            or not -len(mt_shape) <= j.axis < 0 or mt_shape[j.axis] != sum(rows)):
        raise AssertionError(f"{r.maxtext}: joined pieces must start with {r.hf}, add up to {r.hf_shape[0]} rows (the "
                             f"size of axis {j.axis}) and divide into {j.groups} groups")
    if r.part is not None or r.experts is not None or set(r.steps) - {"transpose", *ELEMENTWISE_STEPS}:
        raise AssertionError(f"{r.maxtext}: a joined leaf takes no part, no experts axis and only transpose or "
                             "elementwise steps")


def _check_part(r: Rule, hf_shape: tuple[int, ...]) -> None:
    p = r.part
    assert p is not None
    if not -len(hf_shape) <= p.axis < 0 or (r.hf_expert_axis and p.axis == -len(hf_shape)):
        raise AssertionError(f"{r.maxtext}: part axis {p.axis} must count from the end of {r.hf_shape} "
                             "(and not be the expert axis)")
    if p.step < 1 or not 0 <= p.start < p.step or hf_shape[p.axis] % p.step:
        raise AssertionError(f"{r.maxtext}: part {p.start}::{p.step} does not divide axis {p.axis} of {r.hf_shape}")
    if p.count < 1 or p.stop > p.step or (p.count > 1 and not p.blocked):
        raise AssertionError(f"{r.maxtext}: part spans blocks {p.start}..{p.stop - 1} of {p.step} (only a blocked "
                             "part spans several)")


def _check_shared(hf: str, group: list[Rule]) -> None:
    """Rules reading one HF tensor: alone and whole, or parts that tile it exactly."""
    if len(group) == 1 and (group[0].part is None or group[0].part.step == 1):
        return
    names = " / ".join(r.maxtext for r in group)
    if any(r.part is None for r in group):
        raise AssertionError(f"{names} / {hf}: mapping is not one-to-one")
    first = group[0]
    for r in group[1:]:
        # parts spanning different numbers of blocks have different MaxText shapes; equal spans, equal shapes
        same_span = r.part.count == first.part.count
        if (r.part.axis, r.part.step, r.part.blocked, r.hf_shape, r.steps, r.experts) != (
                first.part.axis, first.part.step, first.part.blocked, first.hf_shape, first.steps, first.experts
                ) or (same_span and r.maxtext_shape != first.maxtext_shape):
            raise AssertionError(f"{names} / {hf}: parts of one tensor must agree on axis, step, kind, shapes, "
                                 "transforms and experts")
    spans = sorted((r.part.start, r.part.stop) for r in group)
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
        raise AssertionError(f"{names} / {hf}: parts overlap (blocks {spans})")
    if not tiles(spans, first.part.step):
        raise AssertionError(f"{names} / {hf}: parts leave a gap (blocks {spans} of step {first.part.step})")


def tiles(spans: Sequence[tuple[int, int]], step: int) -> bool:
    """Whether sorted [start, stop) block spans cover 0..step exactly once."""
    return bool(spans) and spans[0][0] == 0 and spans[-1][1] == step and all(
        a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


# Steps that act on each element alone (safe on any rows of a tensor).
ELEMENTWISE_STEPS = frozenset({"embedding-scale", "embedding-scale-f32", "offset+1"})
STEP_NAMES = frozenset({"transpose", "group-transpose", "reshape", "rope-interleave", "rope-interleave-heads",
                        "query-scale", "query-pre-attn-scale", "pad-rows", *ELEMENTWISE_STEPS})


def resolve_steps(names: Sequence[str], dims: Dims) -> T.Chain:
    """Transform names of a table row -> a Chain (dimension-dependent factors filled in)."""
    steps: list[T.Transform] = []
    for name in names:
        if name == "transpose":
            steps.append(T.Linear())
        elif name == "group-transpose":
            steps.append(T.GroupedLinear())
        elif name == "reshape":
            steps.append(T.Reshape())
        elif name == "rope-interleave":
            steps.append(T.RopeInterleave())
        elif name == "rope-interleave-heads":      # the last axis holds whole heads of D (a LoRA B kernel)
            steps.append(T.RopeInterleave(head=dims["D"]))
        elif name == "query-scale":
            steps.append(T.query_scale(dims["D"]))
        elif name == "offset+1":
            steps.append(T.Offset(1.0))
        elif name == "query-pre-attn-scale":
            steps.append(T.query_pre_attn_scale(dims["Q"]))
        elif name == "embedding-scale":
            steps.append(T.embedding_scale(dims["E"]))
        elif name == "embedding-scale-f32":
            steps.append(T.embedding_scale(dims["E"], bf16=False))
        elif name == "pad-rows":
            steps.append(T.PadRows())
        else:
            raise AssertionError(f"unknown transform {name}")
    return T.Chain(tuple(steps))
