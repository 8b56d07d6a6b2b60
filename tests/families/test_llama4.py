"""Llama 4 text model: trees from the spec with explicit index math, both directions bit-exact, the multimodal
release layout, refusals. Tiny transformers Llama4ForCausalLM models (8 layers: two scanned cycles of 4)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ckpt_cli import registry
from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf
from ckpt_cli.dtypes import output_dtype
from ckpt_cli.families import detect_family
from ckpt_cli.plan import build_to_maxtext
from tests.cli_helpers import error_line, run
from tests.expectations import assert_bits_equal, flatten

TINY = dict(hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=8,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128, num_local_experts=4,
            num_experts_per_tok=1, attention_chunk_size=8, max_position_embeddings=256)
KINDS = {"scout": 1, "maverick": 2}   # interleave_moe_layer_step


def make_model(kind: str, dtype: str = "float32", seed: int = 0):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.Llama4TextConfig(**TINY, interleave_moe_layer_step=KINDS[kind], use_qk_norm=kind == "scout")
    model = tf.Llama4ForCausalLM(cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_((1.0 if p.ndim == 1 else 0.0) + 0.05 * torch.randn_like(p))
    return model.to(getattr(torch, dtype)).eval()


@pytest.fixture(scope="module")
def llama4_models(tmp_path_factory):
    cache: dict = {}

    def get(kind: str, dtype: str = "float32") -> Path:
        if (kind, dtype) not in cache:
            folder = tmp_path_factory.mktemp(f"llama4-{kind}-{dtype}")
            make_model(kind, dtype).save_pretrained(folder)
            cache[kind, dtype] = folder
        return cache[kind, dtype]

    return get


def load_hf(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def f32(x):
    return np.asarray(x, dtype=np.float32)


def expected_layer(hf: dict, cfg: dict, i: int) -> dict[str, np.ndarray]:
    """MaxText leaves of HF layer i, with explicit index math (no query scale, no RoPE permutation)."""
    E, N, K, D = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    M = cfg["intermediate_size"]
    p = f"model.layers.{i}."
    out = {
        "pre_self_attention_layer_norm/scale": f32(hf[p + "input_layernorm.weight"]),
        "post_self_attention_layer_norm/scale": f32(hf[p + "post_attention_layernorm.weight"]),
        # query_mt[e, h, d] = q_hf[h*D + d, e]
        "self_attention/query/kernel": np.einsum("hde->ehd", f32(hf[p + "self_attn.q_proj.weight"]).reshape(N, D, E)),
        "self_attention/key/kernel": np.einsum("hde->ehd", f32(hf[p + "self_attn.k_proj.weight"]).reshape(K, D, E)),
        "self_attention/value/kernel": np.einsum("hde->ehd", f32(hf[p + "self_attn.v_proj.weight"]).reshape(K, D, E)),
        # out_mt[h, d, e] = o_hf[e, h*D + d]
        "self_attention/out/kernel": np.einsum("ehd->hde", f32(hf[p + "self_attn.o_proj.weight"]).reshape(E, N, D)),
    }
    if i in cfg["moe_layers"]:
        m = "Llama4MoEBlock_0/"
        gate_up = f32(hf[p + "feed_forward.experts.gate_up_proj"])      # (X, E, 2M): gate = [..., :M], up = [..., M:]
        out[m + "MoeBlock_0/gate/kernel"] = f32(hf[p + "feed_forward.router.weight"]).T
        out[m + "MoeBlock_0/wi_0"] = gate_up[:, :, :M]
        out[m + "MoeBlock_0/wi_1"] = gate_up[:, :, M:]
        out[m + "MoeBlock_0/wo"] = f32(hf[p + "feed_forward.experts.down_proj"])
        for mt, name in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
            out[m + f"shared_experts/{mt}/kernel"] = f32(hf[p + f"feed_forward.shared_expert.{name}.weight"]).T
    else:
        for mt, name in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
            out[f"mlp/{mt}/kernel"] = f32(hf[p + f"feed_forward.{name}.weight"]).T
    return out


def expected_tree(hf: dict, cfg: dict, scan: bool) -> dict[str, np.ndarray]:
    tree = {"token_embedder/embedding": f32(hf["model.embed_tokens.weight"]),
            "decoder/decoder_norm/scale": f32(hf["model.norm.weight"]),
            "decoder/logits_dense/kernel": f32(hf["lm_head.weight"]).T}
    L = cfg["num_hidden_layers"]
    if not scan:
        for i in range(L):
            tree |= {f"decoder/layers_{i}/{k}": v for k, v in expected_layer(hf, cfg, i).items()}
        return tree
    for b in range(4):             # layers_b holds HF layers b, b+4, ... on axis 1 (experts keep axis 0)
        per = [expected_layer(hf, cfg, i) for i in range(b, L, 4)]
        for leaf in per[0]:
            tree[f"decoder/layers/layers_{b}/{leaf}"] = np.stack([lay[leaf] for lay in per], axis=1)
    return tree


def restore(out: Path) -> dict:
    import orbax.checkpoint as ocp

    return flatten(ocp.PyTreeCheckpointer().restore(str(out / "0" / "items"))["params"]["params"])


@pytest.mark.parametrize("kind,scan,dtype", [("scout", True, "f32"), ("scout", False, "bf16"),
                                             ("maverick", True, "bf16"), ("maverick", False, "f32")])
def test_tree_matches_spec(llama4_models, tmp_path, kind, scan, dtype):
    src = llama4_models(kind)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["moe_layers"] == list(range(KINDS[kind] - 1, 8, KINDS[kind]))
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    got, want = restore(tmp_path / "mt"), expected_tree(load_hf(src), cfg, scan)
    assert set(got) == set(want)
    for path, value in want.items():
        assert_bits_equal(got[path], value.astype(ml_dtypes.bfloat16 if dtype == "bf16" else np.float32), path)
    if scan and kind == "maverick":
        assert "decoder/layers/layers_0/mlp/wi_0/kernel" in got            # dense, then MoE, dense, MoE
        assert got["decoder/layers/layers_1/Llama4MoEBlock_0/MoeBlock_0/wi_0"].shape == (4, 2, 64, 32)


@pytest.mark.parametrize("kind,scan,dtype", [("scout", True, "bf16"), ("maverick", False, "bf16"),
                                             ("maverick", True, "f32")])
def test_round_trip_exact(llama4_models, tmp_path, kind, scan, dtype):
    src = llama4_models(kind, "bfloat16" if dtype == "bf16" else "float32")
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    maxtext_to_hf(str(tmp_path / "mt"), tmp_path / "hf", ToHFOptions(dtype=dtype))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "llama4_text" and cfg["architectures"] == ["Llama4ForCausalLM"]
    original, back = load_hf(src), load_hf(tmp_path / "hf")
    assert set(back) == set(original)
    for name, value in original.items():
        assert_bits_equal(back[name], value, name)


def test_multimodal_release_converts_its_text_model(llama4_models, tmp_path):
    """The released layout: model_type llama4 with a text_config, text tensors under language_model.*, a vision
    tower beside them: the text model converts as the text-only checkpoint does; the vision tensors are left out."""
    src = llama4_models("maverick", "bfloat16")
    text_cfg = json.loads((src / "config.json").read_text())
    mm = tmp_path / "mm"
    mm.mkdir()
    tensors = {"language_model." + k: v for k, v in load_hf(src).items()}
    tensors["vision_model.patch_embedding.linear.weight"] = np.ones((8, 12), ml_dtypes.bfloat16)
    tensors["multi_modal_projector.linear_1.weight"] = np.ones((64, 8), ml_dtypes.bfloat16)
    save_file(tensors, str(mm / "model.safetensors"), metadata={"format": "pt"})
    (mm / "config.json").write_text(json.dumps({
        "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "torch_dtype": "bfloat16",
        "text_config": {k: v for k, v in text_cfg.items() if k != "architectures"}, "vision_config": {}}))
    r = hf_to_maxtext(str(mm), tmp_path / "mt-mm", ToMaxTextOptions())
    assert any("only the language model (language_model.*)" in n for n in r.notes), r.notes
    hf_to_maxtext(str(src), tmp_path / "mt-text", ToMaxTextOptions())
    a, b = restore(tmp_path / "mt-mm"), restore(tmp_path / "mt-text")
    assert set(a) == set(b)
    for path in a:
        assert_bits_equal(a[path], b[path], path)
    maxtext_to_hf(str(tmp_path / "mt-mm"), tmp_path / "hf", ToHFOptions())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama4_text"
    # inspect --against reads the text model under its prefix (it reported every path missing before)
    data = json.loads(run("inspect", mm, "--against", tmp_path / "mt-mm", "--json").stdout)
    assert data["identical"] is True and data["counts"]["matched"] == data["counts"]["b"] == 47, data["counts"]
    assert data["unmapped"] == ["multi_modal_projector.linear_1.weight", "vision_model.patch_embedding.linear.weight"]


def test_registered_plans():
    """llama4-17b-16e: 48 MoE layers of 16 experts; llama4-17b-128e: dense and MoE (128 experts) alternating (the
    parameter counts of MaxText 0.2.5's trees)."""
    for name, params in (("llama4-17b-16e", 107_769_861_120), ("llama4-17b-128e", 400_711_848_960)):
        cfg = registry.reference_config(name)
        plan = build_to_maxtext(detect_family(cfg), cfg, True, output_dtype("bf16"))
        assert sum(math.prod(t.shape) for t in plan.tensors) == params, name
        assert not plan.notes
    spec = registry.lookup("llama4-17b-128e")
    assert spec.repo_id == "meta-llama/Llama-4-Maverick-17B-128E" and spec.family == "llama4"


def _with_config(src: Path, dest: Path, **changes) -> Path:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text()) | changes
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize("changes,message", [
    ({"moe_layers": [1, 3, 4, 7]}, "error: config.json makes layer 4 MoE but layer 0 dense: MaxText's llama4 repeats"),
    ({"tie_word_embeddings": True}, "error: config.json ties embeddings"),
    ({"attention_bias": True}, "error: config.json sets attention_bias"),
])
def test_refusals_are_one_line(llama4_models, tmp_path, changes, message):
    src = _with_config(llama4_models("maverick"), tmp_path / "src", **changes)
    r = run("convert", "hf-to-maxtext", src, "--out", tmp_path / "mt")
    assert r.exit_code == 2, r.output
    assert error_line(r).startswith(message), error_line(r)
    assert not (tmp_path / "mt").exists()

