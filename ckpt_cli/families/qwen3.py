"""Qwen3 dense (MaxText decoder_block qwen3, maxtext-layout.md §5) and Qwen2.5 (decoder_block qwen2).

No query scaling (applied at run time), no RoPE permutation (rotate-half on both sides), tied embeddings for
the small sizes (no logits_dense then). Qwen3 has per-head q/k RMSNorm; Qwen2.5 has none, but q/k/v biases
instead: HF (N*D,) / (K*D,) reshaped head-major to MaxText's (N, D) / (K, D) (the out projection has none).
"""

from __future__ import annotations

from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families import llama3
from ckpt_cli.families.base import Block, Dims, Family, attention_dims, config_int, head_dim, row, uniform_blocks

P = "model.layers.{layer}."

LAYER = (
    row("pre_self_attention_layer_norm/scale", P + "input_layernorm.weight", "E", "E"),
    row("post_self_attention_layer_norm/scale", P + "post_attention_layernorm.weight", "E", "E"),
    row("self_attention/query/kernel", P + "self_attn.q_proj.weight", "E,N,D", "N*D,E", "transpose"),
    row("self_attention/key/kernel", P + "self_attn.k_proj.weight", "E,K,D", "K*D,E", "transpose"),
    row("self_attention/value/kernel", P + "self_attn.v_proj.weight", "E,K,D", "K*D,E", "transpose"),
    row("self_attention/out/kernel", P + "self_attn.o_proj.weight", "N,D,E", "E,N*D", "transpose"),
    row("self_attention/query_norm/scale", P + "self_attn.q_norm.weight", "D", "D"),
    row("self_attention/key_norm/scale", P + "self_attn.k_norm.weight", "D", "D"),
    row("mlp/wi_0/kernel", P + "mlp.gate_proj.weight", "E,F", "F,E", "transpose"),
    row("mlp/wi_1/kernel", P + "mlp.up_proj.weight", "E,F", "F,E", "transpose"),
    row("mlp/wo/kernel", P + "mlp.down_proj.weight", "F,E", "E,F", "transpose"),
)

TOP = (
    row("token_embedder/embedding", "model.embed_tokens.weight", "V,E", "V,E"),
    row("decoder/decoder_norm/scale", "model.norm.weight", "E", "E"),
)
HEAD = row("decoder/logits_dense/kernel", "lm_head.weight", "E,V", "V,E", "transpose")


# Qwen2.5: Qwen3's rows without the q/k norms, with the q/k/v biases.
QWEN2_LAYER = (
    *(r for r in LAYER if r.maxtext not in ("self_attention/query_norm/scale", "self_attention/key_norm/scale")),
    row("self_attention/query/bias", P + "self_attn.q_proj.bias", "N,D", "N*D", "reshape"),
    row("self_attention/key/bias", P + "self_attn.k_proj.bias", "K,D", "K*D", "reshape"),
    row("self_attention/value/bias", P + "self_attn.v_proj.bias", "K,D", "K*D", "reshape"),
)


def dims(cfg: dict) -> Dims:
    return attention_dims(cfg) | {"F": config_int(cfg, "intermediate_size")}


def tied(cfg: dict) -> bool:
    return bool(cfg.get("tie_word_embeddings", False))


def top_rules(d: Dims, cfg: dict) -> tuple:
    return TOP if tied(cfg) else (*TOP, HEAD)


def blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    return uniform_blocks(LAYER, d["L"], scan)


def qwen2_blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    return uniform_blocks(QWEN2_LAYER, d["L"], scan)


def check_config(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    if cfg.get("attention_bias"):
        raise UnsupportedError("config.json sets attention_bias: Qwen3 in MaxText has no q/k/v biases")
    if cfg.get("use_sliding_window"):
        raise UnsupportedError("config.json sets use_sliding_window: not supported for Qwen3 in MaxText")
    return []


def check_qwen2(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    """Refuse what MaxText's qwen2 block does not compute: a sliding window, RoPE scaling, another activation."""
    if cfg.get("use_sliding_window"):
        raise UnsupportedError("config.json sets use_sliding_window: MaxText's qwen2 attends over the whole context")
    kind = llama3.rope_kind(cfg)
    if kind is not None:
        raise UnsupportedError(f"config.json rope scaling {kind!r}: MaxText's qwen2 uses plain RoPE")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedError(f"config.json hidden_act {act!r}: MaxText's qwen2 MLP is SwiGLU (silu)")
    if (d := head_dim(cfg)) % 2:
        raise UnsupportedError(f"head_dim {d} is odd: RoPE needs an even head dim")
    return []


FAMILY = Family(
    name="qwen3", model_types=("qwen3",), dims=dims, top_rules=top_rules, blocks=blocks,
    check_config=check_config,
    reference_keys=("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "intermediate_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings"),
    extra={"tied": tied, "layer_rules": LAYER, "top_table": (*TOP, HEAD)},
)

QWEN2 = Family(
    name="qwen2", model_types=("qwen2",), dims=dims, top_rules=top_rules, blocks=qwen2_blocks,
    check_config=check_qwen2,
    reference_keys=("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                    "num_hidden_layers", "vocab_size", "tie_word_embeddings", "rope_theta"),
    extra={"tied": tied, "layer_rules": QWEN2_LAYER, "top_table": (*TOP, HEAD)},
)
