"""GPT-OSS forward with MaxText's math (maxtext-layout.md §10.4) over a MaxText tree, one layer at a time.

Per layer: `x + Attn(RMSNorm(x))` then `+ MoE(RMSNorm(·))`.

* Attention: q/k/v with biases, YaRN rotate-half RoPE whose cos/sin carry the attention factor
  (`0.1·ln(factor) + 1`), query × `D^-0.5` at run time, GQA, a causal mask that on the local layers
  (the config's `layer_types`, `sliding_attention`) also keeps only the last `sliding_window` positions
  (`q - k < W`), and a learned per-head sink logit joined to each softmax row and dropped after it;
  output projection with bias.
* MoE: router logits `h·gate + bias`, top-k of the logits, softmax over those k (float32); each expert
  `g = min(h·wi_0 + b0, limit)`, `u = clip(h·wi_1 + b1, -limit, limit)`, `(g·σ(alpha·g))·(u + 1)·wo + bo`,
  weighted and summed in expert order. One expert's weights are on the device at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ckpt_cli.verify.deepseek import yarn_inv_freq
from ckpt_cli.verify.forward import (
    _MASK_VALUE,
    ParamSource,
    _final_logits,
    _rms_norm,
    _rope,
    embed_tokens,
    select_leaves,
)

A, MLP = "GptOssAttention/", "GptOssMlp/"
_PRE_NORM, _POST_NORM = "pre_self_attention_layer_norm/scale", "post_self_attention_layer_norm/scale"
_EXPERT_LEAVES = tuple(MLP + n for n in ("wi_0", "wi_0_bias", "wi_1", "wi_1_bias", "wo", "wo_bias"))
SWIGLU_ALPHA = 1.702


@dataclass(frozen=True)
class GptOssConfig:
    """What the GPT-OSS forward needs from an HF config."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    num_experts: int
    experts_per_tok: int
    moe_dim: int
    sliding: tuple[bool, ...]        # per layer: sliding-window (local) attention
    sliding_window: int
    rope_theta: float
    rope_factor: float
    rope_original_max: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    rope_truncate: bool = True
    attention_factor: float | None = None
    swiglu_limit: float = 7.0
    swiglu_alpha: float = SWIGLU_ALPHA

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_key_value_heads={self.num_kv_heads} must divide num_attention_heads")
        if not 0 < self.experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.experts_per_tok} must lie in [1, {self.num_experts}]")
        if len(self.sliding) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.sliding)} entries for {self.num_layers} layers")
        if any(self.sliding) and self.sliding_window <= 0:
            raise ValueError("sliding_attention layers need a positive sliding_window")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> GptOssConfig:
        """From a transformers config.json dict (legacy `rope_scaling` or transformers-5 `rope_parameters`)."""
        rope: dict[str, Any] = dict(cfg.get("rope_scaling") or {})
        rope.update(cfg.get("rope_parameters") or {})
        if (rope.get("rope_type") or rope.get("type")) != "yarn":
            raise ValueError(f"rope_type {rope.get('rope_type')!r}: the GPT-OSS forward implements yarn only")
        layers = int(cfg["num_hidden_layers"])
        types = cfg.get("layer_types") or [("sliding_attention", "full_attention")[i % 2] for i in range(layers)]
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise ValueError(f"unknown layer_types {unknown}")
        heads = int(cfg["num_attention_heads"])
        original = int(rope.get("original_max_position_embeddings") or cfg["max_position_embeddings"])
        factor = rope.get("factor")
        attention_factor = rope.get("attention_factor")
        return cls(
            num_layers=layers, hidden=int(cfg["hidden_size"]), num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads), vocab=int(cfg["vocab_size"]),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-5)), num_experts=int(cfg["num_local_experts"]),
            experts_per_tok=int(cfg["num_experts_per_tok"]), moe_dim=int(cfg["intermediate_size"]),
            sliding=tuple(t == "sliding_attention" for t in types), sliding_window=int(cfg.get("sliding_window") or 0),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 150000.0))),
            rope_factor=float(factor) if factor is not None else int(cfg["max_position_embeddings"]) / original,
            rope_original_max=original, beta_fast=float(rope.get("beta_fast") or 32),
            beta_slow=float(rope.get("beta_slow") or 1), rope_truncate=bool(rope.get("truncate", True)),
            attention_factor=None if attention_factor is None else float(attention_factor),
            swiglu_limit=float(cfg.get("swiglu_limit", 7.0)), swiglu_alpha=float(cfg.get("swiglu_alpha", SWIGLU_ALPHA)),
        )


