"""Shared fixtures: tiny random HF models made with transformers at test time (fixed seeds, no weights in git)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
            num_hidden_layers=2, vocab_size=128, max_position_embeddings=256)
LLAMA_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}

# OLMo 3's YaRN (original context 4096 so the ramp spans dims 2..6 of 8 at head_dim 16), on both layer types:
# what MaxText 0.2.5 computes, and what transformers 5 computes when the config says so for each type
OLMO3_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 4096,
              "beta_fast": 32.0, "beta_slow": 1.0}
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}


def make_hf_model(kind: str, dtype: str = "float32", seed: int = 0):
    """A tiny transformers model with every parameter distinct (norms included).

    kind: qwen3, qwen3-tied, llama, llama-d24 (head_dim 24: 1/sqrt(D) is not a power of two), qwen3-moe
    (every layer MoE: 4 experts of width 32, top-2, renormalised top-k weights), mixtral (4 experts of width
    32, top-2; transformers 5 holds them fused in memory and save_pretrained writes the released per-expert
    `block_sparse_moe.experts.{e}.w1/w2/w3` names), gemma3 (14 layers: scanned, two
    blocks of six plus a remainder of two; sliding window 4, query_pre_attn_scalar 24 != head_dim, global RoPE
    linearly scaled), gemma3-e48 (hidden 48: bf16(sqrt(48)) = 6.9375 is not a power of two),
    gpt-oss (4 layers, so two scanned blocks of scan length 2; 4 experts of width 32 != hidden 64, top-2;
    sliding window 4), olmo3 (8 layers: two scanned cycles of 3 sliding + 1 global, sliding window 4, YaRN on
    every layer), olmo3-plain (the same with plain RoPE, as olmo3-7b-pt), qwen3-next (8 layers: two scanned
    cycles of 3 gated DeltaNet + 1 full attention; 2 key heads of 8 and 4 value heads of 12 in the DeltaNet, 4
    experts of width 32 plus a shared expert of width 24, top-2; partial RoPE over a quarter of the head),
    gemma (3 layers, hidden 48, head_dim 24, one kv head), gemma2 (3 local/global pairs,
    sliding window 4, query_pre_attn_scalar 24, soft caps 1 and 2).
    """
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "gpt-oss":
        dims = TINY | {"num_hidden_layers": 4, "intermediate_size": 32, "max_position_embeddings": 131072}
        cfg = tf.GptOssConfig(**dims, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                              tie_word_embeddings=False, rms_norm_eps=1e-5)
        model = tf.GptOssForCausalLM(cfg)
    elif kind == "qwen3-moe":
        cfg = tf.Qwen3MoeConfig(**TINY, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                norm_topk_prob=True, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6)
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif kind == "qwen3-next":
        dims = TINY | {"num_hidden_layers": 8}
        cfg = tf.Qwen3NextConfig(**dims, moe_intermediate_size=32, shared_expert_intermediate_size=24, num_experts=4,
                                 num_experts_per_tok=2, norm_topk_prob=True, linear_num_key_heads=2,
                                 linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
                                 linear_conv_kernel_dim=4, full_attention_interval=4, tie_word_embeddings=False,
                                 rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                     "partial_rotary_factor": 0.25})
        model = tf.Qwen3NextForCausalLM(cfg)
    elif kind == "mixtral":
        dims = TINY | {"intermediate_size": 32}
        cfg = tf.MixtralConfig(**dims, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                               rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=None)
        model = tf.MixtralForCausalLM(cfg)
    elif kind.startswith("qwen3"):
        cfg = tf.Qwen3Config(**TINY, tie_word_embeddings=kind == "qwen3-tied", rope_theta=10000.0, rms_norm_eps=1e-6)
        model = tf.Qwen3ForCausalLM(cfg)
    elif kind in ("gemma3", "gemma3-e48"):
        dims = TINY | {"num_hidden_layers": 14} | ({"hidden_size": 48} if kind == "gemma3-e48" else {})
        cfg = tf.Gemma3TextConfig(**dims, sliding_window=4, query_pre_attn_scalar=24, rms_norm_eps=1e-6,
                                  hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                                  rope_parameters=dict(GEMMA3_ROPE), attn_implementation="eager")
        model = tf.Gemma3ForCausalLM(cfg)
    elif kind in ("olmo3", "olmo3-plain"):
        dims = TINY | {"num_hidden_layers": 8, "max_position_embeddings": 32768}
        rope = dict(OLMO3_YARN) if kind == "olmo3" else {"rope_type": "default", "rope_theta": 10000.0}
        cfg = tf.Olmo3Config(**dims, sliding_window=4, rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=2,
                             rope_parameters={"full_attention": dict(rope), "sliding_attention": dict(rope)},
                             attn_implementation="eager")
        model = tf.Olmo3ForCausalLM(cfg)
    elif kind == "gemma":
        # hidden 48, head_dim 24: sqrt(E) and 1/sqrt(D) are not powers of two; MQA as gemma-2b
        dims = TINY | {"num_hidden_layers": 3, "hidden_size": 48, "head_dim": 24, "num_key_value_heads": 1}
        cfg = tf.GemmaConfig(**dims, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True)
        model = tf.GemmaForCausalLM(cfg)
    elif kind == "gemma2":
        # 6 layers = 3 local/global pairs; sliding window 4; query_pre_attn_scalar 24 != head_dim 16; soft caps
        # small enough to bite on tiny random weights
        dims = TINY | {"num_hidden_layers": 6}
        cfg = tf.Gemma2Config(**dims, sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=1.0,
                              final_logit_softcapping=2.0, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                              tie_word_embeddings=True, attn_implementation="eager")
        model = tf.Gemma2ForCausalLM(cfg)
    elif kind in ("llama", "llama-d24"):
        dims = TINY | {"head_dim": 24} if kind == "llama-d24" else TINY
        cfg = tf.LlamaConfig(**dims, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5,
                             rope_scaling=dict(LLAMA_ROPE))
        model = tf.LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype)).eval()
    return model


def save_model(model, folder: Path, sharded: bool) -> Path:
    model.save_pretrained(folder, max_shard_size="40KB" if sharded else "10GB")
    return folder


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """Factory: (kind, dtype, sharded) -> folder of a saved tiny model, built once per session."""
    cache: dict[tuple, Path] = {}

    def get(kind: str, dtype: str = "float32", sharded: bool = False) -> Path:
        key = (kind, dtype, sharded)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"hf-{kind}-{dtype}-{'sharded' if sharded else 'single'}")
            save_model(make_hf_model(kind, dtype), folder, sharded)
            if sharded:
                assert (folder / "model.safetensors.index.json").exists()
            cache[key] = folder
        return cache[key]

    return get


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())
