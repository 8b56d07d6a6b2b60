"""DeepSeek-V4's quantized release read directly: fp8 e4m3 weights with one float8_e8m0fnu `<stem>.scale` per block
and fp4 experts (`<stem>.weight` int8, two E2M1 values a byte, low nibble first, `<stem>.scale` e8m0 per 32 values),
written here with torch/safetensors exactly as the release stores them. The conversion must equal converting the
same model dequantized by a reference written from the formats' spec (OCP MX: E2M1 codes, E8M0 = 2^(byte - 127)).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ckpt_cli.families import deepseek4
from tests.cli_helpers import run
from tests.expectations import assert_bits_equal, flatten
from tests.families.test_deepseek4 import tiny_model
from tests.test_convert_to_maxtext import load_hf, restore

BLOCK = 16      # weight_block_size of the fixture: several blocks per tensor, ragged edges included
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def e8m0(exponent: np.ndarray):
    """float8_e8m0fnu tensor holding 2^exponent (the byte is exponent + 127)."""
    import torch

    return torch.from_numpy((exponent + 127).astype(np.uint8)).view(torch.float8_e8m0fnu)


def fp8_quantize(w: np.ndarray, rng) -> tuple:
    """e4m3 values and power-of-two block scales (ue8m0), as the release's fp8 weights; plus the reference value
    of each element, q * 2^e from the spec."""
    import torch

    rows, cols = w.shape
    br, bc = -(-rows // BLOCK), -(-cols // BLOCK)
    exponent = rng.integers(-9, -5, size=(br, bc))
    scale = np.ldexp(1.0, exponent).astype(np.float32)[np.arange(rows) // BLOCK][:, np.arange(cols) // BLOCK]
    q = torch.from_numpy(w / scale).to(torch.float8_e4m3fn)
    return q, e8m0(exponent), q.float().numpy() * scale


def fp4_pack(shape: tuple[int, int], rng) -> tuple:
    """Random E2M1 codes packed two a byte (element 2k in the low nibble), e8m0 scales per 32, and the reference."""
    import torch

    rows, cols = shape
    codes = rng.integers(0, 16, size=(rows, cols)).astype(np.uint8)
    exponent = rng.integers(-8, -3, size=(rows, cols // 32))
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    value = np.array(E2M1, np.float32)[codes] * np.repeat(np.ldexp(1.0, exponent), 32, axis=1).astype(np.float32)
    return torch.from_numpy(packed.view(np.int8)), e8m0(exponent), value


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, Path]:
    """The tiny model (experts 32 wide, so every fp4 row holds whole groups of 32) as the quantized release stores
    it, and the same model dequantized by the reference, unquantized, under the same names."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ds4q")
    model = tiny_model(seed=5, moe_intermediate_size=32)
    saved = root / "saved"
    model.save_pretrained(saved)
    cfg = json.loads((saved / "config.json").read_text())
    state = load_hf(saved)
    plain = {n: state[deepseek4.saved_by_transformers(n)] for n in release_names(cfg)}
    rng = np.random.default_rng(0)
    stored, reference = {}, {}
    for name, w in plain.items():
        stem = name.removesuffix(".weight")
        if deepseek4.FP4_RELEASED.fullmatch(name):
            stored[name], stored[stem + ".scale"], reference[name] = fp4_pack(w.shape, rng)
        elif deepseek4.FP8_RELEASED.fullmatch(name):
            stored[name], stored[stem + ".scale"], reference[name] = fp8_quantize(w, rng)
        else:
            stored[name], reference[name] = torch.from_numpy(np.array(w)), w
    qcfg = cfg | {"expert_dtype": "fp4", "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK]}}
    out = {}
    for kind, tensors, config in (("release", stored, qcfg), ("reference", reference, cfg)):
        folder = root / kind
        folder.mkdir()
        save_file({n: t if isinstance(t, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(t))
                   for n, t in tensors.items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config))
        out[kind] = folder
    return out


def release_names(cfg: dict) -> list[str]:
    from ckpt_cli.families import detect_family
    from ckpt_cli.plan import build_to_hf

    return [t.target for t in build_to_hf(detect_family(cfg), cfg, True, np.dtype(np.float32)).tensors]


def test_fixture_is_stored_as_the_release_stores_it(quantized):
    from safetensors import safe_open

    with safe_open(quantized["release"] / "model.safetensors", "pt") as f:
        import torch

        assert f.get_slice("layers.3.ffn.experts.1.w2.weight").get_dtype() == "I8"
        assert f.get_tensor("layers.3.ffn.experts.1.w2.weight").shape == (32, 16)       # (out, in/2)
        assert f.get_tensor("layers.3.ffn.experts.1.w2.scale").dtype == torch.float8_e8m0fnu
        assert f.get_tensor("layers.3.ffn.experts.1.w2.scale").shape == (32, 1)
        assert f.get_tensor("layers.2.attn.wq_b.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("layers.2.attn.wq_b.scale").shape == (8, 1)                 # (128/16, 16/16)
        assert f.get_tensor("layers.2.attn.compressor.wkv.weight").dtype == torch.float32


@pytest.mark.parametrize("scan,dtype", [(True, "f32"), (False, "f32"), (True, "bf16")])
def test_quantized_release_converts_as_its_reference_dequantization(quantized, tmp_path, scan, dtype):
    trees = {}
    for kind in ("release", "reference"):
        result = run("convert", "hf-to-maxtext", quantized[kind], "--out", tmp_path / kind, "--dtype", dtype,
                     "--scan" if scan else "--no-scan")
        assert result.exit_code == 0, result.stderr
        trees[kind] = flatten(restore(tmp_path / kind)["params"])
    assert set(trees["release"]) == set(trees["reference"])
    for k, want in trees["reference"].items():
        assert_bits_equal(np.asarray(trees["release"][k]), np.asarray(want), k)


def test_nibble_order_matters(quantized, tmp_path):
    """The check can fail: the release's expert read with the nibbles swapped is not what the conversion gives."""
    assert run("convert", "hf-to-maxtext", quantized["release"], "--out", tmp_path / "mt", "--no-scan", "--dtype",
               "f32", "-q").exit_code == 0
    tree = flatten(restore(tmp_path / "mt")["params"]["params"])
    got = tree["decoder/layers_3/mlp/MoeBlock_0/wo"][1].T          # (E, M) as HF stores w2
    import torch
    from safetensors.torch import load_file

    raw = load_file(quantized["release"] / "model.safetensors")
    packed = raw["layers.3.ffn.experts.1.w2.weight"].view(torch.uint8).numpy()
    swapped = np.empty((packed.shape[0], packed.shape[1] * 2), np.float32)
    swapped[:, 0::2], swapped[:, 1::2] = np.array(E2M1)[packed >> 4], np.array(E2M1)[packed & 15]
    exponent = raw["layers.3.ffn.experts.1.w2.scale"].view(torch.uint8).numpy().astype(int) - 127
    scale = np.repeat(np.ldexp(1.0, exponent), 32, 1)
    assert not np.array_equal(got, swapped * scale)
    want = load_hf(quantized["reference"])["layers.3.ffn.experts.1.w2.weight"]
    np.testing.assert_array_equal(got, want)


def test_inspect_reads_the_packed_shapes(quantized):
    result = run("inspect", quantized["release"], "--against", quantized["reference"], "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["identical"] and report["counts"]["matched"] == 220 and report["unmapped"] == []


def test_plan_prices_the_packed_bytes(quantized):
    """A local quantized release is read as stored: its packed experts and fp8 weights with their scales (the three
    parts of each hyper-connection tensor read it whole: the only bytes read twice)."""
    result = run("plan", "hf-to-maxtext", quantized["release"], "--json", "--read-gbps", "1", "--write-gbps", "0.5",
                 "--dtype", "f32")
    assert result.exit_code in (0, 1), result.stderr
    figures = json.loads(result.stdout)
    stored = (quantized["release"] / "model.safetensors").stat().st_size
    assert figures["bytes"]["source"] == stored
    reference = json.loads(run("plan", "hf-to-maxtext", quantized["reference"], "--json", "--read-gbps", "1",
                               "--write-gbps", "0.5", "--dtype", "f32").stdout)
    assert figures["bytes"]["written"] == reference["bytes"]["written"]
    assert figures["bytes"]["read"] < 0.7 * reference["bytes"]["read"]
