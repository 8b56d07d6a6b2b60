"""Reference JAX forward pass of MaxText's DeepSeek decoder math (MLA attention + DeepSeek MoE).

Covers DeepSeek V2 (V2-Lite: plain query projection, softmax routing), V3 (low-rank query, sigmoid
routing with a correction bias) and V3.2 (V3 plus the sparse-attention "lightning indexer"). Weights
are read one decoder layer at a time through the :class:`~ckpt_cli.verify.forward.ParamSource`
protocol (per-layer MaxText leaves, maxtext-layout.md §7.2/§7.3), so peak memory is about one layer
of weights plus activations. Math: maxtext-layout.md §7.4; where MaxText and transformers differ in a
configurable detail, the values of the HF ``config.json`` decide, as transformers applies them:

* YaRN frequencies and the cos/sin factor ``attention_factor`` (1.0 for every released DeepSeek
  config, where ``mscale == mscale_all_dim``); softmax scale ``Dq^-0.5 · m²`` with
  ``m = 0.1·mscale_all_dim·ln(factor) + 1`` (``m = 1`` without ``mscale_all_dim`` or when factor ≤ 1).
* MLA RoPE on interleaved pairs (dims 2i, 2i+1); the indexer's RoPE uses halves (i, Dr/2+i).
* Group-limited routing whenever the config asks for it (V3 ``n_group``/``topk_group``; V2
  ``topk_method: group_limited_greedy``). MaxText's deepseek3 config leaves it off by default.
* The q/kv latent RMSNorms use eps 1e-6 regardless of ``rms_norm_eps`` (as transformers builds them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ckpt_cli.verify.forward import ParamSource, _rms_norm, _rope, embed_tokens, select_leaves

VERSIONS = ("v2", "v3", "v3.2")
_MODEL_TYPES = {"deepseek_v2": "v2", "deepseek_v3": "v3", "deepseek_v32": "v3.2", "kimi_k2": "v3"}   # Kimi K2: V3
_DTYPES = ("float32", "bfloat16")
# Same convention as MaxText: a large finite negative value instead of -inf.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
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
_Q = _SA + "query/kernel"
_WQ_A, _Q_NORM, _WQ_B = _SA + "wq_a/kernel", _SA + "q_norm/scale", _SA + "wq_b/kernel"
_WKV_A, _KV_NORM, _WKV_B = _SA + "wkv_a/kernel", _SA + "kv_norm/scale", _SA + "wkv_b/kernel"
_O = _SA + "out/kernel"
_IDX = _SA + "indexer/"
_IDX_WQ_B, _IDX_WK = _IDX + "wq_b/kernel", _IDX + "wk/kernel"
_IDX_K_SCALE, _IDX_K_BIAS = _IDX + "k_norm/scale", _IDX + "k_norm/bias"
_IDX_WPROJ = _IDX + "weights_proj/kernel"
_WI0, _WI1, _WO = "mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel"
_MOE = "DeepSeekMoeBlock_0/"
_GATE, _GATE_BIAS = _MOE + "MoeBlock_0/gate/kernel", _MOE + "MoeBlock_0/gate/bias"
_EXP_WI0, _EXP_WI1, _EXP_WO = (_MOE + f"MoeBlock_0/{n}" for n in ("wi_0", "wi_1", "wo"))
_SH_WI0, _SH_WI1, _SH_WO = (_MOE + f"shared_experts/{n}/kernel" for n in ("wi_0", "wi_1", "wo"))
_EMBEDDING, _FINAL_NORM, _LM_HEAD = (
    "token_embedder/embedding",
    "decoder/decoder_norm/scale",
    "decoder/logits_dense/kernel",
)
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


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(cfg: DeepseekConfig) -> float:
    """MLA softmax scale: ``Dq^-0.5``, times ``m²`` (``m`` from ``mscale_all_dim``) under YaRN."""
    scale = cfg.qk_head_dim**-0.5
    if cfg.rope_factor is not None and cfg.mscale_all_dim:
        m = _yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
        scale *= m * m
    return scale


def rope_attention_factor(cfg: DeepseekConfig) -> float:
    """Factor on cos/sin: YaRN's ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` (1 if plain RoPE)."""
    if cfg.rope_factor is None:
        return 1.0
    if cfg.attention_factor is not None:
        return cfg.attention_factor
    if cfg.mscale and cfg.mscale_all_dim:
        return _yarn_mscale(cfg.rope_factor, cfg.mscale) / _yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
    return _yarn_mscale(cfg.rope_factor)


def rope_inv_freq(cfg: DeepseekConfig) -> np.ndarray:
    """Inverse RoPE frequencies (Dr/2,) in float32 for the rope dims, YaRN-blended when configured."""
    return yarn_inv_freq(cfg.qk_rope, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max, cfg.beta_fast,
                         cfg.beta_slow, cfg.rope_truncate)


