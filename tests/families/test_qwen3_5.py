"""Qwen3.5 MoE: the converted tree element by element (expectations from MaxText 0.2.5's QWEN3_5 mapping and its
`concat_qkvz_and_transpose` / `concat_ba_and_transpose` hooks, written here with explicit index math), bit-exact
round trips scanned and unscanned, the multimodal release's text prefix, verify-logits (f32 KL < 1e-6) and planted
mistakes it catches, refusals, `inspect --model` / `plan --model`.

Tiny models (built here): 8 layers = two cycles of 3 gated DeltaNet layers + 1 full attention; 2 key heads of 8 and
4 value heads of 12 in the DeltaNet (2 value heads per key head, key and value widths differ), 4 experts of width
32 plus a shared expert of width 24, top-2. "mm" is Qwen3_5MoeForConditionalGeneration as the releases are
(`model.language_model.*`, a one-block vision tower), "text" Qwen3_5MoeForCausalLM (`model.*`).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ckpt_cli import registry
from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf
from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families import detect_family, qwen3_5
from ckpt_cli.families.base import Join
from tests.cli_helpers import run
from tests.conftest import read_config
from tests.expectations import assert_bits_equal, cast, flatten
from tests.families.test_qwen3_next import expected_layer as qwen3_next_layer
from tests.test_convert_to_maxtext import load_hf, restore

TEXT = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=8,
            vocab_size=128, max_position_embeddings=256, moe_intermediate_size=32, shared_expert_intermediate_size=24,
            num_experts=4, num_experts_per_tok=2, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4, full_attention_interval=4,
            rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                             "mrope_section": [1, 1, 0], "mrope_interleaved": True})
PREFIX = "model.language_model."


def make_model(kind: str, dtype: str = "float32", seed: int = 0):
    """A tiny Qwen3.5 MoE with every parameter distinct (norms included)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "mm":
        cfg = tf.Qwen3_5MoeConfig(text_config=dict(TEXT), tie_word_embeddings=False,
                                  vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2,
                                                     out_hidden_size=64))
        model = tf.Qwen3_5MoeForConditionalGeneration(cfg)
    else:
        model = tf.Qwen3_5MoeForCausalLM(tf.Qwen3_5MoeTextConfig(**TEXT))
    with torch.no_grad():
        for _name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.05 * torch.randn_like(p))
    return model.to(getattr(torch, dtype)).eval()


@pytest.fixture(scope="session")
def q35_models(tmp_path_factory):
    """(kind, dtype) -> folder of a saved tiny Qwen3.5 model, built once per session."""
    cache = {}

    def get(kind: str = "mm", dtype: str = "float32"):
        if (kind, dtype) not in cache:
            folder = tmp_path_factory.mktemp(f"q35-{kind}-{dtype}")
            if kind == "fused":
                fuse_experts(get("mm", dtype), folder)
            else:
                make_model(kind, dtype).save_pretrained(folder)
            cache[kind, dtype] = folder
        return cache[kind, dtype]

    return get


def fuse_experts(src, folder) -> None:
    """The bf16 releases' layout of the same model: per layer `mlp.experts.gate_up_proj` (X, 2M, E), each expert's
    gate rows then its up rows, and `mlp.experts.down_proj` (X, E, M)."""
    import re
    import shutil

    from safetensors.numpy import save_file

    out, experts = {}, {}
    for name, x in load_hf(src).items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
        if m:
            experts.setdefault(m.group(1), {})[int(m.group(2)), m.group(3)] = x
        else:
            out[name] = x
    for prefix, w in experts.items():
        n = 1 + max(e for e, _ in w)
        out[prefix + ".gate_up_proj"] = np.stack([np.concatenate([w[e, "gate_proj"], w[e, "up_proj"]])
                                                  for e in range(n)])
        out[prefix + ".down_proj"] = np.stack([w[e, "down_proj"] for e in range(n)])
    save_file(out, folder / "model.safetensors", {"format": "pt"})
    shutil.copy(src / "config.json", folder / "config.json")


