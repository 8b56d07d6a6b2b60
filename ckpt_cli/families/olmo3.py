"""OLMo 3 (MaxText decoder_block olmo3): Olmo-3-7B / Olmo-3-1025-7B / Olmo-3-32B.

Post-norm layers: no input norm; `post_self_attention_layer_norm` normalizes the attention output and
`post_mlp_layer_norm` the MLP output, each before its residual add. The attention module is `attention/`
(not `self_attention/`), and its q/k RMSNorm scales span the whole projection (`N*D` and `K*D`, MaxText's
GlobalRMSNorm for model names starting `olmo3`), not one head. No query scaling folded in (D^-0.5 at run
time), no RoPE permutation (rotate-half on both sides), untied head: every row is a plain copy or transpose.

Scanned, MaxText groups layers by the attention cycle (`inhomogeneous_layer_cycle_interval` 4: three
sliding-window layers, then one global): `decoder/layers/layers_<b>` holds HF layers `4s + b` at scan index
s, so the layer count must be a multiple of 4. Unscanned: plain `decoder/layers_<i>`.

RoPE: MaxText 0.2.5 builds one rotary embedding from its config (`rope_type` yarn for olmo3-7b / -32b,
default for olmo3-7b-pt) and applies it to every layer, sliding ones included; transformers >= 5 (and the
OLMo 3 paper) apply YaRN to the full-attention layers only. The weights are the same either way; `rope` says
which RoPE each layer type gets in the config and `check_config` notes where MaxText will compute otherwise.
"""

from __future__ import annotations

import math

from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families.base import Block, Dims, Family, config_int, row, uniform_blocks
from ckpt_cli.families.llama3 import TOP, dims, top_rules  # embedding, final norm, untied head: as Llama

P = "model.layers.{layer}."
A = "attention/"
CYCLE = 4                                                   # layers per scanned block
PATTERN = ("sliding_attention",) * 3 + ("full_attention",)  # MaxText's OLMO3_ATTENTION_PATTERN, by layer % 4
MAXTEXT_SLIDING_WINDOW = 4096
DEFAULT_THETA = 500000.0                                    # Olmo3Config's default_theta
ROPE_TYPES = ("default", "yarn")

LAYER = (
    row(A + "query/kernel", P + "self_attn.q_proj.weight", "E,N,D", "N*D,E", "transpose"),
    row(A + "key/kernel", P + "self_attn.k_proj.weight", "E,K,D", "K*D,E", "transpose"),
    row(A + "value/kernel", P + "self_attn.v_proj.weight", "E,K,D", "K*D,E", "transpose"),
    row(A + "out/kernel", P + "self_attn.o_proj.weight", "N,D,E", "E,N*D", "transpose"),
    row(A + "query_norm/scale", P + "self_attn.q_norm.weight", "N*D", "N*D"),
    row(A + "key_norm/scale", P + "self_attn.k_norm.weight", "K*D", "K*D"),
    row("post_self_attention_layer_norm/scale", P + "post_attention_layernorm.weight", "E", "E"),
    row("mlp/wi_0/kernel", P + "mlp.gate_proj.weight", "E,F", "F,E", "transpose"),
    row("mlp/wi_1/kernel", P + "mlp.up_proj.weight", "E,F", "F,E", "transpose"),
    row("mlp/wo/kernel", P + "mlp.down_proj.weight", "F,E", "E,F", "transpose"),
    row("post_mlp_layer_norm/scale", P + "post_feedforward_layernorm.weight", "E", "E"),
)

def blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    """Unscanned: `decoder/layers_<i>`. Scanned: `decoder/layers/layers_<b>` holds HF layers b, b+4, b+8, ..."""
    if not scan:
        return uniform_blocks(LAYER, d["L"], False)
    if d["L"] % CYCLE:
        raise UnsupportedError(f"config.json has {d['L']} layers: scanned, MaxText's olmo3 stacks whole cycles of "
                               f"{CYCLE} layers (3 sliding + 1 global), so the count must be a multiple of {CYCLE}; "
                               "use --no-scan")
    return [Block(f"decoder/layers/layers_{b}", tuple(range(b, d["L"], CYCLE)), True, LAYER) for b in range(CYCLE)]


def layer_types(cfg: dict) -> list[str]:
    """Per layer "sliding_attention" or "full_attention": `layer_types`, else Olmo3Config's default (MaxText's)."""
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    return [PATTERN[i % CYCLE] for i in range(config_int(cfg, "num_hidden_layers"))]


