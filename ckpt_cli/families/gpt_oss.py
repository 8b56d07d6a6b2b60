"""GPT-OSS (MaxText decoder_block gpt_oss): maxtext-layout.md §10.

Attention with q/k/v/o biases and learned per-head sinks (no query scaling, no RoPE permutation: YaRN
rotate-half on both sides); the MLP of every layer is a `GptOssMlp`: router `gate/kernel` (E, X) with a
bias, and experts stored by HF fused per layer. `mlp.experts.gate_up_proj (X, E, 2M)` interleaves gate
and up on its last axis: `wi_0 = gate_up[..., 0::2]`, `wi_1 = gate_up[..., 1::2]` (no transpose; the same
for `gate_up_proj_bias (X, 2M)`); these are two rules with complementary parts of one HF tensor, so
import reads each part and export writes both parts into the one tensor. `down_proj (X, M, E)` is `wo`.
The big expert tensors move one expert at a time (index e of the HF tensor's axis 0).

Scanned, MaxText groups the layers in pairs (`inhomogeneous_layer_cycle_interval` 2):
`decoder/layers/layers_<b>/…` with scan length L/2, scan index s holding HF layer 2s + b; layer 2s+0 is
the sliding-window (local) layer, 2s+1 the global one. Unscanned: plain `decoder/layers_<i>/…`.

Both the BF16 checkpoints (unsloth/gpt-oss-*-BF16, what MaxText's HF_IDS name) and the official MXFP4 repos
(openai/gpt-oss-*) are read: there `gate_up_proj` / `down_proj` are stored as `*_blocks` + `*_scales`, which the
safetensors reader dequantizes one expert at a time into the same (X, in, out) layout (io/mxfp4.py), so the
table is the same for both.
"""

from __future__ import annotations

import math

from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families.base import Block, Dims, Family, Part, attention_dims, config_int, row, uniform_blocks

P = "model.layers.{layer}."
A = "GptOssAttention/"
MLP = "GptOssMlp/"
GATE, UP = Part(-1, 0, 2), Part(-1, 1, 2)   # even / odd columns of gate_up_proj
CYCLE = 2                                  # layers per scanned block
SWIGLU_ALPHA = 1.702                       # fixed in MaxText's gpt_oss expert activation
BF16_REPOS = "unsloth/gpt-oss-20b-BF16 or unsloth/gpt-oss-120b-BF16"

LAYER = (
    row("pre_self_attention_layer_norm/scale", P + "input_layernorm.weight", "E", "E"),
    row("post_self_attention_layer_norm/scale", P + "post_attention_layernorm.weight", "E", "E"),
    row(A + "query/kernel", P + "self_attn.q_proj.weight", "E,N,D", "N*D,E", "transpose"),
    row(A + "query/bias", P + "self_attn.q_proj.bias", "N,D", "N*D", "reshape"),
    row(A + "key/kernel", P + "self_attn.k_proj.weight", "E,K,D", "K*D,E", "transpose"),
    row(A + "key/bias", P + "self_attn.k_proj.bias", "K,D", "K*D", "reshape"),
    row(A + "value/kernel", P + "self_attn.v_proj.weight", "E,K,D", "K*D,E", "transpose"),
    row(A + "value/bias", P + "self_attn.v_proj.bias", "K,D", "K*D", "reshape"),
    row(A + "out/kernel", P + "self_attn.o_proj.weight", "N,D,E", "E,N*D", "transpose"),
    row(A + "out/bias", P + "self_attn.o_proj.bias", "E", "E"),
    row(A + "sinks", P + "self_attn.sinks", "N", "N"),
    row(MLP + "gate/kernel", P + "mlp.router.weight", "E,X", "X,E", "transpose"),
    row(MLP + "gate/bias", P + "mlp.router.bias", "X", "X"),
    row(MLP + "wi_0", P + "mlp.experts.gate_up_proj", "E,M", "X,E,2*M", "", "X", GATE),
    row(MLP + "wi_1", P + "mlp.experts.gate_up_proj", "E,M", "X,E,2*M", "", "X", UP),
    row(MLP + "wi_0_bias", P + "mlp.experts.gate_up_proj_bias", "X,M", "X,2*M", "", None, GATE),
    row(MLP + "wi_1_bias", P + "mlp.experts.gate_up_proj_bias", "X,M", "X,2*M", "", None, UP),
    row(MLP + "wo", P + "mlp.experts.down_proj", "M,E", "X,M,E", "", "X"),
    row(MLP + "wo_bias", P + "mlp.experts.down_proj_bias", "X,E", "X,E"),
)

