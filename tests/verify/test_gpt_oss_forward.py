"""The GPT-OSS MaxText-math forward (ckpt_cli/verify/gpt_oss.py) against transformers, and the mistakes it sees.

The MaxText tree is built here from the HF model's own parameters with explicit index math from
maxtext-layout.md §10.3 (independently of the converter): q/k/v/o as every family, biases reshaped to
(heads, D), sinks and router bias copied, router (X, E) -> (E, X), wi_0 = gate_up[..., 0::2] and
wi_1 = gate_up[..., 1::2] (no transpose), wo = down_proj.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import GptOssConfig as HFGptOssConfig
from transformers import GptOssForCausalLM

from ckpt_cli.verify.gpt_oss import GptOssConfig, gpt_oss_logits
from tests.verify.test_forward import DictSource, _heads_in, _heads_out, hf_logits, max_kl, tokens_for

WINDOW = 4
SIZES = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=32, vocab_size=128, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
             max_position_embeddings=131072)


def make_model(expert_scale: float = 1.0, seed: int = 0, spread: float = 0.3) -> torch.nn.Module:
    """Tiny GPT-OSS, eager attention, float32; every weight random (biases, sinks and router bias included).

    `expert_scale` multiplies the expert weights so that the SwiGLU clamps (limit 7) are reached."""
    torch.manual_seed(seed)
    model = GptOssForCausalLM(HFGptOssConfig(**SIZES, attn_implementation="eager"))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                p.copy_(1.0 + spread * torch.randn(p.shape, generator=g))
            elif "experts" in name:
                p.copy_(spread * expert_scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(spread * torch.randn(p.shape, generator=g))
    return model.float().eval()


def to_maxtext(model: torch.nn.Module, swap_gate_up: bool = False, zero_sinks: bool = False) -> DictSource:
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    c = model.config
    n, kv, d, m = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    top = {"token_embedder/embedding": sd["model.embed_tokens.weight"],
           "decoder/decoder_norm/scale": sd["model.norm.weight"],
           "decoder/logits_dense/kernel": sd["lm_head.weight"].T.copy()}
    layers = []
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        gate_up, gate_up_bias = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.gate_up_proj_bias"]
        assert gate_up.shape == (c.num_local_experts, c.hidden_size, 2 * m)
        gate = np.stack([gate_up[:, :, 2 * j] for j in range(m)], axis=-1)       # even columns
        up = np.stack([gate_up[:, :, 2 * j + 1] for j in range(m)], axis=-1)     # odd columns
        gate_b = np.stack([gate_up_bias[:, 2 * j] for j in range(m)], axis=-1)
        up_b = np.stack([gate_up_bias[:, 2 * j + 1] for j in range(m)], axis=-1)
        if swap_gate_up:
            gate, up, gate_b, up_b = up, gate, up_b, gate_b
        sinks = sd[p + "self_attn.sinks"]
        layers.append({
            "pre_self_attention_layer_norm/scale": sd[p + "input_layernorm.weight"],
            "post_self_attention_layer_norm/scale": sd[p + "post_attention_layernorm.weight"],
            "GptOssAttention/query/kernel": _heads_in(sd[p + "self_attn.q_proj.weight"], n, d),
            "GptOssAttention/query/bias": sd[p + "self_attn.q_proj.bias"].reshape(n, d),
            "GptOssAttention/key/kernel": _heads_in(sd[p + "self_attn.k_proj.weight"], kv, d),
            "GptOssAttention/key/bias": sd[p + "self_attn.k_proj.bias"].reshape(kv, d),
            "GptOssAttention/value/kernel": _heads_in(sd[p + "self_attn.v_proj.weight"], kv, d),
            "GptOssAttention/value/bias": sd[p + "self_attn.v_proj.bias"].reshape(kv, d),
            "GptOssAttention/out/kernel": _heads_out(sd[p + "self_attn.o_proj.weight"], n, d),
            "GptOssAttention/out/bias": sd[p + "self_attn.o_proj.bias"],
            "GptOssAttention/sinks": np.zeros_like(sinks) if zero_sinks else sinks,
            "GptOssMlp/gate/kernel": sd[p + "mlp.router.weight"].T.copy(),
            "GptOssMlp/gate/bias": sd[p + "mlp.router.bias"],
            "GptOssMlp/wi_0": gate, "GptOssMlp/wi_1": up, "GptOssMlp/wi_0_bias": gate_b, "GptOssMlp/wi_1_bias": up_b,
            "GptOssMlp/wo": sd[p + "mlp.experts.down_proj"],
            "GptOssMlp/wo_bias": sd[p + "mlp.experts.down_proj_bias"],
        })
    return DictSource(top, layers)


def forward_cfg(model: torch.nn.Module) -> GptOssConfig:
    return GptOssConfig.from_hf_config(model.config.to_dict())


@pytest.mark.parametrize("expert_scale", [1.0, 8.0], ids=["plain", "clamped"])
def test_matches_transformers(expert_scale):
    """float32, prompts of 40 tokens (10x the sliding window): max KL < 1e-6, logits within 1e-3."""
    model = make_model(expert_scale)
    cfg = forward_cfg(model)
    assert cfg.sliding == (True, False, True, False) and cfg.sliding_window == WINDOW
    tokens = tokens_for(cfg.vocab)
    assert tokens.shape[1] > 4 * WINDOW
    src = to_maxtext(model)
    ref, got = hf_logits(model, tokens), gpt_oss_logits(src, cfg, tokens)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(ref).max() > 1.0
    assert max_kl(ref, got) < 1e-6
    assert np.abs(got - ref).max() < 1e-3
    assert src.fetched == [0, 1, 2, 3]
    if expert_scale > 1:    # the clamp at swiglu_limit is in play: without it the logits move
        unclamped = dataclasses.replace(cfg, swiglu_limit=1e9)
        assert max_kl(ref, gpt_oss_logits(to_maxtext(model), unclamped, tokens)) > 1e-4


@pytest.mark.parametrize("mistake", ["swap-gate-up", "no-sliding-window", "zero-sinks", "no-yarn-scale", "alpha"])
def test_mistakes_are_caught(mistake):
    model = make_model()
    cfg, tokens = forward_cfg(model), tokens_for(SIZES["vocab_size"])
    ref = hf_logits(model, tokens)
    src = to_maxtext(model, swap_gate_up=mistake == "swap-gate-up", zero_sinks=mistake == "zero-sinks")
    if mistake == "no-sliding-window":
        cfg = dataclasses.replace(cfg, sliding=(False,) * 4)
    elif mistake == "no-yarn-scale":
        cfg = dataclasses.replace(cfg, attention_factor=1.0)
    elif mistake == "alpha":
        cfg = dataclasses.replace(cfg, swiglu_alpha=1.0)
    assert max_kl(ref, gpt_oss_logits(src, cfg, tokens)) > 1e-4


def test_bfloat16_close_to_float32():
    """bf16 activations and weights on a model with weights of spread 0.05 (as the conversion fixtures)."""
    model = make_model(spread=0.05)
    cfg, tokens = forward_cfg(model), tokens_for(SIZES["vocab_size"])
    f32 = gpt_oss_logits(to_maxtext(model), cfg, tokens)
    bf16 = gpt_oss_logits(to_maxtext(model), cfg, tokens, dtype="bfloat16")
    assert 0 < max_kl(f32, bf16) < 0.05


def test_config_legacy_and_v5_and_refusals():
    v5 = HFGptOssConfig(**SIZES).to_dict()
    cfg = GptOssConfig.from_hf_config(v5)
    assert (cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max, cfg.rope_truncate) == (150000.0, 32.0, 4096, False)
    assert (cfg.num_experts, cfg.experts_per_tok, cfg.moe_dim, cfg.swiglu_limit) == (4, 2, 32, 7.0)
    legacy = {k: v for k, v in v5.items() if k != "rope_parameters"} | {
        "rope_theta": 150000.0, "rope_scaling": {k: v for k, v in v5["rope_parameters"].items() if k != "rope_theta"}}
    assert GptOssConfig.from_hf_config(legacy) == cfg
    with pytest.raises(ValueError, match="yarn"):
        GptOssConfig.from_hf_config(v5 | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        GptOssConfig.from_hf_config(v5 | {"num_experts_per_tok": 5})
    with pytest.raises(ValueError, match="layer_types"):
        GptOssConfig.from_hf_config(v5 | {"layer_types": ["sliding_attention"] * 3})
