"""Qwen3-Next: the converted tree element by element (expectations from MaxText 0.2.5's QWEN3_NEXT mapping and
hooks, written here with explicit index math), bit-exact round trips scanned and unscanned, refusals.

Tiny model (tests/conftest.py "qwen3-next"): 8 layers = two cycles of 3 gated DeltaNet layers + 1 full attention.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ckpt_cli import registry
from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf
from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families import detect_family
from tests.cli_helpers import error_line, run, with_config
from tests.conftest import read_config
from tests.expectations import assert_bits_equal, cast, flatten
from tests.test_convert_to_maxtext import load_hf, restore


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def expected_layer(hf: dict, cfg: dict, i: int) -> dict[str, np.ndarray]:
    """MaxText leaves of HF layer i, float32, with the index math of 0.2.5's hooks spelt out."""
    E, N, K, D = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    X = cfg["num_experts"]
    p = f"model.layers.{i}."
    out = {"input_layernorm/scale": _f32(hf[p + "input_layernorm.weight"]),
           "post_attention_layernorm/scale": _f32(hf[p + "post_attention_layernorm.weight"]),
           "mlp/routed_experts/gate/kernel": _f32(hf[p + "mlp.gate.weight"]).T,            # [e, x] = w[x, e]
           "mlp/shared_expert_gate/kernel": _f32(hf[p + "mlp.shared_expert_gate.weight"]).T}
    for leaf, name in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
        out[f"mlp/routed_experts/{leaf}"] = np.stack([_f32(hf[p + f"mlp.experts.{x}.{name}.weight"]).T
                                                     for x in range(X)])
        out[f"mlp/shared_expert/{leaf}/kernel"] = _f32(hf[p + f"mlp.shared_expert.{name}.weight"]).T
    if cfg["layer_types"][i] == "linear_attention":
        la = p + "linear_attn."
        conv = _f32(hf[la + "conv1d.weight"])                                               # (C, 1, CK)
        C, _, CK = conv.shape
        kernel = np.empty((CK, 1, C), np.float32)
        for k in range(CK):
            for c in range(C):
                kernel[k, 0, c] = conv[c, 0, k]
        out |= {"attention/in_proj_qkvz/kernel": _f32(hf[la + "in_proj_qkvz.weight"]).T,
                "attention/in_proj_ba/kernel": _f32(hf[la + "in_proj_ba.weight"]).T,
                "attention/conv1d/kernel": kernel,
                "attention/A_log": _f32(hf[la + "A_log"]), "attention/dt_bias": _f32(hf[la + "dt_bias"]),
                "attention/norm/rms_norm/scale": _f32(hf[la + "norm.weight"]),
                "attention/out_proj/kernel": _f32(hf[la + "out_proj.weight"]).T}
        return out
    sa, a = p + "self_attn.", "attention/attention/"
    q = _f32(hf[sa + "q_proj.weight"])                                                      # (N*2D, E)
    query = np.empty((E, N, 2 * D), np.float32)
    for h in range(N):
        for j in range(2 * D):
            query[:, h, j] = q[h * 2 * D + j, :]     # per head: the query (j < D), then its gate (j >= D)
    for leaf, name in (("key", "k_proj"), ("value", "v_proj")):
        w = _f32(hf[sa + f"{name}.weight"])
        out[a + f"{leaf}/kernel"] = np.stack([np.stack([w[h * D + d] for d in range(D)], axis=1)
                                              for h in range(K)], axis=1)                   # [e, h, d] = w[hD+d, e]
    out |= {a + "query/kernel": query, a + "out/kernel": _f32(hf[sa + "o_proj.weight"]).T,   # (N*D, E), flat
            a + "query_norm/scale": _f32(hf[sa + "q_norm.weight"]),
            a + "key_norm/scale": _f32(hf[sa + "k_norm.weight"])}
    return out


