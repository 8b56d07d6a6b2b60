"""DeepSeek-V4 (deepseek4-284b): a tiny DeepseekV4ForCausalLM from transformers, converted both ways, scanned and
unscanned: bit-exact round trips, element-wise checks of the hyper-connection parts, the grouped output projection,
the hash-routing table and the constant mhc_norm; transformers-saved names; refusals; a planted table mistake.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ckpt_cli.families import deepseek4, detect_family
from ckpt_cli.families.base import Part, validate_rules
from ckpt_cli.io.safetensors import save_file
from ckpt_cli.plan import build_to_hf
from tests.cli_helpers import error_line, run
from tests.expectations import assert_bits_equal, flatten
from tests.test_convert_to_maxtext import load_hf, restore

H, E, G, RANK, X, V, L = 4, 32, 2, 8, 4, 64, 5
RATIOS = [0, 0, 4, 128, 4]    # sliding, sliding, CSA, HCA (its rate 8 in the tiny model, compress_rates), CSA


def tiny_config() -> dict:
    return dict(vocab_size=V, hidden_size=E, moe_intermediate_size=16, num_hidden_layers=L, num_attention_heads=4,
                num_key_value_heads=1, head_dim=32, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=X,
                n_shared_experts=1, o_groups=G, o_lora_rank=RANK, index_n_heads=2, index_head_dim=16, index_topk=4,
                sliding_window=8, compress_ratios=RATIOS, num_hash_layers=3, qk_rope_head_dim=8, hc_mult=H,
                compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8})


def tiny_model(seed: int = 0, **config):
    """A float32 tiny model whose buffers and zero-initialised parameters are random too (tid2eid, router bias,
    sinks, position biases, hyper-connection bases), so that no part of any tensor is a constant."""
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**(tiny_config() | config))).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("tid2eid"):
                t.copy_(torch.stack([torch.randperm(X, generator=gen)[:2] for _ in range(V)]))
            elif t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The tiny model as transformers saves it, and under the release's own tensor names."""
    root = tmp_path_factory.mktemp("ds4")
    model = tiny_model()
    saved = root / "saved"
    model.save_pretrained(saved)
    release = root / "release"
    release.mkdir()
    cfg = json.loads((saved / "config.json").read_text())
    state = load_hf(saved)
    plan = build_to_hf(detect_family(cfg), cfg, True, np.dtype(np.float32))
    names = [t.target for t in plan.tensors]
    save_file(release / "model.safetensors", {n: state[deepseek4.saved_by_transformers(n)] for n in names})
    (release / "config.json").write_text(json.dumps(cfg))
    return {"saved": saved, "release": release, "root": root}


def convert(src: Path, out: Path, *flags) -> None:
    result = run("convert", "hf-to-maxtext", src, "--out", out, "--dtype", "f32", "-q", *flags)
    assert result.exit_code == 0, result.stderr


def bf16_copy(src: Path, dest: Path) -> Path:
    """The release folder with every float tensor rounded to bf16 (tid2eid stays int64)."""
    import ml_dtypes

    dest.mkdir()
    state = {k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v for k, v in load_hf(src).items()}
    save_file(dest / "model.safetensors", state)
    (dest / "config.json").write_text((src / "config.json").read_text())
    return dest


@pytest.mark.parametrize("scan,dtype", [(True, "f32"), (False, "f32"), (True, "bf16")],
                         ids=["scan", "noscan", "scan-bf16"])
def test_round_trip_is_bit_exact(sources, tmp_path, scan, dtype):
    src = sources["release"] if dtype == "f32" else bf16_copy(sources["release"], tmp_path / "bf16")
    mt, back = tmp_path / "mt", tmp_path / "hf"
    result = run("convert", "hf-to-maxtext", src, "--out", mt, "--dtype", dtype, "-q",
                 "--scan" if scan else "--no-scan")
    assert result.exit_code == 0, result.stderr
    result = run("convert", "maxtext-to-hf", mt, "--out", back, "-q")
    assert result.exit_code == 0, result.stderr
    want, got = load_hf(src), load_hf(back)
    assert set(got) == set(want)
    for name in want:
        assert_bits_equal(got[name], want[name], name)
    assert got["layers.0.ffn.gate.tid2eid"].dtype == np.int64


