"""GPT-OSS specifics: the composite gate/up rules (parts of one HF tensor) in tables, plans and the HF writer;
refused configs (one-line errors, nothing written); the reference models. MXFP4 sources: test_gpt_oss_mxfp4.py.

The element-wise tree, round trip, Appendix A shapes and verify-logits of the tiny gpt-oss model are in
tests/test_convert_to_maxtext.py, tests/test_convert_to_hf.py, tests/test_golden_shapes.py and tests/verify/.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ckpt_cli import registry
from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf
from ckpt_cli.engine import ordered_jobs
from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families import detect_family, gpt_oss
from ckpt_cli.families.base import Part, row, validate_rules
from ckpt_cli.io.hf_writer import HFFolderWriter
from ckpt_cli.io.safetensors import PlannedTensor
from ckpt_cli.plan import build_to_hf, build_to_maxtext, check_coverage
from tests.cli_helpers import error_line, run, with_config
from tests.conftest import read_config
from tests.expectations import assert_bits_equal, flatten
from tests.test_convert_to_maxtext import load_hf, restore

DIMS = {"X": 3, "E": 4, "M": 5}


# ------------------------------------------------------------------------------------------------------------
# Parts in family tables


def gate_up(start: int, step: int = 2, name: str = "wi"):
    return row(name, "gate_up", "E,M", f"X,E,{step}*M", "", "X", Part(-1, start, step))


def test_parts_that_tile_one_tensor_are_valid():
    validate_rules([gate_up(0, name="wi_0"), gate_up(1, name="wi_1")], DIMS)
    validate_rules([gate_up(s, 3, name=f"w{s}") for s in range(3)], DIMS)


@pytest.mark.parametrize("rules,message", [
    ([gate_up(0, name="wi_0")], "leave a gap"),                                   # odd columns dropped
    ([gate_up(0, name="wi_0"), gate_up(0, name="wi_1")], "overlap"),
    ([gate_up(0, 3, name="a"), gate_up(2, 3, name="b")], "leave a gap"),
    ([gate_up(0, name="wi_0"), row("wi_1", "gate_up", "X,E,2*M", "X,E,2*M")], "not one-to-one"),
    ([gate_up(0, name="wi_0"), dataclasses.replace(gate_up(1, name="wi_1"), steps=("transpose",))], "must agree"),
    ([row("w", "t", "E,M", "X,E,2*M", "", "X", Part(-1, 2, 2))], "does not divide"),
    ([row("w", "t", "E,M", "X,E,2*M", "", "X", Part(-3, 0, 2))], "count from the end"),
    ([row("w", "t", "E,M", "E,2*M", "", "X", Part(-1, 0, 2))], "hf_shape to start with X"),
])
def test_bad_parts_are_refused(rules, message):
    with pytest.raises(AssertionError, match=message):
        validate_rules(rules, DIMS)


# ------------------------------------------------------------------------------------------------------------
# Plans: import reads parts, export writes parts into the one HF tensor; coverage catches gaps


def tiny_plans(scan: bool = True):
    cfg = registry.reference_config("gpt-oss-20b") | {"hidden_size": 8, "num_attention_heads": 2,
                                                      "num_key_value_heads": 1, "head_dim": 4,
                                                      "intermediate_size": 6, "num_local_experts": 3,
                                                      "num_experts_per_tok": 2, "num_hidden_layers": 4,
                                                      "vocab_size": 16,
                                                      "layer_types": gpt_oss.expected_layer_types(4)}
    family = detect_family(cfg)
    return (build_to_maxtext(family, cfg, scan, np.dtype(np.float32)),
            build_to_hf(family, cfg, scan, np.dtype(np.float32)))


def test_plan_reads_gate_up_in_parts_per_expert_and_writes_it_back_whole():
    forward, reverse = tiny_plans()
    wi0 = forward.tensor("decoder/layers/layers_1/GptOssMlp/wi_0")
    assert wi0.shape == (3, 2, 8, 6) and wi0.stack_axes == (0, 1) and wi0.source_shape == (8, 12)
    task = next(t for t in wi0.tasks if t.index == (2, 1))          # expert 2, scan index 1 = HF layer 3
    assert (task.source.name, task.source.index, task.source.axes, task.source.part) == (
        "model.layers.3.mlp.experts.gate_up_proj", (2,), (0,), Part(-1, 0, 2))
    hf = reverse.tensor("model.layers.3.mlp.experts.gate_up_proj")
    assert hf.shape == (3, 8, 12) and hf.stack_axes == (0,)
    assert sorted((t.index, t.part.start, t.source.name) for t in hf.tasks) == [
        ((e,), s, f"decoder/layers/layers_1/GptOssMlp/wi_{s}") for e in range(3) for s in range(2)]
    t1 = next(t for t in hf.tasks if t.index == (1,) and t.part.start == 1)
    assert hf.target_index(t1) == (1, slice(None), slice(1, None, 2)) and hf.task_shape(t1) == (8, 6)
    bias = reverse.tensor("model.layers.3.mlp.experts.gate_up_proj_bias")
    assert bias.shape == (3, 12) and len(bias.tasks) == 2 and bias.stack_axes == ()


def test_coverage_catches_a_missing_or_doubled_part():
    forward, reverse = tiny_plans(scan=False)
    hf = reverse.tensor("model.layers.0.mlp.experts.gate_up_proj")
    others = [t for t in reverse.tensors if t is not hf]
    gap = dataclasses.replace(hf, tasks=tuple(t for t in hf.tasks if t.part.start == 0))
    with pytest.raises(AssertionError, match="exactly once"):
        check_coverage([*others, gap])
    doubled = dataclasses.replace(hf, tasks=tuple(dataclasses.replace(t, part=Part(-1, 0, 2)) for t in hf.tasks))
    with pytest.raises(AssertionError):
        check_coverage([*others, doubled])
    wi1 = forward.tensor("decoder/layers_0/GptOssMlp/wi_1")
    dropped = [t for t in forward.tensors if t is not wi1]      # the odd columns never read
    with pytest.raises(AssertionError, match="do not tile"):
        check_coverage(dropped)


def test_parts_of_one_region_run_back_to_back():
    """The export order keeps wi_0[e, s] and wi_1[e, s] adjacent (they fill one expert's gate_up rows)."""
    _, reverse = tiny_plans()

    class Order:
        def order_key(self, source):
            return (source.name, source.index)

    jobs = [(t.target, task.index) for t, task in ordered_jobs(reverse, Order())
            if t.target == "model.layers.0.mlp.experts.gate_up_proj"]
    assert all(jobs[i] == jobs[i + 1] for i in range(0, len(jobs), 2))


def test_hf_writer_merges_strided_parts(tmp_path):
    """Parts written into one tensor (any order, one expert row at a time) give the interleaved tensor."""
    rng = np.random.default_rng(0)
    want = rng.standard_normal((3, 4, 10)).astype(np.float32)
    writer = HFFolderWriter(tmp_path / "out", [PlannedTensor("t", np.dtype(np.float32), want.shape)], 10**9)
    for e in (2, 0, 1):
        for start in (1, 0):
            writer.write("t", (e, slice(None), slice(start, None, 2)), np.ascontiguousarray(want[e, :, start::2]))
    writer.finalize({}, {})
    assert_bits_equal(load_hf(tmp_path / "out")["t"], want, "t")


def test_hf_writer_refuses_a_missing_part(tmp_path):
    writer = HFFolderWriter(tmp_path / "out", [PlannedTensor("t", np.dtype(np.float32), (2, 4))], 10**9)
    writer.write("t", (slice(None), slice(0, None, 2)), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="never written"):
        writer.finalize({}, {})
    writer.abort()


def test_round_trip_across_small_shards(hf_models, tmp_path):
    """bf16, unscanned, shards of 40 kB: every gate_up_proj written in parts lands bit-identical."""
    src = hf_models("gpt-oss", "bfloat16", True)
    mt = tmp_path / "mt"
    hf_to_maxtext(str(src), mt, ToMaxTextOptions(scan_layers=False))
    maxtext_to_hf(str(mt), tmp_path / "hf", ToHFOptions(shard_size=40_000))
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    want, got = load_hf(src), load_hf(tmp_path / "hf")
    assert sorted(want) == sorted(got)
    for name in want:
        assert_bits_equal(got[name], want[name], name)


# ------------------------------------------------------------------------------------------------------------
# Refusals


REFUSED = [
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "config.json says bitsandbytes quantization: only "
                                                                "MXFP4 (the official openai/gpt-oss repos) and"),
    ({"num_hidden_layers": 23}, "23 layers: MaxText's gpt_oss groups layers in pairs"),
    ({"layer_types": ["full_attention", "sliding_attention"] * 12}, "is not MaxText's gpt_oss pattern"),
    ({"attention_bias": False}, "attention_bias false"),
    ({"tie_word_embeddings": True}, "untied logits_dense"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "default"}}, "rope_type 'default'"),
    ({"swiglu_alpha": 1.0}, "swiglu_alpha 1.0"),
    ({"num_experts_per_tok": 33}, "num_experts_per_tok 33 with 32 experts"),
]