def unfused(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fused expert tensors split back into the per-expert names (the tree expectations read those)."""
    out = {}
    for name, x in tensors.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            m = x.shape[1] // 2
            for e in range(x.shape[0]):
                out[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = x[e, :m]
                out[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = x[e, m:]
        elif name.endswith(".mlp.experts.down_proj"):
            for e in range(x.shape[0]):
                out[name.replace("down_proj", f"{e}.down_proj.weight")] = x[e]
        else:
            out[name] = x
    return out


def text_tensors(folder) -> dict[str, np.ndarray]:
    """The language model's tensors under the text model's names (`model.*`, `lm_head.weight`)."""
    return {("model." + k.removeprefix(PREFIX)) if k.startswith(PREFIX) else k: v
            for k, v in load_hf(folder).items() if not k.startswith(("model.visual.", "mtp."))}


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def expected_layer(hf: dict, cfg: dict, i: int) -> dict[str, np.ndarray]:
    """Qwen3-Next's leaves, except the DeltaNet projections joined per key head (0.2.5's hooks, index by index):
    in_proj_qkvz[:, h*B + j] is q_h, k_h, v_h, z_h for j in [0, DK), [DK, 2DK), [2DK, 2DK + V*DV), [.., B)."""
    la = f"model.layers.{i}.linear_attn."
    if cfg["layer_types"][i] != "linear_attention":
        return qwen3_next_layer(hf, cfg, i)
    hk, hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv, e = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"], cfg["hidden_size"]
    per = hv // hk
    qkv, z = _f32(hf[la + "in_proj_qkv.weight"]), _f32(hf[la + "in_proj_z.weight"])
    b, a = _f32(hf[la + "in_proj_b.weight"]), _f32(hf[la + "in_proj_a.weight"])
    width = 2 * dk + 2 * per * dv
    qkvz = np.empty((e, hk * width), np.float32)
    ba = np.empty((e, 2 * hv), np.float32)
    for h in range(hk):
        for j in range(width):
            if j < dk:
                row = qkv[h * dk + j]                                    # q_h
            elif j < 2 * dk:
                row = qkv[hk * dk + h * dk + j - dk]                     # k_h
            elif j < 2 * dk + per * dv:
                row = qkv[2 * hk * dk + h * per * dv + j - 2 * dk]       # v_h: value heads h*per .. (h+1)*per - 1
            else:
                row = z[h * per * dv + j - 2 * dk - per * dv]            # z_h
            qkvz[:, h * width + j] = row
        for j in range(per):
            ba[:, h * 2 * per + j] = b[h * per + j]
            ba[:, h * 2 * per + per + j] = a[h * per + j]
    fused = dict(hf)
    fused[la + "in_proj_qkvz.weight"] = qkvz.T
    fused[la + "in_proj_ba.weight"] = ba.T
    return qwen3_next_layer(fused, cfg, i)


def expected_tree(hf: dict, cfg: dict, scan: bool) -> dict[str, np.ndarray]:
    """Scanned: `decoder/layers/layer_<p>` stacks HF layers p, p + 4, ... on axis 1 (routed experts keep axis 0)."""
    tree = {"token_embedder/embedding": _f32(hf["model.embed_tokens.weight"]),
            "decoder/decoder_norm/scale": _f32(hf["model.norm.weight"]),
            "decoder/logits_dense/kernel": _f32(hf["lm_head.weight"]).T}
    n, cycle = cfg["num_hidden_layers"], 4
    layers = [expected_layer(hf, cfg, i) for i in range(n)]
    if not scan:
        for i, lay in enumerate(layers):
            tree |= {f"decoder/layers_{i}/{leaf}": x for leaf, x in lay.items()}
        return tree
    for p in range(cycle):
        for leaf in layers[p]:
            tree[f"decoder/layers/layer_{p}/{leaf}"] = np.stack([layers[i][leaf] for i in range(p, n, cycle)], axis=1)
    return tree


CASES = [("float32", True, "f32"), ("float32", False, "f32"), ("bfloat16", True, "bf16"), ("bfloat16", False, "bf16")]


@pytest.mark.parametrize("src_dtype,scan,dtype", CASES)
def test_converted_tree_matches_maxtext_0_2_5_mapping(q35_models, tmp_path, src_dtype, scan, dtype):
    src = q35_models("mm", src_dtype)
    result = hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    got = flatten(restore(tmp_path / "mt")["params"]["params"])
    cfg = qwen3_5.model_config(read_config(src))
    want = expected_tree(text_tensors(src), cfg, scan)
    assert set(got) == set(want)
    for path, x in want.items():
        assert_bits_equal(got[path], cast(x, dtype), path)
    if scan:
        assert got["decoder/layers/layer_0/attention/in_proj_qkvz/kernel"].shape == (64, 2, 2 * (8 + 8 + 24 + 24))
        assert got["decoder/layers/layer_3/attention/attention/query/kernel"].shape == (64, 2, 4, 32)
    notes = " ".join(result.notes)
    assert "only the language model (model.language_model.*) is converted" in notes
    assert "model.visual." in notes   # the vision tower's tensors are named among those not used


@pytest.mark.parametrize("kind", ["mm", "text"])
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_round_trip_is_bit_exact(q35_models, tmp_path, kind, scan, dtype):
    """Every tensor of the language model comes back with its bits: in_proj_qkv / z / b / a split back out of the
    joined kernels; the text model is written (Qwen3_5MoeForCausalLM, `model.*`), from either source."""
    src = q35_models(kind, "bfloat16" if dtype == "bf16" else "float32")
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    result = maxtext_to_hf(str(tmp_path / "mt"), tmp_path / "hf", ToHFOptions(dtype=dtype))
    assert result.plan.scan_layers is scan
    want, got = text_tensors(src), load_hf(tmp_path / "hf")
    assert sorted(got) == sorted(want)
    for name, x in want.items():
        assert_bits_equal(got[name], x, name)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5MoeForCausalLM"] and config["model_type"] == "qwen3_5_moe_text"


def test_round_trip_loads_in_transformers_with_the_same_logits(q35_models, tmp_path):
    import torch
    import transformers as tf

    src = q35_models("mm", "float32")
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=True, dtype="f32"))
    maxtext_to_hf(str(tmp_path / "mt"), tmp_path / "hf", ToHFOptions(dtype="f32"))
    ids = torch.tensor([[3, 17, 5, 99, 42, 7, 11, 64, 2]])
    with torch.no_grad():
        a = tf.AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
        b = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_joined_leaves_read_each_source_row_once_both_ways(q35_models):
    """The joined kernels move as row ranges: every row of in_proj_qkv / z / b / a is read once (the plan's read
    bytes are the source's bytes), and the reverse plan writes each of them whole."""
    from ckpt_cli.plan import build_to_hf, build_to_maxtext

    cfg = qwen3_5.model_config(read_config(q35_models("mm")))
    fwd = build_to_maxtext(qwen3_5.FAMILY, cfg, True, np.dtype(np.float32))
    qkvz = fwd.tensor("decoder/layers/layer_0/attention/in_proj_qkvz/kernel")
    reads = sum(qkvz.read_elements(task) for task in qkvz.tasks)
    assert reads == np.prod(qkvz.shape) == 64 * 2 * 128
    assert {task.source.name for task in qkvz.tasks if task.index == (0,)} == {
        "model.layers.0.linear_attn.in_proj_qkv.weight", "model.layers.0.linear_attn.in_proj_z.weight"}
    back = build_to_hf(qwen3_5.FAMILY, cfg, True, np.dtype(np.float32))
    z = back.tensor("model.layers.4.linear_attn.in_proj_z.weight")
    assert z.shape == (48, 64) and sum(np.prod(z.task_shape(t)) for t in z.tasks) == 48 * 64
    assert [t.span for t in z.tasks] == [(0, 24), (24, 48)]                  # z_0, z_1 (2 value heads of 12 each)
    assert [t.source.rows for t in z.tasks] == [(40, 64), (104, 128)]       # after q, k, v of each key head


REFUSED = [
    ({"layer_types": ["linear_attention", "full_attention"] * 20}, "layer_types"),
    ({"attn_output_gate": False}, "attn_output_gate"),
    ({"mlp_only_layers": [1]}, "mlp_only_layers"),
]


@pytest.mark.parametrize("changes,message", REFUSED)
def test_refused_configs_are_one_line(changes, message):
    cfg = registry.reference_config("qwen3.5-35b-a3b") | changes
    family = detect_family(cfg)
    assert family.name == "qwen3_5"
    with pytest.raises(UnsupportedError) as exc:
        family.check_config(cfg)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_family_is_read_from_the_multimodal_config_and_its_text_config(q35_models):
    mm = read_config(q35_models("mm"))
    assert mm["model_type"] == "qwen3_5_moe" and "text_config" in mm
    assert detect_family(mm).name == "qwen3_5" == detect_family(read_config(q35_models("text"))).name
    text = qwen3_5.model_config(mm)
    assert text["model_type"] == "qwen3_5_moe_text" and text["hidden_size"] == 64 and not text["tie_word_embeddings"]
    assert qwen3_5.FAMILY.check_config(mm) == []   # the router renormalises: no norm_topk_prob note


@pytest.mark.parametrize("name,shape", [("qwen3.5-35b-a3b", [2048, 10, 12288]), ("qwen3.5-397b-a17b",
                                                                                  [4096, 15, 20480])])
def test_reference_model_plan_and_inspect(name, shape):
    spec = registry.lookup(name)
    assert spec.family == "qwen3_5" and spec.repo_id.startswith("Qwen/Qwen3.5-")
    r = run("inspect", "--model", name, "--filter", "decoder/layers/layer_0/attention/in_proj_qkvz/*", "--json")
    assert r.exit_code == 0, r.output
    tensors = {t["path"]: t["shape"] for t in json.loads(r.stdout)["tensors"]}
    assert tensors == {"decoder/layers/layer_0/attention/in_proj_qkvz/kernel": shape}
    for direction in ("hf-to-maxtext", "maxtext-to-hf"):
        r = run("plan", direction, "--model", name, "--no-scan", "--json")
        assert r.exit_code in (0, 1), r.output
        assert json.loads(r.stdout)["family"] == "qwen3_5"


def test_join_validation_refuses_pieces_that_do_not_tile():
    from ckpt_cli.families.base import row, validate_rules

    dims = {"E": 4, "G": 2, "A": 4, "B": 6}
    good = row("x/kernel", "a", "E,A+B", "A+B,E", "transpose", join=Join("G", (("a", "A"), ("b", "B"))))
    validate_rules([good], dims | {"A+B": 10})
    for bad in (Join("G", (("a", "A"), ("b", "A"))),       # pieces do not add up to the rows
                Join("G", (("b", "B"), ("a", "A"))),       # not starting with the rule's own tensor
                Join("E", (("a", "A"), ("b", "B")))):      # 6 rows do not split into 4 groups
        with pytest.raises(AssertionError, match="joined pieces"):
            validate_rules([dataclasses.replace(good, join=bad)], dims | {"A+B": 10})
    assert Join("G", (("a", "A"), ("b", "B"))).layout(dims) == [("a", 0, 2), ("b", 0, 3), ("a", 2, 2), ("b", 3, 3)]


# ------------------------------------------------------------------------------------------------------------
# verify-logits: MaxText's qwen3_5 math (the Qwen3-Next forward) against transformers


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_verify_logits_f32_matches_transformers(q35_models, tmp_path, scan):
    from tests.verify.test_verify_logits import verify_json

    src = q35_models("mm", "float32")
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=scan, dtype="f32"))
    data = verify_json("--maxtext", tmp_path / "mt", "--hf", src, "--max-kl", "1e-6")
    assert data["passed"] and data["family"] == "qwen3_5" and data["scan_layers"] is scan
    assert data["summary"]["kl_max"] < 1e-6 and data["summary"]["top1_agreement"] == 1.0