def test_maxtext_leaves_element_wise(sources, tmp_path):
    """Scanned: HCA layer 3 is scan index 0 of scanned_blocks/layers_0, CSA layer 4 index 0 of layers_1."""
    convert(sources["release"], tmp_path / "mt", "--scan")
    tree = flatten(restore(tmp_path / "mt")["params"]["params"])
    hf = load_hf(sources["release"])
    hca, csa = "decoder/scanned_blocks/layers_0/", "decoder/scanned_blocks/layers_1/"
    fn, base, scale = hf["layers.3.hc_attn_fn"], hf["layers.3.hc_attn_base"], hf["layers.3.hc_attn_scale"]
    mhc = {k.removeprefix(hca + "mhc_attention/"): v[:, 0] if v.ndim > 1 else v
           for k, v in tree.items() if k.startswith(hca + "mhc_attention/")}
    np.testing.assert_array_equal(tree[hca + "mhc_attention/pre_alpha"][:, 0], fn[:H].T)
    np.testing.assert_array_equal(tree[hca + "mhc_attention/post_alpha"][:, 0], fn[H:2 * H].T)
    np.testing.assert_array_equal(tree[hca + "mhc_attention/res_alpha"][:, 0], fn[2 * H:].T)
    np.testing.assert_array_equal(tree[hca + "mhc_attention/pre_beta"][:, 0], base[:H])
    np.testing.assert_array_equal(tree[hca + "mhc_attention/res_beta"][:, 0], base[2 * H:].reshape(H, H))
    for i, part in enumerate(("pre", "post", "res")):
        np.testing.assert_array_equal(tree[hca + f"mhc_attention/{part}_alpha_scale"][:, 0], scale[i:i + 1])
    assert set(mhc) >= {"mhc_norm/scale"} and np.all(tree[hca + "mhc_attention/mhc_norm/scale"] == 1.0)
    wo_a = hf["layers.4.attn.wo_a.weight"]                       # (G*O, W)
    o_a = tree[csa + "self_attention/o_a_proj/kernel"][:, 0]      # (G, W, O)
    for g in range(G):
        np.testing.assert_array_equal(o_a[g], wo_a[g * RANK:(g + 1) * RANK].T)
    np.testing.assert_array_equal(tree[csa + "self_attention/csa_compressor/indexer/position_bias"][:, 0],
                                  hf["layers.4.attn.indexer.compressor.ape"])
    np.testing.assert_array_equal(tree[hca + "self_attention/hca_compressor/position_bias"][:, 0],
                                  hf["layers.3.attn.compressor.ape"])
    tid2eid = tree["decoder/layers_1/mlp/MoeBlock_0/tid2eid"]
    assert tid2eid.dtype == np.float32
    np.testing.assert_array_equal(tid2eid, hf["layers.1.ffn.gate.tid2eid"].astype(np.float32))
    bias = tree[csa + "mlp/MoeBlock_0/gate/bias"]                 # a variable: layers on axis 0
    assert bias.shape == (1, X)
    np.testing.assert_array_equal(bias[0], hf["layers.4.ffn.gate.bias"])
    np.testing.assert_array_equal(tree[hca + "mlp/MoeBlock_0/wi_1"][2, 0], hf["layers.3.ffn.experts.2.w3.weight"].T)
    np.testing.assert_array_equal(tree["decoder/hc_head/hc_fn"], hf["hc_head_fn"].T)


def test_transformers_saved_names_convert_like_the_release(sources, tmp_path):
    convert(sources["release"], tmp_path / "a", "--no-scan")
    convert(sources["saved"], tmp_path / "b", "--no-scan")
    a, b = flatten(restore(tmp_path / "a")["params"]), flatten(restore(tmp_path / "b")["params"])
    assert set(a) == set(b)
    for k in a:
        assert_bits_equal(np.asarray(b[k]), np.asarray(a[k]), k)


