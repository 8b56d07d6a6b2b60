"""MaxText's Gemma, Gemma 2 and Gemma3 forwards (maxtext-layout.md §1.5, §9.4) in JAX over a MaxText tree.

Composed from `verify/blocks.py`. What differs from Qwen3's forward (`verify/forward.py`): the stored norm scales
already hold `1 + w` (so no norm offset), GeGLU with tanh gelu, the embedding table already carries the √E factor
(so the lookup is not scaled) and the tied logits are `(h · E_mtᵀ) / √E`. Per family:

- gemma3: sandwich norms (`x + PostAttnNorm(Attn(PreAttnNorm(x)))`, the same around the MLP), q/k RMSNorm, the
  query multiplied by `query_pre_attn_scalar ** -0.5` after RoPE (run time), local layers (five of every six)
  with a causal sliding window and their own RoPE θ, global layers with linearly scaled RoPE.
- gemma2: sandwich norms, no q/k norm, the query scale already folded into the kernel, attention logits
  soft-capped (`c · tanh(s / c)`) before the mask, even layers local (sliding window), odd layers global (one RoPE
  θ), final logits soft-capped; the MaxText layer i holds both (leaves `*_local`, `*_global`).
- gemma: pre-norms only (`x + Attn(Norm(x))`, `x + MLP(Norm(x))`), the query scale folded, every layer global.

The options come with the leaves a layer selects: post norms and q/k norms are applied where present.
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
from ckpt_cli.verify.blocks import (
    EMBEDDING,
    FINAL_NORM,
    ParamSource,
    attention_mask,
    attention_shapes,
    embed_tokens,
    final_logits,
    gated_mlp,
    mlp_shapes,
    release,
    rms_norm,
    rope_inv_freq,
    rope_tables,
    select_leaves,
    self_attention,
    subtree,
    to_device,
)

_PRE_ATTN, _POST_ATTN = "pre_self_attention_norm/scale", "post_self_attention_norm/scale"
_PRE_FFW, _POST_FFW = "pre_ffw_norm/scale", "post_ffw_norm/scale"
_WI0, _WI1, _WO = "mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel"


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


@partial(jax.jit, static_argnames=("eps", "query_scale", "dtype", "soft_cap"))
def _layer(x: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array, mask: jax.Array, *,
           eps: float, query_scale: float, dtype: str, soft_cap: float | None = None) -> jax.Array:
    """One Gemma decoder layer on x (B, T, E): pre-norms, and post-norms (sandwich) where the layer has them."""
    dt = jnp.dtype(dtype)
    w = {k: v.astype(dt) for k, v in w.items()}

    def post(y: jax.Array, leaf: str) -> jax.Array:
        return rms_norm(y, w[leaf], eps, dt) if leaf in w else y

    h = rms_norm(x, w[_PRE_ATTN], eps, dt)
    attn = self_attention(h, subtree(w, "self_attention/"), cos, sin, mask, eps=eps, dtype=dt,
                          query_scale=query_scale, soft_cap=soft_cap)
    x = x + post(attn, _POST_ATTN)
    h = rms_norm(x, w[_PRE_FFW], eps, dt)
    return x + post(gated_mlp(h, w[_WI0], w[_WI1], w[_WO], "gelu_tanh"), _POST_FFW)


_SIDE = re.compile(r"^([a-z_]+?)_(local|global)/")   # Gemma 2's leaves: one MaxText layer holds both kinds


def _layer_weights(layer: dict[str, np.ndarray], cfg: Gemma3Config, i: int) -> dict[str, np.ndarray]:
    e, n, k, d, f = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    layer = {_SIDE.sub(r"\1/", path): arr for path, arr in layer.items()}
    shapes = ({_PRE_ATTN: (e,), _PRE_FFW: (e,)} | ({_POST_ATTN: (e,), _POST_FFW: (e,)} if cfg.post_norms else {})
              | attention_shapes(e, n, k, d, qk_norm="head" if cfg.qk_norm else None) | mlp_shapes(e, f))
    return select_leaves(layer, shapes, i)


def gemma3_logits(params: ParamSource, cfg: Gemma3Config, tokens: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """tokens int (B, T) -> logits float32 (B, T, V) with MaxText's Gemma-family math, one layer read at a time
    (the padded vocabulary rows, if any, cut off).

    The tied logits go through the stored (√E-scaled) table and are divided by √E (normalize_embedding_logits),
    then soft-capped (Gemma 2).
    """
    tokens = np.asarray(tokens)
    x = embed_tokens(params, cfg, tokens, dtype)
    length = tokens.shape[1]
    rope = {glob: rope_tables(rope_inv_freq(cfg.head_dim, *(cfg.global_rope if glob else cfg.local_rope)), length)
            for glob in (False, True)}
    masks = {False: jnp.asarray(attention_mask(length, cfg.sliding_window)),
             True: jnp.asarray(attention_mask(length, None))}
    for i in range(cfg.num_layers):
        weights = to_device(_layer_weights(params.layer(i), cfg, i))
        glob = cfg.global_layers[i]
        x = _layer(x, weights, *rope[glob], masks[glob], eps=float(cfg.rms_eps), query_scale=cfg.query_scale,
                   dtype=dtype, soft_cap=cfg.attn_softcap).block_until_ready()
        release(weights)
    logits = final_logits(x, params.top(FINAL_NORM), params.top(EMBEDDING), eps=float(cfg.rms_eps), transposed=True,
                          dtype=dtype, normalize=True, soft_cap=cfg.final_softcap)
    return np.asarray(logits)[..., : cfg.vocab]
