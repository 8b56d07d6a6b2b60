"""Gemma3 specifics: refused configs (one-line errors, nothing written), notes, the reference models, the
transforms' factors, multimodal sources (text part converted under either prefix), architecture resolution.

The element-wise tree, round trip, Appendix A shapes and verify-logits of the tiny gemma3 models are in
tests/test_convert_to_maxtext.py, tests/test_convert_to_hf.py, tests/test_golden_shapes.py and tests/verify/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ckpt_cli import registry
from ckpt_cli import transforms as T
from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf
from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families import detect_family, gemma3
from tests.cli_helpers import error_line, run, with_config
from tests.conftest import GEMMA3_ROPE, TINY, read_config
from tests.expectations import assert_bits_equal, cast, expected_tree, flatten, stored_dtype
from tests.test_convert_to_maxtext import restore

REFUSED = [
    ({"final_logit_softcapping": 30.0}, "config.json sets final_logit_softcapping 30.0: MaxText's gemma3 has no"),
    ({"attn_logit_softcapping": 50.0}, "config.json sets attn_logit_softcapping 50.0"),
    ({"attention_bias": True}, "config.json sets attention_bias"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention: MaxText's gemma3 is causal"),
    ({"tie_word_embeddings": False}, "config.json unties the embeddings"),
    ({"sliding_window_pattern": 4}, "config.json makes layer 3 full_attention: MaxText's gemma3 makes layer i global"),
    ({"layer_types": ["full_attention"] * 34}, "config.json makes layer 0 full_attention"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "yarn RoPE on full_attention layers"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "config.json scales RoPE on the local (sliding) layers"),
]


@pytest.mark.parametrize("changes,message", REFUSED)
def test_refused_configs(changes, message):
    cfg = registry.reference_config("gemma3-4b") | changes
    family = detect_family(cfg)
    assert family.name == "gemma3"
    with pytest.raises(UnsupportedError) as exc:
        family.check_config(cfg)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_softcapping_is_one_line_error_and_nothing_written(hf_models, tmp_path):
    src = with_config(hf_models("gemma3"), tmp_path / "src", final_logit_softcapping=30.0)
    out = tmp_path / "mt"
    r = run("convert", "hf-to-maxtext", src, "--out", out)
    assert r.exit_code == 2, r.output
    assert error_line(r) == "error: config.json sets final_logit_softcapping 30.0: MaxText's gemma3 has no soft-capping"
    assert not out.exists() and not out.with_name("mt.partial").exists()


def test_notes_and_reference_models():
    cfg = registry.reference_config("gemma3-4b")
    family = detect_family(cfg)
    assert family.check_config(cfg) == []
    notes = family.check_config(cfg | {"vocab_size": 262208, "sliding_window": 4096, "hidden_activation": "gelu"})
    assert len(notes) == 3 and any("262208" in n for n in notes) and any("sliding_window 4096" in n for n in notes)
    for name, repo, theta in (("gemma3-4b", "google/gemma-3-4b-it", 256), ("gemma3-12b", "google/gemma-3-12b-it", 256),
                              ("gemma3-27b", "google/gemma-3-27b-it", 168)):
        spec = registry.lookup(name)
        assert (spec.repo_id, spec.family, spec.config["query_pre_attn_scalar"]) == (repo, "gemma3", theta)
    # §9.1: global RoPE 1e6 with linear factor 8, local 1e4, read from the old spelling
    assert gemma3.rope(registry.reference_config("gemma3-27b")) == {"sliding_attention": (1e4, 1.0),
                                                                     "full_attention": (1e6, 8.0)}


def test_embedding_factors_are_section_9_3():
    """s = bf16(sqrt(E)): 4b 50.5, 12b 62.0, 27b 73.5 (sqrt: 50.596, 61.968, 73.321)."""
    assert [T.embedding_scale(e).factor for e in (2560, 3840, 5376)] == [50.5, 62.0, 73.5]
    x = np.array([[1.0, -2.0]], np.float32)
    s = T.embedding_scale(2560)
    assert s.to_maxtext(x, (1, 2)).tolist() == [[50.5, -101.0]]
    assert s.to_hf(s.to_maxtext(x, (1, 2)), (1, 2)).tolist() == [[1.0, -2.0]]


def make_multimodal(folder: Path, prefix: str) -> Path:
    """A tiny Gemma3ForConditionalGeneration (8 text layers: 6 + a remainder of 2, a one-layer SigLIP tower) saved by
    transformers (`language_model.model.*`), or with its text tensors renamed to `prefix`."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    text = TINY | {"num_hidden_layers": 8, "sliding_window": 4, "query_pre_attn_scalar": 24,
                   "rope_parameters": dict(GEMMA3_ROPE)}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=127,
                          boi_token_index=125, eoi_token_index=126)
    model = tf.Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    if prefix != "language_model.model.":
        state = load_file(folder / "model.safetensors")
        save_file({k.replace("language_model.model.", prefix): v for k, v in state.items()},
                  folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_multimodal_source_converts_its_language_model(tmp_path, prefix):
    """The text tensors under either prefix become the §9 tree (scanned: layers_0..5 of one + remainder of two);
    the vision tensors are left out with a note; maxtext-to-hf writes a text-only Gemma3ForCausalLM."""
    src = make_multimodal(tmp_path / "src", prefix)
    state = load_file(src / "model.safetensors")
    assert any(k.startswith(prefix + "layers.") for k in state) and any("vision_tower" in k for k in state)
    out = tmp_path / "mt"
    result = hf_to_maxtext(str(src), out, ToMaxTextOptions(scan_layers=True, dtype="bf16"))
    assert any("multimodal gemma3 source" in n and prefix in n for n in result.notes)
    assert any("not used" in n and "vision_tower" in n for n in result.notes)
    text_cfg = result.plan.hf_config
    assert text_cfg["model_type"] == "gemma3_text" and text_cfg["num_hidden_layers"] == 8
    text = {"model." + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    got = flatten(restore(out)["params"]["params"])
    want = expected_tree(text, text_cfg, "gemma3", True)
    assert set(got) == set(want) and "decoder/layers_remainder/layers_1/mlp/wo/kernel" in got
    for path, expected in want.items():
        assert_bits_equal(got[path], cast(expected, stored_dtype(path, "gemma3", "bf16")), path)

    back = tmp_path / "hf"
    maxtext_to_hf(str(out), back, ToHFOptions(dtype="f32"))
    config = read_config(back)
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    names = set(load_file(back / "model.safetensors"))
    assert names == set(text)


def test_multimodal_config_without_text_tensors_is_refused(tmp_path):
    src = make_multimodal(tmp_path / "src", "text.")
    r = run("convert", "hf-to-maxtext", src, "--out", tmp_path / "mt")
    assert r.exit_code == 2, r.output
    assert "multimodal gemma3 config, but no text-model tensors" in error_line(r)
    assert not (tmp_path / "mt").exists()


def test_maxtext_to_hf_resolves_gemma3_architecture(hf_models, tmp_path):
    mt = tmp_path / "mt"
    hf_to_maxtext(str(hf_models("gemma3", "bfloat16")), mt, ToMaxTextOptions())
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "a", "--model", "qwen3-8b")
    assert r.exit_code == 2
    assert "qwen3-8b is a qwen3 model, but the carried config describes a gemma3 model" in error_line(r)
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "b", "--model", "gemma3-4b")
    assert r.exit_code == 2 and "hidden_size = 64, but gemma3-4b has 2560" in error_line(r)
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "c", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["family"] == "gemma3" and data["scan_layers"] is True
