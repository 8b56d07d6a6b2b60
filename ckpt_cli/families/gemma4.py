"""Gemma 4 text (MaxText decoder_blocks gemma4: gemma4-26b, -31b; gemma4_small: gemma4-e2b, -e4b).

As MaxText 0.2.5's Gemma 4 conversion: the norms are copied (Gemma 4's RMSNorm multiplies by the stored weight,
no `1 + w`), the embedding table is multiplied by float32 sqrt(E) (MaxText does not scale it at run time and divides
the tied logits by sqrt(E)), the head is tied, and nothing is folded into the query (Gemma 4 attends with scale 1
after its q/k norms). Every kernel is a transpose; `layer_scalar` (1,) is copied.

Layers are local (sliding window, `head_dim` D, K kv heads) or global (`global_head_dim` DG, KG kv heads: Hugging
Face's `num_global_key_value_heads` when `attention_k_eq_v`, else K); transformers 5 writes both as a
`per_layer_config`. With `attention_k_eq_v` a global layer has no value projection (the key projection serves as
value), so MaxText has no `value/kernel` there.

gemma4 (26b, 31b): MaxText makes layer i global exactly when i mod 6 == 5. MoE layers (`enable_moe_block`, every
layer of 26b) hold a dense MLP, which MaxText calls the shared expert (`mlp/moe_block/shared_experts`), and routed
experts: router `proj` (X, E) -> `MoeBlock_0/gate/kernel` (E, X), `router.scale` -> `mlp/pre_forward_scale_2`,
`router.per_expert_scale` -> `MoeBlock_0/per_expert_scale`, the fused `experts.gate_up_proj` (X, 2M, E) whose
first M rows are the gate (`wi_0`, (X, E, M) after a per-expert transpose) and last M the up projection (`wi_1`),
`experts.down_proj` (X, E, M) -> `wo` (X, M, E), and three more norms. Scanned, MaxText 0.2.5 stacks blocks of
six: `decoder/scanned_blocks/local_layers` holds the five local layers of every block on axes 1 and 2 (block,
position: HF layer 6b + p) and `decoder/scanned_blocks/global_layer` the global one (HF layer 6b + 5) on axis 1;
the `L mod 6` leftover layers stay unstacked under `decoder/layers_remainder/layers_<r>`.

gemma4_small (e2b, e4b): per-layer embeddings (PLE: `embed_tokens_per_layer` (V, L*P), copied as is, MaxText scales
it by sqrt(P) at run time; `per_layer_model_projection` and `per_layer_projection_norm` under
`decoder/per_layer_embedder`, and per layer `per_layer_input_gate`, `per_layer_projection`,
`post_per_layer_input_norm`) and KV sharing: the last `num_kv_shared_layers` layers reuse the keys and values of
the last earlier layer of their kind and have no key/value projections or key norm; with `use_double_wide_mlp`
their MLP is twice as wide. MaxText 0.2.5 builds these unscanned only (its converter refuses scan_layers), so
`--scan` is refused. Global layers: every 5th (e2b) or 6th (e4b) layer, as the config's `layer_types` say.

The released repos are multimodal (Gemma4ForConditionalGeneration): the text model's tensors are
`model.language_model.*`; only they are converted (the vision and audio towers are left out, MaxText
use_multimodal: false), and maxtext-to-hf writes a text-only Gemma4ForCausalLM.
"""

from __future__ import annotations

from ckpt_cli.errors import SourceError, UnsupportedError
from ckpt_cli.families.base import Block, Dims, Family, Part, attention_dims, config_int, row
from ckpt_cli.families.gemma3 import TANH_GELU, multimodal_source_names

P = "model.layers.{layer}."
BLOCK = 6                    # gemma4 (26b, 31b): five local layers, then one global
SMALL_PERIODS = (5, 6)       # gemma4_small: e2b's pattern (4 local + 1 global), e4b's (5 + 1)
MOE = "mlp/moe_block/"
GATE, UP = Part(-2, 0, 2, blocked=True), Part(-2, 1, 2, blocked=True)   # halves of gate_up_proj's 2M axis