@pytest.mark.parametrize("changes,message", REFUSED)
def test_refused_configs(changes, message):
    cfg = registry.reference_config("gpt-oss-20b") | changes
    family = detect_family(cfg)
    assert family.name == "gpt_oss"
    with pytest.raises(UnsupportedError) as exc:
        family.check_config(cfg)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_other_quantization_is_one_line_error_and_nothing_written(hf_models, tmp_path):
    src = with_config(hf_models("gpt-oss"), tmp_path / "src", quantization_config={"quant_method": "gptq"})
    out = tmp_path / "mt"
    r = run("convert", "hf-to-maxtext", src, "--out", out)
    assert r.exit_code == 2, r.output
    assert error_line(r) == ("error: config.json says gptq quantization: only MXFP4 (the official openai/gpt-oss "
                             "repos) and unquantized sources (unsloth/gpt-oss-20b-BF16 or unsloth/gpt-oss-120b-BF16) "
                             "are read")
    assert not out.exists() and not out.with_name("mt.partial").exists()


def test_mxfp4_config_over_plain_tensors_converts_them_as_stored(hf_models, tmp_path):
    """config.json may still say MXFP4 over weights already dequantized: the stored tensors are what is read
    (the MXFP4 sources themselves: tests/families/test_gpt_oss_mxfp4.py)."""
    plain = hf_models("gpt-oss")
    src = with_config(plain, tmp_path / "src", quantization_config={"quant_method": "mxfp4"})
    hf_to_maxtext(str(plain), tmp_path / "a", ToMaxTextOptions(dtype="f32"))
    result = hf_to_maxtext(str(src), tmp_path / "b", ToMaxTextOptions(dtype="f32"))
    assert not any("MXFP4" in n for n in result.notes)
    a, b = flatten(restore(tmp_path / "a")["params"]["params"]), flatten(restore(tmp_path / "b")["params"]["params"])
    assert sorted(a) == sorted(b)
    for path in a:
        assert_bits_equal(b[path], a[path], path)