LA = qwen3_5.LA
MISTAKES = {   # the joins as one might get them wrong
    "v-z-swapped": ("attention/in_proj_qkvz/kernel", LA + "in_proj_qkv.weight",
                    Join("HK", ((LA + "in_proj_qkv.weight", "HK*DK"), (LA + "in_proj_qkv.weight", "HK*DK"),
                                (LA + "in_proj_z.weight", "HV*DV"), (LA + "in_proj_qkv.weight", "HV*DV")))),
    "b-a-swapped": ("attention/in_proj_ba/kernel", LA + "in_proj_a.weight",
                    Join("HK", ((LA + "in_proj_a.weight", "HV"), (LA + "in_proj_b.weight", "HV")))),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_planted_join_mistakes_fail(q35_models, tmp_path, monkeypatch, mistake):
    from tests.verify.test_verify_logits import assert_fails

    leaf, hf, join = MISTAKES[mistake]
    src = q35_models("mm", "float32")
    table = tuple(dataclasses.replace(r, hf=hf, join=join) if r.maxtext == leaf else r for r in qwen3_5.LOCAL_LAYER)
    with monkeypatch.context() as m:
        m.setattr(qwen3_5, "LOCAL_LAYER", table)
        hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(dtype="f32"))
    assert_fails(tmp_path / "mt", src)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
