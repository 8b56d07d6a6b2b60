"""Qwen3.5 MoE (MaxText decoder_block qwen3_5): Qwen3-Next's layers, with HF's split DeltaNet projections.

The language model of Qwen/Qwen3.5-35B-A3B and Qwen/Qwen3.5-397B-A17B. MaxText 0.2.5's qwen3_5 layers are its
Qwen3-Next ones (models/qwen3_5.py subclasses them), so every tensor maps as in `qwen3_next` (transposes, the conv
kernel's axes reversed, norms copied, no offset folded: both sides compute `x * (1 + w)`), except the gated DeltaNet's
input projections, which HF (transformers' `qwen3_5_moe`) splits where MaxText keeps one fused kernel. What 0.2.5's
converter does (checkpoint_conversion/utils/param_mapping.py, QWEN3_5_*: `concat_qkvz_and_transpose`,
`concat_ba_and_transpose`), and so ckpt, as a `Join` of row ranges (each moved alone, transposed):

- `linear_attn.in_proj_qkv` (2·HK·DK + HV·DV, E) rows [q | k | v], and `in_proj_z` (HV·DV, E) ->
  `attention/in_proj_qkvz/kernel` (E, 2·HK·DK + 2·HV·DV) per key head h: [q_h (DK), k_h (DK), v_h (V·DV), z_h (V·DV)],
  V = HV / HK value heads per key head (Qwen3-Next's own fused order);
- `in_proj_b`, `in_proj_a` (HV, E) -> `attention/in_proj_ba/kernel` (E, 2·HV) per key head: [b_h (V), a_h (V)].

The MRoPE of the release (`mrope_section`, interleaved) is plain partial RoPE for text (one position per token), as
MaxText's Qwen3OmniMoeThinkerTextRotaryEmbedding computes it for 2-D positions.

The releases are multimodal (`Qwen3_5MoeForConditionalGeneration`, model_type `qwen3_5_moe`): the text model's
tensors are `model.language_model.*` (and `lm_head.weight`); the vision tower (`model.visual.*`) and the MTP layer
(`mtp.*`) are not converted (MaxText use_multimodal: false; 0.2.5 converts no MTP layer), and maxtext-to-hf writes
the text model (`Qwen3_5MoeForCausalLM`, `model.*`). A text-only source (`qwen3_5_moe_text`) converts as it is.

fp8 (`--dtype fp8`, MaxText 0.2.5's qwen3.5-35b-a3b-fp8 and qwen3.5-397b-a17b-fp8: `weight_dtype: float8_e4m3fn`,
`weight_block_size: 128`, `unquantized_modules` as `FP8_TREE`): the releases' block-scaled e4m3 weights are kept, each
with `<leaf>_scale` (float32 in 0.2.5's tree; the source's own scale dtype is kept) = HF `weight_scale_inv`, the
same numbers (both multiply). Each scale gets its kernel's transform at block granularity: q/k/v `reshape_kernel`
(transpose, then (E/128, heads, head_dim/128): heads < 128 stay whole), `o_proj`, `out_proj`, the shared expert and
every routed expert a transpose, `in_proj_qkvz` the same per-key-head join of in_proj_qkv's and in_proj_z's scale
rows (q, k, v, z blocks of each key head: 0.2.5's `concat_qkvz_scales_and_transpose`). bf16: embedding, head, norms,
router, shared-expert gate, conv1d, in_proj_ba, A_log, dt_bias (the releases keep those unquantized too).

Scanned, MaxText 0.2.5 scans whole cycles (Qwen3_5ScannableBlock): `decoder/layers/layer_<p>/...` holds cycle
position p of every cycle (HF layer `interval*b + p` at scan index b; the last position is full attention).
Unscanned: `decoder/layers_<i>`. Routed experts, stacked on axis 0 (transposed), from either layout of the files:
one tensor per expert (`mlp.experts.<e>.gate_proj.weight` ..., as transformers' save_pretrained and the fp8 releases
write them), or, as the bf16 releases store them and 0.2.5 maps them, fused per layer: `mlp.experts.gate_up_proj`
(X, 2M, E), the gate's M rows then the up projection's, and `mlp.experts.down_proj` (X, E, M). The layout is read
from the files' names (`source_layouts`); maxtext-to-hf writes the layout the checkpoint was converted from.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from ckpt_cli.errors import SourceError, UnsupportedError
from ckpt_cli.families import qwen3, qwen3_next
from ckpt_cli.families.base import Block, Dims, Family, Fp8Tree, Join, Part, Rule, row

P = qwen3_next.P
LA = qwen3_next.LA
TEXT_PREFIX = "model.language_model."   # the releases' text model (multimodal checkpoint)
QKVZ = Join("HK", ((LA + "in_proj_qkv.weight", "HK*DK"), (LA + "in_proj_qkv.weight", "HK*DK"),
                   (LA + "in_proj_qkv.weight", "HV*DV"), (LA + "in_proj_z.weight", "HV*DV")))
BA = Join("HK", ((LA + "in_proj_b.weight", "HV"), (LA + "in_proj_a.weight", "HV")))
LINEAR = (
    row("attention/in_proj_qkvz/kernel", LA + "in_proj_qkv.weight", "E,QKVZ", "QKVZ,E", "transpose", join=QKVZ),
    row("attention/in_proj_ba/kernel", LA + "in_proj_b.weight", "E,2*HV", "2*HV,E", "transpose", join=BA),
    *(r for r in qwen3_next.LINEAR
      if r.maxtext not in ("attention/in_proj_qkvz/kernel", "attention/in_proj_ba/kernel")),
)
LOCAL_LAYER = LINEAR + qwen3_next.SHARED
GLOBAL_LAYER = qwen3_next.GLOBAL_LAYER
FUSED = "fused-experts"   # the bf16 releases' layout: one gate_up_proj and one down_proj per layer, experts on axis 0
FUSED_EXPERTS = (   # gate_up_proj (X, 2M, E): the gate's M rows, then the up projection's (0.2.5's process_wi_0_wi_1)
    row("mlp/routed_experts/wi_0", P + "mlp.experts.gate_up_proj", "E,M", "X,2*M,E", "transpose", "X",
        part=Part(-2, 0, 2, blocked=True)),
    row("mlp/routed_experts/wi_1", P + "mlp.experts.gate_up_proj", "E,M", "X,2*M,E", "transpose", "X",
        part=Part(-2, 1, 2, blocked=True)),
    row("mlp/routed_experts/wo", P + "mlp.experts.down_proj", "M,E", "X,E,M", "transpose", "X"),
)


def fused(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """A layer table reading the routed experts from the fused per-layer tensors instead of one per expert."""
    by_leaf = {r.maxtext: r for r in FUSED_EXPERTS}
    return tuple(by_leaf.get(r.maxtext, r) for r in rules)
MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5", "qwen3_5_text")   # the dense ones only to refuse them
MULTIMODAL = {   # a release's model_type -> its text model's model_type and class
    "qwen3_5_moe": ("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM"), "qwen3_5": ("qwen3_5_text", "Qwen3_5ForCausalLM")}


def model_config(cfg: dict) -> dict:
    """The text model's config: a multimodal `qwen3_5_moe` config's `text_config`, relabelled `qwen3_5_moe_text` /
    Qwen3_5MoeForCausalLM (what the MaxText checkpoint holds and maxtext-to-hf writes back); else the config."""
    if cfg.get("model_type") not in MULTIMODAL:
        return cfg
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise SourceError(f"config.json (model_type {cfg.get('model_type')}) has no text_config")
    model_type, arch = MULTIMODAL[cfg["model_type"]]
    out = {**text, "model_type": text.get("model_type") or model_type, "architectures": [arch]}
    for key in ("torch_dtype", "dtype", "tie_word_embeddings"):
        if cfg.get(key) is not None and out.get(key) is None:
            out[key] = cfg[key]
    return out


def source_names(cfg: dict, names: Collection[str]) -> tuple[Callable[[str], str] | None, list[str]]:
    """(plan name -> file name, notes) for a release's files (`model.language_model.*`); (None, []) for a text-only
    model's (`model.*`)."""
    if not any(n.startswith(TEXT_PREFIX) for n in names):
        if cfg.get("model_type") == "qwen3_5_moe" and not any(n.startswith("model.layers.") for n in names):
            raise SourceError(f"multimodal qwen3_5_moe config, but no text-model tensors in the files (expected "
                              f"{TEXT_PREFIX}layers.*)")
        return None, []
    note = (f"multimodal Qwen3.5 source: only the language model ({TEXT_PREFIX}*) is converted; the vision tower "
            "(model.visual.*) and the MTP layer (mtp.*) are left out (MaxText use_multimodal: false), and "
            "maxtext-to-hf writes a text-only Qwen3_5MoeForCausalLM")
    return (lambda name: TEXT_PREFIX + name.removeprefix("model.") if name.startswith("model.") else name), [note]


