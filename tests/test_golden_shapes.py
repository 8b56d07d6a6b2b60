"""The plan for real configs (no data) equals maxtext-layout.md Appendix A (and §8.2, §9.2, §11.2), scanned and
unscanned."""

from __future__ import annotations

import math

import pytest

from ckpt_cli import registry
from ckpt_cli.dtypes import output_dtype
from ckpt_cli.families import detect_family
from ckpt_cli.plan import build_to_maxtext

# Appendix A, scanned shapes, keys dash-joined under params/params.
QWEN3 = {
    "decoder-decoder_norm-scale": {"qwen3-0.6b": (1024,), "qwen3-8b": (4096,)},
    "decoder-layers-mlp-wi_0-kernel": {"qwen3-0.6b": (1024, 28, 3072), "qwen3-8b": (4096, 36, 12288)},
    "decoder-layers-mlp-wi_1-kernel": {"qwen3-0.6b": (1024, 28, 3072), "qwen3-8b": (4096, 36, 12288)},
    "decoder-layers-mlp-wo-kernel": {"qwen3-0.6b": (3072, 28, 1024), "qwen3-8b": (12288, 36, 4096)},
    "decoder-layers-post_self_attention_layer_norm-scale": {"qwen3-0.6b": (1024, 28), "qwen3-8b": (4096, 36)},
    "decoder-layers-pre_self_attention_layer_norm-scale": {"qwen3-0.6b": (1024, 28), "qwen3-8b": (4096, 36)},
    "decoder-layers-self_attention-key-kernel": {"qwen3-0.6b": (1024, 28, 8, 128), "qwen3-8b": (4096, 36, 8, 128)},
    "decoder-layers-self_attention-key_norm-scale": {"qwen3-0.6b": (128, 28), "qwen3-8b": (128, 36)},
    "decoder-layers-self_attention-out-kernel": {"qwen3-0.6b": (16, 28, 128, 1024), "qwen3-8b": (32, 36, 128, 4096)},
    "decoder-layers-self_attention-query-kernel": {"qwen3-0.6b": (1024, 28, 16, 128),
                                                   "qwen3-8b": (4096, 36, 32, 128)},
    "decoder-layers-self_attention-query_norm-scale": {"qwen3-0.6b": (128, 28), "qwen3-8b": (128, 36)},
    "decoder-layers-self_attention-value-kernel": {"qwen3-0.6b": (1024, 28, 8, 128),
                                                   "qwen3-8b": (4096, 36, 8, 128)},
    "decoder-logits_dense-kernel": {"qwen3-8b": (4096, 151936)},
    "token_embedder-embedding": {"qwen3-0.6b": (151936, 1024), "qwen3-8b": (151936, 4096)},
}
LLAMA = {
    "decoder-decoder_norm-scale": (4096,),
    "decoder-layers-mlp-wi_0-kernel": (4096, 32, 14336),
    "decoder-layers-mlp-wi_1-kernel": (4096, 32, 14336),
    "decoder-layers-mlp-wo-kernel": (14336, 32, 4096),
    "decoder-layers-post_self_attention_layer_norm-scale": (4096, 32),
    "decoder-layers-pre_self_attention_layer_norm-scale": (4096, 32),
    "decoder-layers-self_attention-key-kernel": (4096, 32, 8, 128),
    "decoder-layers-self_attention-out-kernel": (32, 32, 128, 4096),
    "decoder-layers-self_attention-query-kernel": (4096, 32, 32, 128),
    "decoder-layers-self_attention-value-kernel": (4096, 32, 8, 128),
    "decoder-logits_dense-kernel": (4096, 128256),
    "token_embedder-embedding": (128256, 4096),
}

# Appendix A, Qwen3 MoE (§8.2): (E,L,X) router, experts (X,L,E,M) / (X,L,M,E); per size (E, N, K, X, M, L).
QWEN3_MOE_SIZES = {"qwen3-30b-a3b": (2048, 32, 4, 128, 768, 48), "qwen3-235b-a22b": (4096, 64, 4, 128, 1536, 94),
                   "qwen3-480b-a35b": (6144, 96, 8, 160, 2560, 62)}
