"""Llama 2 / 3 / 3.3 (family llama2) and Mistral: MaxText 0.2.5 runs them with its default rotate-half RoPE, so
HF q/k are not permuted (unlike llama3.1-*), and 1/sqrt(D) is folded into the query kernel.

Tiny transformers models (tests/families/tiny_dense.py): the element-wise tree, the round trip, f32 verify-logits
scanned and unscanned, planted mistakes, refusals as one-line errors, which family a config reads as (a model
name decides for Llama 3.3, whose config is Llama 3.1's), the reference models, inspect/plan --model.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from ckpt_cli import registry
from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.errors import ConfigMismatchError, UnsupportedError
from ckpt_cli.families import detect_family, llama3
from ckpt_cli.verify.forward import ForwardConfig
from tests.cli_helpers import error_line, run, with_config
from tests.conftest import LLAMA_ROPE
from tests.families.tiny_dense import Models, check_round_trip, check_tree, swap_layers
from tests.verify.test_verify_logits import assert_fails, leaf, verify_json

KINDS = ["llama2", "mistral"]
Q = "self_attention/query/kernel"
K = "self_attention/key/kernel"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    return Models(tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
@pytest.mark.parametrize("kind", KINDS)
def test_tree_matches_the_spec(models, kind, scan, dtype):
    check_tree(models, kind, scan, dtype)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(models, kind, scan, dtype):
    check_round_trip(models, kind, scan, dtype)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
@pytest.mark.parametrize("kind", KINDS)
def test_f32_verify_logits_match_transformers(models, kind, scan):
    data = verify_json("--maxtext", models.maxtext(kind, scan), "--hf", models.hf(kind))
    s = data["summary"]
    assert data["passed"] and data["family"] == kind and data["scan_layers"] is scan
    assert s["kl_max"] < 1e-6 and s["max_abs_dlogit"] < 1e-4 and s["top1_agreement"] == 1.0, s


# ------------------------------------------------------------------------------------------------------------
# Planted mistakes fail verify-logits (sharp attention: q/k x4)

MISTAKES = {
    "query-scale-left-out": ((Q, "transpose"),),
    "llama3.1-rope-permutation": ((Q, "transpose,rope-interleave,query-scale"), (K, "transpose,rope-interleave")),
}


def _with_steps(table: tuple, changes: tuple) -> tuple:
    for path, steps in changes:
        assert any(r.maxtext == path for r in table)
        table = tuple(dataclasses.replace(r, steps=tuple(steps.split(","))) if r.maxtext == path else r
                      for r in table)
    return table


@pytest.mark.parametrize("mistake", list(MISTAKES))
@pytest.mark.parametrize("kind", KINDS)
def test_transform_mistakes_fail(models, tmp_path, monkeypatch, kind, mistake):
    src, good = models.hf(kind, sharp=True), models.maxtext(kind, sharp=True)
    bad = tmp_path / "bad"
    with monkeypatch.context() as m:
        m.setattr(llama3, "PLAIN_LAYER", _with_steps(llama3.PLAIN_LAYER, MISTAKES[mistake]))
        hf_to_maxtext(str(src), bad, ToMaxTextOptions(dtype="f32"))
    assert (leaf(bad, f"decoder/layers/{Q}") != leaf(good, f"decoder/layers/{Q}")).any()   # the patch took
    assert verify_json("--maxtext", good, "--hf", src)["summary"]["kl_max"] < 1e-6
    assert_fails(bad, src)


@pytest.mark.parametrize("kind", KINDS)
def test_swapped_layers_fail(models, tmp_path, kind):
    src = models.hf(kind, sharp=True)
    assert_fails(swap_layers(models.maxtext(kind, sharp=True), tmp_path / "swapped"), src)


# ------------------------------------------------------------------------------------------------------------
# Which family a config reads as; notes; refusals

def test_llama_configs_read_by_rope_scaling_or_model_name():
    """A llama3-scaled config is Llama 3.1's (permuted q/k), an unscaled one Llama 2/3's; a model name decides for
    Llama 3.3, whose released config is Llama 3.1's."""
    l33 = registry.reference_config("llama3.3-70b")
    assert detect_family(l33).name == "llama3.1"
    assert detect_family(l33, "llama3.3-70b").name == "llama2"
    assert detect_family(l33, "llama3.1-70b").name == "llama3.1"
    for name in ("llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "llama3-70b"):
        assert detect_family(registry.reference_config(name)).name == "llama2"
    assert detect_family(registry.reference_config("mistral-7b")).name == "mistral"
    assert detect_family(registry.reference_config("mistral-7b"), "llama2-7b").name == "mistral"  # not a llama type


def test_matching_models_tell_llama3_from_llama3_1_by_rope_scaling():
    """Llama 3.3's config matches the llama3.1-70b names and llama3.3-70b (same shapes, llama3 scaling), not
    llama3-70b (unscaled); a Llama 3.1 config under --model llama3-8b is refused in one line."""
    from ckpt_cli import inspect as I

    assert I.matching_models(registry.reference_config("llama3.3-70b")) == [
        "llama3.1-70b", "llama3.1-70b-Instruct", "llama3.3-70b"]
    assert I.matching_models(registry.reference_config("llama3-70b")) == ["llama3-70b"]
    assert I.matching_models(registry.reference_config("llama2-7b")) == ["llama2-7b"]
    assert I.matching_models(registry.reference_config("mistral-7b")) == ["mistral-7b"]
    with pytest.raises(ConfigMismatchError, match="^config.json rope_scaling = llama3, but llama3-8b has default$"):
        registry.check_against(registry.lookup("llama3-8b"), registry.reference_config("llama3.1-8b"),
                               llama3.LLAMA2.reference_keys)


def test_llama3_3_scaling_is_noted_and_left_out_of_the_forward():
    """MaxText 0.2.5's llama3.3-70b runs plain RoPE (only llama3.1-* names get the scaled one): noted, and the
    forward computes what MaxText does."""
    cfg = registry.reference_config("llama3.3-70b")
    notes = llama3.LLAMA2.check_config(cfg)
    assert len(notes) == 1 and "does not apply (plain RoPE" in notes[0] and "llama3.1-*" in notes[0]
    assert ForwardConfig.from_hf_config("llama2", cfg).rope_scaling is None
    assert ForwardConfig.from_hf_config("llama3.1", cfg).rope_scaling is not None
    for name in ("llama2-7b", "llama3-8b", "mistral-7b"):
        cfg = registry.reference_config(name)
        assert detect_family(cfg).check_config(cfg) == []


def test_mistral_sliding_window_is_noted():
    cfg = registry.reference_config("mistral-7b") | {"sliding_window": 4096}
    notes = llama3.MISTRAL.check_config(cfg)
    assert notes == ["config.json sets sliding_window 4096: MaxText's mistral attends over the whole context, so "
                     "it computes what Hugging Face does only up to 4096 tokens"]
    assert llama3.MISTRAL.check_config(cfg | {"sliding_window": 32768}) == []


def test_mistral_window_verify_says_why_maxtext_differs(models, tmp_path):
    """A 4-token window: transformers masks beyond it, MaxText's mistral block does not (the forward computes
    MaxText's math), so the 8/16/40-token prompts FAIL, and the verdict carries the conversion's note."""
    src = with_config(models.hf("mistral", sharp=True), tmp_path / "src", sliding_window=4)
    out = tmp_path / "mt"
    hf_to_maxtext(str(src), out, ToMaxTextOptions(dtype="f32"))
    data = assert_fails(out, src)
    assert any(n.startswith("config.json sets sliding_window 4: MaxText's mistral attends over the whole context")
               for n in data["notes"])
    short = verify_json("--maxtext", out, "--hf", src, "--tokens", "5,6,7,8")   # within the window: equal
    assert short["summary"]["kl_max"] < 1e-6


REFUSED = [
    ("llama2", {"attention_bias": True}, "config.json sets attention_bias/mlp_bias: MaxText's llama2 block has no "
                                         "biases"),
    ("llama2", {"tie_word_embeddings": True}, "config.json ties embeddings: MaxText's llama2 block always has an "
                                              "untied logits_dense"),
    ("llama2", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "config.json rope scaling 'linear': "
                                                                         "MaxText's llama2 block uses plain RoPE"),
    ("llama2", {"hidden_act": "gelu"}, "config.json hidden_act 'gelu': MaxText's llama2 block MLP is SwiGLU"),
    ("mistral", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "config.json rope scaling 'yarn': "
                                                                        "MaxText's mistral uses plain RoPE"),
    ("mistral", {"head_dim": 23}, "head_dim 23 is odd: RoPE needs an even head dim"),
]


@pytest.mark.parametrize("kind,changes,message", REFUSED)
def test_refusals_are_one_line_errors_and_nothing_written(models, tmp_path, kind, changes, message):
    src = with_config(models.hf(kind), tmp_path / "src", **changes)
    out = tmp_path / "mt"
    r = run("convert", "hf-to-maxtext", src, "--out", out)
    assert r.exit_code == 2, r.output
    assert error_line(r).startswith(f"error: {message}")
    assert not out.exists() and not out.with_name("mt.partial").exists()


def test_model_mismatches_are_one_line_errors(models, tmp_path):
    out = tmp_path / "mt"
    r = run("convert", "hf-to-maxtext", models.hf("mistral"), "--out", out, "--model", "llama2-7b")
    assert r.exit_code == 2 and error_line(r) == ("error: llama2-7b is a llama2 model, but config.json describes a "
                                                  "mistral model")
    r = run("convert", "hf-to-maxtext", models.hf("llama2"), "--out", out, "--model", "llama2-7b")
    assert r.exit_code == 2 and error_line(r) == "error: config.json hidden_size = 64, but llama2-7b has 4096"
    assert not out.exists()
    with pytest.raises(ConfigMismatchError, match="rope_theta = 10000.0, but mistral-7b has 1000000.0"):
        registry.check_against(registry.lookup("mistral-7b"), registry.reference_config("mistral-7b")
                               | {"rope_theta": 10000.0}, llama3.MISTRAL.reference_keys)


def test_export_keeps_the_family_the_checkpoint_was_converted_as(models, tmp_path):
    """A llama2-family checkpoint (no q/k permutation) exported with a config that reads as Llama 3.1 would be
    un-permuted by the wrong inverse: refused in one line, nothing written."""
    scaled = with_config(models.hf("llama2"), tmp_path / "scaled", rope_scaling=dict(LLAMA_ROPE))
    out = tmp_path / "hf"
    r = run("convert", "maxtext-to-hf", models.maxtext("llama2", True, "f32"), "--out", out, "--hf-config",
            scaled / "config.json")
    assert r.exit_code == 2, r.output
    assert error_line(r) == (f"error: the checkpoint was converted as a llama2 model, but the --hf-config "
                             f"{scaled / 'config.json'} config reads as a llama3.1 model")
    assert not out.exists() and not out.with_name("hf.partial").exists()


def test_check_config_refusals_raise_unsupported():
    with pytest.raises(UnsupportedError):
        llama3.LLAMA2.check_config(registry.reference_config("llama2-7b") | {"mlp_bias": True})


# ------------------------------------------------------------------------------------------------------------
# Reference models, inspect --model and plan --model without data

NAMES = {"llama2-7b": ("meta-llama/Llama-2-7b-hf", "llama2", 6_738_415_616),
         "llama2-13b": ("meta-llama/Llama-2-13b-hf", "llama2", 13_015_864_320),
         "llama2-70b": ("meta-llama/Llama-2-70b-hf", "llama2", 68_976_648_192),
         "llama3-8b": ("meta-llama/Meta-Llama-3-8B", "llama2", 8_030_261_248),
         "llama3-70b": ("meta-llama/Meta-Llama-3-70B", "llama2", 70_553_706_496),
         "llama3.3-70b": ("meta-llama/Llama-3.3-70B-Instruct", "llama2", 70_553_706_496),
         "mistral-7b": ("mistralai/Mistral-7B-Instruct-v0.2", "mistral", 7_241_732_096)}


@pytest.mark.parametrize("name", list(NAMES))
def test_reference_models_inspect_and_plan(name):
    """Default repo and family; the parameter count (the released models') from `inspect --model`; a plan
    for both directions with no data."""
    repo, family, params = NAMES[name]
    spec = registry.lookup(name)
    assert (spec.repo_id, spec.family) == (repo, family)
    r = run("inspect", "--model", name, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["maxtext_models"] == [name] and data["totals"]["parameters"] == params and data["family"] == family
    assert any("does not apply (plain RoPE" in n for n in data["notes"]) is (name == "llama3.3-70b")
    for direction in ("hf-to-maxtext", "maxtext-to-hf"):
        r = run("plan", direction, "--model", name, "--read-gbps", "1", "--write-gbps", "0.5", "--json")
        assert r.exit_code in (0, 1), r.output            # go or no-go on this machine: both are answers
        assert json.loads(r.stdout)["parameters"] == params
