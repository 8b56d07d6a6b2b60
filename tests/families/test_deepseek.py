"""DeepSeek V2 / V3 / V3.2: tree and element-wise checks from the spec, round trip, fp8 on the fly, MTP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ckpt_cli import engine, registry
from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.dtypes import output_dtype
from ckpt_cli.errors import ConfigMismatchError
from ckpt_cli.families import detect_family
from ckpt_cli.io.orbax import OrbaxCheckpoint
from ckpt_cli.plan import build_to_hf, build_to_maxtext
from tests.expectations import assert_bits_equal, flatten

TINY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8, vocab_size=128, max_position_embeddings=256)


def make_model(kind: str, dtype: str = "float32", seed: int = 0, **overrides):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "v2":
        cfg = tf.DeepseekV2Config(**(TINY | {"q_lora_rank": None} | overrides))
        model = tf.DeepseekV2ForCausalLM(cfg)
    elif kind == "v3":
        cfg = tf.DeepseekV3Config(**(TINY | {"q_lora_rank": 32, "n_group": 1, "topk_group": 1} | overrides))
        model = tf.DeepseekV3ForCausalLM(cfg)
    elif kind == "v32":
        cfg = tf.DeepseekV32Config(**(TINY | {"q_lora_rank": 32, "n_group": 1, "topk_group": 1, "index_n_heads": 2,
                                              "index_head_dim": 8, "index_topk": 16} | overrides))
        model = tf.DeepseekV32ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_((1.0 if p.ndim == 1 else 0.0) + 0.05 * torch.randn_like(p))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))
    return model.to(getattr(torch, dtype)).eval()


@pytest.fixture(scope="session")
def deepseek_models(tmp_path_factory):
    cache: dict = {}

    def get(kind: str, dtype: str = "float32", sharded: bool = False) -> Path:
        key = (kind, dtype, sharded)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"ds-{kind}-{dtype}")
            make_model("v3" if kind == "kimi" else kind, dtype).save_pretrained(
                folder, max_shard_size="60KB" if sharded else "10GB")
            if kind == "kimi":
                as_kimi(folder)
            cache[key] = folder
        return cache[key]

    return get


def as_kimi(folder: Path) -> None:
    """A DeepSeek-V3 checkpoint relabelled as Kimi K2 releases are: model_type `kimi_k2` (the repo's own code),
    architectures DeepseekV3ForCausalLM, the same tensor names."""
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"model_type": "kimi_k2",
                                                          "architectures": ["DeepseekV3ForCausalLM"]}))


def load_hf(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def f32(x):
    return np.asarray(x, dtype=np.float32)


def expected_layer(hf: dict, cfg: dict, i: int) -> dict[str, np.ndarray]:
    """Per-layer MaxText leaves of HF layer i, from §7.3 with explicit index math."""
    E, N = cfg["hidden_size"], cfg["num_attention_heads"]
    dn, dr, dv, C = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    dq = dn + dr
    p = f"model.layers.{i}."
    out = {
        "pre_self_attention_layer_norm/scale": f32(hf[p + "input_layernorm.weight"]),
        "post_self_attention_layer_norm/scale": f32(hf[p + "post_attention_layernorm.weight"]),
        "self_attention/wkv_a/kernel": f32(hf[p + "self_attn.kv_a_proj_with_mqa.weight"]).T,
        "self_attention/kv_norm/scale": f32(hf[p + "self_attn.kv_a_layernorm.weight"]),
        # wkv_b_mt[c, h, j] = kv_b_hf[h*(Dn+Dv) + j, c]
        "self_attention/wkv_b/kernel": np.einsum("hjc->chj", f32(hf[p + "self_attn.kv_b_proj.weight"]).reshape(
            N, dn + dv, C)),
        # out_mt[h, d, e] = o_hf[e, h*Dv + d]
        "self_attention/out/kernel": np.einsum("ehd->hde", f32(hf[p + "self_attn.o_proj.weight"]).reshape(E, N, dv)),
    }
    if cfg.get("q_lora_rank"):
        Q = cfg["q_lora_rank"]
        out["self_attention/wq_a/kernel"] = f32(hf[p + "self_attn.q_a_proj.weight"]).T
        out["self_attention/q_norm/scale"] = f32(hf[p + "self_attn.q_a_layernorm.weight"])
        out["self_attention/wq_b/kernel"] = np.einsum("hjq->qhj", f32(hf[p + "self_attn.q_b_proj.weight"]).reshape(
            N, dq, Q))
    else:
        out["self_attention/query/kernel"] = np.einsum("hje->ehj", f32(hf[p + "self_attn.q_proj.weight"]).reshape(
            N, dq, E))
    if cfg["model_type"] == "deepseek_v32":
        H, Hd, Q = cfg["index_n_heads"], cfg["index_head_dim"], cfg["q_lora_rank"]
        ix = p + "self_attn.indexer."
        out["self_attention/indexer/wq_b/kernel"] = np.einsum("hdq->qhd", f32(hf[ix + "wq_b.weight"]).reshape(H, Hd, Q))
        out["self_attention/indexer/wk/kernel"] = f32(hf[ix + "wk.weight"]).T
        out["self_attention/indexer/k_norm/scale"] = f32(hf[ix + "k_norm.weight"])
        out["self_attention/indexer/k_norm/bias"] = f32(hf[ix + "k_norm.bias"])
        out["self_attention/indexer/weights_proj/kernel"] = f32(hf[ix + "weights_proj.weight"]).T
    if i < cfg["first_k_dense_replace"]:
        for mt, name in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
            out[f"mlp/{mt}/kernel"] = f32(hf[p + f"mlp.{name}.weight"]).T
    else:
        m = "DeepSeekMoeBlock_0/"
        X = cfg["n_routed_experts"]
        out[m + "MoeBlock_0/gate/kernel"] = f32(hf[p + "mlp.gate.weight"]).T
        if cfg["model_type"] != "deepseek_v2":
            out[m + "MoeBlock_0/gate/bias"] = f32(hf[p + "mlp.gate.e_score_correction_bias"])
        for mt, name in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
            out[m + f"MoeBlock_0/{mt}"] = np.stack([f32(hf[p + f"mlp.experts.{x}.{name}.weight"]).T for x in range(X)])
            out[m + f"shared_experts/{mt}/kernel"] = f32(hf[p + f"mlp.shared_experts.{name}.weight"]).T
    return out


def expected_tree(hf: dict, cfg: dict, scan: bool, mtp: bool = False) -> dict[str, np.ndarray]:
    tree = {"token_embedder/embedding": f32(hf["model.embed_tokens.weight"]),
            "decoder/decoder_norm/scale": f32(hf["model.norm.weight"]),
            "decoder/logits_dense/kernel": f32(hf["lm_head.weight"]).T}
    ld, L = cfg["first_k_dense_replace"], cfg["num_hidden_layers"]
    for group, layers in (("dense_layers", range(0, ld)), ("moe_layers", range(ld, L))):
        per = [expected_layer(hf, cfg, i) for i in layers]
        for leaf in per[0]:
            if scan:
                # experts keep axis 0 and the layer axis goes to 1; everything else: layer axis at 1, except
                # the router bias, a non-parameter variable in MaxText 0.2.5: layer axis at 0, (Lm, X)
                axis = 0 if leaf.endswith("gate/bias") else 1
                tree[f"decoder/{group}/{leaf}"] = np.stack([lay[leaf] for lay in per], axis=axis)
            else:
                for j, lay in enumerate(per):
                    tree[f"decoder/{group}_{j}/{leaf}"] = lay[leaf]
    if mtp:
        p = f"model.layers.{L}."
        tree["mtp_block/mtp_layer_1/mtp_1_embedding_norm/scale"] = f32(hf[p + "enorm.weight"])
        tree["mtp_block/mtp_layer_1/mtp_1_hidden_state_norm/scale"] = f32(hf[p + "hnorm.weight"])
        tree["mtp_block/mtp_layer_1/mtp_1_projection/kernel"] = f32(hf[p + "eh_proj.weight"]).T
        tree["mtp_block/mtp_layer_1/mtp_1_final_norm/scale"] = f32(hf[p + "shared_head.norm.weight"])
        for leaf, value in expected_layer(hf, cfg | {"first_k_dense_replace": 0}, L).items():
            tree[f"mtp_block/mtp_layer_1/mtp_1_transformer_layer/{leaf}"] = value
    return tree


def restore(out: Path) -> dict:
    import orbax.checkpoint as ocp

    return flatten(ocp.PyTreeCheckpointer().restore(str(out / "0" / "items"))["params"]["params"])


def cast(x, dtype):
    return x.astype(ml_dtypes.bfloat16 if dtype == "bf16" else np.float32)


@pytest.mark.parametrize("kind,scan,dtype,sharded", [
    ("v2", True, "f32", False), ("v2", False, "bf16", True),
    ("v3", True, "bf16", True), ("v3", False, "f32", False),
    ("v32", True, "f32", False), ("v32", False, "bf16", False),
    ("kimi", True, "bf16", True), ("kimi", False, "f32", False),
])
def test_tree_matches_spec(deepseek_models, tmp_path, kind, scan, dtype, sharded):
    src = deepseek_models(kind, "float32", sharded)
    cfg = json.loads((src / "config.json").read_text())
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    got = restore(tmp_path / "mt")
    want = expected_tree(load_hf(src), cfg, scan)
    assert set(got) == set(want)
    for path, value in want.items():
        # the router bias is stored float32 whatever the output dtype (as the released checkpoints hold it)
        assert_bits_equal(got[path], cast(value, "f32" if path.endswith("gate/bias") else dtype), path)
    if scan:
        wi0 = got["decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0/wi_0"]
        assert wi0.shape == (4, 2, 64, 32)   # (X, Lm, E, M): experts on 0, layers on 1


class DictWriter:
    """A test writer collecting whole target tensors in memory."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def create(self, target, shape, dtype, chunk, read_chunk=None):
        self.arrays[target] = np.zeros(shape, dtype)

    def write(self, target, index, array):
        self.arrays[target][index] = array
        return 0

    def flush(self):
        pass


@pytest.mark.parametrize("kind,scan,dtype", [("v2", True, "bf16"), ("v3", False, "bf16"), ("v32", True, "f32"),
                                             ("kimi", True, "bf16")])
def test_round_trip_exact(deepseek_models, tmp_path, kind, scan, dtype):
    src_dtype = "bfloat16" if dtype == "bf16" else "float32"
    src = deepseek_models(kind, src_dtype)
    cfg = json.loads((src / "config.json").read_text())
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    ckpt = OrbaxCheckpoint(tmp_path / "mt")
    plan = build_to_hf(detect_family(cfg), ckpt.provenance["hf_config"], ckpt.scan_layers, output_dtype(dtype))
    writer = DictWriter()
    engine.validate(plan, ckpt)
    engine.execute(plan, ckpt, writer)
    original = load_hf(src)
    assert set(writer.arrays) == set(original)
    for name, value in original.items():
        assert_bits_equal(writer.arrays[name], value, name)


def add_mtp_layer(folder: Path, seed: int = 1) -> None:
    """Append a DeepSeek-V3-style MTP layer (model.layers.L.*) as its own shard, the way the official repo stores it."""
    hf = load_hf(folder)
    cfg = json.loads((folder / "config.json").read_text())
    L, E = cfg["num_hidden_layers"], cfg["hidden_size"]
    rng = np.random.default_rng(seed)
    dtype = hf["model.norm.weight"].dtype
    extra = {}
    for name, value in hf.items():
        if name.startswith(f"model.layers.{L - 1}."):
            extra[name.replace(f"model.layers.{L - 1}.", f"model.layers.{L}.")] = (
                rng.standard_normal(value.shape).astype(np.float32) * 0.05 + (value.ndim == 1)).astype(dtype)
    p = f"model.layers.{L}."
    extra[p + "enorm.weight"] = (1 + 0.1 * rng.standard_normal(E)).astype(dtype)
    extra[p + "hnorm.weight"] = (1 + 0.1 * rng.standard_normal(E)).astype(dtype)
    extra[p + "eh_proj.weight"] = (0.05 * rng.standard_normal((E, 2 * E))).astype(dtype)
    extra[p + "embed_tokens.weight"] = hf["model.embed_tokens.weight"]
    extra[p + "shared_head.norm.weight"] = (1 + 0.1 * rng.standard_normal(E)).astype(dtype)
    extra[p + "shared_head.head.weight"] = hf["lm_head.weight"]
    save_file(extra, str(folder / "model-mtp.safetensors"), metadata={"format": "pt"})
    main = sorted(f.name for f in folder.glob("model*.safetensors") if f.name != "model-mtp.safetensors")
    weight_map = {k: f for f in main for k in load_file(str(folder / f))}
    weight_map |= {k: "model-mtp.safetensors" for k in extra}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("scan", [True, False])
def test_mtp_layer_converts_and_round_trips(deepseek_models, tmp_path, scan):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(deepseek_models("v3", "bfloat16"), src)
    add_mtp_layer(src)
    cfg = json.loads((src / "config.json").read_text())
    # Without --mtp: skipped with a note, tree has no mtp_block.
    r = hf_to_maxtext(str(src), tmp_path / "plain", ToMaxTextOptions(scan_layers=scan))
    assert any("multi-token-prediction" in n for n in r.notes)
    assert not any(p.startswith("mtp_block") for p in restore(tmp_path / "plain"))
    # With --mtp: the MTP tree MaxText builds with mtp_num_layers=1.
    hf_to_maxtext(str(src), tmp_path / "mtp", ToMaxTextOptions(scan_layers=scan, mtp=True))
    got = restore(tmp_path / "mtp")
    want = expected_tree(load_hf(src), cfg, scan, mtp=True)
    assert set(got) == set(want)
    for path, value in want.items():
        assert_bits_equal(got[path], cast(value, "f32" if path.endswith("gate/bias") else "bf16"), path)
    # And back: every converted MTP tensor returns bit-identical.
    ckpt = OrbaxCheckpoint(tmp_path / "mtp")
    plan = build_to_hf(detect_family(cfg), cfg, scan, output_dtype("bf16"), frozenset({"mtp"}))
    writer = DictWriter()
    engine.execute(plan, ckpt, writer)
    original = load_hf(src)
    shared = {f"model.layers.{cfg['num_hidden_layers']}.{s}" for s in ("embed_tokens.weight",
                                                                      "shared_head.head.weight")}
    assert set(writer.arrays) == set(original) - shared
    for name, value in writer.arrays.items():
        assert_bits_equal(value, original[name], name)


# ---------------------------------------------------------------- fp8 sources

QUANTIZED = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
             "down_proj", "eh_proj")