QWEN3_MOE = {
    "decoder-decoder_norm-scale": {"qwen3-30b-a3b": (2048,), "qwen3-235b-a22b": (4096,), "qwen3-480b-a35b": (6144,)},
    "decoder-layers-moe_block-gate-kernel": {"qwen3-30b-a3b": (2048, 48, 128), "qwen3-235b-a22b": (4096, 94, 128),
                                             "qwen3-480b-a35b": (6144, 62, 160)},
    "decoder-layers-moe_block-wi_0": {"qwen3-30b-a3b": (128, 48, 2048, 768), "qwen3-235b-a22b": (128, 94, 4096, 1536),
                                      "qwen3-480b-a35b": (160, 62, 6144, 2560)},
    "decoder-layers-moe_block-wi_1": {"qwen3-30b-a3b": (128, 48, 2048, 768), "qwen3-235b-a22b": (128, 94, 4096, 1536),
                                      "qwen3-480b-a35b": (160, 62, 6144, 2560)},
    "decoder-layers-moe_block-wo": {"qwen3-30b-a3b": (128, 48, 768, 2048), "qwen3-235b-a22b": (128, 94, 1536, 4096),
                                    "qwen3-480b-a35b": (160, 62, 2560, 6144)},
    "decoder-layers-post_self_attention_layer_norm-scale": {"qwen3-30b-a3b": (2048, 48),
                                                            "qwen3-235b-a22b": (4096, 94),
                                                            "qwen3-480b-a35b": (6144, 62)},
    "decoder-layers-pre_self_attention_layer_norm-scale": {"qwen3-30b-a3b": (2048, 48), "qwen3-235b-a22b": (4096, 94),
                                                           "qwen3-480b-a35b": (6144, 62)},
    "decoder-layers-self_attention-key-kernel": {"qwen3-30b-a3b": (2048, 48, 4, 128),
                                                 "qwen3-235b-a22b": (4096, 94, 4, 128),
                                                 "qwen3-480b-a35b": (6144, 62, 8, 128)},
    "decoder-layers-self_attention-key_norm-scale": {"qwen3-30b-a3b": (128, 48), "qwen3-235b-a22b": (128, 94),
                                                     "qwen3-480b-a35b": (128, 62)},
    "decoder-layers-self_attention-out-kernel": {"qwen3-30b-a3b": (32, 48, 128, 2048),
                                                 "qwen3-235b-a22b": (64, 94, 128, 4096),
                                                 "qwen3-480b-a35b": (96, 62, 128, 6144)},
    "decoder-layers-self_attention-query-kernel": {"qwen3-30b-a3b": (2048, 48, 32, 128),
                                                   "qwen3-235b-a22b": (4096, 94, 64, 128),
                                                   "qwen3-480b-a35b": (6144, 62, 96, 128)},
    "decoder-layers-self_attention-query_norm-scale": {"qwen3-30b-a3b": (128, 48), "qwen3-235b-a22b": (128, 94),
                                                       "qwen3-480b-a35b": (128, 62)},
    "decoder-layers-self_attention-value-kernel": {"qwen3-30b-a3b": (2048, 48, 4, 128),
                                                   "qwen3-235b-a22b": (4096, 94, 4, 128),
                                                   "qwen3-480b-a35b": (6144, 62, 8, 128)},
    "decoder-logits_dense-kernel": {"qwen3-30b-a3b": (2048, 151936), "qwen3-235b-a22b": (4096, 151936),
                                    "qwen3-480b-a35b": (6144, 151936)},
    "token_embedder-embedding": {"qwen3-30b-a3b": (151936, 2048), "qwen3-235b-a22b": (151936, 4096),
                                 "qwen3-480b-a35b": (151936, 6144)},
}

