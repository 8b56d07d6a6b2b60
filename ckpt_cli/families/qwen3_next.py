"""Qwen3-Next (MaxText decoder_block qwen3_next): gated DeltaNet linear attention + gated full attention, MoE.

Every `interval`-th layer (`full_attention_interval`, MaxText's `inhomogeneous_layer_cycle_interval`, 4) is full
attention, the others gated DeltaNet (`linear_attn`); every layer's MLP is a routed MoE plus one shared expert
with a sigmoid gate. What MaxText 0.2.5's converter does to each tensor (checkpoint_conversion/utils/
param_mapping.py, QWEN3_NEXT_*), and so ckpt:

- `linear_attn.in_proj_qkvz`, `in_proj_ba`, `out_proj`: transpose only. The fused projections keep HF's
  per-key-head interleaved order ([q, k, v, z] for each key head; [b, a] likewise); no split, no reorder.
- `linear_attn.conv1d.weight` (C, 1, K) -> `conv1d/kernel` (K, 1, C): the axes reversed (a transpose, as the
  middle axis is 1).
- `A_log`, `dt_bias`, `linear_attn.norm` (the gated RMSNorm, plain weight), `input_layernorm`,
  `post_attention_layernorm`, `q_norm`, `k_norm`, `model.norm`: copied as they are. HF's Qwen3-Next RMSNorm
  computes `x * (1 + w)` and so does MaxText's Qwen3NextRMSNorm at run time: no offset is folded.
- `self_attn.q_proj` (N*2D, E) -> `query/kernel` (E, N, 2D): per head the query then its output gate, as HF
  lays them out; k/v (E, K, D); `o_proj` -> `out/kernel` (N*D, E), flat (transposed only). No RoPE
  permutation (rotate-half, partial), no folded query scale.
- MoE: router `mlp.gate` -> `routed_experts/gate/kernel` (E, X); experts stacked on axis 0 (X, E, M) /
  (X, M, E); shared expert `shared_expert/wi_0|wi_1|wo/kernel`; `shared_expert_gate` (1, E) -> (E, 1).

Scanned, MaxText stacks whole cycles: `decoder/layers/local_layers/...` holds the `interval - 1` linear
layers of each cycle on two axes (cycle, position: HF layer `interval*b + p`), `decoder/layers/global_layer/
...` the full-attention layer of each cycle (HF layer `interval*b + interval - 1`). Unscanned: `layers_<i>`.
"""

from __future__ import annotations

from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families import qwen3, qwen3_moe
from ckpt_cli.families.base import Block, Dims, Family, attention_dims, config_int, row

P = "model.layers.{layer}."

SHARED = (
    row("input_layernorm/scale", P + "input_layernorm.weight", "E", "E"),
    row("post_attention_layernorm/scale", P + "post_attention_layernorm.weight", "E", "E"),
    row("mlp/routed_experts/gate/kernel", P + "mlp.gate.weight", "E,X", "X,E", "transpose"),
    row("mlp/routed_experts/wi_0", P + "mlp.experts.{expert}.gate_proj.weight", "E,M", "M,E", "transpose", "X"),
    row("mlp/routed_experts/wi_1", P + "mlp.experts.{expert}.up_proj.weight", "E,M", "M,E", "transpose", "X"),
    row("mlp/routed_experts/wo", P + "mlp.experts.{expert}.down_proj.weight", "M,E", "E,M", "transpose", "X"),
    row("mlp/shared_expert/wi_0/kernel", P + "mlp.shared_expert.gate_proj.weight", "E,S", "S,E", "transpose"),
    row("mlp/shared_expert/wi_1/kernel", P + "mlp.shared_expert.up_proj.weight", "E,S", "S,E", "transpose"),
    row("mlp/shared_expert/wo/kernel", P + "mlp.shared_expert.down_proj.weight", "S,E", "E,S", "transpose"),
    row("mlp/shared_expert_gate/kernel", P + "mlp.shared_expert_gate.weight", "E,1", "1,E", "transpose"),
)
LA = P + "linear_attn."
LINEAR = (
    row("attention/in_proj_qkvz/kernel", LA + "in_proj_qkvz.weight", "E,QKVZ", "QKVZ,E", "transpose"),
    row("attention/in_proj_ba/kernel", LA + "in_proj_ba.weight", "E,2*HV", "2*HV,E", "transpose"),
    row("attention/conv1d/kernel", LA + "conv1d.weight", "CK,1,C", "C,1,CK", "transpose"),
    row("attention/A_log", LA + "A_log", "HV", "HV"),
    row("attention/dt_bias", LA + "dt_bias", "HV", "HV"),
    row("attention/norm/rms_norm/scale", LA + "norm.weight", "DV", "DV"),
    row("attention/out_proj/kernel", LA + "out_proj.weight", "HV*DV,E", "E,HV*DV", "transpose"),
)
SA = P + "self_attn."
FULL = (
    row("attention/attention/query/kernel", SA + "q_proj.weight", "E,N,2*D", "N*2*D,E", "transpose"),
    row("attention/attention/key/kernel", SA + "k_proj.weight", "E,K,D", "K*D,E", "transpose"),
    row("attention/attention/value/kernel", SA + "v_proj.weight", "E,K,D", "K*D,E", "transpose"),
    row("attention/attention/out/kernel", SA + "o_proj.weight", "N*D,E", "E,N*D", "transpose"),
    row("attention/attention/query_norm/scale", SA + "q_norm.weight", "D", "D"),
    row("attention/attention/key_norm/scale", SA + "k_norm.weight", "D", "D"),
)
LOCAL_LAYER = LINEAR + SHARED
GLOBAL_LAYER = FULL + SHARED


