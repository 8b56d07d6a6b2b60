"""OLMo 3: the Orbax tree element by element against expectations written from MaxText 0.2.5's facts, exact round
trips (scanned and unscanned, bf16 and f32), refused configs as one-line errors, notes, the reference models,
`--model` checks, `inspect --model` and `plan --model` with no data.

MaxText 0.2.5's facts (models/olmo3.py, layers/attentions.py, layers/normalizations.py, checkpoint_conversion/
utils/param_mapping.py): post-norm layers (`post_self_attention_layer_norm`, `post_mlp_layer_norm`, no input
norm), the attention module named `attention`, q/k norm scales over the whole projection (GlobalRMSNorm: N*D and
K*D), kernels transposed with heads split, no RoPE permutation, no query scale folded in, untied head; scanned,
`decoder/layers/layers_<b>` stacks HF layers 4s + b on axis 1 (inhomogeneous_layer_cycle_interval 4).
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from ckpt_cli import registry
from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf
from ckpt_cli.errors import ConfigMismatchError, UnsupportedError
from ckpt_cli.families import detect_family, olmo3
from tests.cli_helpers import error_line, run, with_config
from tests.conftest import read_config
from tests.expectations import assert_bits_equal, flatten
from tests.test_convert_to_maxtext import load_hf, restore

SRC_DTYPE = {"bf16": "bfloat16", "f32": "float32"}


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def expected_olmo3_layer(hf: dict, cfg: dict, i: int) -> dict[str, np.ndarray]:
    """HF layer i as MaxText's olmo3 leaves (float32), element by element:
    kernel[e, h, d] = proj[h*D + d, e] (q, k, v); out[h, d, e] = o_proj[e, h*D + d]; mlp kernels transposed;
    the five norm scales copied (q/k norms whole: N*D and K*D values)."""
    E, N, K, D = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    p = f"model.layers.{i}."
    out = {}
    for leaf, name, heads in (("query", "q_proj", N), ("key", "k_proj", K), ("value", "v_proj", K)):
        w = _f32(hf[p + f"self_attn.{name}.weight"])
        kernel = np.empty((E, heads, D), np.float32)
        for h in range(heads):
            for d in range(D):
                kernel[:, h, d] = w[h * D + d, :]
        out[f"attention/{leaf}/kernel"] = kernel
    o = _f32(hf[p + "self_attn.o_proj.weight"])
    out["attention/out/kernel"] = np.stack([np.stack([o[:, h * D + d] for d in range(D)]) for h in range(N)])
    out["attention/query_norm/scale"] = _f32(hf[p + "self_attn.q_norm.weight"])
    out["attention/key_norm/scale"] = _f32(hf[p + "self_attn.k_norm.weight"])
    out["post_self_attention_layer_norm/scale"] = _f32(hf[p + "post_attention_layernorm.weight"])
    out["post_mlp_layer_norm/scale"] = _f32(hf[p + "post_feedforward_layernorm.weight"])
    for leaf, name in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
        out[f"mlp/{leaf}/kernel"] = np.ascontiguousarray(_f32(hf[p + f"mlp.{name}.weight"]).T)
    return out


def expected_olmo3_tree(hf: dict, cfg: dict, scan: bool) -> dict[str, np.ndarray]:
    L = cfg["num_hidden_layers"]
    tree = {"token_embedder/embedding": _f32(hf["model.embed_tokens.weight"]),
            "decoder/decoder_norm/scale": _f32(hf["model.norm.weight"]),
            "decoder/logits_dense/kernel": np.ascontiguousarray(_f32(hf["lm_head.weight"]).T)}
    layers = [expected_olmo3_layer(hf, cfg, i) for i in range(L)]
    for leaf in layers[0]:
        if scan:
            for b in range(4):
                tree[f"decoder/layers/layers_{b}/{leaf}"] = np.stack([layers[4 * s + b][leaf] for s in range(L // 4)],
                                                                      axis=1)
        else:
            for i in range(L):
                tree[f"decoder/layers_{i}/{leaf}"] = layers[i][leaf]
    return tree


def cast(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.astype(ml_dtypes.bfloat16 if dtype == "bf16" else np.float32)


# ------------------------------------------------------------------------------------------------------------
# HF -> MaxText, element by element; HF -> MaxText -> HF, bit for bit

CASES = [("float32", True, "f32"), ("float32", False, "bf16"), ("bfloat16", True, "bf16"), ("bfloat16", False, "f32")]


@pytest.mark.parametrize("src_dtype,scan,dtype", CASES)
def test_converted_tree_matches_maxtext_facts(hf_models, tmp_path, src_dtype, scan, dtype):
    src = hf_models("olmo3", src_dtype, sharded=not scan)
    out = tmp_path / "mt"
    result = hf_to_maxtext(str(src), out, ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    assert result.plan.family == "olmo3" and result.plan.scan_layers is scan
    got = flatten(restore(out)["params"]["params"])
    want = expected_olmo3_tree(load_hf(src), read_config(src), scan)
    assert set(got) == set(want)
    for path, expected in want.items():
        assert_bits_equal(got[path], cast(expected, dtype), path)
    if scan:   # scan index 1 of block 2 is HF layer 6, a sliding layer; block 3 holds the global layers 3 and 7
        assert got["decoder/layers/layers_2/attention/query_norm/scale"].shape == (64, 2)
        assert got["decoder/layers/layers_3/mlp/wo/kernel"].shape == (128, 2, 64)
    meta = json.loads((out / "0" / "_CHECKPOINT_METADATA").read_text())
    assert meta["custom_metadata"]["scan_layers"] is scan and meta["custom_metadata"]["ckpt"]["family"] == "olmo3"


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_round_trip_is_bit_exact(hf_models, tmp_path, scan, dtype):
    """Every OLMo 3 row is a copy or a transpose: HF -> MaxText -> HF gives every tensor back bit for bit."""
    src = hf_models("olmo3", SRC_DTYPE[dtype])
    mt = tmp_path / "mt"
    hf_to_maxtext(str(src), mt, ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    out = tmp_path / "hf"
    result = maxtext_to_hf(str(mt), out, ToHFOptions(dtype=dtype))
    assert result.plan.scan_layers is scan
    want, got = load_hf(src), load_hf(out)
    assert sorted(got) == sorted(want)
    for name, x in want.items():
        assert_bits_equal(got[name], x, name)
    config = read_config(out)
    assert config["architectures"] == ["Olmo3ForCausalLM"] and config["model_type"] == "olmo3"
    assert config["layer_types"] == read_config(src)["layer_types"]


def test_round_trip_loads_in_transformers_with_the_same_logits(hf_models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src = hf_models("olmo3", "float32")
    mt = tmp_path / "mt"
    hf_to_maxtext(str(src), mt, ToMaxTextOptions(scan_layers=True, dtype="f32"))
    maxtext_to_hf(str(mt), tmp_path / "hf", ToHFOptions())
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    logits = []
    for folder in (src, tmp_path / "hf"):
        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            logits.append(model(tokens).logits)
    assert torch.equal(logits[0], logits[1])


# ------------------------------------------------------------------------------------------------------------
# Refusals, notes, reference models

REFUSED = [
    ({"attention_bias": True}, "config.json sets attention_bias: MaxText's olmo3 has no q/k/v/o biases"),
    ({"tie_word_embeddings": True}, "config.json ties the embeddings: MaxText's olmo3 has an untied logits_dense"),
    ({"hidden_act": "gelu"}, "config.json hidden_act 'gelu': MaxText's olmo3 MLP is SwiGLU (silu)"),
    ({"layer_types": ["sliding_attention"] * 31 + ["full_attention"]},
     "config.json makes layer 3 sliding_attention: MaxText's olmo3 makes layer i global exactly when i mod 4 == 3"),
    ({"layer_types": ["full_attention"] * 4}, "config.json has 4 layer_types for 32 layers"),
    ({"sliding_window": None}, "config.json has sliding_attention layers but no sliding_window"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     "config.json asks for linear RoPE on full_attention layers: MaxText's olmo3 has default and yarn RoPE only"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
     "config.json asks for llama3 RoPE on sliding_attention layers"),
]


@pytest.mark.parametrize("changes,message", REFUSED)
def test_refused_configs(changes, message):
    cfg = registry.reference_config("olmo3-7b") | changes
    family = detect_family(cfg)
    assert family.name == "olmo3"
    with pytest.raises(UnsupportedError) as exc:
        family.check_config(cfg)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_scanned_layer_count_must_be_whole_cycles():
    cfg = registry.reference_config("olmo3-7b") | {"num_hidden_layers": 30}
    cfg["layer_types"] = cfg["layer_types"][:30]
    family = detect_family(cfg)
    assert len(family.blocks(family.dims(cfg), cfg, False, frozenset())) == 30     # unscanned: any count
    with pytest.raises(UnsupportedError, match="30 layers: scanned, MaxText's olmo3 stacks whole cycles of 4"):
        family.blocks(family.dims(cfg), cfg, True, frozenset())


@pytest.mark.parametrize("direction", ["hf-to-maxtext", "maxtext-to-hf"])
def test_refusal_is_one_line_error_and_nothing_written(hf_models, tmp_path, direction):
    src = with_config(hf_models("olmo3"), tmp_path / "src", attention_bias=True)
    out = tmp_path / "out"
    if direction == "hf-to-maxtext":
        r = run("convert", "hf-to-maxtext", src, "--out", out)
    else:   # a checkpoint converted from a good config, exported with --hf-config naming a bad one
        mt = tmp_path / "mt"
        hf_to_maxtext(str(hf_models("olmo3")), mt, ToMaxTextOptions())
        r = run("convert", "maxtext-to-hf", mt, "--out", out, "--hf-config", src)
    assert r.exit_code == 2, r.output
    assert error_line(r) == "error: config.json sets attention_bias: MaxText's olmo3 has no q/k/v/o biases"
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_scanned_odd_layer_count_is_one_line_error(hf_models, tmp_path):
    cfg = read_config(hf_models("olmo3"))
    src = with_config(hf_models("olmo3"), tmp_path / "src", num_hidden_layers=6, layer_types=cfg["layer_types"][:6])
    # --allow-unused: the 6-layer config over 8 layers of files reaches the family's own check
    r = run("convert", "hf-to-maxtext", src, "--out", tmp_path / "mt", "--allow-unused")
    assert r.exit_code == 2, r.output
    assert "has 6 layers: scanned, MaxText's olmo3 stacks whole cycles of 4" in error_line(r)
    assert not (tmp_path / "mt").exists()


def test_notes():
    """olmo3-7b's Hub config (YaRN in rope_scaling: the full-attention layers' only, as transformers 5 reads it)
    gets the note that MaxText runs YaRN on every layer; olmo3-7b-pt (plain RoPE) and YaRN given for both layer
    types get none; a sliding window other than MaxText's 4096 and a foreign YaRN attention factor are noted."""
    family = detect_family(registry.reference_config("olmo3-7b"))
    notes = family.check_config(registry.reference_config("olmo3-7b"))
    assert len(notes) == 1 and "MaxText's olmo3 applies one RoPE to every layer: the full-attention layers' yarn" in \
        notes[0] and "sliding-window layers too, where this config (and transformers >= 5) has default" in notes[0]
    assert family.check_config(registry.reference_config("olmo3-7b-pt")) == []
    yarn = registry.reference_config("olmo3-32b")["rope_scaling"] | {"rope_theta": 5e5}
    both = registry.reference_config("olmo3-32b") | {"rope_scaling": None,
                                                     "rope_parameters": {"full_attention": yarn,
                                                                         "sliding_attention": dict(yarn)}}
    assert family.check_config(both) == []
    odd = both | {"sliding_window": 128, "rope_parameters": {k: yarn | {"attention_factor": 1.0} for k in
                                                             ("full_attention", "sliding_attention")}}
    notes = family.check_config(odd)
    assert len(notes) == 2 and "sliding_window 128" in notes[1] and "attention_factor 1.0" in notes[0]


