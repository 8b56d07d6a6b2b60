"""The Llama decoder (MaxText decoder_block llama2 / mistral): Llama 3.1, Llama 2 / 3 / 3.3 and Mistral.

One table, two RoPE layouts. MaxText 0.2.5 picks the RoPE by model name: the llama3.1-* names get its
Llama RoPE (interleaved pairs, llama3 scaling), so their q and k kernels go from HF rotate-half order to
interleaved pairs (maxtext-layout.md §6). Every other llama2-block name (llama2-*, llama3-*, llama3.3-70b)
and mistral-7b runs the default rotate-half RoPE with no scaling, the HF order itself: no permutation
(as MaxText's llama_or_mistral_ckpt.py converts HF checkpoints). All fold 1/sqrt(D) into the query
kernel (MaxText applies no query scale at run time), none has biases, all are untied.
"""

from __future__ import annotations

from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families.base import Block, Dims, Family, attention_dims, config_int, head_dim, row, uniform_blocks

P = "model.layers.{layer}."

NORMS = (
    row("pre_self_attention_layer_norm/scale", P + "input_layernorm.weight", "E", "E"),
    row("post_self_attention_layer_norm/scale", P + "post_attention_layernorm.weight", "E", "E"),
)
VALUE_OUT = (
    row("self_attention/value/kernel", P + "self_attn.v_proj.weight", "E,K,D", "K*D,E", "transpose"),
    row("self_attention/out/kernel", P + "self_attn.o_proj.weight", "N,D,E", "E,N*D", "transpose"),
)
MLP = (
    row("mlp/wi_0/kernel", P + "mlp.gate_proj.weight", "E,F", "F,E", "transpose"),
    row("mlp/wi_1/kernel", P + "mlp.up_proj.weight", "E,F", "F,E", "transpose"),
    row("mlp/wo/kernel", P + "mlp.down_proj.weight", "F,E", "E,F", "transpose"),
)

# Llama 3.1: q and k permuted to interleaved pairs, 1/sqrt(D) folded into q.
LAYER = (
    *NORMS,
    row("self_attention/query/kernel", P + "self_attn.q_proj.weight", "E,N,D", "N*D,E",
        "transpose,rope-interleave,query-scale"),
    row("self_attention/key/kernel", P + "self_attn.k_proj.weight", "E,K,D", "K*D,E", "transpose,rope-interleave"),
    *VALUE_OUT, *MLP,
)

# Rotate-half RoPE (Llama 2 / 3 / 3.3, Mistral; Mixtral's attention too): only the 1/sqrt(D) folded into q.
ATTENTION = (
    *NORMS,
    row("self_attention/query/kernel", P + "self_attn.q_proj.weight", "E,N,D", "N*D,E", "transpose,query-scale"),
    row("self_attention/key/kernel", P + "self_attn.k_proj.weight", "E,K,D", "K*D,E", "transpose"),
    *VALUE_OUT,
)
PLAIN_LAYER = (*ATTENTION, *MLP)

TOP = (
    row("token_embedder/embedding", "model.embed_tokens.weight", "V,E", "V,E"),
    row("decoder/decoder_norm/scale", "model.norm.weight", "E", "E"),
    row("decoder/logits_dense/kernel", "lm_head.weight", "E,V", "V,E", "transpose"),
)


def dims(cfg: dict) -> Dims:
    return attention_dims(cfg) | {"F": config_int(cfg, "intermediate_size")}


def top_rules(d: Dims, cfg: dict) -> tuple:
    return TOP


def blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    return uniform_blocks(LAYER, d["L"], scan)


def plain_blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    return uniform_blocks(PLAIN_LAYER, d["L"], scan)


def rope_scaling(cfg: dict) -> dict | None:
    """The rope scaling dict, from `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    for key in ("rope_scaling", "rope_parameters"):
        value = cfg.get(key)
        if isinstance(value, dict) and value.get("rope_type", value.get("type")) not in (None, "default"):
            return value
    return None


def rope_kind(cfg: dict) -> str | None:
    """The config's RoPE scaling type ('llama3', 'yarn', ...), or None for plain RoPE."""
    scaling = rope_scaling(cfg)
    return scaling.get("rope_type", scaling.get("type")) if scaling else None