def interval(cfg: dict) -> int:
    """Every `interval`-th layer is full attention (the last of each cycle): `full_attention_interval` (the
    released config.json), else where `layer_types` (as transformers 5 writes it) puts the first full layer."""
    if cfg.get("full_attention_interval") is not None:
        return config_int(cfg, "full_attention_interval")
    types = list(cfg.get("layer_types") or [])
    return types.index("full_attention") + 1 if "full_attention" in types else 4


def linear_dims(cfg: dict) -> Dims:
    """The gated DeltaNet's dimensions: key heads HK of DK, value heads HV of DV, conv width CK."""
    hk, hv = config_int(cfg, "linear_num_key_heads"), config_int(cfg, "linear_num_value_heads")
    dk, dv = config_int(cfg, "linear_key_head_dim"), config_int(cfg, "linear_value_head_dim")
    return {"HK": hk, "HV": hv, "DK": dk, "DV": dv, "CK": config_int(cfg, "linear_conv_kernel_dim"),
            "QKVZ": 2 * hk * dk + 2 * hv * dv, "C": 2 * hk * dk + hv * dv}


def dims(cfg: dict) -> Dims:
    return (attention_dims(cfg) | linear_dims(cfg)
            | {"M": config_int(cfg, "moe_intermediate_size"), "X": qwen3_moe.num_experts(cfg),
               "S": config_int(cfg, "shared_expert_intermediate_size")})


def top_rules(d: Dims, cfg: dict) -> tuple:
    return qwen3.top_rules(d, cfg)


def is_full(layer: int, cfg: dict) -> bool:
    return (layer + 1) % interval(cfg) == 0


def blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    n, cycle = d["L"], interval(cfg)
    if not scan:
        return [Block(f"decoder/layers_{i}", (i,), False, GLOBAL_LAYER if is_full(i, cfg) else LOCAL_LAYER)
                for i in range(n)]
    if n % cycle:
        raise UnsupportedError(f"config.json has {n} layers: scanned, MaxText's qwen3_next stacks whole cycles of "
                               f"{cycle} layers; convert with --no-scan")
    cycles = range(n // cycle)
    local = tuple(cycle * b + p for b in cycles for p in range(cycle - 1))
    full = tuple(cycle * b + cycle - 1 for b in cycles)
    return [Block("decoder/layers/local_layers", local, True, LOCAL_LAYER, inner=cycle - 1),
            Block("decoder/layers/global_layer", full, True, GLOBAL_LAYER)]


def check_layer_types(cfg: dict, n: int) -> None:
    """`layer_types`, when given, must be MaxText's pattern: full attention last in every cycle, linear elsewhere."""
    want = ["full_attention" if is_full(i, cfg) else "linear_attention" for i in range(n)]
    got = cfg.get("layer_types")
    if got and list(got) != want:
        raise UnsupportedError(f"config.json layer_types {list(got)[:8]}... is not MaxText's pattern (full attention "
                               f"on every {interval(cfg)}th layer, gated DeltaNet on the others)")


def check_config(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    """Refuse what MaxText's qwen3_next does not compute (it makes every layer MoE, with a shared expert)."""
    notes = qwen3_moe.check_config(cfg, features)   # biases, sliding window, sparse step, dense layers, top-k
    check_layer_types(cfg, config_int(cfg, "num_hidden_layers"))
    if interval(cfg) < 2:
        raise UnsupportedError(f"config.json has full attention every {interval(cfg)} layer: MaxText's qwen3_next "
                               "needs gated DeltaNet layers before the full-attention layer of each cycle")
    return notes


FAMILY = Family(
    name="qwen3_next", model_types=("qwen3_next",), dims=dims, top_rules=top_rules, blocks=blocks,
    check_config=check_config,
    reference_keys=("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "moe_intermediate_size",
                    "shared_expert_intermediate_size", "num_experts", "num_experts_per_tok", "num_hidden_layers",
                    "vocab_size", "tie_word_embeddings", "linear_num_key_heads", "linear_num_value_heads",
                    "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim",
                    "full_attention_interval"),
    extra={"tied": qwen3.tied, "layer_rules": LOCAL_LAYER + FULL, "top_table": (*qwen3.TOP, qwen3.HEAD)},
)
