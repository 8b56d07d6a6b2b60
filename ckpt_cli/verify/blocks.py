"""The blocks of MaxText's decoder math, in pure JAX, from which every verify forward is composed.

A family's forward (``forward.py``, ``gemma3.py``, ``olmo3.py``, ``gpt_oss.py``, ``deepseek.py``, ``qwen3_next.py``,
``llama4.py``) is a short composition of these blocks, as MaxText composes its decoder layers; the math of each
block is written once, here.

Blocks (all pure functions of arrays; ``dtype`` is the compute dtype, norm statistics and softmax are float32):

* Norms: :func:`rms_norm` (MaxText's RMSNorm: statistics in f32, cast, times the scale; ``offset`` is MaxText's
  ``scale_offset``, the Gemma ``+1`` when a tree stores ``w`` rather than ``1 + w``), :func:`layer_norm` (with bias),
  :func:`unscaled_rms_norm` (no scale: Llama 4's q/k norm, MaxText's attention ``L2Norm``), :func:`l2_norm`
  (``x / sqrt(sum(x²) + eps)``: MaxText's ``l2norm``, Qwen3-Next's DeltaNet q/k).
* RoPE: frequencies :func:`rope_inv_freq` (plain; ``linear_factor`` divides them), :func:`llama3_inv_freq`
  (Llama 3.1 smoothing), :func:`yarn_inv_freq` (YaRN blend) with :func:`yarn_mscale`; :func:`rope_tables`
  (cos/sin per position, optionally times an attention factor); :func:`apply_rope` rotates the first
  ``2 * cos.shape[-1]`` dims of each head (the rest pass: partial rotary), as halves (i, D/2+i: "rotate-half")
  or ``interleaved`` pairs (2i, 2i+1).
* Masks: :func:`attention_mask` (causal, optionally a sliding window: ``q - kv < window``, and/or chunked local
  attention: ``q // chunk == kv // chunk``).
* Attention: :func:`gqa_attention` (softmax attention of already-projected q/k/v, GQA by grouping query heads,
  optional logit soft-cap and per-head sink logits, a (T,S) or (B,T,S) keep-mask), :func:`self_attention` (a MaxText
  ``Attention`` module from its subtree: q/k/v projections with biases when ``query/bias``... are present,
  q/k RMSNorm when ``query_norm/scale`` is present (per head, or over the whole projection when the scale is N·D
  wide, as OLMo), RoPE, the query scale, :func:`gqa_attention`, the output projection with ``out/bias`` if present);
  :func:`attention_shapes` lists the leaves such a subtree must have; :func:`mla_attention` (DeepSeek's multi-head
  latent attention from its subtree, low-rank or plain query, shared RoPE key part) with :func:`mla_query_latent`
  and :func:`mla_shapes`.
* MLP: :func:`gated_mlp` (``act(h·wi_0) * (h·wi_1) · wo``, ``act`` "silu" for SwiGLU or "gelu_tanh" for GeGLU,
  optionally clamped by a ``limit``),
  :func:`swiglu` (the "silu" one), :func:`mlp_shapes`.
* MoE routing (float32): :func:`route_softmax_topk` (softmax over all experts, then top-k, optionally
  renormalised, optionally group-limited: Qwen3 MoE, Mixtral, DeepSeek V2), :func:`route_topk_softmax` (top-k
  logits, softmax over those: GPT-OSS), :func:`route_topk_sigmoid` (top-k logits, sigmoid of each: Llama 4),
  :func:`route_sigmoid` (select on sigmoid + correction bias, weigh by
  the pre-bias scores, optionally group-limited and renormalised: DeepSeek V3). Experts: :func:`routed_experts`
  reads only a layer's hit experts, a group at a time (:class:`ExpertLeaf`: straight from the checkpoint, so a MoE
  layer is never whole in memory), sends them one at a time to the device and computes each only on the tokens
  routed to it, with
  any expert FFN (:func:`swiglu_expert`, :class:`GatedExpert` (an activation, a clamp ``limit``: DeepSeek-V4)
  or a family's own, a hashable callable ``ffn(h, w)``), the routing weight
  scaling its output or (``scale_input``, Llama 4) its input; :func:`moe_shapes`.
* Embedding and logits: :func:`embed_tokens` (checked lookup), :func:`lm_head` (tied or untied head),
  :func:`final_logits` (final RMSNorm, head, optional ``/√E`` and final soft-cap, float32 out); Gemma 4's
  per-layer embeddings :func:`per_layer_inputs` over the rows :func:`gather_rows` reads.
* KV sharing (Gemma 4): :func:`project_kv` (keys and values of a layer: the key projection standing for the value
  when there is no ``value/kernel``, the scale-less value norm) and :func:`attend` (the query side over given keys
  and values, a layer's own or a donor layer's); RoPE :func:`proportional_inv_freq` (partial, whole-head
  denominator); expert FFN :func:`geglu_expert`.
* Streaming: :func:`select_leaves` (shape-checked selection of a layer's leaves), :func:`to_device` and
  :func:`release` (one layer's weights on the device, then freed before the next fetch), :func:`subtree`.

Composing a new family (a pre-norm dense model; its options come with the leaves it selects)::

    @partial(jax.jit, static_argnames=("eps", "dtype"))
    def _layer(x, w, cos, sin, mask, *, eps, dtype):
        dt = jnp.dtype(dtype)
        w = {k: v.astype(dt) for k, v in w.items()}
        h = rms_norm(x, w["pre_self_attention_norm/scale"], eps, dt)
        x = x + self_attention(h, subtree(w, "self_attention/"), cos, sin, mask, eps=eps, dtype=dt)
        h = rms_norm(x, w["post_self_attention_norm/scale"], eps, dt)
        return x + swiglu(h, w["mlp/wi_0/kernel"], w["mlp/wi_1/kernel"], w["mlp/wo/kernel"])

then, per layer: ``layer = select_leaves(params.layer(i), attention_shapes(...) | mlp_shapes(...) | norms, i)``,
``w = to_device(layer)``, ``x = _layer(x, w, ...).block_until_ready()``, ``release(w)``; and at the end
``head, transposed = lm_head(params, cfg.tied)``, ``final_logits(x, params.top(FINAL_NORM), head,
transposed=transposed, ...)``. Per-layer choices (a local layer's window and RoPE θ) are picked outside the jit: a
mask and a cos/sin pair per kind of layer, built once.

Options by family (as ``forward.py``, ``gemma3.py`` and ``olmo3.py`` pick them): Llama 2 / Mistral: plain
rotate-half RoPE, ``query_scale=1`` (folded in the kernel); Llama 3.1: ``llama3_inv_freq``, ``interleaved=True``;
Qwen2.5: ``attention_shapes(bias=("query", "key", "value"))``, ``query_scale=D**-0.5``; Gemma 2:
``self_attention(soft_cap=...)``, ``final_logits(normalize=True, soft_cap=...)``, ``gated_mlp(..., "gelu_tanh")``,
post-norms as Gemma3 (the tree stores ``1 + w``, so no ``offset``); Gemma: pre-norms only; OLMo 3:
``attention_shapes(prefix="attention/", qk_norm="full")``, norms after attention and MLP
(``x + rms_norm(attn, post)``), a window mask on the layers ``layer_types`` makes local. Qwen3-Next
(``qwen3_next.py``): ``rms_norm(offset=1.0)`` for every norm but the DeltaNet output's (also
``final_logits(norm_offset=1.0)``), partial rotary from ``rope_tables(rope_inv_freq(rotary_dim, θ), T)``,
``route_softmax_topk`` and ``routed_experts`` plus a gated shared expert. Llama 4 (``llama4.py``):
``llama3_inv_freq``, ``apply_rope(interleaved=True)`` then ``unscaled_rms_norm`` of q/k on RoPE layers, which use
``attention_mask(chunk=...)``, ``route_topk_sigmoid`` and ``routed_experts(scale_input=True)`` plus a shared expert.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = ("float32", "bfloat16")
# Same convention as MaxText: a large finite negative value instead of -inf.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
EMBEDDING, FINAL_NORM, LM_HEAD = "token_embedder/embedding", "decoder/decoder_norm/scale", "decoder/logits_dense/kernel"


class ParamSource(Protocol):
    """Read access to a MaxText parameter tree, one (unstacked) decoder layer at a time."""

    def top(self, path: str) -> np.ndarray: ...

    def has_top(self, path: str) -> bool: ...

    def layer(self, i: int) -> dict[str, np.ndarray]: ...


# ---------------------------------------------------------------------------------------------------------- norms

def _rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: jnp.dtype, offset: float = 0.0) -> jax.Array:
    """MaxText RMSNorm over the last axis: normalize in f32; without ``offset``, cast to ``dtype`` then times
    ``scale`` in ``dtype``; with one, times ``scale + offset`` in f32, then cast (as MaxText's ``scale_offset``)."""
    normed = _rms_normalize(x, eps)
    if offset:
        return (normed * (scale.astype(jnp.float32) + offset)).astype(dtype)
    return normed.astype(dtype) * scale.astype(dtype)


def unscaled_rms_norm(x: jax.Array, eps: float, dtype: jnp.dtype) -> jax.Array:
    """RMSNorm without a scale (``x / sqrt(mean(x²) + eps)``, f32 statistics, cast to ``dtype``): the weightless
    q/k norm MaxText's attention calls ``L2Norm`` (Llama 4's ``use_qk_norm``)."""
    return _rms_normalize(x, eps).astype(dtype)


def l2_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """L2 normalisation over the last axis in ``x``'s dtype: ``x / sqrt(sum(x²) + eps)`` (MaxText's ``l2norm``,
    the q/k norm of Qwen3-Next's gated DeltaNet)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, dtype: jnp.dtype) -> jax.Array:
    """LayerNorm with bias: statistics in f32, then cast, scale and shift."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return y.astype(dtype) * scale.astype(dtype) + bias.astype(dtype)


# ----------------------------------------------------------------------------------------------------------- RoPE

def rope_inv_freq(dims: int, theta: float, linear_factor: float = 1.0) -> np.ndarray:
    """Inverse frequencies (dims/2,) float32: ``theta^(-2i/dims)``, divided by ``linear_factor`` (linear scaling)."""
    inv = (np.float32(1.0) / (np.float32(theta) ** (np.arange(0, dims, 2, dtype=np.float32) / np.float32(dims))))
    inv = inv.astype(np.float32)
    return inv if linear_factor == 1.0 else (inv / np.float32(linear_factor)).astype(np.float32)


def proportional_inv_freq(dims: int, theta: float, fraction: float) -> np.ndarray:
    """Gemma 4's proportional (partial) RoPE, (dims/2,) float32: the first ``int(fraction * dims) // 2`` frequencies
    ``theta^(-2i/dims)`` (the whole head's denominator), the rest 0, so with :func:`apply_rope` over the whole head
    those pairs (i, dims/2 + i) pass unchanged (MaxText pads their timescales with infinity: the same angles, 0)."""
    rotated = int(fraction * dims) // 2
    inv = np.zeros(dims // 2, np.float32)
    inv[:rotated] = np.float32(1.0) / (np.float32(theta) ** (np.arange(0, 2 * rotated, 2, dtype=np.float32)
                                                              / np.float32(dims)))
    return inv


def llama3_inv_freq(inv_freq: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max: float) -> np.ndarray:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short ones kept, a smooth blend between."""
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > original_max / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original_max / high_freq_factor) & (wavelen <= original_max / low_freq_factor)
    return np.where(medium, smoothed, scaled).astype(np.float32)


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


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1·mscale·ln(factor) + 1`` (1 when the factor does not stretch)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_tables(inv_freq: np.ndarray, length: int, attention_factor: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """cos, sin (T, D/2) float32 for positions 0..T-1, both times ``attention_factor`` (YaRN's) when not 1."""
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    if attention_factor != 1.0:
        cos, sin = cos * np.float32(attention_factor), sin * np.float32(attention_factor)
    return jnp.asarray(cos.astype(np.float32)), jnp.asarray(sin.astype(np.float32))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool = False) -> jax.Array:
    """Rotate (B,T,H,D) by per-position angles (cos/sin (T, R/2)) in f32; the first R dims rotate, pairs (i, R/2+i)
    or, ``interleaved``, (2i, 2i+1); the other D-R dims pass unchanged (partial rotary)."""
    rotary = 2 * cos.shape[-1]
    if rotary < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :rotary], cos, sin, interleaved), x[..., rotary:]], axis=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    xf = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        x1, x2 = jnp.split(xf, 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ------------------------------------------------------------------------------------------------------ attention

def attention_mask(length: int, window: int | None = None, chunk: int | None = None) -> np.ndarray:
    """(T, T) bool keep-mask: causal; with a ``window`` only the last ``window`` positions (q - kv < window); with a
    ``chunk`` only the positions of the query's own chunk of ``chunk`` tokens (q // chunk == kv // chunk: chunked
    local attention, Llama 4)."""
    q, kv = np.arange(length)[:, None], np.arange(length)[None, :]
    mask = kv <= q
    if window is not None:
        mask &= q - kv < window
    if chunk is not None:
        mask &= q // chunk == kv // chunk
    return mask


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dtype: jnp.dtype, *,
           soft_cap: float | None = None, sinks: jax.Array | None = None) -> jax.Array:
    """Softmax attention: q (B,T,N,D), k (B,S,K,D), v (B,S,K,Dv) with K | N (query head n reads kv head
    n // (N/K)), ``mask`` (T,S) or (B,T,S) bool keep -> (B,T,N,Dv). Scores in f32; ``soft_cap`` is
    ``cap·tanh(s/cap)`` before the mask; ``sinks`` (N,) are per-head logits joined to each softmax row, then
    dropped."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    if soft_cap:
        scores = jnp.tanh(scores / soft_cap) * soft_cap
    keep = mask[:, None, None] if mask.ndim == 3 else mask
    scores = jnp.where(keep, scores, MASK_VALUE)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:
        sink = sinks.astype(jnp.float32).reshape(kv, n // kv)[None, :, :, None, None]
        sink = jnp.broadcast_to(sink, (*scores.shape[:-1], 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
    attn = jnp.einsum("bkgts,bskd->btkgd", probs.astype(dtype), v)
    return attn.reshape(b, t, n, v.shape[-1])


def _project(h: jax.Array, w: Mapping[str, jax.Array], name: str) -> jax.Array:
    y = jnp.einsum("bte,ehd->bthd", h, w[f"{name}/kernel"])
    return y + w[f"{name}/bias"] if f"{name}/bias" in w else y


def _qk_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: jnp.dtype) -> jax.Array:
    """RMSNorm per head (scale (D,)) or over the whole projection (scale (H·D,), as OLMo 2/3)."""
    if scale.shape[-1] == x.shape[-1]:
        return rms_norm(x, scale, eps, dtype)
    return rms_norm(x.reshape(*x.shape[:-2], -1), scale, eps, dtype).reshape(x.shape)


def self_attention(h: jax.Array, w: Mapping[str, jax.Array], cos: jax.Array, sin: jax.Array, mask: jax.Array, *,
                  eps: float, dtype: jnp.dtype, interleaved: bool = False, query_scale: float = 1.0,
                  soft_cap: float | None = None) -> jax.Array:
    """A MaxText ``Attention`` module on the normed input h (B,T,E) -> (B,T,E), no residual.

    ``w`` is the module's subtree in ``dtype`` (``query/kernel`` (E,N,D), ``key/kernel``, ``value/kernel`` (E,K,D),
    ``out/kernel`` (N,D,E)); what else it holds switches the options: ``{query,key,value,out}/bias``,
    ``{query,key}_norm/scale`` (RMSNorm of q/k before RoPE), ``sinks`` (N,). The query is multiplied by
    ``query_scale`` after RoPE (1.0 where the checkpoint folds it into the query kernel).
    """
    q, k, v = (_project(h, w, name) for name in ("query", "key", "value"))
    if "query_norm/scale" in w:
        q, k = _qk_norm(q, w["query_norm/scale"], eps, dtype), _qk_norm(k, w["key_norm/scale"], eps, dtype)
    q, k = apply_rope(q, cos, sin, interleaved), apply_rope(k, cos, sin, interleaved)
    if query_scale != 1.0:
        q = q * jnp.asarray(query_scale, dtype)
    attn = gqa_attention(q, k, v, mask, dtype, soft_cap=soft_cap, sinks=w.get("sinks"))
    out = jnp.einsum("btnd,nde->bte", attn, w["out/kernel"])
    return out + w["out/bias"] if "out/bias" in w else out


def project_kv(h: jax.Array, w: Mapping[str, jax.Array], cos: jax.Array, sin: jax.Array, *, eps: float,
               dtype: jnp.dtype, v_norm: bool = False) -> tuple[jax.Array, jax.Array]:
    """Keys and values (B,T,K,D) of an ``Attention`` subtree, for :func:`attend` (and, with KV sharing, for the later
    layers that reuse them): the key projection, RMSNorm ``key_norm`` when present, RoPE; the value projection, or
    the key projection itself when the subtree has no ``value/kernel`` (Gemma 4's ``attention_k_eq_v``, MaxText's
    share_kv_projections: taken before the key norm), then with ``v_norm`` a scale-less RMSNorm."""
    k = _project(h, w, "key")
    v = _project(h, w, "value") if "value/kernel" in w else k
    if "key_norm/scale" in w:
        k = _qk_norm(k, w["key_norm/scale"], eps, dtype)
    if v_norm:
        v = unscaled_rms_norm(v, eps, dtype)
    return apply_rope(k, cos, sin), v


def attend(h: jax.Array, w: Mapping[str, jax.Array], k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array,
           mask: jax.Array, *, eps: float, dtype: jnp.dtype, query_scale: float = 1.0,
           soft_cap: float | None = None) -> jax.Array:
    """The query side of an ``Attention`` module over given keys and values (:func:`project_kv`, this layer's or a
    KV donor's): query projection, RMSNorm ``query_norm`` when present, RoPE, ``query_scale``, GQA, the output
    projection -> (B,T,E), no residual."""
    q = _project(h, w, "query")
    if "query_norm/scale" in w:
        q = _qk_norm(q, w["query_norm/scale"], eps, dtype)
    q = apply_rope(q, cos, sin)
    if query_scale != 1.0:
        q = q * jnp.asarray(query_scale, dtype)
    return jnp.einsum("btnd,nde->bte", gqa_attention(q, k, v, mask, dtype, soft_cap=soft_cap), w["out/kernel"])


def attention_shapes(e: int, n: int, k: int, d: int, *, prefix: str = "self_attention/", bias: Sequence[str] = (),
                     qk_norm: str | None = None, sinks: bool = False) -> dict[str, tuple[int, ...]]:
    """The leaves of a GQA ``Attention`` subtree and their shapes; ``bias`` names the projections with one
    (``("query", "key", "value")`` for Qwen2, all four for GPT-OSS); ``qk_norm`` "head" (q/k RMSNorm scales (D,)),
    "full" (over the whole projection: (N·D,) and (K·D,)) or None."""
    heads = {"query": (n, d), "key": (k, d), "value": (k, d), "out": (e,)}
    shapes: dict[str, tuple[int, ...]] = {prefix + "query/kernel": (e, n, d), prefix + "key/kernel": (e, k, d),
                                          prefix + "value/kernel": (e, k, d), prefix + "out/kernel": (n, d, e)}
    shapes |= {f"{prefix}{name}/bias": heads[name] for name in bias}
    if qk_norm is not None:
        widths = {"head": (d, d), "full": (n * d, k * d)}[qk_norm]
        shapes |= {prefix + "query_norm/scale": widths[:1], prefix + "key_norm/scale": widths[1:]}
    if sinks:
        shapes[prefix + "sinks"] = (n,)
    return shapes


def mla_query_latent(h: jax.Array, w: Mapping[str, jax.Array], eps: float, dtype: jnp.dtype) -> jax.Array:
    """MLA's low-rank query latent ``RMSNorm(h·wq_a)`` (B,T,Q) (DeepSeek V3; its V3.2 indexer reads it too)."""
    return rms_norm(h @ w["wq_a/kernel"], w["q_norm/scale"], eps, dtype)


def mla_attention(h: jax.Array, w: Mapping[str, jax.Array], cos: jax.Array, sin: jax.Array, mask: jax.Array,
                  query_scale: jax.Array, *, latent_eps: float, dtype: jnp.dtype, interleaved: bool = True
                  ) -> jax.Array:
    """Multi-head latent attention (MaxText's MLA) on the normed h (B,T,E) -> (B,T,E), no residual.

    ``w`` is the subtree: the query from ``query/kernel`` (E,N,Dq) or, low-rank, ``wq_a``, ``q_norm``, ``wq_b``
    (Q,N,Dq); ``wkv_a`` (E, C+Dr) gives the kv latent (RMSNorm ``kv_norm``) and one RoPE key part shared by all
    heads; ``wkv_b`` (C,N,Dn+Dv) gives per head the non-RoPE key and the value; ``out/kernel`` (N,Dv,E). RoPE on the
    last Dr dims of q and k; the query times ``query_scale`` (MaxText scales the query, not the scores).
    """
    if "query/kernel" in w:
        q = jnp.einsum("bte,enq->btnq", h, w["query/kernel"])
    else:
        q = jnp.einsum("btc,cnq->btnq", mla_query_latent(h, w, latent_eps, dtype), w["wq_b/kernel"])
    c = w["kv_norm/scale"].shape[0]
    kv_a = h @ w["wkv_a/kernel"]  # [latent C | shared k_rope Dr]
    latent = rms_norm(kv_a[..., :c], w["kv_norm/scale"], latent_eps, dtype)
    k_rope = apply_rope(kv_a[..., None, c:], cos, sin, interleaved)  # (B,T,1,Dr)
    dr = k_rope.shape[-1]
    dn = q.shape[-1] - dr
    kv = jnp.einsum("btc,cnj->btnj", latent, w["wkv_b/kernel"])  # per head [k_nope Dn | v Dv]
    k_nope, v = kv[..., :dn], kv[..., dn:]
    q = jnp.concatenate([q[..., :dn], apply_rope(q[..., dn:], cos, sin, interleaved)], axis=-1)
    q = q * query_scale.astype(dtype)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (*k_nope.shape[:-1], dr))], axis=-1)
    return jnp.einsum("btnd,nde->bte", gqa_attention(q, k, v, mask, dtype), w["out/kernel"])


