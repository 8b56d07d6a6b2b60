"""Gemma and Gemma 2: the MaxText tree element by element (written here from MaxText 0.2.5's facts, not from
ckpt's transforms), round trips, the padded vocabulary both ways (whole and in row pieces), refusals as one-line
errors, the registry's reference models, `--model`, `inspect --model` and `plan --model` with no data.

0.2.5's facts (checkpoint_conversion/utils/param_mapping.py GEMMA2_*, configs/models/gemma*.yml, the trees in
../shared/maxtext-0.2.5-trees): every norm weight + 1 (float32), query kernels x f32(1/sqrt(scale)), the embedding
x f32(sqrt(E)) then padded with zero rows (256000 -> 256128: V + 128), tied head; Gemma 2's MaxText layer j holds
HF layer 2j as `*_local` leaves and HF layer 2j + 1 as `*_global` leaves; Gemma's HF post_attention_layernorm is
MaxText's pre_ffw_norm.
"""

from __future__ import annotations

import json
import math
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from ckpt_cli import plan as plan_mod
from ckpt_cli import registry
from ckpt_cli import transforms as T
from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf
from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families import detect_family, gemma
from ckpt_cli.io.orbax import OrbaxCheckpoint
from ckpt_cli.plan import SourceSlice, build_to_hf, build_to_maxtext
from tests.cli_helpers import error_line, run, with_config
from tests.conftest import read_config
from tests.expectations import assert_bits_equal, cast, flatten
from tests.test_convert_to_maxtext import restore

PAD = 128
F32 = np.float32


def _f32(x):
    return np.asarray(x, dtype=F32)


def expected_layer(hf: dict, cfg: dict, i: int) -> dict[str, np.ndarray]:
    """HF layer i's MaxText leaves (float32, before the output cast), Gemma 2's without their _local/_global."""
    two = cfg["model_type"] == "gemma2"
    E, N, K, D = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    scale = F32(1 / math.sqrt(cfg["query_pre_attn_scalar"] if two else D))
    p = f"model.layers.{i}."
    w = {k[len(p):]: _f32(v) for k, v in hf.items() if k.startswith(p)}
    out = {}
    # q_mt[e, h, d] = q_hf[h*D + d, e] * scale; k, v likewise unscaled; out_mt[h, d, e] = o_hf[e, h*D + d]
    for leaf, name, heads, s in (("query", "q_proj", N, scale), ("key", "k_proj", K, None),
                                 ("value", "v_proj", K, None)):
        x = np.empty((E, heads, D), F32)
        for h in range(heads):
            for d in range(D):
                x[:, h, d] = w[f"self_attn.{name}.weight"][h * D + d, :]
        out[f"self_attention/{leaf}/kernel"] = x * s if s is not None else x
    o = w["self_attn.o_proj.weight"]
    out["self_attention/out/kernel"] = np.stack([np.stack([o[:, h * D + d] for d in range(D)]) for h in range(N)])
    out["mlp/wi_0/kernel"] = w["mlp.gate_proj.weight"].T.copy()
    out["mlp/wi_1/kernel"] = w["mlp.up_proj.weight"].T.copy()
    out["mlp/wo/kernel"] = w["mlp.down_proj.weight"].T.copy()
    norms = {"pre_self_attention_norm/scale": "input_layernorm.weight"}
    if two:
        norms |= {"post_self_attention_norm/scale": "post_attention_layernorm.weight",
                  "pre_ffw_norm/scale": "pre_feedforward_layernorm.weight",
                  "post_ffw_norm/scale": "post_feedforward_layernorm.weight"}
    else:
        norms["pre_ffw_norm/scale"] = "post_attention_layernorm.weight"
    out |= {leaf: w[name] + F32(1) for leaf, name in norms.items()}
    assert set(w) == set(norms.values()) | {f"self_attn.{n}_proj.weight" for n in "qkvo"} | {
        f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}, sorted(w)
    return out


def sided(leaf: str, side: str) -> str:
    head, rest = leaf.split("/", 1)
    return f"{head}_{side}/{rest}"


def expected_tree(hf: dict, cfg: dict, scan: bool) -> dict[str, np.ndarray]:
    E, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    table = np.zeros((V + PAD, E), F32)
    table[:V] = _f32(hf["model.embed_tokens.weight"]) * F32(math.sqrt(E))
    tree = {"token_embedder/embedding": table, "decoder/decoder_norm/scale": _f32(hf["model.norm.weight"]) + F32(1)}
    layers = [expected_layer(hf, cfg, i) for i in range(L)]
    if cfg["model_type"] == "gemma2":   # MaxText layer j: HF 2j local, HF 2j + 1 global
        groups = [{**{sided(k, "local"): v for k, v in layers[2 * j].items()},
                   **{sided(k, "global"): v for k, v in layers[2 * j + 1].items()}} for j in range(L // 2)]
    else:
        groups = layers
    for leaf in groups[0]:
        if scan:
            tree[f"decoder/layers/{leaf}"] = np.stack([g[leaf] for g in groups], axis=1)
        else:
            tree |= {f"decoder/layers_{j}/{leaf}": g[leaf] for j, g in enumerate(groups)}
    return tree


def load_hf(folder) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint16 if x.dtype.itemsize == 2 else np.uint32).astype(np.int64)


CASES = [(kind, scan, dtype) for kind in ("gemma", "gemma2") for scan in (True, False) for dtype in ("bf16", "f32")]


@pytest.mark.parametrize("kind,scan,dtype", CASES)
def test_tree_element_by_element_and_round_trip(hf_models, tmp_path, kind, scan, dtype):
    """hf-to-maxtext writes exactly the expected tree (norms float32 whatever --dtype); maxtext-to-hf gives back the
    same names, permuted tensors bit-identical, and the folded ones as out(f32(out(f32(x) op c)) inverse c):

    - query (x s, s = 1/sqrt(24) for both tiny models) and embedding (x sqrt(48) for gemma, x 8 for gemma2's E = 64)
      come back within one ulp of the stored dtype (bf16 or f32): the scale is not injective; gemma2's embedding
      (a power of two) is bit-identical;
    - norms (+1, then -1, through float32) bit-identical in bf16 where 2^-15 <= |x| < 2^23, within one f32 ulp in f32.
    """
    src = hf_models(kind, "bfloat16" if dtype == "bf16" else "float32")
    cfg, hf = read_config(src), load_hf(src)
    mt = tmp_path / "mt"
    result = hf_to_maxtext(str(src), mt, ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    assert any(f"{cfg['vocab_size']}" in n and "zero rows" in n for n in result.notes)
    got, want = flatten(restore(mt)["params"]["params"]), expected_tree(hf, cfg, scan)
    assert set(got) == set(want)
    for path, x in want.items():
        assert_bits_equal(got[path], cast(x, "f32" if "norm" in path.split("/")[-2] else dtype), path)
    assert not got["token_embedder/embedding"][cfg["vocab_size"]:].any()       # the padded rows are zeros

    back = tmp_path / "hf"
    maxtext_to_hf(str(mt), back, ToHFOptions(dtype=dtype))
    out = load_hf(back)
    assert sorted(out) == sorted(hf)
    assert read_config(back)["architectures"] == cfg["architectures"]
    store = ml_dtypes.bfloat16 if dtype == "bf16" else F32
    E = cfg["hidden_size"]
    factors = {"model.embed_tokens.weight": F32(math.sqrt(E)), "q_proj.weight": F32(1 / math.sqrt(24))}
    moved = 0
    for name, x in hf.items():
        factor = next((f for k, f in factors.items() if name.endswith(k)), None)
        if factor is not None:
            down = (x.astype(F32) * factor).astype(store)
            assert_bits_equal(out[name], (down.astype(F32) / factor).astype(store), name)
            assert np.abs(bits(out[name]) - bits(x)).max() <= 1, name
            moved += int(np.count_nonzero(bits(out[name]) != bits(x)))
        elif name.endswith("norm.weight"):
            assert_bits_equal(out[name], ((x.astype(F32) + F32(1)) - F32(1)).astype(store), name)
            mag = np.abs(x.astype(F32))
            proven = (mag >= 2.0**-15) & (mag < 2.0**23) if dtype == "bf16" else mag >= 0.5
            assert proven.any() and np.abs(bits(out[name]) - bits(x))[proven].max() <= (dtype == "f32"), name
        else:
            assert_bits_equal(out[name], x, name)
    if kind == "gemma2":
        assert_bits_equal(out["model.embed_tokens.weight"], hf["model.embed_tokens.weight"])   # x 8, / 8
    if dtype == "bf16":
        assert moved > 0       # the one-ulp allowance is used: these scales really round


def test_padded_rows_are_dropped_whatever_they_hold(hf_models, tmp_path):
    """As 0.2.5's to_huggingface (`[:vocab]`): rows past the HF vocabulary never reach the HF table."""
    src = hf_models("gemma2", "float32")
    mt = tmp_path / "mt"
    hf_to_maxtext(str(src), mt, ToMaxTextOptions(dtype="f32"))
    ckpt = OrbaxCheckpoint(mt)
    table = ckpt.array("token_embedder/embedding")
    table[128:].write(np.full((PAD, 64), 7.0, F32)).result()
    assert ckpt.read(SourceSlice("token_embedder/embedding"))[128:].min() == 7.0
    back = tmp_path / "hf"
    maxtext_to_hf(str(mt), back, ToHFOptions(dtype="f32"))
    assert_bits_equal(load_hf(back)["model.embed_tokens.weight"], load_hf(src)["model.embed_tokens.weight"])


@pytest.mark.parametrize("kind", ["gemma", "gemma2"])
def test_padded_table_moves_in_row_pieces(hf_models, tmp_path, monkeypatch, kind):
    """Row pieces over the 128 HF rows (four equal ones of 32 for a 40-row budget), the last one stretched over the
    128 padding rows: planned reads stay within the source, both directions. The whole checkpoint (query kernels
    in pieces of whole heads too, their scale applied piece by piece) equals the one moved whole, and comes back."""
    src = hf_models(kind, "float32")
    cfg = read_config(src)
    E = cfg["hidden_size"]
    whole = tmp_path / "whole"
    hf_to_maxtext(str(src), whole, ToMaxTextOptions(dtype="f32"))
    monkeypatch.setattr(plan_mod, "PIECE_BYTES", E * 4 * 40)     # 40 embedding rows
    fam = detect_family(cfg)
    forward = build_to_maxtext(fam, cfg, True, np.dtype(F32))
    t = forward.tensor("token_embedder/embedding")
    assert [(task.span, task.source.rows) for task in t.tasks] == [
        ((0, 32), (0, 32)), ((32, 64), (32, 64)), ((64, 96), (64, 96)), ((96, 256), (96, 128))]
    assert [t.read_elements(task) for task in t.tasks] == [32 * E] * 4
    r = build_to_hf(fam, cfg, True, np.dtype(F32)).tensor("model.embed_tokens.weight")
    assert r.shape == (128, E) and [(task.span, task.source.rows) for task in r.tasks][-1] == ((96, 128), (96, 256))
    assert r.read_elements(r.tasks[-1]) == 160 * E
    q = "decoder/layers/self_attention_global/query/kernel" if kind == "gemma2" else (
        "decoder/layers/self_attention/query/kernel")
    assert forward.tensor(q).span_axis is not None and len(forward.tensor(q).tasks) > cfg["num_hidden_layers"] // 2
    pieces = tmp_path / "pieces"
    hf_to_maxtext(str(src), pieces, ToMaxTextOptions(dtype="f32"))
    a, b = (flatten(restore(p)["params"]["params"]) for p in (whole, pieces))
    assert set(a) == set(b)
    for path in a:
        assert_bits_equal(b[path], a[path], path)
    back, back_whole = tmp_path / "hf", tmp_path / "hf-whole"
    maxtext_to_hf(str(pieces), back, ToHFOptions(dtype="f32"))
    monkeypatch.undo()
    maxtext_to_hf(str(whole), back_whole, ToHFOptions(dtype="f32"))
    x, y = load_hf(back), load_hf(back_whole)
    for name in y:
        assert_bits_equal(x[name], y[name], name)
    s = F32(math.sqrt(E))
    emb = load_hf(src)["model.embed_tokens.weight"]
    assert_bits_equal(x["model.embed_tokens.weight"], ((emb * s) / s).astype(F32))


def test_pad_rows_transform_and_table_validation():
    pad = T.PadRows()
    x = np.arange(6, dtype=F32).reshape(3, 2)
    y = pad.to_maxtext(x, (5, 2))
    assert y.tolist() == [[0, 1], [2, 3], [4, 5], [0, 0], [0, 0]]
    assert pad.to_maxtext(np.zeros((0, 2), F32), (4, 2)).tolist() == [[0, 0]] * 4     # a piece past the HF rows
    assert pad.to_hf(y, (3, 2)).tolist() == x.tolist()
    assert T.Chain((T.embedding_scale(48, bf16=False), pad)).exact is False
    assert T.Chain((pad,)).exact and T.Chain((pad,)).pads
    assert T.embedding_scale(48, bf16=False).factor == float(F32(math.sqrt(48)))     # float32, not bf16 (6.9375)
    assert T.query_pre_attn_scale(144).factor == 1 / 12
    from ckpt_cli.families.base import row, validate_rules

    validate_rules([row("e", "x", "VP,E", "V,E", "embedding-scale-f32, pad-rows")], {"V": 3, "VP": 5, "E": 2})
    for bad in (row("e", "x", "VP,E", "V,E", "transpose, pad-rows"), row("e", "x", "V,E", "VP,E", "pad-rows"),
                row("e", "x", "E,VP", "E,V", "pad-rows")):
        with pytest.raises(AssertionError, match="pad-rows"):
            validate_rules([bad], {"V": 3, "VP": 5, "E": 2})


# ---------------------------------------------------------------------------------------------------------------
# Refusals, notes, the registry


REFUSED = [
    ("gemma2-2b", {"num_hidden_layers": 25}, "config.json has 25 layers: MaxText's gemma2 pairs a local and a global"),
    ("gemma2-2b", {"layer_types": ["full_attention", "sliding_attention"] * 13},
     "config.json makes layer 0 full_attention: MaxText's gemma2 makes even layers local"),
    ("gemma2-2b", {"attention_bias": True}, "config.json sets attention_bias: gemma2 in MaxText has no q/k/v/o biases"),
    ("gemma2-9b", {"tie_word_embeddings": False}, "config.json unties the embeddings: MaxText's gemma2 has no"),
    ("gemma2-27b", {"query_pre_attn_scalar": 12.5}, "config.json sets query_pre_attn_scalar 12.5"),
    ("gemma2-2b", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "config.json asks for linear RoPE"),
    ("gemma2-2b", {"use_bidirectional_attention": True}, "MaxText's gemma2 is causal"),
    ("gemma-2b", {"hidden_act": "silu"}, "config.json has activation 'silu': MaxText's gemma uses the tanh"),
    ("gemma-7b", {"tie_word_embeddings": False}, "MaxText's gemma has no logits_dense"),
]


@pytest.mark.parametrize("name,changes,message", REFUSED)
def test_refused_configs(name, changes, message):
    cfg = registry.reference_config(name) | changes
    family = detect_family(cfg)
    assert family.name == registry.lookup(name).family
    with pytest.raises(UnsupportedError) as exc:
        family.check_config(cfg)
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("kind,changes,message", [
    ("gemma2", {"num_hidden_layers": 5}, "error: config.json has 5 layers: MaxText's gemma2 pairs a local and a "
                                         "global layer, so the count must be even"),
    ("gemma", {"attention_bias": True}, "error: config.json sets attention_bias: gemma in MaxText has no q/k/v/o "
                                        "biases"),
])
def test_refusal_is_one_line_and_nothing_written(hf_models, tmp_path, kind, changes, message):
    src = with_config(hf_models(kind), tmp_path / "src", **changes)
    out = tmp_path / "mt"
    # --allow-unused: the 5-layer config over 6 layers of files reaches the family's own check
    r = run("convert", "hf-to-maxtext", src, "--out", out, "--allow-unused")
    assert r.exit_code == 2, r.output
    assert error_line(r) == message
    assert not out.exists() and not out.with_name("mt.partial").exists()


def test_reference_models_and_notes():
    for name, repo, fam, dims in (
            ("gemma-2b", "google/gemma-2b", "gemma", (2048, 8, 1, 256, 16384, 18)),
            ("gemma-7b", "google/gemma-7b", "gemma", (3072, 16, 16, 256, 24576, 28)),
            ("gemma2-2b", "google/gemma-2-2b", "gemma2", (2304, 8, 4, 256, 9216, 26)),
            ("gemma2-9b", "google/gemma-2-9b", "gemma2", (3584, 16, 8, 256, 14336, 42)),
            ("gemma2-27b", "google/gemma-2-27b", "gemma2", (4608, 32, 16, 128, 36864, 46))):
        spec = registry.lookup(name)
        c = spec.config
        assert (spec.repo_id, spec.family) == (repo, fam)
        assert (c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"],
                c["intermediate_size"], c["num_hidden_layers"]) == dims
        family = detect_family(c)
        notes = family.check_config(c)
        assert any("padded from 256000 to 256128 rows" in n for n in notes)
        assert family.dims(c)["VP"] == 256128
    assert gemma.gemma2_dims(registry.reference_config("gemma2-27b"))["Q"] == 144
    notes = detect_family(registry.reference_config("gemma2-27b")).check_config(registry.reference_config("gemma2-27b"))
    assert any("query_pre_attn_scalar 144 ** -0.5" in n and "head_dim 128" in n for n in notes)
    cfg = registry.reference_config("gemma2-2b") | {"sliding_window": 128, "final_logit_softcapping": None,
                                                     "vocab_size": 300}
    notes = detect_family(cfg).check_config(cfg)
    assert any("sliding_window 128" in n for n in notes) and any("final_logits_soft_cap" in n for n in notes)
    assert any("set vocab_size 428 in MaxText" in n for n in notes)


def test_model_flag_mismatch_is_one_line(hf_models, tmp_path):
    src = hf_models("gemma2")
    r = run("convert", "hf-to-maxtext", src, "--out", tmp_path / "a", "--model", "gemma2-9b")
    assert r.exit_code == 2 and "hidden_size = 64, but gemma2-9b has 3584" in error_line(r)
    r = run("convert", "hf-to-maxtext", src, "--out", tmp_path / "b", "--model", "gemma-2b")
    assert r.exit_code == 2 and "gemma-2b is a gemma model" in error_line(r)
    mt = tmp_path / "mt"
    hf_to_maxtext(str(src), mt, ToMaxTextOptions())
    r = run("convert", "maxtext-to-hf", mt, "--out", tmp_path / "c", "--model", "gemma2-27b")
    assert r.exit_code == 2 and "but gemma2-27b has" in error_line(r)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("name", ["gemma-2b", "gemma-7b", "gemma2-2b", "gemma2-9b", "gemma2-27b"])
def test_inspect_and_plan_with_no_data(name):
    r = run("inspect", "--model", name, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    shapes = {t["path"]: tuple(t["shape"]) for t in data["tensors"]}
    c = registry.reference_config(name)
    assert shapes["token_embedder/embedding"] == (256128, c["hidden_size"])
    pairs = c["num_hidden_layers"] // 2
    if name.startswith("gemma2"):
        assert shapes["decoder/layers/self_attention_global/query/kernel"] == (
            c["hidden_size"], pairs, c["num_attention_heads"], c["head_dim"])
    else:
        assert shapes["decoder/layers/pre_ffw_norm/scale"] == (c["hidden_size"], c["num_hidden_layers"])
    r = run("plan", "hf-to-maxtext", "--model", name, "--read-gbps", "1", "--write-gbps", "0.5", "--json")
    data = json.loads(r.stdout)
    assert data["family"] == registry.lookup(name).family and data["source_kind"] == "model"
    assert any("256128" in n for n in data["notes"])


def test_sharded_source_and_scan_layers_detected_back(hf_models, tmp_path):
    src = hf_models("gemma2", "bfloat16", sharded=True)
    mt = tmp_path / "mt"
    hf_to_maxtext(str(src), mt, ToMaxTextOptions(scan_layers=False))
    back = tmp_path / "hf"
    result = maxtext_to_hf(str(mt), back, ToHFOptions())
    assert result.plan.scan_layers is False and result.plan.family == "gemma2"
    assert sorted(load_hf(back)) == sorted(load_hf(src))
    shutil.rmtree(back)
