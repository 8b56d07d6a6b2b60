"""MaxText's Llama 4 text forward (decoder_block llama4) in JAX over a MaxText tree, one layer at a time.

Assembled from the shared blocks of `verify/forward.py`; what is Llama 4's own:

* RoPE layers (every layer but each fourth, the config's `no_rope_layers`): interleaved-pair RoPE with Llama 3
  frequency scaling when the config asks for it, then, with `use_qk_norm`, a weightless L2 (RMS) norm of q and k,
  and causal attention within chunks of `attention_chunk_size` tokens (chunked local attention);
* no-RoPE layers: no rotation, the query times `log1p(floor((t + 1) / floor_scale)) * attn_scale + 1` at position t
  (attention temperature tuning, when set), full causal attention;
* the query times D^-0.5 at run time (nothing folded into the weights);
* MoE layers: router logits `h · gate`, the top-k experts, each fed `h` times the sigmoid of its logit (the input
  is scaled, not the output), one expert's weights on the device at a time, plus the shared SwiGLU expert;
  dense layers: a SwiGLU MLP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ckpt_cli.families import llama4 as family
from ckpt_cli.verify.forward import (
    ParamSource,
    _final_logits,
    _rms_norm,
    _rope,
    attention_mask,
    embed_tokens,
    gqa_attention,
    select_leaves,
    swiglu,
)

_PRE, _POST = "pre_self_attention_layer_norm/scale", "post_self_attention_layer_norm/scale"
_Q, _K, _V, _O = (f"self_attention/{n}/kernel" for n in ("query", "key", "value", "out"))
_WI0, _WI1, _WO = "mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel"
M = family.MOE
_GATE, _EWI0, _EWI1, _EWO = (M + "MoeBlock_0/" + n for n in ("gate/kernel", "wi_0", "wi_1", "wo"))
_SWI0, _SWI1, _SWO = (M + f"shared_experts/{n}/kernel" for n in ("wi_0", "wi_1", "wo"))
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class Llama4Config:
    """What the Llama 4 forward needs from an HF (text) config."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None        # llama3 scaling, or None
    rope_layers: tuple[bool, ...]    # per layer: RoPE (and chunked attention) or not
    moe_layers: frozenset[int]
    num_experts: int
    experts_per_tok: int
    chunk: int | None
    qk_norm: bool
    temperature_tuning: bool
    floor_scale: float
    attn_scale: float

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Llama4Config:
        cfg = family.model_config(cfg)
        d = family.dims(cfg)
        rope = dict(cfg.get("rope_scaling") or {})
        rope.update(cfg.get("rope_parameters") or {})
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in (None, "default", "llama3"):
            raise ValueError(f"rope_type {kind!r}: the Llama 4 forward implements default and llama3")
        layers = d["L"]
        nope = cfg.get("no_rope_layers") or [int((i + 1) % family.NOPE_INTERVAL != 0) for i in range(layers)]
        if len(nope) != layers:
            raise ValueError(f"no_rope_layers has {len(nope)} entries for {layers} layers")
        chunk = cfg.get("attention_chunk_size")
        return cls(
            num_layers=layers, hidden=d["E"], num_heads=d["N"], num_kv_heads=d["K"], head_dim=d["D"], vocab=d["V"],
            rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 500000.0))),
            rope_scaling={k: float(rope[k]) for k in _LLAMA3_KEYS} if kind == "llama3" else None,
            rope_layers=tuple(bool(v) for v in nope), moe_layers=frozenset(family.moe_layers(cfg)),
            num_experts=d["X"], experts_per_tok=int(cfg.get("num_experts_per_tok", 1)),
            chunk=int(chunk) if chunk else None, qk_norm=bool(cfg.get("use_qk_norm", True)),
            temperature_tuning=bool(cfg.get("attn_temperature_tuning", True)),
            floor_scale=float(cfg.get("floor_scale", 8192)), attn_scale=float(cfg.get("attn_scale", 0.1)),
        )