# Appendix A, Mixtral (§11.2): MoeBlock_0 router (E,L,X), experts (X,L,E,M) / (X,L,M,E), untied head.
MIXTRAL = {
    "decoder-decoder_norm-scale": {"mixtral-8x7b": (4096,), "mixtral-8x22b": (6144,)},
    "decoder-layers-MoeBlock_0-gate-kernel": {"mixtral-8x7b": (4096, 32, 8), "mixtral-8x22b": (6144, 56, 8)},
    "decoder-layers-MoeBlock_0-wi_0": {"mixtral-8x7b": (8, 32, 4096, 14336), "mixtral-8x22b": (8, 56, 6144, 16384)},
    "decoder-layers-MoeBlock_0-wi_1": {"mixtral-8x7b": (8, 32, 4096, 14336), "mixtral-8x22b": (8, 56, 6144, 16384)},
    "decoder-layers-MoeBlock_0-wo": {"mixtral-8x7b": (8, 32, 14336, 4096), "mixtral-8x22b": (8, 56, 16384, 6144)},
    "decoder-layers-post_self_attention_layer_norm-scale": {"mixtral-8x7b": (4096, 32), "mixtral-8x22b": (6144, 56)},
    "decoder-layers-pre_self_attention_layer_norm-scale": {"mixtral-8x7b": (4096, 32), "mixtral-8x22b": (6144, 56)},
    "decoder-layers-self_attention-key-kernel": {"mixtral-8x7b": (4096, 32, 8, 128),
                                                 "mixtral-8x22b": (6144, 56, 8, 128)},
    "decoder-layers-self_attention-out-kernel": {"mixtral-8x7b": (32, 32, 128, 4096),
                                                 "mixtral-8x22b": (48, 56, 128, 6144)},
    "decoder-layers-self_attention-query-kernel": {"mixtral-8x7b": (4096, 32, 32, 128),
                                                   "mixtral-8x22b": (6144, 56, 48, 128)},
    "decoder-layers-self_attention-value-kernel": {"mixtral-8x7b": (4096, 32, 8, 128),
                                                   "mixtral-8x22b": (6144, 56, 8, 128)},
    "decoder-logits_dense-kernel": {"mixtral-8x7b": (4096, 32000), "mixtral-8x22b": (6144, 32768)},
    "token_embedder-embedding": {"mixtral-8x7b": (32000, 4096), "mixtral-8x22b": (32768, 6144)},
}

