"""Reference JAX forward pass of MaxText's DeepSeek decoder math (MLA attention + DeepSeek MoE).

Covers DeepSeek V2 (V2-Lite: plain query projection, softmax routing), V3 (low-rank query, sigmoid
routing with a correction bias) and V3.2 (V3 plus the sparse-attention "lightning indexer"). Weights
are read one decoder layer at a time through the :class:`~ckpt_cli.verify.blocks.ParamSource`
protocol (per-layer MaxText leaves, maxtext-layout.md §7.2/§7.3), so peak memory is about one layer
of weights plus activations. The layers are ``verify/blocks.py``'s blocks (``mla_attention``, SwiGLU MLPs,
softmax / sigmoid routing, streamed experts, logits); the V3.2 indexer is written here from its pieces.
Math: maxtext-layout.md §7.4; where MaxText and transformers differ in a configurable detail, the values of the
HF ``config.json`` decide, as transformers applies them:

* YaRN frequencies and the cos/sin factor ``attention_factor`` (1.0 for every released DeepSeek
  config, where ``mscale == mscale_all_dim``); softmax scale ``Dq^-0.5 · m²`` with
  ``m = 0.1·mscale_all_dim·ln(factor) + 1`` (``m = 1`` without ``mscale_all_dim`` or when factor ≤ 1).
* MLA RoPE on interleaved pairs (dims 2i, 2i+1); the indexer's RoPE uses halves (i, Dr/2+i).
* Group-limited routing whenever the config asks for it (V3 ``n_group``/``topk_group``; V2
  ``topk_method: group_limited_greedy``). MaxText's deepseek3 config leaves it off by default.
* The q/kv latent RMSNorms use eps 1e-6 regardless of ``rms_norm_eps`` (as transformers builds them).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ckpt_cli.verify.blocks import (
    FINAL_NORM,
    ParamSource,
    apply_rope,
    embed_tokens,
    final_logits,
    gated_mlp,
    layer_norm,
    lm_head,
    mla_attention,
    mla_query_latent,
    mla_shapes,
    mlp_shapes,
    moe_shapes,
    release,
    rms_norm,
    rope_tables,
    route_sigmoid,
    route_softmax_topk,
    routed_experts,
    select_leaves,
    subtree,
    to_device,
    yarn_inv_freq,
    yarn_mscale,
)

__all__ = ["VERSIONS", "DeepseekConfig", "deepseek_logits", "rope_attention_factor", "rope_inv_freq",
           "softmax_scale"]

VERSIONS = ("v2", "v3", "v3.2")
_MODEL_TYPES = {"deepseek_v2": "v2", "deepseek_v3": "v3", "deepseek_v32": "v3.2", "kimi_k2": "v3"}   # Kimi K2: V3
_LATENT_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm (transformers builds them with the default eps)
_INDEXER_LN_EPS = 1e-6  # indexer k_norm (a LayerNorm with bias)

# transformers' per-class defaults for keys that a config.json may omit
_DEFAULTS: dict[str, dict[str, Any]] = {
    "v2": dict(first_k_dense_replace=0, norm_topk_prob=False, routed_scaling_factor=1.0, n_group=None,
               topk_group=None, topk_method="greedy", n_shared_experts=2, q_lora_rank=1536),
    "v3": dict(first_k_dense_replace=3, norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8, topk_group=4,
               topk_method="noaux_tc", n_shared_experts=1, q_lora_rank=1536),
    "v3.2": dict(first_k_dense_replace=3, norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8, topk_group=4,
                 topk_method="noaux_tc", n_shared_experts=1, q_lora_rank=1536, index_n_heads=64,
                 index_head_dim=128, index_topk=2048),
}  # fmt: skip

_SA = "self_attention/"
_PRE_NORM = "pre_self_attention_layer_norm/scale"
_POST_NORM = "post_self_attention_layer_norm/scale"
_IDX = _SA + "indexer/"
_IDX_WQ_B, _IDX_WK = _IDX + "wq_b/kernel", _IDX + "wk/kernel"
_IDX_K_SCALE, _IDX_K_BIAS = _IDX + "k_norm/scale", _IDX + "k_norm/bias"
_IDX_WPROJ = _IDX + "weights_proj/kernel"
_WI0, _WI1, _WO = "mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel"
_MOE = "DeepSeekMoeBlock_0/"
_ROUTED, _SHARED = _MOE + "MoeBlock_0/", _MOE + "shared_experts/"
_GATE, _GATE_BIAS = _ROUTED + "gate/kernel", _ROUTED + "gate/bias"
_EXPERTS = ("wi_0", "wi_1", "wo")
_SH_WI0, _SH_WI1, _SH_WO = (_SHARED + f"{n}/kernel" for n in _EXPERTS)
_KEEP_F32 = (_IDX_WPROJ, _GATE, _GATE_BIAS)  # float32 in the model (and in transformers) whatever the dtype


@dataclass(frozen=True)
class DeepseekConfig:
    """Architecture hyper-parameters needed by :func:`deepseek_logits`."""

    version: str  # "v2", "v3" or "v3.2"
    num_layers: int
    hidden: int
    num_heads: int
    vocab: int
    first_k_dense: int
    intermediate: int  # dense MLP width F
    moe_intermediate: int  # per-expert width M
    q_lora_rank: int  # 0: plain query projection (V2)
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head: int
    n_routed_experts: int
    experts_per_tok: int
    n_shared: int
    scoring: str  # "softmax" (V2) or "sigmoid" (V3, V3.2)
    norm_topk_prob: bool
    routed_scaling_factor: float
    n_group: int | None  # group-limited routing when both are set
    topk_group: int | None
    router_bias: bool
    rms_eps: float
    rope_theta: float
    rope_interleave: bool = True
    # YaRN (rope_factor None = plain RoPE)
    rope_factor: float | None = None
    rope_original_max: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    rope_truncate: bool = True
    attention_factor: float | None = None  # explicit cos/sin factor; derived from the mscales when None
    # V3.2 lightning indexer (0 = none)
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    tied: bool = False

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"unsupported DeepSeek version {self.version!r}; expected one of {VERSIONS}")
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {self.scoring!r}")
        if self.qk_rope % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope}")
        if not 0 < self.experts_per_tok <= self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok={self.experts_per_tok} must lie in [1, {self.n_routed_experts}]")
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError("n_group and topk_group must be set together")
        if self.n_group is not None:
            if self.n_routed_experts % self.n_group:
                raise ValueError(f"n_group={self.n_group} must divide n_routed_experts={self.n_routed_experts}")
            if self.topk_group * self.n_routed_experts // self.n_group < self.experts_per_tok:
                raise ValueError("topk_group groups hold fewer experts than num_experts_per_tok")
        if self.index_topk:
            if not self.q_lora_rank:
                raise ValueError("the V3.2 indexer needs q_lora_rank > 0")
            if self.index_head_dim < self.qk_rope or self.index_n_heads <= 0:
                raise ValueError("index_head_dim must be >= qk_rope_head_dim and index_n_heads > 0")
        if self.rope_factor is not None and self.rope_original_max is None:
            raise ValueError("YaRN needs original_max_position_embeddings")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope + self.qk_rope

    @classmethod
    def from_hf_config(cls, cfg: dict) -> DeepseekConfig:
        """Build from a transformers ``config.json`` dict (``deepseek_v2``, ``deepseek_v3`` or ``deepseek_v32``;
        legacy ``rope_theta``/``rope_scaling`` or transformers-5 ``rope_parameters``)."""
        version = _MODEL_TYPES.get(cfg.get("model_type", ""))
        if version is None:
            raise ValueError(f"model_type {cfg.get('model_type')!r} is not one of {sorted(_MODEL_TYPES)}")
        d = _DEFAULTS[version]

        def get(key: str) -> Any:
            return cfg[key] if key in cfg else d.get(key)

        rope: dict[str, Any] = dict(cfg.get("rope_scaling") or {})
        rope.update(cfg.get("rope_parameters") or {})
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        yarn: dict[str, Any] = {}
        if rope_type == "yarn":
            original = int(rope.get("original_max_position_embeddings") or cfg["max_position_embeddings"])
            factor = rope.get("factor")
            factor = float(factor) if factor is not None else cfg["max_position_embeddings"] / original
            attention_factor = rope.get("attention_factor")
            yarn = dict(
                rope_factor=factor,
                rope_original_max=original,
                beta_fast=float(rope.get("beta_fast") or 32),
                beta_slow=float(rope.get("beta_slow") or 1),
                mscale=None if rope.get("mscale") is None else float(rope["mscale"]),
                mscale_all_dim=None if rope.get("mscale_all_dim") is None else float(rope["mscale_all_dim"]),
                rope_truncate=bool(rope.get("truncate", True)),
                attention_factor=None if attention_factor is None else float(attention_factor),
            )
        elif rope_type != "default":
            raise ValueError(f"unsupported rope_type {rope_type!r} (expected 'default' or 'yarn')")

        experts = int(cfg["n_routed_experts"])
        n_group, topk_group = get("n_group"), get("topk_group")
        if version == "v2" and get("topk_method") != "group_limited_greedy":
            n_group = topk_group = None  # transformers' V2 router ignores the groups for "greedy"
        if not n_group or not topk_group or int(n_group) <= 1 or int(topk_group) >= int(n_group):
            n_group = topk_group = None  # a single group, or every group kept: not a restriction
        first_k_dense = int(get("first_k_dense_replace") or 0)
        layers = int(cfg["num_hidden_layers"])
        mlp_types = cfg.get("mlp_layer_types")
        if mlp_types is not None:
            expected = ["dense"] * min(first_k_dense, layers) + ["sparse"] * max(layers - first_k_dense, 0)
            if list(mlp_types) != expected:
                raise ValueError(f"mlp_layer_types {mlp_types} is not {first_k_dense} dense layers then MoE layers")
        heads = int(cfg["num_attention_heads"])
        if int(cfg.get("num_key_value_heads") or heads) != heads:
            raise ValueError("MLA needs num_key_value_heads == num_attention_heads")
        v32 = version == "v3.2"
        return cls(
            version=version,
            num_layers=layers,
            hidden=int(cfg["hidden_size"]),
            num_heads=heads,
            vocab=int(cfg["vocab_size"]),
            first_k_dense=first_k_dense,
            intermediate=int(cfg["intermediate_size"]),
            moe_intermediate=int(cfg["moe_intermediate_size"]),
            q_lora_rank=int(get("q_lora_rank") or 0),
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_nope=int(cfg["qk_nope_head_dim"]),
            qk_rope=int(cfg["qk_rope_head_dim"]),
            v_head=int(cfg["v_head_dim"]),
            n_routed_experts=experts,
            experts_per_tok=int(cfg["num_experts_per_tok"]),
            n_shared=int(get("n_shared_experts") or 0),
            scoring="softmax" if version == "v2" else "sigmoid",
            norm_topk_prob=bool(get("norm_topk_prob")),
            routed_scaling_factor=float(get("routed_scaling_factor")),
            n_group=None if n_group is None else int(n_group),
            topk_group=None if topk_group is None else int(topk_group),
            router_bias=version != "v2",
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)) or 10000.0),
            rope_interleave=bool(cfg.get("rope_interleave", True)) if version == "v3" else True,
            index_n_heads=int(get("index_n_heads")) if v32 else 0,
            index_head_dim=int(get("index_head_dim")) if v32 else 0,
            index_topk=int(get("index_topk")) if v32 else 0,
            tied=bool(cfg.get("tie_word_embeddings", False)),
            **yarn,
        )


def softmax_scale(cfg: DeepseekConfig) -> float:
    """MLA softmax scale: ``Dq^-0.5``, times ``m²`` (``m`` from ``mscale_all_dim``) under YaRN."""
    scale = cfg.qk_head_dim**-0.5
    if cfg.rope_factor is not None and cfg.mscale_all_dim:
        m = yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
        scale *= m * m
    return scale


def rope_attention_factor(cfg: DeepseekConfig) -> float:
    """Factor on cos/sin: YaRN's ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` (1 if plain RoPE)."""
    if cfg.rope_factor is None:
        return 1.0
    if cfg.attention_factor is not None:
        return cfg.attention_factor
    if cfg.mscale and cfg.mscale_all_dim:
        return yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
    return yarn_mscale(cfg.rope_factor)