def test_rope_reads_both_spellings():
    legacy = registry.reference_config("olmo3-7b")
    rope = olmo3.rope(legacy)
    assert rope["sliding_attention"] == {"rope_theta": 500000.0, "rope_type": "default"}
    assert rope["full_attention"]["rope_type"] == "yarn" and rope["full_attention"]["factor"] == 8.0
    flat = {k: v for k, v in legacy.items() if k not in ("rope_scaling", "rope_theta")}
    flat["rope_parameters"] = {"rope_type": "yarn", "factor": 8.0, "rope_theta": 5e5}
    assert olmo3.rope(flat)["sliding_attention"] == olmo3.rope(flat)["full_attention"]


def test_reference_models():
    """MaxText 0.2.5: HF_IDS (utils/globals.py), hf_model_configs.py, configs/models/olmo3-*.yml."""
    for name, repo in (("olmo3-7b", "allenai/Olmo-3-7B-Instruct"), ("olmo3-7b-pt", "allenai/Olmo-3-1025-7B"),
                       ("olmo3-32b", "allenai/Olmo-3-32B-Think")):
        spec = registry.lookup(name)
        assert (spec.repo_id, spec.family) == (repo, "olmo3")
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
            "num_hidden_layers", "vocab_size", "rms_norm_eps", "rope_theta", "sliding_window")
    seven, pt, big = (registry.reference_config(n) for n in ("olmo3-7b", "olmo3-7b-pt", "olmo3-32b"))
    assert [seven[k] for k in keys] == [pt[k] for k in keys] == [4096, 32, 32, 128, 11008, 32, 100278, 1e-6, 5e5, 4096]
    assert [big[k] for k in keys] == [5120, 40, 8, 128, 27648, 64, 100278, 1e-6, 5e5, 4096]
    assert seven["rope_scaling"]["factor"] == big["rope_scaling"]["factor"] == 8.0 and pt["rope_scaling"] is None
    assert olmo3.layer_types(big)[:8] == ["sliding_attention"] * 3 + ["full_attention"] + \
        ["sliding_attention"] * 3 + ["full_attention"]
    released = {k: v for k, v in seven.items() if k != "head_dim"}    # the Hub's configs have no head_dim
    registry.check_against(registry.lookup("olmo3-7b"), released, olmo3.FAMILY.reference_keys)
    with pytest.raises(ConfigMismatchError, match="num_key_value_heads = 32, but olmo3-32b has 8"):
        registry.check_against(registry.lookup("olmo3-32b"), big | {"num_key_value_heads": 32},
                               olmo3.FAMILY.reference_keys)


