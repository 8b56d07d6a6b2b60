"""Reference JAX forward pass of MaxText's decoder math over a MaxText parameter tree.

Supports Qwen3 dense, Qwen3 MoE, Llama 3.1, Llama 2 / 3 / 3.3 (``llama2``), Mistral, Qwen2.5 (``qwen2``) and
Mixtral. Weights are read one decoder layer at a time through a
:class:`ParamSource`, so peak memory is about one layer of weights plus activations (and the
embedding / LM head). See ``maxtext-layout.md`` §1.2, §1.5, §5.4, §6.4, §8.3 and §11 for the conventions.
Qwen3 MoE and Mixtral route as transformers does (softmax over all experts in float32, top-k, renormalised when
``norm_topk_prob``: with it, the same as MaxText's top-k of the logits then softmax over the k); only the
experts a token is routed to are computed for it (``routed_experts``). Every piece of math is a block of
``verify/blocks.py``; this module picks the blocks and options per family.
Mixtral always renormalises (transformers' Mixtral does; MaxText takes the top-k logits then a softmax over
them), has no qk-norm, rotate-half RoPE and its 1/sqrt(D) folded into the query kernel. ``llama2`` and
``mistral`` are Llama 3.1 with MaxText's default rotate-half RoPE, unscaled whatever the config asks (MaxText
0.2.5 gives the scaled Llama RoPE to llama3.1-* names only), and full causal attention (its mistral block has no
sliding window). ``qwen2`` adds the q/k/v biases after the projections, scales queries at run time and has no
qk-norm.
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
    ParamSource,
    attention_mask,
    attention_shapes,
    embed_tokens,
    final_logits,
    llama3_inv_freq,
    lm_head,
    mlp_shapes,
    moe_shapes,
    release,
    rms_norm,
    rope_tables,
    route_softmax_topk,
    routed_experts,
    select_leaves,
    self_attention,
    subtree,
    swiglu,
    to_device,
)
from ckpt_cli.verify.blocks import rope_inv_freq as plain_inv_freq

FAMILIES = ("qwen3", "llama3.1", "qwen3_moe", "mixtral", "llama2", "mistral", "qwen2")
MOE_FAMILIES = ("qwen3_moe", "mixtral")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

_PRE_NORM = "pre_self_attention_layer_norm/scale"
_POST_NORM = "post_self_attention_layer_norm/scale"
_ATTN = "self_attention/"
QK_NORM_FAMILIES = ("qwen3", "qwen3_moe")
QKV_BIAS_FAMILIES = ("qwen2",)
FOLDED_QUERY_SCALE = ("llama3.1", "mixtral", "llama2", "mistral")   # 1/sqrt(D) is in their query kernels
PLAIN_ROPE = ("llama2", "mistral", "qwen2")   # MaxText's default RoPE: no scaling whatever the HF config asks
_WI0, _WI1, _WO = "mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel"
# The MoE block under each family's name for it (router gate/kernel, stacked experts wi_0, wi_1, wo).
_MOE_BLOCK = {"qwen3_moe": "moe_block/", "mixtral": "MoeBlock_0/"}
_EXPERTS = ("wi_0", "wi_1", "wo")


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
    inv_freq = plain_inv_freq(cfg.head_dim, cfg.rope_theta)
    if cfg.rope_scaling is None:
        return inv_freq
    s = cfg.rope_scaling
    return llama3_inv_freq(inv_freq, float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"]),
                           float(s["original_max_position_embeddings"]))


def _attention(x: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array, mask: jax.Array, eps: float,
               interleaved: bool, query_scale: float, dt: jnp.dtype) -> jax.Array:
    """x + pre-norm GQA self-attention of x (B,T,E); ``w`` already in ``dt`` (traced inside a jit)."""
    h = rms_norm(x, w[_PRE_NORM], eps, dt)
    return x + self_attention(h, subtree(w, _ATTN), cos, sin, mask, eps=eps, dtype=dt, interleaved=interleaved,
                             query_scale=query_scale)


@partial(jax.jit, static_argnames=("eps", "interleaved", "query_scale", "dtype"))
def _decoder_layer(x: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array, mask: jax.Array, *,
                   eps: float, interleaved: bool, query_scale: float, dtype: str) -> jax.Array:
    """One pre-norm decoder layer (GQA causal self-attention + SwiGLU MLP) on x (B,T,E)."""
    dt = jnp.dtype(dtype)
    w = {k: v.astype(dt) for k, v in w.items()}
    x = _attention(x, w, cos, sin, mask, eps, interleaved, query_scale, dt)
    return x + swiglu(rms_norm(x, w[_POST_NORM], eps, dt), w[_WI0], w[_WI1], w[_WO])


@partial(jax.jit, static_argnames=("gate", "eps", "interleaved", "query_scale", "top_k", "norm_topk_prob", "dtype"))
def _moe_attention_route(x: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array, mask: jax.Array, *,
                         gate: str, eps: float, interleaved: bool, query_scale: float, top_k: int,
                         norm_topk_prob: bool, dtype: str) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A Qwen3 MoE / Mixtral layer up to its experts: (x after attention (B,T,E), normed h (BT,E), expert ids
    (BT,k), expert weights (BT,k) float32). ``w[gate]`` is the router kernel (E, X).

    Router logits in the compute dtype (as transformers computes them), softmax over all experts in float32,
    the top k, renormalised to sum 1 when ``norm_topk_prob``.
    """
    dt = jnp.dtype(dtype)
    w = {k: v.astype(dt) for k, v in w.items()}
    x = _attention(x, w, cos, sin, mask, eps, interleaved, query_scale, dt)
    h = rms_norm(x, w[_POST_NORM], eps, dt).reshape(-1, x.shape[-1])
    weights, ids = route_softmax_topk(h @ w[gate], top_k, normalize=norm_topk_prob)
    return x, h, ids, weights


