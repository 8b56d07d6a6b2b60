"""LoRA adapters both ways: PEFT adapter <-> MaxText LoRA tree, and merged into the base.

Expectations are written from MaxText 0.2.5's facts (ckpt_cli/lora.py's docstring): A = lora_A.T `(in, r)`,
B = lora_B.T `(r, out)` with the base kernel's output transforms (Llama 3.1: RoPE interleave per head, 1/sqrt(D)
on the query), layers stacked on axis 1 when scanned.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf
from tests.cli_helpers import error_line, run
from tests.conftest import make_hf_model, save_model
from tests.hub_server import fake_hub  # noqa: F401 (fixture)
from tests.lora_helpers import make_adapter, reference_merge

FAMILY_KIND = {"qwen3": "qwen3", "llama3.1": "llama"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (base folder, adapter folder), built once."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(kind: str, **adapter) -> tuple[Path, Path]:
        key = kind + json.dumps(adapter, sort_keys=True)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"lora-{kind}")
            base = root / "base"
            if not base.exists():
                save_model(make_hf_model(kind), base, False)
            cache[key] = (base, make_adapter(base, root / "adapter", **adapter))
        return cache[key]

    return get


def restore(out: Path) -> dict[str, np.ndarray]:
    """Every leaf under params/params, restored with orbax's own API."""
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(str(out / "0" / "items"))["params"]["params"]
    flat: dict[str, np.ndarray] = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            else:
                flat[prefix + k] = np.asarray(v)

    walk(tree, "")
    return flat


MODULES = {"q_proj": "self_attention/query", "k_proj": "self_attention/key", "v_proj": "self_attention/value",
           "o_proj": "self_attention/out", "gate_proj": "mlp/wi_0", "up_proj": "mlp/wi_1", "down_proj": "mlp/wo"}


