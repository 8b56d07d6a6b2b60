"""A MaxText Orbax checkpoint as a `ParamSource` for the JAX forward: read one decoder layer at a time.

Scanned checkpoints stack every per-layer leaf under `decoder/layers/<leaf>` with the layer on axis 1
(maxtext-layout.md §1.3): layer i is the slice `[:, i]` of each of them; a non-parameter variable (DeepSeek-V3's
router bias) has its layers on axis 0. Unscanned checkpoints keep
`decoder/layers_<i>/<leaf>`. Top-level arrays (embedding, final norm, LM head) are read whole. An fp8 leaf kept
with its block scale (`--dtype fp8`, MaxText's -fp8 trees) is dequantized as MaxText does, when its layer is read.
Before any data is read, the checkpoint's tree is checked against the conversion plan for the config
(every leaf present with its planned shape), so a wrong checkpoint fails with one line naming the leaf.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ckpt_cli.errors import ShapeMismatchError, SourceError
from ckpt_cli.families import Family
from ckpt_cli.io.orbax import OrbaxCheckpoint
from ckpt_cli.plan import SourceSlice, build_to_maxtext

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
                 progress: Callable[[int, int], None] | None = None, workers: int = 4):
        self.ckpt = ckpt
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

    def layer(self, i: int) -> dict[str, np.ndarray]:
        """Every leaf of decoder layer i, unstacked; the reads run concurrently (tensorstore drops the GIL)."""
        if i not in self.layer_sources:
            raise IndexError(f"layer {i} out of range (the checkpoint has {self.num_layers})")
        sources = self.layer_sources[i]
        with ThreadPoolExecutor(self.workers) as pool:
            leaves = dict(zip(sources, pool.map(self._read, sources.values()), strict=True))
        for leaf in [k for k in leaves if k + SCALE in leaves]:    # fp8 kept: dequantized here, one layer at a time
            leaves[leaf] = dequantize(leaves[leaf], leaves.pop(leaf + SCALE))
        return leaves


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


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize
