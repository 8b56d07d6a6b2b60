"""MaxText's Gemma3 forward (maxtext-layout.md §1.5, §9.4) in JAX over a MaxText parameter tree.

Composed from `verify/blocks.py`. What differs from Qwen3's forward (`verify/forward.py`):
sandwich norms (`x + PostAttnNorm(Attn(PreAttnNorm(x)))`, the same around the MLP), the stored norm scales
already hold `1 + w`, GeGLU with tanh gelu, the query multiplied by `query_pre_attn_scalar ** -0.5` after
q/k RMSNorm and RoPE, local layers (five of every six) with a causal sliding window and their own RoPE
θ, global layers with linearly scaled RoPE. The embedding table already carries the bf16(√E) factor, so
the lookup is not scaled, and the tied logits are `(h · E_mtᵀ) / √E`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

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

__all__ = ["Gemma3Config", "attention_mask", "gemma3_logits"]
_PRE_ATTN, _POST_ATTN = "pre_self_attention_norm/scale", "post_self_attention_norm/scale"
_PRE_FFW, _POST_FFW = "pre_ffw_norm/scale", "post_ffw_norm/scale"
_WI0, _WI1, _WO = "mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel"


@dataclass(frozen=True)
class Gemma3Config:
    """The hyper-parameters of the Gemma3 forward, from an HF config (old or transformers-5 spelling)."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    vocab: int
    rms_eps: float
    query_scale: float
    sliding_window: int
    global_layers: tuple[bool, ...]
    local_rope: tuple[float, float]      # (theta, linear factor)
    global_rope: tuple[float, float]

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Gemma3Config:
        cfg = family.model_config(cfg)
        if cfg.get("hidden_activation") not in family.TANH_GELU:
            raise ValueError(f"hidden_activation {cfg.get('hidden_activation')!r}: only the tanh gelu is implemented")
        d = family.dims(cfg)
        if d["N"] % d["K"] or d["D"] % 2:
            raise ValueError(f"need num_key_value_heads | num_attention_heads and an even head_dim, got {d}")
        rope = family.rope(cfg)
        return cls(
            num_layers=d["L"], hidden=d["E"], num_heads=d["N"], num_kv_heads=d["K"], head_dim=d["D"],
            mlp_dim=d["F"], vocab=d["V"], rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            query_scale=float(cfg["query_pre_attn_scalar"]) ** -0.5, sliding_window=int(cfg["sliding_window"]),
            global_layers=tuple(t == "full_attention" for t in family.layer_types(cfg)),
            local_rope=rope["sliding_attention"], global_rope=rope["full_attention"],
        )


@partial(jax.jit, static_argnames=("eps", "query_scale", "dtype"))
def _layer(x: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array, mask: jax.Array, *,
           eps: float, query_scale: float, dtype: str) -> jax.Array:
    """One Gemma3 decoder layer on x (B, T, E): sandwich norms around attention and around the GeGLU MLP."""
    dt = jnp.dtype(dtype)
    w = {k: v.astype(dt) for k, v in w.items()}
    h = rms_norm(x, w[_PRE_ATTN], eps, dt)
    attn = self_attention(h, subtree(w, "self_attention/"), cos, sin, mask, eps=eps, dtype=dt, query_scale=query_scale)
    x = x + rms_norm(attn, w[_POST_ATTN], eps, dt)
    h = rms_norm(x, w[_PRE_FFW], eps, dt)
    return x + rms_norm(gated_mlp(h, w[_WI0], w[_WI1], w[_WO], "gelu_tanh"), w[_POST_FFW], eps, dt)


def _layer_weights(layer: dict[str, np.ndarray], cfg: Gemma3Config, i: int) -> dict[str, np.ndarray]:
    e, n, k, d, f = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    shapes = ({_PRE_ATTN: (e,), _POST_ATTN: (e,), _PRE_FFW: (e,), _POST_FFW: (e,)}
              | attention_shapes(e, n, k, d, qk_norm="head") | mlp_shapes(e, f))
    return select_leaves(layer, shapes, i)


def gemma3_logits(params: ParamSource, cfg: Gemma3Config, tokens: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """tokens int (B, T) -> logits float32 (B, T, V) with MaxText's Gemma3 math, one layer read at a time.

    The tied logits go through the stored (√E-scaled) table and are divided by √E (normalize_embedding_logits).
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
                   dtype=dtype).block_until_ready()
        release(weights)
    logits = final_logits(x, params.top(FINAL_NORM), params.top(EMBEDDING), eps=float(cfg.rms_eps), transposed=True,
                          dtype=dtype, normalize=True)
    return np.asarray(logits)[..., : cfg.vocab]