def rope_inv_freq(cfg: DeepseekConfig) -> np.ndarray:
    """Inverse RoPE frequencies (Dr/2,) in float32 for the rope dims, YaRN-blended when configured."""
    return yarn_inv_freq(cfg.qk_rope, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max, cfg.beta_fast,
                         cfg.beta_slow, cfg.rope_truncate)


def _cast(w: dict[str, jax.Array], dt: jnp.dtype) -> dict[str, jax.Array]:
    return {k: v.astype(jnp.float32 if k in _KEEP_F32 else dt) for k, v in w.items()}


def _indexer_keep(
    h: jax.Array, q_latent: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array, topk: int
) -> jax.Array:
    """V3.2 lightning indexer: bool (B,T,S), True at the top-``topk`` causal keys of every query.

    ``index[b,t,s] = Σ_h w[b,t,h]·H^-0.5 · relu(q[b,t,h]·k[b,s] · Hd^-0.5)`` with ``w = x·weights_proj`` (float32).
    Keys tied at the k-th place are taken lowest index first (``jax.lax.top_k``); torch's order is unspecified.
    """
    n_heads, head_dim = w[_IDX_WQ_B].shape[1:]
    q = jnp.einsum("btc,chd->bthd", q_latent, w[_IDX_WQ_B])
    k = layer_norm(h @ w[_IDX_WK], w[_IDX_K_SCALE], w[_IDX_K_BIAS], _INDEXER_LN_EPS, h.dtype)[:, :, None, :]
    # partial RoPE on the first Dr dims, in halves (not interleaved pairs) — unlike the MLA rope dims
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)[:, :, 0, :]
    qk = jnp.einsum("bthd,bsd->bths", q.astype(jnp.float32), k.astype(jnp.float32))
    scores = jax.nn.relu(qk * head_dim**-0.5)
    weights = (h.astype(jnp.float32) @ w[_IDX_WPROJ]) * n_heads**-0.5  # (B,T,H)
    index = jnp.einsum("bth,bths->bts", weights, scores)
    b, t, s = index.shape
    causal = jnp.tril(jnp.ones((t, s), dtype=bool))
    _, top = jax.lax.top_k(jnp.where(causal, index, -jnp.inf), topk)  # (B,T,topk)
    keep = jnp.zeros((b, t, s), dtype=bool)
    return keep.at[jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None], top].set(True)