def test_swiglu_limit_note():
    cfg = registry.reference_config("gpt-oss-20b")
    family = detect_family(cfg)
    assert family.check_config(cfg) == []
    notes = family.check_config(cfg | {"swiglu_limit": 5.0})
    assert len(notes) == 1 and "mlp_activations_limit" in notes[0]


def test_reference_models():
    for name, repo, layers, experts in (("gpt-oss-20b", "unsloth/gpt-oss-20b-BF16", 24, 32),
                                        ("gpt-oss-120b", "unsloth/gpt-oss-120b-BF16", 36, 128)):
        spec = registry.lookup(name)
        assert (spec.repo_id, spec.family) == (repo, "gpt_oss")
        cfg = registry.reference_config(name)
        assert (cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (layers, experts, 4)
        assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
                cfg["intermediate_size"], cfg["vocab_size"], cfg["sliding_window"]) == (2880, 64, 8, 64, 2880,
                                                                                         201088, 128)
        assert cfg["rope_theta"] == 150000.0 and cfg["rope_scaling"]["factor"] == 32.0


def test_maxtext_to_hf_resolves_gpt_oss_architecture(hf_models, tmp_path):
    """The carried config is a gpt_oss one: --model of another family is refused; of this family, checked."""
    mt = tmp_path / "mt"
    hf_to_maxtext(str(hf_models("gpt-oss", "bfloat16")), mt, ToMaxTextOptions())
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "a", "--model", "qwen3-8b")
    assert r.exit_code == 2
    assert "qwen3-8b is a qwen3 model, but the carried config describes a gpt_oss model" in error_line(r)
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "b", "--model", "gpt-oss-20b")
    assert r.exit_code == 2 and "hidden_size = 64, but gpt-oss-20b has 2880" in error_line(r)
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "c", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["family"] == "gpt_oss" and data["scan_layers"] is True
    assert json.loads((tmp_path / "c" / "config.json").read_text())["architectures"] == ["GptOssForCausalLM"]


def test_pricing_counts_each_gate_up_byte_read_once_per_part(hf_models):
    """Both parts read the whole expert slice (the other half is skipped): import reads gate_up_proj twice,
    every other tensor once; export reads every MaxText element once."""
    from ckpt_cli import pricing

    src = hf_models("gpt-oss")
    cfg = read_config(src)
    hf = load_hf(src)
    forward = build_to_maxtext(detect_family(cfg), cfg, True, np.dtype(np.float32))
    source = pricing.Source("src", "local", itemsize={k: 4 for k in hf})
    gate_up = sum(v.nbytes for k, v in hf.items() if k.endswith("gate_up_proj") or k.endswith("gate_up_proj_bias"))
    assert pricing.read_bytes(forward, source) == sum(v.nbytes for v in hf.values()) + gate_up
    reverse = build_to_hf(detect_family(cfg), cfg, True, np.dtype(np.float32))
    assert pricing.read_bytes(reverse, pricing.Source("mt", "orbax", {}, default_itemsize=4)) == forward.output_bytes