# Appendix A, Gemma3 scanned: {b} is each of layers_0..5, {r} each remainder layer; (4b, 12b, 27b), None: absent.
GEMMA3_SIZES = {"gemma3-4b": (34, 0), "gemma3-12b": (48, 1), "gemma3-27b": (62, 2)}   # (L, column)
GEMMA3 = {
    "decoder-decoder_norm-scale": ((2560,), (3840,), (5376,)),
    "decoder-layers-layers_{b}-mlp-wi_0-kernel": ((2560, 5, 10240), (3840, 8, 15360), (5376, 10, 21504)),
    "decoder-layers-layers_{b}-mlp-wi_1-kernel": ((2560, 5, 10240), (3840, 8, 15360), (5376, 10, 21504)),
    "decoder-layers-layers_{b}-mlp-wo-kernel": ((10240, 5, 2560), (15360, 8, 3840), (21504, 10, 5376)),
    "decoder-layers-layers_{b}-post_ffw_norm-scale": ((2560, 5), (3840, 8), (5376, 10)),
    "decoder-layers-layers_{b}-post_self_attention_norm-scale": ((2560, 5), (3840, 8), (5376, 10)),
    "decoder-layers-layers_{b}-pre_ffw_norm-scale": ((2560, 5), (3840, 8), (5376, 10)),
    "decoder-layers-layers_{b}-pre_self_attention_norm-scale": ((2560, 5), (3840, 8), (5376, 10)),
    "decoder-layers-layers_{b}-self_attention-key-kernel": ((2560, 5, 4, 256), (3840, 8, 8, 256), (5376, 10, 16, 128)),
    "decoder-layers-layers_{b}-self_attention-key_norm-scale": ((256, 5), (256, 8), (128, 10)),
    "decoder-layers-layers_{b}-self_attention-out-kernel": ((8, 5, 256, 2560), (16, 8, 256, 3840), (32, 10, 128, 5376)),
    "decoder-layers-layers_{b}-self_attention-query-kernel":
        ((2560, 5, 8, 256), (3840, 8, 16, 256), (5376, 10, 32, 128)),
    "decoder-layers-layers_{b}-self_attention-query_norm-scale": ((256, 5), (256, 8), (128, 10)),
    "decoder-layers-layers_{b}-self_attention-value-kernel":
        ((2560, 5, 4, 256), (3840, 8, 8, 256), (5376, 10, 16, 128)),
    "decoder-layers_remainder-layers_{r}-mlp-wi_0-kernel": ((2560, 10240), None, (5376, 21504)),
    "decoder-layers_remainder-layers_{r}-mlp-wi_1-kernel": ((2560, 10240), None, (5376, 21504)),
    "decoder-layers_remainder-layers_{r}-mlp-wo-kernel": ((10240, 2560), None, (21504, 5376)),
    "decoder-layers_remainder-layers_{r}-post_ffw_norm-scale": ((2560,), None, (5376,)),
    "decoder-layers_remainder-layers_{r}-post_self_attention_norm-scale": ((2560,), None, (5376,)),
    "decoder-layers_remainder-layers_{r}-pre_ffw_norm-scale": ((2560,), None, (5376,)),
    "decoder-layers_remainder-layers_{r}-pre_self_attention_norm-scale": ((2560,), None, (5376,)),
    "decoder-layers_remainder-layers_{r}-self_attention-key-kernel": ((2560, 4, 256), None, (5376, 16, 128)),
    "decoder-layers_remainder-layers_{r}-self_attention-key_norm-scale": ((256,), None, (128,)),
    "decoder-layers_remainder-layers_{r}-self_attention-out-kernel": ((8, 256, 2560), None, (32, 128, 5376)),
    "decoder-layers_remainder-layers_{r}-self_attention-query-kernel": ((2560, 8, 256), None, (5376, 32, 128)),
    "decoder-layers_remainder-layers_{r}-self_attention-query_norm-scale": ((256,), None, (128,)),
    "decoder-layers_remainder-layers_{r}-self_attention-value-kernel": ((2560, 4, 256), None, (5376, 16, 128)),
    "token_embedder-embedding": ((262144, 2560), (262144, 3840), (262144, 5376)),
}



def gemma3_golden(model: str, scan: bool) -> dict[str, tuple[int, ...]]:
    """Appendix A's Gemma3 rows expanded: {b} over layers_0..5 (scan length L // 6), {r} over the L mod 6 remainder
    layers; unscanned, §9.2's decoder/layers_<i> with the per-layer shapes (scanned without axis 1)."""
    layers, col = GEMMA3_SIZES[model]
    out = {}
    for key, shapes in GEMMA3.items():
        shape = shapes[col]
        if shape is None:
            assert layers % 6 == 0 and "{r}" in key
            continue
        if "{b}" in key:
            if scan:
                assert shape[1] == layers // 6
                out.update({key.format(b=b): shape for b in range(6)})
            else:
                per_layer = shape[:1] + shape[2:]
                leaf = key.replace("decoder-layers-layers_{b}-", "")
                out.update({f"decoder-layers_{i}-{leaf}": per_layer for i in range(layers)})
        elif "{r}" in key:
            if scan:
                out.update({key.format(r=r): shape for r in range(layers % 6)})
        else:
            out[key] = shape
    return out


def golden(model: str) -> dict[str, tuple[int, ...]]:
    if model.startswith("llama"):
        return dict(LLAMA)
    table = QWEN3_MOE if model in QWEN3_MOE_SIZES else MIXTRAL if model.startswith("mixtral") else QWEN3
    return {k: v[model] for k, v in table.items() if model in v}


