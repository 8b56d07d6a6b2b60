"""verify-logits streams a MoE layer's routed experts a group at a time, on both sides, for every MoE family.

* MaxText side: the forward with experts read a group at a time from the checkpoint equals the forward with the
  layer read whole, bit for bit (same per-expert math, same order), for Qwen3 MoE, Mixtral, GPT-OSS, Qwen3-Next,
  DeepSeek-V3, Llama 4 and DeepSeek-V4 (hash-routed and bias-routed layers); experts are read a group at a time,
  no read of an expert leaf spanning more than a group.
* Hugging Face side: transformers' own experts module run a group at a time equals the whole model within float32
  rounding (bit for bit with one group), holding at most a group of experts.
* The group comes from the memory budget (or --expert-group), and the plan is printed up front and in --json.
* An fp8 Kimi K2 source runs streamed, dequantized on the fly, and passes with KL < 1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from ckpt_cli.cli.app import app
from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.families import detect_family
from ckpt_cli.io.orbax import OrbaxCheckpoint
from ckpt_cli.verify import budget, reference
from ckpt_cli.verify.params import OrbaxExpertLeaf, OrbaxParams
from ckpt_cli.verify.prompts import Prompt
from ckpt_cli.verify.run import forward_config, maxtext_forward
from tests.conftest import make_hf_model, read_config

runner = CliRunner()
KINDS = ["qwen3-moe", "mixtral", "gpt-oss", "qwen3-next", "deepseek-v3", "llama4", "deepseek4"]
PROMPTS = [Prompt(tuple(range(3, 43))), Prompt((5, 9, 61, 2, 11))]   # ids < 64: the tiny DeepSeek-V4 vocabulary


def _model(kind: str):
    if kind == "deepseek-v3":
        from tests.families.test_deepseek import make_model

        return make_model("v3", "float32")
    if kind == "llama4":
        from tests.families.test_llama4 import make_model

        return make_model("scout", "float32")
    if kind == "deepseek4":   # hash-routed layers 0-2, then bias-routed ones; 16 indexer heads: no ties
        from tests.families.test_deepseek4 import tiny_model

        return tiny_model(seed=2, index_n_heads=16)
    return make_hf_model(kind, "float32")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """kind -> (HF folder, f32 scanned MaxText checkpoint), built once per module."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in cache:
            root = tmp_path_factory.mktemp(f"xs-{kind}")
            _model(kind).save_pretrained(root / "hf")
            hf_to_maxtext(str(root / "hf"), root / "mt", ToMaxTextOptions(dtype="f32"))
            cache[kind] = (root / "hf", root / "mt")
        return cache[kind]

    return get


def _params(mt: Path, expert_group: int | None) -> tuple[OrbaxParams, object]:
    ckpt = OrbaxCheckpoint(mt)
    cfg = ckpt.provenance["hf_config"]
    family, fcfg = forward_config(detect_family(cfg).model_config(cfg))
    return OrbaxParams(ckpt, family, detect_family(cfg).model_config(cfg), True, expert_group=expert_group), fcfg


@pytest.mark.parametrize("kind", KINDS)
def test_maxtext_forward_with_streamed_experts_equals_whole_layers_bit_for_bit(moe, monkeypatch, kind):
    """Experts read 1 or 3 at a time from the checkpoint (only the hit ones) give the logits the whole layers give,
    bit for bit; every read of an expert leaf covers at most the group."""
    _, mt = moe(kind)
    whole, fcfg = _params(mt, None)
    expected, _ = maxtext_forward(whole, fcfg, PROMPTS, "f32")
    widest: list[int] = []
    real_read = OrbaxExpertLeaf.read_experts

    def read_experts(self, xs):
        widest.append(len(xs))
        return real_read(self, xs)

    monkeypatch.setattr(OrbaxExpertLeaf, "read_experts", read_experts)
    for group in (1, 3):
        widest.clear()
        params, _ = _params(mt, group)
        got, _ = maxtext_forward(params, fcfg, PROMPTS, "f32")
        assert widest and max(widest) <= group
        assert group == 1 or max(widest) > 1        # read a group at a time, not expert by expert
        assert params.bytes_read <= whole.bytes_read
        for a, b in zip(expected, got, strict=True):
            np.testing.assert_array_equal(a, b)


def test_expert_leaf_reads_only_the_experts_asked_for(moe):
    """A MoE layer's expert leaves are not read with the layer: each read is the experts asked for, in order."""
    _, mt = moe("qwen3-moe")
    params, _ = _params(mt, 2)
    whole, _ = _params(mt, None)
    layer, full = params.layer(1), whole.layer(1)
    leaf = layer["moe_block/wi_0"]
    assert isinstance(leaf, OrbaxExpertLeaf) and leaf.shape == full["moe_block/wi_0"].shape
    assert not isinstance(layer["self_attention/query/kernel"], OrbaxExpertLeaf)
    before = params.bytes_read
    np.testing.assert_array_equal(leaf.read_experts([3, 0, 1]), full["moe_block/wi_0"][[3, 0, 1]])
    assert params.bytes_read - before == 3 * full["moe_block/wi_0"][0].nbytes
    np.testing.assert_array_equal(leaf[2], full["moe_block/wi_0"][2])


