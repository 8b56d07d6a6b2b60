"""Int4 weights in compressed-tensors' `pack-quantized` format, as the int4 Kimi K2 releases
(moonshotai/Kimi-K2-Thinking) store their routed experts.

A weight `<p>.weight (out, in)` is not in the files under its own name but as three tensors:

* `<p>.weight_packed (out, in/8) int32`: eight 4-bit fields a word along `in`, field k (element 8w + k) in bits
  4k..4k+3, the first element in the least-significant bits; each field holds q + 8 (offset binary), q in [-8, 7];
* `<p>.weight_scale (out, in/g)` (bf16, f16 or f32): one scale per group of `g` consecutive elements along `in`
  (`group_size`, 32 in Kimi's releases);
* `<p>.weight_shape (2,)` integers: (out, in) before packing.

Symmetric quantization, no zero point: `W[i, j] = q[i, j] * scale[i, j // g]`, computed in float32 (exact for bf16 and
f16 scales: a 4-bit integer times an 11-bit significand) and then cast. Which tensors are quantized is the files'
business (compressed-tensors' `ignore` list keeps attention, shared experts, dense MLPs and the head plain), so a
weight stored under its own name is read as it is. The scheme comes from config.json's `quantization_config`
(`quant_method` "compressed-tensors", `format` "pack-quantized", weights `num_bits` 4, `type` "int", `symmetric`,
`strategy` "group"); anything else is refused in one line.
"""

from __future__ import annotations

import numpy as np

from ckpt_cli.errors import SourceError, UnsupportedError

PACKED, SCALE, SHAPE = "_packed", "_scale", "_shape"
BITS = 4
PER_WORD = 32 // BITS        # values in one int32 word
OFFSET = 1 << (BITS - 1)     # stored field = q + 8
SCALE_DTYPES = ("bfloat16", "float16", "float32")


def group_size(qcfg: dict | None) -> int | None:
    """The group size of a compressed-tensors int4 `quantization_config`; None when the config declares no
    compressed-tensors quantization; an UnsupportedError naming the first unsupported setting otherwise."""
    if not qcfg or qcfg.get("quant_method") != "compressed-tensors":
        return None
    fmt = qcfg.get("format")
    groups = qcfg.get("config_groups") or {}
    if not groups:
        raise UnsupportedError("compressed-tensors quantization_config has no config_groups")
    sizes = set()
    for name, group in groups.items():
        weights = group.get("weights") or {}
        group_fmt = group.get("format") or fmt
        if group_fmt != "pack-quantized":
            raise UnsupportedError(f"compressed-tensors format {group_fmt!r} is not supported (only int4 "
                                   "'pack-quantized' with group-wise scales)")
        if group.get("input_activations") or group.get("output_activations"):
            raise UnsupportedError(f"compressed-tensors {name}: quantized activations are not supported "
                                   "(weight-only int4 is)")
        wanted = {"num_bits": BITS, "type": "int", "symmetric": True, "strategy": "group"}
        for key, want in wanted.items():
            if weights.get(key) != want:
                raise UnsupportedError(f"compressed-tensors {name}: weights {key} = {weights.get(key)!r} is not "
                                       f"supported (int4 pack-quantized needs {want!r})")
        size = weights.get("group_size")
        if not isinstance(size, int) or size <= 0 or size % PER_WORD:
            raise UnsupportedError(f"compressed-tensors {name}: group_size {size!r} is not a positive multiple of "
                                   f"{PER_WORD}")
        sizes.add(size)
    if len(sizes) != 1:
        raise UnsupportedError(f"compressed-tensors config groups with different group sizes {sorted(sizes)}")
    return sizes.pop()


def parts(name: str) -> tuple[str, str, str]:
    """The stored tensors of a logical weight `<p>.weight`: (packed, scale, shape)."""
    return name + PACKED, name + SCALE, name + SHAPE


def logical_names(names) -> dict[str, tuple[str, str, str]]:
    """Logical weight -> (packed, scale, shape) for every `*.weight_packed` whose logical name is not stored."""
    present = set(names)
    return {n.removesuffix(PACKED): parts(n.removesuffix(PACKED)) for n in present
            if n.endswith(".weight" + PACKED) and n.removesuffix(PACKED) not in present}


def logical_shape(name: str, packed: tuple[tuple[int, ...], np.dtype],
                  scale: tuple[tuple[int, ...], np.dtype] | None, group: int | None) -> tuple[int, int]:
    """The (out, in) shape the packed weight stands for, after checking its tensors agree (else a SourceError)."""
    p, s, _ = parts(name)
    if group is None:
        raise SourceError(f"tensor {p} is int4-packed, but config.json declares no compressed-tensors "
                          "quantization_config")
    if scale is None:
        raise SourceError(f"tensor {p} (int4) has no {s}: the group scales are missing")
    (pshape, pdtype), (sshape, sdtype) = packed, scale
    if np.dtype(pdtype) != np.int32 or np.dtype(sdtype).name not in SCALE_DTYPES:
        raise SourceError(f"int4 tensors {p} / {s} must be int32 / one of {', '.join(SCALE_DTYPES)}, found "
                          f"{np.dtype(pdtype).name} / {np.dtype(sdtype).name}")
    if len(pshape) != 2 or tuple(sshape) != (pshape[0], pshape[1] * PER_WORD // group):
        raise SourceError(f"int4 tensors {p} {tuple(pshape)} / {s} {tuple(sshape)}: expected packed (out, in/"
                          f"{PER_WORD}) and scales (out, in/{group})")
    return pshape[0], pshape[1] * PER_WORD


def check_shape(name: str, stored: np.ndarray, planned: tuple[int, int]) -> None:
    """`<p>.weight_shape` must be the shape planned from the headers (a padded last word is not supported)."""
    if tuple(int(v) for v in np.asarray(stored).reshape(-1)) != tuple(planned):
        raise SourceError(f"tensor {name + SHAPE} says {tuple(int(v) for v in np.asarray(stored).reshape(-1))}, "
                          f"but {name + PACKED} holds {tuple(planned)} (padded int4 rows are not supported)")


def unpack(packed: np.ndarray) -> np.ndarray:
    """int32 (..., W) -> int8 (..., 8W): field k of word w is element 8w + k, less the offset 8."""
    words = np.ascontiguousarray(packed).view(np.uint32)
    out = np.empty((*words.shape, PER_WORD), np.int8)
    for k in range(PER_WORD):
        out[..., k] = ((words >> np.uint32(BITS * k)) & np.uint32(0xF)).astype(np.int8)
    out -= OFFSET
    return out.reshape(*words.shape[:-1], words.shape[-1] * PER_WORD)


def dequantize(packed: np.ndarray, scale: np.ndarray, group: int, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """packed (out, in/8) int32 and scale (out, in/g) -> (out, in) in `dtype`, through float32."""
    q = unpack(packed)
    rows, cols = q.shape
    if scale.shape != (rows, cols // group):
        raise SourceError(f"int4 packed {packed.shape} and scales {scale.shape} do not match (group {group})")
    values = q.reshape(rows, cols // group, group).astype(np.float32)
    values *= scale.astype(np.float32)[..., None]
    return values.reshape(rows, cols).astype(dtype, copy=False)
