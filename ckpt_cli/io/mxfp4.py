"""MXFP4 expert weights, as the official openai/gpt-oss-* checkpoints store them (maxtext-layout.md §10.5).

A weight of HF layout (X, in, out) (`mlp.experts.gate_up_proj (X, E, 2M)`, `down_proj (X, M, E)`) is not in the
files under its own name but as a pair of uint8 tensors:

* `<name>_blocks (X, out, in/32, 16)`: each byte packs two FP4 E2M1 values, the low nibble first (element 2k of a
  group of 32 along `in`), the high nibble second (element 2k + 1);
* `<name>_scales (X, out, in/32)`: one E8M0 exponent per group of 32, the factor `2^(scale - 127)` (255 is NaN).

The stored rows run along `out`, so a dequantized (X, out, in) is transposed to (X, in, out). Every value is a
2-bit-mantissa number times a power of two: float32 holds it exactly, and bf16 too (same exponent range).

DeepSeek-V4's fp4 experts (deepseek-ai/DeepSeek-V4-Flash, `expert_dtype: fp4`) use the same values and scales in a
row-wise layout, one weight per expert under its own name: `<stem>.weight` int8 `(out, in/2)`, two E2M1 values a
byte, low nibble first, and `<stem>.scale` float8_e8m0fnu `(out, in/32)` (the same biased exponent byte; transformers'
Fp8Dequantize reads them so). `row_weights` finds them, `dequantize_rows` gives `(out, in)`, the weight's own layout.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ckpt_cli.errors import SourceError

BLOCKS, SCALES = "_blocks", "_scales"
GROUP = 32                  # values sharing one scale
BYTES_PER_GROUP = GROUP // 2
SCALE_BIAS = 127
SCALE_NAN = 255
# the 16 E2M1 codes: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; code 0b0001 is the subnormal 0.5
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                 -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)


def pair(name: str) -> tuple[str, str]:
    """The stored tensors of a logical weight: (`<name>_blocks`, `<name>_scales`)."""
    return name + BLOCKS, name + SCALES


def logical_names(names) -> dict[str, tuple[str, str]]:
    """Logical weight -> (blocks, scales) for every `*_blocks` tensor among `names` whose logical name is not
    itself stored (the scales may be missing: `logical_shape` says so)."""
    present = set(names)
    out = {}
    for n in present:
        if n.endswith(BLOCKS) and n.removesuffix(BLOCKS) not in present:
            out[n.removesuffix(BLOCKS)] = pair(n.removesuffix(BLOCKS))
    return out


def logical_shape(name: str, blocks: tuple[tuple[int, ...], np.dtype],
                  scales: tuple[tuple[int, ...], np.dtype] | None) -> tuple[int, ...]:
    """The (..., in, out) shape the pair stands for, after checking the pair is well-formed (else a SourceError)."""
    b, s = pair(name)
    if scales is None:
        raise SourceError(f"tensor {b} (MXFP4) has no {s}: the block scales are missing")
    (bshape, bdtype), (sshape, sdtype) = blocks, scales
    if np.dtype(bdtype) != np.uint8 or np.dtype(sdtype) != np.uint8:
        raise SourceError(f"MXFP4 tensors {b} / {s} must be uint8, found {np.dtype(bdtype)} / {np.dtype(sdtype)}")
    if len(bshape) < 3 or bshape[-1] != BYTES_PER_GROUP or tuple(bshape[:-1]) != tuple(sshape):
        raise SourceError(f"MXFP4 tensors {b} {tuple(bshape)} / {s} {tuple(sshape)}: expected blocks "
                          f"(..., out, in/{GROUP}, {BYTES_PER_GROUP}) and scales (..., out, in/{GROUP})")
    *lead, rows, groups, _ = bshape
    return (*lead, groups * GROUP, rows)


def dequantize(blocks: np.ndarray, scales: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """blocks (..., out, G, 16) uint8 and scales (..., out, G) uint8 -> (..., G*32, out) in `dtype`.

    Computed in float32 (exact), then cast. The result is a transposed view when `dtype` is float32.
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BYTES_PER_GROUP:
        raise SourceError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match")
    *lead, rows, groups, _ = blocks.shape
    out = np.empty((*lead, rows, groups, GROUP), np.float32)
    out[..., 0::2] = E2M1[blocks & 0x0F]
    out[..., 1::2] = E2M1[blocks >> 4]
    nan = scales == SCALE_NAN
    factor = np.ldexp(np.float32(1.0), np.where(nan, 0, scales.astype(np.int32) - SCALE_BIAS)).astype(np.float32)
    factor[nan] = np.nan
    out *= factor[..., None]
    values = out.reshape(*lead, rows, groups * GROUP)
    return np.swapaxes(values, -1, -2).astype(dtype, copy=False)


ROW_SCALE = ".scale"


def row_weights(tensors: dict) -> dict[str, str]:
    """`<stem>.weight` stored as int8 with a `<stem>.scale` beside it (DeepSeek-V4's fp4 experts) -> the scale's
    name. `tensors` maps names to infos with a `dtype`."""
    out = {}
    for name, info in tensors.items():
        scale = name.removesuffix(".weight") + ROW_SCALE
        if name.endswith(".weight") and np.dtype(info.dtype) == np.int8 and scale in tensors:
            out[name] = scale
    return out


def row_shape(name: str, packed: tuple[tuple[int, ...], np.dtype], scales: tuple[tuple[int, ...], np.dtype]
              ) -> tuple[int, int]:
    """The (out, in) a row-wise fp4 weight stands for, after checking its pair (else a SourceError)."""
    (pshape, _), (sshape, sdtype) = packed, scales
    scale = name.removesuffix(".weight") + ROW_SCALE
    if np.dtype(sdtype) not in (np.dtype(ml_dtypes.float8_e8m0fnu), np.dtype(np.uint8)):
        raise SourceError(f"fp4 scales {scale} must be float8_e8m0fnu (or uint8), found {np.dtype(sdtype)}")
    if len(pshape) != 2 or len(sshape) != 2 or pshape[0] != sshape[0] or pshape[1] != sshape[1] * BYTES_PER_GROUP:
        raise SourceError(f"fp4 weight {name} {tuple(pshape)} / {scale} {tuple(sshape)}: expected (out, in/2) int8 "
                          f"and (out, in/{GROUP}) scales")
    return pshape[0], pshape[1] * 2


def dequantize_rows(packed: np.ndarray, scales: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """packed (out, in/2) int8 and scales (out, in/32) e8m0 -> (out, in) in `dtype` (through `dequantize`)."""
    rows, groups = scales.shape
    blocks = packed.view(np.uint8).reshape(rows, groups, BYTES_PER_GROUP)
    values = dequantize(blocks, scales.view(np.uint8), np.float32)     # (in, out), a transposed view
    return np.ascontiguousarray(values.T).astype(dtype, copy=False)