def mla_shapes(e: int, n: int, *, kv_lora_rank: int, q_lora_rank: int, qk_nope: int, qk_rope: int, v_head: int,
               prefix: str = "self_attention/") -> dict[str, tuple[int, ...]]:
    """The leaves of an MLA subtree and their shapes (``q_lora_rank`` 0: the plain query projection)."""
    c, dq = kv_lora_rank, qk_nope + qk_rope
    shapes = {prefix + "wkv_a/kernel": (e, c + qk_rope), prefix + "kv_norm/scale": (c,),
              prefix + "wkv_b/kernel": (c, n, qk_nope + v_head), prefix + "out/kernel": (n, v_head, e)}
    if q_lora_rank:
        return shapes | {prefix + "wq_a/kernel": (e, q_lora_rank), prefix + "q_norm/scale": (q_lora_rank,),
                         prefix + "wq_b/kernel": (q_lora_rank, n, dq)}
    return shapes | {prefix + "query/kernel": (e, n, dq)}


# ------------------------------------------------------------------------------------------------------------ MLP

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu_tanh": partial(jax.nn.gelu, approximate=True),
}


def gated_mlp(h: jax.Array, wi0: jax.Array, wi1: jax.Array, wo: jax.Array, activation: str = "silu",
              limit: float | None = None) -> jax.Array:
    """Gated MLP ``(act(h·wi_0) * (h·wi_1))·wo``: SwiGLU with "silu", GeGLU with "gelu_tanh". A ``limit`` (MaxText's
    ``mlp_activations_limit``, DeepSeek-V4's ``swiglu_limit``; 0 or None: none) clamps first: ``min(h·wi_0, limit)``
    and ``clip(h·wi_1, ±limit)``."""
    gate, up = h @ wi0, h @ wi1
    if limit:
        gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
    return (ACTIVATIONS[activation](gate) * up) @ wo


