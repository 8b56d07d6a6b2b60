"""Qwen3 MoE (MaxText decoder_block qwen3_moe): maxtext-layout.md §8.

Attention and norms exactly as Qwen3 dense (§5: no query scaling, no RoPE permutation, q/k RMSNorm);
the MLP of every layer is a `moe_block`: router `gate/kernel` (E, X) and the experts stacked on axis 0,
`wi_0`/`wi_1` (X, E, M) and `wo` (X, M, E) ((X, L, E, M) etc. when scanned). No shared experts.
MaxText's qwen3_moe has no dense layers, so configs that ask for some are refused.
"""

from __future__ import annotations

from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families import qwen3
from ckpt_cli.families.base import Block, Dims, Family, attention_dims, config_int, row, uniform_blocks

P = "model.layers.{layer}."

# Qwen3 dense's attention and norm rows, without its dense MLP rows.
ATTENTION = tuple(r for r in qwen3.LAYER if not r.maxtext.startswith("mlp/"))
MOE = (
    row("moe_block/gate/kernel", P + "mlp.gate.weight", "E,X", "X,E", "transpose"),
    row("moe_block/wi_0", P + "mlp.experts.{expert}.gate_proj.weight", "E,M", "M,E", "transpose", "X"),
    row("moe_block/wi_1", P + "mlp.experts.{expert}.up_proj.weight", "E,M", "M,E", "transpose", "X"),
    row("moe_block/wo", P + "mlp.experts.{expert}.down_proj.weight", "M,E", "E,M", "transpose", "X"),
)
LAYER = ATTENTION + MOE


def num_experts(cfg: dict) -> int:
    """`num_experts` (as the released config.json files name it), else `num_local_experts` (as transformers 5
    writes it)."""
    if cfg.get("num_experts") is None and cfg.get("num_local_experts") is not None:
        return config_int(cfg, "num_local_experts")
    return config_int(cfg, "num_experts")


def dims(cfg: dict) -> Dims:
    return attention_dims(cfg) | {"M": config_int(cfg, "moe_intermediate_size"), "X": num_experts(cfg)}


def top_rules(d: Dims, cfg: dict) -> tuple:
    return qwen3.top_rules(d, cfg)


def blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    return uniform_blocks(LAYER, d["L"], scan)


def check_config(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    qwen3.check_config(cfg, features)    # attention_bias, use_sliding_window
    step = cfg.get("decoder_sparse_step", 1)
    if step is not None and int(step) != 1:
        raise UnsupportedError(f"config.json sets decoder_sparse_step {step}: MaxText's qwen3_moe makes every "
                               "layer MoE (decoder_sparse_step 1)")
    if cfg.get("mlp_only_layers"):
        raise UnsupportedError(f"config.json sets mlp_only_layers {list(cfg['mlp_only_layers'])}: MaxText's "
                               "qwen3_moe has no dense MLP layers")
    experts, top_k = num_experts(cfg), config_int(cfg, "num_experts_per_tok")
    if not 0 < top_k <= experts:
        raise UnsupportedError(f"config.json has num_experts_per_tok {top_k} with {experts} experts: "
                               "need 1 <= num_experts_per_tok <= num_experts")
    notes = []
    if not cfg.get("norm_topk_prob", False):
        notes.append("config.json has norm_topk_prob false (top-k router weights not renormalised); MaxText's "
                     "qwen3_moe configs set norm_topk_prob: true; set it to false there for identical logits")
    if qwen3.tied(cfg):
        notes.append("config.json ties the embeddings: no logits_dense is written; MaxText needs "
                     "logits_via_embedding: true and normalize_embedding_logits: false for this model")
    return notes


FAMILY = Family(
    name="qwen3_moe", model_types=("qwen3_moe",), dims=dims, top_rules=top_rules, blocks=blocks,
    check_config=check_config,
    reference_keys=("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "moe_intermediate_size", "num_experts", "num_experts_per_tok", "num_hidden_layers",
                    "vocab_size", "tie_word_embeddings"),
    extra={"tied": qwen3.tied, "layer_rules": LAYER, "top_table": (*qwen3.TOP, qwen3.HEAD)},
)