def expected_tree(hf: dict, cfg: dict, scan: bool) -> dict[str, np.ndarray]:
    """Scanned: local_layers stacks cycle b's layers 4b, 4b+1, 4b+2 on axes (1, 2) = (b, position);
    global_layer stacks layer 4b + 3 on axis 1; routed experts keep axis 0."""
    tree = {"token_embedder/embedding": _f32(hf["model.embed_tokens.weight"]),
            "decoder/decoder_norm/scale": _f32(hf["model.norm.weight"]),
            "decoder/logits_dense/kernel": _f32(hf["lm_head.weight"]).T}
    L, cycle = cfg["num_hidden_layers"], cfg["layer_types"].index("full_attention") + 1
    layers = [expected_layer(hf, cfg, i) for i in range(L)]
    if not scan:
        for i, lay in enumerate(layers):
            tree |= {f"decoder/layers_{i}/{leaf}": x for leaf, x in lay.items()}
        return tree
    blocks = range(L // cycle)
    for leaf in layers[0]:
        grid = [[layers[cycle * b + p][leaf] for p in range(cycle - 1)] for b in blocks]
        tree[f"decoder/layers/local_layers/{leaf}"] = np.stack([np.stack(r, axis=1) for r in grid], axis=1)
    for leaf in layers[cycle - 1]:
        tree[f"decoder/layers/global_layer/{leaf}"] = np.stack([layers[cycle * b + cycle - 1][leaf] for b in blocks],
                                                               axis=1)
    return tree


CASES = [("float32", True, "f32"), ("float32", False, "f32"), ("bfloat16", True, "bf16"), ("bfloat16", False, "bf16")]


@pytest.mark.parametrize("src_dtype,scan,dtype", CASES)
def test_converted_tree_matches_maxtext_0_2_5_mapping(hf_models, tmp_path, src_dtype, scan, dtype):
    src = hf_models("qwen3-next", src_dtype)
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    got = flatten(restore(tmp_path / "mt")["params"]["params"])
    want = expected_tree(load_hf(src), read_config(src), scan)
    assert set(got) == set(want)
    for path, x in want.items():
        assert_bits_equal(got[path], cast(x, dtype), path)
    if scan:   # 2 cycles of 3 local layers; X=4 experts on axis 0
        assert got["decoder/layers/local_layers/mlp/routed_experts/wi_0"].shape == (4, 2, 3, 64, 32)
        assert got["decoder/layers/local_layers/attention/conv1d/kernel"].shape == (4, 2, 3, 1, 80)
        assert got["decoder/layers/global_layer/attention/attention/query/kernel"].shape == (64, 2, 4, 32)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_round_trip_is_bit_exact(hf_models, tmp_path, scan, dtype):
    """Every tensor is a permutation of the original: HF -> MaxText -> HF gives the same names and bits."""
    src = hf_models("qwen3-next", "bfloat16" if dtype == "bf16" else "float32")
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    result = maxtext_to_hf(str(tmp_path / "mt"), tmp_path / "hf", ToHFOptions(dtype=dtype))
    assert result.plan.scan_layers is scan
    want, got = load_hf(src), load_hf(tmp_path / "hf")
    assert sorted(got) == sorted(want)
    for name, x in want.items():
        assert_bits_equal(got[name], x, name)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3NextForCausalLM"] and config["model_type"] == "qwen3_next"


def test_round_trip_loads_in_transformers_with_the_same_logits(hf_models, tmp_path):
    import torch
    import transformers as tf

    src = hf_models("qwen3-next", "float32")
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=True, dtype="f32"))
    maxtext_to_hf(str(tmp_path / "mt"), tmp_path / "hf", ToHFOptions(dtype="f32"))
    ids = torch.tensor([[3, 17, 5, 99, 42, 7]])
    with torch.no_grad():
        a = tf.AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
        b = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
    assert torch.equal(a, b)


REFUSED = [
    ({"layer_types": ["linear_attention", "full_attention"] * 24}, "layer_types"),
    ({"full_attention_interval": 1}, "full attention every 1 layer"),
    ({"mlp_only_layers": [1]}, "mlp_only_layers"),
    ({"attention_bias": True}, "attention_bias"),
]


@pytest.mark.parametrize("changes,message", REFUSED)
def test_refused_configs_are_one_line(changes, message):
    cfg = registry.reference_config("qwen3-next-80b-a3b") | changes
    family = detect_family(cfg)
    assert family.name == "qwen3_next"
    with pytest.raises(UnsupportedError) as exc:
        family.check_config(cfg)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_scanned_needs_whole_cycles_and_says_so_on_the_cli(hf_models, tmp_path):
    cfg = read_config(hf_models("qwen3-next"))
    src = with_config(hf_models("qwen3-next"), tmp_path / "src", num_hidden_layers=6,
                      layer_types=cfg["layer_types"][:6])
    out = tmp_path / "mt"
    # --allow-unused: the 6-layer config over 8 layers of files reaches the family's own check
    r = run("convert", "hf-to-maxtext", src, "--out", out, "--allow-unused")
    assert r.exit_code == 2, r.output
    assert error_line(r) == ("error: config.json has 6 layers: scanned, MaxText's qwen3_next stacks whole cycles of "
                             "4 layers; convert with --no-scan")
    assert not out.exists() and not out.with_name("mt.partial").exists()


def test_reference_model_plan_and_inspect():
    spec = registry.lookup("qwen3-next-80b-a3b")
    assert (spec.repo_id, spec.family) == ("Qwen/Qwen3-Next-80B-A3B-Instruct", "qwen3_next")
    r = run("inspect", "--model", "qwen3-next-80b-a3b", "--filter", "decoder/layers/local_layers/attention/conv*",
            "--json")
    assert r.exit_code == 0, r.output
    tensors = {t["path"]: t["shape"] for t in json.loads(r.stdout)["tensors"]}
    assert tensors == {"decoder/layers/local_layers/attention/conv1d/kernel": [4, 12, 3, 1, 8192]}
    r = run("plan", "hf-to-maxtext", "--model", "qwen3-next-80b-a3b", "--no-scan", "--json")
    assert r.exit_code in (0, 1), r.output
    assert json.loads(r.stdout)["family"] == "qwen3_next"