def yarn_inv_freq(d: int, theta: float, factor: float | None, original_max: int | None, beta_fast: float,
                  beta_slow: float, truncate: bool) -> np.ndarray:
    """Inverse RoPE frequencies (d/2,) in float32: plain (`factor` None) or YaRN-blended (as transformers)."""
    pos_freqs = np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
    extrapolation = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if factor is None:
        return extrapolation
    interpolation = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)

    def correction_dim(rotations: float) -> float:
        return d * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_factor = (np.float32(1) - ramp).astype(np.float32)
    inv = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv.astype(np.float32)


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, dtype: jnp.dtype) -> jax.Array:
    """LayerNorm with bias (the indexer's k_norm): statistics in f32, then cast, scale and shift."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return y.astype(dtype) * scale.astype(dtype) + bias.astype(dtype)


def _swiglu(h: jax.Array, wi0: jax.Array, wi1: jax.Array, wo: jax.Array) -> jax.Array:
    return (jax.nn.silu(h @ wi0) * (h @ wi1)) @ wo


def _cast(w: dict[str, jax.Array], dt: jnp.dtype) -> dict[str, jax.Array]:
    return {k: v.astype(jnp.float32 if k in _KEEP_F32 else dt) for k, v in w.items()}


def _indexer_keep(
    h: jax.Array, q_latent: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array, topk: int
) -> jax.Array:
    """V3.2 lightning indexer: bool (B,T,S), True at the top-``topk`` causal keys of every query.

    ``index[b,t,s] = Σ_h w[b,t,h]·H^-0.5 · relu(q[b,t,h]·k[b,s] · Hd^-0.5)`` with ``w = x·weights_proj`` (float32).
    Keys tied at the k-th place are taken lowest index first (``jax.lax.top_k``); torch's order is unspecified.
    """
    dr = 2 * cos.shape[-1]
    n_heads, head_dim = w[_IDX_WQ_B].shape[1:]
    q = jnp.einsum("btc,chd->bthd", q_latent, w[_IDX_WQ_B])
    k = _layer_norm(h @ w[_IDX_WK], w[_IDX_K_SCALE], w[_IDX_K_BIAS], _INDEXER_LN_EPS, h.dtype)[:, :, None, :]
    # RoPE on the first Dr dims, in halves (not interleaved pairs) — unlike the MLA rope dims
    q = jnp.concatenate([_rope(q[..., :dr], cos, sin, False), q[..., dr:]], axis=-1)
    k = jnp.concatenate([_rope(k[..., :dr], cos, sin, False), k[..., dr:]], axis=-1)[:, :, 0, :]
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
    h = _rms_norm(x, w[_PRE_NORM], eps, dt)
    q_latent = None
    if _Q in w:  # V2: plain query projection
        q = jnp.einsum("bte,enq->btnq", h, w[_Q])
    else:
        q_latent = _rms_norm(h @ w[_WQ_A], w[_Q_NORM], _LATENT_EPS, dt)
        q = jnp.einsum("btc,cnq->btnq", q_latent, w[_WQ_B])
    c = w[_KV_NORM].shape[0]
    kv_a = h @ w[_WKV_A]  # [latent C | shared k_rope Dr]
    latent = _rms_norm(kv_a[..., :c], w[_KV_NORM], _LATENT_EPS, dt)
    k_rope = _rope(kv_a[..., None, c:], cos, sin, interleave)  # (B,T,1,Dr), shared by all heads
    dr = k_rope.shape[-1]
    dn = q.shape[-1] - dr
    kv = jnp.einsum("btc,cnj->btnj", latent, w[_WKV_B])  # per head [k_nope Dn | v Dv]
    k_nope, v = kv[..., :dn], kv[..., dn:]
    q = jnp.concatenate([q[..., :dn], _rope(q[..., dn:], cos, sin, interleave)], axis=-1)
    q = q * scale.astype(dt)  # MaxText scales the query (not the scores)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (*k_nope.shape[:-1], dr))], axis=-1)

    t = x.shape[1]
    scores = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32)
    keep = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
    if index_topk:
        keep = keep & _indexer_keep(h, q_latent, w, cos, sin, index_topk)[:, None]
    probs = jax.nn.softmax(jnp.where(keep, scores, _MASK_VALUE), axis=-1).astype(dt)
    attn = jnp.einsum("bnts,bsnd->btnd", probs, v)
    return x + jnp.einsum("btnd,nde->bte", attn, w[_O])


@partial(jax.jit, static_argnames=("eps", "dtype"))
def _dense_mlp(x: jax.Array, w: dict[str, jax.Array], *, eps: float, dtype: str) -> jax.Array:
    """Pre-norm SwiGLU MLP with residual (dense layers)."""
    dt = jnp.dtype(dtype)
    w = _cast(w, dt)
    return x + _swiglu(_rms_norm(x, w[_POST_NORM], eps, dt), w[_WI0], w[_WI1], w[_WO])


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
    h = _rms_norm(x, w[_POST_NORM], eps, dt)
    base = x + _swiglu(h, w[_SH_WI0], w[_SH_WI1], w[_SH_WO]) if _SH_WI0 in w else x
    h, base = h.reshape(-1, h.shape[-1]), base.reshape(-1, h.shape[-1])
    logits = h.astype(jnp.float32) @ w[_GATE]
    n_exp = logits.shape[-1]
    if scoring == "softmax":  # V2: top-k of softmax scores; groups ranked by their best expert
        scores = jax.nn.softmax(logits, axis=-1)
        if n_group is not None:
            grouped = scores.reshape(-1, n_group, n_exp // n_group)
            _, best = jax.lax.top_k(grouped.max(axis=-1), topk_group)
            in_group = jnp.zeros(grouped.shape[:2], bool).at[jnp.arange(grouped.shape[0])[:, None], best].set(True)
            scores = jnp.where(jnp.repeat(in_group, n_exp // n_group, axis=-1), scores, 0.0)
        weights, ids = jax.lax.top_k(scores, top_k)
    else:  # V3/V3.2: select on sigmoid + bias (groups ranked by their two best), weigh by the pre-bias scores
        scores = jax.nn.sigmoid(logits)
        choice = scores + w[_GATE_BIAS] if _GATE_BIAS in w else scores
        if n_group is not None:
            grouped = choice.reshape(-1, n_group, n_exp // n_group)
            group_scores = jax.lax.top_k(grouped, min(2, grouped.shape[-1]))[0].sum(axis=-1)
            _, best = jax.lax.top_k(group_scores, topk_group)
            in_group = jnp.zeros(grouped.shape[:2], bool).at[jnp.arange(grouped.shape[0])[:, None], best].set(True)
            choice = jnp.where(jnp.repeat(in_group, n_exp // n_group, axis=-1), choice, -jnp.inf)
        _, ids = jax.lax.top_k(choice, top_k)
        weights = jnp.take_along_axis(scores, ids, axis=-1)
    if norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return base, h, ids, weights * scaling


@partial(jax.jit, static_argnames=("dtype",))
def _expert_add(
    out: jax.Array,
    h: jax.Array,
    rows: jax.Array,
    coef: jax.Array,
    wi0: jax.Array,
    wi1: jax.Array,
    wo: jax.Array,
    *,
    dtype: str,
) -> jax.Array:
    """out[rows] += coef · expert(h[rows]); padding rows point past the end and are dropped."""
    dt = jnp.dtype(dtype)
    hr = jnp.take(h, rows, axis=0, mode="fill", fill_value=0)
    y = _swiglu(hr, wi0.astype(dt), wi1.astype(dt), wo.astype(dt)) * coef[:, None].astype(dt)
    return out.at[rows].add(y.astype(out.dtype), mode="drop")


@partial(jax.jit, static_argnames=("eps", "transposed", "dtype"))
def _final_logits(
    x: jax.Array, scale: jax.Array, head: jax.Array, *, eps: float, transposed: bool, dtype: str
) -> jax.Array:
    dt = jnp.dtype(dtype)
    h = _rms_norm(x, scale, eps, dt)
    spec = "bte,ve->btv" if transposed else "bte,ev->btv"
    return jnp.einsum(spec, h, head.astype(dt)).astype(jnp.float32)


def _expected_shapes(cfg: DeepseekConfig, moe: bool) -> dict[str, tuple[int, ...]]:
    e, n, c = cfg.hidden, cfg.num_heads, cfg.kv_lora_rank
    dq, dr, dn, dv = cfg.qk_head_dim, cfg.qk_rope, cfg.qk_nope, cfg.v_head
    shapes: dict[str, tuple[int, ...]] = {
        _PRE_NORM: (e,),
        _POST_NORM: (e,),
        _WKV_A: (e, c + dr),
        _KV_NORM: (c,),
        _WKV_B: (c, n, dn + dv),
        _O: (n, dv, e),
    }
    if cfg.q_lora_rank:
        shapes |= {_WQ_A: (e, cfg.q_lora_rank), _Q_NORM: (cfg.q_lora_rank,), _WQ_B: (cfg.q_lora_rank, n, dq)}
    else:
        shapes[_Q] = (e, n, dq)
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
        f = cfg.intermediate
        return shapes | {_WI0: (e, f), _WI1: (e, f), _WO: (f, e)}
    x, m, s = cfg.n_routed_experts, cfg.moe_intermediate, cfg.n_shared * cfg.moe_intermediate
    shapes |= {_GATE: (e, x), _EXP_WI0: (x, e, m), _EXP_WI1: (x, e, m), _EXP_WO: (x, m, e)}
    if cfg.router_bias:
        shapes[_GATE_BIAS] = (x,)
    if s:
        shapes |= {_SH_WI0: (e, s), _SH_WI1: (e, s), _SH_WO: (s, e)}
    return shapes


def _layer_weights(layer: dict[str, np.ndarray], cfg: DeepseekConfig, i: int) -> dict[str, np.ndarray]:
    """Select and shape-check the leaves of HF layer ``i`` used by the forward."""
    shapes = _expected_shapes(cfg, moe=i >= cfg.first_k_dense)
    return select_leaves(layer, shapes, i)


def _bucket(n: int, cap: int) -> int:
    """Padded row count for ``n`` routed rows (a power of two >= 256, at most ``cap``): bounds recompilation."""
    return min(max(1 << max(n - 1, 0).bit_length(), 256), cap)


def _routed_experts(
    out: jax.Array, h: jax.Array, ids: np.ndarray, weights: np.ndarray, layer: dict[str, np.ndarray], dtype: str
) -> jax.Array:
    """Add every hit expert's weighted SwiGLU output to ``out`` (BT,E); only the tokens routed to it are computed."""
    rows_total = h.shape[0]
    for x in np.unique(ids):
        rows, slots = np.nonzero(ids == x)
        size = _bucket(len(rows), rows_total)
        padded = np.full(size, rows_total, dtype=np.int32)
        padded[: len(rows)] = rows
        coef = np.zeros(size, dtype=np.float32)
        coef[: len(rows)] = weights[rows, slots]
        experts = jax.block_until_ready([jax.device_put(layer[k][x]) for k in (_EXP_WI0, _EXP_WI1, _EXP_WO)])
        out = _expert_add(out, h, padded, coef, *experts, dtype=dtype)
        for a in experts:
            a.delete()
    return out