def unscanned(scanned: dict[str, tuple[int, ...]], layers: int) -> dict[str, tuple[int, ...]]:
    """The spec's rule: unscanned = scanned with axis 1 removed, under layers_<i>."""
    out = {}
    for key, shape in scanned.items():
        if key.startswith("decoder-layers-"):
            for i in range(layers):
                out[key.replace("decoder-layers-", f"decoder-layers_{i}-")] = shape[:1] + shape[2:]
        else:
            out[key] = shape
    return out


def plan_shapes(model: str, scan: bool) -> dict[str, tuple[int, ...]]:
    cfg = registry.reference_config(model)
    plan = build_to_maxtext(detect_family(cfg), cfg, scan, output_dtype("bf16"))
    return {t.target.replace("/", "-"): t.shape for t in plan.tensors}


@pytest.mark.parametrize("model,layers", [("qwen3-0.6b", 28), ("qwen3-8b", 36), ("llama3.1-8b", 32),
                                          ("qwen3-30b-a3b", 48), ("qwen3-235b-a22b", 94), ("qwen3-480b-a35b", 62),
                                          ("mixtral-8x7b", 32), ("mixtral-8x22b", 56)])
def test_plan_equals_appendix_a(model, layers):
    assert plan_shapes(model, True) == golden(model)
    assert plan_shapes(model, False) == unscanned(golden(model), layers)


@pytest.mark.parametrize("model,repo,sizes,tied,params", [
    ("qwen3-1.7b-base", "Qwen/Qwen3-1.7B-Base", (2048, 16, 6144, 28), True, 1_720_574_976),
    ("qwen3-4b-base", "Qwen/Qwen3-4B-Base", (2560, 32, 9728, 36), True, 4_022_468_096),
    ("qwen3-8b-base", "Qwen/Qwen3-8B-Base", (4096, 32, 12288, 36), False, 8_190_735_360),
    ("qwen3-14b-base", "Qwen/Qwen3-14B-Base", (5120, 40, 17408, 40), False, 14_768_307_200),
])
def test_qwen3_base_plans(model, repo, sizes, tied, params):
    """The Qwen3 -Base names (MaxText 0.2.5's configs/models/qwen3-*-base.yml): E, N, F, L with 8 kv heads of 128,
    tied up to 4B; their repos' 32K context. Parameter counts from the dimensions, scanned and unscanned."""
    spec = registry.lookup(model)
    assert spec.repo_id == repo and spec.family == "qwen3" and spec.config["max_position_embeddings"] == 32768
    e, n, f, layers = sizes
    v, k, d = 151936, 8, 128
    per_layer = e * n * d * 2 + e * k * d * 2 + 3 * e * f + 2 * e + 2 * d
    assert params == v * e * (1 if tied else 2) + e + layers * per_layer
    for scan in (True, False):
        shapes = plan_shapes(model, scan)
        assert sum(math.prod(s) for s in shapes.values()) == params
        assert ("decoder-logits_dense-kernel" in shapes) is not tied
    query = plan_shapes(model, True)["decoder-layers-self_attention-query-kernel"]
    assert query == (e, layers, n, d)


@pytest.mark.parametrize("model", list(GEMMA3_SIZES))
def test_gemma3_plan_equals_appendix_a(model):
    """gemma3-4b: 5 x 6 + 4 remainder; -12b: 8 x 6, no remainder; -27b: 10 x 6 + 2; no logits_dense (tied)."""
    for scan in (True, False):
        assert plan_shapes(model, scan) == gemma3_golden(model, scan)
    assert not any("logits_dense" in key for key in plan_shapes(model, True))


