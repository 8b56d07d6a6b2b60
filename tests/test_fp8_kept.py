"""`--dtype fp8`: block-scaled e4m3 weights kept fp8 with their scales, in MaxText 0.2.5's -fp8 tree and convention.

The mechanism (plan, reader, writer, reverse) is family-free; these tests run it on the tiny Qwen3-Next model with
an fp8 tree given to the family here (MaxText 0.2.5's qwen3.5 `unquantized_modules`), on a source built the way the
Qwen fp8 releases store it: e4m3 weights and a float32 `weight_scale_inv` per block (8x8 here, so the tiny dims
divide), `quantization_config` {quant_method: fp8, weight_block_size}. Expectations are written with explicit
index math and MaxText's own dequantization rule (`dequantize_weight`: each scale axis spans `w / s` elements).
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf
from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families import qwen3_next
from ckpt_cli.families.base import Fp8Tree
from tests.conftest import read_config
from tests.expectations import assert_bits_equal, flatten
from tests.families.test_deepseek import quantize_fp8
from tests.families.test_qwen3_next import expected_tree
from tests.test_convert_to_maxtext import load_hf, restore

BLOCK = 8
UNQUANTIZED = frozenset({"token_embedder", "logits_dense", "gate", "shared_expert_gate", "conv1d", "in_proj_ba",
                         "A_log", "dt_bias", "norm"})   # qwen3.5-*-fp8.yml, MaxText 0.2.5
# the HF weights those leave quantized: every projection but in_proj_ba, the router and the shared-expert gate
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "out_proj", "gate_proj", "up_proj", "down_proj")
QCFG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK],
        "modules_to_not_convert": ["lm_head", "model.embed_tokens", "mlp.gate", "shared_expert_gate", "in_proj_ba"]}


@pytest.fixture
def fp8_tree(monkeypatch):
    monkeypatch.setitem(qwen3_next.FAMILY.extra, "fp8_tree", Fp8Tree(UNQUANTIZED))


@pytest.fixture(scope="module")
def fp8_source(hf_models, tmp_path_factory):
    """(folder, the fp8 tensors as stored, their dequantization in float32): scales in a shard of their own."""
    src = hf_models("qwen3-next", "float32")
    folder = tmp_path_factory.mktemp("qwen3-next-fp8")
    stored, scales, dequantized = {}, {}, {}
    for name, w in load_hf(src).items():
        if w.ndim == 2 and name.split(".")[-2] in QUANTIZED:
            q, s = quantize_fp8(w, BLOCK)
            stored[name], scales[name + "_scale_inv"] = q, s
            dequantized[name] = reference_dequantize(q, s)
        else:
            stored[name] = w.astype(ml_dtypes.bfloat16)
            dequantized[name] = stored[name].astype(np.float32)
    save_file(stored, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(scales, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in stored} | {
        k: "model-00002-of-00002.safetensors" for k in scales}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(read_config(src) | {"quantization_config": QCFG}))
    return folder, stored | scales, dequantized


def reference_dequantize(q: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """HF's block fp8: w[i, j] = q[i, j] * scale_inv[i // B, j // B], in float32."""
    rows, cols = np.arange(q.shape[0]) // BLOCK, np.arange(q.shape[1]) // BLOCK
    return q.astype(np.float32) * scale_inv.astype(np.float32)[rows][:, cols]


