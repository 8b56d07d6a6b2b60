"""Llama 4 text model (MaxText decoder_block llama4): Scout (llama4-17b-16e) and Maverick (llama4-17b-128e).

GQA attention with no biases and no conversion-time query scale or RoPE permutation (MaxText 0.2.5's llama4
conversion sets scale_query false: its llama4 attention scales at run time, and Hugging Face's complex-valued
RoPE already pairs adjacent dims as MaxText's does). Dense and MoE layers interleave: layer i is MoE when it is
in the config's `moe_layers` (every `interleave_moe_layer_step`-th, counting from step - 1: Scout every layer,
Maverick the odd ones). A MoE layer is `Llama4MoEBlock_0`: the router `gate/kernel (E, X)`, the routed experts
stored fused by HF as `feed_forward.experts.gate_up_proj (X, E, 2M)` whose first half of the last axis is the
gate (`wi_0`) and second half the up projection (`wi_1`) — two rules on complementary contiguous parts of one
tensor, read one expert at a time — `down_proj (X, M, E)` as `wo`, and one shared expert. A dense layer is a
SwiGLU `mlp` of width `intermediate_size_mlp`.

Scanned, MaxText groups the layers in fours (`inhomogeneous_layer_cycle_interval` 4, the period of the no-RoPE
layers, every fourth, and of the MoE interleave): `decoder/layers/layers_<b>/…`, scan index s holding HF layer
4s + b. Unscanned: `decoder/layers_<i>/…`. Chunked local attention (`attention_chunk_size`), the no-RoPE layers,
the query/key L2 norm and attention temperature tuning have no weights.

The released repos are multimodal (Llama4ForConditionalGeneration, model_type llama4): the text model's tensors
are `language_model.model.*` and `language_model.lm_head.weight`; only they are converted, the vision tower and
projector are left out (MaxText use_multimodal: false), and maxtext-to-hf writes a text-only Llama4ForCausalLM.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from ckpt_cli.errors import SourceError, UnsupportedError
from ckpt_cli.families.base import Block, Dims, Family, Part, attention_dims, config_int, row

P = "model.layers.{layer}."
MOE = "Llama4MoEBlock_0/"
GATE, UP = Part(-1, 0, 2, blocked=True), Part(-1, 1, 2, blocked=True)   # halves of gate_up_proj's last axis
CYCLE = 4                        # MaxText's inhomogeneous_layer_cycle_interval for both llama4 names
NOPE_INTERVAL = 4                # MaxText's nope_layer_interval: layer i has no RoPE when (i + 1) % 4 == 0
PREFIX = "language_model."       # the text model inside the released multimodal checkpoints

ATTENTION = (
    row("pre_self_attention_layer_norm/scale", P + "input_layernorm.weight", "E", "E"),
    row("post_self_attention_layer_norm/scale", P + "post_attention_layernorm.weight", "E", "E"),
    row("self_attention/query/kernel", P + "self_attn.q_proj.weight", "E,N,D", "N*D,E", "transpose"),
    row("self_attention/key/kernel", P + "self_attn.k_proj.weight", "E,K,D", "K*D,E", "transpose"),
    row("self_attention/value/kernel", P + "self_attn.v_proj.weight", "E,K,D", "K*D,E", "transpose"),
    row("self_attention/out/kernel", P + "self_attn.o_proj.weight", "N,D,E", "E,N*D", "transpose"),
)
DENSE = (
    row("mlp/wi_0/kernel", P + "feed_forward.gate_proj.weight", "E,F", "F,E", "transpose"),
    row("mlp/wi_1/kernel", P + "feed_forward.up_proj.weight", "E,F", "F,E", "transpose"),
    row("mlp/wo/kernel", P + "feed_forward.down_proj.weight", "F,E", "E,F", "transpose"),
)
MOE_MLP = (
    row(MOE + "MoeBlock_0/gate/kernel", P + "feed_forward.router.weight", "E,X", "X,E", "transpose"),
    row(MOE + "MoeBlock_0/wi_0", P + "feed_forward.experts.gate_up_proj", "E,M", "X,E,2*M", "", "X", GATE),
    row(MOE + "MoeBlock_0/wi_1", P + "feed_forward.experts.gate_up_proj", "E,M", "X,E,2*M", "", "X", UP),
    row(MOE + "MoeBlock_0/wo", P + "feed_forward.experts.down_proj", "M,E", "X,M,E", "", "X"),
    row(MOE + "shared_experts/wi_0/kernel", P + "feed_forward.shared_expert.gate_proj.weight", "E,M", "M,E",
        "transpose"),
    row(MOE + "shared_experts/wi_1/kernel", P + "feed_forward.shared_expert.up_proj.weight", "E,M", "M,E",
        "transpose"),
    row(MOE + "shared_experts/wo/kernel", P + "feed_forward.shared_expert.down_proj.weight", "M,E", "E,M",
        "transpose"),
)
DENSE_LAYER = (*ATTENTION, *DENSE)
MOE_LAYER = (*ATTENTION, *MOE_MLP)

TOP = (
    row("token_embedder/embedding", "model.embed_tokens.weight", "V,E", "V,E"),
    row("decoder/decoder_norm/scale", "model.norm.weight", "E", "E"),
    row("decoder/logits_dense/kernel", "lm_head.weight", "E,V", "V,E", "transpose"),
)


def model_config(cfg: dict) -> dict:
    """The text model's config: a multimodal `llama4` config gives its `text_config`, relabelled `llama4_text` /
    Llama4ForCausalLM (the model the MaxText checkpoint holds and what maxtext-to-hf writes back)."""
    if cfg.get("model_type") != "llama4":
        return cfg
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise SourceError("config.json (model_type llama4) has no text_config")
    out = {**text, "model_type": "llama4_text", "architectures": ["Llama4ForCausalLM"]}
    for key in ("torch_dtype", "dtype", "tie_word_embeddings"):
        if cfg.get(key) is not None and out.get(key) is None:
            out[key] = cfg[key]
    return out


def source_names(cfg: dict, names: Collection[str]) -> tuple[Callable[[str], str] | None, list[str]]:
    """(plan name -> file name, notes) for the released multimodal checkpoints; (None, []) for a text-only one."""
    if cfg.get("model_type") != "llama4":
        return None, []
    if not any(n.startswith(PREFIX + "model.layers.") for n in names):
        raise SourceError(f"multimodal llama4 config, but no text-model tensors in the files (expected "
                          f"{PREFIX}model.layers.*)")
    note = (f"multimodal llama4 source: only the language model ({PREFIX}*) is converted; the vision tower and "
            "projector are left out (MaxText use_multimodal: false), and maxtext-to-hf writes a text-only "
            "Llama4ForCausalLM")
    return (lambda name: PREFIX + name), [note]


def moe_layers(cfg: dict) -> list[int]:
    """The MoE layers: the config's `moe_layers`, else every `interleave_moe_layer_step`-th from step - 1."""
    layers = config_int(cfg, "num_hidden_layers")
    if cfg.get("moe_layers") is not None:
        return sorted(int(i) for i in cfg["moe_layers"])
    step = config_int(cfg, "interleave_moe_layer_step", 1)
    return list(range(step - 1, layers, step)) if step > 0 else []