@pytest.mark.parametrize("kind", KINDS)
def test_hf_reference_with_streamed_experts_equals_the_whole_model(moe, monkeypatch, kind):
    """transformers' experts module loaded one expert at a time: the whole model's logits within float32 rounding;
    all hit experts in one group: bit for bit. At most the group is ever loaded."""
    src, _ = moe(kind)
    cfg = read_config(src)
    full, _ = reference.hf_logits(src, cfg, PROMPTS, "f32", "full")
    one_group, info = reference.hf_logits(src, cfg, PROMPTS, "f32", "stream")
    assert info["load"] == "stream"
    for a, b in zip(full, one_group, strict=True):
        np.testing.assert_array_equal(a, b)
    loaded: list[int] = []
    real = reference.StreamedModel._expert_tensors

    def expert_tensors(self, i, prefix, experts):
        loaded.append(len(experts))
        return real(self, i, prefix, experts)

    monkeypatch.setattr(reference.StreamedModel, "_expert_tensors", expert_tensors)
    streamed, info = reference.hf_logits(src, cfg, PROMPTS, "f32", "stream", expert_group=1)
    assert loaded and set(loaded) == {1} and info["expert_group"] == 1
    for a, b in zip(full, streamed, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-5 * float(np.abs(a).max()))


def _plan(mt: Path, available: int, hf_est=None, hf_load=None, group=None):
    params, _ = _params(mt, None)
    return budget.plan_memory(params, PROMPTS, "f32", hf_est, hf_load, group), params


def test_expert_group_is_the_largest_that_fits_the_budget(moe, monkeypatch):
    """With plenty of memory every expert fits in one group; with a budget for exactly k experts' slope above the
    fixed part the group is k and the planned peak stays within the budget; --expert-group overrides it."""
    _, mt = moe("qwen3-moe")
    monkeypatch.setattr(budget, "available_memory", lambda: 1 << 40)
    roomy, params = _plan(mt, 1 << 40)
    experts = roomy.experts
    assert roomy.group == experts == 4 and roomy.moe_layers == 2 and not roomy.group_forced
    dense, expert, x = params.layer_bytes(0)
    assert x == 4 and expert == roomy.expert_bytes == 3 * 64 * 32 * 4   # wi_0, wi_1, wo of one expert, f32
    slope = reference.EXPERT_COPIES * roomy.expert_bytes
    fixed = roomy.maxtext_peak - slope * roomy.group
    for k in (1, 2, 3):
        available = int((fixed + k * slope) / reference.FIT_FRACTION) + 1
        monkeypatch.setattr(budget, "available_memory", lambda a=available: a)
        plan, _ = _plan(mt, available)
        assert plan.group == k and plan.maxtext_peak <= plan.budget, (k, plan)
    forced, _ = _plan(mt, 1 << 40, group=3)
    assert forced.group == 3 and forced.group_forced
    assert _plan(mt, 1 << 40, group=99)[0].group == 4
    assert roomy.read_bytes == sum(d + e * n for d, e, n in map(params.layer_bytes, range(params.num_layers))) + \
        roomy.top_bytes


def test_the_hf_side_can_be_the_tighter_constraint(moe, monkeypatch):
    """Streamed, the reference holds a group of experts several times (read, stacked): when its fixed part is larger,
    the group is what fits it."""
    src, mt = moe("qwen3-moe")
    est = reference.estimate_memory(src, read_config(src), PROMPTS, "f32")
    assert est.experts == 4 and est.expert_bytes == 3 * 64 * 32 * 4
    assert est.stream_with(3) - est.stream_with(1) == reference.EXPERT_COPIES * 2 * est.expert_bytes
    monkeypatch.setattr(budget, "available_memory", lambda: 1 << 40)
    roomy, _ = _plan(mt, 1 << 40)
    hf_fixed = roomy.maxtext_peak + (10 << 20)      # the MaxText side's whole need, and then some
    available = int((hf_fixed + reference.EXPERT_COPIES * 2 * est.expert_bytes) / reference.FIT_FRACTION) + 1
    tight = reference.MemoryEstimate(est.full, est.stream, available, hf_fixed, est.expert_bytes, 4)
    plan, _ = _plan(mt, available, tight, "stream")
    assert plan.group == 2 and plan.hf_peak == tight.stream_with(2) <= plan.budget and plan.hf_load == "stream"
    assert _plan(mt, available, tight, "full")[0].group == 4    # loaded whole, the reference does not constrain it


def verify_json(*args, code: int = 0) -> tuple[dict, str]:
    r = runner.invoke(app, ["verify-logits", *map(str, args), "--json"])
    assert r.exit_code == code, r.output
    return json.loads(r.stdout), r.stderr


