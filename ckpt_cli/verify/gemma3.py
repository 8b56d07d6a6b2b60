"""MaxText's Gemma, Gemma 2 and Gemma3 forwards (maxtext-layout.md §1.5, §9.4) in JAX over a MaxText tree.

What differs from Qwen3's forward (`verify/forward.py`, whose RMSNorm, RoPE and embedding lookup it reuses): the
stored norm scales already hold `1 + w`, GeGLU with tanh gelu, the embedding table already carries the √E factor
(so the lookup is not scaled) and the tied logits are `(h · E_mtᵀ) / √E`. Per family:

- gemma3: sandwich norms (`x + PostAttnNorm(Attn(PreAttnNorm(x)))`, the same around the MLP), q/k RMSNorm, the
  query multiplied by `query_pre_attn_scalar ** -0.5` after RoPE (run time), local layers (five of every six)
  with a causal sliding window and their own RoPE θ, global layers with linearly scaled RoPE.
- gemma2: sandwich norms, no q/k norm, the query scale already folded into the kernel, attention logits
  soft-capped (`c · tanh(s / c)`) before the mask, even layers local (sliding window), odd layers global (one RoPE
  θ), final logits soft-capped; the MaxText layer i holds both (leaves `*_local`, `*_global`).
- gemma: pre-norms only (`x + Attn(Norm(x))`, `x + MLP(Norm(x))`), the query scale folded, every layer global.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ckpt_cli.families import gemma as gemma_family
from ckpt_cli.families import gemma3 as family
from ckpt_cli.verify.forward import (
    ParamSource,
    _rms_norm,
    _rope,
    attention_mask,
    embed_tokens,
    gqa_attention,
    select_leaves,
)

_PRE_ATTN, _POST_ATTN = "pre_self_attention_norm/scale", "post_self_attention_norm/scale"
_PRE_FFW, _POST_FFW = "pre_ffw_norm/scale", "post_ffw_norm/scale"
_Q, _K, _V, _O = (f"self_attention/{n}/kernel" for n in ("query", "key", "value", "out"))
_Q_NORM, _K_NORM = "self_attention/query_norm/scale", "self_attention/key_norm/scale"
_WI0, _WI1, _WO = "mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel"
_EMBEDDING, _FINAL_NORM = "token_embedder/embedding", "decoder/decoder_norm/scale"


@dataclass(frozen=True)
class Gemma3Config:
    """The hyper-parameters of a Gemma-family forward, from an HF config (gemma, gemma2 or gemma3)."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    vocab: int
    rms_eps: float
    query_scale: float                   # applied at run time (1.0: folded into the query kernel)
    sliding_window: int | None
    global_layers: tuple[bool, ...]
    local_rope: tuple[float, float]      # (theta, linear factor)
    global_rope: tuple[float, float]
    qk_norm: bool = True
    post_norms: bool = True
    attn_softcap: float | None = None
    final_softcap: float | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Gemma3Config:
        if cfg.get("model_type") in gemma_family.FAMILY.model_types + gemma_family.FAMILY2.model_types:
            return cls._from_gemma(cfg)
        cfg = family.model_config(cfg)
        if cfg.get("hidden_activation") not in family.TANH_GELU:
            raise ValueError(f"hidden_activation {cfg.get('hidden_activation')!r}: only the tanh gelu is implemented")
        d = family.dims(cfg)
        _check_heads(d)
        rope = family.rope(cfg)
        return cls(
            num_layers=d["L"], hidden=d["E"], num_heads=d["N"], num_kv_heads=d["K"], head_dim=d["D"],
            mlp_dim=d["F"], vocab=d["V"], rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            query_scale=float(cfg["query_pre_attn_scalar"]) ** -0.5, sliding_window=int(cfg["sliding_window"]),
            global_layers=tuple(t == "full_attention" for t in family.layer_types(cfg)),
            local_rope=rope["sliding_attention"], global_rope=rope["full_attention"],
        )

    @classmethod
    def _from_gemma(cls, cfg: dict) -> Gemma3Config:
        """Gemma / Gemma 2: the query scale is in the kernel; Gemma 2 alternates local and global layers."""
        two = cfg["model_type"] in gemma_family.FAMILY2.model_types
        if gemma_family.activation(cfg) not in (*family.TANH_GELU, "gelu"):
            raise ValueError(f"activation {gemma_family.activation(cfg)!r}: only the tanh gelu is implemented")
        d = (gemma_family.gemma2_dims if two else gemma_family.gemma_dims)(cfg)
        _check_heads(d)
        theta = (gemma_family.rope_theta(cfg), 1.0)
        layers = gemma_family.layer_types(cfg) if two else ["full_attention"] * d["L"]
        caps = [cfg.get(k) for k in ("attn_logit_softcapping", "final_logit_softcapping")] if two else [None, None]
        return cls(
            num_layers=d["L"], hidden=d["E"], num_heads=d["N"], num_kv_heads=d["K"], head_dim=d["D"],
            mlp_dim=d["F"], vocab=d["V"], rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), query_scale=1.0,
            sliding_window=int(cfg["sliding_window"]) if two and cfg.get("sliding_window") else None,
            global_layers=tuple(t == "full_attention" for t in layers), local_rope=theta, global_rope=theta,
            qk_norm=False, post_norms=two, attn_softcap=float(caps[0]) if caps[0] else None,
            final_softcap=float(caps[1]) if caps[1] else None,
        )


