"""Gemma3 text (MaxText decoder_block gemma3): maxtext-layout.md §9.

Every RMSNorm weight gets `+1` (MaxText multiplies by the stored scale, HF by `1 + w`; the sum is stored
float32 whatever the output dtype, §3.4), the embedding table is multiplied by `bf16(sqrt(E))` (MaxText
does not scale embeddings at run time, §1.5) and the head is tied (no `logits_dense`). No query scaling,
no RoPE permutation. Scanned, layers go in blocks of six: `decoder/layers/layers_<b>` holds HF layers
`6s + b` on axis 1, and the `L mod 6` leftover layers stay unstacked under `decoder/layers_remainder/`.

A multimodal `gemma3` checkpoint (Gemma3ForConditionalGeneration) converts its language model only: the
plan is the one of its `text_config` read as a `gemma3_text` model, and the HF names are looked up under
whichever text prefix its files use (`language_model.model.` in the Hub's saves, `model.language_model.`
in transformers 5's); the vision tower and projector are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from ckpt_cli.errors import SourceError, UnsupportedError
from ckpt_cli.families.base import Block, Dims, Family, attention_dims, config_int, row, uniform_blocks

P = "model.layers.{layer}."
NORM = "offset+1"
BLOCK = 6                     # MaxText's attention pattern: five local layers, then one global
MAXTEXT_VOCAB = 262144
MAXTEXT_SLIDING_WINDOW = 1024



def layer_rules(suffix: str = "", qk_norm: bool = True, post_norms: bool = True, query_steps: str = "") -> tuple:
    """One Gemma decoder layer's rows, shared by gemma (no post norms, the HF `post_attention_layernorm` is the
    pre-FFW norm), gemma2 (`suffix` `_local` / `_global`, query scaled) and gemma3 (q/k norms)."""
    a = f"self_attention{suffix}/"
    pre_ffw = P + ("pre_feedforward_layernorm.weight" if post_norms else "post_attention_layernorm.weight")
    rows = [
        row(f"pre_self_attention_norm{suffix}/scale", P + "input_layernorm.weight", "E", "E", NORM, dtype="f32"),
        row(a + "query/kernel", P + "self_attn.q_proj.weight", "E,N,D", "N*D,E", "transpose" + query_steps),
        row(a + "key/kernel", P + "self_attn.k_proj.weight", "E,K,D", "K*D,E", "transpose"),
        row(a + "value/kernel", P + "self_attn.v_proj.weight", "E,K,D", "K*D,E", "transpose"),
    ]
    if qk_norm:
        rows += [row(a + "query_norm/scale", P + "self_attn.q_norm.weight", "D", "D", NORM, dtype="f32"),
                 row(a + "key_norm/scale", P + "self_attn.k_norm.weight", "D", "D", NORM, dtype="f32")]
    rows.append(row(a + "out/kernel", P + "self_attn.o_proj.weight", "N,D,E", "E,N*D", "transpose"))
    if post_norms:
        rows.append(row(f"post_self_attention_norm{suffix}/scale", P + "post_attention_layernorm.weight", "E", "E",
                        NORM, dtype="f32"))
    m = f"mlp{suffix}/"
    rows += [
        row(f"pre_ffw_norm{suffix}/scale", pre_ffw, "E", "E", NORM, dtype="f32"),
        row(m + "wi_0/kernel", P + "mlp.gate_proj.weight", "E,F", "F,E", "transpose"),
        row(m + "wi_1/kernel", P + "mlp.up_proj.weight", "E,F", "F,E", "transpose"),
        row(m + "wo/kernel", P + "mlp.down_proj.weight", "F,E", "E,F", "transpose"),
    ]
    if post_norms:
        rows.append(row(f"post_ffw_norm{suffix}/scale", P + "post_feedforward_layernorm.weight", "E", "E", NORM,
                        dtype="f32"))
    return tuple(rows)


LAYER = layer_rules()
TOP = (
    row("token_embedder/embedding", "model.embed_tokens.weight", "V,E", "V,E", "embedding-scale"),
    row("decoder/decoder_norm/scale", "model.norm.weight", "E", "E", NORM, dtype="f32"),
)

# Gemma3TextConfig's defaults (transformers): the Hub's multimodal configs give only what differs from them.
TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096, "tie_word_embeddings": True,
    "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False,
}
DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
# Text prefixes of multimodal saves, in the order they are tried: transformers 5, then the Hub's files.
MULTIMODAL_PREFIXES = ("model.language_model.", "language_model.model.")
TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_tanh")


def model_config(cfg: dict) -> dict:
    """The text model's config with Gemma3TextConfig's defaults filled in.

    A multimodal `gemma3` config gives its `text_config`, relabelled `gemma3_text` / Gemma3ForCausalLM:
    that is the model the MaxText checkpoint holds and what maxtext-to-hf writes back.
    """
    if cfg.get("model_type") == "gemma3":
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise SourceError("config.json (model_type gemma3) has no text_config")
        out = {**TEXT_DEFAULTS, **text, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}
        for key in ("torch_dtype", "dtype"):
            if cfg.get(key) is not None and out.get(key) is None:
                out[key] = cfg[key]
        return out
    return {**TEXT_DEFAULTS, **cfg}


def multimodal_source_names(model_type: str, left_out: str, text_class: str):
    """A family's `source_names` for its multimodal releases (config `model_type`): the language model's tensors,
    under one of MULTIMODAL_PREFIXES, read as a text model's; `left_out` names the towers skipped (said in a note)."""

    def source_names(cfg: dict, names: Collection[str]) -> tuple[Callable[[str], str] | None, list[str]]:
        """(plan name -> file name, notes) for a multimodal source; (None, []) for a text-only one."""
        if cfg.get("model_type") != model_type:
            return None, []
        for prefix in MULTIMODAL_PREFIXES:
            if any(n.startswith(prefix + "layers.") for n in names):
                note = (f"multimodal {model_type} source: only the language model ({prefix}*) is converted; the "
                        f"{left_out} are left out (MaxText use_multimodal: false), and maxtext-to-hf writes a "
                        f"text-only {text_class}")
                return (lambda name, p=prefix: p + name.removeprefix("model.")), [note]
        raise SourceError(f"multimodal {model_type} config, but no text-model tensors in the files (expected "
                          f"{' or '.join(p + 'layers.*' for p in MULTIMODAL_PREFIXES)})")

    return source_names


