"""Gemma and Gemma 2 (MaxText decoder_blocks gemma and gemma2): Gemma3's rows (families/gemma3.py), generalised.

Both: every RMSNorm weight gets `+1` (stored float32, as 0.2.5's hook promotes it), the head is tied (no
`logits_dense`), the embedding table is multiplied by float32 sqrt(E) (0.2.5's gemma2 hook; Gemma3's rounds to
bf16) and padded with zero rows to MaxText's vocabulary: MaxText's configs give 256128 rows for HF's 256000, so
ckpt appends the same 128 zero rows to any vocabulary (`pad-rows`, VP = V + 128); maxtext-to-hf keeps the first V
rows and drops the rest, whatever they hold (as 0.2.5's to_huggingface does). The query kernel carries the
attention scale, which MaxText's gemma/gemma2 attention does not apply at run time: 1/sqrt(head_dim) for Gemma
(`query-scale`), `query_pre_attn_scalar ** -0.5` for Gemma 2 (`query-pre-attn-scale`; 0.2.5's to_maxtext uses
1/sqrt(head_dim), the same for 2b and 9b but not for 27b, whose released scalar is 144 with head_dim 128: ckpt
folds what the HF model computes, as 0.2.5's standalone Gemma 2 converter does).

Gemma: no post norms; HF's `post_attention_layernorm` is the norm before the MLP (MaxText `pre_ffw_norm`).
Gemma 2: every MaxText layer holds two HF layers, a local (sliding-window, HF layer 2i) one and a global (HF
layer 2i + 1) one, with `_local` / `_global` leaf names; scanned, both stack under `decoder/layers` (scan index i
holds HF layers 2i and 2i + 1), unscanned they share `decoder/layers_<i>`.
"""

from __future__ import annotations

from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families.base import Block, Dims, Family, attention_dims, config_int, row, uniform_blocks
from ckpt_cli.families.gemma3 import NORM, TANH_GELU, layer_rules

MAXTEXT_VOCAB = 256128           # MaxText's gemma / gemma2 configs
RELEASE_VOCAB = 256000           # the HF releases
VOCAB_PAD = MAXTEXT_VOCAB - RELEASE_VOCAB
MAXTEXT_SLIDING_WINDOW = 4096
MAXTEXT_SOFT_CAPS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
DEFAULT_THETA = 10_000.0

TOP = (
    row("token_embedder/embedding", "model.embed_tokens.weight", "VP,E", "V,E", "embedding-scale-f32, pad-rows"),
    row("decoder/decoder_norm/scale", "model.norm.weight", "E", "E", NORM, dtype="f32"),
)
GEMMA_LAYER = layer_rules(qk_norm=False, post_norms=False, query_steps=", query-scale")
LOCAL = layer_rules("_local", qk_norm=False, query_steps=", query-pre-attn-scale")
GLOBAL = layer_rules("_global", qk_norm=False, query_steps=", query-pre-attn-scale")


def activation(cfg: dict) -> str | None:
    """The MLP activation a config names (Gemma 2 spells it hidden_activation; Gemma hidden_act)."""
    return cfg.get("hidden_activation") or cfg.get("hidden_act")


def padded_vocab(vocab: int) -> int:
    return vocab + VOCAB_PAD


def gemma_dims(cfg: dict) -> Dims:
    d = attention_dims(cfg)
    return d | {"F": config_int(cfg, "intermediate_size"), "VP": padded_vocab(d["V"])}


def gemma2_dims(cfg: dict) -> Dims:
    d = gemma_dims(cfg)
    scalar = float(cfg.get("query_pre_attn_scalar") or d["D"])
    if scalar <= 0 or scalar != int(scalar):
        raise UnsupportedError(f"config.json sets query_pre_attn_scalar {scalar}: expected a positive integer")
    return d | {"Q": int(scalar)}


def top_rules(d: Dims, cfg: dict) -> tuple:
    return TOP


def gemma_blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    return uniform_blocks(GEMMA_LAYER, d["L"], scan)


def gemma2_blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    """Local rows read HF layers 0, 2, 4...; global rows HF layers 1, 3, 5...; both under one MaxText layer."""
    pairs = d["L"] // 2
    local, glob = tuple(range(0, 2 * pairs, 2)), tuple(range(1, 2 * pairs, 2))
    if scan:
        return [Block("decoder/layers", local, True, LOCAL), Block("decoder/layers", glob, True, GLOBAL)]
    return [b for i in range(pairs) for b in (Block(f"decoder/layers_{i}", (2 * i,), False, LOCAL),
                                               Block(f"decoder/layers_{i}", (2 * i + 1,), False, GLOBAL))]


def layer_types(cfg: dict) -> list[str]:
    """Gemma 2's per-layer kinds: `layer_types`, else transformers' default (even layers slide)."""
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    layers = config_int(cfg, "num_hidden_layers")
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]