def rope(cfg: dict) -> dict[str, dict]:
    """The RoPE parameters of "sliding_attention" and "full_attention" layers, as transformers >= 5 reads them.

    transformers 5's `rope_parameters` (one dict per layer type, or one for all), or the Hub's older spelling
    (`rope_theta`, and `rope_scaling` for the full-attention layers only). Each dict has `rope_type` and
    `rope_theta`, plus YaRN's keys when it is yarn.
    """
    params = cfg.get("rope_parameters") or {}
    if params and not set(params) <= {"full_attention", "sliding_attention"}:
        params = {kind: params for kind in ("full_attention", "sliding_attention")}
    theta = cfg.get("rope_theta", DEFAULT_THETA)
    legacy = {"full_attention": {"rope_theta": theta, **(cfg.get("rope_scaling") or {})},
              "sliding_attention": {"rope_theta": theta}}
    out = {}
    for kind in ("sliding_attention", "full_attention"):
        p = {**legacy[kind], **(params.get(kind) or {})}
        p["rope_type"] = p.get("rope_type", p.pop("type", "default")) or "default"
        p["rope_theta"] = float(p.get("rope_theta") or DEFAULT_THETA)
        out[kind] = p
    return out


def yarn_attention_factor(factor: float) -> float:
    """MaxText's YaRN attention scaling (rope_attention_scaling): 0.1 ln(factor) + 1, or 1 for factor <= 1."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def check_config(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    if cfg.get("attention_bias"):
        raise UnsupportedError("config.json sets attention_bias: MaxText's olmo3 has no q/k/v/o biases")
    if cfg.get("tie_word_embeddings"):
        raise UnsupportedError("config.json ties the embeddings: MaxText's olmo3 has an untied logits_dense")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedError(f"config.json hidden_act {cfg['hidden_act']!r}: MaxText's olmo3 MLP is SwiGLU (silu)")
    types = layer_types(cfg)
    want = [PATTERN[i % CYCLE] for i in range(len(types))]
    if len(types) != config_int(cfg, "num_hidden_layers"):
        raise UnsupportedError(f"config.json has {len(types)} layer_types for {cfg['num_hidden_layers']} layers")
    if types != want:
        bad = next(i for i, (a, b) in enumerate(zip(types, want, strict=True)) if a != b)
        raise UnsupportedError(f"config.json makes layer {bad} {types[bad]}: MaxText's olmo3 makes layer i global "
                               f"exactly when i mod {CYCLE} == {CYCLE - 1}")
    if "sliding_attention" in types and not cfg.get("sliding_window"):
        raise UnsupportedError("config.json has sliding_attention layers but no sliding_window")
    params = rope(cfg)
    for kind, p in params.items():
        if p["rope_type"] not in ROPE_TYPES:
            raise UnsupportedError(f"config.json asks for {p['rope_type']} RoPE on {kind} layers: MaxText's olmo3 "
                                   "has default and yarn RoPE only")
    notes = []
    full, sliding = params["full_attention"], params["sliding_attention"]
    if sliding != full and "sliding_attention" in types:
        notes.append(f"MaxText's olmo3 applies one RoPE to every layer: the full-attention layers' "
                     f"{full['rope_type']} RoPE (theta {full['rope_theta']:g}) runs on the sliding-window layers too, "
                     f"where this config (and transformers >= 5) has {sliding['rope_type']} RoPE "
                     f"(theta {sliding['rope_theta']:g}); the weights are the same, MaxText's logits are not")
    if full["rope_type"] == "yarn":
        factor = float(full.get("factor", 1.0))
        given = full.get("attention_factor")
        if given is not None and not math.isclose(float(given), yarn_attention_factor(factor), rel_tol=1e-6):
            notes.append(f"config.json sets YaRN attention_factor {given}; MaxText scales by 0.1 ln(factor) + 1 = "
                         f"{yarn_attention_factor(factor):.10g}")
        if full.get("truncate") is False:
            notes.append("config.json sets YaRN truncate false; MaxText's olmo3 configs set rope_truncate true")
    window = cfg.get("sliding_window")
    if "sliding_attention" in types and window != MAXTEXT_SLIDING_WINDOW:
        notes.append(f"config.json has sliding_window {window}; MaxText's olmo3 configs use {MAXTEXT_SLIDING_WINDOW}: "
                     "set sliding_window_size to match for identical logits")
    return notes


FAMILY = Family(
    name="olmo3", model_types=("olmo3",), dims=dims, top_rules=top_rules, blocks=blocks, check_config=check_config,
    reference_keys=("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                    "num_hidden_layers", "vocab_size", "tie_word_embeddings"),
    extra={"tied": lambda cfg: False, "layer_rules": LAYER, "top_table": TOP},
)
