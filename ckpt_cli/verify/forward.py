"""Reference JAX forward pass of MaxText's decoder math over a MaxText parameter tree.

Supports Qwen3 dense, Qwen3 MoE, Llama 3.1, Llama 2 / 3 / 3.3 (``llama2``), Mistral, Qwen2.5 (``qwen2``) and
Mixtral. Weights are read one decoder layer at a time through a
:class:`ParamSource`, so peak memory is about one layer of weights plus activations (and the
embedding / LM head). See ``maxtext-layout.md`` §1.2, §1.5, §5.4, §6.4, §8.3 and §11 for the conventions.
Qwen3 MoE and Mixtral route as transformers does (softmax over all experts in float32, top-k, renormalised when
``norm_topk_prob``: with it, the same as MaxText's top-k of the logits then softmax over the k); only the
experts a token is routed to are computed for it (the expert code is DeepSeek's, ``verify/deepseek.py``).
Mixtral always renormalises (transformers' Mixtral does; MaxText takes the top-k logits then a softmax over
them), has no qk-norm, rotate-half RoPE and its 1/sqrt(D) folded into the query kernel. ``llama2`` and
``mistral`` are Llama 3.1 with MaxText's default rotate-half RoPE, unscaled whatever the config asks (MaxText
0.2.5 gives the scaled Llama RoPE to llama3.1-* names only), and full causal attention (its mistral block has no
sliding window). ``qwen2`` adds the q/k/v biases after the projections, scales queries at run time and has no
qk-norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

FAMILIES = ("qwen3", "llama3.1", "qwen3_moe", "mixtral", "llama2", "mistral", "qwen2")
MOE_FAMILIES = ("qwen3_moe", "mixtral")
_DTYPES = ("float32", "bfloat16")
# Same convention as MaxText: a large finite negative value instead of -inf.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

_PRE_NORM = "pre_self_attention_layer_norm/scale"
_POST_NORM = "post_self_attention_layer_norm/scale"
_Q, _K, _V, _O = (f"self_attention/{n}/kernel" for n in ("query", "key", "value", "out"))
_Q_NORM, _K_NORM = "self_attention/query_norm/scale", "self_attention/key_norm/scale"
_QB, _KB, _VB = (f"self_attention/{n}/bias" for n in ("query", "key", "value"))
QK_NORM_FAMILIES = ("qwen3", "qwen3_moe")
FOLDED_QUERY_SCALE = ("llama3.1", "mixtral", "llama2", "mistral")   # 1/sqrt(D) is in their query kernels
PLAIN_ROPE = ("llama2", "mistral", "qwen2")   # MaxText's default RoPE: no scaling whatever the HF config asks
_WI0, _WI1, _WO = "mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel"
# The MoE block's leaves (router, then the stacked experts wi_0, wi_1, wo) under each family's name for it.
_MOE_LEAVES = {family: (f"{block}/gate/kernel", f"{block}/wi_0", f"{block}/wi_1", f"{block}/wo")
               for family, block in (("qwen3_moe", "moe_block"), ("mixtral", "MoeBlock_0"))}
_EMBEDDING, _FINAL_NORM, _LM_HEAD = (
    "token_embedder/embedding",
    "decoder/decoder_norm/scale",
    "decoder/logits_dense/kernel",
)


class ParamSource(Protocol):
    """Read access to a MaxText parameter tree, one (unstacked) decoder layer at a time."""

    def top(self, path: str) -> np.ndarray: ...

    def has_top(self, path: str) -> bool: ...

    def layer(self, i: int) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class ForwardConfig:
    """Architecture hyper-parameters needed by :func:`maxtext_logits`."""

    family: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tied: bool
    # Qwen3 MoE and Mixtral only (0 elsewhere): routed experts, experts per token, per-expert width
    num_experts: int = 0
    experts_per_tok: int = 0
    moe_dim: int = 0
    norm_topk_prob: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unsupported family {self.family!r}; expected one of {FAMILIES}")
        if self.family in MOE_FAMILIES:
            if not 0 < self.experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok={self.experts_per_tok} must lie in [1, {self.num_experts}]")
            if self.moe_dim <= 0:
                raise ValueError(f"the per-expert width must be positive, got {self.moe_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even, got {self.head_dim}")
        if self.rope_scaling is not None:
            if self.family != "llama3.1":
                raise ValueError(f"rope_scaling is not supported for family {self.family!r}")
            missing = [k for k in _LLAMA3_KEYS if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling lacks {missing}")

    @classmethod
    def from_hf_config(cls, family: str, cfg: dict) -> ForwardConfig:
        """Build from a transformers ``config.json`` dict (legacy ``rope_theta``/``rope_scaling`` or
        transformers-5 ``rope_parameters``)."""
        rope: dict[str, Any] = dict(cfg.get("rope_scaling") or {})
        rope.update(cfg.get("rope_parameters") or {})
        default_theta = 1e6 if family == "mixtral" else 10000.0   # transformers' MixtralConfig default
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", default_theta)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in (None, "default"):
            scaling = None
        elif rope_type == "llama3":   # MaxText's default RoPE (PLAIN_ROPE) leaves it out; check_config notes so
            scaling = None if family in PLAIN_ROPE else {k: rope[k] for k in _LLAMA3_KEYS if k in rope}
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}")
        heads = int(cfg["num_attention_heads"])
        moe: dict[str, Any] = {}
        if family == "qwen3_moe":
            if int(cfg.get("decoder_sparse_step") or 1) != 1 or cfg.get("mlp_only_layers"):
                raise ValueError("only configs with every layer MoE (decoder_sparse_step 1, no mlp_only_layers)")
            experts = cfg.get("num_experts")
            moe = dict(
                num_experts=int(experts if experts is not None else cfg["num_local_experts"]),
                experts_per_tok=int(cfg["num_experts_per_tok"]),
                moe_dim=int(cfg["moe_intermediate_size"]),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),  # transformers' default when absent
            )
        elif family == "mixtral":
            if cfg.get("sliding_window") is not None and int(cfg["sliding_window"]) < int(
                    cfg.get("max_position_embeddings") or 0):
                raise ValueError(f"sliding_window {cfg['sliding_window']} (MaxText's mixtral has none)")
            moe = dict(
                num_experts=int(cfg["num_local_experts"]),
                experts_per_tok=int(cfg["num_experts_per_tok"]),
                moe_dim=int(cfg["intermediate_size"]),
                norm_topk_prob=True,   # transformers' Mixtral always renormalises the top-k weights
            )
        return cls(
            family=family,
            num_layers=int(cfg["num_hidden_layers"]),
            hidden=int(cfg["hidden_size"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            vocab=int(cfg["vocab_size"]),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tied=bool(cfg.get("tie_word_embeddings", False)),
            **moe,
        )


def rope_inv_freq(cfg: ForwardConfig) -> np.ndarray:
    """Inverse RoPE frequencies (D/2,) in float32, with Llama-3 scaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    if cfg.rope_scaling is None:
        return inv_freq.astype(np.float32)
    s = cfg.rope_scaling
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: jnp.dtype) -> jax.Array:
    """MaxText RMSNorm: normalize in f32, cast to ``dtype``, multiply by ``scale`` (no offset)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return y.astype(dtype) * scale.astype(dtype)


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool) -> jax.Array:
    """Rotate (B,T,H,D) by per-position angles; pairs are (i, D/2+i) or, interleaved, (2i, 2i+1)."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    xf = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        x1, x2 = jnp.split(xf, 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _project(h: jax.Array, w: dict[str, jax.Array], kernel: str, bias: str) -> jax.Array:
    """h (B,T,E) through an (E, H, D) projection kernel, plus its (H, D) bias when the layer has one (Qwen2.5)."""
    out = jnp.einsum("bte,ehd->bthd", h, w[kernel])
    return out + w[bias] if bias in w else out