def dims(cfg: dict) -> Dims:
    return qwen3_next.dims(model_config(cfg))


def top_rules(d: Dims, cfg: dict) -> tuple:
    return qwen3.top_rules(d, model_config(cfg))


def blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    """Unscanned: `decoder/layers_<i>`. Scanned: `decoder/layers/layer_<p>` stacks cycle position p of every cycle."""
    cfg = model_config(cfg)
    n, cycle = d["L"], qwen3_next.interval(cfg)
    local, full = (fused(LOCAL_LAYER), fused(GLOBAL_LAYER)) if FUSED in features else (LOCAL_LAYER, GLOBAL_LAYER)
    if not scan:
        return [Block(f"decoder/layers_{i}", (i,), False, full if qwen3_next.is_full(i, cfg) else local)
                for i in range(n)]
    if n % cycle:
        raise UnsupportedError(f"config.json has {n} layers: scanned, MaxText's qwen3_5 stacks whole cycles of "
                               f"{cycle} layers; convert with --no-scan")
    return [Block(f"decoder/layers/layer_{p}", tuple(range(p, n, cycle)), True, full if p == cycle - 1 else local)
            for p in range(cycle)]


def source_layouts(cfg: dict, names: Collection[str]) -> frozenset[str]:
    """{"fused-experts"} for files that hold the routed experts fused per layer (`mlp.experts.gate_up_proj`, as the
    bf16 releases do), else nothing (one tensor per expert, as transformers' save_pretrained and the fp8 releases)."""
    return frozenset({FUSED}) if any(n.endswith(".mlp.experts.gate_up_proj") for n in names) else frozenset()