def _check_heads(d: dict) -> None:
    if d["N"] % d["K"] or d["D"] % 2:
        raise ValueError(f"need num_key_value_heads | num_attention_heads and an even head_dim, got {d}")


def _cos_sin(length: int, head_dim: int, theta: float, factor: float) -> tuple[jax.Array, jax.Array]:
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    angles = np.arange(length, dtype=np.float32)[:, None] * (inv_freq / np.float32(factor))[None, :]
    return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


@partial(jax.jit, static_argnames=("eps", "query_scale", "dtype", "qk_norm", "post_norms", "softcap"))
def _layer(x: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array, mask: jax.Array, *,
           eps: float, query_scale: float, dtype: str, qk_norm: bool = True, post_norms: bool = True,
           softcap: float | None = None) -> jax.Array:
    """One Gemma decoder layer on x (B, T, E)."""
    dt = jnp.dtype(dtype)
    w = {k: v.astype(dt) for k, v in w.items()}
    post = (lambda y, leaf: _rms_norm(y, w[leaf], eps, dt)) if post_norms else (lambda y, leaf: y)
    h = _rms_norm(x, w[_PRE_ATTN], eps, dt)
    q = jnp.einsum("bte,end->btnd", h, w[_Q])
    k = jnp.einsum("bte,ekd->btkd", h, w[_K])
    v = jnp.einsum("bte,ekd->btkd", h, w[_V])
    if qk_norm:
        q, k = _rms_norm(q, w[_Q_NORM], eps, dt), _rms_norm(k, w[_K_NORM], eps, dt)
    q, k = _rope(q, cos, sin, False), _rope(k, cos, sin, False)
    if query_scale != 1.0:
        q = q * jnp.asarray(query_scale, dt)
    attn = gqa_attention(q, k, v, mask, dt, soft_cap=softcap)
    x = x + post(jnp.einsum("btnd,nde->bte", attn, w[_O]), _POST_ATTN)
    h = _rms_norm(x, w[_PRE_FFW], eps, dt)
    mlp = (jax.nn.gelu(h @ w[_WI0], approximate=True) * (h @ w[_WI1])) @ w[_WO]
    return x + post(mlp, _POST_FFW)


@partial(jax.jit, static_argnames=("eps", "dtype", "softcap"))
def _logits(x: jax.Array, scale: jax.Array, table: jax.Array, *, eps: float, dtype: str,
            softcap: float | None = None) -> jax.Array:
    """Final norm, tied head through the stored (√E-scaled) table, divided by √E (normalize_embedding_logits),
    then soft-capped (`c · tanh(z / c)`, Gemma 2)."""
    dt = jnp.dtype(dtype)
    h = _rms_norm(x, scale, eps, dt)
    logits = jnp.einsum("bte,ve->btv", h, table.astype(dt))
    logits = logits / jnp.sqrt(jnp.asarray(x.shape[-1], dt))
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits.astype(jnp.float32)


_SIDE = re.compile(r"^([a-z_]+?)_(local|global)/")   # Gemma 2's leaves: one MaxText layer holds both kinds


def _layer_weights(layer: dict[str, np.ndarray], cfg: Gemma3Config, i: int) -> dict[str, np.ndarray]:
    e, n, k, d, f = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    layer = {_SIDE.sub(r"\1/", path): arr for path, arr in layer.items()}
    shapes = {_PRE_ATTN: (e,), _PRE_FFW: (e,), _Q: (e, n, d), _K: (e, k, d), _V: (e, k, d), _O: (n, d, e),
              _WI0: (e, f), _WI1: (e, f), _WO: (f, e)}
    if cfg.post_norms:
        shapes |= {_POST_ATTN: (e,), _POST_FFW: (e,)}
    if cfg.qk_norm:
        shapes |= {_Q_NORM: (d,), _K_NORM: (d,)}
    return select_leaves(layer, shapes, i)


def gemma3_logits(params: ParamSource, cfg: Gemma3Config, tokens: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """tokens int (B, T) -> logits float32 (B, T, V) with MaxText's Gemma-family math, one layer read at a time
    (the padded vocabulary rows, if any, cut off)."""
    tokens = np.asarray(tokens)
    x = embed_tokens(params, cfg, tokens, dtype)
    length = tokens.shape[1]
    rope = {False: _cos_sin(length, cfg.head_dim, *cfg.local_rope), True: _cos_sin(length, cfg.head_dim,
                                                                                    *cfg.global_rope)}
    masks = {False: jnp.asarray(attention_mask(length, cfg.sliding_window)),
             True: jnp.asarray(attention_mask(length, None))}
    for i in range(cfg.num_layers):
        layer = _layer_weights(params.layer(i), cfg, i)
        weights = {k: jnp.asarray(v) for k, v in layer.items()}
        glob = cfg.global_layers[i]
        x = _layer(x, weights, *rope[glob], masks[glob], eps=float(cfg.rms_eps), query_scale=cfg.query_scale,
                   dtype=dtype, qk_norm=cfg.qk_norm, post_norms=cfg.post_norms,
                   softcap=cfg.attn_softcap).block_until_ready()
        for k, w in weights.items():
            if w is not layer[k]:
                w.delete()
        del layer, weights
    logits = _logits(x, params.top(_FINAL_NORM), params.top(_EMBEDDING), eps=float(cfg.rms_eps), dtype=dtype,
                     softcap=cfg.final_softcap)
    return np.asarray(logits)[..., : cfg.vocab]