def test_memory_budget_picks_the_group_end_to_end(moe, monkeypatch):
    """Memory for two experts at a time (on the tighter side): both sides stream two at a time, the plan is printed
    before the forwards run and carried in --json, and the result still passes at KL < 1e-6."""
    src, mt = moe("mixtral")
    monkeypatch.setattr(budget, "available_memory", lambda: 1 << 40)
    roomy, _ = _plan(mt, 1 << 40)
    est = reference.estimate_memory(src, read_config(src), PROMPTS, "f32")
    copies = reference.EXPERT_COPIES
    mt_fixed = roomy.maxtext_peak - copies * roomy.expert_bytes * roomy.group
    need = max(mt_fixed + copies * 2 * roomy.expert_bytes, est.stream_fixed + copies * 2 * est.expert_bytes)
    available = int(need / reference.FIT_FRACTION) + 1
    monkeypatch.setattr(reference, "available_memory", lambda: available)
    tokens = [",".join(map(str, p.ids)) for p in PROMPTS]
    data, err = verify_json("--maxtext", mt, "--hf", src, "--max-kl", "1e-6", "--hf-load", "stream",
                            "--tokens", tokens[0], "--tokens", tokens[1])
    plan = data["memory_plan"]
    assert plan["group"] == 2 and not plan["group_forced"] and plan["experts"] == 4
    assert plan["available"] == available and max(plan["maxtext_peak"], plan["hf_peak"]) <= plan["budget"]
    assert data["reference"]["load"] == "stream" and data["reference"]["expert_group"] == 2
    assert data["passed"] and data["summary"]["kl_max"] < 1e-6
    lines = err.splitlines()
    first = next(n for n, line in enumerate(lines) if "memory plan" in line)
    assert first < next(n for n, line in enumerate(lines) if "running the Hugging Face model" in line)
    assert "experts read and applied 2 at a time (chosen from the available memory)" in err


def test_forced_expert_group_streams_both_sides_and_passes(moe):
    src, mt = moe("gpt-oss")
    data, err = verify_json("--maxtext", mt, "--hf", src, "--max-kl", "1e-6", "--hf-load", "stream",
                            "--expert-group", "1")
    assert data["memory_plan"]["group"] == 1 and data["memory_plan"]["group_forced"]
    assert data["reference"]["load"] == "stream" and data["reference"]["expert_group"] == 1
    assert data["passed"] and data["summary"]["kl_max"] < 1e-6
    assert "forced by --expert-group" in err
    r = runner.invoke(app, ["verify-logits", "--maxtext", str(mt), "--hf", str(src), "--expert-group", "0"])
    assert r.exit_code == 2


def _fp8_kimi(root: Path) -> Path:
    """A tiny Kimi K2 fp8 source stored as the release: e4m3 projections with a float32 scale_inv per 128x128 block
    (ragged edges), the rest bf16, model_type kimi_k2 with its quantization_config."""
    from tests.families.test_deepseek import QUANTIZED, load_hf, make_model, quantize_fp8

    big = dict(hidden_size=160, intermediate_size=300, moe_intermediate_size=136, kv_lora_rank=144,
               q_lora_rank=130, vocab_size=200)
    make_model("v3", "float32", **big).save_pretrained(root / "orig")
    cfg = json.loads((root / "orig" / "config.json").read_text()) | {"model_type": "kimi_k2"}
    tensors = {}
    for name, w in load_hf(root / "orig").items():
        if w.ndim == 2 and any(f".{q}." in name for q in QUANTIZED):
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8(w)
        else:
            tensors[name] = w.astype(ml_dtypes.bfloat16)
    (root / "fp8").mkdir()
    save_file(tensors, str(root / "fp8" / "model.safetensors"), metadata={"format": "pt"})
    qcfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (root / "fp8" / "config.json").write_text(json.dumps(cfg | {"quantization_config": qcfg}))
    return root / "fp8"


def test_fp8_kimi_source_is_streamed_dequantized_and_passes(tmp_path):
    """The fp8 source is the reference itself: dequantized on the fly as each layer (and each expert group) is read,
    always streamed (auto), and the f32 conversion of it passes at KL < 1e-6 with one expert at a time; loading it
    whole is refused in one line."""
    src = _fp8_kimi(tmp_path)
    mt = tmp_path / "mt"
    hf_to_maxtext(str(src), mt, ToMaxTextOptions(dtype="f32"))
    est = reference.estimate_memory(src, read_config(src), PROMPTS, "f32")
    assert est.quantized and est.experts == 4
    data, _ = verify_json("--maxtext", mt, "--hf", src, "--max-kl", "1e-6", "--expert-group", "1")
    assert data["reference"]["load"] == "stream" and data["memory_plan"]["group"] == 1
    assert data["passed"] and data["summary"]["kl_max"] < 1e-6, data["summary"]
    r = runner.invoke(app, ["verify-logits", "--maxtext", str(mt), "--hf", str(src), "--hf-load", "full"])
    assert r.exit_code == 2 and "cannot run fp8 weights" in r.stderr
