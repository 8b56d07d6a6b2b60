"""DeepSeek V2 (V2-Lite), V3, V3.2 and Kimi K2 (MaxText decoder_block deepseek, MLA attention): maxtext-layout.md §7.

Dense layers (the first `first_k_dense_replace`) and MoE layers live in two groups, `dense_layers` and
`moe_layers`; the MoE index restarts at 0. Experts are stacked on axis 0 ((X, L, E, M) when scanned).
No weight scaling, offsets or RoPE permutation: DeepSeek's HF weights are already in MaxText's
interleaved-pair order. V3/V3.2 add the router bias (`e_score_correction_bias`, a non-parameter
variable: `(Lm, X)` when scanned); V3.2 adds the
lightning indexer. The multi-token-prediction layer (V3 `model.layers.{L}`) converts with `--mtp`.
"""

from __future__ import annotations

import re

from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families.base import Block, Dims, Family, Rule, config_int, row

P = "model.layers.{layer}."

NORMS = (
    row("pre_self_attention_layer_norm/scale", P + "input_layernorm.weight", "E", "E"),
    row("post_self_attention_layer_norm/scale", P + "post_attention_layernorm.weight", "E", "E"),
)
MLA = (
    row("self_attention/wkv_a/kernel", P + "self_attn.kv_a_proj_with_mqa.weight", "E,C+R", "C+R,E", "transpose"),
    row("self_attention/kv_norm/scale", P + "self_attn.kv_a_layernorm.weight", "C", "C"),
    row("self_attention/wkv_b/kernel", P + "self_attn.kv_b_proj.weight", "C,N,Dkv", "N*Dkv,C", "transpose"),
    row("self_attention/out/kernel", P + "self_attn.o_proj.weight", "N,Dv,E", "E,N*Dv", "transpose"),
)
QUERY_V2 = (row("self_attention/query/kernel", P + "self_attn.q_proj.weight", "E,N,Dq", "N*Dq,E", "transpose"),)
QUERY_LORA = (
    row("self_attention/wq_a/kernel", P + "self_attn.q_a_proj.weight", "E,Q", "Q,E", "transpose"),
    row("self_attention/q_norm/scale", P + "self_attn.q_a_layernorm.weight", "Q", "Q"),
    row("self_attention/wq_b/kernel", P + "self_attn.q_b_proj.weight", "Q,N,Dq", "N*Dq,Q", "transpose"),
)
INDEXER = (
    row("self_attention/indexer/wq_b/kernel", P + "self_attn.indexer.wq_b.weight", "Q,H,Hd", "H*Hd,Q", "transpose"),
    row("self_attention/indexer/wk/kernel", P + "self_attn.indexer.wk.weight", "E,Hd", "Hd,E", "transpose"),
    row("self_attention/indexer/k_norm/scale", P + "self_attn.indexer.k_norm.weight", "Hd", "Hd"),
    row("self_attention/indexer/k_norm/bias", P + "self_attn.indexer.k_norm.bias", "Hd", "Hd"),
    row("self_attention/indexer/weights_proj/kernel", P + "self_attn.indexer.weights_proj.weight", "E,H", "H,E",
        "transpose"),
)
DENSE_MLP = (
    row("mlp/wi_0/kernel", P + "mlp.gate_proj.weight", "E,F", "F,E", "transpose"),
    row("mlp/wi_1/kernel", P + "mlp.up_proj.weight", "E,F", "F,E", "transpose"),
    row("mlp/wo/kernel", P + "mlp.down_proj.weight", "F,E", "E,F", "transpose"),
)
MOE = "DeepSeekMoeBlock_0/"
MOE_MLP = (
    row(MOE + "MoeBlock_0/gate/kernel", P + "mlp.gate.weight", "E,X", "X,E", "transpose"),
    row(MOE + "MoeBlock_0/wi_0", P + "mlp.experts.{expert}.gate_proj.weight", "E,M", "M,E", "transpose", "X"),
    row(MOE + "MoeBlock_0/wi_1", P + "mlp.experts.{expert}.up_proj.weight", "E,M", "M,E", "transpose", "X"),
    row(MOE + "MoeBlock_0/wo", P + "mlp.experts.{expert}.down_proj.weight", "M,E", "E,M", "transpose", "X"),
    row(MOE + "shared_experts/wi_0/kernel", P + "mlp.shared_experts.gate_proj.weight", "E,S", "S,E", "transpose"),
    row(MOE + "shared_experts/wi_1/kernel", P + "mlp.shared_experts.up_proj.weight", "E,S", "S,E", "transpose"),
    row(MOE + "shared_experts/wo/kernel", P + "mlp.shared_experts.down_proj.weight", "S,E", "E,S", "transpose"),
)
# A non-parameter variable in MaxText 0.2.5 (collection MoEBiasVar, as for every model name starting with
# deepseek3): scanned, its layer axis is 0, (Lm, X). Stored float32 whatever the output dtype, as the released
# checkpoints hold it: it decides which experts a token is routed to, and bf16 rounding can change that choice.
ROUTER_BIAS = (row(MOE + "MoeBlock_0/gate/bias", P + "mlp.gate.e_score_correction_bias", "X", "X", dtype="f32",
                   collection="MoEBiasVar"),)