def _layer_weights(layer: dict[str, np.ndarray], cfg: ForwardConfig, i: int) -> dict[str, np.ndarray]:
    """Select and shape-check the leaves of layer ``i`` used by the forward."""
    e, n, k, d = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qk_norm = "head" if cfg.family in QK_NORM_FAMILIES else None
    bias = ("query", "key", "value") if cfg.family in QKV_BIAS_FAMILIES else ()
    shapes = {_PRE_NORM: (e,), _POST_NORM: (e,)} | attention_shapes(e, n, k, d, bias=bias, qk_norm=qk_norm)
    if cfg.family in MOE_FAMILIES:
        shapes |= moe_shapes(e, cfg.num_experts, cfg.moe_dim, prefix=_MOE_BLOCK[cfg.family])
    else:
        shapes |= mlp_shapes(e, layer[_WI0].shape[-1] if _WI0 in layer else -1)
    return select_leaves(layer, shapes, i)


def _moe_layer(x: jax.Array, layer: dict[str, np.ndarray], cos: jax.Array, sin: jax.Array, mask: jax.Array,
               cfg: ForwardConfig, static: dict) -> jax.Array:
    """One Qwen3 MoE / Mixtral layer: attention and routing in one jit, then each hit expert on the tokens routed
    to it (one expert's weights on the device at a time), summed, then the residual (as transformers adds it)."""
    block = _MOE_BLOCK[cfg.family]
    experts = {name: layer[block + name] for name in _EXPERTS}
    weights = to_device(layer, skip=tuple(block + name for name in _EXPERTS))
    x, h, ids, gate_w = _moe_attention_route(x, weights, cos, sin, mask, gate=block + "gate/kernel",
                                             top_k=cfg.experts_per_tok, norm_topk_prob=cfg.norm_topk_prob, **static)
    routed = routed_experts(jnp.zeros_like(h), h, np.asarray(ids), np.asarray(gate_w), experts, static["dtype"])
    x = (x + routed.reshape(x.shape)).block_until_ready()
    release(weights)
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
    cos, sin = rope_tables(rope_inv_freq(cfg), tokens.shape[1])
    mask = jnp.asarray(attention_mask(tokens.shape[1]))
    static = {
        "eps": float(cfg.rms_eps),
        "interleaved": cfg.family == "llama3.1",
        "query_scale": 1.0 if cfg.family in FOLDED_QUERY_SCALE else cfg.head_dim**-0.5,
        "dtype": dtype,
    }
    for i in range(cfg.num_layers):
        layer = _layer_weights(params.layer(i), cfg, i)
        if cfg.family in MOE_FAMILIES:
            x = _moe_layer(x, layer, cos, sin, mask, cfg, static)
        else:
            weights = to_device(layer)
            x = _decoder_layer(x, weights, cos, sin, mask, **static).block_until_ready()
            release(weights)
        del layer

    head, transposed = lm_head(params, cfg.tied)
    logits = final_logits(x, params.top(FINAL_NORM), head, eps=float(cfg.rms_eps), transposed=transposed, dtype=dtype)
    return np.asarray(logits)[..., : cfg.vocab]
