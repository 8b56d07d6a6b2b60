"""Gemma 4 text model: trees element by element from the spec (explicit index math), both directions (permutations
bit-exact, the sqrt(E)-scaled embedding within one ulp), the multimodal release layout, the --scan refusal for the
E2B/E4B kind, config refusals, inspect/plan with no data. Tiny transformers Gemma4ForCausalLM models:

- moe (26b-like): 12 layers (two scanned blocks of six), k_eq_v global layers, routed experts beside the MLP;
- dense (31b-like): 12 layers, k_eq_v, no experts;
- e2b: 10 layers, every 5th global, per-layer embeddings, the last 4 layers KV-shared with a double-wide MLP;
- e4b: 12 layers, every 6th global, per-layer embeddings, 4 KV-shared layers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ckpt_cli import registry
from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf
from ckpt_cli.dtypes import output_dtype
from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families import detect_family
from ckpt_cli.plan import build_to_maxtext
from tests.cli_helpers import error_line, run, with_config
from tests.expectations import assert_bits_equal, cast, flatten

F32 = np.float32
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, global_head_dim=16, sliding_window=4, final_logit_softcapping=30.0,
            max_position_embeddings=128)
KINDS = {
    "moe": dict(num_hidden_layers=12, attention_k_eq_v=True, num_global_key_value_heads=1, enable_moe_block=True,
                num_experts=4, top_k_experts=2, moe_intermediate_size=24, hidden_size_per_layer_input=0),
    "dense": dict(num_hidden_layers=12, attention_k_eq_v=True, num_global_key_value_heads=1,
                  hidden_size_per_layer_input=0),
    "e2b": dict(num_hidden_layers=10, num_key_value_heads=1, hidden_size_per_layer_input=8,
                vocab_size_per_layer_input=96, num_kv_shared_layers=4, use_double_wide_mlp=True,
                layer_types=["full_attention" if i % 5 == 4 else "sliding_attention" for i in range(10)]),
    "e4b": dict(num_hidden_layers=12, hidden_size_per_layer_input=8, vocab_size_per_layer_input=96,
                num_kv_shared_layers=4),
}


def make_model(kind: str, dtype: str = "float32", seed: int = 0):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.Gemma4ForCausalLM(tf.Gemma4TextConfig(**(BASE | KINDS[kind])))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((1.0 if p.ndim == 1 else 0.0) + 0.05 * torch.randn_like(p))
        for i, layer in enumerate(model.model.layers):       # layer_scalar is a buffer: make it count
            layer.layer_scalar.fill_(0.75 + 0.05 * i)
    return model.to(getattr(torch, dtype)).eval()


@pytest.fixture(scope="module")
def gemma4_models(tmp_path_factory):
    cache: dict = {}

    def get(kind: str, dtype: str = "float32") -> Path:
        if (kind, dtype) not in cache:
            folder = tmp_path_factory.mktemp(f"gemma4-{kind}-{dtype}")
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
    return np.asarray(x, dtype=F32)


def expected_layer(hf: dict, cfg: dict, i: int) -> dict[str, np.ndarray]:
    """MaxText leaves of HF layer i, with explicit index math."""
    E, N = cfg["hidden_size"], cfg["num_attention_heads"]
    glob = cfg["layer_types"][i] == "full_attention"
    over = {int(k): v for k, v in cfg["per_layer_config"].items()}.get(i, {}) if glob else {}   # keys like "05"
    D, K = over.get("head_dim", cfg["head_dim"]), over.get("num_key_value_heads", cfg["num_key_value_heads"])
    p = f"model.layers.{i}."
    out = {
        "pre_self_attention_norm/scale": f32(hf[p + "input_layernorm.weight"]),     # no +1 in Gemma 4
        "post_self_attention_norm/scale": f32(hf[p + "post_attention_layernorm.weight"]),
        "pre_ffw_norm/scale": f32(hf[p + "pre_feedforward_layernorm.weight"]),
        "post_ffw_norm/scale": f32(hf[p + "post_feedforward_layernorm.weight"]),
        # query_mt[e, h, d] = q_hf[h*D + d, e]; out_mt[h, d, e] = o_hf[e, h*D + d]
        "self_attention/query/kernel": np.einsum("hde->ehd", f32(hf[p + "self_attn.q_proj.weight"]).reshape(N, D, E)),
        "self_attention/query_norm/scale": f32(hf[p + "self_attn.q_norm.weight"]),
        "self_attention/out/kernel": np.einsum("ehd->hde", f32(hf[p + "self_attn.o_proj.weight"]).reshape(E, N, D)),
        "layer_scalar": f32(hf[p + "layer_scalar"]),
    }
    if p + "self_attn.k_proj.weight" in hf:
        key = f32(hf[p + "self_attn.k_proj.weight"]).reshape(K, D, E)
        out["self_attention/key/kernel"] = np.einsum("hde->ehd", key)
        out["self_attention/key_norm/scale"] = f32(hf[p + "self_attn.k_norm.weight"])
    if p + "self_attn.v_proj.weight" in hf:
        out["self_attention/value/kernel"] = np.einsum("hde->ehd",
                                                       f32(hf[p + "self_attn.v_proj.weight"]).reshape(K, D, E))
    dense = "mlp/moe_block/shared_experts/" if cfg.get("enable_moe_block") else "mlp/"
    for mt, name in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
        out[dense + f"{mt}/kernel"] = f32(hf[p + f"mlp.{name}.weight"]).T
    if cfg.get("enable_moe_block"):
        M = cfg["moe_intermediate_size"]
        gate_up = f32(hf[p + "experts.gate_up_proj"])         # (X, 2M, E): gate = rows [:M], up = rows [M:]
        m = "mlp/moe_block/MoeBlock_0/"
        out[m + "gate/kernel"] = f32(hf[p + "router.proj.weight"]).T
        out[m + "per_expert_scale"] = f32(hf[p + "router.per_expert_scale"])
        out[m + "wi_0"] = gate_up[:, :M, :].transpose(0, 2, 1)
        out[m + "wi_1"] = gate_up[:, M:, :].transpose(0, 2, 1)
        out[m + "wo"] = f32(hf[p + "experts.down_proj"]).transpose(0, 2, 1)
        out["mlp/pre_forward_scale_2"] = f32(hf[p + "router.scale"])
        for n in ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"):
            out[f"mlp/{n}/scale"] = f32(hf[p + f"{n}.weight"])
    if cfg.get("hidden_size_per_layer_input"):
        out["per_layer_input_gate/kernel"] = f32(hf[p + "per_layer_input_gate.weight"]).T
        out["per_layer_projection/kernel"] = f32(hf[p + "per_layer_projection.weight"]).T
        out["post_per_layer_input_norm/scale"] = f32(hf[p + "post_per_layer_input_norm.weight"])
    return out


def expected_tree(hf: dict, cfg: dict, scan: bool) -> dict[str, np.ndarray]:
    tree = {"token_embedder/embedding": f32(hf["model.embed_tokens.weight"]) * F32(math.sqrt(cfg["hidden_size"])),
            "decoder/decoder_norm/scale": f32(hf["model.norm.weight"])}
    if cfg.get("hidden_size_per_layer_input"):
        pe = "decoder/per_layer_embedder/"
        tree[pe + "embed_tokens_per_layer"] = f32(hf["model.embed_tokens_per_layer.weight"])   # unscaled
        tree[pe + "per_layer_model_projection/kernel"] = f32(hf["model.per_layer_model_projection.weight"]).T
        tree[pe + "per_layer_projection_norm/scale"] = f32(hf["model.per_layer_projection_norm.weight"])
    L = cfg["num_hidden_layers"]
    if not scan:
        for i in range(L):
            tree |= {f"decoder/layers_{i}/{k}": v for k, v in expected_layer(hf, cfg, i).items()}
        return tree
    # local_layers[b, p] = HF layer 6b + p (axes 1, 2); global_layer[b] = HF layer 6b + 5 (axis 1)
    blocks = L // 6
    local = [[expected_layer(hf, cfg, 6 * b + p) for p in range(5)] for b in range(blocks)]
    for leaf in local[0][0]:
        tree[f"decoder/scanned_blocks/local_layers/{leaf}"] = np.stack(
            [np.stack([local[b][p][leaf] for p in range(5)], axis=1) for b in range(blocks)], axis=1)
    glob = [expected_layer(hf, cfg, 6 * b + 5) for b in range(blocks)]
    for leaf in glob[0]:
        tree[f"decoder/scanned_blocks/global_layer/{leaf}"] = np.stack([g[leaf] for g in glob], axis=1)
    return tree


def restore(out: Path) -> dict:
    import orbax.checkpoint as ocp

    return flatten(ocp.PyTreeCheckpointer().restore(str(out / "0" / "items"))["params"]["params"])


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint16 if x.dtype.itemsize == 2 else np.uint32).astype(np.int64)


CASES = [("moe", True, "f32"), ("moe", False, "bf16"), ("dense", True, "bf16"), ("dense", False, "f32"),
         ("e2b", False, "f32"), ("e4b", False, "bf16")]


@pytest.mark.parametrize("kind,scan,dtype", CASES)
def test_tree_element_by_element_and_round_trip(gemma4_models, tmp_path, kind, scan, dtype):
    """hf-to-maxtext writes exactly the expected tree; maxtext-to-hf gives back the same names, every tensor
    bit-identical but the embedding, which is multiplied by float32 sqrt(E) = sqrt(32) on the way in and divided
    by it on the way out (each rounded once to the stored dtype): within one ulp of the stored dtype."""
    src = gemma4_models(kind, "bfloat16" if dtype == "bf16" else "float32")
    cfg, hf = json.loads((src / "config.json").read_text()), load_hf(src)
    mt = tmp_path / "mt"
    hf_to_maxtext(str(src), mt, ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    got, want = restore(mt), expected_tree(hf, cfg, scan)
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for path, x in want.items():
        assert_bits_equal(got[path], cast(x, dtype), path)

    maxtext_to_hf(str(mt), tmp_path / "hf", ToHFOptions(dtype=dtype))
    back = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert back["model_type"] == "gemma4_text" and back["architectures"] == ["Gemma4ForCausalLM"]
    out = load_hf(tmp_path / "hf")
    assert sorted(out) == sorted(hf)
    store = ml_dtypes.bfloat16 if dtype == "bf16" else F32
    factor = F32(math.sqrt(cfg["hidden_size"]))
    for name, x in hf.items():
        if name == "model.embed_tokens.weight":
            down = (x.astype(F32) * factor).astype(store)
            assert_bits_equal(out[name], (down.astype(F32) / factor).astype(store), name)
            assert np.abs(bits(out[name]) - bits(x)).max() <= 1, name
            if dtype == "bf16":       # the one-ulp allowance is used: x sqrt(32), / sqrt(32) really rounds in bf16
                assert np.count_nonzero(bits(out[name]) != bits(x)) > 0
        else:
            assert_bits_equal(out[name], x, name)


def test_scanned_grid_positions(gemma4_models, tmp_path):
    """Spot checks of the doubly stacked local leaves: [b, p] is HF layer 6b + p; the global leaf [b] HF 6b + 5."""
    src = gemma4_models("moe")
    hf = load_hf(src)
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=True, dtype="f32"))
    got = restore(tmp_path / "mt")
    q = got["decoder/scanned_blocks/local_layers/self_attention/query/kernel"]      # (E, 2, 5, N, D)
    assert q.shape == (32, 2, 5, 4, 8)
    assert_bits_equal(q[:, 1, 3], hf["model.layers.9.self_attn.q_proj.weight"].T.reshape(32, 4, 8))
    wi1 = got["decoder/scanned_blocks/global_layer/mlp/moe_block/MoeBlock_0/wi_1"]    # (X, 2, E, M)
    assert wi1.shape == (4, 2, 32, 24)
    assert_bits_equal(wi1[2, 1], hf["model.layers.11.experts.gate_up_proj"][2, 24:, :].T)
    scalar = got["decoder/scanned_blocks/local_layers/layer_scalar"]
    assert scalar.shape == (1, 2, 5) and scalar[0, 1, 2] == hf["model.layers.8.layer_scalar"][0]
    assert "decoder/scanned_blocks/global_layer/self_attention/value/kernel" not in got     # k_eq_v


def test_multimodal_release_converts_its_text_model(gemma4_models, tmp_path):
    """The released layout (Gemma4ForConditionalGeneration: text tensors under model.language_model.*, vision and
    audio towers beside them, the text config nested): converts as the text-only checkpoint does."""
    src = gemma4_models("e2b", "bfloat16")
    text_cfg = json.loads((src / "config.json").read_text())
    mm = tmp_path / "mm"
    mm.mkdir()
    tensors = {k.replace("model.", "model.language_model.", 1): v for k, v in load_hf(src).items()}
    tensors["model.vision_tower.patch_embedder.input_proj.weight"] = np.ones((8, 12), ml_dtypes.bfloat16)
    tensors["model.embed_vision.embedding_projection.weight"] = np.ones((32, 8), ml_dtypes.bfloat16)
    save_file(tensors, str(mm / "model.safetensors"), metadata={"format": "pt"})
    (mm / "config.json").write_text(json.dumps({
        "architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "dtype": "bfloat16",
        "text_config": {k: v for k, v in text_cfg.items() if k != "architectures"}, "vision_config": {},
        "audio_config": None}))
    r = hf_to_maxtext(str(mm), tmp_path / "mt-mm", ToMaxTextOptions(scan_layers=False))
    assert any("only the language model (model.language_model.*)" in n for n in r.notes), r.notes
    hf_to_maxtext(str(src), tmp_path / "mt-text", ToMaxTextOptions(scan_layers=False))
    a, b = restore(tmp_path / "mt-mm"), restore(tmp_path / "mt-text")
    assert set(a) == set(b)
    for path in a:
        assert_bits_equal(a[path], b[path], path)
    maxtext_to_hf(str(tmp_path / "mt-mm"), tmp_path / "hf", ToHFOptions())
    back = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert back["model_type"] == "gemma4_text" and "global_head_dim" not in back     # per_layer_config says it
    assert sorted(load_hf(tmp_path / "hf")) == sorted(load_hf(src))
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")            # the text model loads as it is
    assert type(model).__name__ == "Gemma4ForCausalLM"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", ["e2b", "e4b"])
def test_scan_refused_for_the_small_models(gemma4_models, tmp_path, kind):
    """MaxText 0.2.5 builds gemma4-e2b/-e4b unscanned only: --scan (the default) is one line, exit 2, nothing
    written; --no-scan converts."""
    src = gemma4_models(kind)
    r = run("convert", "hf-to-maxtext", src, "--out", tmp_path / "mt")
    assert r.exit_code != 0
    assert "convert unscanned only" in error_line(r) and "--no-scan" in error_line(r)
    assert not (tmp_path / "mt").exists() and not list(tmp_path.glob("mt*"))
    r = run("convert", "hf-to-maxtext", src, "--out", tmp_path / "mt", "--no-scan", "-q")
    assert r.exit_code == 0, r.output
    r = run("plan", "hf-to-maxtext", "--model", f"gemma4-{kind}", "--json")
    assert r.exit_code != 0 and "use --no-scan" in error_line(r)


@pytest.mark.parametrize("name,blocks", [("gemma4-26b", 5), ("gemma4-31b", 10), ("gemma4-e2b", None),
                                         ("gemma4-e4b", None)])
def test_inspect_and_plan_with_no_data(name, blocks):
    scan = "--scan" if blocks else "--no-scan"
    r = run("inspect", "--model", name, scan, "--json")
    assert r.exit_code == 0, r.output
    shapes = {t["path"]: tuple(t["shape"]) for t in json.loads(r.stdout)["tensors"]}
    c = registry.reference_config(name)
    assert shapes["token_embedder/embedding"] == (262144, c["hidden_size"])
    if blocks:
        assert shapes["decoder/scanned_blocks/local_layers/self_attention/query/kernel"] == (
            c["hidden_size"], blocks, 5, c["num_attention_heads"], 256)
    else:
        assert shapes["decoder/per_layer_embedder/embed_tokens_per_layer"] == (262144, c["num_hidden_layers"] * 256)
    r = run("plan", "hf-to-maxtext", "--model", name, scan, "--read-gbps", "1", "--write-gbps", "0.5", "--json")
    data = json.loads(r.stdout)             # exit 1 when the disk here is too small: the figures are still there
    assert data["family"] == "gemma4" and data["source_kind"] == "model"
    # maxtext-to-hf with no data prices the layout ckpt writes: unscanned for e2b/e4b (whatever --scan says)
    r = run("plan", "maxtext-to-hf", "--model", name, "--json")
    layout = "a scanned" if blocks else "an unscanned"
    assert any(f"as {layout} bf16 MaxText checkpoint" in n for n in json.loads(r.stdout)["notes"]), r.stdout[-400:]


def test_registered_plans():
    """The parameter counts of MaxText 0.2.5's trees; the repos MaxText 0.2.5 names."""
    for name, repo in (("gemma4-26b", "google/gemma-4-26b-a4b-it"), ("gemma4-31b", "google/gemma-4-31b-it"),
                       ("gemma4-e2b", "google/gemma-4-E2B-it"), ("gemma4-e4b", "google/gemma-4-E4B-it")):
        cfg = registry.reference_config(name)
        plan = build_to_maxtext(detect_family(cfg), cfg, name in ("gemma4-26b", "gemma4-31b"), output_dtype("bf16"))
        trees = Path(__file__).resolve().parents[2].parent / "shared" / "maxtext-0.2.5-trees"
        tree = trees / f"{name}.{'scan' if name in ('gemma4-26b', 'gemma4-31b') else 'noscan'}.json"
        if tree.exists():
            want = sum(math.prod(v[0]) for v in json.loads(tree.read_text()).values())
            assert sum(math.prod(t.shape) for t in plan.tensors) == want, name
        assert registry.lookup(name).repo_id == repo and not plan.notes
    with pytest.raises(UnsupportedError, match="unscanned only"):
        cfg = registry.reference_config("gemma4-e2b")
        build_to_maxtext(detect_family(cfg), cfg, True, output_dtype("bf16"))


