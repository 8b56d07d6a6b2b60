"""A conversion as frozen data: every target tensor, its shape, dtype, chunking, transform and sources.

Built from metadata only (an HF config.json, or a MaxText checkpoint's metadata), never from tensor
data. Each target tensor is written as a set of slice tasks; a task reads one source slice, applies
the tensor's transform chain and writes one target slice. The engine executes any plan without
knowing the family.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ckpt_cli import transforms as T
from ckpt_cli.dtypes import BF16, FP8
from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families import Family
from ckpt_cli.families.base import (
    ELEMENTWISE_STEPS,
    Block,
    Dims,
    Fp8Tree,
    Join,
    Part,
    Rule,
    eval_dim,
    eval_shape,
    resolve_steps,
    tiles,
)

Shape = tuple[int, ...]
TO_MAXTEXT = "hf-to-maxtext"
TO_HF = "maxtext-to-hf"
CHUNK_TARGET_BYTES = 128 * 1024 * 1024
PIECE_BYTES = 32 * 1024 * 1024   # large 2-D tensors are read and written in row pieces of about this size
READ_PARTS = 16                  # default read chunks per sharded axis: up to 16 hosts along any axis read ~1x
MIN_READ_CHUNK_BYTES = 4096       # smaller read chunks are not cut further (tiny tensors stay whole)
# The dims of MaxText's axes by the mesh axis its default logical_axis_rules (configs/base.yml) shard them on:
# 'embed' (E), 'q_lora' (Q) and 'kv_lora' (C) on fsdp; 'kv' / head dims on none; every other dim (mlp, heads,
# vocab, experts' mlp...) on tensor.
FSDP_DIMS = frozenset({"E", "Q", "C"})
UNSHARDED_DIMS = frozenset({"D", "Dq", "Dv", "Dkv", "Hd", "R"})
MESH_AXES = {"fsdp": "fsdp", "fsdp_transpose": "fsdp", "context": "fsdp", "context_usp_ulysses": "fsdp",
             "expert": "fsdp",
             "tensor": "tensor", "tensor_sequence": "tensor", "autoregressive": "tensor",
             "data": None, "stage": None}


@dataclass(frozen=True)
class SourceSlice:
    """A source tensor, or one slice of it: `source[index]` with `index` placed on `axes`."""

    name: str
    index: tuple[int, ...] = ()
    axes: tuple[int, ...] = ()
    rows: tuple[int, int] | None = None   # a range on axis `rows_axis` of the source (full coordinates)
    rows_axis: int = 0
    part: Part | None = None              # then only this part (strided or a block) of the slice is used
    shape: Shape | None = None            # the source's full shape, where it is not the tensor's `source_shape`
                                          # (a leaf joined from several HF tensors: see families.base.Join)
    raw: bool = False                     # read as stored (fp8 weights kept fp8: not dequantized)

    def select(self, x: np.ndarray) -> np.ndarray:
        """The part of a read slice this source stands for (a view; the whole slice without a part)."""
        return x if self.part is None else x[self.part.index(x.shape)]


@dataclass(frozen=True)
class SliceTask:
    """Write `transform(read(source))` at `target[index]` (index placed on the tensor's stack_axes)."""

    index: tuple[int, ...]
    source: SourceSlice
    span: tuple[int, int] | None = None   # range on the tensor's span_axis, for row-piece tasks
    part: Part | None = None              # the part (strided or a block) of the target slice this task writes
    source_shape: Shape | None = None     # the shape it reads when not the tensor's (parts of unequal sizes)


@dataclass(frozen=True)
class TensorPlan:
    """One target tensor."""

    target: str                 # MaxText path under params/params ("decoder/layers/mlp/wo/kernel") or HF name
    shape: Shape
    dtype: np.dtype
    slice_shape: Shape          # shape each task produces
    source_shape: Shape         # shape each task reads
    stack_axes: tuple[int, ...]  # target axes indexed by tasks: (1,) scanned, (0, 1) scanned experts, ...
    chain: T.Chain
    tasks: tuple[SliceTask, ...]
    chunk_shape: Shape          # the write unit: one shard (zarr3) or chunk (zarr) per task slice
    span_axis: int | None = None  # target axis split into row pieces (large 2-D tensors only)
    collection: str | None = None  # a MaxText non-parameter variable's Flax collection (its layers on axis 0)
    read_chunk: Shape | None = None  # the read unit inside each chunk (zarr3 sharding codec); None: the chunk
    roles: tuple[str | None, ...] = ()  # per axis, the mesh role MaxText shards it on ("fsdp", "tensor", None)
    fill: float | None = None   # no source: every task writes this constant (a MaxText leaf HF has no tensor for)
    hf_dtype: np.dtype | None = None  # the HF side's fixed non-float dtype (integers read exactly into floats)
    quant: str | None = None    # "fp8": a weight kept float8_e4m3fn; "scale": its block scale (--dtype fp8)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def slice_nbytes(self) -> int:
        return math.prod(self.slice_shape) * np.dtype(self.dtype).itemsize

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.source.name for t in self.tasks))

    def target_index(self, task: SliceTask) -> tuple:
        """The numpy/tensorstore index of a task's slice in the target."""
        idx: list = [slice(None)] * len(self.shape)
        for axis, i in zip(self.stack_axes, task.index, strict=True):
            idx[axis] = i
        if task.span is not None:
            idx[self.span_axis] = slice(*task.span)
        if task.part is not None:
            idx[task.part.axis] = task.part.slice(self.shape[task.part.axis])
        return tuple(idx)

    def task_shape(self, task: SliceTask) -> Shape:
        """The shape one task produces: the slice shape, narrowed to the task's span and part."""
        if task.span is None and task.part is None:
            return self.slice_shape
        shape = list(self.slice_shape)
        if task.span is not None:
            free = [a for a in range(len(self.shape)) if a not in self.stack_axes]
            shape[free.index(self.span_axis)] = task.span[1] - task.span[0]
        if task.part is not None:
            shape[task.part.axis] = task.part.length(shape[task.part.axis])
        return tuple(shape)

    def read_elements(self, task: SliceTask) -> int:
        """Elements a task reads: what it produces, times the step of a source part (the rest is skipped); for a
        padded table (rows on axis 0 on both sides), the rows the source side holds."""
        if self.fill is not None:
            return 0
        shape = self.task_shape(task)
        if self.chain.pads:
            rows = task.source.rows[1] - task.source.rows[0] if task.source.rows else self.source_shape[0]
            return math.prod(shape[1:]) * rows
        part = task.source.part     # each part reads the whole slice: a part of `count` blocks, step / count of it
        return math.prod(shape) * part.step // part.count if part else math.prod(shape)

    def apply(self, x: np.ndarray, direction: str, task: SliceTask) -> np.ndarray:
        """Transform one source slice into one target slice of the target dtype.

        Pure permutations of same-width dtypes run on an unsigned-integer view: bit-exact by
        construction, and numpy's native copy loops release the GIL (ml_dtypes' do not).
        """
        shape = self.task_shape(task)
        x = task.source.select(x)
        src_dtype = x.dtype
        as_bits = (self.chain.exact and src_dtype.itemsize == np.dtype(self.dtype).itemsize
                   and (src_dtype.kind in "iu") == (np.dtype(self.dtype).kind in "iu"))   # int <-> float: a cast
        if as_bits:
            x = x.view(f"u{src_dtype.itemsize}")
        y = self.chain.to_maxtext(x, shape) if direction == TO_MAXTEXT else self.chain.to_hf(x, shape)
        if y.shape != shape:
            raise AssertionError(f"{self.target}: transform produced {y.shape}, planned {shape}")
        if as_bits:
            return np.ascontiguousarray(y).view(self.dtype)
        return np.ascontiguousarray(y.astype(self.dtype, copy=False))