def dims(cfg: dict) -> Dims:
    cfg = model_config(cfg)
    return attention_dims(cfg) | {"F": config_int(cfg, "intermediate_size_mlp"),
                                  "M": config_int(cfg, "intermediate_size"),
                                  "X": config_int(cfg, "num_local_experts")}


def top_rules(d: Dims, cfg: dict) -> tuple:
    return TOP


def blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    """Unscanned: one block per layer. Scanned: `decoder/layers/layers_<b>` holds HF layers b, b+4, b+8, ..."""
    moe = set(moe_layers(model_config(cfg)))
    layers = d["L"]
    rules = lambda i: MOE_LAYER if i in moe else DENSE_LAYER  # noqa: E731
    if not scan:
        return [Block(f"decoder/layers_{i}", (i,), False, rules(i)) for i in range(layers)]
    return [Block(f"decoder/layers/layers_{b}", tuple(range(b, layers, CYCLE)), True, rules(b)) for b in range(CYCLE)]


def check_config(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    cfg = model_config(cfg)
    if cfg.get("attention_bias"):
        raise UnsupportedError("config.json sets attention_bias: MaxText's llama4 has no q/k/v/o biases")
    if cfg.get("tie_word_embeddings"):
        raise UnsupportedError("config.json ties embeddings: MaxText's llama4 always has an untied logits_dense")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedError(f"config.json hidden_act {cfg['hidden_act']!r}: MaxText's llama4 MLP is SwiGLU (silu)")
    layers = config_int(cfg, "num_hidden_layers")
    if layers % CYCLE:
        raise UnsupportedError(f"config.json has {layers} layers: MaxText's llama4 repeats a cycle of {CYCLE} "
                               "layers, so the count must be a multiple of 4")
    moe = set(moe_layers(cfg))
    for i in range(layers):
        if (i in moe) != (i % CYCLE in moe):
            raise UnsupportedError(f"config.json makes layer {i} {'MoE' if i in moe else 'dense'} but layer "
                                   f"{i % CYCLE} {'MoE' if i % CYCLE in moe else 'dense'}: MaxText's llama4 repeats "
                                   f"its MoE/dense pattern every {CYCLE} layers")
    notes = []
    nope = cfg.get("no_rope_layers")
    want = [int((i + 1) % NOPE_INTERVAL != 0) for i in range(layers)]
    if nope is not None and [int(bool(v)) for v in nope] != want:
        notes.append("config.json's no_rope_layers is not every fourth layer: MaxText's llama4 (nope_layer_interval "
                     "4) skips RoPE on layers 3, 7, 11, ..., so its logits will differ")
    return notes


FAMILY = Family(
    name="llama4", model_types=("llama4_text", "llama4"), dims=dims, top_rules=top_rules, blocks=blocks,
    check_config=check_config,
    reference_keys=("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                    "intermediate_size_mlp", "num_hidden_layers", "vocab_size", "num_local_experts",
                    "interleave_moe_layer_step"),
    model_config=model_config, source_names=source_names,
    extra={"tied": lambda cfg: False},
)
