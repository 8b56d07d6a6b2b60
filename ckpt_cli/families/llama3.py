"""Llama 3.1 (MaxText decoder_block llama2 with the llama3.1 RoPE): maxtext-layout.md §6.

q and k kernels go from HF rotate-half order to MaxText's interleaved pairs; the query kernel also
gets the 1/sqrt(D) factor MaxText expects folded in. Always untied.
"""

from __future__ import annotations

from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families.base import Block, Dims, Family, row, uniform_blocks
from ckpt_cli.families.qwen3 import dims as qwen3_dims

P = "model.layers.{layer}."

LAYER = (
    row("pre_self_attention_layer_norm/scale", P + "input_layernorm.weight", "E", "E"),
    row("post_self_attention_layer_norm/scale", P + "post_attention_layernorm.weight", "E", "E"),
    row("self_attention/query/kernel", P + "self_attn.q_proj.weight", "E,N,D", "N*D,E",
        "transpose,rope-interleave,query-scale"),
    row("self_attention/key/kernel", P + "self_attn.k_proj.weight", "E,K,D", "K*D,E", "transpose,rope-interleave"),
    row("self_attention/value/kernel", P + "self_attn.v_proj.weight", "E,K,D", "K*D,E", "transpose"),
    row("self_attention/out/kernel", P + "self_attn.o_proj.weight", "N,D,E", "E,N*D", "transpose"),
    row("mlp/wi_0/kernel", P + "mlp.gate_proj.weight", "E,F", "F,E", "transpose"),
    row("mlp/wi_1/kernel", P + "mlp.up_proj.weight", "E,F", "F,E", "transpose"),
    row("mlp/wo/kernel", P + "mlp.down_proj.weight", "F,E", "E,F", "transpose"),
)

TOP = (
    row("token_embedder/embedding", "model.embed_tokens.weight", "V,E", "V,E"),
    row("decoder/decoder_norm/scale", "model.norm.weight", "E", "E"),
    row("decoder/logits_dense/kernel", "lm_head.weight", "E,V", "V,E", "transpose"),
)


def top_rules(d: Dims, cfg: dict) -> tuple:
    return TOP


def blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    return uniform_blocks(LAYER, d["L"], scan)


def rope_scaling(cfg: dict) -> dict | None:
    """The rope scaling dict, from `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    for key in ("rope_scaling", "rope_parameters"):
        value = cfg.get(key)
        if isinstance(value, dict) and value.get("rope_type", value.get("type")) not in (None, "default"):
            return value
    return None


def check_config(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UnsupportedError("config.json sets attention_bias/mlp_bias: MaxText's llama3.1 has no biases")
    if cfg.get("tie_word_embeddings"):
        raise UnsupportedError("config.json ties embeddings: MaxText's llama3.1 always has an untied logits_dense")
    scaling = rope_scaling(cfg)
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if d := head_dim_odd(cfg):
        raise UnsupportedError(f"head_dim {d} is odd: the RoPE pair permutation needs an even head dim")
    if kind not in (None, "llama3"):
        raise UnsupportedError(f"config.json rope scaling {kind!r}: MaxText's llama3.1 RoPE is llama3-style only")
    if kind is None:
        return ["config.json has no llama3 rope scaling; MaxText's llama3.1 RoPE applies it (long contexts differ)"]
    return []


def head_dim_odd(cfg: dict) -> int | None:
    d = qwen3_dims(cfg)["D"]
    return d if d % 2 else None


FAMILY = Family(
    name="llama3.1", model_types=("llama",), dims=qwen3_dims, top_rules=top_rules, blocks=blocks,
    check_config=check_config,
    reference_keys=("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "intermediate_size", "num_hidden_layers", "vocab_size"),
    extra={"tied": lambda cfg: False, "layer_rules": LAYER, "top_table": TOP},
)