@partial(jax.jit, static_argnames=("eps", "interleave", "index_topk", "dtype"))
def _attention(
    x: jax.Array,
    w: dict[str, jax.Array],
    cos: jax.Array,
    sin: jax.Array,
    scale: jax.Array,
    *,
    eps: float,
    interleave: bool,
    index_topk: int,
    dtype: str,
) -> jax.Array:
    """Pre-norm MLA causal self-attention with residual on x (B,T,E); ``index_topk`` 0 = no indexer."""
    dt = jnp.dtype(dtype)
    w = _cast(w, dt)
    h = rms_norm(x, w[_PRE_NORM], eps, dt)
    t = x.shape[1]
    keep = jnp.tril(jnp.ones((t, t), dtype=bool))
    if index_topk:
        q_latent = mla_query_latent(h, subtree(w, _SA), _LATENT_EPS, dt)   # computed once: XLA merges the two
        keep = keep & _indexer_keep(h, q_latent, w, cos, sin, index_topk)
    return x + mla_attention(h, subtree(w, _SA), cos, sin, keep, scale, latent_eps=_LATENT_EPS, dtype=dt,
                             interleaved=interleave)


@partial(jax.jit, static_argnames=("eps", "dtype"))
def _dense_mlp(x: jax.Array, w: dict[str, jax.Array], *, eps: float, dtype: str) -> jax.Array:
    """Pre-norm SwiGLU MLP with residual (dense layers)."""
    dt = jnp.dtype(dtype)
    w = _cast(w, dt)
    return x + gated_mlp(rms_norm(x, w[_POST_NORM], eps, dt), w[_WI0], w[_WI1], w[_WO])


