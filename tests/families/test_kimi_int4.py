"""Kimi K2 int4 sources (the moonshotai/Kimi-K2-Thinking layout: compressed-tensors `pack-quantized`), made here.

A tiny Kimi K2 (a DeepSeek-V3 under model_type `kimi_k2`) has its routed experts quantized to int4 with one bf16 scale
per group of 32 and stored as the release stores them: `mlp.experts.{x}.{gate,up,down}_proj.weight_packed` (int32,
eight offset-binary 4-bit fields a word, first element in the low bits), `.weight_scale` (bf16) and `.weight_shape`
(int64), everything else plain bf16, with Kimi-K2-Thinking's quantization_config. What the conversion must give is
computed here independently from the format's description, field by field.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from ckpt_cli import pricing
from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf
from ckpt_cli.errors import UnsupportedError
from ckpt_cli.io import int4
from ckpt_cli.io.hf import SafetensorsReader
from ckpt_cli.io.safetensors import save_file
from ckpt_cli.machine import Machine, Rates
from tests.cli_helpers import error_line, run
from tests.expectations import assert_bits_equal
from tests.families.test_deepseek import as_kimi, load_hf, make_model, restore
from tests.hub_server import fake_hub  # noqa: F401 (fixture)

GROUP = 32
# Kimi-K2-Thinking's config.json quantization_config
QCFG = {
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "kv_cache_scheme": None,
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "config_groups": {"group_0": {
        "targets": ["Linear"], "input_activations": None, "output_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP,
                    "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
                    "block_structure": None}}},
}


# ------------------------------------------------------------------------------------------------------------
# The format, written from its description


def pack_spec(q: np.ndarray) -> np.ndarray:
    """int8 (rows, cols) in [-8, 7] -> int32 (rows, cols/8): element 8w + k as q + 8 in bits 4k..4k+3 of word w."""
    rows, cols = q.shape
    words = np.zeros((rows, cols // 8), np.uint64)
    for i in range(rows):
        for w in range(cols // 8):
            for k in range(8):
                words[i, w] += (int(q[i, 8 * w + k]) + 8) << (4 * k)
    return words.astype(np.uint32).view(np.int32)


def dequantize_spec(packed: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    """W[i, j] = (field j % 8 of word j // 8, less 8) * scale[i, j // group], one element at a time, in float32."""
    rows, words = packed.shape
    out = np.zeros((rows, words * 8), np.float32)
    for i in range(rows):
        for j in range(words * 8):
            word = int(packed[i, j // 8]) & 0xFFFFFFFF
            q = ((word >> (4 * (j % 8))) & 0xF) - 8
            out[i, j] = np.float32(q) * np.float32(scale[i, j // group])
    return out


def quantize(w: np.ndarray, group: int = GROUP) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 with one bf16 scale per group (max |w| / 7), as a min-max observer would."""
    rows, cols = w.shape
    scale = (np.abs(w.reshape(rows, cols // group, group)).max(-1) / 7).astype(ml_dtypes.bfloat16)
    s = np.repeat(scale.astype(np.float32), group, axis=1)
    return np.clip(np.round(w / s), -8, 7).astype(np.int8), scale


def test_unpack_and_dequantize_match_the_spec_field_by_field():
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, size=(3, 48)).astype(np.int8)
    q[0, :8] = [-8, 7, -1, 0, 1, -8, 7, 6]       # both extremes, and a top field of 7 + 8 = 15 (sign bit set)
    packed = pack_spec(q)
    assert (packed < 0).any()
    assert np.array_equal(int4.unpack(packed), q)
    for group in (8, 16, 48):
        scale = rng.standard_normal((3, 48 // group)).astype(ml_dtypes.bfloat16)
        want = dequantize_spec(packed, scale, group)
        assert_bits_equal(int4.dequantize(packed, scale, group), want, f"group {group}")
        assert_bits_equal(int4.dequantize(packed, scale, group, ml_dtypes.bfloat16), want.astype(ml_dtypes.bfloat16),
                          f"group {group} bf16")


def test_group_size_refuses_other_schemes_in_one_line():
    assert int4.group_size(QCFG) == GROUP
    assert int4.group_size(None) is None and int4.group_size({"quant_method": "fp8"}) is None
    for change, message in ((("format",), "float-quantized"), (("weights", "num_bits"), 8),
                            (("weights", "symmetric"), False), (("weights", "strategy"), "channel"),
                            (("weights", "type"), "float"), (("weights", "group_size"), 20)):
        bad = copy.deepcopy(QCFG)
        if change[0] == "format":
            bad["format"] = message
        else:
            bad["config_groups"]["group_0"]["weights"][change[1]] = message
        with pytest.raises(UnsupportedError) as exc:
            int4.group_size(bad)
        assert "\n" not in str(exc.value) and str(message) in str(exc.value)


# ------------------------------------------------------------------------------------------------------------
# A tiny release


EXPERT = "model.layers.{layer}.mlp.experts.{x}.{proj}.weight"


@pytest.fixture(scope="module")
def kimi_int4(tmp_path_factory):
    """(int4 folder, reference folder): the same tiny Kimi K2, experts int4-packed in the first and stored as their
    spec dequantization (float32) in the second."""
    root = tmp_path_factory.mktemp("kimi-int4")
    make_model("v3", "float32").save_pretrained(root / "orig")
    as_kimi(root / "orig")
    cfg = json.loads((root / "orig" / "config.json").read_text())
    hf = load_hf(root / "orig")
    packed, reference = {}, {}
    for name, w in hf.items():
        if ".mlp.experts." in name:
            q, scale = quantize(w)
            p = pack_spec(q)
            base = name                                   # ...weight -> ...weight_packed / _scale / _shape
            packed[base + "_packed"] = p
            packed[base + "_scale"] = scale
            packed[base + "_shape"] = np.array(w.shape, np.int64)
            reference[name] = dequantize_spec(p, scale, GROUP)
        else:
            packed[name] = reference[name] = w.astype(ml_dtypes.bfloat16)
    assert sum(n.endswith("_packed") for n in packed) == 2 * 4 * 3          # 2 MoE layers x 4 experts x 3
    # experts in one shard, their scales and shapes in another (as a sharded release may split them)
    src = root / "int4"
    src.mkdir()
    first = {k: v for k, v in packed.items() if not k.endswith(("_scale", "_shape"))}
    second = {k: v for k, v in packed.items() if k.endswith(("_scale", "_shape"))}
    save_file(src / "model-00001-of-00002.safetensors", first, {"format": "pt"})
    save_file(src / "model-00002-of-00002.safetensors", second, {"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first} | {
        k: "model-00002-of-00002.safetensors" for k in second}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps(cfg | {"quantization_config": QCFG}))
    ref = root / "ref"
    ref.mkdir()
    save_file(ref / "model.safetensors", reference, {"format": "pt"})
    (ref / "config.json").write_text(json.dumps(cfg))
    return src, ref


@pytest.mark.parametrize("scan,dtype", [(True, "bf16"), (False, "f32")])
def test_converted_experts_equal_the_spec_dequantization(kimi_int4, tmp_path, scan, dtype):
    src, ref = kimi_int4
    r = hf_to_maxtext(str(src), tmp_path / "int4", ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    assert any("24 int4 weight(s)" in n for n in r.notes), r.notes
    assert not any("not used" in n for n in r.notes), r.notes          # scales and shapes are consumed
    hf_to_maxtext(str(ref), tmp_path / "ref", ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    a, b = restore(tmp_path / "int4"), restore(tmp_path / "ref")
    assert set(a) == set(b)
    for path in a:
        assert_bits_equal(a[path], b[path], path)
    # and directly: expert 3 of the second MoE layer (HF layer 2), gate_proj, against the spec
    name = EXPERT.format(layer=2, x=3, proj="gate_proj")
    files = {**load_file(str(src / "model-00001-of-00002.safetensors")),
             **load_file(str(src / "model-00002-of-00002.safetensors"))}
    want = dequantize_spec(files[name + "_packed"], files[name + "_scale"], GROUP).T
    key = "DeepSeekMoeBlock_0/MoeBlock_0/wi_0"
    got = a[f"decoder/moe_layers/{key}"][3, 1] if scan else a[f"decoder/moe_layers_1/{key}"][3]
    assert_bits_equal(got, want.astype(ml_dtypes.bfloat16 if dtype == "bf16" else np.float32), name)


def test_reader_reads_one_expert_at_a_time(kimi_int4, monkeypatch):
    from ckpt_cli.plan import SourceSlice

    src, _ = kimi_int4
    reader = SafetensorsReader(src, int4_group=GROUP)
    name = EXPERT.format(layer=1, x=2, proj="down_proj")
    assert reader.describe(name) == ((64, 32), np.dtype(np.float32))
    assert reader.consumed_with(name) == [name + "_packed", name + "_scale", name + "_shape"]
    reads = []
    original = reader.files.read
    monkeypatch.setattr(reader.files, "read", lambda n, rows=None: reads.append((n, rows)) or original(n, rows))
    got = reader.read(SourceSlice(name, rows=(16, 48)))
    assert reads == [(name + "_packed", (16, 48)), (name + "_scale", (16, 48))]   # the shape: read by describe
    packed, scale = original(name + "_packed"), original(name + "_scale")
    assert_bits_equal(got, dequantize_spec(packed, scale, GROUP)[16:48], name)


def test_streamed_from_a_repo_equals_local(kimi_int4, fake_hub, tmp_path):  # noqa: F811
    """A hub repo (packed words in one shard, scales and shapes in the other, fetched as tasks need them): the
    same checkpoint as from the local folder; the weight_shape check runs as each weight is read."""
    hub, _ = fake_hub
    hub.add_repo("moonshotai/tiny-kimi-int4", kimi_int4[0])
    hf_to_maxtext(str(kimi_int4[0]), tmp_path / "local", ToMaxTextOptions())
    hf_to_maxtext("moonshotai/tiny-kimi-int4", tmp_path / "remote", ToMaxTextOptions())
    a, b = restore(tmp_path / "local"), restore(tmp_path / "remote")
    assert set(a) == set(b)
    for path in a:
        assert_bits_equal(b[path], a[path], path)


def test_maxtext_to_hf_writes_plain_weights(kimi_int4, tmp_path):
    src, ref = kimi_int4
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(dtype="f32"))
    maxtext_to_hf(str(tmp_path / "mt"), tmp_path / "hf", ToHFOptions(dtype="f32"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "kimi_k2"
    got, want = load_hf(tmp_path / "hf"), load_hf(ref)
    assert set(got) == set(want)
    for name, value in want.items():
        assert_bits_equal(got[name], value.astype(np.float32), name)


def test_inspect_shows_the_packed_weights(kimi_int4, tmp_path):
    src, _ = kimi_int4
    r = run("inspect", src, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    tensors = {t["name"]: t for t in data["tensors"]}
    name = EXPERT.format(layer=1, x=0, proj="gate_proj")
    assert tensors[name + "_packed"]["dtype"] == "int32" and tensors[name + "_packed"]["shape"] == [32, 8]
    assert tensors[name + "_scale"]["shape"] == [32, 2]
    assert any("24 int4 weight(s)" in n for n in data["notes"]), data["notes"]
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions())
    data = json.loads(run("inspect", src, "--against", tmp_path / "mt", "--json").stdout)
    assert data["unmapped"] == [] and data["counts"]["mismatched"] == 0, data


def test_plan_prices_packed_reads_and_the_float32_temporary(kimi_int4):
    src, _ = kimi_int4
    plan, source, _ = pricing.plan_hf_to_maxtext(str(src), ToMaxTextOptions())
    packed = {t.source.name for p in plan.tensors for t in p.tasks if ".mlp.experts." in t.source.name}
    assert len(packed) == 24 and packed <= source.fp8
    headers = SafetensorsReader(src).files.tensors
    want = 0
    for p in plan.tensors:
        for task in p.tasks:
            name = task.source.name
            if name in packed:      # a 32x64 expert: 8 words and 2 bf16 scales a row, read once
                want += headers[name + "_packed"].nbytes + headers[name + "_scale"].nbytes
            else:
                want += p.read_elements(task) * headers[name].dtype.itemsize
    figures = pricing.price(plan, source, Rates(1.0, 0.3, 0.5, {}), Machine(24 * 10**9, 10**13, "/", 2))
    assert figures["bytes"]["read"] == want
    jobs = sorted(((p, t) for p in plan.tensors for t in p.tasks), key=lambda j: source.order_key(j[1].source))
    for (p, task), f in zip(jobs, pricing.task_figures(plan, source), strict=True):
        if task.source.name in packed:     # an expert's float32 values and the unpacking temporaries
            assert f.running >= p.read_elements(task) * 8


# ------------------------------------------------------------------------------------------------------------
# Refusals and malformed sources: one line, exit 2, nothing written


def _copy(src: Path, dest: Path, change=None, qcfg=None) -> Path:
    shutil.copytree(src, dest)
    if change is not None:
        for f in sorted(dest.glob("*.safetensors")):
            state = load_file(f)
            change(state)
            save_file(f, state)
    if qcfg is not None:
        cfg = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps(cfg | {"quantization_config": qcfg}))
    return dest


NAME = EXPERT.format(layer=2, x=1, proj="up_proj")
ASYM = copy.deepcopy(QCFG)
ASYM["config_groups"]["group_0"]["weights"]["symmetric"] = False


@pytest.mark.parametrize("change,qcfg,message", [
    (None, QCFG | {"format": "nvfp4-pack-quantized"}, "error: compressed-tensors format 'nvfp4-pack-quantized' is "
                                                      "not supported"),
    (None, ASYM, "error: compressed-tensors group_0: weights symmetric = False is not supported"),
    (None, {"quant_method": "awq", "bits": 4}, "error: quantization 'awq' is not supported"),
    (None, {}, "_packed is int4-packed, but config.json declares no compressed-tensors quantization_config"),
    (lambda s: s.pop(NAME + "_scale", None), None, f"error: tensor {NAME}_packed (int4) has no {NAME}_scale"),
    (lambda s: s.update({NAME + "_shape": np.array([32, 60], np.int64)}) if NAME + "_shape" in s else None, None,
     f"error: tensor {NAME}_shape says (32, 60), but {NAME}_packed holds (32, 64)"),
    (lambda s: s.update({NAME + "_scale": s[NAME + "_scale"][:, :1]}) if NAME + "_scale" in s else None, None,
     f"error: int4 tensors {NAME}_packed (32, 8) / {NAME}_scale (32, 1): expected packed"),
])
def test_refusals_and_malformed_sources_are_one_line(kimi_int4, tmp_path, change, qcfg, message):
    src = _copy(kimi_int4[0], tmp_path / "src", change, qcfg)
    out = tmp_path / "mt"
    r = run("convert", "hf-to-maxtext", src, "--out", out)
    assert r.exit_code == 2, r.output
    assert message in error_line(r), error_line(r)
    assert not out.exists() and not out.with_name("mt.partial").exists()
