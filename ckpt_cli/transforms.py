"""The vocabulary of tensor transforms between Hugging Face and MaxText, each beside its inverse.

A transform maps one per-layer HF array to one per-layer MaxText array (`to_maxtext`) and back
(`to_hf`). `Linear` and `Reshape` change shapes, `PadRows` adds (and drops) rows; the others act elementwise
or permute the last axis. Arithmetic (scale, offset) is computed in float32 and returned as float32: the engine casts
once, to the requested output dtype, at the end. Everything is defined once, here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np

Shape = tuple[int, ...]


class Transform:
    """One reversible step. `shape` arguments are the per-layer shape on the side being produced."""

    name = "transform"

    def to_maxtext(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        raise NotImplementedError

    def to_hf(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class Identity(Transform):
    """Copy (norm scales, embeddings, biases already in MaxText shape)."""

    name = "identity"

    def to_maxtext(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        return x.reshape(shape)

    def to_hf(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        return x.reshape(shape)


@dataclass(frozen=True)
class Reshape(Transform):
    """HF flat (heads*head_dim,) <-> MaxText (heads, head_dim), head-major."""

    name = "reshape"

    def to_maxtext(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        return x.reshape(shape)

    def to_hf(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        return x.reshape(shape)


@dataclass(frozen=True)
class Linear(Transform):
    """HF Linear weight (out, in) <-> MaxText kernel (in..., out...): transpose, then reshape.

    `q_mt[e, h, d] = q_hf[h*D + d, e]`; `out_mt[h, d, e] = o_hf[e, h*D + d]` (head-major flattening).
    An HF weight of more axes moves its first axis last (`(out, in...)` flattened to `(out, prod(in))`):
    a depthwise conv kernel `(C, 1, K)` <-> `(K, 1, C)`, which is the full axis reversal as the middle is 1.
    """

    name = "transpose"

    def to_maxtext(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        return transpose2d(x.reshape(x.shape[0], -1)).reshape(shape)

    def to_hf(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        return transpose2d(x.reshape(math.prod(shape[1:]), shape[0])).reshape(shape)


@dataclass(frozen=True)
class GroupedLinear(Transform):
    """HF grouped Linear weight (G*O, W) <-> MaxText kernel (G, W, O): per group g, rows g*O..(g+1)*O transposed.

    `k_mt[g, w, o] = w_hf[g*O + o, w]` (DeepSeek-V4's grouped output projection `wo_a`, G = o_groups, O = the
    per-group rank, W = heads*head_dim / G). G is the MaxText shape's first axis.
    """

    name = "group-transpose"

    def to_maxtext(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        g, w, o = shape
        return np.ascontiguousarray(x.reshape(g, o, w).transpose(0, 2, 1))

    def to_hf(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        return np.ascontiguousarray(x.transpose(0, 2, 1)).reshape(shape)


@dataclass(frozen=True)
class RopeInterleave(Transform):
    """Last axis: HF rotate-half order -> MaxText interleaved pairs (Llama 3.1 q/k).

    `new[..., 2i] = old[..., i]`, `new[..., 2i+1] = old[..., D/2 + i]`. With `head` set, the last axis holds
    whole heads of that many dims, one after another (a LoRA B kernel `(r, N*D)`), each permuted alike.
    """

    head: int | None = None
    name = "rope-interleave"

    def to_maxtext(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        y = self._heads(x)
        d = y.shape[-1]
        return np.stack([y[..., : d // 2], y[..., d // 2:]], axis=-1).reshape(x.shape)

    def to_hf(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        y = self._heads(x)
        return np.concatenate([y[..., 0::2], y[..., 1::2]], axis=-1).reshape(x.shape)

    def _heads(self, x: np.ndarray) -> np.ndarray:
        return x if self.head is None else x.reshape(*x.shape[:-1], -1, self.head)

    def describe(self) -> str:
        return self.name if self.head is None else f"{self.name}(heads of {self.head})"


@dataclass(frozen=True)
class Scale(Transform):
    """Multiply by `factor` on import, divide on export; computed in float32."""

    factor: float
    label: str = ""
    name = "scale"

    def to_maxtext(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        return x.astype(np.float32) * np.float32(self.factor)

    def to_hf(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        # Divide by the very float32 factor import multiplied by: one correctly rounded step, so f32 round
        # trips land on the original or an adjacent float (a rounded reciprocal would add a second error).
        return x.astype(np.float32) / np.float32(self.factor)

    def describe(self) -> str:
        return f"scale({self.label or f'{self.factor:.6g}'})"


@dataclass(frozen=True)
class Offset(Transform):
    """Add `value` on import, subtract on export (Gemma-style `(1 + w)` norms); float32."""

    value: float = 1.0
    name = "offset"

    def to_maxtext(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        return x.astype(np.float32) + np.float32(self.value)

    def to_hf(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        return x.astype(np.float32) - np.float32(self.value)

    def describe(self) -> str:
        return f"offset({self.value:+g})"


@dataclass(frozen=True)
class PadRows(Transform):
    """HF (V, ...) <-> MaxText (V', ...), V' >= V: zero rows appended on import, the first rows kept on export.

    MaxText 0.2.5 pads Gemma/Gemma 2's 256000-row embedding to 256128 rows this way (zeros written, extra rows
    dropped whatever they hold). `shape` is the slice being produced, so the same step serves a whole table and
    a row piece of it (a piece past the HF rows gets only zeros).
    """

    name = "pad-rows"

    def to_maxtext(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        if x.shape[0] == shape[0]:
            return x
        out = np.zeros(shape, dtype=x.dtype)
        out[: x.shape[0]] = x
        return out

    def to_hf(self, x: np.ndarray, shape: Shape) -> np.ndarray:
        return x[: shape[0]]


def query_scale(head_dim: int) -> Scale:
    """The 1/sqrt(D) that MaxText expects folded into Llama/Mixtral query kernels."""
    return Scale(1.0 / math.sqrt(head_dim), label=f"1/sqrt({head_dim})")


def query_pre_attn_scale(scalar: int) -> Scale:
    """Gemma 2's `query_pre_attn_scalar ** -0.5`, folded into the query kernel (MaxText's gemma2 attention has no
    run-time query scaling); equal to 1/sqrt(head_dim) except for gemma2-27b (1/sqrt(144), head_dim 128)."""
    return Scale(1.0 / math.sqrt(scalar), label=f"1/sqrt({scalar})")


def embedding_scale(width: int, bf16: bool = True) -> Scale:
    """The sqrt(E) MaxText expects folded into a Gemma embedding table (it does not scale embeddings at run time,
    and divides tied logits by sqrt(E)); export divides by the same factor. Gemma3's hook rounds the factor to
    bf16; Gemma 2's (and ckpt's Gemma) keeps it float32."""
    factor = float(np.float32(math.sqrt(width)))
    if bf16:
        factor = float(np.float32(factor).astype(ml_dtypes.bfloat16))
        return Scale(factor, label=f"bf16(sqrt({width}))={factor:g}")
    return Scale(factor, label=f"sqrt({width})")


@dataclass(frozen=True)
class Chain:
    """Transforms applied in order on import and in reverse order on export."""

    steps: tuple[Transform, ...]

    def to_maxtext(self, x: np.ndarray, maxtext_shape: Shape) -> np.ndarray:
        for step in self.steps:
            x = step.to_maxtext(x, maxtext_shape)
        return x

    def to_hf(self, x: np.ndarray, hf_shape: Shape) -> np.ndarray:
        for step in reversed(self.steps):
            x = step.to_hf(x, hf_shape)
        return x

    def describe(self) -> str:
        return " > ".join(s.describe() for s in self.steps) or "identity"

    @property
    def exact(self) -> bool:
        """True when the chain is a pure permutation, or adds zero rows (bit-exact round trip in any dtype)."""
        return all(isinstance(s, (Identity, Reshape, Linear, GroupedLinear, RopeInterleave, PadRows))
                   for s in self.steps)

    @property
    def pads(self) -> bool:
        """True when the MaxText side has more rows than the HF side (`PadRows`)."""
        return any(isinstance(s, PadRows) for s in self.steps)


def chain(*steps: Transform | Sequence[Transform]) -> Chain:
    """Build a Chain, flattening nested sequences."""
    flat: list[Transform] = []
    for s in steps:
        flat.extend(s if isinstance(s, Sequence) else [s])
    return Chain(tuple(flat))


_BLOCK = 256


def transpose2d(x: np.ndarray) -> np.ndarray:
    """A contiguous transpose of a 2-D array: a pure move of bits, exact for any dtype.

    numpy copies a transposed view one element at a time, so narrow elements move slowly. When whole
    8-byte words fit a row (bf16: 4 columns, f32: 2), the words are transposed first (4x fewer, larger
    moves) and the few elements inside each word are put in order by a second, cache-local pass:
    about 2x the plain blocked copy for bf16.
    """
    if x.ndim != 2:
        raise ValueError(f"transpose2d wants a 2-D array, got {x.shape}")
    rows, cols = x.shape
    k = 8 // x.itemsize if x.itemsize in (1, 2, 4) else 1
    if k > 1 and cols % k == 0 and x.flags.c_contiguous and rows * cols >= 4096:
        words = x.view(np.uint64)                     # (rows, cols / k): k elements a word
        wt = np.empty((cols // k, rows), np.uint64)
        for i in range(0, rows, _BLOCK):
            wt[:, i:i + _BLOCK] = words[i:i + _BLOCK].T
        out = np.empty((cols // k, k, rows), dtype=x.dtype)
        out[...] = wt.view(x.dtype).reshape(cols // k, rows, k).transpose(0, 2, 1)
        return out.reshape(cols, rows)
    out = np.empty((cols, rows), dtype=x.dtype)
    for i in range(0, rows, _BLOCK):
        out[:, i:i + _BLOCK] = x[i:i + _BLOCK].T
    return out
