"""GPT-OSS forward with MaxText's math (maxtext-layout.md §10.4) over a MaxText tree, one layer at a time.

Per layer: `x + Attn(RMSNorm(x))` then `+ MoE(RMSNorm(·))`, composed from `verify/blocks.py`.

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

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ckpt_cli.verify.blocks import (
    FINAL_NORM,
    LM_HEAD,
    ParamSource,
    attention_mask,
    attention_shapes,
    embed_tokens,
    final_logits,
    moe_shapes,
    release,
    rms_norm,
    route_topk_softmax,
    routed_experts,
    select_leaves,
    self_attention,
    subtree,
    to_device,
    yarn_inv_freq,
    yarn_mscale,
)
from ckpt_cli.verify.blocks import rope_tables as cos_sin_tables

A, MLP = "GptOssAttention/", "GptOssMlp/"
_PRE_NORM, _POST_NORM = "pre_self_attention_layer_norm/scale", "post_self_attention_layer_norm/scale"
_EXPERTS = ("wi_0", "wi_0_bias", "wi_1", "wi_1_bias", "wo", "wo_bias")
_BIASED = ("query", "key", "value", "out")
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


def rope_tables(cfg: GptOssConfig, length: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin (T, D/2) float32 with YaRN frequencies, both times the attention factor (0.1·ln(factor) + 1)."""
    inv = yarn_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max, cfg.beta_fast,
                        cfg.beta_slow, cfg.rope_truncate)
    scale = cfg.attention_factor if cfg.attention_factor is not None else yarn_mscale(cfg.rope_factor)
    return cos_sin_tables(inv, length, scale)


@partial(jax.jit, static_argnames=("eps", "query_scale", "top_k", "dtype"))
def _attention_route(x: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array, mask: jax.Array, *,
                     eps: float, query_scale: float, top_k: int, dtype: str):
    """x after attention (B,T,E), the MoE input h (BT,E), expert ids (BT,k) and their weights (BT,k) float32."""
    dt = jnp.dtype(dtype)
    w = {k: v.astype(dt) for k, v in w.items()}
    h = rms_norm(x, w[_PRE_NORM], eps, dt)
    x = x + self_attention(h, subtree(w, A), cos, sin, mask, eps=eps, dtype=dt, query_scale=query_scale)
    h = rms_norm(x, w[_POST_NORM], eps, dt).reshape(-1, x.shape[-1])
    weights, ids = route_topk_softmax(h @ w[MLP + "gate/kernel"] + w[MLP + "gate/bias"], top_k)
    return x, h, ids, weights


@dataclass(frozen=True)
class ClampedSwiGLU:
    """GPT-OSS's expert: ``g = min(h·wi_0 + b0, limit)``, ``u = clip(h·wi_1 + b1, ±limit)``,
    ``(g·σ(alpha·g))·(u + 1)·wo + bo`` (hashable: the expert FFN of :func:`~ckpt_cli.verify.blocks.routed_experts`)."""

    limit: float
    alpha: float

    def __call__(self, h: jax.Array, w: dict[str, jax.Array]) -> jax.Array:
        g = jnp.minimum(h @ w["wi_0"] + w["wi_0_bias"], self.limit)
        u = jnp.clip(h @ w["wi_1"] + w["wi_1_bias"], -self.limit, self.limit)
        return ((g * jax.nn.sigmoid(self.alpha * g)) * (u + 1)) @ w["wo"] + w["wo_bias"]


def _layer_weights(layer: dict[str, np.ndarray], cfg: GptOssConfig, i: int) -> dict[str, np.ndarray]:
    e, n, kv, d = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = ({_PRE_NORM: (e,), _POST_NORM: (e,)} | attention_shapes(e, n, kv, d, prefix=A, bias=_BIASED, sinks=True)
              | moe_shapes(e, cfg.num_experts, cfg.moe_dim, prefix=MLP, router_bias=True, expert_bias=True))
    return select_leaves(layer, shapes, i)


def gpt_oss_logits(params: ParamSource, cfg: GptOssConfig, tokens: np.ndarray, dtype: str = "float32"
                   ) -> np.ndarray:
    """tokens int (B,T) -> logits float32 (B,T,V) with MaxText's GPT-OSS math, one layer read at a time."""
    tokens = np.asarray(tokens)
    x = embed_tokens(params, cfg, tokens, dtype)
    cos, sin = rope_tables(cfg, tokens.shape[1])
    masks = {False: jnp.asarray(attention_mask(tokens.shape[1])),
             True: jnp.asarray(attention_mask(tokens.shape[1], cfg.sliding_window))}
    ffn = ClampedSwiGLU(cfg.swiglu_limit, cfg.swiglu_alpha)
    for i in range(cfg.num_layers):
        layer = _layer_weights(params.layer(i), cfg, i)
        experts = {name: layer[MLP + name] for name in _EXPERTS}
        dense = to_device(layer, skip=tuple(MLP + name for name in _EXPERTS))
        x, h, ids, weights = _attention_route(x, dense, cos, sin, masks[cfg.sliding[i]], eps=float(cfg.rms_eps),
                                              query_scale=cfg.head_dim**-0.5, top_k=cfg.experts_per_tok, dtype=dtype)
        acc = routed_experts(jnp.zeros(h.shape, jnp.dtype(dtype)), h, np.asarray(ids), np.asarray(weights), experts,
                             dtype, ffn)
        x = (x + acc.reshape(x.shape)).block_until_ready()
        release(dense)
        del layer, experts
    logits = final_logits(x, params.top(FINAL_NORM), params.top(LM_HEAD), eps=float(cfg.rms_eps), transposed=False,
                          dtype=dtype)
    return np.asarray(logits)[..., : cfg.vocab]
