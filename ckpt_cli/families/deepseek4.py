"""DeepSeek-V4 (MaxText decoder_block deepseek4; deepseek-ai/DeepSeek-V4-Flash as MaxText 0.2.5 converts it).

Tensor names are the release's own (`embed.weight`, `layers.{L}.attn.wq_a.weight`, `layers.{L}.ffn.experts.{e}.w1
.weight`, `hc_head_fn` ...), the names MaxText 0.2.5's converter and transformers' loader read. A folder written by
transformers' `save_pretrained` names some of them differently (`model.` before the layers, `model.embed_tokens`,
`model.hc_head.hc_fn`, `attn.norm` for `attn.kv_norm`): `source_names` reads those too.

Every layer: a low-rank query (`wq_a`, `q_norm`, `wq_b` as (Q, N, D)), one shared key/value head (`wkv`, `kv_norm`),
per-head sinks, the grouped output projection (`wo_a (G*O, N*D/G)` -> `o_a_proj (G, N*D/G, O)`, then `wo_b`), and
by its compress ratio (config `compress_ratios`, or transformers' `layer_types` + `compress_rates`): none (0, a
sliding-window layer), a CSA compressor with its lightning indexer (4), or an HCA compressor (128). The MoE block
has a router, routed and shared experts; the first `num_hash_layers` layers route by the token-to-expert table
`tid2eid` (collection Tid2EidVar, float32 in MaxText, integers in HF), the others by a router bias (collection
MoEBiasVar). Two manifold-constrained hyper-connections per layer (`hc_attn_*`, `hc_ffn_*`: `fn (2H+H^2, H*E)`,
`base (2H+H^2)`, `scale (3)`, H = hc_mult) split into MaxText's pre / post / res parts: alpha = fn rows [0, H),
[H, 2H), [2H, 2H+H^2) transposed; beta = base's, the res part as (H, H); scale = one element each. MaxText's
`mhc_norm/scale` has no HF tensor: it is written as ones (as MaxText 0.2.5 does) and not written back.

Scanned, MaxText keeps the hash layers unscanned (`decoder/layers_{i}`) and stacks the rest in pairs:
`decoder/scanned_blocks/layers_0` the HCA layers (num_hash, num_hash+2, ...), `layers_1` the CSA ones.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from ckpt_cli.errors import UnsupportedError
from ckpt_cli.families.base import Block, Dims, Family, Part, Rule, config_int, row

P = "layers.{layer}."
A = "self_attention/"
SCANNED = "decoder/scanned_blocks"
CSA, HCA = "csa", "hca"

NORMS = (
    row("pre_self_attention_layer_norm/scale", P + "attn_norm.weight", "E", "E"),
    row("post_self_attention_layer_norm/scale", P + "ffn_norm.weight", "E", "E"),
)
ATTENTION = (
    row(A + "wq_a/kernel", P + "attn.wq_a.weight", "E,Q", "Q,E", "transpose"),
    row(A + "q_norm/scale", P + "attn.q_norm.weight", "Q", "Q"),
    row(A + "wq_b/kernel", P + "attn.wq_b.weight", "Q,N,D", "N*D,Q", "transpose"),
    row(A + "wkv/kernel", P + "attn.wkv.weight", "E,Kv,D", "Kv*D,E", "transpose"),
    row(A + "kv_norm/scale", P + "attn.kv_norm.weight", "D", "D"),
    row(A + "sinks", P + "attn.attn_sink", "N", "N"),
    row(A + "o_a_proj/kernel", P + "attn.wo_a.weight", "G,W,O", "G*O,W", "group-transpose"),
    row(A + "o_b_proj/kernel", P + "attn.wo_b.weight", "G*O,E", "E,G*O", "transpose"),
)


def compressor(prefix: str, hf: str, width: str, norm: str, ratio: str) -> tuple[Rule, ...]:
    """A KV compressor: gated projections of width `width`, its norm and its per-position bias (ratio rows)."""
    return (
        row(prefix + "gate_proj/kernel", P + hf + "wgate.weight", f"E,{width}", f"{width},E", "transpose"),
        row(prefix + "kv_proj/kernel", P + hf + "wkv.weight", f"E,{width}", f"{width},E", "transpose"),
        row(prefix + "kv_norm/scale", P + hf + "norm.weight", norm, norm),
        row(prefix + "position_bias", P + hf + "ape", f"{ratio},{width}", f"{ratio},{width}"),
    )


CSA_RULES = (
    *compressor(A + "csa_compressor/", "attn.compressor.", "2*D", "D", "Rc"),
    *compressor(A + "csa_compressor/indexer/", "attn.indexer.compressor.", "2*Id", "Id", "Rc"),
    row(A + "csa_compressor/indexer/weights_proj/kernel", P + "attn.indexer.weights_proj.weight", "E,Ih", "Ih,E",
        "transpose"),
    row(A + "csa_compressor/indexer/q_proj/kernel", P + "attn.indexer.wq_b.weight", "Q,Ih*Id", "Ih*Id,Q",
        "transpose"),
)
HCA_RULES = compressor(A + "hca_compressor/", "attn.compressor.", "D", "D", "Rh")

MOE = "mlp/MoeBlock_0/"
MLP = (
    row(MOE + "gate/kernel", P + "ffn.gate.weight", "E,X", "X,E", "transpose"),
    row(MOE + "wi_0", P + "ffn.experts.{expert}.w1.weight", "E,M", "M,E", "transpose", "X"),
    row(MOE + "wi_1", P + "ffn.experts.{expert}.w3.weight", "E,M", "M,E", "transpose", "X"),
    row(MOE + "wo", P + "ffn.experts.{expert}.w2.weight", "M,E", "E,M", "transpose", "X"),
    row("mlp/shared_experts/wi_0/kernel", P + "ffn.shared_experts.w1.weight", "E,S", "S,E", "transpose"),
    row("mlp/shared_experts/wi_1/kernel", P + "ffn.shared_experts.w3.weight", "E,S", "S,E", "transpose"),
    row("mlp/shared_experts/wo/kernel", P + "ffn.shared_experts.w2.weight", "S,E", "E,S", "transpose"),
)
# Non-parameter variables, float32 whatever the output dtype (they pick the experts): the hash layers' token ->
# expert table (HF int64; exact in float32 below 2^24) and the other layers' router bias.
HASH_ROUTING = (row(MOE + "tid2eid", P + "ffn.gate.tid2eid", "V,K", "V,K", dtype="f32", collection="Tid2EidVar",
                    hf_dtype="int64"),)
BIAS_ROUTING = (row(MOE + "gate/bias", P + "ffn.gate.bias", "X", "X", dtype="f32", collection="MoEBiasVar"),)

TOP = (
    row("token_embedder/embedding", "embed.weight", "V,E", "V,E"),
    row("decoder/decoder_norm/scale", "norm.weight", "E", "E"),
    row("decoder/logits_dense/kernel", "head.weight", "E,V", "V,E", "transpose"),
    row("decoder/hc_head/hc_fn", "hc_head_fn", "H*E,H", "H,H*E", "transpose"),
    row("decoder/hc_head/hc_base", "hc_head_base", "H", "H"),
    row("decoder/hc_head/hc_scale", "hc_head_scale", "1", "1"),
)


def hyper_connection(module: str, hf: str, h: int) -> tuple[Rule, ...]:
    """One hyper-connection's MaxText leaves from HF `<hf>_fn`, `_base`, `_scale` (module mhc_attention / mhc_mlp):
    blocks of H rows of fn / elements of base, pre = block 0, post = block 1, res = blocks 2 .. H+1."""
    blocks = 2 + h
    parts = {"pre": Part(-2, 0, blocks, True), "post": Part(-2, 1, blocks, True), "res": Part(-2, 2, blocks, True, h)}
    rules = [row(f"{module}/mhc_norm/scale", "", "H*E", "", fill=1.0)]
    for name, p in parts.items():
        width = "H2" if name == "res" else "H"
        rules.append(row(f"{module}/{name}_alpha", P + f"{hf}_fn", f"H*E,{width}", "Hc,H*E", "transpose", part=p))
        beta = Part(-1, p.start, blocks, True, p.count)
        rules.append(row(f"{module}/{name}_beta", P + f"{hf}_base", "H,H" if name == "res" else "H", "Hc", "reshape",
                         part=beta))
        scale = Part(-1, ("pre", "post", "res").index(name), 3, True)
        rules.append(row(f"{module}/{name}_alpha_scale", P + f"{hf}_scale", "1", "3", part=scale))
    return tuple(rules)


def compress_ratios(cfg: dict) -> list[int]:
    """Each layer's compress ratio: the release's `compress_ratios`, else transformers' `layer_types` and
    `compress_rates` (sliding_attention 0)."""
    layers = config_int(cfg, "num_hidden_layers")
    ratios = cfg.get("compress_ratios")
    if ratios is None and cfg.get("layer_types") is not None:
        rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128,
                 **(cfg.get("compress_rates") or {}), "sliding_attention": 0}
        try:
            ratios = [rates[t] for t in cfg["layer_types"]]
        except (KeyError, TypeError):
            raise UnsupportedError(f"config.json layer_types {cfg['layer_types']!r}: expected sliding_attention, "
                                   "compressed_sparse_attention or heavily_compressed_attention") from None
    if ratios is None:   # transformers' default schedule: two HCA layers, then CSA / HCA alternating
        ratios = [128] * min(layers, 2) + [4 if i % 2 else 128 for i in range(max(layers - 2, 0))]
    if not isinstance(ratios, list) or len(ratios) < layers or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ratios[:layers]):
        raise UnsupportedError(f"config.json compress ratios {ratios!r}: expected {layers} integers >= 0")
    return list(ratios[:layers])


def hash_layers(cfg: dict) -> int:
    """The number of leading hash-routed MoE layers (`num_hash_layers`, or transformers' `mlp_layer_types`)."""
    types = cfg.get("mlp_layer_types")
    if cfg.get("num_hash_layers") is None and types is not None:
        n = sum(1 for t in types if t == "hash_moe")
        if list(types[:n]) != ["hash_moe"] * n:
            raise UnsupportedError("config.json mlp_layer_types: MaxText's deepseek4 hash-routes only the first "
                                   f"layers (first_num_hash_layers), not {list(types)}")
        return n
    return config_int(cfg, "num_hash_layers", 3, minimum=0)


def kind(ratio: int) -> str | None:
    """MaxText 0.2.5's attention kind of a compress ratio: CSA at 4, HCA above, none (sliding window only) below."""
    return CSA if ratio == 4 else HCA if ratio > 4 else None


def dims(cfg: dict) -> Dims:
    n, head, groups = (config_int(cfg, k) for k in ("num_attention_heads", "head_dim", "o_groups"))
    h = config_int(cfg, "hc_mult", 4)
    if n * head % groups:
        raise UnsupportedError(f"config.json: o_groups {groups} does not divide num_attention_heads * head_dim")
    ratios = compress_ratios(cfg)
    d = {
        "E": config_int(cfg, "hidden_size"), "N": n, "D": head, "Kv": config_int(cfg, "num_key_value_heads", 1),
        "Q": config_int(cfg, "q_lora_rank"), "V": config_int(cfg, "vocab_size"),
        "L": config_int(cfg, "num_hidden_layers"), "X": config_int(cfg, "n_routed_experts"),
        "M": config_int(cfg, "moe_intermediate_size"), "K": config_int(cfg, "num_experts_per_tok"),
        "G": groups, "O": config_int(cfg, "o_lora_rank"), "W": n * head // groups,
        "H": h, "H2": h * h, "Hc": 2 * h + h * h,
        "Ih": config_int(cfg, "index_n_heads", 64), "Id": config_int(cfg, "index_head_dim", 128),
        "Rc": 4, "Rh": max((r for r in ratios if r > 4), default=128),
        "Lh": hash_layers(cfg),
    }
    d["S"] = config_int(cfg, "n_shared_experts", 1) * d["M"]
    return d


def layer_rules(d: Dims, ratio: int, hashed: bool) -> tuple[Rule, ...]:
    attention = {None: (), CSA: CSA_RULES, HCA: HCA_RULES}[kind(ratio)]
    return (NORMS + hyper_connection("mhc_attention", "hc_attn", d["H"])
            + hyper_connection("mhc_mlp", "hc_ffn", d["H"]) + ATTENTION + attention + MLP
            + (HASH_ROUTING if hashed else BIAS_ROUTING))


def top_rules(d: Dims, cfg: dict) -> tuple[Rule, ...]:
    return TOP


def blocks(d: Dims, cfg: dict, scan: bool, features: frozenset[str] = frozenset()) -> list[Block]:
    ratios, lh, layers = compress_ratios(cfg), d["Lh"], d["L"]
    if not scan:
        return [Block(f"decoder/layers_{i}", (i,), False, layer_rules(d, ratios[i], i < lh)) for i in range(layers)]
    rest = ratios[lh:]
    if len(rest) % 2 or any(kind(r) != HCA for r in rest[0::2]) or any(kind(r) != CSA for r in rest[1::2]):
        raise UnsupportedError(f"scanned, MaxText's deepseek4 stacks the layers after the {lh} hash layers as HCA / "
                               f"CSA pairs; this config's compress ratios there are {rest}: use --no-scan")
    out = [Block(f"decoder/layers_{i}", (i,), False, layer_rules(d, ratios[i], True)) for i in range(lh)]
    for b in range(2):
        hf_layers = tuple(range(lh + b, layers, 2))
        if hf_layers:
            out.append(Block(f"{SCANNED}/layers_{b}", hf_layers, True, layer_rules(d, ratios[lh + b], False)))
    return out


def check_config(cfg: dict, features: frozenset[str] = frozenset()) -> list[str]:
    quant = cfg.get("quantization_config") or {}
    if quant and quant.get("quant_method") != "fp8":
        raise UnsupportedError(f"quantization {quant.get('quant_method')!r} is not supported (DeepSeek-V4's fp8 "
                               "block-scaled weights with fp4 experts, or an unquantized source)")
    rates = cfg.get("compress_rates") or {}
    if rates.get("compressed_sparse_attention", 4) != 4:
        raise UnsupportedError(f"config.json compress_rates: CSA rate {rates['compressed_sparse_attention']}; "
                               "MaxText's deepseek4 treats ratio 4 as CSA (with the indexer) and any other as HCA")
    ratios = compress_ratios(cfg)
    if any(0 < r < 4 for r in ratios):
        raise UnsupportedError(f"config.json compress ratios {sorted({r for r in ratios if 0 < r < 4})}: MaxText's "
                               "deepseek4 compresses at 4 (CSA) or more (HCA) only")
    if len({r for r in ratios if r > 4}) > 1:
        raise UnsupportedError(f"config.json has several HCA compress ratios {sorted({r for r in ratios if r > 4})}")
    if hash_layers(cfg) > config_int(cfg, "num_hidden_layers"):
        raise UnsupportedError("config.json has more hash-routed layers than layers")
    notes = []
    if cfg.get("num_nextn_predict_layers"):
        notes.append("the multi-token-prediction module (mtp.*) is not converted: MaxText 0.2.5's deepseek4 "
                     "drops it")
    return notes


# What the release stores quantized (config quantization_config fp8 with scale_fmt ue8m0, expert_dtype fp4; as
# transformers' DeepSeek-V4 loader expects): the attention and shared-expert projections fp8 e4m3 with one e8m0
# `<stem>.scale` per 128x128 block; the routed experts fp4 (E2M1 pairs in int8, one e8m0 scale per 32 values). The
# compressors, indexer projections but `wq_b`, router, embeddings, head, norms and hyper-connections are not.
FP8_RELEASED = re.compile(r"layers\.\d+\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)|ffn\.shared_experts\.w[123])"
                          r"\.weight")
FP4_RELEASED = re.compile(r"layers\.\d+\.ffn\.experts\.\d+\.w[123]\.weight")


def released_bytes(cfg: dict, name: str, shape: tuple[int, ...]) -> float | None:
    """Bytes per element of HF tensor `name` (of `shape`) as the release stores it, where its config's dtype does
    not say: quantized weights with their scales (fp4: half a byte and an e8m0 byte per 32; fp8: a byte and an e8m0
    byte per block, ragged edge blocks included) and the int64 `tid2eid`. None otherwise."""
    if name.endswith(".tid2eid"):
        return 8.0
    quant = cfg.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8" or len(shape) != 2:
        return None
    bh, bw = quant.get("weight_block_size") or (128, 128)
    expert_fp4 = (quant.get("expert_dtype") or cfg.get("expert_dtype")) == "fp4"
    if expert_fp4 and FP4_RELEASED.fullmatch(name):
        return 0.5 + 1 / 32
    if FP8_RELEASED.fullmatch(name) or FP4_RELEASED.fullmatch(name):
        rows, cols = shape
        return 1 + -(-rows // bh) * -(-cols // bw) / (rows * cols)
    return None


TOP_RENAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "hc_head_fn": "model.hc_head.hc_fn", "hc_head_base": "model.hc_head.hc_base",
               "hc_head_scale": "model.hc_head.hc_scale"}


def saved_by_transformers(name: str) -> str:
    """A release tensor name as transformers' `save_pretrained` writes it for DeepseekV4ForCausalLM."""
    if name in TOP_RENAMES:
        return TOP_RENAMES[name]
    if name.startswith("layers."):
        return "model." + name.replace(".attn.kv_norm.", ".attn.norm.")
    return name


def source_names(cfg: dict, names: Collection[str]):
    """Read a folder transformers saved (its names, see `saved_by_transformers`) as well as the release's."""
    if "embed.weight" in names or "model.embed_tokens.weight" not in names:
        return None, []
    return saved_by_transformers, ["tensor names as transformers' save_pretrained writes them (model.layers...)"]


FAMILY = Family(
    name="deepseek4", model_types=("deepseek_v4",), dims=dims, top_rules=top_rules, blocks=blocks,
    check_config=check_config, source_names=source_names,
    reference_keys=("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_hidden_layers",
                    "vocab_size", "moe_intermediate_size", "n_routed_experts", "n_shared_experts",
                    "num_experts_per_tok", "q_lora_rank", "o_groups", "o_lora_rank", "hc_mult", "index_n_heads",
                    "index_head_dim"),
    extra={"tied": lambda cfg: False, "released_bytes": released_bytes},
)