def _self_attention(
    x: jax.Array,
    w: dict[str, jax.Array],
    cos: jax.Array,
    sin: jax.Array,
    eps: float,
    qk_norm: bool,
    interleaved: bool,
    query_scale: float,
    dt: jnp.dtype,
) -> jax.Array:
    """x + pre-norm GQA causal self-attention of x (B,T,E); ``w`` already in ``dt`` (traced inside a jit)."""
    h = _rms_norm(x, w[_PRE_NORM], eps, dt)
    q = _project(h, w, _Q, _QB)
    k = _project(h, w, _K, _KB)
    v = _project(h, w, _V, _VB)
    if qk_norm:
        q, k = _rms_norm(q, w[_Q_NORM], eps, dt), _rms_norm(k, w[_K_NORM], eps, dt)
    q, k = _rope(q, cos, sin, interleaved), _rope(k, cos, sin, interleaved)
    if query_scale != 1.0:
        q = q * jnp.asarray(query_scale, dt)
    attn = gqa_attention(q, k, v, jnp.tril(jnp.ones((q.shape[1], q.shape[1]), dtype=bool)), dt)
    return x + jnp.einsum("btnd,nde->bte", attn, w[_O])


def attention_mask(length: int, window: int | None) -> np.ndarray:
    """(T, T) bool: causal, and for a sliding-window (local) layer only the last `window` positions (q - kv < W)."""
    q, kv = np.arange(length)[:, None], np.arange(length)[None, :]
    mask = kv <= q
    return mask & (q - kv < window) if window is not None else mask


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dt: jnp.dtype,
                  softcap: float | None = None) -> jax.Array:
    """Softmax attention of q (B,T,N,D) over k, v (B,S,K,D), query head n reading kv head n // (N/K).

    q is already scaled; scores in float32, soft-capped (`c · tanh(s / c)`, Gemma 2) when `softcap` is given,
    masked positions (`mask` (T,S) False) get MaxText's large negative value, the probabilities are cast to `dt`
    before they weight v. Returns (B,T,N,D).
    """
    b, t, n, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    probs = jax.nn.softmax(jnp.where(mask, scores, _MASK_VALUE), axis=-1).astype(dt)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, n, d)