# Gemma4TextConfig's defaults (transformers 5): what a config may leave out (global_head_dim, 512 by default, is read
# in `global_dims`: transformers 5 writes it as per_layer_config, and the exported config should not carry both).
TEXT_DEFAULTS = {
    "vocab_size": 262144, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 30,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "attention_bias": False, "sliding_window": 512, "final_logit_softcapping": None,
    "use_bidirectional_attention": None, "vocab_size_per_layer_input": 262144, "hidden_size_per_layer_input": 256,
    "attention_k_eq_v": False, "num_kv_shared_layers": 0, "enable_moe_block": False, "use_double_wide_mlp": False,
}


def model_config(cfg: dict) -> dict:
    """The text model's config, Gemma4TextConfig's defaults filled in: a multimodal `gemma4` config gives its
    `text_config`, relabelled `gemma4_text` / Gemma4ForCausalLM (what the MaxText checkpoint holds)."""
    if cfg.get("model_type") == "gemma4":
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise SourceError("config.json (model_type gemma4) has no text_config")
        out = {**TEXT_DEFAULTS, **{k: v for k, v in text.items() if v is not None or k not in TEXT_DEFAULTS},
               "model_type": "gemma4_text", "architectures": ["Gemma4ForCausalLM"]}
        for key in ("torch_dtype", "dtype"):
            if cfg.get(key) is not None and out.get(key) is None:
                out[key] = cfg[key]
        return out
    return {**TEXT_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k not in TEXT_DEFAULTS}}


source_names = multimodal_source_names("gemma4", "vision and audio towers", "Gemma4ForCausalLM")


def layer_types(cfg: dict) -> list[str]:
    """Per layer "sliding_attention" or "full_attention" (`layer_types`, else transformers' default 5:1)."""
    cfg = model_config(cfg)
    layers = config_int(cfg, "num_hidden_layers")
    if cfg.get("layer_types"):
        types = list(cfg["layer_types"])
    else:
        types = ["sliding_attention" if (i + 1) % BLOCK else "full_attention" for i in range(layers)]
    if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
        raise UnsupportedError(f"config.json layer_types must name {layers} layers, each sliding_attention or "
                               "full_attention")
    return types


def is_small(cfg: dict) -> bool:
    """MaxText's gemma4_small block (per-layer embeddings): the E2B / E4B models."""
    return bool(model_config(cfg).get("hidden_size_per_layer_input"))


def global_dims(cfg: dict) -> tuple[int, int]:
    """(global head dim, global kv heads): transformers 5's `per_layer_config` of the full-attention layers, else
    `global_head_dim` and (with `attention_k_eq_v`) `num_global_key_value_heads`."""
    cfg = model_config(cfg)
    k = config_int(cfg, "num_key_value_heads", cfg.get("num_attention_heads"))
    per_layer = {int(key): v for key, v in (cfg.get("per_layer_config") or {}).items()}   # keys may be "05"
    full = [i for i, t in enumerate(layer_types(cfg)) if t == "full_attention"]
    if per_layer:
        found = {(int(v.get("head_dim", cfg["head_dim"])), int(v.get("num_key_value_heads", k)))
                 for key, v in per_layer.items() if key in full}
        if len(found) > 1 or any(i not in per_layer for i in full):
            raise UnsupportedError("config.json per_layer_config gives the full-attention layers different shapes: "
                                   "MaxText's gemma4 has one global head dim and kv head count")
        if found:
            return found.pop()
    dg = config_int(cfg, "global_head_dim", 512)
    kg = cfg.get("num_global_key_value_heads") if cfg.get("attention_k_eq_v") else None
    return dg, (config_int(cfg, "num_global_key_value_heads") if kg is not None else k)


def dims(cfg: dict) -> Dims:
    cfg = model_config(cfg)
    d = attention_dims(cfg) | {"F": config_int(cfg, "intermediate_size")}
    dg, kg = global_dims(cfg)
    d |= {"DG": dg, "KG": kg, "F2": 2 * d["F"]}
    if cfg.get("enable_moe_block"):
        d |= {"X": config_int(cfg, "num_experts"), "M": config_int(cfg, "moe_intermediate_size")}
    if is_small(cfg):
        d |= {"P": config_int(cfg, "hidden_size_per_layer_input"),
              "VP": config_int(cfg, "vocab_size_per_layer_input")}
    return d