def quantize_fp8(w: np.ndarray, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's storage: e4m3 values and a float32 scale_inv per block (ragged edge blocks included)."""
    rows, cols = w.shape
    nb_r, nb_c = -(-rows // block), -(-cols // block)
    scale = np.zeros((nb_r, nb_c), np.float32)
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    for i in range(nb_r):
        for j in range(nb_c):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block].astype(np.float32)
            s = max(float(np.abs(blk).max()) / 448.0, 1e-12)
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


@pytest.mark.parametrize("model_type", ["deepseek_v3", "kimi_k2"])
def test_fp8_source_equals_dequantized_reference(tmp_path, model_type):
    """fp8 e4m3 + 128x128 scale_inv (ragged edges, a scale in another shard) converts like its bf16 dequantization;
    Kimi K2's fp8 release (model_type kimi_k2) stores it the same way."""
    big = dict(hidden_size=160, intermediate_size=300, moe_intermediate_size=136, kv_lora_rank=144,
               q_lora_rank=130, vocab_size=200)
    model = make_model("v3", "float32", **big)
    model.save_pretrained(tmp_path / "orig")
    hf = load_hf(tmp_path / "orig")
    cfg = json.loads((tmp_path / "orig" / "config.json").read_text()) | {"model_type": model_type}
    fp8, reference, scales = {}, {}, {}
    for name, w in hf.items():
        if w.ndim == 2 and any(f".{q}." in name for q in QUANTIZED):
            q, s = quantize_fp8(w)
            fp8[name] = q
            scales[name + "_scale_inv"] = s
            r_idx = np.arange(w.shape[0]) // 128
            c_idx = np.arange(w.shape[1]) // 128
            reference[name] = (q.astype(np.float32) * s[r_idx][:, c_idx]).astype(ml_dtypes.bfloat16)
        else:
            fp8[name] = w.astype(ml_dtypes.bfloat16)
            reference[name] = w.astype(ml_dtypes.bfloat16)
    assert any(v.shape[0] % 128 and v.dtype == ml_dtypes.float8_e4m3fn for v in fp8.values())  # ragged edge
    # Two shards: all weights in one, all scales in the other (so every scale sits in another shard).
    (tmp_path / "fp8").mkdir()
    save_file(fp8, str(tmp_path / "fp8" / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(scales, str(tmp_path / "fp8" / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in fp8} | {
        k: "model-00002-of-00002.safetensors" for k in scales}
    (tmp_path / "fp8" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    qcfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg | {"quantization_config": qcfg}))
    (tmp_path / "ref").mkdir()
    save_file(reference, str(tmp_path / "ref" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "ref" / "config.json").write_text(json.dumps(cfg))

    r = hf_to_maxtext(str(tmp_path / "fp8"), tmp_path / "mt-fp8", ToMaxTextOptions(dtype="bf16"))
    assert not any("not used" in n for n in r.notes), r.notes   # scales are consumed, not ignored
    hf_to_maxtext(str(tmp_path / "ref"), tmp_path / "mt-ref", ToMaxTextOptions(dtype="bf16"))
    a, b = restore(tmp_path / "mt-fp8"), restore(tmp_path / "mt-ref")
    assert set(a) == set(b)
    for path in a:
        assert_bits_equal(a[path], b[path], path)


def test_fp8_row_pieces_dequantize_with_offsets(monkeypatch):
    from ckpt_cli.io.hf import dequantize_blocks

    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 200)).astype(np.float32)
    q, s = quantize_fp8(w)
    whole = dequantize_blocks(q, s, 0, (128, 128), np.dtype(np.float32))
    for a, b in ((0, 100), (100, 129), (129, 300), (250, 300)):
        assert np.array_equal(dequantize_blocks(q[a:b], s, a, (128, 128), np.dtype(np.float32)), whole[a:b])


@pytest.mark.parametrize("shape,offset,block", [((256, 384), 0, (128, 128)), ((128, 256), 128, (128, 128)),
                                                 ((100, 200), 0, (128, 128)), ((64, 64), 32, (16, 16)),
                                                 ((16, 16), 0, (8, 8))])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fp8_dequantization_equals_the_formula_bit_for_bit(shape, offset, block, dtype):
    """Every e4m3 byte (NaNs included), whole and ragged blocks, row pieces: the fast path (a byte table, scales
    applied in place per block) gives exactly `float32(w) * float32(scale[i // bh, j // bw])`, cast once."""
    from ckpt_cli.io.hf import dequantize_blocks

    rng = np.random.default_rng(7)
    w = rng.integers(0, 256, size=shape, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
    bh, bw = block
    s = rng.random((-(-(offset + shape[0]) // bh), -(-shape[1] // bw))).astype(np.float32)
    want = (w.astype(np.float32) * s[np.arange(offset, offset + shape[0]) // bh][:, np.arange(shape[1]) // bw])
    want = want.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    got = dequantize_blocks(w, s, offset, block, want.dtype)
    assert got.dtype == want.dtype
    assert np.array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"))


# ---------------------------------------------------------------- golden shapes (Appendix A), no data

V2_LITE = {
    "decoder-decoder_norm-scale": (2048,), "decoder-dense_layers-mlp-wi_0-kernel": (2048, 1, 10944),
    "decoder-dense_layers-mlp-wi_1-kernel": (2048, 1, 10944), "decoder-dense_layers-mlp-wo-kernel": (10944, 1, 2048),
    "decoder-dense_layers-post_self_attention_layer_norm-scale": (2048, 1),
    "decoder-dense_layers-pre_self_attention_layer_norm-scale": (2048, 1),
    "decoder-dense_layers-self_attention-kv_norm-scale": (512, 1),
    "decoder-dense_layers-self_attention-out-kernel": (16, 1, 128, 2048),
    "decoder-dense_layers-self_attention-query-kernel": (2048, 1, 16, 192),
    "decoder-dense_layers-self_attention-wkv_a-kernel": (2048, 1, 576),
    "decoder-dense_layers-self_attention-wkv_b-kernel": (512, 1, 16, 256),
    "decoder-logits_dense-kernel": (2048, 102400),
    "decoder-moe_layers-DeepSeekMoeBlock_0-MoeBlock_0-gate-kernel": (2048, 26, 64),
    "decoder-moe_layers-DeepSeekMoeBlock_0-MoeBlock_0-wi_0": (64, 26, 2048, 1408),
    "decoder-moe_layers-DeepSeekMoeBlock_0-MoeBlock_0-wi_1": (64, 26, 2048, 1408),
    "decoder-moe_layers-DeepSeekMoeBlock_0-MoeBlock_0-wo": (64, 26, 1408, 2048),
    "decoder-moe_layers-DeepSeekMoeBlock_0-shared_experts-wi_0-kernel": (2048, 26, 2816),
    "decoder-moe_layers-DeepSeekMoeBlock_0-shared_experts-wi_1-kernel": (2048, 26, 2816),
    "decoder-moe_layers-DeepSeekMoeBlock_0-shared_experts-wo-kernel": (2816, 26, 2048),
    "decoder-moe_layers-post_self_attention_layer_norm-scale": (2048, 26),
    "decoder-moe_layers-pre_self_attention_layer_norm-scale": (2048, 26),
    "decoder-moe_layers-self_attention-kv_norm-scale": (512, 26),
    "decoder-moe_layers-self_attention-out-kernel": (16, 26, 128, 2048),
    "decoder-moe_layers-self_attention-query-kernel": (2048, 26, 16, 192),
    "decoder-moe_layers-self_attention-wkv_a-kernel": (2048, 26, 576),
    "decoder-moe_layers-self_attention-wkv_b-kernel": (512, 26, 16, 256),
    "token_embedder-embedding": (102400, 2048),
}


def v3_golden(v32: bool) -> dict:
    g = {"decoder-decoder_norm-scale": (7168,), "decoder-logits_dense-kernel": (7168, 129280),
         "token_embedder-embedding": (129280, 7168),
         "decoder-moe_layers-DeepSeekMoeBlock_0-MoeBlock_0-gate-bias": (58, 256),
         "decoder-moe_layers-DeepSeekMoeBlock_0-MoeBlock_0-gate-kernel": (7168, 58, 256),
         "decoder-moe_layers-DeepSeekMoeBlock_0-MoeBlock_0-wi_0": (256, 58, 7168, 2048),
         "decoder-moe_layers-DeepSeekMoeBlock_0-MoeBlock_0-wi_1": (256, 58, 7168, 2048),
         "decoder-moe_layers-DeepSeekMoeBlock_0-MoeBlock_0-wo": (256, 58, 2048, 7168),
         "decoder-moe_layers-DeepSeekMoeBlock_0-shared_experts-wi_0-kernel": (7168, 58, 2048),
         "decoder-moe_layers-DeepSeekMoeBlock_0-shared_experts-wi_1-kernel": (7168, 58, 2048),
         "decoder-moe_layers-DeepSeekMoeBlock_0-shared_experts-wo-kernel": (2048, 58, 7168),
         "decoder-dense_layers-mlp-wi_0-kernel": (7168, 3, 18432),
         "decoder-dense_layers-mlp-wi_1-kernel": (7168, 3, 18432),
         "decoder-dense_layers-mlp-wo-kernel": (18432, 3, 7168)}
    for group, n in (("dense_layers", 3), ("moe_layers", 58)):
        p = f"decoder-{group}-"
        g |= {p + "post_self_attention_layer_norm-scale": (7168, n),
              p + "pre_self_attention_layer_norm-scale": (7168, n),
              p + "self_attention-kv_norm-scale": (512, n), p + "self_attention-out-kernel": (128, n, 128, 7168),
              p + "self_attention-q_norm-scale": (1536, n), p + "self_attention-wkv_a-kernel": (7168, n, 576),
              p + "self_attention-wkv_b-kernel": (512, n, 128, 256), p + "self_attention-wq_a-kernel": (7168, n, 1536),
              p + "self_attention-wq_b-kernel": (1536, n, 128, 192)}
        if v32:
            g |= {p + "self_attention-indexer-k_norm-bias": (128, n),
                  p + "self_attention-indexer-k_norm-scale": (128, n),
                  p + "self_attention-indexer-weights_proj-kernel": (7168, n, 64),
                  p + "self_attention-indexer-wk-kernel": (7168, n, 128),
                  p + "self_attention-indexer-wq_b-kernel": (1536, n, 64, 128)}
    return g


@pytest.mark.parametrize("model,golden", [("deepseek2-16b", V2_LITE), ("deepseek3-671b", v3_golden(False)),
                                          ("deepseek3.2-671b", v3_golden(True))])
def test_plan_equals_appendix_a(model, golden):
    cfg = registry.reference_config(model)
    family = detect_family(cfg)
    scanned = build_to_maxtext(family, cfg, True, output_dtype("bf16"))
    assert {t.target.replace("/", "-"): t.shape for t in scanned.tensors} == golden
    unscanned = {t.target: t.shape for t in build_to_maxtext(family, cfg, False, output_dtype("bf16")).tensors}
    ld = cfg["first_k_dense_replace"]
    for key, shape in golden.items():
        path = key.replace("-", "/")
        for group, count in (("dense_layers", ld), ("moe_layers", cfg["num_hidden_layers"] - ld)):
            if path.startswith(f"decoder/{group}/"):
                axis = 0 if key.endswith("gate-bias") else 1     # the router bias stacks its layers on axis 0
                for j in (0, count - 1):
                    unscanned_path = path.replace(f"decoder/{group}/", f"decoder/{group}_{j}/")
                    assert unscanned[unscanned_path] == shape[:axis] + shape[axis + 1:]
                break
        else:
            assert unscanned[path] == shape
    params = sum(math.prod(s) for s in golden.values())
    assert params == {"deepseek2-16b": 15_706_484_224}.get(model, params)


def test_deepseek2_236b_plan():
    """DeepSeek-V2 (MaxText 0.2.5's deepseek2-236b.yml, the released config): E 5120, 128 heads, q_lora_rank 1536,
    160 routed + 2 shared experts of 1536, 1 dense layer of 12288 then 59 MoE layers; no router bias (V2);
    235.7e9 parameters."""
    spec = registry.lookup("deepseek2-236b")
    assert spec.repo_id == "deepseek-ai/DeepSeek-V2" and spec.config["model_type"] == "deepseek_v2"
    cfg = registry.reference_config("deepseek2-236b")
    shapes = {t.target: t.shape for t in build_to_maxtext(detect_family(cfg), cfg, True, output_dtype("bf16")).tensors}
    moe = "decoder/moe_layers/"
    assert shapes[moe + "self_attention/wq_a/kernel"] == (5120, 59, 1536)
    assert shapes[moe + "self_attention/wq_b/kernel"] == (1536, 59, 128, 192)
    assert shapes[moe + "DeepSeekMoeBlock_0/MoeBlock_0/wi_0"] == (160, 59, 5120, 1536)
    assert shapes[moe + "DeepSeekMoeBlock_0/shared_experts/wo/kernel"] == (3072, 59, 5120)
    assert shapes["decoder/dense_layers/mlp/wi_0/kernel"] == (5120, 1, 12288)
    assert not any(p.endswith("gate/bias") for p in shapes)
    assert sum(math.prod(s) for s in shapes.values()) == 235_741_434_880
    unscanned = build_to_maxtext(detect_family(cfg), cfg, False, output_dtype("bf16"))
    assert sum(math.prod(t.shape) for t in unscanned.tensors) == 235_741_434_880
    notes = build_to_maxtext(detect_family(cfg), cfg, True, output_dtype("bf16")).notes
    assert any("group-limited greedy routing (n_group 8, topk_group 3)" in n for n in notes)   # MaxText: plain top-k
    lite = registry.reference_config("deepseek2-16b")
    assert not build_to_maxtext(detect_family(lite), lite, True, output_dtype("bf16")).notes   # greedy: no groups
    with pytest.raises(ConfigMismatchError, match="hidden_size"):
        registry.check_against(spec, lite, detect_family(lite).reference_keys)


def test_model_name_resolves_to_repo():
    assert registry.lookup("deepseek2-16b").repo_id == "deepseek-ai/DeepSeek-V2-Lite"
    assert detect_family(registry.reference_config("deepseek3.2-671b")).name == "deepseek"


def test_kimi_k2_1t_plan():
    """Kimi K2 (MaxText 0.2.5's kimi-k2-1t.yml): E 7168, 64 heads, 1 dense layer of 18432 then 60 MoE layers of 384
    routed + 1 shared expert of 2048, vocab 163840, the V3 router bias; 1,026,408,232,448 parameters."""
    spec = registry.lookup("kimi-k2-1t")
    assert spec.repo_id == "moonshotai/Kimi-K2-Instruct" and spec.config["model_type"] == "kimi_k2"
    cfg = registry.reference_config("kimi-k2-1t")
    plan = build_to_maxtext(detect_family(cfg), cfg, True, output_dtype("bf16"))
    shapes = {t.target: t.shape for t in plan.tensors}
    moe = "decoder/moe_layers/DeepSeekMoeBlock_0/"
    assert shapes[moe + "MoeBlock_0/wi_0"] == (384, 60, 7168, 2048)
    assert shapes[moe + "MoeBlock_0/gate/bias"] == (60, 384)
    assert shapes["decoder/dense_layers/self_attention/wq_b/kernel"] == (1536, 1, 64, 192)
    assert shapes["token_embedder/embedding"] == (163840, 7168)
    assert sum(math.prod(s) for s in shapes.values()) == 1_026_408_232_448
    assert not plan.notes                        # n_group 1: no group-limited routing; no MTP layer to skip
    v3 = registry.reference_config("deepseek3-671b")
    with pytest.raises(ConfigMismatchError, match="num_attention_heads"):
        registry.check_against(spec, v3, detect_family(v3).reference_keys)


def test_kimi_round_trip_keeps_model_type(deepseek_models, tmp_path):
    """maxtext-to-hf of a converted Kimi K2 writes its config back as kimi_k2 and every tensor bit-identical."""
    from ckpt_cli.convert import ToHFOptions, maxtext_to_hf

    src = deepseek_models("kimi", "bfloat16")
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions())
    maxtext_to_hf(str(tmp_path / "mt"), tmp_path / "hf", ToHFOptions())
    back = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert back["model_type"] == "kimi_k2" and back["architectures"] == ["DeepseekV3ForCausalLM"]
    original, got = load_hf(src), load_hf(tmp_path / "hf")
    assert set(got) == set(original)
    for name, value in original.items():
        assert_bits_equal(got[name], value, name)