def test_maxtext_to_hf_loads_in_transformers_with_the_same_logits(sources, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    convert(sources["saved"], tmp_path / "mt", "--scan")
    assert run("convert", "maxtext-to-hf", tmp_path / "mt", "--out", tmp_path / "hf", "-q").exit_code == 0
    ids = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(sources["saved"], dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(ids).logits
    assert torch.equal(got, want)


def test_scan_refused_when_the_layers_after_the_hash_layers_are_not_hca_csa_pairs(sources, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").symlink_to(sources["release"] / "model.safetensors")
    cfg = json.loads((sources["release"] / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"layer_types": None, "compress_ratios": [0, 0, 4, 4, 128]}))
    result = run("convert", "hf-to-maxtext", src, "--out", tmp_path / "out", "--scan")
    assert result.exit_code != 0 and "HCA / CSA pairs" in error_line(result)
    assert not (tmp_path / "out").exists()


def test_a_misshaped_hyper_connection_is_one_line(sources, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    state = load_hf(sources["release"])
    state["layers.2.hc_ffn_fn"] = state["layers.2.hc_ffn_fn"][:-1]
    save_file(src / "model.safetensors", state)
    (src / "config.json").write_text((sources["release"] / "config.json").read_text())
    result = run("convert", "hf-to-maxtext", src, "--out", tmp_path / "out")
    assert result.exit_code != 0 and "layers.2.hc_ffn_fn" in error_line(result)


def test_planted_mistake_in_the_hyper_connection_parts_is_caught():
    """A res part one block short (count H - 1) leaves rows of fn unread: the table check says so."""
    cfg = tiny_config() | {"model_type": "deepseek_v4"}
    dims = deepseek4.dims(cfg)
    rules = list(deepseek4.hyper_connection("mhc_attention", "hc_attn", H))
    validate_rules(rules, dims)
    bad = [r if r.maxtext != "mhc_attention/res_alpha" else
           type(r)(**{**r.__dict__, "part": Part(-2, 2, 2 + H, True, H - 1), "maxtext_shape": ("H*E", "12")})
           for r in rules]
    with pytest.raises(AssertionError, match="leave a gap"):
        validate_rules(bad, dims)


def test_part_repr_is_unchanged_for_single_blocks():
    assert repr(Part(-1, 0, 2)) == "Part(axis=-1, start=0, step=2, blocked=False)"
    assert repr(Part(-2, 2, 6, True, 4)) == "Part(axis=-2, start=2, step=6, blocked=True, count=4)"
    assert Part(-2, 2, 6, True, 4).slice(24) == slice(8, 24) and Part(-2, 2, 6, True, 4).length(24) == 16


def test_plan_and_inspect_by_model_name():
    """No data: the reference config alone prices the 284B model (its parameter count is the tree's) and lists it."""
    result = run("plan", "hf-to-maxtext", "--model", "deepseek4-284b", "--json", "--read-gbps", "1",
                 "--write-gbps", "0.5")
    assert result.exit_code in (0, 1), result.stderr        # 1: no-go on this machine's disk
    figures = json.loads(result.stdout)
    assert figures["family"] == "deepseek4" and figures["tensors"] == 220
    assert 284e9 < figures["parameters"] < 285e9
    # priced as the release stores it: fp4 routed experts (0.5 byte + a scale byte per 32) and fp8 projections;
    # the routed experts alone are 43 * 256 * 3 * 2048 * 4096 elements
    experts = 43 * 256 * 3 * 2048 * 4096
    assert experts * 17 / 32 < figures["bytes"]["source"] < experts * 17 / 32 + 12e9
    assert figures["bytes"]["written"] > 2 * figures["parameters"]          # bf16 output
    result = run("inspect", "--model", "deepseek4-284b", "--json")
    assert result.exit_code == 0, result.stderr
    assert "decoder/scanned_blocks/layers_1/self_attention/csa_compressor/indexer/q_proj/kernel" in result.stdout


@pytest.mark.parametrize("rule,message", [
    (dict(maxtext="a/scale", hf="x.weight", maxtext_shape="E", hf_shape="", fill=1.0), "constant leaf"),
    (dict(maxtext="a/scale", hf="", maxtext_shape="E", hf_shape=""), "constant leaf"),
    (dict(maxtext="a/k", hf="x", maxtext_shape="E", hf_shape="2*E", part=Part(-1, 0, 2, False, 2)),
     "only a blocked part"),
    (dict(maxtext="a/k", hf="x", maxtext_shape="E", hf_shape="E", hf_dtype="int8"), "unknown HF dtype"),
])
def test_bad_new_rule_fields_are_refused(rule, message):
    from ckpt_cli.families.base import row

    with pytest.raises(AssertionError, match=message):
        validate_rules([row(**rule)], {"E": 4})


def test_grouped_transpose_round_trip_and_layout():
    from ckpt_cli.transforms import GroupedLinear

    g, w, o = 3, 5, 4
    hf = np.arange(g * o * w, dtype=np.float32).reshape(g * o, w)
    mt = GroupedLinear().to_maxtext(hf, (g, w, o))
    assert mt.shape == (g, w, o) and mt[2, 1, 3] == hf[2 * o + 3, 1]
    assert_bits_equal(GroupedLinear().to_hf(mt, hf.shape), hf, "round trip")


def test_a_trained_mhc_norm_is_noted_on_export(sources, tmp_path):
    """MaxText trains mhc_norm; HF has no tensor for it: maxtext-to-hf says so when it is not all ones."""
    import tensorstore as ts

    from ckpt_cli.io.orbax import OrbaxCheckpoint

    convert(sources["release"], tmp_path / "mt", "--no-scan")
    result = run("convert", "maxtext-to-hf", tmp_path / "mt", "--out", tmp_path / "a")
    assert result.exit_code == 0 and "not all 1" not in result.stderr
    ckpt = OrbaxCheckpoint(tmp_path / "mt")
    leaf = "decoder/layers_2/mhc_mlp/mhc_norm/scale"
    arr = ts.open(ckpt.array_spec(leaf), context=ckpt.context).result()
    arr[3].write(np.float32(1.5)).result()
    result = run("convert", "maxtext-to-hf", tmp_path / "mt", "--out", tmp_path / "b")
    assert result.exit_code == 0, result.stderr
    assert f"1 MaxText leaf/leaves with no Hugging Face tensor are not all 1 (e.g. {leaf})" in result.stderr


@pytest.mark.parametrize("change,message", [
    ({"compress_ratios": [0, 0, 2, 128, 4]}, "at 4 \\(CSA\\) or more"),
    ({"compress_ratios": [0, 0, 4, 128, 64]}, "several HCA compress ratios"),
    ({"compress_rates": {"compressed_sparse_attention": 8}, "compress_ratios": None}, "CSA rate 8"),
    ({"quantization_config": {"quant_method": "mxfp4"}}, "'mxfp4' is not supported"),
])
def test_configs_maxtext_cannot_hold_are_refused(change, message):
    from ckpt_cli.errors import UnsupportedError

    cfg = tiny_config() | {"model_type": "deepseek_v4"} | change
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(UnsupportedError, match=message):
        deepseek4.FAMILY.check_config(cfg, frozenset())