def layer_rules(glob: bool, *, value: bool = True, kv: bool = True, moe: bool = False, mlp: str = "F",
                ple: bool = False) -> tuple:
    """One Gemma 4 decoder layer's rows: global (DG, KG) or local (D, K) attention; `value` False for a global
    layer whose key projection is its value (attention_k_eq_v); `kv` False for a KV-shared layer; routed experts
    beside the dense MLP (`moe`); the MLP width `mlp`; per-layer-embedding rows (`ple`)."""
    d, k = ("DG", "KG") if glob else ("D", "K")
    a = "self_attention/"
    rows = [
        row("pre_self_attention_norm/scale", P + "input_layernorm.weight", "E", "E"),
        row("post_self_attention_norm/scale", P + "post_attention_layernorm.weight", "E", "E"),
        row("pre_ffw_norm/scale", P + "pre_feedforward_layernorm.weight", "E", "E"),
        row("post_ffw_norm/scale", P + "post_feedforward_layernorm.weight", "E", "E"),
        row(a + "query/kernel", P + "self_attn.q_proj.weight", f"E,N,{d}", f"N*{d},E", "transpose"),
        row(a + "query_norm/scale", P + "self_attn.q_norm.weight", d, d),
        row(a + "out/kernel", P + "self_attn.o_proj.weight", f"N,{d},E", f"E,N*{d}", "transpose"),
        row("layer_scalar", P + "layer_scalar", "1", "1"),
    ]
    if kv:
        rows += [row(a + "key/kernel", P + "self_attn.k_proj.weight", f"E,{k},{d}", f"{k}*{d},E", "transpose"),
                 row(a + "key_norm/scale", P + "self_attn.k_norm.weight", d, d)]
        if value:
            rows.append(row(a + "value/kernel", P + "self_attn.v_proj.weight", f"E,{k},{d}", f"{k}*{d},E",
                            "transpose"))
    dense = MOE + "shared_experts/" if moe else "mlp/"
    rows += [
        row(dense + "wi_0/kernel", P + "mlp.gate_proj.weight", f"E,{mlp}", f"{mlp},E", "transpose"),
        row(dense + "wi_1/kernel", P + "mlp.up_proj.weight", f"E,{mlp}", f"{mlp},E", "transpose"),
        row(dense + "wo/kernel", P + "mlp.down_proj.weight", f"{mlp},E", f"E,{mlp}", "transpose"),
    ]
    if moe:
        x = MOE + "MoeBlock_0/"
        rows += [
            row("mlp/pre_feedforward_layernorm_2/scale", P + "pre_feedforward_layernorm_2.weight", "E", "E"),
            row("mlp/post_feedforward_layernorm_1/scale", P + "post_feedforward_layernorm_1.weight", "E", "E"),
            row("mlp/post_feedforward_layernorm_2/scale", P + "post_feedforward_layernorm_2.weight", "E", "E"),
            row("mlp/pre_forward_scale_2", P + "router.scale", "E", "E"),
            row(x + "gate/kernel", P + "router.proj.weight", "E,X", "X,E", "transpose"),
            row(x + "per_expert_scale", P + "router.per_expert_scale", "X", "X"),
            row(x + "wi_0", P + "experts.gate_up_proj", "E,M", "X,2*M,E", "transpose", "X", GATE),
            row(x + "wi_1", P + "experts.gate_up_proj", "E,M", "X,2*M,E", "transpose", "X", UP),
            row(x + "wo", P + "experts.down_proj", "M,E", "X,E,M", "transpose", "X"),
        ]
    if ple:
        rows += [
            row("per_layer_input_gate/kernel", P + "per_layer_input_gate.weight", "E,P", "P,E", "transpose"),
            row("per_layer_projection/kernel", P + "per_layer_projection.weight", "P,E", "E,P", "transpose"),
            row("post_per_layer_input_norm/scale", P + "post_per_layer_input_norm.weight", "E", "E"),
        ]
    return tuple(rows)


TOP = (
    row("token_embedder/embedding", "model.embed_tokens.weight", "V,E", "V,E", "embedding-scale-f32"),
    row("decoder/decoder_norm/scale", "model.norm.weight", "E", "E"),
)
PLE_TOP = (
    row("decoder/per_layer_embedder/embed_tokens_per_layer", "model.embed_tokens_per_layer.weight", "VP,L*P",
        "VP,L*P"),
    row("decoder/per_layer_embedder/per_layer_model_projection/kernel", "model.per_layer_model_projection.weight",
        "E,L*P", "L*P,E", "transpose"),
    row("decoder/per_layer_embedder/per_layer_projection_norm/scale", "model.per_layer_projection_norm.weight", "P",
        "P"),
)