@dataclass(frozen=True)
class ConversionPlan:
    """A whole conversion: direction, family, layout options and every target tensor in write order."""

    direction: str
    family: str
    scan_layers: bool
    dtype: np.dtype
    tensors: tuple[TensorPlan, ...]
    hf_config: dict = field(compare=False, hash=False)
    dims: Dims = field(compare=False, hash=False)
    notes: tuple[str, ...] = ()
    features: frozenset[str] = frozenset()

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def largest_slice_bytes(self) -> int:
        return max(t.slice_nbytes for t in self.tensors)

    def tensor(self, target: str) -> TensorPlan:
        for t in self.tensors:
            if t.target == target:
                return t
        raise KeyError(target)


def chunk_shape(shape: Shape, stack_axes: tuple[int, ...], itemsize: int) -> Shape:
    """One chunk per task slice (1 on stacked axes), split along the first free axis if too large.

    Each task then writes whole chunks (no read-modify-write), and reverse conversion reads one layer
    slice as whole chunks. Splits are into equal parts, so the stored edge chunk wastes almost nothing
    (zarr stores edge chunks whole).
    """
    chunk = [1 if a in stack_axes else s for a, s in enumerate(shape)]
    free = [a for a in range(len(shape)) if a not in stack_axes and shape[a] > 1]
    nbytes = math.prod(chunk) * itemsize
    if free and nbytes > CHUNK_TARGET_BYTES:
        axis = free[0]
        chunk[axis] = equal_step(shape[axis], math.ceil(nbytes / CHUNK_TARGET_BYTES))
    return tuple(chunk)