MTP_OWN = (
    row("mtp_1_embedding_norm/scale", P + "enorm.weight", "E", "E"),
    row("mtp_1_hidden_state_norm/scale", P + "hnorm.weight", "E", "E"),
    row("mtp_1_projection/kernel", P + "eh_proj.weight", "2*E,E", "E,2*E", "transpose"),
    # MaxText 0.2.5's dedicated MTP norm before the shared head (DeepSeek's shared_head.norm != model.norm)
    row("mtp_1_final_norm/scale", P + "shared_head.norm.weight", "E", "E"),
)
# MaxText's MTP block reuses the main embedding and head; these HF copies are not converted.
MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")

TOP = (
    row("token_embedder/embedding", "model.embed_tokens.weight", "V,E", "V,E"),
    row("decoder/decoder_norm/scale", "model.norm.weight", "E", "E"),
    row("decoder/logits_dense/kernel", "lm_head.weight", "E,V", "V,E", "transpose"),
)
MTP_PREFIX = "mtp_block/mtp_layer_1"


FP8_RELEASED = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\..*_proj(_with_mqa)?\.weight|"
                          r"model\.layers\.\d+\.eh_proj\.weight")


def fp8_released(cfg: dict, name: str) -> bool:
    """Whether the fp8 releases (DeepSeek-V3/V3.2, Kimi K2: `quant_method` fp8) store HF weight `name` as e4m3 with
    a float32 `weight_scale_inv` per block: every attention and MLP projection (experts, shared experts, dense
    MLPs, the MTP projection), not the embeddings, norms, router, router bias or head."""
    quant = cfg.get("quantization_config") or {}
    return quant.get("quant_method") == "fp8" and FP8_RELEASED.fullmatch(name) is not None


def is_v3(cfg: dict) -> bool:
    """DeepSeek-V3 or V3.2, or Kimi K2 (`kimi_k2`: the V3 architecture under its own model_type)."""
    return cfg.get("model_type") in ("deepseek_v3", "deepseek_v32", "kimi_k2")