def swiglu(h: jax.Array, wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array, limit: float | None = None) -> jax.Array:
    """MaxText's MLP with activations ["silu", "linear"]: ``(silu(h·wi_0) * (h·wi_1))·wo`` (``limit``: clamped, as
    :func:`gated_mlp`)."""
    return gated_mlp(h, wi_0, wi_1, wo, "silu", limit)


def mlp_shapes(e: int, f: int, prefix: str = "mlp/") -> dict[str, tuple[int, ...]]:
    """The leaves of a dense gated MLP and their shapes."""
    return {prefix + "wi_0/kernel": (e, f), prefix + "wi_1/kernel": (e, f), prefix + "wo/kernel": (f, e)}


# ------------------------------------------------------------------------------------------------------------ MoE

def _group_limit(choice: jax.Array, n_group: int, topk_group: int, group_rank: Callable, fill: float) -> jax.Array:
    """Keep the experts of the ``topk_group`` best groups (ranked by ``group_rank`` over each group's scores)."""
    n_exp = choice.shape[-1]
    grouped = choice.reshape(-1, n_group, n_exp // n_group)
    _, best = jax.lax.top_k(group_rank(grouped), topk_group)
    in_group = jnp.zeros(grouped.shape[:2], bool).at[jnp.arange(grouped.shape[0])[:, None], best].set(True)
    return jnp.where(jnp.repeat(in_group, n_exp // n_group, axis=-1), choice, fill)


def _renormalise(weights: jax.Array) -> jax.Array:
    return weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)


def route_softmax_topk(logits: jax.Array, top_k: int, *, normalize: bool, n_group: int | None = None,
                       topk_group: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(weights, ids) (BT,k): softmax over all experts in f32, top-k, renormalised to sum 1 when ``normalize``;
    with groups, only the ``topk_group`` groups with the best expert compete (DeepSeek V2's group_limited_greedy)."""
    scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if n_group is not None:
        scores = _group_limit(scores, n_group, topk_group, lambda g: g.max(axis=-1), 0.0)
    weights, ids = jax.lax.top_k(scores, top_k)
    return (_renormalise(weights) if normalize else weights), ids


def route_topk_softmax(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """(weights, ids) (BT,k): the top-k logits in f32, softmax over those k."""
    top, ids = jax.lax.top_k(logits.astype(jnp.float32), top_k)
    return jax.nn.softmax(top, axis=-1), ids


def route_topk_sigmoid(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """(weights, ids) (BT,k): the top-k logits in f32, the sigmoid of each (Llama 4; its experts are fed the
    weighted input: ``routed_experts(scale_input=True)``)."""
    top, ids = jax.lax.top_k(logits.astype(jnp.float32), top_k)
    return jax.nn.sigmoid(top), ids


def route_sigmoid(logits: jax.Array, bias: jax.Array | None, top_k: int, *, normalize: bool,
                  n_group: int | None = None, topk_group: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(weights, ids) (BT,k), DeepSeek V3: select on sigmoid(logits) + bias (groups ranked by the sum of their two
    best), weigh by the pre-bias sigmoid scores, renormalised when ``normalize``."""
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores + bias if bias is not None else scores
    if n_group is not None:
        choice = _group_limit(choice, n_group, topk_group,
                              lambda g: jax.lax.top_k(g, min(2, g.shape[-1]))[0].sum(axis=-1), -jnp.inf)
    _, ids = jax.lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    return (_renormalise(weights) if normalize else weights), ids


def swiglu_expert(h: jax.Array, w: Mapping[str, jax.Array]) -> jax.Array:
    """One routed expert as a SwiGLU MLP over its ``wi_0``, ``wi_1``, ``wo``."""
    return swiglu(h, w["wi_0"], w["wi_1"], w["wo"])


def geglu_expert(h: jax.Array, w: Mapping[str, jax.Array]) -> jax.Array:
    """One routed expert as a GeGLU (tanh gelu) MLP over its ``wi_0``, ``wi_1``, ``wo`` (Gemma 4)."""
    return gated_mlp(h, w["wi_0"], w["wi_1"], w["wo"], "gelu_tanh")


@dataclass(frozen=True)
class GatedExpert:
    """One routed expert as :func:`gated_mlp` over its ``wi_0``, ``wi_1``, ``wo`` with an activation and a clamp
    ``limit`` (hashable, for :func:`routed_experts`): ``GatedExpert(limit=10.0)`` is DeepSeek-V4's clamped SwiGLU."""

    activation: str = "silu"
    limit: float | None = None

    def __call__(self, h: jax.Array, w: Mapping[str, jax.Array]) -> jax.Array:
        return gated_mlp(h, w["wi_0"], w["wi_1"], w["wo"], self.activation, self.limit)


@partial(jax.jit, static_argnames=("ffn", "dtype", "scale_input"))
def _expert_add(out: jax.Array, h: jax.Array, rows: jax.Array, coef: jax.Array, w: dict[str, jax.Array], *,
                ffn: Callable, dtype: str, scale_input: bool = False) -> jax.Array:
    """out[rows] += coef · ffn(h[rows]), or ``scale_input``: ffn(coef · h[rows]); padding rows point past the end
    and are dropped."""
    dt = jnp.dtype(dtype)
    hr = jnp.take(h, rows, axis=0, mode="fill", fill_value=0)
    w = {k: v.astype(dt) for k, v in w.items()}
    if scale_input:
        y = ffn(hr * coef[:, None].astype(dt), w)
    else:
        y = ffn(hr, w) * coef[:, None].astype(dt)
    return out.at[rows].add(y.astype(out.dtype), mode="drop")


def _bucket(n: int, cap: int) -> int:
    """Padded row count for ``n`` routed rows (a power of two >= 256, at most ``cap``): bounds recompilation."""
    return min(max(1 << max(n - 1, 0).bit_length(), 256), cap)


# The stacked routed-expert leaves of a MaxText MoE block (``<block>/wi_0``; a dense MLP's are ``.../wi_0/kernel``).
EXPERT_LEAVES = ("wi_0", "wi_1", "wo", "wi_0_bias", "wi_1_bias", "wo_bias")


class ExpertLeaf(Protocol):
    """A stacked (X, ...) expert leaf left in the checkpoint: ``read_experts(xs)`` reads just those experts."""

    shape: tuple[int, ...]
    group: int

    def read_experts(self, xs: Sequence[int]) -> np.ndarray: ...


def is_expert_leaf(path: str) -> bool:
    """Whether a layer leaf's path names a MoE block's stacked routed experts."""
    return path.rsplit("/", 1)[-1] in EXPERT_LEAVES


def take_experts(leaf, xs: Sequence[int]) -> np.ndarray:
    """Experts ``xs`` of a stacked leaf, as one (len(xs), ...) array: read from the checkpoint for an
    :class:`ExpertLeaf`, copied out of an array otherwise."""
    if hasattr(leaf, "read_experts"):
        return leaf.read_experts(xs)
    return np.stack([np.asarray(leaf[x]) for x in xs])


def expert_groups(hit: np.ndarray, experts: Mapping[str, object], group: int | None) -> list[np.ndarray]:
    """The hit experts cut into groups of ``group`` (else the leaves' own ``group``, else one group), in order."""
    if group is None:
        group = min((getattr(v, "group", 0) for v in experts.values()), default=0) or len(hit)
    group = max(1, int(group))
    return [hit[a:a + group] for a in range(0, len(hit), group)]


def routed_experts(out: jax.Array, h: jax.Array, ids: np.ndarray, weights: np.ndarray,
                   experts: Mapping[str, np.ndarray], dtype: str, ffn: Callable = swiglu_expert,
                   scale_input: bool = False, group: int | None = None) -> jax.Array:
    """``out`` (BT,E) plus every hit expert's weighted output, in expert order; each expert is computed only on the
    tokens routed to it, its weights on the device alone. ``experts`` maps the names ``ffn`` reads to the layer's
    stacked (X, ...) leaves: arrays, or :class:`ExpertLeaf` s still in the checkpoint; ``ffn(h, w)`` must be hashable
    (a function, or a frozen dataclass). ``scale_input``: the routing weight scales the expert's input instead of
    its output (Llama 4).

    Expert streaming: only the hit experts are read, ``group`` at a time (default: the leaves' ``group``, chosen
    from the memory budget; arrays: all at once), the next group read while this one is applied, so the host holds
    at most two groups of experts, never the layer. The math per expert and its order do not depend on the group:
    any group size gives the same bits.

    Each expert's slice is copied before the transfer: jaxlib on CPU may keep the numpy source of a transfer
    referenced a while after the device copy is deleted, and a view would keep the whole group alive past the
    next group's read; a copy pins only itself.
    """
    rows_total = h.shape[0]
    groups = expert_groups(np.unique(ids), experts, group)
    if not groups:
        return out

    def fetch(xs: np.ndarray) -> dict[str, np.ndarray]:
        return {k: take_experts(v, [int(x) for x in xs]) for k, v in experts.items()}

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(fetch, groups[0])
        for n, xs in enumerate(groups):
            host = pending.result()
            pending = pool.submit(fetch, groups[n + 1]) if n + 1 < len(groups) else None
            for j, x in enumerate(xs):
                rows, slots = np.nonzero(ids == x)
                size = _bucket(len(rows), rows_total)
                padded = np.full(size, rows_total, dtype=np.int32)
                padded[: len(rows)] = rows
                coef = np.zeros(size, dtype=np.float32)
                coef[: len(rows)] = weights[rows, slots]
                w = jax.block_until_ready({k: jax.device_put(np.array(v[j])) for k, v in host.items()})
                out = _expert_add(out, h, padded, coef, w, ffn=ffn, dtype=dtype, scale_input=scale_input)
                release(w, flush=False)
            del host
    return out


def moe_shapes(e: int, x: int, m: int, *, prefix: str, router_bias: bool = False, expert_bias: bool = False
               ) -> dict[str, tuple[int, ...]]:
    """The leaves of a MaxText MoE block (router ``gate``, stacked experts ``wi_0``, ``wi_1``, ``wo``) and shapes."""
    shapes = {prefix + "gate/kernel": (e, x), prefix + "wi_0": (x, e, m), prefix + "wi_1": (x, e, m),
              prefix + "wo": (x, m, e)}
    if router_bias:
        shapes[prefix + "gate/bias"] = (x,)
    if expert_bias:
        shapes |= {prefix + "wi_0_bias": (x, m), prefix + "wi_1_bias": (x, m), prefix + "wo_bias": (x, e)}
    return shapes


# ------------------------------------------------------------------------------------------- embedding and logits

def embed_tokens(params: ParamSource, cfg, tokens: np.ndarray, dtype: str) -> jax.Array:
    """Check dtype and token ids, then look the tokens up in the embedding table (dropped right after).

    ``cfg`` needs ``vocab`` and ``hidden``. The table is re-fetched for a tied head, so it is not held while the
    layers run. A table with more rows than ``vocab`` (MaxText's padding) is accepted.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be an integer (B,T) array, got {tokens.dtype} {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab):
        raise ValueError(f"token ids must lie in [0, {cfg.vocab})")
    embedding = params.top(EMBEDDING)
    if embedding.ndim != 2 or embedding.shape[0] < cfg.vocab or embedding.shape[1] != cfg.hidden:
        raise ValueError(f"{EMBEDDING} has shape {embedding.shape}, expected ({cfg.vocab}, {cfg.hidden})")
    return jnp.asarray(embedding[tokens]).astype(dtype)


def lm_head(params: ParamSource, tied: bool) -> tuple[np.ndarray, bool]:
    """(head, transposed): the (V,E) embedding for a tied model, else the (E,V) ``logits_dense`` kernel."""
    if tied:
        return params.top(EMBEDDING), True
    if params.has_top(LM_HEAD):
        return params.top(LM_HEAD), False
    raise KeyError(f"untied config but {LM_HEAD} is absent")


def gather_rows(params: ParamSource, path: str, ids: np.ndarray) -> np.ndarray:
    """``params.top(path)[ids]`` reading only the rows ``ids`` names (a source with ``top_rows``), so a large table
    (Gemma 4's per-layer embeddings: 262144 x L·P) is not read whole for a few prompts."""
    unique, inverse = np.unique(np.asarray(ids), return_inverse=True)
    rows = params.top_rows(path, unique) if hasattr(params, "top_rows") else params.top(path)[unique]
    return rows[inverse.reshape(np.shape(ids))]


@partial(jax.jit, static_argnames=("layers", "eps", "dtype"))
def per_layer_inputs(x: jax.Array, identity: jax.Array, projection: jax.Array, norm: jax.Array, *, layers: int,
                     eps: float, dtype: str) -> jax.Array:
    """Gemma 4's per-layer embeddings (PLE) (B,T,L,P): ``(identity·√P + RMSNorm(x·projection / √E)) / √2``, with
    ``identity`` the rows of ``embed_tokens_per_layer`` for the tokens (B,T,L·P, stored unscaled), ``x`` the (scaled)
    token embeddings (B,T,E), ``projection`` (E, L·P) and the RMSNorm scale ``norm`` (P,) (MaxText's
    Gemma4SmallPLE)."""
    dt = jnp.dtype(dtype)
    p = norm.shape[0]
    ident = identity.astype(dt) * jnp.asarray(float(p) ** 0.5, dt)
    context = (x.astype(dt) @ projection.astype(dt)) * jnp.asarray(float(x.shape[-1]) ** -0.5, dt)
    context = rms_norm(context.reshape(*x.shape[:-1], layers, p), norm, eps, dt)
    return (ident.reshape(*x.shape[:-1], layers, p) + context) * jnp.asarray(2.0 ** -0.5, dt)


@partial(jax.jit, static_argnames=("eps", "transposed", "dtype", "norm_offset", "normalize", "soft_cap"))
def final_logits(x: jax.Array, scale: jax.Array, head: jax.Array, *, eps: float, transposed: bool, dtype: str,
                 norm_offset: float = 0.0, normalize: bool = False, soft_cap: float | None = None) -> jax.Array:
    """Final RMSNorm then the head (``transposed``: the (V,E) table) -> float32 logits; ``normalize`` divides by √E
    (MaxText's normalize_embedding_logits), ``soft_cap`` is ``cap·tanh(logits/cap)``, both in ``dtype``."""
    dt = jnp.dtype(dtype)
    h = rms_norm(x, scale, eps, dt, norm_offset)
    logits = jnp.einsum("bte,ve->btv" if transposed else "bte,ev->btv", h, head.astype(dt))
    if normalize:
        logits = logits / jnp.sqrt(jnp.asarray(x.shape[-1], dt))
    if soft_cap:
        logits = jnp.tanh(logits / soft_cap) * soft_cap
    return logits.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------------ streaming

def select_leaves(layer: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], i: int
                  ) -> dict[str, np.ndarray]:
    """The leaves of layer ``i`` named in ``shapes``, each checked for presence and shape (KeyError, ValueError)."""
    missing = [p for p in shapes if p not in layer]
    if missing:
        raise KeyError(f"layer {i}: missing leaves {missing}")
    for path, shape in shapes.items():
        if tuple(layer[path].shape) != shape:
            raise ValueError(f"layer {i}: {path} has shape {tuple(layer[path].shape)}, expected {shape}")
    return {p: layer[p] for p in shapes}


def subtree(w: Mapping[str, jax.Array], prefix: str) -> dict[str, jax.Array]:
    """The leaves of ``w`` under ``prefix``, named relative to it."""
    return {k.removeprefix(prefix): v for k, v in w.items() if k.startswith(prefix)}


def to_device(layer: Mapping[str, np.ndarray], skip: tuple[str, ...] = ()) -> dict[str, jax.Array]:
    """A layer's leaves (but ``skip``) on the device, transfers awaited.

    Each leaf goes through a host copy: jaxlib on CPU may hold the numpy source of a transfer until some later
    execution (longer under CPU contention), and would otherwise keep the fetched layer alive past the next fetch;
    the copy it holds instead is freed on its own.
    """
    return jax.block_until_ready({k: jax.device_put(np.array(v)) for k, v in layer.items() if k not in skip})


@jax.jit
def _tick() -> jax.Array:
    return jnp.zeros((), jnp.float32)


def flush_host_refs() -> None:
    """jaxlib keeps a reference to the numpy source of a host-to-device transfer until its next execution
    after the transfer (and the deletion of the device copy) has settled; two trivial executions let the
    previous layer's arrays go before the next ``params.layer`` fetch rather than during the next layer."""
    for _ in range(2):
        _tick().block_until_ready()


def release(weights: Mapping[str, jax.Array], flush: bool = True) -> None:
    """Free device arrays now (jax on CPU may alias numpy buffers until a later gc), then flush jaxlib's holds."""
    for w in weights.values():
        w.delete()
    if flush:
        flush_host_refs()