def check_config(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    """Qwen3-Next's checks on the text model (every layer MoE with a shared expert, MaxText's layer pattern), and the
    gated attention MaxText computes (`attn_output_gate`)."""
    cfg = model_config(cfg)
    if cfg.get("model_type") != "qwen3_5_moe_text":
        raise UnsupportedError(f"config.json describes a {cfg.get('model_type')} model (dense Qwen3.5): MaxText 0.2.5 "
                               "defines only the MoE Qwen3.5 models (qwen3.5-35b-a3b, qwen3.5-397b-a17b)")
    if cfg.get("attn_output_gate") is False:
        raise UnsupportedError("config.json sets attn_output_gate false: MaxText's qwen3_5 attention always gates "
                               "its output (the query kernel holds each head's gate)")
    # transformers' Qwen3.5 router always renormalises its top-k weights, as MaxText's qwen3.5 configs do
    # (norm_topk_prob: true); the released configs do not say
    return qwen3_next.check_config({**cfg, "norm_topk_prob": True}, features)


# configs/models/qwen3.5-*-fp8.yml, unquantized_modules: every other kernel and routed expert is float8_e4m3fn
FP8_TREE = Fp8Tree(frozenset({"token_embedder", "logits_dense", "gate", "shared_expert_gate", "conv1d", "in_proj_ba",
                              "A_log", "dt_bias", "norm"}))


FAMILY = Family(
    name="qwen3_5", model_types=MODEL_TYPES, dims=dims, top_rules=top_rules, blocks=blocks,
    check_config=check_config,
    reference_keys=qwen3_next.FAMILY.reference_keys, model_config=model_config, source_names=source_names,
    source_layouts=source_layouts, layouts=frozenset({FUSED}),
    extra={"tied": lambda cfg: qwen3.tied(model_config(cfg)), "layer_rules": LOCAL_LAYER + qwen3_next.FULL,
           "top_table": (*qwen3.TOP, qwen3.HEAD),
           "fp8_tree": FP8_TREE},
)