def dims(cfg: dict) -> Dims:
    q_lora = cfg.get("q_lora_rank") or 0
    dn, dr, dv = (config_int(cfg, k) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    d = {
        "E": config_int(cfg, "hidden_size"), "N": config_int(cfg, "num_attention_heads"),
        "L": config_int(cfg, "num_hidden_layers"), "V": config_int(cfg, "vocab_size"),
        "F": config_int(cfg, "intermediate_size"), "M": config_int(cfg, "moe_intermediate_size"),
        "X": config_int(cfg, "n_routed_experts"), "C": config_int(cfg, "kv_lora_rank"), "Q": int(q_lora),
        "Dn": dn, "R": dr, "Dv": dv, "Dq": dn + dr, "Dkv": dn + dv,
        "Ld": config_int(cfg, "first_k_dense_replace", 0, minimum=0),
    }
    d["S"] = config_int(cfg, "n_shared_experts", 0, minimum=0) * d["M"]
    d["C+R"] = d["C"] + d["R"]
    if cfg.get("model_type") == "deepseek_v32":
        d["H"], d["Hd"] = config_int(cfg, "index_n_heads"), config_int(cfg, "index_head_dim")
    return d


def attention_rules(cfg: dict) -> tuple[Rule, ...]:
    rules = NORMS + (QUERY_LORA if cfg.get("q_lora_rank") else QUERY_V2) + MLA
    if cfg.get("model_type") == "deepseek_v32":
        rules += INDEXER
    return rules


def moe_rules(cfg: dict) -> tuple[Rule, ...]:
    return MOE_MLP + (ROUTER_BIAS if is_v3(cfg) else ())


def top_rules(d: Dims, cfg: dict) -> tuple[Rule, ...]:
    return TOP


def blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    dense = attention_rules(cfg) + DENSE_MLP
    moe = attention_rules(cfg) + moe_rules(cfg)
    ld, layers = d["Ld"], d["L"]
    out: list[Block] = []
    for name, rules, hf_layers in (("dense_layers", dense, range(0, ld)), ("moe_layers", moe, range(ld, layers))):
        if not hf_layers:
            continue
        if scan:
            out.append(Block(f"decoder/{name}", tuple(hf_layers), True, rules))
        else:
            out += [Block(f"decoder/{name}_{j}", (hf,), False, rules) for j, hf in enumerate(hf_layers)]
    if "mtp" in features:
        mtp_layer = layers   # HF stores the MTP module as one extra layer after the main ones
        out.append(Block(MTP_PREFIX, (mtp_layer,), False, MTP_OWN))
        out.append(Block(f"{MTP_PREFIX}/mtp_1_transformer_layer", (mtp_layer,), False, moe))
    return out


def mtp_layers(cfg: dict) -> int:
    return int(cfg.get("num_nextn_predict_layers") or 0)


def v2_group_limited(cfg: dict) -> bool:
    """A DeepSeek-V2 config whose router keeps only the best `topk_group` of `n_group` expert groups."""
    return (cfg.get("model_type") == "deepseek_v2" and cfg.get("topk_method") == "group_limited_greedy"
            and int(cfg.get("n_group") or 1) > 1 and int(cfg.get("topk_group") or 0) < int(cfg["n_group"]))


def check_config(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    notes = []
    if "mtp" in features and mtp_layers(cfg) != 1:
        raise UnsupportedError(f"--mtp: config.json has num_nextn_predict_layers = {mtp_layers(cfg)}; "
                               "MaxText's MTP block holds exactly one layer")
    if cfg.get("quantization_config", {}).get("quant_method") not in (None, "fp8", "compressed-tensors"):
        raise UnsupportedError(f"quantization {cfg['quantization_config'].get('quant_method')!r} is not supported "
                               "(fp8 block-scaled, or compressed-tensors int4 pack-quantized)")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type")) not in (None, "default", "yarn"):
        raise UnsupportedError(f"DeepSeek rope type {rope.get('rope_type')!r} is not supported (yarn or default)")
    if cfg.get("n_group") and cfg.get("topk_group") and cfg["n_group"] > 1 and is_v3(cfg):
        notes.append(f"config uses group-limited routing (n_group {cfg['n_group']}, topk_group {cfg['topk_group']}): "
                     "set MaxText's n_routing_groups/topk_routing_group to match for identical logits")
    elif v2_group_limited(cfg):
        notes.append(f"config uses group-limited greedy routing (n_group {cfg['n_group']}, topk_group "
                     f"{cfg['topk_group']}), which MaxText 0.2.5 does not apply to DeepSeek-V2 (its deepseek2 "
                     "routing is a plain top-k): MaxText's logits will differ from Hugging Face's")
    if mtp_layers(cfg) and "mtp" not in features:
        notes.append(f"the multi-token-prediction layer (model.layers.{cfg['num_hidden_layers']}.*) is skipped; "
                     "pass --mtp to convert it")
    return notes


FAMILY = Family(
    name="deepseek", model_types=("deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2"), dims=dims,
    top_rules=top_rules, blocks=blocks, check_config=check_config, features=frozenset({"mtp"}),
    reference_keys=("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
                    "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "kv_lora_rank", "q_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "first_k_dense_replace"),
    extra={"tied": lambda cfg: False, "mtp_shared": MTP_SHARED, "extra_layers": mtp_layers,
           "fp8_released": fp8_released},
)