@partial(jax.jit, static_argnames=("eps", "scoring", "top_k", "n_group", "topk_group", "norm_topk_prob", "dtype"))
def _moe_route(
    x: jax.Array,
    w: dict[str, jax.Array],
    scaling: jax.Array,
    *,
    eps: float,
    scoring: str,
    top_k: int,
    n_group: int | None,
    topk_group: int | None,
    norm_topk_prob: bool,
    dtype: str,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """MoE layer minus the routed experts: returns (x + shared experts, normed h, both (BT,E); expert ids (BT,k),
    expert weights (BT,k)). Routing in float32."""
    dt = jnp.dtype(dtype)
    w = _cast(w, dt)
    h = rms_norm(x, w[_POST_NORM], eps, dt)
    base = x + gated_mlp(h, w[_SH_WI0], w[_SH_WI1], w[_SH_WO]) if _SH_WI0 in w else x
    h, base = h.reshape(-1, h.shape[-1]), base.reshape(-1, h.shape[-1])
    logits = h.astype(jnp.float32) @ w[_GATE]
    groups = dict(normalize=norm_topk_prob, n_group=n_group, topk_group=topk_group)
    if scoring == "softmax":  # V2
        weights, ids = route_softmax_topk(logits, top_k, **groups)
    else:  # V3/V3.2
        weights, ids = route_sigmoid(logits, w.get(_GATE_BIAS), top_k, **groups)
    return base, h, ids, weights * scaling


def _expected_shapes(cfg: DeepseekConfig, moe: bool) -> dict[str, tuple[int, ...]]:
    e = cfg.hidden
    shapes = {_PRE_NORM: (e,), _POST_NORM: (e,)} | mla_shapes(
        e, cfg.num_heads, kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank, qk_nope=cfg.qk_nope,
        qk_rope=cfg.qk_rope, v_head=cfg.v_head, prefix=_SA)
    if cfg.index_topk:
        h, hd = cfg.index_n_heads, cfg.index_head_dim
        shapes |= {
            _IDX_WQ_B: (cfg.q_lora_rank, h, hd),
            _IDX_WK: (e, hd),
            _IDX_K_SCALE: (hd,),
            _IDX_K_BIAS: (hd,),
            _IDX_WPROJ: (e, h),
        }
    if not moe:
        return shapes | mlp_shapes(e, cfg.intermediate)
    shapes |= moe_shapes(e, cfg.n_routed_experts, cfg.moe_intermediate, prefix=_ROUTED, router_bias=cfg.router_bias)
    if cfg.n_shared:
        shapes |= mlp_shapes(e, cfg.n_shared * cfg.moe_intermediate, prefix=_SHARED)
    return shapes


def _layer_weights(layer: dict[str, np.ndarray], cfg: DeepseekConfig, i: int) -> dict[str, np.ndarray]:
    """Select and shape-check the leaves of HF layer ``i`` used by the forward."""
    shapes = _expected_shapes(cfg, moe=i >= cfg.first_k_dense)
    return select_leaves(layer, shapes, i)


def _notes(cfg: DeepseekConfig, seq_len: int) -> list[str]:
    notes = []
    if cfg.index_topk and cfg.index_topk >= seq_len:
        notes.append(
            f"indexer top-k {cfg.index_topk} >= sequence length {seq_len}: it selects every key "
            "(the sparse attention equals dense causal attention)"
        )
    if cfg.n_group is not None:
        maxtext = (
            "MaxText 0.2.5 routes DeepSeek-V2 by a plain top-k (no groups)"
            if cfg.version == "v2"
            else "MaxText's DeepSeek configs default to n_routing_groups=-1 (off)"
        )
        notes.append(
            f"group-limited routing (n_group {cfg.n_group}, topk_group {cfg.topk_group}) as the HF config asks; "
            + maxtext
        )
    if cfg.version == "v2" and cfg.norm_topk_prob:
        notes.append("V2 norm_topk_prob=true renormalises the top-k weights (transformers' DeepseekV2 ignores it)")
    attention_factor = rope_attention_factor(cfg)
    if attention_factor != 1.0:
        notes.append(f"YaRN cos/sin scaled by attention_factor {attention_factor:.6g} (as transformers does)")
    return notes


def deepseek_logits(
    params: ParamSource, cfg: DeepseekConfig, tokens: np.ndarray, dtype: str = "float32"
) -> tuple[np.ndarray, list[str]]:
    """tokens int (B,T) -> (logits float32 (B,T,V), notes), computed with MaxText's DeepSeek math.

    Positions are 0..T-1 with a causal mask and no padding. Layers are fetched with ``params.layer(i)``
    one at a time and released before the next fetch; routed experts are computed only for the tokens
    routed to them. ``dtype`` ('float32' or 'bfloat16') is the activation/weight compute dtype; norm
    statistics, softmax, routing and the indexer's scores are float32. ``notes`` explains
    configuration-dependent behaviour (e.g. an indexer top-k that selects every key).
    """
    tokens = np.asarray(tokens)
    x = embed_tokens(params, cfg, tokens, dtype)

    seq_len = tokens.shape[1]
    cos, sin = rope_tables(rope_inv_freq(cfg), seq_len, rope_attention_factor(cfg))
    eps = float(cfg.rms_eps)
    scale, scaling = np.float32(softmax_scale(cfg)), np.float32(cfg.routed_scaling_factor)
    attn_static = {
        "eps": eps,
        "interleave": cfg.rope_interleave,
        "index_topk": cfg.index_topk if 0 < cfg.index_topk < seq_len else 0,  # top-k >= T keeps every key
        "dtype": dtype,
    }
    moe_static = {
        "eps": eps,
        "scoring": cfg.scoring,
        "top_k": cfg.experts_per_tok,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "norm_topk_prob": cfg.norm_topk_prob,
        "dtype": dtype,
    }
    for i in range(cfg.num_layers):
        layer = _layer_weights(params.layer(i), cfg, i)
        weights = to_device(layer, skip=tuple(_ROUTED + name for name in _EXPERTS))
        attn_w = {k: v for k, v in weights.items() if k.startswith(_SA) or k == _PRE_NORM}
        if not attn_static["index_topk"]:  # unused indexer leaves would only add a compiled variant
            attn_w = {k: v for k, v in attn_w.items() if not k.startswith(_IDX)}
        x = _attention(x, attn_w, cos, sin, scale, **attn_static)
        mlp_w = {k: v for k, v in weights.items() if not k.startswith(_SA) and k != _PRE_NORM}
        if i < cfg.first_k_dense:
            x = _dense_mlp(x, mlp_w, eps=eps, dtype=dtype)
        else:
            out, h, ids, gate_w = _moe_route(x, mlp_w, scaling, **moe_static)
            x = routed_experts(out, h, np.asarray(ids), np.asarray(gate_w),
                               {name: layer[_ROUTED + name] for name in _EXPERTS}, dtype).reshape(x.shape)
        x = x.block_until_ready()
        release(weights)
        del layer, weights, attn_w, mlp_w

    head, transposed = lm_head(params, cfg.tied)
    logits = final_logits(x, params.top(FINAL_NORM), head, eps=eps, transposed=transposed, dtype=dtype)
    return np.asarray(logits)[..., : cfg.vocab], _notes(cfg, seq_len)