@pytest.mark.parametrize("kind,changes,message", [
    ("dense", {"layer_types": ["sliding_attention"] * 4 + ["full_attention"] + ["sliding_attention"] * 6
               + ["full_attention"]}, "makes layer 4 full_attention: MaxText's gemma4 makes layer i global exactly"),
    ("dense", {"tie_word_embeddings": False}, "unties the embeddings"),
    ("dense", {"attention_bias": True}, "attention_bias"),
    ("dense", {"hidden_activation": "silu"}, "tanh approximation of gelu"),
    ("e4b", {"enable_moe_block": True, "num_experts": 4, "moe_intermediate_size": 8},
     "combines per-layer embeddings with enable_moe_block"),
    ("e4b", {"layer_types": ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 7
             + ["full_attention"]}, "every 5th (E2B) or 6th (E4B) layer global"),
    ("dense", {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                                   "full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
     "linear RoPE"),
])
def test_refusals_are_one_line(gemma4_models, tmp_path, kind, changes, message):
    src = with_config(gemma4_models(kind), tmp_path / "src", **changes)
    r = run("convert", "hf-to-maxtext", src, "--out", tmp_path / "mt", "--no-scan")
    assert r.exit_code != 0 and message in error_line(r), r.stderr
    assert not (tmp_path / "mt").exists()


def test_model_flag_checks_the_config(gemma4_models, tmp_path):
    r = run("convert", "hf-to-maxtext", gemma4_models("moe"), "--model", "gemma4-26b", "--out", tmp_path / "mt")
    assert r.exit_code == 2 and "but gemma4-26b has" in error_line(r)


def test_notes_say_what_maxtext_runs_differently(gemma4_models, tmp_path):
    """A config that differs from MaxText's gemma4 run-time settings converts, with a note per setting to change;
    the released configs (test_registered_plans) get none."""
    src = with_config(gemma4_models("moe"), tmp_path / "src", rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e6}})
    notes = hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=False)).notes
    for text in ("sliding_window 4; MaxText's gemma4 configs use 1024", "vocab_size 96", "top_k_experts 2",
                 "full_attention layers RoPE theta 1e+06 over 0.5 of the head"):
        assert any(text in n for n in notes), (text, notes)


