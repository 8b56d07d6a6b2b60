"""Mixtral (MaxText decoder_block mixtral): maxtext-layout.md §11.

Attention as Llama's (§6) but with MaxText's default rotate-half RoPE, so no q/k permutation; the
1/sqrt(D) query scale is folded into the query kernel. The MLP of every layer is `MoeBlock_0`: router
`gate/kernel` (E, X) and the experts stacked on axis 0, `wi_0`/`wi_1` (X, E, M) from w1/w3 and `wo`
(X, M, E) from w2 ((X, L, E, M) etc. when scanned). HF names are the released checkpoints' per-expert
`block_sparse_moe.experts.{e}.w1/w2/w3` (transformers 5 writes the same names with save_pretrained).
Always untied; no sliding window, biases or RoPE scaling in MaxText's mixtral, so those are refused.
"""

from __future__ import annotations

from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families import llama3
from ckpt_cli.families.base import Block, Dims, Family, attention_dims, config_int, head_dim, row, uniform_blocks

P = "model.layers.{layer}."
MOE = P + "block_sparse_moe."

LAYER = (
    *llama3.ATTENTION,   # norms, q (1/sqrt(D) folded in), k, v, out; rotate-half RoPE, no permutation
    row("MoeBlock_0/gate/kernel", MOE + "gate.weight", "E,X", "X,E", "transpose"),
    row("MoeBlock_0/wi_0", MOE + "experts.{expert}.w1.weight", "E,M", "M,E", "transpose", "X"),
    row("MoeBlock_0/wi_1", MOE + "experts.{expert}.w3.weight", "E,M", "M,E", "transpose", "X"),
    row("MoeBlock_0/wo", MOE + "experts.{expert}.w2.weight", "M,E", "E,M", "transpose", "X"),
)

TOP = llama3.TOP   # embedding, final norm, untied lm_head (transposed)


def dims(cfg: dict) -> Dims:
    return attention_dims(cfg) | {"M": config_int(cfg, "intermediate_size"), "X": config_int(cfg, "num_local_experts")}


def top_rules(d: Dims, cfg: dict) -> tuple:
    return TOP


def blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    return uniform_blocks(LAYER, d["L"], scan)


def check_config(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    """Refuse what MaxText's mixtral block does not compute (one-line UnsupportedError); no notes."""
    window = cfg.get("sliding_window")
    context = cfg.get("max_position_embeddings")
    if window is not None and (context is None or int(window) < int(context)):
        raise UnsupportedError(f"config.json sets sliding_window {window}: MaxText's mixtral attends over the whole "
                               "context (no sliding window)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UnsupportedError("config.json sets attention_bias/mlp_bias: MaxText's mixtral has no biases")
    if cfg.get("tie_word_embeddings"):
        raise UnsupportedError("config.json ties embeddings: MaxText's mixtral always has an untied logits_dense")
    scaling = llama3.rope_scaling(cfg)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        raise UnsupportedError(f"config.json rope scaling {kind!r}: MaxText's mixtral uses plain RoPE")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedError(f"config.json hidden_act {act!r}: MaxText's mixtral experts are SwiGLU (silu)")
    d = head_dim(cfg)
    if d % 2:
        raise UnsupportedError(f"head_dim {d} is odd: rotate-half RoPE needs an even head dim")
    experts, top_k = config_int(cfg, "num_local_experts"), config_int(cfg, "num_experts_per_tok")
    if not 0 < top_k <= experts:
        raise UnsupportedError(f"config.json has num_experts_per_tok {top_k} with {experts} experts: "
                               "need 1 <= num_experts_per_tok <= num_local_experts")
    return []


FAMILY = Family(
    name="mixtral", model_types=("mixtral",), dims=dims, top_rules=top_rules, blocks=blocks,
    check_config=check_config,
    reference_keys=("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                    "num_local_experts", "num_experts_per_tok", "num_hidden_layers", "vocab_size"),
    extra={"tied": lambda cfg: False, "layer_rules": LAYER, "top_table": TOP},
)
