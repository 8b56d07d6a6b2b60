"""Dtype names across safetensors, numpy/ml_dtypes, zarr and the command line."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ckpt_cli.errors import CkptError, SourceError

# safetensors header dtype -> numpy dtype
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
}
SAFETENSORS_NAMES: dict[np.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)

# user-facing output dtype names -> numpy dtype ("fp8": block-scaled e4m3 weights kept fp8 with their scales, the
# other leaves bf16, as MaxText 0.2.5's -fp8 model names store them)
OUTPUT_DTYPES: dict[str, np.dtype] = {"bf16": BF16, "f32": np.dtype(np.float32), "fp8": FP8}


def numpy_dtype_of_safetensors(name: str, tensor: str) -> np.dtype:
    """The numpy dtype of a safetensors header dtype string, or a SourceError naming the tensor."""
    try:
        return SAFETENSORS_DTYPES[name]
    except KeyError:
        raise SourceError(f"tensor {tensor}: unsupported safetensors dtype {name}") from None


def output_dtype(name: str) -> np.dtype:
    """'bf16' | 'f32' | 'fp8' (also 'bfloat16' | 'float32' | 'float8_e4m3fn') -> numpy dtype."""
    key = {"bfloat16": "bf16", "float32": "f32", "float8_e4m3fn": "fp8"}.get(name, name)
    if key not in OUTPUT_DTYPES:
        raise CkptError(f"unknown dtype {name!r}: choose bf16, f32 or fp8")
    return OUTPUT_DTYPES[key]


def dtype_name(dtype: np.dtype) -> str:
    """numpy dtype -> the name zarr/tensorstore and Orbax use ('bfloat16', 'float32', ...)."""
    return np.dtype(dtype).name


def is_float(dtype: np.dtype) -> bool:
    """True for every floating dtype including bfloat16 and float8."""
    d = np.dtype(dtype)
    return d.kind == "f" or d in (np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn),
                                  np.dtype(ml_dtypes.float8_e5m2))
