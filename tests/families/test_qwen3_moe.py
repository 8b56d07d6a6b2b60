"""Qwen3 MoE specifics: refused configs (one-line errors), notes, the reference models, architecture resolution.

The element-wise tree, round trip, Appendix A shapes and verify-logits of the tiny qwen3-moe model are in
tests/test_convert_to_maxtext.py, tests/test_convert_to_hf.py, tests/test_golden_shapes.py and tests/verify/.
"""

from __future__ import annotations

import json

import pytest

from ckpt_cli import registry
from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.errors import ConfigMismatchError, UnsupportedError
from ckpt_cli.families import detect_family
from tests.cli_helpers import error_line, run, with_config

REFUSED = [
    ({"mlp_only_layers": [1]}, "config.json sets mlp_only_layers [1]: MaxText's qwen3_moe has no dense MLP layers"),
    ({"decoder_sparse_step": 2}, "config.json sets decoder_sparse_step 2: MaxText's qwen3_moe makes every layer MoE"),
    ({"attention_bias": True}, "config.json sets attention_bias"),
    ({"use_sliding_window": True}, "config.json sets use_sliding_window"),
]


@pytest.mark.parametrize("changes,message", REFUSED)
def test_refused_configs(changes, message):
    cfg = registry.reference_config("qwen3-30b-a3b") | changes
    family = detect_family(cfg)
    assert family.name == "qwen3_moe"
    with pytest.raises(UnsupportedError) as exc:
        family.check_config(cfg)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_mlp_only_layers_is_one_line_error_and_nothing_written(hf_models, tmp_path):
    src = with_config(hf_models("qwen3-moe"), tmp_path / "src", mlp_only_layers=[0])
    out = tmp_path / "mt"
    r = run("convert", "hf-to-maxtext", src, "--out", out)
    assert r.exit_code == 2, r.output
    assert error_line(r) == ("error: config.json sets mlp_only_layers [0]: MaxText's qwen3_moe has no dense MLP "
                             "layers")
    assert not out.exists() and not out.with_name("mt.partial").exists()


def test_notes_for_unrenormalised_router_and_tied_head(hf_models, tmp_path):
    cfg = registry.reference_config("qwen3-30b-a3b")
    family = detect_family(cfg)
    assert family.check_config(cfg) == []
    notes = family.check_config(cfg | {"norm_topk_prob": False})
    assert len(notes) == 1 and "norm_topk_prob" in notes[0]
    assert len(family.check_config({k: v for k, v in cfg.items() if k != "norm_topk_prob"})) == 1  # HF default
    src = with_config(hf_models("qwen3-moe"), tmp_path / "src", norm_topk_prob=False)
    result = hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions())
    assert any("norm_topk_prob" in n for n in result.notes)


def test_reference_models():
    for name, repo in (("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B-Thinking-2507"),
                       ("qwen3-30b-a3b-base", "Qwen/Qwen3-30B-A3B-Base"),
                       ("qwen3-235b-a22b", "Qwen/Qwen3-235B-A22B-Thinking-2507"),
                       ("qwen3-480b-a35b", "Qwen/Qwen3-Coder-480B-A35B-Instruct")):
        spec = registry.lookup(name)
        assert (spec.repo_id, spec.family) == (repo, "qwen3_moe")
        assert detect_family(spec.config).name == "qwen3_moe"
    # §8.1: rope θ differs between the Thinking-2507 and Base 30B-A3B; 480B has 160 experts and 8 kv heads
    assert registry.reference_config("qwen3-30b-a3b")["rope_theta"] == 1e7
    assert registry.reference_config("qwen3-30b-a3b-base")["rope_theta"] == 1e6
    big = registry.reference_config("qwen3-480b-a35b")
    assert (big["num_experts"], big["num_key_value_heads"], big["moe_intermediate_size"]) == (160, 8, 2560)


def test_transformers_5_configs_name_the_expert_count_num_local_experts():
    """transformers 5 writes num_experts as num_local_experts: both spellings give X and pass --model's check."""
    cfg = registry.reference_config("qwen3-30b-a3b")
    v5 = {k: v for k, v in cfg.items() if k != "num_experts"} | {"num_local_experts": 128}
    family = detect_family(v5)
    assert family.dims(v5)["X"] == family.dims(cfg)["X"] == 128
    spec = registry.lookup("qwen3-30b-a3b")
    registry.check_against(spec, v5, family.reference_keys)
    with pytest.raises(ConfigMismatchError, match="num_experts = 64, but qwen3-30b-a3b has 128"):
        registry.check_against(spec, v5 | {"num_local_experts": 64}, family.reference_keys)


def test_maxtext_to_hf_resolves_qwen3_moe_architecture(hf_models, tmp_path):
    """The carried config is a qwen3_moe one: --model of another family is refused, of this family is checked."""
    mt = tmp_path / "mt"
    hf_to_maxtext(str(hf_models("qwen3-moe", "bfloat16")), mt, ToMaxTextOptions(scan_layers=False))
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "a", "--model", "qwen3-8b")
    assert r.exit_code == 2
    assert "qwen3-8b is a qwen3 model, but the carried config describes a qwen3_moe model" in error_line(r)
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "b", "--model", "qwen3-30b-a3b")
    assert r.exit_code == 2 and "hidden_size = 64, but qwen3-30b-a3b has 2048" in error_line(r)
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "c", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["family"] == "qwen3_moe" and data["scan_layers"] is False
    assert json.loads((tmp_path / "c" / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]