TOP = (
    row("token_embedder/embedding", "model.embed_tokens.weight", "V,E", "V,E"),
    row("decoder/decoder_norm/scale", "model.norm.weight", "E", "E"),
    row("decoder/logits_dense/kernel", "lm_head.weight", "E,V", "V,E", "transpose"),
)


def dims(cfg: dict) -> Dims:
    return attention_dims(cfg) | {"M": config_int(cfg, "intermediate_size"), "X": config_int(cfg, "num_local_experts")}


def top_rules(d: Dims, cfg: dict) -> tuple:
    return TOP


def blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    """Scanned: `decoder/layers/layers_<b>` holds HF layers b, b+2, b+4, ...; unscanned: one block per layer."""
    if not scan:
        return uniform_blocks(LAYER, d["L"], False)
    return [Block(f"decoder/layers/layers_{b}", tuple(range(b, d["L"], CYCLE)), True, LAYER) for b in range(CYCLE)]


def expected_layer_types(layers: int) -> list[str]:
    """MaxText's gpt_oss pattern: local (sliding) then global, repeating."""
    return [("sliding_attention", "full_attention")[i % CYCLE] for i in range(layers)]


def rope(cfg: dict) -> dict:
    """The RoPE parameters, legacy (`rope_theta` + `rope_scaling`) or transformers-5 (`rope_parameters`)."""
    out = dict(cfg.get("rope_scaling") or {})
    out.update(cfg.get("rope_parameters") or {})
    out.setdefault("rope_theta", cfg.get("rope_theta"))
    return out


def check_config(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    quant = cfg.get("quantization_config") or {}
    method = str(quant.get("quant_method") or "mxfp4").lower()
    if method != "mxfp4":
        raise UnsupportedError(f"config.json says {method} quantization: only MXFP4 (the official openai/gpt-oss "
                               f"repos) and unquantized sources ({BF16_REPOS}) are read")
    layers = config_int(cfg, "num_hidden_layers")
    if layers % CYCLE:
        raise UnsupportedError(f"config.json has {layers} layers: MaxText's gpt_oss groups layers in pairs "
                               "(inhomogeneous_layer_cycle_interval 2), so the count must be even")
    types = cfg.get("layer_types")
    if types is not None and list(types) != expected_layer_types(layers):
        raise UnsupportedError(f"config.json layer_types {list(types)[:4]}... is not MaxText's gpt_oss pattern "
                               "(sliding_attention, full_attention) repeating")
    if cfg.get("attention_bias") is False:
        raise UnsupportedError("config.json sets attention_bias false: MaxText's gpt_oss always has q/k/v/o biases")
    if cfg.get("tie_word_embeddings"):
        raise UnsupportedError("config.json ties the embeddings: MaxText's gpt_oss has an untied logits_dense")
    rope_type = rope(cfg).get("rope_type") or rope(cfg).get("type") or "default"
    if rope_type != "yarn":
        raise UnsupportedError(f"config.json rope_type {rope_type!r}: MaxText's gpt_oss uses yarn")
    alpha = float(cfg.get("swiglu_alpha", SWIGLU_ALPHA))
    if not math.isclose(alpha, SWIGLU_ALPHA):
        raise UnsupportedError(f"config.json sets swiglu_alpha {alpha}: MaxText's gpt_oss fixes it at {SWIGLU_ALPHA}")
    experts, top_k = config_int(cfg, "num_local_experts"), config_int(cfg, "num_experts_per_tok")
    if not 0 < top_k <= experts:
        raise UnsupportedError(f"config.json has num_experts_per_tok {top_k} with {experts} experts: "
                               "need 1 <= num_experts_per_tok <= num_local_experts")
    notes = []
    limit = cfg.get("swiglu_limit", 7.0)
    if limit is not None and float(limit) != 7.0:
        notes.append(f"config.json has swiglu_limit {limit}; MaxText's gpt-oss configs set mlp_activations_limit "
                     "7.0: set it to the same value there")
    return notes


FAMILY = Family(
    name="gpt_oss", model_types=("gpt_oss",), dims=dims, top_rules=top_rules, blocks=blocks,
    check_config=check_config,
    reference_keys=("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                    "num_local_experts", "num_experts_per_tok", "num_hidden_layers", "vocab_size", "sliding_window"),
    extra={"layer_rules": LAYER, "top_table": TOP},
)
