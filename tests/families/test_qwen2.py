"""Qwen2.5 (family qwen2, MaxText decoder_block qwen2): Qwen3's tree without the q/k norms, with q/k/v biases
(HF (N*D,) -> MaxText (N, D), head-major); no permutation, no folded scale (queries scaled at run time); tied
head on qwen2.5-1.5b.

Tiny transformers models (tests/families/tiny_dense.py), untied and tied: the element-wise tree, the round trip
(bit-exact: nothing is folded), f32 verify-logits scanned and unscanned, planted mistakes, refusals as one-line
errors, the reference models, inspect/plan --model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import tensorstore as ts

from ckpt_cli import registry
from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.errors import ConfigMismatchError
from ckpt_cli.families import detect_family, qwen3
from ckpt_cli.io.orbax import OrbaxCheckpoint
from tests.cli_helpers import error_line, run, with_config
from tests.families.tiny_dense import Models, check_round_trip, check_tree, swap_layers
from tests.verify.test_verify_logits import assert_fails, leaf, verify_json

KINDS = ["qwen2", "qwen2-tied"]
Q = "self_attention/query/kernel"
K = "self_attention/key/kernel"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    return Models(tmp_path_factory.mktemp("qwen2"))


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
    assert data["passed"] and data["family"] == "qwen2" and data["scan_layers"] is scan
    assert s["kl_max"] < 1e-6 and s["max_abs_dlogit"] < 1e-4 and s["top1_agreement"] == 1.0, s


# ------------------------------------------------------------------------------------------------------------
# Planted mistakes fail verify-logits (sharp attention: q/k x4)

MISTAKES = {
    "query-scale-folded-as-llama": ((Q, "transpose,query-scale"),),
    "rope-permutation-applied": ((Q, "transpose,rope-interleave"), (K, "transpose,rope-interleave")),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_transform_mistakes_fail(models, tmp_path, monkeypatch, mistake):
    src, good = models.hf("qwen2", sharp=True), models.maxtext("qwen2", sharp=True)
    table = qwen3.QWEN2_LAYER
    for path, steps in MISTAKES[mistake]:
        table = tuple(dataclasses.replace(r, steps=tuple(steps.split(","))) if r.maxtext == path else r
                      for r in table)
    bad = tmp_path / "bad"
    with monkeypatch.context() as m:
        m.setattr(qwen3, "QWEN2_LAYER", table)
        hf_to_maxtext(str(src), bad, ToMaxTextOptions(dtype="f32"))
    assert (leaf(bad, f"decoder/layers/{Q}") != leaf(good, f"decoder/layers/{Q}")).any()   # the patch took
    assert verify_json("--maxtext", good, "--hf", src)["summary"]["kl_max"] < 1e-6
    assert_fails(bad, src)


def test_biases_left_out_fail(models, tmp_path):
    """The q/k/v biases zeroed in the checkpoint (a converter that dropped them): FAIL."""
    src, good = models.hf("qwen2", sharp=True), models.maxtext("qwen2", sharp=True)
    out = tmp_path / "no-bias"
    shutil.copytree(good, out)
    ckpt = OrbaxCheckpoint(out)
    for name in ("query", "key", "value"):
        # zeros stored as chunks (as a converter writes them), not chunks deleted as equal to the fill value
        spec = ckpt.array_spec(f"decoder/layers/self_attention/{name}/bias") | {"store_data_equal_to_fill_value": True}
        arr = ts.open(spec, context=ckpt.context).result()
        arr.write(np.zeros(arr.shape, np.float32)).result()
    assert_fails(out, src)


def test_swapped_layers_fail(models, tmp_path):
    src = models.hf("qwen2", sharp=True)
    assert_fails(swap_layers(models.maxtext("qwen2", sharp=True), tmp_path / "swapped"), src)


# ------------------------------------------------------------------------------------------------------------
# Refusals, mismatches

REFUSED = [
    ({"use_sliding_window": True}, "config.json sets use_sliding_window: MaxText's qwen2 attends over the whole "
                                   "context"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
     "config.json rope scaling 'yarn': MaxText's qwen2 uses plain RoPE"),
    ({"hidden_act": "gelu"}, "config.json hidden_act 'gelu': MaxText's qwen2 MLP is SwiGLU (silu)"),
]


@pytest.mark.parametrize("changes,message", REFUSED)
def test_refusals_are_one_line_errors_and_nothing_written(models, tmp_path, changes, message):
    src = with_config(models.hf("qwen2"), tmp_path / "src", **changes)
    out = tmp_path / "mt"
    r = run("convert", "hf-to-maxtext", src, "--out", out)
    assert r.exit_code == 2, r.output
    assert error_line(r) == f"error: {message}"
    assert not out.exists() and not out.with_name("mt.partial").exists()


def test_model_mismatches_are_one_line_errors(models, tmp_path):
    out = tmp_path / "mt"
    r = run("convert", "hf-to-maxtext", models.hf("qwen2"), "--out", out, "--model", "qwen3-0.6b")
    assert r.exit_code == 2 and error_line(r) == ("error: qwen3-0.6b is a qwen3 model, but config.json describes a "
                                                  "qwen2 model")
    r = run("convert", "hf-to-maxtext", models.hf("qwen2"), "--out", out, "--model", "qwen2.5-7b")
    assert r.exit_code == 2 and error_line(r) == "error: config.json hidden_size = 64, but qwen2.5-7b has 3584"
    assert not out.exists()
    cfg = registry.reference_config("qwen2.5-1.5b")
    assert registry.check_against(registry.lookup("qwen2.5-1.5b"), cfg, qwen3.QWEN2.reference_keys) is None
    with pytest.raises(ConfigMismatchError, match="tie_word_embeddings = False, but qwen2.5-1.5b has True"):
        registry.check_against(registry.lookup("qwen2.5-1.5b"), cfg | {"tie_word_embeddings": False},
                               qwen3.QWEN2.reference_keys)


# ------------------------------------------------------------------------------------------------------------
# Reference models, inspect --model and plan --model without data

NAMES = {"qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B-Instruct", 1_543_714_304, True),
         "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512, False),
         "qwen2.5-14b": ("Qwen/Qwen2.5-14B-Instruct", 14_770_033_664, False)}


@pytest.mark.parametrize("name", list(NAMES))
def test_reference_models_inspect_and_plan(name):
    """Default repo (MaxText's HF_IDS), family, tied head on 1.5b only; the released models' parameter counts
    from `inspect --model`; a plan for both directions with no data."""
    repo, params, tied = NAMES[name]
    spec = registry.lookup(name)
    assert (spec.repo_id, spec.family) == (repo, "qwen2") and detect_family(spec.config).name == "qwen2"
    r = run("inspect", "--model", name, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    paths = {t["path"] for t in data["tensors"]}
    assert data["maxtext_models"] == [name] and data["totals"]["parameters"] == params and data["family"] == "qwen2"
    assert ("decoder/logits_dense/kernel" in paths) is not tied
    assert "decoder/layers/self_attention/query/bias" in paths
    for direction in ("hf-to-maxtext", "maxtext-to-hf"):
        r = run("plan", direction, "--model", name, "--read-gbps", "1", "--write-gbps", "0.5", "--json")
        assert r.exit_code in (0, 1), r.output
        assert json.loads(r.stdout)["parameters"] == params