def top_rules(d: Dims, cfg: dict) -> tuple:
    return (*TOP, *PLE_TOP) if is_small(cfg) else TOP


def first_shared(cfg: dict) -> int:
    """The first KV-shared layer (the layer count when none is)."""
    cfg = model_config(cfg)
    layers = config_int(cfg, "num_hidden_layers")
    shared = config_int(cfg, "num_kv_shared_layers", 0, minimum=0)
    return layers - shared if shared else layers


def rules_of(i: int, cfg: dict) -> tuple:
    """HF layer i's rows."""
    cfg = model_config(cfg)
    glob = layer_types(cfg)[i] == "full_attention"
    if is_small(cfg):
        shared = i >= first_shared(cfg)
        return layer_rules(glob, kv=not shared, mlp="F2" if shared and cfg.get("use_double_wide_mlp") else "F",
                           ple=True)
    return layer_rules(glob, value=not (glob and cfg.get("attention_k_eq_v")), moe=bool(cfg.get("enable_moe_block")))


def blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    """Unscanned: `decoder/layers_<i>`. Scanned (gemma4 only): `scanned_blocks/local_layers` (HF layer 6b + p at
    (b, p), p < 5), `scanned_blocks/global_layer` (HF layer 6b + 5 at b) and the unstacked remainder."""
    layers = d["L"]
    if not scan:
        return [Block(f"decoder/layers_{i}", (i,), False, rules_of(i, cfg)) for i in range(layers)]
    if is_small(cfg):
        raise UnsupportedError("gemma4 E2B/E4B (per-layer embeddings, KV sharing) convert unscanned only, as "
                               "MaxText 0.2.5 builds them (scan_layers=false): use --no-scan")
    reps = layers // BLOCK
    out = []
    if reps:
        local = tuple(BLOCK * b + p for b in range(reps) for p in range(BLOCK - 1))
        out += [Block("decoder/scanned_blocks/local_layers", local, True, rules_of(0, cfg), inner=BLOCK - 1),
                Block("decoder/scanned_blocks/global_layer", tuple(BLOCK * b + BLOCK - 1 for b in range(reps)), True,
                      rules_of(BLOCK - 1, cfg))]
    out += [Block(f"decoder/layers_remainder/layers_{r}", (BLOCK * reps + r,), False, rules_of(BLOCK * reps + r, cfg))
            for r in range(layers - BLOCK * reps)]
    return out