FP8_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj", "gate_proj",
               "up_proj", "down_proj")   # the linear layers; router, shared-expert gate, conv, norms stay bf16


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_fp8_source_dequantizes_on_the_fly(hf_models, tmp_path, dtype):
    """Block-scaled e4m3 weights (a float32 `weight_scale_inv` per 128x128 block, ragged edges, scales in another
    shard), as the -FP8 releases store them, convert like their dequantization, in one pass; the reverse writes
    plain weights of the output dtype and drops `quantization_config`."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from tests.families.test_deepseek import quantize_fp8

    src = hf_models("qwen3-next", "float32")
    cfg = read_config(src)
    fp8, reference, scales = {}, {}, {}
    for name, w in load_hf(src).items():
        if w.ndim == 2 and name.split(".")[-2] in FP8_WEIGHTS:
            q, s = quantize_fp8(w)
            fp8[name], scales[name + "_scale_inv"] = q, s
            reference[name] = q.astype(np.float32) * s[np.arange(w.shape[0]) // 128][:, np.arange(w.shape[1]) // 128]
        else:
            fp8[name] = reference[name] = w.astype(ml_dtypes.bfloat16)
    assert sum(v.dtype == ml_dtypes.float8_e4m3fn for v in fp8.values()) > 50
    (tmp_path / "fp8").mkdir()
    save_file(fp8, str(tmp_path / "fp8" / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(scales, str(tmp_path / "fp8" / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in fp8} | {
        k: "model-00002-of-00002.safetensors" for k in scales}
    (tmp_path / "fp8" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    qcfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg | {"quantization_config": qcfg}))

    r = hf_to_maxtext(str(tmp_path / "fp8"), tmp_path / "mt", ToMaxTextOptions(dtype=dtype))
    assert not any("not used" in n for n in r.notes), r.notes   # the scales are consumed, not ignored
    got = flatten(restore(tmp_path / "mt")["params"]["params"])
    want = expected_tree(reference, cfg, True)
    assert set(got) == set(want)
    for path, x in want.items():
        assert_bits_equal(got[path], cast(x, dtype), path)
    maxtext_to_hf(str(tmp_path / "mt"), tmp_path / "hf", ToHFOptions(dtype=dtype))
    back = load_hf(tmp_path / "hf")
    assert sorted(back) == sorted(reference)
    for name, x in reference.items():
        assert_bits_equal(back[name], cast(np.asarray(x, np.float32), dtype), name)
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())


def test_checkpoint_saved_by_orbax_itself_converts_back(hf_models, tmp_path):
    """A scanned tree saved by orbax's own PyTree handler (each array one chunk, every layer in it, no ckpt
    metadata), as MaxText saves it: read a block of layers at a time along the inner (position) axis with the
    cycle axis fixed, and written back bit-exact with --hf-config."""
    import orbax.checkpoint as ocp

    src = hf_models("qwen3-next", "float32")
    tree: dict = {}
    for path, x in expected_tree(load_hf(src), read_config(src), True).items():
        node = tree
        *parents, name = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = x
    manager = ocp.CheckpointManager(
        tmp_path / "run", item_names=("items",),
        item_handlers={"items": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)},
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
    manager.save(7, args=ocp.args.Composite(items=ocp.args.PyTreeSave(item={"params": {"params": tree}})),
                 custom_metadata={"scan_layers": True})
    manager.wait_until_finished()
    manager.close()
    result = maxtext_to_hf(str(tmp_path / "run"), tmp_path / "hf",
                           ToHFOptions(dtype="f32", hf_config=src / "config.json"))
    assert result.stats.extra["blocks_read"] > 0
    want, got = load_hf(src), load_hf(tmp_path / "hf")
    assert sorted(got) == sorted(want)
    for name, x in want.items():
        assert_bits_equal(got[name], x, name)


def test_model_check_reads_the_pattern_from_layer_types():
    """transformers 5 writes `layer_types` instead of `full_attention_interval`: --model compares the pattern."""
    from ckpt_cli.errors import ConfigMismatchError

    spec = registry.lookup("qwen3-next-80b-a3b")
    keys = detect_family(spec.config).reference_keys
    v5 = {k: v for k, v in spec.config.items() if k != "full_attention_interval"}
    registry.check_against(spec, v5 | {"layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 12}, keys)
    with pytest.raises(ConfigMismatchError, match="full_attention_interval = 2"):
        registry.check_against(spec, v5 | {"layer_types": ["linear_attention", "full_attention"] * 24}, keys)
