"""MaxText's OLMo 3 forward (models/olmo3.py) in JAX over a MaxText tree, one layer at a time.

Composed from `verify/blocks.py`; what is OLMo 3's own:

* post-norm layers: `x + RMSNorm(Attn(x))`, then `+ RMSNorm(SwiGLU(·))`, no norm before either block;
* q and k RMSNorm over the whole projection (N·D and K·D values, MaxText's GlobalRMSNorm), before RoPE;
* rotate-half RoPE, plain or YaRN (cos and sin times 0.1·ln(factor) + 1), then the query × D^-0.5;
* a causal sliding window (`q - k < W`) on the layers the config's `layer_types` marks `sliding_attention`.

MaxText 0.2.5 builds one rotary embedding for every layer from its config (the full-attention layers' RoPE
in the HF config: `rope_scaling` in the Hub's spelling); transformers >= 5 gives the sliding layers their own
(plain) RoPE. Where the two differ `rope_note` says so: the figures then measure MaxText's own divergence.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ckpt_cli.families import olmo3 as family
from ckpt_cli.verify.blocks import (
    FINAL_NORM,
    ParamSource,
    attention_mask,
    attention_shapes,
    embed_tokens,
    final_logits,
    lm_head,
    mlp_shapes,
    release,
    rms_norm,
    select_leaves,
    self_attention,
    subtree,
    swiglu,
    to_device,
    yarn_inv_freq,
    yarn_mscale,
)
from ckpt_cli.verify.blocks import rope_tables as cos_sin_tables

_ATTN = "attention/"
_POST_ATTN, _POST_MLP = "post_self_attention_layer_norm/scale", "post_mlp_layer_norm/scale"
_WI0, _WI1, _WO = "mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel"


@dataclass(frozen=True)
class Olmo3Config:
    """What the OLMo 3 forward needs from an HF config; one RoPE for every layer, as MaxText computes."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    vocab: int
    rms_eps: float
    sliding: tuple[bool, ...]         # per layer: sliding-window (local) attention
    sliding_window: int
    rope_theta: float
    rope_factor: float | None = None  # YaRN's factor; None for plain RoPE
    rope_original_max: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    rope_truncate: bool = True
    rope_note: str | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads or self.head_dim % 2:
            raise ValueError(f"need num_key_value_heads | num_attention_heads and an even head_dim, got "
                             f"{self.num_heads}, {self.num_kv_heads}, {self.head_dim}")
        if len(self.sliding) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.sliding)} entries for {self.num_layers} layers")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Olmo3Config:
        d = family.dims(cfg)
        rope = family.rope(cfg)
        full = rope["full_attention"]
        if full["rope_type"] not in family.ROPE_TYPES:
            raise ValueError(f"rope_type {full['rope_type']!r}: the OLMo 3 forward implements default and yarn")
        types = family.layer_types(cfg)
        note = None
        if rope["sliding_attention"] != full and "sliding_attention" in types:
            note = (f"MaxText 0.2.5 runs the full-attention layers' {full['rope_type']} RoPE on the sliding-window "
                    f"layers too; transformers gives them {rope['sliding_attention']['rope_type']} RoPE, so the "
                    "figures include that difference (MaxText's, not the conversion's)")
        yarn = full["rope_type"] == "yarn"
        return cls(
            num_layers=d["L"], hidden=d["E"], num_heads=d["N"], num_kv_heads=d["K"], head_dim=d["D"],
            mlp_dim=d["F"], vocab=d["V"], rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            sliding=tuple(t == "sliding_attention" for t in types), sliding_window=int(cfg.get("sliding_window") or 0),
            rope_theta=full["rope_theta"], rope_factor=float(full.get("factor", 1.0)) if yarn else None,
            rope_original_max=int(full.get("original_max_position_embeddings") or cfg.get("max_position_embeddings")
                                  or 0) if yarn else 0,
            beta_fast=float(full.get("beta_fast") or 32.0), beta_slow=float(full.get("beta_slow") or 1.0),
            rope_truncate=bool(full.get("truncate", True)), rope_note=note,
        )


def rope_tables(cfg: Olmo3Config, length: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin (T, D/2) float32: plain or YaRN frequencies, YaRN's times MaxText's 0.1·ln(factor) + 1."""
    inv = yarn_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max, cfg.beta_fast,
                        cfg.beta_slow, cfg.rope_truncate)
    return cos_sin_tables(inv, length, 1.0 if cfg.rope_factor is None else yarn_mscale(cfg.rope_factor))


@partial(jax.jit, static_argnames=("eps", "query_scale", "dtype"))
def _layer(x: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array, mask: jax.Array, *,
           eps: float, query_scale: float, dtype: str) -> jax.Array:
    """One OLMo 3 decoder layer on x (B, T, E): post-norms only, the q/k norms over the whole projection."""
    dt = jnp.dtype(dtype)
    w = {k: v.astype(dt) for k, v in w.items()}
    attn = self_attention(x, subtree(w, _ATTN), cos, sin, mask, eps=eps, dtype=dt, query_scale=query_scale)
    x = x + rms_norm(attn, w[_POST_ATTN], eps, dt)
    return x + rms_norm(swiglu(x, w[_WI0], w[_WI1], w[_WO]), w[_POST_MLP], eps, dt)


def _layer_weights(layer: dict[str, np.ndarray], cfg: Olmo3Config, i: int) -> dict[str, np.ndarray]:
    e, n, k, d, f = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    shapes = ({_POST_ATTN: (e,), _POST_MLP: (e,)} | attention_shapes(e, n, k, d, prefix=_ATTN, qk_norm="full")
              | mlp_shapes(e, f))
    return select_leaves(layer, shapes, i)


def olmo3_logits(params: ParamSource, cfg: Olmo3Config, tokens: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """tokens int (B, T) -> logits float32 (B, T, V) with MaxText's OLMo 3 math, one layer read at a time."""
    tokens = np.asarray(tokens)
    x = embed_tokens(params, cfg, tokens, dtype)
    length = tokens.shape[1]
    cos, sin = rope_tables(cfg, length)
    masks = {True: jnp.asarray(attention_mask(length, cfg.sliding_window)), False: jnp.asarray(
        attention_mask(length, None))}
    for i in range(cfg.num_layers):
        weights = to_device(_layer_weights(params.layer(i), cfg, i))
        x = _layer(x, weights, cos, sin, masks[cfg.sliding[i]], eps=float(cfg.rms_eps),
                   query_scale=cfg.head_dim**-0.5, dtype=dtype).block_until_ready()
        release(weights)
    head, transposed = lm_head(params, tied=False)
    logits = final_logits(x, params.top(FINAL_NORM), head, eps=float(cfg.rms_eps), transposed=transposed, dtype=dtype)
    return np.asarray(logits)[..., : cfg.vocab]