def maxtext_dequantize(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """MaxText 0.2.5's `dequantize_weight` for a block scale of the kernel's rank: axis a of the scale spans
    w.shape[a] // scale.shape[a] elements, and the value is w * scale (float32 here)."""
    assert w.ndim == scale.ndim and all(d % s == 0 for d, s in zip(w.shape, scale.shape, strict=True))
    out = w.astype(np.float32)
    for axis, (d, s) in enumerate(zip(w.shape, scale.shape, strict=True)):
        scale = np.repeat(scale, d // s, axis=axis)
    return out * scale.astype(np.float32)


def load_hf_any(folder) -> dict[str, np.ndarray]:
    """Every tensor of an HF folder as numpy, fp8 included (through torch: safetensors' numpy loader has no fp8)."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, t in load_file(f).items():
            if t.dtype == torch.float8_e4m3fn:
                out[name] = t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
            elif t.dtype == torch.bfloat16:
                out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                out[name] = t.numpy()
    return out


def codes(x: np.ndarray) -> np.ndarray:
    """fp8 bytes as float32 numbers 0..255, so that the expected tree's index math moves them exactly."""
    return x.view(np.uint8).astype(np.float32)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
def test_kept_tree_is_maxtexts_fp8_tree_element_wise(fp8_tree, fp8_source, tmp_path, scan):
    """Kept leaves are the source's fp8 bytes, moved as the bf16 kernels are; each `<leaf>_scale` holds the source's
    scale_inv, laid out so that MaxText's dequantization gives the HF dequantization in MaxText's layout; every other
    leaf is bf16."""
    folder, stored, dequantized = fp8_source
    cfg = read_config(folder)
    hf_to_maxtext(str(folder), tmp_path / "mt", ToMaxTextOptions(scan_layers=scan, dtype="fp8"))
    got = flatten(restore(tmp_path / "mt")["params"]["params"])
    as_codes = {n: codes(x) if x.dtype == ml_dtypes.float8_e4m3fn else x.astype(np.float32)
                for n, x in stored.items() if not n.endswith("_scale_inv")}
    want_codes = expected_tree(as_codes, cfg, scan)
    want_values = expected_tree(dequantized, cfg, scan)
    kept = {p for p in got if p + "_scale" in got}
    assert set(got) == set(want_values) | {p + "_scale" for p in kept}
    assert kept and all(p.endswith(("kernel", "wi_0", "wi_1", "wo")) for p in kept)
    assert not {p for p in kept if set(p.split("/")) & UNQUANTIZED}
    for path, x in want_values.items():
        if path in kept:
            assert got[path].dtype == ml_dtypes.float8_e4m3fn, path
            assert np.array_equal(got[path].view(np.uint8), want_codes[path].astype(np.uint8)), path
            scale = got[path + "_scale"]
            assert scale.dtype == np.float32, path
            assert np.array_equal(maxtext_dequantize(got[path], scale), x), path
        else:
            assert got[path].dtype == ml_dtypes.bfloat16, path
            assert_bits_equal(got[path], x.astype(ml_dtypes.bfloat16), path)
    if scan:   # (E, N, 2D) in blocks: (64/8, 4 heads kept whole, 32/8); experts (X, cycles, 3, E/8, M/8)
        assert got["decoder/layers/global_layer/attention/attention/query/kernel_scale"].shape == (8, 2, 4, 4)
        assert got["decoder/layers/local_layers/mlp/routed_experts/wi_0_scale"].shape == (4, 2, 3, 8, 4)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
def test_round_trip_writes_the_fp8_source_back_byte_for_byte(fp8_tree, fp8_source, tmp_path, scan):
    folder, stored, _ = fp8_source
    hf_to_maxtext(str(folder), tmp_path / "mt", ToMaxTextOptions(scan_layers=scan, dtype="fp8"))
    result = maxtext_to_hf(str(tmp_path / "mt"), tmp_path / "hf", ToHFOptions())
    back = load_hf_any(tmp_path / "hf")
    assert sorted(back) == sorted(stored)
    for name, x in stored.items():
        assert back[name].dtype == x.dtype, name
        assert back[name].tobytes() == x.tobytes(), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["quantization_config"] == QCFG
    assert not any("quantization_config" in n for n in result.notes)


def test_bf16_scales_are_kept_bf16_and_written_back(fp8_tree, fp8_source, tmp_path):
    """A release with bfloat16 scales (as MaxText 0.2.5's converter notes for some): stored as the source holds them
    (0.2.5's to_maxtext keeps a companion scale's precision), and written back bit for bit."""
    folder, stored, _ = fp8_source
    src = tmp_path / "bf16-scales"
    src.mkdir()
    for f in folder.iterdir():
        (src / f.name).symlink_to(f)
    (src / "model-00002-of-00002.safetensors").unlink()
    scales = {n: x.astype(ml_dtypes.bfloat16) for n, x in stored.items() if n.endswith("_scale_inv")}
    save_file(scales, str(src / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(dtype="fp8"))
    got = flatten(restore(tmp_path / "mt")["params"]["params"])
    assert {x.dtype for p, x in got.items() if p.endswith("_scale")} == {np.dtype(ml_dtypes.bfloat16)}
    maxtext_to_hf(str(tmp_path / "mt"), tmp_path / "hf", ToHFOptions())
    back = load_hf_any(tmp_path / "hf")
    for name, x in scales.items():
        assert back[name].dtype == x.dtype and back[name].tobytes() == x.tobytes(), name


def test_no_fp8_tree_is_refused_in_one_line(fp8_source, tmp_path):
    """Without the family's fp8 tree (Qwen3-Next has none in MaxText 0.2.5) --dtype fp8 is refused."""
    folder, _, _ = fp8_source
    with pytest.raises(UnsupportedError, match="no fp8 tree for qwen3_next"):
        hf_to_maxtext(str(folder), tmp_path / "mt", ToMaxTextOptions(dtype="fp8"))
    assert not (tmp_path / "mt").exists()


def test_a_source_that_is_not_fp8_is_refused(fp8_tree, hf_models, tmp_path):
    with pytest.raises(UnsupportedError, match="no quantization_config with quant_method fp8"):
        hf_to_maxtext(str(hf_models("qwen3-next", "bfloat16")), tmp_path / "mt", ToMaxTextOptions(dtype="fp8"))


def test_a_weight_the_tree_keeps_bf16_but_the_source_holds_fp8_is_refused(fp8_source, tmp_path, monkeypatch):
    folder, _, _ = fp8_source
    monkeypatch.setitem(qwen3_next.FAMILY.extra, "fp8_tree", Fp8Tree(UNQUANTIZED | {"shared_expert"}))
    with pytest.raises(UnsupportedError, match=r"shared_expert\.gate_proj\.weight is fp8 in the source"):
        hf_to_maxtext(str(folder), tmp_path / "mt", ToMaxTextOptions(dtype="fp8"))
