"""Mixtral specifics: refused configs (one-line errors, nothing written), the reference models, the released
per-expert names, architecture resolution on the way back.

The element-wise tree, round trip, Appendix A shapes and verify-logits of the tiny mixtral model are in
tests/test_convert_to_maxtext.py, tests/test_convert_to_hf.py, tests/test_golden_shapes.py and tests/verify/.
"""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from ckpt_cli import registry
from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.errors import ConfigMismatchError, UnsupportedError
from ckpt_cli.families import detect_family
from tests.cli_helpers import error_line, run, with_config

REFUSED = [
    ({"sliding_window": 4096}, "config.json sets sliding_window 4096: MaxText's mixtral attends over the whole "
                               "context (no sliding window)"),
    ({"attention_bias": True}, "config.json sets attention_bias/mlp_bias: MaxText's mixtral has no biases"),
    ({"tie_word_embeddings": True}, "config.json ties embeddings: MaxText's mixtral always has an untied"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "config.json rope scaling 'yarn': MaxText's mixtral "
                                                             "uses plain RoPE"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}, "rope scaling 'linear'"),
    ({"hidden_act": "gelu"}, "config.json hidden_act 'gelu': MaxText's mixtral experts are SwiGLU (silu)"),
    ({"num_experts_per_tok": 9}, "config.json has num_experts_per_tok 9 with 8 experts"),
    ({"head_dim": 127}, "head_dim 127 is odd"),
]


@pytest.mark.parametrize("changes,message", REFUSED)
def test_refused_configs(changes, message):
    cfg = registry.reference_config("mixtral-8x7b") | changes
    family = detect_family(cfg)
    assert family.name == "mixtral"
    with pytest.raises(UnsupportedError) as exc:
        family.check_config(cfg)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_accepted_configs_have_no_notes():
    """The reference configs pass; a window as long as the context cannot slide (it is the whole context)."""
    for name in ("mixtral-8x7b", "mixtral-8x22b"):
        cfg = registry.reference_config(name)
        family = detect_family(cfg)
        assert family.check_config(cfg) == []
        assert family.check_config(cfg | {"sliding_window": cfg["max_position_embeddings"]}) == []
        assert family.check_config(cfg | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}) == []


@pytest.mark.parametrize("direction", ["hf-to-maxtext", "maxtext-to-hf"])
def test_sliding_window_is_one_line_error_and_nothing_written(hf_models, tmp_path, direction):
    src = with_config(hf_models("mixtral"), tmp_path / "src", sliding_window=64)
    out = tmp_path / "out"
    if direction == "hf-to-maxtext":
        r = run("convert", "hf-to-maxtext", src, "--out", out)
    else:   # a checkpoint converted from a good config, then exported with --hf-config pointing at a bad one
        mt = tmp_path / "mt"
        hf_to_maxtext(str(hf_models("mixtral")), mt, ToMaxTextOptions())
        r = run("convert", "maxtext-to-hf", mt, "--out", out, "--hf-config", src)
    assert r.exit_code == 2, r.output
    assert error_line(r) == ("error: config.json sets sliding_window 64: MaxText's mixtral attends over the whole "
                             "context (no sliding window)")
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_reference_models():
    """§2 (HF_IDS): the Instruct repos; §11.1: the hyperparameters."""
    for name, repo in (("mixtral-8x7b", "mistralai/Mixtral-8x7B-Instruct-v0.1"),
                       ("mixtral-8x22b", "mistralai/Mixtral-8x22B-Instruct-v0.1")):
        spec = registry.lookup(name)
        assert (spec.repo_id, spec.family) == (repo, "mixtral")
        assert detect_family(spec.config).name == "mixtral"
    small, big = registry.reference_config("mixtral-8x7b"), registry.reference_config("mixtral-8x22b")
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "num_hidden_layers",
            "num_local_experts", "num_experts_per_tok", "vocab_size", "rms_norm_eps", "rope_theta")
    assert [small[k] for k in keys] == [4096, 32, 8, 14336, 32, 8, 2, 32000, 1e-5, 1e6]
    assert [big[k] for k in keys] == [6144, 48, 8, 16384, 56, 8, 2, 32768, 1e-5, 1e6]


def test_released_configs_without_head_dim_match_the_registry():
    """The hub's config.json files have no head_dim (hidden_size / heads = 128 is meant)."""
    spec = registry.lookup("mixtral-8x7b")
    released = {k: v for k, v in spec.config.items() if k != "head_dim"}
    family = detect_family(released)
    assert family.dims(released)["D"] == 128
    registry.check_against(spec, released, family.reference_keys)
    with pytest.raises(ConfigMismatchError, match="num_local_experts = 4, but mixtral-8x7b has 8"):
        registry.check_against(spec, released | {"num_local_experts": 4}, family.reference_keys)


def test_tiny_model_files_use_the_released_per_expert_names(hf_models):
    """transformers 5 holds the experts fused (mlp.experts.gate_up_proj) but writes the hub repos' names."""
    src = hf_models("mixtral")
    with safe_open(str(src / "model.safetensors"), "np") as f:
        names = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert not any(".mlp." in n or "gate_up_proj" in n for n in names)


def test_inspect_and_plan_by_model_name():
    from ckpt_cli import inspect as I

    assert I.matching_models(registry.reference_config("mixtral-8x7b")) == ["mixtral-8x7b"]
    assert I.matching_models(registry.reference_config("mixtral-8x22b")) == ["mixtral-8x22b"]
    r = run("inspect", "--model", "mixtral-8x7b", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    shapes = {t["path"]: tuple(t["shape"]) for t in data["tensors"]}
    assert shapes["decoder/layers/MoeBlock_0/wi_0"] == (8, 32, 4096, 14336)
    assert data["totals"]["parameters"] == 46_702_792_704
    r = run("plan", "hf-to-maxtext", "--model", "mixtral-8x22b", "--no-scan", "--read-gbps", "1",
            "--write-gbps", "0.5", "--json")
    assert r.exit_code in (0, 1), r.output
    plan = json.loads(r.stdout)
    assert plan["family"] == "mixtral" and plan["scan_layers"] is False
    assert plan["bytes"]["download"] == plan["bytes"]["written"] == 2 * plan["parameters"]


def test_maxtext_to_hf_resolves_mixtral_architecture(hf_models, tmp_path):
    """The carried config is a mixtral one: --model of another family is refused, of this family is checked."""
    mt = tmp_path / "mt"
    hf_to_maxtext(str(hf_models("mixtral", "bfloat16")), mt, ToMaxTextOptions(scan_layers=False))
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "a", "--model", "qwen3-30b-a3b")
    assert r.exit_code == 2
    assert "qwen3-30b-a3b is a qwen3_moe model, but the carried config describes a mixtral model" in error_line(r)
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "b", "--model", "mixtral-8x7b")
    assert r.exit_code == 2 and "hidden_size = 64, but mixtral-8x7b has 4096" in error_line(r)
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "c", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["family"] == "mixtral" and data["scan_layers"] is False
    assert json.loads((tmp_path / "c" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    with safe_open(str(tmp_path / "c" / "model.safetensors"), "np") as f:
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in set(f.keys())