def test_gemma3_plan_stores_norms_f32_and_counts_4b_parameters():
    """§3.4: the (1 + w) norm scales are float32 even in a bf16 checkpoint; everything else bf16. Gemma 3 4B's
    language model (§9.1: E 2560, N 8, K 4, D 256, F 10240, L 34, V 262144) has about 3.88e9 parameters."""
    cfg = registry.reference_config("gemma3-4b")
    plan = build_to_maxtext(detect_family(cfg), cfg, True, output_dtype("bf16"))
    for t in plan.tensors:
        assert t.dtype.name == ("float32" if t.target.endswith("norm/scale") else "bfloat16"), t.target
    e, n, k, d, f, layers, v = 2560, 8, 4, 256, 10240, 34, 262144
    per_layer = e * n * d * 2 + e * k * d * 2 + 3 * e * f + 4 * e + 2 * d
    assert sum(math.prod(t.shape) for t in plan.tensors) == v * e + e + layers * per_layer == 3_880_099_328


def test_plan_reads_no_data_and_sizes_are_right():
    cfg = registry.reference_config("qwen3-0.6b")
    plan = build_to_maxtext(detect_family(cfg), cfg, True, output_dtype("bf16"))
    params = sum(int(__import__("math").prod(t.shape)) for t in plan.tensors)
    assert params == 596_049_920  # Qwen3-0.6B parameter count, tied head
    assert plan.output_bytes == 2 * params


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "qwen3-30b-a3b-base"])
def test_qwen3_moe_plan_is_section_8_2(model):
    """§8.2 for the 30B-A3B sizes: every layer MoE, no dense MLP, experts on axis 0; 30.5B parameters."""
    E, N, K, X, M, L = QWEN3_MOE_SIZES["qwen3-30b-a3b"]
    scanned, flat = plan_shapes(model, True), plan_shapes(model, False)
    assert scanned == golden("qwen3-30b-a3b")
    assert not any("-mlp-" in key for key in scanned)
    for i in (0, L - 1):
        assert flat[f"decoder-layers_{i}-moe_block-gate-kernel"] == (E, X)
        assert flat[f"decoder-layers_{i}-moe_block-wi_0"] == flat[f"decoder-layers_{i}-moe_block-wi_1"] == (X, E, M)
        assert flat[f"decoder-layers_{i}-moe_block-wo"] == (X, M, E)
    assert sum(math.prod(s) for s in scanned.values()) == 30_532_122_624   # Qwen3-30B-A3B: "30.5B in total"


def test_mixtral_plan_is_section_11_2():
    """§11.2 for 8x7B: every layer MoeBlock_0 with 8 experts, only the query kernel scaled; 46.7B parameters."""
    cfg = registry.reference_config("mixtral-8x7b")
    plan = build_to_maxtext(detect_family(cfg), cfg, False, output_dtype("bf16"))
    steps = {t.target: t.chain.describe() for t in plan.tensors}
    assert steps["decoder/layers_31/self_attention/query/kernel"] == "transpose > scale(1/sqrt(128))"
    assert steps["decoder/layers_31/self_attention/key/kernel"] == "transpose"          # rotate-half: no permutation
    assert steps["decoder/layers_0/MoeBlock_0/wi_0"] == "transpose"
    wi_0 = plan.tensor("decoder/layers_0/MoeBlock_0/wi_0")
    assert [task.source.name for task in wi_0.tasks][:1] == ["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    assert {task.source.name for task in wi_0.tasks} == {
        f"model.layers.0.block_sparse_moe.experts.{x}.w1.weight" for x in range(8)}
    assert sum(math.prod(s) for s in plan_shapes("mixtral-8x7b", True).values()) == 46_702_792_704   # "46.7B"