def test_model_flag_mismatches_are_one_line_errors(hf_models, tmp_path):
    src = hf_models("olmo3", "bfloat16")
    r = run("convert", "hf-to-maxtext", src, "--model", "olmo3-7b", "--out", tmp_path / "a")
    assert r.exit_code == 2 and "hidden_size = 64, but olmo3-7b has 4096" in error_line(r)
    mt = tmp_path / "mt"
    hf_to_maxtext(str(src), mt, ToMaxTextOptions(scan_layers=False))
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "b", "--model", "qwen3-8b")
    assert r.exit_code == 2
    assert "qwen3-8b is a qwen3 model, but the carried config describes a olmo3 model" in error_line(r)
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "c", "--model", "olmo3-32b")
    assert r.exit_code == 2 and "hidden_size = 64, but olmo3-32b has 5120" in error_line(r)
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "d", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["family"] == "olmo3" and data["scan_layers"] is False


def test_inspect_and_plan_by_model_name():
    from ckpt_cli import inspect as I

    assert I.matching_models(registry.reference_config("olmo3-32b")) == ["olmo3-32b"]
    assert I.matching_models(registry.reference_config("olmo3-7b-pt")) == ["olmo3-7b", "olmo3-7b-pt"]
    r = run("inspect", "--model", "olmo3-32b", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    shapes = {t["path"]: tuple(t["shape"]) for t in data["tensors"]}
    assert shapes["decoder/layers/layers_3/attention/key_norm/scale"] == (1024, 16)
    assert shapes["decoder/layers/layers_0/attention/query/kernel"] == (5120, 16, 40, 128)
    E, F, L, V = 5120, 27648, 64, 100278
    per_layer = E * 40 * 128 * 2 + E * 8 * 128 * 2 + 40 * 128 + 8 * 128 + 3 * E * F + 2 * E
    assert data["totals"]["parameters"] == L * per_layer + 2 * V * E + E
    r = run("plan", "hf-to-maxtext", "--model", "olmo3-7b", "--no-scan", "--read-gbps", "1", "--write-gbps", "0.5",
            "--json")
    assert r.exit_code in (0, 1), r.output
    plan = json.loads(r.stdout)
    assert plan["family"] == "olmo3" and plan["scan_layers"] is False
    assert plan["bytes"]["download"] == plan["bytes"]["written"] == 2 * plan["parameters"]