@dataclass(frozen=True)
class TargetMesh:
    """The ways a MaxText mesh cuts the dims its rules shard on fsdp and on tensor; read chunks follow them.

    The default (16 and 16) serves any mesh of up to 16 hosts along each: a host's slice is then whole read
    chunks. `parse("fsdp=64,tensor=4")` takes MaxText's mesh axis names; axes that shard like fsdp
    (fsdp_transpose, context, expert) or like tensor (tensor_sequence, autoregressive) multiply in, data and
    stage shard no parameter.
    """

    fsdp: int = READ_PARTS
    tensor: int = READ_PARTS

    @classmethod
    def parse(cls, text: str) -> TargetMesh:
        ways = {"fsdp": 1, "tensor": 1}
        for item in (p.strip() for p in text.split(",") if p.strip()):
            name, _, value = item.partition("=")
            name = name.strip()
            if name not in MESH_AXES or not value.strip().isdigit() or int(value) < 1:
                raise ValueError(f"{item!r}: expected AXIS=N with N >= 1, AXIS one of {', '.join(MESH_AXES)}")
            if MESH_AXES[name]:
                ways[MESH_AXES[name]] *= int(value)
        return cls(**ways)

    def describe(self) -> str:
        return f"fsdp={self.fsdp},tensor={self.tensor}"


def axis_roles(dims: Sequence[str]) -> tuple[str | None, ...]:
    """The mesh role ("fsdp", "tensor" or None) of each per-layer MaxText dim expression ("E", "N", "K*D"...)."""
    roles: list[str | None] = []
    for expr in dims:
        names = set(re.findall(r"[A-Za-z]+", expr))
        roles.append("fsdp" if names & FSDP_DIMS else None if names <= UNSHARDED_DIMS else "tensor")
    return tuple(roles)


