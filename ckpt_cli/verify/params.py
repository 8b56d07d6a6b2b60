"""A MaxText Orbax checkpoint as a `ParamSource` for the JAX forward: read one decoder layer at a time.

Scanned checkpoints stack every per-layer leaf under `decoder/layers/<leaf>` with the layer on axis 1
(maxtext-layout.md §1.3): layer i is the slice `[:, i]` of each of them; a non-parameter variable (DeepSeek-V3's
router bias) has its layers on axis 0. Unscanned checkpoints keep
`decoder/layers_<i>/<leaf>`. Top-level arrays (embedding, final norm, LM head) are read whole. An fp8 leaf kept
with its block scale (`--dtype fp8`, MaxText's -fp8 trees) is dequantized as MaxText does, when its layer is read.
A MoE block's stacked routed experts (`wi_0`, `wi_1`, `wo`, their biases: experts on axis 0) are not read with
the layer: `layer(i)` gives an `ExpertLeaf` for each, which reads just the experts asked for (tensorstore slices
on the expert axis, whole chunks, as ckpt writes one chunk per expert and layer), so a layer's experts are never
in memory at once.
Before any data is read, the checkpoint's tree is checked against the conversion plan for the config
(every leaf present with its planned shape), so a wrong checkpoint fails with one line naming the leaf.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ckpt_cli.errors import ShapeMismatchError, SourceError
from ckpt_cli.families import Family
from ckpt_cli.io.orbax import OrbaxCheckpoint
from ckpt_cli.plan import SourceSlice, build_to_maxtext
from ckpt_cli.verify.blocks import is_expert_leaf

SCALE = "_scale"     # an fp8 leaf's block scale beside it (MaxText's -fp8 trees: `kernel_scale`, `wi_0_scale`)
_VOCAB_LEAVES = {"token_embedder/embedding": 0, "decoder/logits_dense/kernel": 1}  # axis that may be padded


def detect_scan(ckpt: OrbaxCheckpoint) -> bool:
    """True for the scanned layout, False for per-layer groups (metadata first, else the tree)."""
    from ckpt_cli.to_hf import detect_scan as detect

    return detect(ckpt)


def check_tree(ckpt: OrbaxCheckpoint, family: Family, hf_config: dict, scan: bool) -> list[str]:
    """Every leaf the plan for this config writes exists with the planned shape (metadata only).

    The vocabulary axis of the embedding / LM head may be larger (MaxText pads it); extra leaves are allowed.
    A leaf in an older ckpt layout (a variable stacked on axis 1) is read as planned; returns the note saying so.
    """
    from ckpt_cli.to_hf import read_legacy_layouts

    plan = build_to_maxtext(family, hf_config, scan, np.dtype(np.float32))
    notes = read_legacy_layouts(plan, ckpt)
    for t in plan.tensors:
        if t.target not in ckpt.paths:
            layout = "scanned" if scan else "unscanned"
            raise SourceError(f"{ckpt.items}: no parameter {t.target} (expected for a {layout} "
                              f"{family.name} checkpoint of this config)")
        shape, _ = ckpt.describe(t.target)
        want = tuple(t.shape)
        axis = _VOCAB_LEAVES.get(t.target)
        padded = axis is not None and len(shape) == len(want) and shape[axis] >= want[axis] and all(
            a == b for i, (a, b) in enumerate(zip(shape, want, strict=True)) if i != axis)
        if shape != want and not padded:
            raise ShapeMismatchError(f"{t.target}: the checkpoint has shape {shape}, the config implies {want}")
    return notes


TIED_TABLE, UNTIED_HEAD = "token_embedder/embedding", "decoder/logits_dense/kernel"


class OrbaxParams:
    """ParamSource over an OrbaxCheckpoint; counts the bytes it reads and reports progress.

    Which arrays hold HF layer i comes from the family's own blocks (the same table the conversion
    used), so every family and grouping works alike: `decoder/layers` (scanned, slice i on the rule's scan axis),
    `decoder/layers_<i>`, DeepSeek's `dense_layers`/`moe_layers` (the MoE index restarting at 0).
    """

    def __init__(self, ckpt: OrbaxCheckpoint, family: Family, hf_config: dict, scan: bool,
                 progress: Callable[[int, int], None] | None = None, workers: int = 4,
                 expert_group: int | None = None):
        """`expert_group`: the experts an `ExpertLeaf` of a MoE layer reads at a time (None: experts are read
        with their layer, whole)."""
        self.ckpt = ckpt
        self.expert_group = expert_group
        self.scan_layers = scan
        self.progress = progress
        self.workers = workers
        self.bytes_read = 0
        self._lock = threading.Lock()
        self.total_bytes = sum(_nbytes(*ckpt.describe(p)) for p in ckpt.paths)
        if TIED_TABLE in ckpt.paths and UNTIED_HEAD not in ckpt.paths:   # read again as the output head
            self.total_bytes += _nbytes(*ckpt.describe(TIED_TABLE))
        dims = family.dims(hf_config)
        self.layer_sources: dict[int, dict[str, SourceSlice]] = {}
        for block in family.blocks(dims, hf_config, scan, frozenset()):
            for s, hf_layer in enumerate(block.hf_layers):
                leaves = self.layer_sources.setdefault(hf_layer, {})
                for rule in block.rules:
                    for leaf in (rule.maxtext, rule.maxtext + SCALE):   # an fp8 leaf's block scale too
                        path = f"{block.prefix}/{leaf}"
                        if leaf == rule.maxtext or path in ckpt.paths:
                            leaves[leaf] = SourceSlice(path, index=block.stack_index(s), axes=block.axes_for(
                                rule)) if block.stacked else SourceSlice(path)
        self.num_layers = len(self.layer_sources)

    def _read(self, source: SourceSlice) -> np.ndarray:
        arr = self.ckpt.read(source)
        with self._lock:
            self.bytes_read += arr.nbytes
            if self.progress:
                self.progress(self.bytes_read, self.total_bytes)
        return arr

    def top(self, path: str) -> np.ndarray:
        if path + SCALE in self.ckpt.paths:
            return dequantize(self._read(SourceSlice(path)), self._read(SourceSlice(path + SCALE)))
        return self._read(SourceSlice(path))

    def has_top(self, path: str) -> bool:
        return path in self.ckpt.paths

    def top_rows(self, path: str, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (sorted, unique) of a top-level array, each read alone: a table's rows for a few tokens."""
        with ThreadPoolExecutor(self.workers) as pool:
            parts = list(pool.map(lambda r: self._read(SourceSlice(path, rows=(int(r), int(r) + 1))), rows))
        return np.concatenate(parts, axis=0)
    def _leaf_shape(self, source: SourceSlice) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of one layer's slice of a leaf (the stacked axes dropped)."""
        full, dtype = self.ckpt.describe(source.name)
        return tuple(d for a, d in enumerate(full) if a not in source.axes), dtype

    def layer_bytes(self, i: int) -> tuple[int, int, int]:
        """(bytes of layer i without its routed experts, bytes of one expert (all its leaves), experts): metadata
        only; experts 0 for a layer without streamed experts."""
        dense = expert = experts = 0
        for name, source in self.layer_sources[i].items():
            shape, dtype = self._leaf_shape(source)
            if is_expert_leaf(name) and shape:
                experts = max(experts, shape[0])
                expert += _nbytes(shape[1:], dtype)
            else:
                dense += _nbytes(shape, dtype)
        return dense, expert, experts

    def layer(self, i: int) -> dict[str, np.ndarray]:
        """Every leaf of decoder layer i, unstacked; the reads run concurrently (tensorstore drops the GIL). With
        an `expert_group`, the routed experts are `ExpertLeaf`s, read later a few experts at a time."""
        if i not in self.layer_sources:
            raise IndexError(f"layer {i} out of range (the checkpoint has {self.num_layers})")
        sources = self.layer_sources[i]
        lazy = {n: s for n, s in sources.items() if self.expert_group and is_expert_leaf(n)}
        eager = {n: s for n, s in sources.items() if n not in lazy}
        with ThreadPoolExecutor(self.workers) as pool:
            leaves = dict(zip(eager, pool.map(self._read, eager.values()), strict=True))
        for name, source in lazy.items():
            shape, dtype = self._leaf_shape(source)
            scale = leaves.pop(name + SCALE) if _fp8(dtype) else None   # fp8 kept: dequantized as a group is read
            leaves[name] = OrbaxExpertLeaf(self, source, shape, dtype, self.expert_group, scale)
        for leaf in [k for k in leaves if k + SCALE in leaves and _fp8(getattr(leaves[k], "dtype", None))]:
            # fp8 kept: dequantized here, one layer at a time (DeepSeek-V4's `pre_alpha_scale` is no block scale)
            leaves[leaf] = dequantize(leaves[leaf], leaves.pop(leaf + SCALE))
        return {n: leaves[n] for n in sources if n in leaves}


def _fp8(dtype) -> bool:
    """Whether a leaf's dtype is a kept fp8 weight's (float8_e4m3fn): only such a leaf has a block scale beside it."""
    return dtype is not None and np.dtype(dtype).name.startswith("float8")


def dequantize(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """An fp8 leaf as MaxText 0.2.5 computes with it (layers/quantizations.py `dequantize_weight`): each axis of the
    block scale spans `w.shape[a] // scale.shape[a]` elements of the weight, and the value is `w * scale`; float32."""
    if scale.ndim != w.ndim or any(s < 1 or d % s for d, s in zip(w.shape, scale.shape, strict=True)):
        raise ShapeMismatchError(f"block scale of shape {scale.shape} does not divide an fp8 weight of {w.shape}")
    blocks = tuple(d // s for d, s in zip(w.shape, scale.shape, strict=True))
    grid = tuple(x for s, b in zip(scale.shape, blocks, strict=True) for x in (s, b))
    expanded = w.astype(np.float32).reshape(grid) * scale.astype(np.float32).reshape(
        tuple(x for s in scale.shape for x in (s, 1)))
    return expanded.reshape(w.shape)




class OrbaxExpertLeaf:
    """One layer's stacked (X, ...) routed-expert leaf, left in the checkpoint: `read_experts(xs)` reads experts
    `xs` only (each run of consecutive experts one tensorstore slice of the expert axis, concurrently)."""

    def __init__(self, params: OrbaxParams, source: SourceSlice, shape: tuple[int, ...], dtype: np.dtype,
                 group: int, scale: np.ndarray | None = None):
        self.params, self.source, self.shape, self.group = params, source, shape, group
        self.scale = scale      # an fp8 leaf's (X, ...) block scale: the experts read are dequantized (float32)
        self.dtype = np.dtype(np.float32) if scale is not None else np.dtype(dtype)

    def read_experts(self, xs) -> np.ndarray:
        xs = [int(x) for x in xs]
        w = self._read_experts(xs)
        return w if self.scale is None else dequantize(w, self.scale[xs])

    def _read_experts(self, xs: list[int]) -> np.ndarray:
        xs = [int(x) for x in xs]
        if any(not 0 <= x < self.shape[0] for x in xs):
            raise IndexError(f"{self.source.name}: experts {xs} out of range (it has {self.shape[0]})")
        runs: list[tuple[int, int]] = []
        for x in xs:
            if runs and runs[-1][1] == x:
                runs[-1] = (runs[-1][0], x + 1)
            else:
                runs.append((x, x + 1))
        axis = next(a for a in range(len(self.shape) + len(self.source.axes)) if a not in self.source.axes)
        slices = [dataclasses.replace(self.source, rows=run, rows_axis=axis) for run in runs]
        if len(slices) == 1:
            return self.params._read(slices[0])
        out = np.empty((len(xs), *self.shape[1:]), dtype=self.params.ckpt.describe(self.source.name)[1])
        starts = np.cumsum([0] + [b - a for a, b in runs])
        with ThreadPoolExecutor(min(self.params.workers, len(slices))) as pool:   # each run copied in, then freed
            for start, part in zip(starts, pool.map(self.params._read, slices), strict=False):
                out[start:start + len(part)] = part
        return out

    def __getitem__(self, x: int) -> np.ndarray:
        return self.read_experts([x])[0]


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize
