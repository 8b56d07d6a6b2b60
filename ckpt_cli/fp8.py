"""fp8 weights kept fp8 (`--dtype fp8`): the checks and dtypes that need the source's or checkpoint's headers.

The plan (plan.py, `fp8_layout`) decides from the config alone which MaxText leaves are float8_e4m3fn with a block
scale beside them (the family's `Fp8Tree`, as MaxText 0.2.5's `-fp8` model names have them). Here, once the files
are open: each kept weight must be e4m3 with its `weight_scale_inv`, no weight the tree keeps bf16 may be fp8, and
each scale is stored in the dtype its source holds (MaxText 0.2.5's to_maxtext keeps a companion scale's own
precision; float32 in the planned tree), so that maxtext-to-hf writes back the very same bytes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ckpt_cli.dtypes import FP8
from ckpt_cli.errors import ShapeMismatchError, UnsupportedError
from ckpt_cli.plan import ConversionPlan

SCALE_DTYPES = ("float32", "bfloat16", "float16")     # the block-scale dtypes fp8 releases use


def _scale_dtype_ok(dtype: np.dtype) -> bool:
    return np.dtype(dtype).name in SCALE_DTYPES


def is_fp8(plan: ConversionPlan) -> bool:
    """Whether the plan keeps fp8 weights (`--dtype fp8`)."""
    return np.dtype(plan.dtype) == FP8


def match_source(plan: ConversionPlan, reader) -> ConversionPlan:
    """An HF -> MaxText fp8 plan checked against the source's headers, with each scale leaf in its source's dtype.

    Refuses (one line naming the tensor) a kept weight that is not float8_e4m3fn or has no scale, a scale of
    another dtype than float32/bfloat16/float16, and an fp8 weight where MaxText's fp8 tree keeps bf16 (it would
    have to be dequantized, and could not be written back as it was)."""
    if not is_fp8(plan):
        return plan
    tensors = []
    for t in plan.tensors:
        if t.quant == "scale":
            dtypes = {np.dtype(reader.describe(task.source.name)[1]) for task in t.tasks}
            bad = [d for d in dtypes if not _scale_dtype_ok(d)]
            if bad or len(dtypes) != 1:
                raise ShapeMismatchError(f"tensor {t.tasks[0].source.name}: expected one float32, bfloat16 or float16 "
                                         f"block scale dtype, found {', '.join(sorted(d.name for d in dtypes))}")
            t = dataclasses.replace(t, dtype=dtypes.pop())
        for task in t.tasks:
            name = task.source.name
            scale = getattr(reader, "scale_name", lambda n: None)(name) if t.quant != "scale" else None
            if t.quant == "fp8":
                dtype = np.dtype(reader.describe(name)[1])
                if dtype != FP8:
                    raise ShapeMismatchError(f"tensor {name}: --dtype fp8 keeps it float8_e4m3fn as MaxText's fp8 tree "
                                             f"has it ({t.target}), but the source holds {dtype.name}")
                if scale is None:
                    raise ShapeMismatchError(f"tensor {name}: float8_e4m3fn with no {name}_scale_inv")
            elif scale is not None:
                raise UnsupportedError(f"tensor {name} is fp8 in the source, but MaxText's fp8 tree keeps {t.target} "
                                       f"{np.dtype(t.dtype).name}: --dtype fp8 cannot keep it; use --dtype bf16")
        tensors.append(t)
    return dataclasses.replace(plan, tensors=tuple(tensors))


def match_checkpoint(plan: ConversionPlan, ckpt) -> ConversionPlan:
    """A MaxText -> HF plan of an fp8 checkpoint writing each `weight_scale_inv` in the dtype its leaf is stored in
    (what the source held), and each kept weight as the float8_e4m3fn it is."""
    if not is_fp8(plan):
        return plan
    tensors = []
    for t in plan.tensors:
        if t.quant:
            dtypes = {np.dtype(ckpt.describe(task.source.name)[1]) for task in t.tasks}
            weight = t.quant == "fp8"
            ok = dtypes == {FP8} if weight else len(dtypes) == 1 and _scale_dtype_ok(next(iter(dtypes)))
            if not ok:
                raise ShapeMismatchError(f"{t.tasks[0].source.name}: expected "
                                         f"{'float8_e4m3fn' if weight else 'one float block-scale dtype'}, found "
                                         f"{', '.join(sorted(d.name for d in dtypes))}")
            t = dataclasses.replace(t, dtype=dtypes.pop())
        tensors.append(t)
    return dataclasses.replace(plan, tensors=tuple(tensors))


def kept_in(ckpt) -> bool:
    """Whether a MaxText checkpoint keeps fp8 weights: a float8_e4m3fn leaf with its `<leaf>_scale` beside it."""
    paths = set(ckpt.paths)
    return any(p.endswith("_scale") and p[:-len("_scale")] in paths
               and np.dtype(ckpt.describe(p[:-len("_scale")])[1]) == FP8 for p in paths)