source_names = multimodal_source_names("gemma3", "vision tower and projector", "Gemma3ForCausalLM")


def dims(cfg: dict) -> Dims:
    cfg = model_config(cfg)
    return attention_dims(cfg) | {"F": config_int(cfg, "intermediate_size")}


def top_rules(d: Dims, cfg: dict) -> tuple:
    return TOP


def blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    """Unscanned: `decoder/layers_<i>`. Scanned: six stacked blocks (HF layer 6s + b at scan index s) and the
    unstacked remainder (`layers_remainder/layers_<r>` is HF layer 6*floor(L/6) + r)."""
    layers = d["L"]
    if not scan:
        return uniform_blocks(LAYER, layers, False)
    reps = layers // BLOCK
    out = [Block(f"decoder/layers/layers_{b}", tuple(BLOCK * s + b for s in range(reps)), True, LAYER)
           for b in range(BLOCK) if reps]
    out += [Block(f"decoder/layers_remainder/layers_{r}", (BLOCK * reps + r,), False, LAYER)
            for r in range(layers - BLOCK * reps)]
    return out


def layer_types(cfg: dict) -> list[str]:
    """Per layer "sliding_attention" or "full_attention": `layer_types`, else from `sliding_window_pattern`."""
    cfg = model_config(cfg)
    layers = config_int(cfg, "num_hidden_layers")
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    pattern = int(cfg.get("sliding_window_pattern") or BLOCK)
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]