def rope_tables(cfg: GptOssConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (T, D/2) float32 with YaRN frequencies, both times the attention factor (0.1·ln(factor) + 1)."""
    inv = yarn_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max, cfg.beta_fast,
                        cfg.beta_slow, cfg.rope_truncate)
    scale = cfg.attention_factor
    if scale is None:
        scale = 1.0 if cfg.rope_factor <= 1 else 0.1 * math.log(cfg.rope_factor) + 1.0
    angles = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return (np.cos(angles) * np.float32(scale)).astype(np.float32), (np.sin(angles) * np.float32(scale)).astype(
        np.float32)


@partial(jax.jit, static_argnames=("eps", "window", "top_k", "dtype"))
def _attention_route(x: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array, *, eps: float,
                     window: int | None, top_k: int, dtype: str):
    """x after attention (B,T,E), the MoE input h (BT,E), expert ids (BT,k) and their weights (BT,k) float32."""
    dt = jnp.dtype(dtype)
    w = {k: v.astype(dt) for k, v in w.items()}
    h = _rms_norm(x, w[_PRE_NORM], eps, dt)
    q = jnp.einsum("bte,end->btnd", h, w[A + "query/kernel"]) + w[A + "query/bias"]
    k = jnp.einsum("bte,ekd->btkd", h, w[A + "key/kernel"]) + w[A + "key/bias"]
    v = jnp.einsum("bte,ekd->btkd", h, w[A + "value/kernel"]) + w[A + "value/bias"]
    q, k = _rope(q, cos, sin, False), _rope(k, cos, sin, False)
    b, t, n, d = q.shape
    kv = k.shape[2]
    q = (q * jnp.asarray(d**-0.5, dt)).reshape(b, t, kv, n // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32)
    pos = jnp.arange(t)
    keep = pos[:, None] >= pos[None, :]
    if window is not None:
        keep &= (pos[:, None] - pos[None, :]) < window
    scores = jnp.where(keep, scores, _MASK_VALUE)
    sink = w[A + "sinks"].astype(jnp.float32).reshape(kv, n // kv)[None, :, :, None, None]
    sink = jnp.broadcast_to(sink, (*scores.shape[:-1], 1))
    probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1].astype(dt)
    attn = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, n, d)
    x = x + jnp.einsum("btnd,nde->bte", attn, w[A + "out/kernel"]) + w[A + "out/bias"]

    h = _rms_norm(x, w[_POST_NORM], eps, dt).reshape(-1, x.shape[-1])
    logits = h @ w[MLP + "gate/kernel"] + w[MLP + "gate/bias"]
    top, ids = jax.lax.top_k(logits.astype(jnp.float32), top_k)
    return x, h, ids, jax.nn.softmax(top, axis=-1)


@partial(jax.jit, static_argnames=("limit", "alpha", "dtype"))
def _expert(acc: jax.Array, h: jax.Array, weight: jax.Array, w: dict[str, jax.Array], *, limit: float, alpha: float,
            dtype: str) -> jax.Array:
    """acc + weight[:, None] · expert(h) for one expert over every token (weight 0 where not routed)."""
    dt = jnp.dtype(dtype)
    w = {k: v.astype(dt) for k, v in w.items()}
    g = jnp.minimum(h @ w["wi_0"] + w["wi_0_bias"], limit)
    u = jnp.clip(h @ w["wi_1"] + w["wi_1_bias"], -limit, limit)
    y = (g * jax.nn.sigmoid(alpha * g)) * (u + 1)
    out = y @ w["wo"] + w["wo_bias"]
    return acc + (out * weight[:, None].astype(dt)).astype(acc.dtype)


def _layer_weights(layer: dict[str, np.ndarray], cfg: GptOssConfig, i: int) -> dict[str, np.ndarray]:
    e, n, kv, d, x, m = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_experts, cfg.moe_dim
    shapes = {
        _PRE_NORM: (e,), _POST_NORM: (e,),
        A + "query/kernel": (e, n, d), A + "query/bias": (n, d), A + "key/kernel": (e, kv, d), A + "key/bias": (kv, d),
        A + "value/kernel": (e, kv, d), A + "value/bias": (kv, d), A + "out/kernel": (n, d, e), A + "out/bias": (e,),
        A + "sinks": (n,), MLP + "gate/kernel": (e, x), MLP + "gate/bias": (x,),
        MLP + "wi_0": (x, e, m), MLP + "wi_1": (x, e, m), MLP + "wi_0_bias": (x, m), MLP + "wi_1_bias": (x, m),
        MLP + "wo": (x, m, e), MLP + "wo_bias": (x, e),
    }
    return select_leaves(layer, shapes, i)


def gpt_oss_logits(params: ParamSource, cfg: GptOssConfig, tokens: np.ndarray, dtype: str = "float32"
                   ) -> np.ndarray:
    """tokens int (B,T) -> logits float32 (B,T,V) with MaxText's GPT-OSS math, one layer read at a time."""
    tokens = np.asarray(tokens)
    x = embed_tokens(params, cfg, tokens, dtype)
    cos, sin = (jnp.asarray(a) for a in rope_tables(cfg, tokens.shape[1]))
    for i in range(cfg.num_layers):
        layer = _layer_weights(params.layer(i), cfg, i)
        dense = {k: jax.device_put(v) for k, v in layer.items() if k not in _EXPERT_LEAVES}
        x, h, ids, weights = _attention_route(x, dense, cos, sin, eps=float(cfg.rms_eps),
                                              window=cfg.sliding_window if cfg.sliding[i] else None,
                                              top_k=cfg.experts_per_tok, dtype=dtype)
        ids, weights = np.asarray(ids), np.asarray(weights)
        acc = jnp.zeros(h.shape, jnp.dtype(dtype))
        for expert in range(cfg.num_experts):
            routed = ids == expert
            if not routed.any():
                continue
            w = {leaf.removeprefix(MLP): layer[leaf][expert] for leaf in _EXPERT_LEAVES}
            acc = _expert(acc, h, jnp.asarray((weights * routed).sum(axis=-1)), w, limit=cfg.swiglu_limit,
                          alpha=cfg.swiglu_alpha, dtype=dtype)
        x = (x + acc.reshape(x.shape)).block_until_ready()
        for arr in dense.values():
            arr.delete()
        del layer, dense
    logits = _final_logits(x, params.top("decoder/decoder_norm/scale"), params.top("decoder/logits_dense/kernel"),
                           eps=float(cfg.rms_eps), transposed=False, dtype=dtype)
    return np.asarray(logits)[..., : cfg.vocab]