def expected_b(kind: str, module: str, b_hf: np.ndarray, head_dim: int) -> np.ndarray:
    """MaxText's B from PEFT's lora_B (out, r): transposed; for Llama 3.1's q/k each head's columns interleaved
    (rotate-half -> pairs), and the query's 1/sqrt(D) folded in (float32)."""
    b = b_hf.T.copy()
    if kind == "llama" and module in ("q_proj", "k_proj"):
        r, width = b.shape
        heads = b.reshape(r, width // head_dim, head_dim)
        half = head_dim // 2
        inter = np.empty_like(heads)
        inter[..., 0::2], inter[..., 1::2] = heads[..., :half], heads[..., half:]
        b = inter.reshape(r, width)
        if module == "q_proj":
            b = (b.astype(np.float32) * np.float32(1 / math.sqrt(head_dim))).astype(b.dtype)
    return b


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
@pytest.mark.parametrize("scan", [True, False])
def test_adapter_tree_is_maxtexts(tiny, tmp_path, kind, scan):
    base, adapter = tiny(kind)
    out = tmp_path / "mt"
    hf_to_maxtext(str(base), out, ToMaxTextOptions(scan_layers=scan, dtype="f32", lora=str(adapter), lora_only=True))
    got = restore(out)
    peft = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((base / "config.json").read_text())
    layers, d = cfg["num_hidden_layers"], cfg["head_dim"]
    want: dict[str, np.ndarray] = {}
    for module, path in MODULES.items():
        stem = "base_model.model.model.layers.{i}." + ("self_attn." if path.startswith("self") else "mlp.") + module
        a = [peft[stem.format(i=i) + ".lora_A.weight"].T for i in range(layers)]
        b = [expected_b(kind, module, peft[stem.format(i=i) + ".lora_B.weight"], d) for i in range(layers)]
        if scan:
            want[f"decoder/layers/{path}/kernel_lora_a"] = np.stack(a, axis=1)
            want[f"decoder/layers/{path}/kernel_lora_b"] = np.stack(b, axis=1)
        else:
            for i in range(layers):
                want[f"decoder/layers_{i}/{path}/kernel_lora_a"] = a[i]
                want[f"decoder/layers_{i}/{path}/kernel_lora_b"] = b[i]
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == np.float32 and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    meta = json.loads((out / "0" / "_CHECKPOINT_METADATA").read_text())["custom_metadata"]
    assert meta["scan_layers"] is scan
    assert meta["lora"]["lora_rank"] == 4 and meta["lora"]["lora_alpha"] == 8.0
    assert meta["lora"]["enable_lora"] is True


def _ulps(a: np.ndarray, b: np.ndarray) -> int:
    bits = {2: np.int16, 4: np.int32}[a.dtype.itemsize]
    return int(np.abs(a.view(bits).astype(np.int64) - b.view(bits).astype(np.int64)).max())


@pytest.mark.parametrize("kind,scan,dtype", [("qwen3", True, "float32"), ("qwen3", False, "bfloat16"),
                                             ("llama", True, "float32"), ("llama", False, "bfloat16")])
def test_adapter_round_trip(tiny, tmp_path, kind, scan, dtype):
    """PEFT -> MaxText -> PEFT: bit-exact where B is only permuted; Llama's query B (1/sqrt(D) folded in, D=16, a
    power of two) exact too; the adapter_config.json comes back as it was."""
    base, adapter = tiny(kind, dtype=dtype, rslora=True)
    mt, back = tmp_path / "mt", tmp_path / "back"
    out_dtype = "f32" if dtype == "float32" else "bf16"
    hf_to_maxtext(str(base), mt, ToMaxTextOptions(scan_layers=scan, dtype=out_dtype, lora=str(adapter),
                                                  lora_only=True))
    maxtext_to_hf(str(mt), back, ToHFOptions(lora_only=True))
    want = load_file(str(adapter / "adapter_model.safetensors"))
    got = load_file(str(back / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert _ulps(got[k], want[k]) == 0, k
    assert json.loads((back / "adapter_config.json").read_text()) == json.loads(
        (adapter / "adapter_config.json").read_text())


def test_rslora_alpha_is_recorded_for_maxtexts_alpha_over_r(tiny, tmp_path):
    base, adapter = tiny("qwen3", rslora=True, r=4, alpha=8.0)
    out = tmp_path / "mt"
    hf_to_maxtext(str(base), out, ToMaxTextOptions(dtype="f32", lora=str(adapter), lora_only=True))
    lora = json.loads((out / "0" / "_CHECKPOINT_METADATA").read_text())["custom_metadata"]["lora"]
    assert lora["lora_alpha"] / lora["lora_rank"] == 8.0 / math.sqrt(4)


def _reference_model(base: Path, adapter: Path, scale: float) -> dict[str, np.ndarray]:
    """The base weights with every adapted weight replaced by W + scale·B·A (float64, rounded once)."""
    weights = load_file(str(base / "model.safetensors"))
    peft = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for name, w in weights.items():
        stem = "base_model.model." + name.removesuffix(".weight")
        if stem + ".lora_A.weight" in peft:
            out[name] = reference_merge(w, peft[stem + ".lora_A.weight"], peft[stem + ".lora_B.weight"], scale)
        else:
            out[name] = w.astype(np.float64)
    return out


@pytest.mark.parametrize("kind,scan", [("qwen3", True), ("llama", False)])
def test_merged_both_ways_match_the_reference_merge(tiny, tmp_path, kind, scan):
    """hf-to-maxtext --lora (merged), then maxtext-to-hf: each weight W + s·B·A rounded once to float32 (bit-exact
    vs the float64 reference); and maxtext-to-hf BASE --lora LORA_CKPT gives the same merged model."""
    base, adapter = tiny(kind, rslora=True)
    scale = 8.0 / math.sqrt(4)
    merged_mt, merged_hf = tmp_path / "merged-mt", tmp_path / "merged-hf"
    hf_to_maxtext(str(base), merged_mt, ToMaxTextOptions(scan_layers=scan, dtype="f32", lora=str(adapter)))
    maxtext_to_hf(str(merged_mt), merged_hf, ToHFOptions())
    want = _reference_model(base, adapter, scale)
    got = load_file(str(merged_hf / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        ref = want[k].astype(np.float32)
        limit = 1 if (kind == "llama" and "q_proj" in k) else 0     # the folded query scale and back
        assert _ulps(got[k], ref) <= limit, k

    base_mt, lora_mt, merged2 = tmp_path / "base-mt", tmp_path / "lora-mt", tmp_path / "merged2"
    hf_to_maxtext(str(base), base_mt, ToMaxTextOptions(scan_layers=scan, dtype="f32"))
    hf_to_maxtext(str(base), lora_mt, ToMaxTextOptions(scan_layers=scan, dtype="f32", lora=str(adapter),
                                                       lora_only=True))
    maxtext_to_hf(str(base_mt), merged2, ToHFOptions(lora=str(lora_mt)))
    got2 = load_file(str(merged2 / "model.safetensors"))
    for k in want:
        limit = 1 if (kind == "llama" and "q_proj" in k) else 0
        assert _ulps(got2[k], want[k].astype(np.float32)) <= limit, k


def test_peft_loads_the_exported_adapter_and_merges_alike(tiny, tmp_path):
    """peft's PeftModel.from_pretrained loads the maxtext-to-hf --lora-only folder on the HF base, and its
    merge_and_unload agrees with ckpt's merge: peft rounds B·A, the scaling and the sum in float32 (so an element
    where W and the delta nearly cancel is many of its own ulps off), ckpt rounds once from float64; every element
    is within 4 float32 epsilons of the tensor's largest magnitude (unadapted weights: identical)."""
    peft = pytest.importorskip("peft")
    import torch
    import transformers as tf

    base, adapter = tiny("llama")
    mt, back, merged = tmp_path / "mt", tmp_path / "back", tmp_path / "merged"
    hf_to_maxtext(str(base), mt, ToMaxTextOptions(dtype="f32", lora=str(adapter), lora_only=True))
    maxtext_to_hf(str(mt), back, ToHFOptions(lora_only=True))
    model = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           str(back))
    merged_sd = {k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    hf_to_maxtext(str(base), tmp_path / "mmt", ToMaxTextOptions(dtype="f32", lora=str(adapter)))
    maxtext_to_hf(str(tmp_path / "mmt"), merged, ToHFOptions())
    ours = load_file(str(merged / "model.safetensors"))
    adapted = {k for k in ours if any(m in k for m in MODULES)}
    assert adapted
    for k in ours:
        if k in adapted:
            bound = 4 * np.finfo(np.float32).eps * np.abs(ours[k]).max()
            assert np.abs(ours[k].astype(np.float64) - merged_sd[k]).max() <= bound, k
        else:
            assert _ulps(ours[k], merged_sd[k]) == 0, k


def _peft_names(adapter: Path) -> dict[str, np.ndarray]:
    return load_file(str(adapter / "adapter_model.safetensors"))


def _rewrite(adapter: Path, dest: Path, tensors: dict | None = None, **config) -> Path:
    from safetensors.numpy import save_file

    dest.mkdir()
    save_file(tensors if tensors is not None else _peft_names(adapter), str(dest / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text()) | config
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize("change,message", [
    ({"use_dora": True}, "use_dora = True: MaxText 0.2.5's LoRA has one rank and alpha"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"peft_type": "IA3"}, "peft_type 'IA3': only LoRA adapters convert"),
    ({"r": 0}, "r must be a positive integer"),
])
def test_adapter_config_refusals(tiny, tmp_path, change, message):
    base, adapter = tiny("qwen3")
    bad = _rewrite(adapter, tmp_path / "bad", **change)
    result = run("convert", "hf-to-maxtext", base, "--lora", bad, "--lora-only", "--out", tmp_path / "out")
    assert result.exit_code != 0
    assert message in error_line(result)
    assert not (tmp_path / "out").exists()


def test_adapter_on_unsupported_weights_is_refused(tiny, tmp_path):
    """An adapter on the LM head (PEFT can) has no MaxText 0.2.5 LoRA leaf: one line naming the tensor."""
    base, adapter = tiny("qwen3")
    tensors = _peft_names(adapter) | {
        "base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32),
        "base_model.model.lm_head.lora_B.weight": np.zeros((128, 4), np.float32)}
    bad = _rewrite(adapter, tmp_path / "bad", tensors)
    result = run("convert", "hf-to-maxtext", base, "--lora", bad, "--out", tmp_path / "out")
    assert result.exit_code != 0
    line = error_line(result)
    assert "base_model.model.lm_head.lora_A.weight" in line and "no LoRA leaf" in line


def test_expert_adapters_are_refused(tmp_path):
    """Qwen3 MoE experts: MaxText 0.2.5 puts no LoRA beside expert weights."""
    base = save_model(make_hf_model("qwen3-moe"), tmp_path / "moe", False)
    adapter = make_adapter(base, tmp_path / "adapter", modules=("q_proj", "gate_proj"), skip="")
    result = run("convert", "hf-to-maxtext", base, "--lora", adapter, "--lora-only", "--out", tmp_path / "out")
    assert result.exit_code != 0
    line = error_line(result)
    assert "experts" in line and "no LoRA leaf" in line


def test_partial_layer_adapters_are_refused(tiny, tmp_path):
    base, adapter = tiny("qwen3")
    tensors = {k: v for k, v in _peft_names(adapter).items() if "layers.1.self_attn.q_proj" not in k}
    bad = _rewrite(adapter, tmp_path / "bad", tensors)
    result = run("convert", "hf-to-maxtext", base, "--lora", bad, "--lora-only", "--out", tmp_path / "out")
    assert result.exit_code != 0
    assert "some layers only" in error_line(result)


def test_wrong_shaped_adapter_tensor_is_one_line(tiny, tmp_path):
    base, adapter = tiny("qwen3")
    tensors = _peft_names(adapter)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[name] = np.zeros((64, 5), np.float32)
    bad = _rewrite(adapter, tmp_path / "bad", tensors)
    result = run("convert", "hf-to-maxtext", base, "--lora", bad, "--lora-only", "--out", tmp_path / "out")
    assert result.exit_code != 0
    assert name in error_line(result)


def test_flag_misuse_is_a_usage_error(tiny, tmp_path):
    base, adapter = tiny("qwen3")
    result = run("convert", "hf-to-maxtext", base, "--lora-only", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--lora-only needs --lora" in result.stderr
    result = run("convert", "maxtext-to-hf", tmp_path, "--lora", tmp_path, "--lora-only", "--out", tmp_path / "o")
    assert result.exit_code == 2


def test_base_checkpoint_as_lora_only_source_is_one_line(tiny, tmp_path):
    base, _ = tiny("qwen3")
    mt = tmp_path / "mt"
    hf_to_maxtext(str(base), mt, ToMaxTextOptions(dtype="f32"))
    result = run("convert", "maxtext-to-hf", mt, "--lora-only", "--out", tmp_path / "out")
    assert result.exit_code != 0
    assert "no LoRA leaves" in error_line(result)


@pytest.mark.parametrize("kind,scan", [("qwen3", True), ("llama", False)])
def test_verify_logits_with_the_adapter(tiny, tmp_path, kind, scan):
    """The MaxText forward with the LoRA checkpoint applied vs the HF model with the PEFT adapter (peft's own
    PeftModel when installed): max KL < 1e-6 in float32; and a merged checkpoint against the same reference."""
    base, adapter = tiny(kind)
    mt, lora_mt, merged = tmp_path / "mt", tmp_path / "lora", tmp_path / "merged"
    hf_to_maxtext(str(base), mt, ToMaxTextOptions(scan_layers=scan, dtype="f32"))
    hf_to_maxtext(str(base), lora_mt, ToMaxTextOptions(scan_layers=scan, dtype="f32", lora=str(adapter),
                                                       lora_only=True))
    result = run("verify-logits", "--maxtext", mt, "--lora", lora_mt, "--hf", base, "--max-kl", "1e-6", "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["passed"] and record["summary"]["kl_max"] < 1e-6 and record["lora"] == str(lora_mt)
    assert record["reference"]["lora"] == str(adapter.resolve())
    without = run("verify-logits", "--maxtext", mt, "--hf", base, "--hf-lora", adapter, "--max-kl", "1e-6", "--json")
    assert without.exit_code == 1      # the base alone is not the adapted model
    hf_to_maxtext(str(base), merged, ToMaxTextOptions(scan_layers=scan, dtype="f32", lora=str(adapter)))
    result = run("verify-logits", "--maxtext", merged, "--hf", base, "--hf-lora", adapter, "--max-kl", "1e-6",
                 "--json")
    assert result.exit_code == 0, result.stderr


def test_inspect_shows_both_adapter_trees(tiny, tmp_path):
    base, adapter = tiny("qwen3")
    peft = json.loads(run("inspect", adapter, "--json").stdout)
    adapter_bytes = sum(v.nbytes for v in _peft_names(adapter).values())
    assert peft["lora"] == {
        "format": "peft", "r": 4, "lora_alpha": 8.0, "use_rslora": False, "scale": 2.0,
        "target_modules": sorted(MODULES), "base_model": str(base),
        "modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
        "tensors": 28, "bytes": adapter_bytes}
    mt = tmp_path / "mt"
    hf_to_maxtext(str(base), mt, ToMaxTextOptions(dtype="bf16", lora=str(adapter), lora_only=True))
    record = json.loads(run("inspect", mt, "--json").stdout)
    assert record["lora"] == {"format": "maxtext", "r": 4, "lora_alpha": 8.0, "scale": 2.0,
                              "modules": sorted(MODULES.values()), "kernels": 7, "tensors": 14,
                              "bytes": adapter_bytes // 2}
    text = run("inspect", mt).stdout
    assert "r 4, alpha 8 (scale 2) on mlp/wi_0" in text


def test_plan_prices_the_adapter(tiny, tmp_path):
    base, adapter = tiny("qwen3")
    record = json.loads(run("plan", "hf-to-maxtext", base, "--lora", adapter, "--lora-only", "--dtype", "f32",
                            "--json").stdout)
    adapter_bytes = sum(v.nbytes for v in _peft_names(adapter).values())
    assert record["tensors"] == 14 and record["bytes"]["written"] == adapter_bytes
    merged = json.loads(run("plan", "hf-to-maxtext", base, "--lora", adapter, "--json").stdout)
    assert merged["tensors"] == json.loads(run("plan", "hf-to-maxtext", base, "--json").stdout)["tensors"]
    assert any("merged (W + 2·B·A) into 14 weight(s)" in n for n in merged["notes"])
    mt = tmp_path / "mt"
    hf_to_maxtext(str(base), mt, ToMaxTextOptions(dtype="f32", lora=str(adapter), lora_only=True))
    back = json.loads(run("plan", "maxtext-to-hf", mt, "--lora-only", "--json").stdout)
    assert back["tensors"] == 28 and back["bytes"]["written"] == adapter_bytes


ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAMILIES = {   # kind: (model builder module, the modules the adapter targets)
    "gemma": ("conftest", ALL),
    "gemma2": ("conftest", ALL),                 # one MaxText layer holds a local and a global HF layer
    "gemma3": ("conftest", ALL),
    "olmo3-plain": ("conftest", ALL),
    "mistral": ("tiny_dense", ALL),
    "qwen2": ("tiny_dense", ALL),
    "llama2": ("tiny_dense", ALL),
    "mixtral": ("conftest", ("q_proj", "k_proj", "v_proj", "o_proj")),
    "qwen3-moe": ("conftest", ("q_proj", "k_proj", "v_proj", "o_proj")),
    "gpt-oss": ("conftest", ("q_proj", "k_proj", "v_proj", "o_proj")),
    "scout": ("llama4", ALL),                    # dense and shared-expert MLPs; routed experts skipped
    "v2": ("deepseek", ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj")),           # MLA wkv_a / wkv_b; peft misplaces down_proj: merged by name
    "qwen3-next": ("conftest", ("q_proj",)),     # full-attention layers only: the DeltaNet layers get none
}


def _build(kind: str, folder: Path) -> Path:
    where = FAMILIES[kind][0]
    if where == "conftest":
        model = make_hf_model(kind)
    elif where == "tiny_dense":
        from tests.families.tiny_dense import make_model

        model = make_model(kind)
    elif where == "llama4":
        from tests.families.test_llama4 import make_model

        model = make_model(kind)
    else:
        from tests.families.test_deepseek import make_model

        model = make_model(kind)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_every_family_adapter_round_trips_and_verifies(tmp_path, kind):
    """Each family whose kernels MaxText 0.2.5's LoRA reaches: the adapter tree converts back bit-exact (the
    query's lora_B within one float32 ulp where a scale that is no power of two is folded in: Gemma's, Gemma 2's
    and Mistral's head_dim 24), and the MaxText forward with it matches the HF model with the PEFT adapter (max
    KL < 1e-6, f32)."""
    base = _build(kind, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", modules=FAMILIES[kind][1])
    mt, lora_mt, back = tmp_path / "mt", tmp_path / "lora", tmp_path / "back"
    hf_to_maxtext(str(base), mt, ToMaxTextOptions(dtype="f32"))
    hf_to_maxtext(str(base), lora_mt, ToMaxTextOptions(dtype="f32", lora=str(adapter), lora_only=True))
    maxtext_to_hf(str(lora_mt), back, ToHFOptions(lora_only=True))
    want, got = _peft_names(adapter), load_file(str(back / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        assert _ulps(got[k], want[k]) <= (1 if "q_proj.lora_B" in k else 0), k
    result = run("verify-logits", "--maxtext", mt, "--lora", lora_mt, "--hf", base, "--max-kl", "1e-6", "--json")
    assert result.exit_code == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["summary"]["kl_max"] < 1e-6


@pytest.mark.parametrize("layout", ["to_maxtext", "nnx_root"])
def test_lora_leaves_wrapped_as_nnx_variables_are_read(tiny, tmp_path, layout):
    """MaxText 0.2.5's to_maxtext adapter mode writes `params/params/.../kernel_lora_a/value`; an NNX state saved
    whole (Tunix's model_params) has `decoder/.../kernel_lora_a/value` at the root: both read as ckpt's own tree."""
    import orbax.checkpoint as ocp

    base, adapter = tiny("qwen3")
    ours = tmp_path / "ours"
    hf_to_maxtext(str(base), ours, ToMaxTextOptions(dtype="f32", lora=str(adapter), lora_only=True))
    tree: dict = {}
    for path, value in restore(ours).items():
        node = tree
        for key in path.split("/"):
            node = node.setdefault(key, {})
        node["value"] = value
    theirs = tmp_path / "theirs"
    ocp.PyTreeCheckpointer().save(str(theirs / "0" / "items"),
                                  {"params": {"params": tree}} if layout == "to_maxtext" else tree)
    meta = json.loads((ours / "0" / "_CHECKPOINT_METADATA").read_text())
    meta["custom_metadata"] = {"lora": meta["custom_metadata"]["lora"]}     # no ckpt provenance
    (theirs / "0" / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))
    back = tmp_path / "back"
    result = run("convert", "maxtext-to-hf", theirs, "--lora-only", "--hf-config", base / "config.json",
                 "--out", back)
    assert result.exit_code == 0, result.stderr
    want, got = _peft_names(adapter), load_file(str(back / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want) and all(_ulps(got[k], want[k]) == 0 for k in want)
    cfg = json.loads((back / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["target_modules"] == sorted(MODULES)


def test_out_inside_the_adapter_folder_is_refused(tiny, tmp_path):
    base, adapter = tiny("qwen3")
    result = run("convert", "hf-to-maxtext", base, "--lora", adapter, "--lora-only", "--out", adapter / "mt")
    assert result.exit_code != 0
    assert "mt" in error_line(result) and not (adapter / "mt").exists()


def test_adapter_from_a_hub_repo(tiny, tmp_path, fake_hub):  # noqa: F811 (fixture)
    """--lora org/adapter fetches only adapter_config.json and adapter_model.safetensors through the hub client."""
    import shutil

    base, adapter = tiny("qwen3")
    hub, _ = fake_hub
    repo = shutil.copytree(adapter, tmp_path / "repo")
    (repo / "README.md").write_text("an adapter card, not fetched")
    hub.add_repo("org/tiny-adapter", repo)
    out = tmp_path / "mt"
    result = run("convert", "hf-to-maxtext", base, "--lora", "org/tiny-adapter", "--lora-only", "--dtype", "f32",
                 "--out", out)
    assert result.exit_code == 0, result.stderr
    fetched = {path.rsplit("/", 1)[-1] for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path}
    assert fetched == {"adapter_config.json", "adapter_model.safetensors"}
    local = tmp_path / "local"
    hf_to_maxtext(str(base), local, ToMaxTextOptions(dtype="f32", lora=str(adapter), lora_only=True))
    got, want = restore(out), restore(local)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)

    hub.add_repo("org/tiny-base", base)            # the base from the hub too: --lora-only reads no shard of it
    hub.reset_counters()
    result = run("convert", "hf-to-maxtext", "org/tiny-base", "--lora", "org/tiny-adapter", "--lora-only",
                 "--dtype", "f32", "--out", tmp_path / "mt2")
    assert result.exit_code == 0, result.stderr
    assert restore(tmp_path / "mt2").keys() == want.keys()
    assert not any("model.safetensors" in path and rng is None for method, path, rng in hub.requests
                   if method == "GET" and "/resolve/" in path and "tiny-base" in path)
    merged_remote, merged_local = tmp_path / "merged-remote", tmp_path / "merged-local"
    result = run("convert", "hf-to-maxtext", "org/tiny-base", "--lora", "org/tiny-adapter", "--dtype", "f32",
                 "--out", merged_remote)
    assert result.exit_code == 0, result.stderr
    hf_to_maxtext(str(base), merged_local, ToMaxTextOptions(dtype="f32", lora=str(adapter)))
    got, want = restore(merged_remote), restore(merged_local)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