def test_fused_experts_of_the_bf16_releases(q35_models, tmp_path, scan):
    """Files holding the routed experts fused per layer (`mlp.experts.gate_up_proj` / `down_proj`, as the bf16
    releases and 0.2.5's mapping have them) give the same MaxText tree, verify at KL < 1e-6, and come back fused."""
    from tests.verify.test_verify_logits import verify_json

    src = q35_models("fused", "float32")
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in load_hf(src)
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=scan, dtype="f32"))
    got = flatten(restore(tmp_path / "mt")["params"]["params"])
    want = expected_tree(unfused(text_tensors(src)), qwen3_5.model_config(read_config(src)), scan)
    assert set(got) == set(want)
    for path, x in want.items():
        assert_bits_equal(got[path], x, path)
    data = verify_json("--maxtext", tmp_path / "mt", "--hf", src, "--max-kl", "1e-6")
    assert data["passed"] and data["summary"]["kl_max"] < 1e-6
    maxtext_to_hf(str(tmp_path / "mt"), tmp_path / "hf", ToHFOptions())
    want, back = text_tensors(src), load_hf(tmp_path / "hf")
    assert sorted(back) == sorted(want)
    for name, x in want.items():
        assert_bits_equal(back[name], x, name)


@pytest.mark.parametrize("kind", ["mm", "fused"])
def test_inspect_against_the_converted_checkpoint(q35_models, tmp_path, kind):
    """`inspect SOURCE --against OUT` maps the release's files (either expert layout) onto MaxText's paths: nothing
    missing or mis-shaped; the vision tower is named as mapping to no MaxText path."""
    src = q35_models(kind, "float32")
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(dtype="f32"))
    r = run("inspect", src, "--against", tmp_path / "mt", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["missing"] == data["extra"] == data["mismatched"] == [] and data["identical"]
    assert data["unmapped"] and all(n.startswith("model.visual.") for n in data["unmapped"])


def test_dense_qwen3_5_is_refused_in_one_line():
    """MaxText 0.2.5 has no dense Qwen3.5 name: a dense config (multimodal or text) is the family's, refused."""
    text = {k: v for k, v in registry.reference_config("qwen3.5-35b-a3b").items() if "expert" not in k}
    for cfg in ({"model_type": "qwen3_5", "text_config": text | {"model_type": "qwen3_5_text"}},
                text | {"model_type": "qwen3_5_text"}):
        family = detect_family(cfg)
        assert family.name == "qwen3_5"
        with pytest.raises(UnsupportedError, match="defines only the MoE Qwen3.5 models") as exc:
            family.check_config(cfg)
        assert "\n" not in str(exc.value)


def test_a_release_config_checks_against_its_model_name():
    """The release's config.json (multimodal: text_config nested, tie_word_embeddings at the top) matches its
    registered name; a different width does not."""
    from ckpt_cli.errors import ConfigMismatchError

    spec = registry.lookup("qwen3.5-397b-a17b")
    text = {k: v for k, v in spec.config.items() if k not in ("architectures", "tie_word_embeddings")}
    release = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
               "tie_word_embeddings": False, "text_config": text | {"model_type": "qwen3_5_moe_text"},
               "vision_config": {"depth": 27}}
    family = detect_family(release, "qwen3.5-397b-a17b")
    registry.check_against(spec, family.model_config(release), family.reference_keys)
    with pytest.raises(ConfigMismatchError, match="hidden_size"):
        bad = release | {"text_config": release["text_config"] | {"hidden_size": 2048}}
        registry.check_against(spec, family.model_config(bad), family.reference_keys)