def check_config(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    cfg = model_config(cfg)
    if cfg.get("attention_bias"):
        raise UnsupportedError("config.json sets attention_bias: Gemma 4 in MaxText has no q/k/v/o biases")
    if cfg.get("use_bidirectional_attention") == "all":
        raise UnsupportedError("config.json sets use_bidirectional_attention 'all': MaxText's gemma4 text model is "
                               "causal")
    if not cfg.get("tie_word_embeddings", True):
        raise UnsupportedError("config.json unties the embeddings: MaxText's gemma4 has no logits_dense (logits "
                               "come from the embedding table)")
    if cfg.get("hidden_activation") not in TANH_GELU:
        raise UnsupportedError(f"config.json has hidden_activation {cfg.get('hidden_activation')!r}: MaxText's "
                               "gemma4 uses the tanh approximation of gelu")
    types = layer_types(cfg)
    small = is_small(cfg)
    if small:
        if cfg.get("enable_moe_block") or cfg.get("attention_k_eq_v"):
            raise UnsupportedError("config.json combines per-layer embeddings with "
                                   f"{'enable_moe_block' if cfg.get('enable_moe_block') else 'attention_k_eq_v'}: "
                                   "MaxText's gemma4_small (E2B/E4B) has neither")
        wants = {period: ["full_attention" if i % period == period - 1 else "sliding_attention"
                          for i in range(len(types))] for period in SMALL_PERIODS}
        if types not in wants.values():
            raise UnsupportedError("config.json layer_types: MaxText's gemma4_small makes every 5th (E2B) or 6th "
                                   "(E4B) layer global, nothing else")
        if first_shared(cfg) < len(types) and set(types[first_shared(cfg):]) - set(types[:first_shared(cfg)]):
            raise UnsupportedError("config.json shares KV into a layer kind no earlier layer computes")
    else:
        if config_int(cfg, "num_kv_shared_layers", 0, minimum=0):
            raise UnsupportedError("config.json shares KV across layers without per-layer embeddings: MaxText's "
                                   "gemma4 (26b/31b) block has no KV sharing")
        want = ["full_attention" if i % BLOCK == BLOCK - 1 else "sliding_attention" for i in range(len(types))]
        if types != want:
            bad = next(i for i, (a, b) in enumerate(zip(types, want, strict=True)) if a != b)
            raise UnsupportedError(f"config.json makes layer {bad} {types[bad]}: MaxText's gemma4 makes layer i "
                                   "global exactly when i mod 6 == 5")
    return _maxtext_notes(cfg, small)


# What MaxText 0.2.5's configs/models/gemma4-*.yml fix at run time: a config that differs converts the same, but
# MaxText computes other logits unless its settings are changed to match.
MAXTEXT_RUNTIME = {"vocab_size": (262144, "vocab_size"), "final_logit_softcapping": (30.0, "final_logits_soft_cap")}
MAXTEXT_ROPE = {"sliding_attention": (10_000.0, 1.0), "full_attention": (1_000_000.0, 0.25)}


def _maxtext_notes(cfg: dict, small: bool) -> list[str]:
    notes = []
    window = 512 if small else 1024
    if cfg.get("sliding_window") != window:
        notes.append(f"config.json has sliding_window {cfg.get('sliding_window')}; MaxText's gemma4"
                     f"{'_small' if small else ''} configs use {window}: set sliding_window_size to match")
    for key, (value, setting) in MAXTEXT_RUNTIME.items():
        if cfg.get(key) != value:
            notes.append(f"config.json has {key} {cfg.get(key)}; MaxText's gemma4 configs use {value:g}: set "
                         f"{setting} to match")
    for kind, (theta, fraction) in rope(cfg).items():
        if (theta, fraction) != MAXTEXT_ROPE[kind]:
            notes.append(f"config.json gives {kind} layers RoPE theta {theta:g} over {fraction:g} of the head; "
                         f"MaxText's gemma4 configs use {MAXTEXT_ROPE[kind][0]:g} over {MAXTEXT_ROPE[kind][1]:g}: set "
                         f"{'local' if kind == 'sliding_attention' else 'global'}_rope_max_timescale / "
                         f"_rope_proportion to match")
    if cfg.get("enable_moe_block") and cfg.get("top_k_experts") != 8:
        notes.append(f"config.json routes to top_k_experts {cfg.get('top_k_experts')}; MaxText's gemma4-26b uses 8: "
                     "set num_experts_per_tok to match")
    return notes


def rope(cfg: dict) -> dict[str, tuple[float, float]]:
    """(theta, rotated fraction) for "sliding_attention" and "full_attention" layers: MaxText's gemma4 rotates all
    of a local head (default RoPE) and a fraction of a global one (proportional RoPE, Gemma 4's layout)."""
    cfg = model_config(cfg)
    params = cfg.get("rope_parameters") or {}
    defaults = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1_000_000.0}}
    out = {}
    for kind in ("sliding_attention", "full_attention"):
        p = params.get(kind) or defaults[kind]
        rope_type = p.get("rope_type", "default")
        if rope_type not in ("default", "proportional") or float(p.get("factor", 1.0)) != 1.0:
            raise UnsupportedError(f"config.json asks for {rope_type} RoPE (factor {p.get('factor', 1.0)}) on "
                                   f"{kind} layers: MaxText's gemma4 has default and proportional RoPE, unscaled")
        fraction = float(p.get("partial_rotary_factor", 1.0)) if rope_type == "proportional" else 1.0
        out[kind] = (float(p.get("rope_theta", 10_000.0)), fraction)
    return out


_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
         "num_hidden_layers", "vocab_size", "num_experts", "moe_intermediate_size", "hidden_size_per_layer_input",
         "num_kv_shared_layers")

FAMILY = Family(
    name="gemma4", model_types=("gemma4_text", "gemma4"), dims=dims, top_rules=top_rules, blocks=blocks,
    check_config=check_config, reference_keys=_KEYS, model_config=model_config, source_names=source_names,
    extra={"tied": lambda cfg: True, "layer_rules": layer_rules(False, moe=True, ple=True) + layer_rules(True),
           "top_table": (*TOP, *PLE_TOP)},
)