# Appendix A, GPT-OSS (§10.2), copied from the spec's table: `layers_{b}` stands for both block members b = 0, 1.
GPT_OSS = {
    "decoder-decoder_norm-scale": ((2880,), (2880,)),
    "decoder-layers-layers_{b}-GptOssAttention-key-bias": ((8, 12, 64), (8, 18, 64)),
    "decoder-layers-layers_{b}-GptOssAttention-key-kernel": ((2880, 12, 8, 64), (2880, 18, 8, 64)),
    "decoder-layers-layers_{b}-GptOssAttention-out-bias": ((2880, 12), (2880, 18)),
    "decoder-layers-layers_{b}-GptOssAttention-out-kernel": ((64, 12, 64, 2880), (64, 18, 64, 2880)),
    "decoder-layers-layers_{b}-GptOssAttention-query-bias": ((64, 12, 64), (64, 18, 64)),
    "decoder-layers-layers_{b}-GptOssAttention-query-kernel": ((2880, 12, 64, 64), (2880, 18, 64, 64)),
    "decoder-layers-layers_{b}-GptOssAttention-sinks": ((64, 12), (64, 18)),
    "decoder-layers-layers_{b}-GptOssAttention-value-bias": ((8, 12, 64), (8, 18, 64)),
    "decoder-layers-layers_{b}-GptOssAttention-value-kernel": ((2880, 12, 8, 64), (2880, 18, 8, 64)),
    "decoder-layers-layers_{b}-GptOssMlp-gate-bias": ((32, 12), (128, 18)),
    "decoder-layers-layers_{b}-GptOssMlp-gate-kernel": ((2880, 12, 32), (2880, 18, 128)),
    "decoder-layers-layers_{b}-GptOssMlp-wi_0": ((32, 12, 2880, 2880), (128, 18, 2880, 2880)),
    "decoder-layers-layers_{b}-GptOssMlp-wi_0_bias": ((32, 12, 2880), (128, 18, 2880)),
    "decoder-layers-layers_{b}-GptOssMlp-wi_1": ((32, 12, 2880, 2880), (128, 18, 2880, 2880)),
    "decoder-layers-layers_{b}-GptOssMlp-wi_1_bias": ((32, 12, 2880), (128, 18, 2880)),
    "decoder-layers-layers_{b}-GptOssMlp-wo": ((32, 12, 2880, 2880), (128, 18, 2880, 2880)),
    "decoder-layers-layers_{b}-GptOssMlp-wo_bias": ((32, 12, 2880), (128, 18, 2880)),
    "decoder-layers-layers_{b}-post_self_attention_layer_norm-scale": ((2880, 12), (2880, 18)),
    "decoder-layers-layers_{b}-pre_self_attention_layer_norm-scale": ((2880, 12), (2880, 18)),
    "decoder-logits_dense-kernel": ((2880, 201088), (2880, 201088)),
    "token_embedder-embedding": ((201088, 2880), (201088, 2880)),
}


@pytest.mark.parametrize("model,column,layers", [("gpt-oss-20b", 0, 24), ("gpt-oss-120b", 1, 36)])
def test_gpt_oss_plan_equals_appendix_a(model, column, layers):
    """Scanned: two blocks `decoder/layers/layers_{0,1}` of scan length L/2. Unscanned (§1.3: plain
    `decoder/layers_<i>`): the per-layer shapes, i.e. the scanned ones without axis 1, for every layer."""
    scanned = {}
    for key, shapes in GPT_OSS.items():
        for b in (0, 1):
            scanned[key.format(b=b)] = shapes[column]
    assert plan_shapes(model, True) == scanned
    per_layer = {k.replace("decoder-layers-layers_0-", ""): s[:1] + s[2:] for k, s in scanned.items()
                 if k.startswith("decoder-layers-layers_0-")}
    flat = {k: s for k, s in scanned.items() if not k.startswith("decoder-layers-")}
    flat |= {f"decoder-layers_{i}-{leaf}": shape for i in range(layers) for leaf, shape in per_layer.items()}
    assert plan_shapes(model, False) == flat


@pytest.mark.parametrize("model,params", [("gpt-oss-20b", 20_914_757_184), ("gpt-oss-120b", 116_829_156_672)])
def test_gpt_oss_parameter_counts(model, params):
    """The whole plan's element count is the models' published total (20.9B and 116.8B parameters)."""
    cfg = registry.reference_config(model)
    plan = build_to_maxtext(detect_family(cfg), cfg, True, output_dtype("bf16"))
    assert sum(math.prod(t.shape) for t in plan.tensors) == params