def inv_freq(cfg: Llama4Config) -> np.ndarray:
    """Inverse RoPE frequencies (D/2,) float32, Llama 3 scaled when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    if cfg.rope_scaling is None:
        return inv.astype(np.float32)
    s = cfg.rope_scaling
    factor, low, high, old = (s[k] for k in _LLAMA3_KEYS)
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def chunked_mask(length: int, chunk: int | None) -> np.ndarray:
    """(T, T) bool: causal, and within the same chunk of `chunk` tokens (positions counted from 0)."""
    mask = attention_mask(length, None)
    if chunk is None:
        return mask
    pos = np.arange(length)
    return mask & (pos[:, None] // chunk == pos[None, :] // chunk)


def _l2_norm(x: jax.Array, eps: float, dt: jnp.dtype) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(dt)


@partial(jax.jit, static_argnames=("rope", "qk_norm", "eps", "dtype"))
def _attention(x: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array, mask: jax.Array,
               q_scale: jax.Array, *, rope: bool, qk_norm: bool, eps: float, dtype: str) -> tuple[jax.Array, jax.Array]:
    """x + attention(x), and the post-attention normed h fed to the MLP."""
    dt = jnp.dtype(dtype)
    w = {k: v.astype(dt) for k, v in w.items()}
    h = _rms_norm(x, w[_PRE], eps, dt)
    q = jnp.einsum("bte,end->btnd", h, w[_Q])
    k = jnp.einsum("bte,ekd->btkd", h, w[_K])
    v = jnp.einsum("bte,ekd->btkd", h, w[_V])
    if rope:
        q, k = _rope(q, cos, sin, True), _rope(k, cos, sin, True)
        if qk_norm:
            q, k = _l2_norm(q, eps, dt), _l2_norm(k, eps, dt)
    q = (q * q_scale[None, :, None, None].astype(dt)) * jnp.asarray(q.shape[-1] ** -0.5, dt)
    x = x + jnp.einsum("btnd,nde->bte", gqa_attention(q, k, v, mask, dt), w[_O])
    return x, _rms_norm(x, w[_POST], eps, dt)


@partial(jax.jit, static_argnames=("dtype",))
def _swiglu(h: jax.Array, wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array, *, dtype: str) -> jax.Array:
    dt = jnp.dtype(dtype)
    return swiglu(h, wi_0.astype(dt), wi_1.astype(dt), wo.astype(dt))


def _moe(h: jax.Array, layer: dict[str, np.ndarray], cfg: Llama4Config, dtype: str) -> jax.Array:
    """The routed experts (input scaled by the sigmoid of each chosen expert's logit) plus the shared expert."""
    dt = jnp.dtype(dtype)
    flat = h.reshape(-1, h.shape[-1])
    logits = np.asarray((flat @ jnp.asarray(layer[_GATE]).astype(dt)).astype(jnp.float32))
    top = np.argsort(-logits, axis=-1, kind="stable")[:, : cfg.experts_per_tok]
    out = _swiglu(flat, layer[_SWI0], layer[_SWI1], layer[_SWO], dtype=dtype)
    for e in np.unique(top):
        rows = np.nonzero((top == e).any(axis=-1))[0]
        score = jax.nn.sigmoid(jnp.asarray(logits[rows, e])).astype(dt)
        routed = flat[rows] * score[:, None]
        out = out.at[rows].add(_swiglu(routed, np.array(layer[_EWI0][e]), np.array(layer[_EWI1][e]),
                                       np.array(layer[_EWO][e]), dtype=dtype))
    return out.reshape(h.shape)


def _layer_weights(layer: dict[str, np.ndarray], cfg: Llama4Config, i: int) -> dict[str, np.ndarray]:
    e, n, k, d = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {_PRE: (e,), _POST: (e,), _Q: (e, n, d), _K: (e, k, d), _V: (e, k, d), _O: (n, d, e)}
    if i in cfg.moe_layers:
        x, m = cfg.num_experts, layer[_SWI0].shape[-1] if _SWI0 in layer else -1
        shapes |= {_GATE: (e, x), _EWI0: (x, e, m), _EWI1: (x, e, m), _EWO: (x, m, e), _SWI0: (e, m), _SWI1: (e, m),
                   _SWO: (m, e)}
    else:
        f = layer[_WI0].shape[-1] if _WI0 in layer else -1
        shapes |= {_WI0: (e, f), _WI1: (e, f), _WO: (f, e)}
    return select_leaves(layer, shapes, i)


def llama4_logits(params: ParamSource, cfg: Llama4Config, tokens: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """tokens int (B, T) -> logits float32 (B, T, V) with MaxText's Llama 4 math, one layer read at a time."""
    tokens = np.asarray(tokens)
    x = embed_tokens(params, cfg, tokens, dtype)
    length = tokens.shape[1]
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq(cfg)[None, :]
    cos, sin = jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))
    masks = {True: jnp.asarray(chunked_mask(length, cfg.chunk)), False: jnp.asarray(attention_mask(length, None))}
    pos = np.arange(length, dtype=np.float32)
    tuned = np.log1p(np.floor((pos + 1.0) / cfg.floor_scale)) * cfg.attn_scale + 1.0
    scales = {True: jnp.ones(length, jnp.float32),
              False: jnp.asarray(tuned.astype(np.float32) if cfg.temperature_tuning else np.ones(length, np.float32))}
    for i in range(cfg.num_layers):
        layer = _layer_weights(params.layer(i), cfg, i)
        rope = cfg.rope_layers[i]
        attn = {k: jnp.asarray(layer[k]) for k in (_PRE, _POST, _Q, _K, _V, _O)}
        x, h = _attention(x, attn, cos, sin, masks[rope], scales[rope], rope=rope, qk_norm=cfg.qk_norm,
                          eps=cfg.rms_eps, dtype=dtype)
        if i in cfg.moe_layers:
            x = x + _moe(h, layer, cfg, dtype)
        else:
            x = x + _swiglu(h, layer[_WI0], layer[_WI1], layer[_WO], dtype=dtype)
        x = x.block_until_ready()
        del layer, attn
    logits = _final_logits(x, params.top("decoder/decoder_norm/scale"), params.top("decoder/logits_dense/kernel"),
                           eps=cfg.rms_eps, transposed=False, dtype=dtype)
    return np.asarray(logits)[..., : cfg.vocab]