def swiglu(h: jax.Array, wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array) -> jax.Array:
    """MaxText's gated MLP with activations ["silu", "linear"]: (silu(h·wi_0) * (h·wi_1))·wo."""
    return (jax.nn.silu(h @ wi_0) * (h @ wi_1)) @ wo


@partial(jax.jit, static_argnames=("eps", "qk_norm", "interleaved", "query_scale", "dtype"))
def _decoder_layer(
    x: jax.Array,
    w: dict[str, jax.Array],
    cos: jax.Array,
    sin: jax.Array,
    *,
    eps: float,
    qk_norm: bool,
    interleaved: bool,
    query_scale: float,
    dtype: str,
) -> jax.Array:
    """One pre-norm decoder layer (GQA causal self-attention + SwiGLU MLP) on x (B,T,E)."""
    dt = jnp.dtype(dtype)
    w = {k: v.astype(dt) for k, v in w.items()}
    x = _self_attention(x, w, cos, sin, eps, qk_norm, interleaved, query_scale, dt)

    return x + swiglu(_rms_norm(x, w[_POST_NORM], eps, dt), w[_WI0], w[_WI1], w[_WO])


@partial(jax.jit, static_argnames=("eps", "qk_norm", "interleaved", "query_scale", "top_k", "norm_topk_prob",
                                   "dtype"))