def rope(cfg: dict) -> dict[str, tuple[float, float]]:
    """(theta, linear factor) for "sliding_attention" and "full_attention" layers.

    Reads transformers 5's `rope_parameters` (one dict per layer type) and the older spelling (`rope_theta`
    and `rope_scaling` for global layers, `rope_local_base_freq` for local ones). Only default and linear
    RoPE exist in MaxText's gemma3.
    """
    cfg = model_config(cfg)
    params = cfg.get("rope_parameters") or {}
    if params and not all(k in ("full_attention", "sliding_attention") for k in params):
        params = {"full_attention": params}          # one dict for every layer: what the global layers use
    legacy = {
        "full_attention": {"rope_theta": cfg.get("rope_theta"), **(cfg.get("rope_scaling") or {})},
        "sliding_attention": {"rope_theta": cfg.get("rope_local_base_freq")},
    }
    out = {}
    for kind in ("sliding_attention", "full_attention"):
        p = {k: v for k, v in legacy[kind].items() if v is not None} | dict(params.get(kind) or {})
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise UnsupportedError(f"config.json asks for {rope_type} RoPE on {kind} layers: MaxText's gemma3 "
                                   "has default and linear RoPE only")
        factor = float(p.get("factor", 1.0)) if rope_type == "linear" else 1.0
        if kind == "sliding_attention" and factor != 1.0:
            raise UnsupportedError("config.json scales RoPE on the local (sliding) layers: MaxText's gemma3 "
                                   "scales the global layers only")
        out[kind] = (float(p.get("rope_theta", DEFAULT_THETA[kind])), factor)
    return out


def check_config(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    cfg = model_config(cfg)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise UnsupportedError(f"config.json sets {key} {cfg[key]}: MaxText's gemma3 has no soft-capping")
    if cfg.get("attention_bias"):
        raise UnsupportedError("config.json sets attention_bias: Gemma3 in MaxText has no q/k/v/o biases")
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedError("config.json sets use_bidirectional_attention: MaxText's gemma3 is causal")
    if not cfg.get("tie_word_embeddings", True):
        raise UnsupportedError("config.json unties the embeddings: MaxText's gemma3 has no logits_dense "
                               "(logits come from the embedding table)")
    types = layer_types(cfg)
    want = ["full_attention" if i % BLOCK == BLOCK - 1 else "sliding_attention" for i in range(len(types))]
    if types != want:
        bad = next(i for i, (a, b) in enumerate(zip(types, want, strict=True)) if a != b)
        raise UnsupportedError(f"config.json makes layer {bad} {types[bad]}: MaxText's gemma3 makes layer i global "
                               "exactly when i mod 6 == 5")
    rope(cfg)
    notes = []
    if cfg.get("hidden_activation") not in TANH_GELU:
        notes.append(f"config.json has hidden_activation {cfg.get('hidden_activation')!r}; MaxText's gemma3 uses "
                     "the tanh approximation of gelu (gelu_pytorch_tanh)")
    if cfg.get("sliding_window") != MAXTEXT_SLIDING_WINDOW:
        notes.append(f"config.json has sliding_window {cfg.get('sliding_window')}; MaxText's gemma3 configs use "
                     f"{MAXTEXT_SLIDING_WINDOW}: set sliding_window_size to match for identical logits")
    if int(cfg["vocab_size"]) != MAXTEXT_VOCAB:
        notes.append(f"config.json has vocab_size {cfg['vocab_size']}; MaxText's gemma3 configs use "
                     f"{MAXTEXT_VOCAB}: set vocab_size to match the embedding table")
    return notes


FAMILY = Family(
    name="gemma3", model_types=("gemma3_text", "gemma3"), dims=dims, top_rules=top_rules, blocks=blocks,
    check_config=check_config,
    reference_keys=("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                    "num_hidden_layers", "query_pre_attn_scalar"),   # vocab: the -it releases have 262208
    model_config=model_config, source_names=source_names,
    extra={"tied": lambda cfg: True, "layer_rules": LAYER, "top_table": TOP},
)