def test_scanned_remainder_layers_stay_unstacked():
    """A layer count not a multiple of six (the pattern still i mod 6 == 5): the leftover local layers go under
    `decoder/layers_remainder/layers_<r>` (HF layer 6·blocks + r), as MaxText 0.2.5 names them."""
    cfg = registry.reference_config("gemma4-31b") | {"num_hidden_layers": 14, "layer_types": [
        "full_attention" if i % 6 == 5 else "sliding_attention" for i in range(14)]}
    plan = build_to_maxtext(detect_family(cfg), cfg, True, output_dtype("bf16"))
    shapes = {t.target: t.shape for t in plan.tensors}
    assert shapes["decoder/scanned_blocks/local_layers/self_attention/query/kernel"] == (5376, 2, 5, 32, 256)
    assert shapes["decoder/scanned_blocks/global_layer/self_attention/key/kernel"] == (5376, 2, 4, 512)
    assert shapes["decoder/layers_remainder/layers_1/self_attention/value/kernel"] == (5376, 16, 256)
    assert not any(k.startswith("decoder/layers_remainder/layers_2") for k in shapes)
    sources = {t.target: t.tasks[0].source.name for t in plan.tensors}
    assert sources["decoder/layers_remainder/layers_1/layer_scalar"] == "model.layers.13.layer_scalar"