def _moe_attention_route(
    x: jax.Array,
    w: dict[str, jax.Array],
    gate: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    *,
    eps: float,
    qk_norm: bool,
    interleaved: bool,
    query_scale: float,
    top_k: int,
    norm_topk_prob: bool,
    dtype: str,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A Qwen3 MoE / Mixtral layer up to its experts: (x after attention (B,T,E), normed h (BT,E), expert ids
    (BT,k), expert weights (BT,k) float32). ``gate`` is the router kernel (E, X).

    Router logits in the compute dtype (as transformers computes them), softmax over all experts in float32,
    the top k, renormalised to sum 1 when ``norm_topk_prob``.
    """
    dt = jnp.dtype(dtype)
    w = {k: v.astype(dt) for k, v in w.items()}
    x = _self_attention(x, w, cos, sin, eps, qk_norm, interleaved, query_scale, dt)
    h = _rms_norm(x, w[_POST_NORM], eps, dt).reshape(-1, x.shape[-1])
    probs = jax.nn.softmax((h @ gate.astype(dt)).astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return x, h, ids, weights


@partial(jax.jit, static_argnames=("eps", "transposed", "dtype"))
def _final_logits(
    x: jax.Array, scale: jax.Array, head: jax.Array, *, eps: float, transposed: bool, dtype: str
) -> jax.Array:
    """Final RMSNorm then LM head; ``head`` is (E,V) or, when ``transposed``, the (V,E) embedding."""
    dt = jnp.dtype(dtype)
    h = _rms_norm(x, scale, eps, dt)
    spec = "bte,ve->btv" if transposed else "bte,ev->btv"
    return jnp.einsum(spec, h, head.astype(dt)).astype(jnp.float32)


def _layer_weights(layer: dict[str, np.ndarray], cfg: ForwardConfig, i: int) -> dict[str, np.ndarray]:
    """Select and shape-check the leaves of layer ``i`` used by the forward."""
    e, n, k, d = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        _PRE_NORM: (e,),
        _POST_NORM: (e,),
        _Q: (e, n, d),
        _K: (e, k, d),
        _V: (e, k, d),
        _O: (n, d, e),
    }
    if cfg.family in QK_NORM_FAMILIES:
        shapes |= {_Q_NORM: (d,), _K_NORM: (d,)}
    if cfg.family == "qwen2":
        shapes |= {_QB: (n, d), _KB: (k, d), _VB: (k, d)}
    if cfg.family in MOE_FAMILIES:
        x, m = cfg.num_experts, cfg.moe_dim
        gate, wi0, wi1, wo = _MOE_LEAVES[cfg.family]
        shapes |= {gate: (e, x), wi0: (x, e, m), wi1: (x, e, m), wo: (x, m, e)}
    else:
        f = layer[_WI0].shape[-1] if _WI0 in layer else -1
        shapes |= {_WI0: (e, f), _WI1: (e, f), _WO: (f, e)}
    return select_leaves(layer, shapes, i)


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


def embed_tokens(params: ParamSource, cfg, tokens: np.ndarray, dtype: str):
    """Check dtype and token ids, then look the tokens up in the embedding table (dropped right after).

    Shared by every family's forward; `cfg` needs `vocab` and `hidden`. The table is re-fetched for a
    tied head, so it is not held while the layers run.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be an integer (B,T) array, got {tokens.dtype} {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab):
        raise ValueError(f"token ids must lie in [0, {cfg.vocab})")
    embedding = params.top(_EMBEDDING)
    if embedding.ndim != 2 or embedding.shape[0] < cfg.vocab or embedding.shape[1] != cfg.hidden:
        raise ValueError(f"{_EMBEDDING} has shape {embedding.shape}, expected ({cfg.vocab}, {cfg.hidden})")
    return jnp.asarray(embedding[tokens]).astype(dtype)


class _ExpertCopies:
    """One expert of a stacked (X, ...) array at a time, as a fresh copy.

    jaxlib on CPU may keep the numpy source of a host-to-device transfer referenced until some time after the
    device copy is deleted; a view of one expert would then keep the layer's whole stacked array alive past the
    next layer's fetch (seen under CPU contention, where `_flush_host_refs` is not always enough). A copy pins
    only itself, and costs one expert's bytes.
    """

    def __init__(self, stacked: np.ndarray) -> None:
        self.stacked = stacked

    def __getitem__(self, x: int) -> np.ndarray:
        return np.array(self.stacked[x])


def _moe_layer(x: jax.Array, layer: dict[str, np.ndarray], cos: jax.Array, sin: jax.Array, cfg: ForwardConfig,
               static: dict) -> jax.Array:
    """One Qwen3 MoE / Mixtral layer: attention and routing in one jit, then each hit expert on the tokens routed
    to it (one expert's weights on the device at a time), summed, then the residual (as transformers adds it)."""
    from ckpt_cli.verify import deepseek as ds  # it imports this module: imported here, not at the top

    gate_path, wi0, wi1, wo = _MOE_LEAVES[cfg.family]
    weights = jax.block_until_ready({k: jax.device_put(np.array(v)) for k, v in layer.items()
                                     if k not in (wi0, wi1, wo)})   # copies: see _ExpertCopies
    gate = weights.pop(gate_path)
    x, h, ids, gate_w = _moe_attention_route(x, weights, gate, cos, sin, top_k=cfg.experts_per_tok,
                                             norm_topk_prob=cfg.norm_topk_prob, **static)
    gate.delete()
    experts = {ds._EXP_WI0: _ExpertCopies(layer[wi0]), ds._EXP_WI1: _ExpertCopies(layer[wi1]),
               ds._EXP_WO: _ExpertCopies(layer[wo])}
    routed = ds._routed_experts(jnp.zeros_like(h), h, np.asarray(ids), np.asarray(gate_w), experts, static["dtype"])
    x = (x + routed.reshape(x.shape)).block_until_ready()
    for w in weights.values():
        w.delete()
    ds._flush_host_refs()
    return x


def maxtext_logits(params: ParamSource, cfg: ForwardConfig, tokens: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """tokens int (B,T) -> logits float32 (B,T,V), computed with MaxText's math.

    Positions are 0..T-1 with a causal mask and no padding. Layers are fetched with ``params.layer(i)``
    one at a time and released before the next fetch; a tied model reads the embedding twice (lookup,
    then LM head). ``dtype`` ('float32' or 'bfloat16') is the activation/weight compute dtype; RMSNorm
    statistics and softmax are always float32. Logits are cut to ``cfg.vocab`` if the table is padded.
    """
    tokens = np.asarray(tokens)
    x = embed_tokens(params, cfg, tokens, dtype)

    angles = np.arange(tokens.shape[1], dtype=np.float32)[:, None] * rope_inv_freq(cfg)[None, :]
    cos, sin = jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))
    static = {
        "eps": float(cfg.rms_eps),
        "qk_norm": cfg.family in QK_NORM_FAMILIES,
        "interleaved": cfg.family == "llama3.1",
        "query_scale": 1.0 if cfg.family in FOLDED_QUERY_SCALE else cfg.head_dim**-0.5,
        "dtype": dtype,
    }
    for i in range(cfg.num_layers):
        layer = _layer_weights(params.layer(i), cfg, i)
        if cfg.family in MOE_FAMILIES:
            x = _moe_layer(x, layer, cos, sin, cfg, static)
            del layer
            continue
        weights = {k: jnp.asarray(v) for k, v in layer.items()}
        x = _decoder_layer(x, weights, cos, sin, **static).block_until_ready()
        for k, w in weights.items():
            if w is not layer[k]:  # free now: jax on CPU may alias numpy buffers until a later gc
                w.delete()
        del layer, weights

    if cfg.tied:
        head, transposed = params.top(_EMBEDDING), True
    elif params.has_top(_LM_HEAD):
        head, transposed = params.top(_LM_HEAD), False
    else:
        raise KeyError(f"untied config but {_LM_HEAD} is absent")
    logits = _final_logits(x, params.top(_FINAL_NORM), head, eps=float(cfg.rms_eps), transposed=transposed, dtype=dtype)
    return np.asarray(logits)[..., : cfg.vocab]
