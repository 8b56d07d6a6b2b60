"""`--dtype fp8`: block-scaled e4m3 weights kept fp8 with their scales, in MaxText 0.2.5's -fp8 tree and convention.

The mechanism (plan, reader, writer, reverse) is family-free; these tests run it on the tiny Qwen3-Next model with
an fp8 tree given to the family here (MaxText 0.2.5's qwen3.5 `unquantized_modules`), on a source built the way the
Qwen fp8 releases store it: e4m3 weights and a float32 `weight_scale_inv` per block (8x8 here, so the tiny dims
divide), `quantization_config` {quant_method: fp8, weight_block_size}. Expectations are written with explicit
index math and MaxText's own dequantization rule (`dequantize_weight`: each scale axis spans `w / s` elements).
"""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf, store_dtype
from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families import qwen3_next
from ckpt_cli.families.base import Fp8Tree
from tests.cli_helpers import error_line, run, with_config
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


def reference_dequantize(q: np.ndarray, scale_inv: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """HF's block fp8: w[i, j] = q[i, j] * scale_inv[i // B, j // B], in float32."""
    rows, cols = np.arange(q.shape[0]) // block, np.arange(q.shape[1]) // block
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


def test_fp8_through_transformers_is_refused(fp8_tree, fp8_source, tmp_path):
    folder, _, _ = fp8_source
    with pytest.raises(UnsupportedError, match="--load-method transformers cannot keep them"):
        hf_to_maxtext(str(folder), tmp_path / "mt", ToMaxTextOptions(dtype="fp8", load_method="transformers"))


def test_a_source_that_is_not_fp8_is_refused(fp8_tree, hf_models, tmp_path):
    with pytest.raises(UnsupportedError, match="no quantization_config with quant_method fp8"):
        hf_to_maxtext(str(hf_models("qwen3-next", "bfloat16")), tmp_path / "mt", ToMaxTextOptions(dtype="fp8"))


def test_a_weight_the_tree_keeps_bf16_but_the_source_holds_fp8_is_refused(fp8_source, tmp_path, monkeypatch):
    folder, _, _ = fp8_source
    monkeypatch.setitem(qwen3_next.FAMILY.extra, "fp8_tree", Fp8Tree(UNQUANTIZED | {"shared_expert"}))
    with pytest.raises(UnsupportedError, match=r"shared_expert\.gate_proj\.weight is fp8 in the source"):
        hf_to_maxtext(str(folder), tmp_path / "mt", ToMaxTextOptions(dtype="fp8"))


# ------------------------------------------------------------------------------------- Qwen3.5 (the -fp8 names)

# the release's quantized weights: the DeltaNet's in_proj_qkv / in_proj_z / out_proj, attention q/k/v/o, experts
QWEN35_QUANTIZED = ("in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                    "up_proj", "down_proj")
TEXT = "model.language_model."
QWEN35_BLOCK = 8     # divides every per-head width (a key head's values: 2 heads of 12); 4 query heads < 8 stay whole
QWEN35_QCFG = QCFG | {"weight_block_size": [QWEN35_BLOCK, QWEN35_BLOCK]}


def _save_release(folder, tensors: dict, scales: dict, cfg: dict) -> None:
    save_file(tensors, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(scales, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in tensors} | {
        k: "model-00002-of-00002.safetensors" for k in scales}
    total = sum(x.nbytes for x in (tensors | scales).values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def qwen35_fp8(tmp_path_factory):
    """A tiny Qwen3.5 MoE fp8 release, laid out as Qwen/Qwen3.5-35B-A3B-FP8 is: the multimodal model (qwen3_5_moe,
    `model.language_model.*`, a one-block vision tower kept bf16, tests/families/test_qwen3_5.py's "mm"), the
    language model's projections e4m3 with float32 `weight_scale_inv` (8x8 blocks) in another shard,
    quantization_config at the top, and an fp8 MTP tensor that is not converted.

    Returns ({"fp8": the release, "dequantized": the same model with each fp8 weight replaced by its float32
    dequantization, "codes": ... by its byte codes as float32 numbers}, the release's language-model tensors)."""
    from tests.families.test_qwen3_5 import make_model

    base = tmp_path_factory.mktemp("qwen35-f32")
    make_model("mm").save_pretrained(base)
    cfg = read_config(base)
    stored, scales, dequantized, as_codes = {}, {}, {}, {}
    for name, w in load_hf(base).items():
        if w.ndim == 2 and name.startswith(TEXT) and name.split(".")[-2] in QWEN35_QUANTIZED:
            q, s = quantize_fp8(w, QWEN35_BLOCK)
            stored[name], scales[name + "_scale_inv"] = q, s
            dequantized[name], as_codes[name] = reference_dequantize(q, s, QWEN35_BLOCK), codes(q)
        else:
            stored[name] = w.astype(ml_dtypes.bfloat16)
            dequantized[name] = as_codes[name] = stored[name].astype(np.float32)
    assert sum(x.dtype == ml_dtypes.float8_e4m3fn for x in stored.values()) > 100
    mtp = {"mtp.fc.weight": np.ones((64, 128), np.float32).astype(ml_dtypes.float8_e4m3fn)}
    folders = {}
    for kind, tensors, sc, qcfg in (
            ("fp8", stored | mtp, scales | {"mtp.fc.weight_scale_inv": np.ones((8, 16), np.float32)},
             {"quantization_config": QWEN35_QCFG}),
            ("dequantized", dequantized, {}, {}), ("codes", as_codes, {}, {})):
        folders[kind] = tmp_path_factory.mktemp(f"qwen35-{kind}")
        _save_release(folders[kind], tensors, sc, cfg | qcfg)
    language = {n: x for n, x in (stored | scales).items() if not n.startswith("model.visual.")}
    return folders, language


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
def test_qwen35_fp8_release_keeps_maxtexts_fp8_tree(qwen35_fp8, tmp_path, scan):
    """The kept tree of a Qwen3.5 fp8 release: each fp8 leaf holds the source bytes moved exactly as the f32
    conversion moves them (the byte codes converted as numbers), MaxText's dequantization of leaf and `_scale` equals
    the f32 conversion of the reference dequantization, every other leaf is bf16 and equals it; the joined
    in_proj_qkvz's scale interleaves q, k, v, z blocks per key head."""
    folders, _ = qwen35_fp8
    r = hf_to_maxtext(str(folders["fp8"]), tmp_path / "fp8", ToMaxTextOptions(scan_layers=scan, dtype="fp8"))
    assert any("model.visual" in n for n in r.notes)
    hf_to_maxtext(str(folders["dequantized"]), tmp_path / "ref", ToMaxTextOptions(scan_layers=scan, dtype="f32"))
    hf_to_maxtext(str(folders["codes"]), tmp_path / "codes", ToMaxTextOptions(scan_layers=scan, dtype="f32"))
    got = flatten(restore(tmp_path / "fp8")["params"]["params"])
    ref = flatten(restore(tmp_path / "ref")["params"]["params"])
    want_codes = flatten(restore(tmp_path / "codes")["params"]["params"])
    kept = {p for p in got if p + "_scale" in got}
    assert set(got) == set(ref) | {p + "_scale" for p in kept}
    leaves = {re.sub(r"^decoder/layers(/layer_\d+|_\d+)/", "", p) for p in kept}
    assert leaves == {"attention/in_proj_qkvz/kernel", "attention/out_proj/kernel", "mlp/routed_experts/wi_0",
                      "mlp/routed_experts/wi_1", "mlp/routed_experts/wo", "mlp/shared_expert/wi_0/kernel",
                      "mlp/shared_expert/wi_1/kernel", "mlp/shared_expert/wo/kernel",
                      "attention/attention/query/kernel", "attention/attention/key/kernel",
                      "attention/attention/value/kernel", "attention/attention/out/kernel"}
    for path, x in ref.items():
        if path in kept:
            assert got[path].dtype == ml_dtypes.float8_e4m3fn, path
            assert np.array_equal(got[path].view(np.uint8), np.asarray(want_codes[path]).astype(np.uint8)), path
            assert got[path + "_scale"].dtype == np.float32, path
            assert np.array_equal(maxtext_dequantize(got[path], got[path + "_scale"]), x), path
        else:
            assert got[path].dtype == ml_dtypes.bfloat16, path
            assert_bits_equal(got[path], np.asarray(x).astype(ml_dtypes.bfloat16), path)
    if scan:   # 0.2.5's shapes: E/8 blocks, per key head [q 1, k 1, v 3, z 3] blocks -> 16; 4 query heads kept whole
        assert got["decoder/layers/layer_0/attention/in_proj_qkvz/kernel_scale"].shape == (8, 2, 16)
        assert got["decoder/layers/layer_3/attention/attention/query/kernel_scale"].shape == (8, 2, 4, 4)
        assert got["decoder/layers/layer_1/mlp/routed_experts/wo_scale"].shape == (4, 2, 4, 8)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
def test_qwen35_fp8_round_trip_is_byte_identical(qwen35_fp8, tmp_path, scan):
    """maxtext-to-hf of the kept checkpoint writes the language model's fp8 weights and weight_scale_inv (and the bf16
    rest) byte for byte, under the text model's names, with the source's quantization_config."""
    folders, stored = qwen35_fp8
    hf_to_maxtext(str(folders["fp8"]), tmp_path / "mt", ToMaxTextOptions(scan_layers=scan, dtype="fp8"))
    maxtext_to_hf(str(tmp_path / "mt"), tmp_path / "hf", ToHFOptions())
    back = load_hf_any(tmp_path / "hf")
    want = {("model." + n.removeprefix(TEXT)) if n.startswith(TEXT) else n: x for n, x in stored.items()}
    assert sorted(back) == sorted(want)
    for name, x in want.items():
        assert back[name].dtype == x.dtype and back[name].tobytes() == x.tobytes(), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["quantization_config"] == QWEN35_QCFG
    assert config["architectures"] == ["Qwen3_5MoeForCausalLM"]


def test_qwen35_fp8_dequantizes_in_one_pass_like_the_reference(qwen35_fp8, tmp_path):
    """--dtype f32 from the fp8 release: the DeepSeek on-the-fly dequantization, equal to the test's reference."""
    folders, _ = qwen35_fp8
    hf_to_maxtext(str(folders["fp8"]), tmp_path / "fp8", ToMaxTextOptions(dtype="f32"))
    hf_to_maxtext(str(folders["dequantized"]), tmp_path / "ref", ToMaxTextOptions(dtype="f32"))
    got = flatten(restore(tmp_path / "fp8")["params"]["params"])
    ref = flatten(restore(tmp_path / "ref")["params"]["params"])
    assert set(got) == set(ref)
    for path, x in ref.items():
        assert_bits_equal(got[path], x, path)


def test_cli_refuses_fp8_for_a_model_with_no_fp8_tree_in_one_line(hf_models, tmp_path):
    r = run("convert", "hf-to-maxtext", hf_models("qwen3", "bfloat16"), "--out", tmp_path / "mt", "--dtype", "fp8")
    assert r.exit_code == 2
    line = error_line(r)
    assert "--dtype fp8: MaxText 0.2.5 has no fp8 tree for qwen3 models" in line
    assert "qwen3.5-35b-a3b-fp8, qwen3.5-397b-a17b-fp8" in line
    assert not (tmp_path / "mt").exists()


def test_a_fp8_model_name_keeps_fp8_when_no_dtype_is_given():
    """`--model qwen3.5-35b-a3b-fp8` (or that name as SOURCE) means MaxText's fp8 tree; --dtype still decides."""
    assert store_dtype(ToMaxTextOptions(dtype=None), "qwen3.5-35b-a3b-fp8") == "fp8"
    assert store_dtype(ToMaxTextOptions(dtype=None), "qwen3.5-35b-a3b") == "bf16"
    assert store_dtype(ToMaxTextOptions(dtype=None), None) == "bf16"
    assert store_dtype(ToMaxTextOptions(dtype="bf16"), "qwen3.5-397b-a17b-fp8") == "bf16"


def test_plan_prices_the_kept_tree_as_written(qwen35_fp8, tmp_path):
    """`plan --dtype fp8` prices one byte an fp8 element plus the scales' own bytes: what the conversion writes."""
    folders, _ = qwen35_fp8
    plan = run("plan", "hf-to-maxtext", folders["fp8"], "--dtype", "fp8", "--json")
    assert plan.exit_code == 0, plan.output
    record = json.loads(plan.stdout)
    hf_to_maxtext(str(folders["fp8"]), tmp_path / "mt", ToMaxTextOptions(dtype="fp8"))
    got = flatten(restore(tmp_path / "mt")["params"]["params"])
    assert record["dtype"] == "float8_e4m3fn"
    assert record["bytes"]["written"] == sum(x.nbytes for x in got.values())
    assert sum(x.nbytes for x in got.values() if x.dtype == ml_dtypes.float8_e4m3fn) == sum(
        x.size for x in got.values() if x.dtype == ml_dtypes.float8_e4m3fn)


def test_maxtext_to_hf_of_a_kept_checkpoint_refuses_a_dequantizing_dtype(fp8_tree, fp8_source, tmp_path):
    folder, _, _ = fp8_source
    hf_to_maxtext(str(folder), tmp_path / "mt", ToMaxTextOptions(dtype="fp8"))
    r = run("convert", "maxtext-to-hf", tmp_path / "mt", "--out", tmp_path / "hf", "--dtype", "bf16")
    assert r.exit_code == 2 and "keeps fp8 weights with block scales" in error_line(r)
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------------ verify-logits


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
def test_verify_logits_dequantizes_kept_fp8_per_layer(fp8_tree, fp8_source, tmp_path, monkeypatch, scan):
    """The forward reads an fp8-kept checkpoint one layer at a time, dequantizing each weight with its scale as
    MaxText does: its f32 logits equal transformers' on the dequantized model (KL < 1e-6); with the scales left
    out, the same check fails (scanned)."""
    from ckpt_cli.verify import params as verify_params
    from tests.verify.test_verify_logits import assert_fails, verify_json

    folder, stored, dequantized = fp8_source
    reference = tmp_path / "dequantized"
    reference.mkdir()
    save_file(dict(dequantized), str(reference / "model.safetensors"), metadata={"format": "pt"})
    cfg = read_config(folder)
    cfg.pop("quantization_config")
    (reference / "config.json").write_text(json.dumps(cfg | {"torch_dtype": "float32"}))
    hf_to_maxtext(str(folder), tmp_path / "mt", ToMaxTextOptions(scan_layers=scan, dtype="fp8"))
    data = verify_json("--maxtext", str(tmp_path / "mt"), "--hf", str(reference), "--max-kl", "1e-6")
    assert data["passed"] and data["summary"]["kl_max"] < 1e-6
    if scan:
        monkeypatch.setattr(verify_params, "dequantize", lambda w, scale: w.astype(np.float32))
        assert_fails(tmp_path / "mt", reference)


def test_qwen35_verify_logits_of_the_kept_release(qwen35_fp8, tmp_path):
    """verify-logits on the kept fp8 Qwen3.5 checkpoint (the Qwen3.5 forward, weights dequantized per layer) matches
    transformers on the dequantized release at f32 KL < 1e-6."""
    from tests.verify.test_verify_logits import verify_json

    folders, _ = qwen35_fp8
    hf_to_maxtext(str(folders["fp8"]), tmp_path / "mt", ToMaxTextOptions(dtype="fp8"))
    data = verify_json("--maxtext", str(tmp_path / "mt"), "--hf", str(folders["dequantized"]), "--max-kl", "1e-6")
    assert data["passed"] and data["family"] == "qwen3_5" and data["summary"]["kl_max"] < 1e-6


def test_blocks_that_do_not_map_to_maxtexts_scale_layout_are_refused(qwen35_fp8, tmp_path):
    """4x4 blocks: the 4 query heads are not shorter than a block, so MaxText's scale would cut the head axis
    (4 // 4) where HF's blocks run across heads: refused in one line, before anything is written."""
    folders, _ = qwen35_fp8
    src = with_config(folders["fp8"], tmp_path / "src", quantization_config=QCFG | {"weight_block_size": [4, 4]})
    r = run("convert", "hf-to-maxtext", src, "--out", tmp_path / "mt", "--dtype", "fp8")
    assert r.exit_code == 2
    assert "the 4x4 blocks of model.layers.{layer}.self_attn.q_proj.weight (128, 64) do not map" in error_line(r)
    assert not (tmp_path / "mt").exists()


def test_kept_fp8_restores_from_every_storage_layout(fp8_tree, fp8_source, tmp_path):
    """zarr v2 without OCDBT too (MaxText's checkpoint_storage_use_zarr3/ocdbt false): the same fp8 bytes."""
    from ckpt_cli.io.orbax import StorageOptions

    folder, _, _ = fp8_source
    hf_to_maxtext(str(folder), tmp_path / "a", ToMaxTextOptions(dtype="fp8"))
    hf_to_maxtext(str(folder), tmp_path / "b", ToMaxTextOptions(
        dtype="fp8", storage=StorageOptions(use_ocdbt=False, use_zarr3=False)))
    a, b = (flatten(restore(tmp_path / x)["params"]["params"]) for x in "ab")
    assert set(a) == set(b) and any(x.dtype == ml_dtypes.float8_e4m3fn for x in b.values())
    for path, x in a.items():
        assert b[path].dtype == x.dtype and b[path].tobytes() == x.tobytes(), path


def test_a_permutation_within_heads_is_not_a_move_of_blocks(monkeypatch):
    """Llama 3.1's key is RoPE-interleaved inside each head: a permutation of elements, not of whole blocks, so its
    block scales have no MaxText layout; the (rescaled) query cannot stay fp8 at all. Both refused, from the plan."""
    import transformers as tf

    from ckpt_cli.families import llama3
    from ckpt_cli.plan import build_to_maxtext
    from tests.conftest import LLAMA_ROPE, TINY

    cfg = tf.LlamaConfig(**TINY, rope_scaling=dict(LLAMA_ROPE), tie_word_embeddings=False).to_dict()
    cfg["quantization_config"] = QCFG
    family = llama3.FAMILY
    monkeypatch.setitem(family.extra, "fp8_tree", Fp8Tree(frozenset({"token_embedder", "logits_dense", "query"})))
    with pytest.raises(UnsupportedError, match=r"blocks of model\.layers\.\{layer\}\.self_attn\.k_proj\.weight"):
        build_to_maxtext(family, cfg, True, np.dtype(ml_dtypes.float8_e4m3fn))
    monkeypatch.setitem(family.extra, "fp8_tree", Fp8Tree(frozenset({"token_embedder", "logits_dense"})))
    with pytest.raises(UnsupportedError, match="query/kernel is transpose > rope-interleave > scale"):
        build_to_maxtext(family, cfg, True, np.dtype(ml_dtypes.float8_e4m3fn))
