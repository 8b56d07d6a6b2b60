"""The plan for real configs (no data) equals maxtext-layout.md Appendix A (and §8.2), scanned and unscanned."""

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


def golden(model: str) -> dict[str, tuple[int, ...]]:
    if model.startswith("llama"):
        return dict(LLAMA)
    table = QWEN3_MOE if model in QWEN3_MOE_SIZES else QWEN3
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
                                          ("qwen3-30b-a3b", 48), ("qwen3-235b-a22b", 94), ("qwen3-480b-a35b", 62)])
def test_plan_equals_appendix_a(model, layers):
    assert plan_shapes(model, True) == golden(model)
    assert plan_shapes(model, False) == unscanned(golden(model), layers)


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