def _check_common(cfg: dict, who: str) -> None:
    """What no Llama-block model in MaxText computes: biases, a tied head, another activation, an odd head dim."""
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UnsupportedError(f"config.json sets attention_bias/mlp_bias: MaxText's {who} has no biases")
    if cfg.get("tie_word_embeddings"):
        raise UnsupportedError(f"config.json ties embeddings: MaxText's {who} always has an untied logits_dense")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedError(f"config.json hidden_act {act!r}: MaxText's {who} MLP is SwiGLU (silu)")
    if (d := head_dim(cfg)) % 2:
        raise UnsupportedError(f"head_dim {d} is odd: RoPE needs an even head dim")


def check_config(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    _check_common(cfg, "llama3.1")
    kind = rope_kind(cfg)
    if kind not in (None, "llama3"):
        raise UnsupportedError(f"config.json rope scaling {kind!r}: MaxText's llama3.1 RoPE is llama3-style only")
    if kind is None:
        return ["config.json has no llama3 rope scaling; MaxText's llama3.1 RoPE applies it (long contexts differ)"]
    return []


def check_plain(cfg: dict, features: frozenset[str] = frozenset(), who: str = "llama2 block") -> list[str]:
    """Llama 2 / 3 / 3.3 (and Mistral, `who`): plain RoPE only; a llama3 scaling is noted, not applied."""
    _check_common(cfg, who)
    kind = rope_kind(cfg)
    if kind == "llama3":
        return [f"config.json asks for llama3 rope scaling, which MaxText 0.2.5's {who} does not apply (plain RoPE; "
                "only the llama3.1-* names get the scaled RoPE): its logits differ from Hugging Face's. A llama3.1-* "
                "name (same tree, q/k permuted for that RoPE) keeps Hugging Face's math"]
    if kind is not None:
        raise UnsupportedError(f"config.json rope scaling {kind!r}: MaxText's {who} uses plain RoPE")
    return []


def check_mistral(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    """Mistral: as Llama 2, and MaxText's mistral block attends over the whole context (no sliding window)."""
    notes = check_plain(cfg, features, "mistral")
    window, context = cfg.get("sliding_window"), cfg.get("max_position_embeddings")
    if window is not None and (context is None or int(window) < int(context)):
        notes.append(f"config.json sets sliding_window {window}: MaxText's mistral attends over the whole context, "
                     f"so it computes what Hugging Face does only up to {window} tokens")
    return notes


REFERENCE_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                  "num_hidden_layers", "vocab_size")

FAMILY = Family(
    name="llama3.1", model_types=("llama",), dims=dims, top_rules=top_rules, blocks=blocks,
    check_config=check_config, claims=lambda cfg: rope_kind(cfg) == "llama3",
    reference_keys=(*REFERENCE_KEYS, "rope_scaling"),
    extra={"tied": lambda cfg: False, "layer_rules": LAYER, "top_table": TOP},
)

# MaxText's llama2-*, llama3-* and llama3.3-70b: the rope_theta of each config is part of its math, and so is the
# kind of RoPE scaling its HF config names (none, or Llama 3.3's llama3, which MaxText leaves out).
LLAMA2 = Family(
    name="llama2", model_types=("llama",), dims=dims, top_rules=top_rules, blocks=plain_blocks,
    check_config=check_plain, reference_keys=(*REFERENCE_KEYS, "rope_theta", "rope_scaling"),
    extra={"tied": lambda cfg: False, "layer_rules": PLAIN_LAYER, "top_table": TOP},
)

MISTRAL = Family(
    name="mistral", model_types=("mistral",), dims=dims, top_rules=top_rules, blocks=plain_blocks,
    check_config=check_mistral, reference_keys=(*REFERENCE_KEYS, "rope_theta", "rope_scaling"),
    extra={"tied": lambda cfg: False, "layer_rules": PLAIN_LAYER, "top_table": TOP},
)