@jax.jit
def _tick() -> jax.Array:
    return jnp.zeros((), jnp.float32)


def _flush_host_refs() -> None:
    """jaxlib keeps a reference to the numpy source of a host-to-device transfer until its next execution
    after the transfer (and the deletion of the device copy) has settled; two trivial executions let the
    previous layer's arrays go before the next ``params.layer`` fetch rather than during the next layer."""
    for _ in range(2):
        _tick().block_until_ready()


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
    angles = np.arange(seq_len, dtype=np.float32)[:, None] * rope_inv_freq(cfg)[None, :]
    attention_factor = np.float32(rope_attention_factor(cfg))
    cos = jnp.asarray((np.cos(angles) * attention_factor).astype(np.float32))
    sin = jnp.asarray((np.sin(angles) * attention_factor).astype(np.float32))
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
    experts = (_EXP_WI0, _EXP_WI1, _EXP_WO)
    for i in range(cfg.num_layers):
        layer = _layer_weights(params.layer(i), cfg, i)
        # Transfers are awaited so that jaxlib's hold on the numpy sources ends before the layer is computed
        # (it releases them lazily, at its next execution: see _flush_host_refs).
        weights = jax.block_until_ready({k: jax.device_put(v) for k, v in layer.items() if k not in experts})
        attn_w = {k: v for k, v in weights.items() if k.startswith(_SA) or k == _PRE_NORM}
        if not attn_static["index_topk"]:  # unused indexer leaves would only add a compiled variant
            attn_w = {k: v for k, v in attn_w.items() if not k.startswith(_IDX)}
        x = _attention(x, attn_w, cos, sin, scale, **attn_static)
        mlp_w = {k: v for k, v in weights.items() if not k.startswith(_SA) and k != _PRE_NORM}
        if i < cfg.first_k_dense:
            x = _dense_mlp(x, mlp_w, eps=eps, dtype=dtype)
        else:
            out, h, ids, gate_w = _moe_route(x, mlp_w, scaling, **moe_static)
            x = _routed_experts(out, h, np.asarray(ids), np.asarray(gate_w), layer, dtype).reshape(x.shape)
        x = x.block_until_ready()
        for w in weights.values():
            w.delete()
        _flush_host_refs()
        del layer, weights, attn_w, mlp_w

    if cfg.tied:
        head, transposed = params.top(_EMBEDDING), True
    elif params.has_top(_LM_HEAD):
        head, transposed = params.top(_LM_HEAD), False
    else:
        raise KeyError(f"untied config but {_LM_HEAD} is absent")
    logits = _final_logits(x, params.top(_FINAL_NORM), head, eps=eps, transposed=transposed, dtype=dtype)
    return np.asarray(logits)[..., : cfg.vocab], _notes(cfg, seq_len)