def read_chunk_shape(shape: Shape, chunk: Shape, roles: Sequence[str | None], itemsize: int,
                     mesh: TargetMesh | None = None) -> Shape:
    """Read chunks inside each write chunk: every dim MaxText shards cut into as many parts as the mesh
    cuts it (`ceil(n / parts)`, so JAX's shard edges fall on read-chunk edges), fsdp dims first, then
    tensor dims, longest first, each halving its parts until the chunk divides the write chunk and holds at
    least MIN_READ_CHUNK_BYTES. `roles` has one entry per axis (None for stacked and unsharded axes).

    Depends only on fractions of each axis, so a tiny model is cut like a large one until the byte floor.
    """
    mesh = mesh or TargetMesh()
    read = list(chunk)
    order = sorted((a for a, r in enumerate(roles) if r), key=lambda a: (roles[a] != "fsdp", -shape[a]))
    for a in order:
        parts = mesh.fsdp if roles[a] == "fsdp" else mesh.tensor
        while parts > 1:
            ext = -(-shape[a] // parts)
            if chunk[a] % ext == 0 and math.prod(read[:a] + [ext] + read[a + 1:]) * itemsize >= MIN_READ_CHUNK_BYTES:
                read[a] = ext
                break
            parts //= 2
    return tuple(read)


def equal_step(length: int, parts: int) -> int:
    """The step that cuts `length` into `parts` near-equal pieces (the last one at most `parts - 1` shorter)."""
    parts = max(1, min(parts, length))
    return math.ceil(length / parts)


def _stacked(shape: Shape, rule: Rule, block: Block | None, dims: Dims) -> tuple[Shape, tuple[int, ...]]:
    """Full target shape and the stacked axes for a rule in a block."""
    stack_axes: list[int] = []
    full = list(shape)
    if rule.experts is not None:
        full.insert(0, dims[rule.experts])
        stack_axes.append(0)
    if block is not None and block.stacked:
        first = rule.scan_axis
        full[first:first] = block.stack_dims
        stack_axes += block.axes_for(rule)
    return tuple(full), tuple(stack_axes)


def _split_rows(rows: int, row_bytes: int, align: int = 1) -> list[tuple[int, int]] | None:
    """Row pieces of about PIECE_BYTES, or None when the tensor is small enough to move whole.

    Pieces fall on the `align` grid (the read chunks a host's slice starts on): when `align` divides the rows,
    equal pieces of whole read chunks, or equal parts of one, the fewest at least as many as PIECE_BYTES asks
    (at most four times as many); so a host's slice is whole pieces and no piece is stored padded.
    """
    if rows * row_bytes <= PIECE_BYTES or rows < 2:
        return None
    want = math.ceil(rows * row_bytes / PIECE_BYTES)
    step = equal_step(rows, want)
    if 1 < align < rows and rows % align == 0:
        units = rows // align
        counts = [units // m for m in _divisors(units)] + [units * k for k in _divisors(align)]
        count = min((c for c in counts if want <= c <= 4 * want), default=None)
        if count is not None:
            step = rows // count
    if step >= rows:
        return None
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


# act within one head: safe on whole heads
_ROW_SAFE_STEPS = frozenset({"rope-interleave", "query-scale", "query-pre-attn-scale"})
_ROWWISE_STEPS = ELEMENTWISE_STEPS | {"pad-rows"}   # act on each row alone: safe on any rows


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def _span_axis(rule: Rule, shape: Shape, stack_axes: tuple[int, ...], dims: Dims) -> tuple[int, int] | None:
    """(target axis, HF rows per unit of it) for tensors that can move in row pieces, else None.

    Identity (or elementwise) 2-D tensors: HF rows are target rows. Transposes `(out, in) -> (in, o1, o2...)`
    (query, key, MLP...): HF rows are `o1` units of `prod(o2...)` rows each (whole heads, so the RoPE permutation and
    query scale, which act within a head, apply piece by piece). Transposes `(out, in...) -> (i..., out)`
    (attention out, LM head): HF rows are the target's last axis.
    """
    free = [a for a in range(len(shape)) if a not in stack_axes]
    if len(rule.hf_shape) != 2 or len(free) < 2 or rule.part is not None or rule.hf_expert_axis or rule.join:
        return None
    if set(rule.steps) <= _ROWWISE_STEPS:     # copies, scaled, offset or padded (Gemma embeddings)
        return (free[0], 1) if len(free) == 2 else None
    if rule.steps[0] != "transpose" or not set(rule.steps[1:]) <= _ROW_SAFE_STEPS:
        return None
    out_dims = rule.maxtext_shape[1:]
    if rule.hf_shape[1] == rule.maxtext_shape[0] and "*".join(out_dims) == rule.hf_shape[0]:
        return free[1], math.prod(eval_shape(out_dims[1:], dims))
    if rule.hf_shape[0] == rule.maxtext_shape[-1] and rule.steps == ("transpose",):
        return free[-1], 1
    return None


def _block_layers(block: Block | None) -> list[tuple[tuple[int, ...], int | None]]:
    """(stack index, HF layer) of every layer a block's leaf holds: one unindexed entry for a global leaf."""
    if block is None:
        return [((), None)]
    if block.stacked:
        return [(block.stack_index(s), hf) for s, hf in enumerate(block.hf_layers)]
    return [((), block.hf_layers[0])]


def _tasks(rule: Rule, block: Block | None, dims: Dims) -> tuple[SliceTask, ...]:
    experts = range(dims[rule.experts]) if rule.experts is not None else [None]
    layers = _block_layers(block)
    tasks = []
    for e, (s, hf_layer) in itertools.product(experts, layers):
        index = (*(() if e is None else (e,)), *s)
        name = rule.hf.format(layer=hf_layer, expert=e) if (rule.slots or e is not None) else rule.hf
        if rule.hf_expert_axis:     # expert e is index e on axis 0 of the one HF tensor
            source = SourceSlice(name, index=(e,), axes=(0,), part=rule.part)
        else:
            source = SourceSlice(name, part=rule.part)
        tasks.append(SliceTask(index, source))
    return tuple(tasks)


def _joined_tasks(rule: Rule, block: Block | None, dims: Dims) -> tuple[SliceTask, ...]:
    """A joined leaf's tasks: per layer, one per row range of one of its HF tensors (`Join.layout`), written at the
    next range of the joined axis (the tensor's span axis)."""
    join = rule.join
    assert join is not None
    rest = eval_shape(rule.hf_shape[1:], dims)
    shapes = {name: (rows, *rest) for name, rows in join.rows(dims).items()}
    layers = _block_layers(block)
    tasks = []
    for index, hf_layer in layers:
        at = 0
        for name, first, rows in join.layout(dims):
            source = SourceSlice(name.format(layer=hf_layer), rows=(first, first + rows), shape=shapes[name])
            tasks.append(SliceTask(index, source, span=(at, at + rows)))
            at += rows
    return tuple(tasks)


def _source_shape(rule: Rule, dims: Dims) -> Shape:
    """The HF shape one task reads (before its part): the tensor, or one expert's slice of it."""
    shape = eval_shape(rule.hf_shape, dims)
    return shape[1:] if rule.hf_expert_axis else shape


def build_to_maxtext(family: Family, hf_config: dict, scan_layers: bool, dtype: np.dtype,
                     features: frozenset[str] = frozenset(), mesh: TargetMesh | None = None) -> ConversionPlan:
    """The HF -> MaxText plan for a config: every MaxText leaf with its HF sources (metadata only).

    `features` asks for optional parts the family offers (e.g. {"mtp"} for DeepSeek-V3's MTP layer);
    `mesh` the mesh the read chunks are cut for (default: TargetMesh()).
    """
    unknown = set(features) - set(family.features) - set(family.layouts)
    if unknown:
        raise UnsupportedError(f"{family.name} has no optional part {', '.join(sorted(unknown))}")
    fp8_block = fp8_tree = None
    if np.dtype(dtype) == FP8:
        fp8_tree, fp8_block = fp8_layout(family, hf_config)
    quant = hf_config.get("quantization_config")
    hf_config = family.model_config(hf_config)
    if fp8_tree:    # carried with the model's config (a multimodal release's text config has none): written back
        hf_config = {**hf_config, "quantization_config": quant}
    notes = tuple(family.check_config(hf_config, frozenset(features)))
    dims = family.dims(hf_config)
    entries: list[tuple[Rule, Block | None, str]] = [(r, None, r.maxtext) for r in family.top_rules(dims, hf_config)]
    for block in family.blocks(dims, hf_config, scan_layers, frozenset(features)):
        entries += [(r, block, f"{block.prefix}/{r.maxtext}") for r in block.rules]
    tensors = []
    base = BF16 if fp8_tree else np.dtype(dtype)       # --dtype fp8: every leaf not kept fp8 is bf16
    for rule, block, path in entries:
        keep = fp8_tree is not None and fp8_tree.keeps(rule)
        stored = FP8 if keep else np.dtype(np.float32) if rule.dtype == "f32" else base
        fixed = {"hf_dtype": np.dtype(rule.hf_dtype)} if rule.hf_dtype else {}
        itemsize = stored.itemsize
        slice_shape = eval_shape(rule.maxtext_shape, dims)
        source_shape = _source_shape(rule, dims)
        shape, axes = _stacked(slice_shape, rule, block, dims)
        tasks = _tasks(rule, block, dims) if rule.join is None else _joined_tasks(rule, block, dims)
        if keep:
            tasks = tuple(dataclasses.replace(t, source=dataclasses.replace(t.source, raw=True)) for t in tasks)
        chunks = chunk_shape(shape, axes, itemsize)
        roles = list(axis_roles(rule.maxtext_shape))
        for a in axes:
            roles.insert(a, None)
        whole = tuple(1 if a in axes else n for a, n in enumerate(shape))
        span = _span_axis(rule, shape, axes, dims)
        pieces = None
        if span is not None:
            span_axis, unit = span
            rows = min(shape[span_axis], source_shape[0] // unit)   # fewer than the target's when padded
            align = read_chunk_shape(shape, whole, roles, itemsize, mesh)[span_axis]
            pieces = _split_rows(rows, unit * source_shape[1] * 4, align)
        if rule.join is not None:   # row ranges of several HF tensors, each written at its range of the joined axis
            span_axis = len(shape) + rule.join.axis
        elif pieces:
            pieces[-1] = (pieces[-1][0], shape[span_axis])          # padding rows go with the last piece
            tasks = tuple(SliceTask(t.index, SourceSlice(t.source.name, rows=(a * unit, min(b, rows) * unit),
                                                         raw=keep), span=(a, b)) for t in tasks for a, b in pieces)
            chunks = tuple(pieces[0][1] if a == span_axis else n for a, n in enumerate(whole))
        else:
            span_axis = None
        read = read_chunk_shape(shape, chunks, roles, itemsize, mesh)
        tensors.append(TensorPlan(
            target=path, shape=shape, dtype=stored, slice_shape=slice_shape, source_shape=source_shape,
            stack_axes=axes, chain=resolve_steps(rule.steps, dims), tasks=tasks, chunk_shape=chunks,
            span_axis=span_axis, collection=rule.collection, read_chunk=read if read != chunks else None,
            roles=tuple(roles), fill=rule.fill, quant="fp8" if keep else None, **fixed))
        if keep:
            tensors.append(_scale_plan(rule, block, path, dims, fp8_block, roles, mesh))
    check_coverage(tensors)
    return ConversionPlan(TO_MAXTEXT, family.name, scan_layers, np.dtype(dtype), tuple(tensors), dict(hf_config),
                          dims, notes, frozenset(features))


def fp8_layout(family: Family, hf_config: dict) -> tuple[Fp8Tree, int]:
    """The family's fp8 tree and the source's block size, for `--dtype fp8`; a one-line refusal when MaxText 0.2.5
    has no fp8 tree for the family, when the source is not block-scaled fp8, or its blocks are not square."""
    tree = family.extra.get("fp8_tree")
    if tree is None:
        from ckpt_cli import registry

        names = ", ".join(sorted(n for n, spec in registry.MODELS.items() if spec.dtype == "fp8"))
        raise UnsupportedError(f"--dtype fp8: MaxText 0.2.5 has no fp8 tree for {family.name} models (its -fp8 model "
                               f"names: {names or 'none registered'}); use --dtype bf16 or f32, which dequantize")
    quant = hf_config.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8" or not quant.get("weight_block_size"):
        raise UnsupportedError("--dtype fp8 keeps the block-scaled e4m3 weights of an fp8 source as they are; this "
                               "config.json has no quantization_config with quant_method fp8 and weight_block_size")
    block = quant["weight_block_size"]
    if len(block) != 2 or block[0] != block[1] or not isinstance(block[0], int) or block[0] < 1:
        raise UnsupportedError(f"--dtype fp8: weight_block_size {block} is not square (MaxText's weight_block_size "
                               "is one size for both axes)")
    return tree, block[0]


def fp8_scale_shape(shape: Shape, block: int) -> Shape:
    """MaxText's block-scale shape of a kernel (per layer and expert): each axis in blocks, an axis shorter than a
    block (e.g. a head count) kept whole (layers/linears.py DenseGeneral, layers/moe.py)."""
    return tuple(d // block if d >= block else d for d in shape)


def _scale_plan(rule: Rule, block: Block | None, path: str, dims: Dims, size: int, roles: list[str | None],
                mesh: TargetMesh | None) -> TensorPlan:
    """The block scale beside a kernel kept fp8: MaxText `<leaf>_scale` from HF `<weight>_scale_inv` (the same
    numbers: MaxText multiplies, as HF does), through the kernel's transforms at block granularity."""
    hf_shape = eval_shape(rule.hf_shape, dims)
    mt_shape = eval_shape(rule.maxtext_shape, dims)
    if rule.hf_expert_axis or len(hf_shape) != 2 or rule.part is not None:
        raise UnsupportedError(f"--dtype fp8: {rule.hf} is not one 2-D weight; its block scale cannot be kept")
    chain = resolve_steps(rule.steps, dims)
    if not chain.exact:
        raise UnsupportedError(f"--dtype fp8: {path} is {chain.describe()} of {rule.hf}; fp8 weights can only be "
                               "moved, not rescaled")
    rows, cols = hf_shape
    source_shape = (-(-rows // size), -(-cols // size))
    slice_shape = fp8_scale_shape(mt_shape, size)
    pieces = [eval_dim(n, dims) for _, n in rule.join.pieces] if rule.join else []
    groups = dims[rule.join.groups] if rule.join else 1
    if (rows % size or cols % size or any(n % (size * groups) for n in pieces)
            or not _blocks_follow(rule, mt_shape, hf_shape, size, slice_shape, source_shape)):
        raise UnsupportedError(f"--dtype fp8: the {size}x{size} blocks of {rule.hf} {hf_shape} do not map to "
                               f"MaxText's block scale of {path} {mt_shape}")
    shape, axes = _stacked(slice_shape, rule, block, dims)
    span_axis = None
    if rule.join:   # the same join of the pieces' scale rows, in blocks (0.2.5's concat_qkvz_scales_and_transpose)
        scale_join = Join(rule.join.groups, tuple((name + "_scale_inv", str(n // size))
                                                  for (name, _), n in zip(rule.join.pieces, pieces, strict=True)),
                          rule.join.axis)
        scale_rule = dataclasses.replace(rule, hf=rule.hf + "_scale_inv", join=scale_join,
                                         hf_shape=tuple(str(n) for n in source_shape))
        tasks = _joined_tasks(scale_rule, block, dims)
        span_axis = len(shape) + rule.join.axis
    else:
        tasks = tuple(dataclasses.replace(t, source=SourceSlice(t.source.name + "_scale_inv"))
                      for t in _tasks(rule, block, dims))
    chunks = chunk_shape(shape, axes, 4)
    read = read_chunk_shape(shape, chunks, roles, 4, mesh)
    return TensorPlan(
        target=path + "_scale", shape=shape, dtype=np.dtype(np.float32), slice_shape=slice_shape,
        source_shape=source_shape, stack_axes=axes, chain=chain, tasks=tasks, chunk_shape=chunks,
        span_axis=span_axis, read_chunk=read if read != chunks else None, roles=tuple(roles), quant="scale")


def _blocks_follow(rule: Rule, mt_shape: Shape, hf_shape: Shape, size: int, scale: Shape, source: Shape) -> bool:
    """Whether the kernel's transforms, applied to the block grid, give MaxText's scale grid: the same count; a copy
    of the same shape; or a transpose `(out, in) -> (in..., out...)` where, in each of the in and out groups, every
    axis but the last is shorter than a block (kept whole, e.g. heads) and the last a whole number of blocks (e.g. a
    head's dims). Other steps (a RoPE permutation within a head) do not move whole blocks: refused."""
    if math.prod(scale) != math.prod(source) or set(rule.steps) - {"transpose", "reshape"}:
        return False
    if "transpose" not in rule.steps:
        return tuple(mt_shape) == tuple(hf_shape)
    split = next((k for k in range(len(mt_shape) + 1) if math.prod(mt_shape[:k]) == hf_shape[1]), None)
    if split is None:
        return False
    groups = (mt_shape[:split], mt_shape[split:])
    return all(g and all(d < size for d in g[:-1]) and g[-1] % size == 0 for g in groups)


def rename_sources(plan: ConversionPlan, rename: Callable[[str], str], notes: Sequence[str] = ()) -> ConversionPlan:
    """The same HF -> MaxText plan reading every source under `rename(name)` (the names a source's files use
    when they differ from the family's table, e.g. a multimodal wrapper's text prefix), with `notes` added."""
    tensors = tuple(dataclasses.replace(t, tasks=tuple(
        dataclasses.replace(task, source=dataclasses.replace(task.source, name=rename(task.source.name)))
        for task in t.tasks)) for t in plan.tensors)
    return dataclasses.replace(plan, tensors=tensors, notes=(*plan.notes, *notes))


def check_coverage(tensors: list[TensorPlan]) -> None:
    """Every target slice written exactly once, every source read by one task, no duplicate targets.

    Parts: a source slice read in parts is read in parts that tile it (no element dropped), and a
    target slice written in parts gets parts that tile it (no gap, no overlap).
    """
    targets = [t.target for t in tensors]
    if len(set(targets)) != len(targets):
        raise AssertionError("plan has duplicate targets")
    sources = [(task.source.name, task.source.index, task.source.rows, task.source.part)
               for t in tensors if t.fill is None for task in t.tasks]
    if len(set(sources)) != len(sources):
        raise AssertionError("plan reads a source slice twice")
    read_parts: dict[tuple, set] = {}
    for name, index, rows, part in sources:
        read_parts.setdefault((name, index, rows), set()).add(part)
    for (name, index, _), parts in read_parts.items():
        if not _parts_tile(parts):
            raise AssertionError(f"{name}{list(index) if index else ''}: its parts do not tile it (some of it "
                                 "would be dropped or read twice)")
    for t in tensors:
        want = set(itertools.product(*(range(t.shape[a]) for a in t.stack_axes)))
        writes: dict[tuple, list] = {}
        for task in t.tasks:
            writes.setdefault(task.index, []).append((task.span, task.part))
        if set(writes) != want:
            raise AssertionError(f"{t.target}: tasks do not cover the stacked axes")
        spans = sorted({task.span for task in t.tasks if task.span is not None})
        parts = {task.part for task in t.tasks}
        combos = {(s, p) for s in (spans or [None]) for p in parts}
        if not _parts_tile(parts) or any(len(w) != len(set(w)) or set(w) != combos for w in writes.values()):
            raise AssertionError(f"{t.target}: tasks do not cover the stacked axes exactly once")
        if spans and (spans[0][0] != 0 or spans[-1][1] != t.shape[t.span_axis]
                      or any(a[1] != b[0] for a, b in zip(spans, spans[1:], strict=False))):
            raise AssertionError(f"{t.target}: row pieces do not tile axis {t.span_axis}")


def _parts_tile(parts: set) -> bool:
    """{None} (whole), or parts of one axis, step and kind whose starts are exactly 0..step-1."""
    if parts == {None}:
        return True
    if None in parts:
        return False
    first = next(iter(parts))
    same = all((p.axis, p.step, p.blocked) == (first.axis, first.step, first.blocked) for p in parts)
    return same and tiles(sorted((p.start, p.stop) for p in parts), first.step)


def build_to_hf(family: Family, hf_config: dict, scan_layers: bool, dtype: np.dtype,
                features: frozenset[str] = frozenset()) -> ConversionPlan:
    """The MaxText -> HF plan: every HF tensor with the MaxText slice it comes from (the forward plan inverted).

    Built from the forward plan, so the two directions cannot disagree: each forward task (HF source ->
    MaxText slice) becomes one reverse task (MaxText slice -> whole HF tensor, an HF row piece, one
    expert's index on axis 0 of the HF tensor, or a strided part of any of these). Forward tensors that
    read parts of one HF tensor (GPT-OSS's gate/up) become one HF tensor written by all their tasks.
    """
    forward = build_to_maxtext(family, hf_config, scan_layers, np.dtype(dtype), features)
    base = BF16 if np.dtype(dtype) == FP8 else np.dtype(dtype)   # fp8: kept weights and scales as stored
    by_name: dict[str, list[tuple[TensorPlan, SliceTask]]] = {}
    for t in forward.tensors:
        if t.fill is not None:    # a constant MaxText leaf: nothing on the HF side to write it to
            continue
        for task in t.tasks:
            by_name.setdefault(task.source.name, []).append((t, task))
    tensors = []
    for name, jobs in by_name.items():
        t = jobs[0][0]
        if any((u.source_shape, u.chain) != (t.source_shape, t.chain) for u, _ in jobs):
            raise AssertionError(f"{name}: the MaxText tensors it feeds disagree on its shape or transform")
        axes = jobs[0][1].source.axes
        if any(task.source.axes != axes for _, task in jobs):
            raise AssertionError(f"{name}: read with different stacked axes")
        source_shape = jobs[0][1].source.shape or t.source_shape   # a joined leaf's tensors have their own
        shape = list(source_shape)
        for k, axis in enumerate(axes):   # stacked HF axes (experts on axis 0): as many as the indices seen
            shape.insert(axis, 1 + max(task.source.index[k] for _, task in jobs))
        reverse_tasks = [
            SliceTask(task.source.index, SourceSlice(u.target, index=task.index, axes=u.stack_axes, rows=task.span,
                                                     rows_axis=u.span_axis or 0),
                      span=task.source.rows, part=task.source.part,
                      source_shape=u.slice_shape if u.slice_shape != t.slice_shape else None)
            for u, task in jobs]
        span_axis = 0 if reverse_tasks[0].span is not None else None
        tensors.append(TensorPlan(
            target=name, shape=tuple(shape), dtype=t.dtype if t.quant else (t.hf_dtype or base),
            slice_shape=source_shape,
            source_shape=t.slice_shape, stack_axes=axes, chain=t.chain, tasks=tuple(reverse_tasks),
            chunk_shape=tuple(shape), span_axis=span_axis, quant=t.quant))
    tensors.sort(key=lambda x: x.target)
    check_coverage(tensors)
    return ConversionPlan(TO_HF, family.name, scan_layers, np.dtype(dtype), tuple(tensors), dict(hf_config),
                          forward.dims, forward.notes, forward.features)


def write_key(target: str, index: tuple) -> tuple:
    """A hashable, JSON-able name of one target slice write (slices are not hashable before Python 3.12)."""
    return (target, tuple((i.start, i.stop, i.step) if isinstance(i, slice) else i for i in index))


def parameter_count(family: Family, hf_config: dict, features: frozenset[str] = frozenset()) -> int:
    """Elements of the MaxText tree `build_to_maxtext` would plan for this config, without planning its slices."""
    hf_config = family.model_config(hf_config)
    dims = family.dims(hf_config)
    total = sum(math.prod(_stacked(eval_shape(r.maxtext_shape, dims), r, None, dims)[0])
                for r in family.top_rules(dims, hf_config))
    try:
        layers = family.blocks(dims, hf_config, True, frozenset(features))
    except UnsupportedError:           # built unscanned only (gemma4-e2b, -e4b): the same leaves, one per layer
        layers = family.blocks(dims, hf_config, False, frozenset(features))
    for block in layers:
        total += sum(math.prod(_stacked(eval_shape(r.maxtext_shape, dims), r, block, dims)[0]) for r in block.rules)
    return total