def rope_theta(cfg: dict) -> float:
    """The one RoPE theta of every layer (default RoPE only, as MaxText's gemma/gemma2)."""
    params = cfg.get("rope_parameters") or {}
    if params and all(k in ("full_attention", "sliding_attention") for k in params):
        thetas = {float((params.get(k) or {}).get("rope_theta", DEFAULT_THETA)) for k in params}
        kinds = [(params.get(k) or {}) for k in params]
    else:
        thetas = {float(params.get("rope_theta", cfg.get("rope_theta") or DEFAULT_THETA))}
        kinds = [params, cfg.get("rope_scaling") or {}]
    for p in kinds:
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedError(f"config.json asks for {rope_type} RoPE: MaxText's gemma/gemma2 have default "
                                   "RoPE only")
    if len(thetas) != 1:
        raise UnsupportedError(f"config.json gives local and global layers different RoPE thetas {sorted(thetas)}: "
                               "MaxText's gemma2 uses one")
    return thetas.pop()


def _common_checks(cfg: dict, name: str) -> list[str]:
    if cfg.get("attention_bias"):
        raise UnsupportedError(f"config.json sets attention_bias: {name} in MaxText has no q/k/v/o biases")
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedError(f"config.json sets use_bidirectional_attention: MaxText's {name} is causal")
    if not cfg.get("tie_word_embeddings", True):
        raise UnsupportedError(f"config.json unties the embeddings: MaxText's {name} has no logits_dense "
                               "(logits come from the embedding table)")
    if activation(cfg) not in (*TANH_GELU, "gelu"):
        raise UnsupportedError(f"config.json has activation {activation(cfg)!r}: MaxText's {name} uses the tanh "
                               "approximation of gelu")
    rope_theta(cfg)
    notes = []
    vocab = config_int(cfg, "vocab_size")
    if vocab == RELEASE_VOCAB:
        notes.append(f"embedding padded from {vocab} to {padded_vocab(vocab)} rows (MaxText's {name} vocab_size "
                     f"{MAXTEXT_VOCAB}): the {VOCAB_PAD} added rows are zeros, and maxtext-to-hf drops them")
    else:
        notes.append(f"config.json has vocab_size {vocab}; MaxText's {name} configs pad 256000 to {MAXTEXT_VOCAB}: "
                     f"ckpt appends the same {VOCAB_PAD} zero rows ({padded_vocab(vocab)}), so set vocab_size "
                     f"{padded_vocab(vocab)} in MaxText")
    if rope_theta(cfg) != DEFAULT_THETA:
        notes.append(f"config.json has RoPE theta {rope_theta(cfg):g}; MaxText's {name} configs use "
                     f"{DEFAULT_THETA:g}: set rope_max_timescale to match")
    return notes


def gemma_check(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    return _common_checks(cfg, "gemma")


def gemma2_check(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    layers = config_int(cfg, "num_hidden_layers")
    if layers % 2:
        raise UnsupportedError(f"config.json has {layers} layers: MaxText's gemma2 pairs a local and a global "
                               "layer, so the count must be even")
    types = layer_types(cfg)
    want = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if types != want:
        bad = next((i for i, (a, b) in enumerate(zip(types, want, strict=False)) if a != b), len(types))
        raise UnsupportedError(f"config.json makes layer {bad} {types[bad] if bad < len(types) else 'missing'}: "
                               "MaxText's gemma2 makes even layers local (sliding) and odd layers global")
    gemma2_dims(cfg)
    notes = _common_checks(cfg, "gemma2")
    for key, value in MAXTEXT_SOFT_CAPS.items():
        if cfg.get(key) != value:
            notes.append(f"config.json has {key} {cfg.get(key)}; MaxText's gemma2 configs use {value}: set "
                         f"{'attn_logits_soft_cap' if key.startswith('attn') else 'final_logits_soft_cap'} to match")
    if cfg.get("sliding_window") != MAXTEXT_SLIDING_WINDOW:
        notes.append(f"config.json has sliding_window {cfg.get('sliding_window')}; MaxText's gemma2 configs use "
                     f"{MAXTEXT_SLIDING_WINDOW}: set sliding_window_size to match")
    d = gemma2_dims(cfg)
    if d["Q"] != d["D"]:
        notes.append(f"query kernels scaled by query_pre_attn_scalar {d['Q']} ** -0.5, what the HF model computes "
                     "(MaxText's gemma2 applies no query scale at run time), both ways; MaxText 0.2.5's to_maxtext "
                     f"folds head_dim {d['D']} ** -0.5 instead, so its checkpoints attend differently from the HF "
                     "model")
    return notes


_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
         "num_hidden_layers", "vocab_size")

FAMILY = Family(
    name="gemma", model_types=("gemma",), dims=gemma_dims, top_rules=top_rules, blocks=gemma_blocks,
    check_config=gemma_check, reference_keys=_KEYS,
    extra={"tied": lambda cfg: True, "layer_rules": GEMMA_LAYER, "top_table": TOP},
)
FAMILY2 = Family(
    name="gemma2", model_types=("gemma2",), dims=gemma2_dims, top_rules=top_rules, blocks=gemma2_blocks,
    check_config=gemma2_check, reference_keys=(*_KEYS, "query_pre_attn_scalar"),
    extra={"tied": lambda cfg: True, "layer_rules": LOCAL + GLOBAL, "top_table": TOP},
)
