"""MaxText's Llama 4 text forward (decoder_block llama4) in JAX over a MaxText tree, one layer at a time.

Composed from the blocks of `verify/blocks.py` (RMSNorm, the weightless q/k RMS norm, Llama 3 frequencies and
interleaved RoPE, the causal and chunked masks, GQA attention, SwiGLU, top-k sigmoid routing, streamed routed
experts with input scaling, final logits); what is Llama 4's own:

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

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ckpt_cli.families import llama4 as family
from ckpt_cli.verify.blocks import (
    FINAL_NORM,
    ParamSource,
    apply_rope,
    attention_mask,
    attention_shapes,
    embed_tokens,
    final_logits,
    gqa_attention,
    llama3_inv_freq,
    lm_head,
    mlp_shapes,
    moe_shapes,
    release,
    rms_norm,
    rope_inv_freq,
    rope_tables,
    route_topk_sigmoid,
    routed_experts,
    select_leaves,
    subtree,
    swiglu,
    to_device,
    unscaled_rms_norm,
)

_PRE, _POST = "pre_self_attention_layer_norm/scale", "post_self_attention_layer_norm/scale"
_ATTN = "self_attention/"
_WI0, _WI1, _WO = "mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel"
_ROUTED, _SHARED = family.MOE + "MoeBlock_0/", family.MOE + "shared_experts/"
_EXPERTS = ("wi_0", "wi_1", "wo")
_GATE = _ROUTED + "gate/kernel"
_SWI0, _SWI1, _SWO = (f"{_SHARED}{n}/kernel" for n in _EXPERTS)
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
    inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    if cfg.rope_scaling is None:
        return inv
    return llama3_inv_freq(inv, *(cfg.rope_scaling[k] for k in _LLAMA3_KEYS))


def temperature_scales(cfg: Llama4Config, length: int) -> np.ndarray:
    """The no-RoPE layers' query scale per position (T,) float32: ``log1p(floor((t + 1) / floor_scale)) ·
    attn_scale + 1`` with temperature tuning, else ones."""
    if not cfg.temperature_tuning:
        return np.ones(length, np.float32)
    pos = np.arange(length, dtype=np.float32)
    return (np.log1p(np.floor((pos + 1.0) / cfg.floor_scale)) * cfg.attn_scale + 1.0).astype(np.float32)


def _attention(h: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array, mask: jax.Array,
               q_scale: jax.Array, *, rope: bool, qk_norm: bool, eps: float, dt: jnp.dtype) -> jax.Array:
    """Self-attention of the normed h (B,T,E): RoPE layers rotate (interleaved pairs), then the weightless q/k
    norm; every query times its position's ``q_scale`` and D^-0.5."""
    q = jnp.einsum("bte,end->btnd", h, w["query/kernel"])
    k = jnp.einsum("bte,ekd->btkd", h, w["key/kernel"])
    v = jnp.einsum("bte,ekd->btkd", h, w["value/kernel"])
    if rope:
        q, k = apply_rope(q, cos, sin, interleaved=True), apply_rope(k, cos, sin, interleaved=True)
        if qk_norm:
            q, k = unscaled_rms_norm(q, eps, dt), unscaled_rms_norm(k, eps, dt)
    q = (q * q_scale[None, :, None, None].astype(dt)) * jnp.asarray(q.shape[-1] ** -0.5, dt)
    return jnp.einsum("btnd,nde->bte", gqa_attention(q, k, v, mask, dt), w["out/kernel"])


@partial(jax.jit, static_argnames=("rope", "qk_norm", "moe", "top_k", "eps", "dtype"))
def _layer_body(x: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array, mask: jax.Array,
                q_scale: jax.Array, *, rope: bool, qk_norm: bool, moe: bool, top_k: int, eps: float, dtype: str):
    """A dense layer: x + attention, + SwiGLU MLP -> (x,). A MoE layer up to its routed experts: (x after
    attention (B,T,E), the normed MLP input h (BT,E), expert ids and sigmoid weights (BT,k), the shared expert's
    output (BT,E))."""
    dt = jnp.dtype(dtype)
    w = {k: v.astype(dt) for k, v in w.items()}
    h = rms_norm(x, w[_PRE], eps, dt)
    x = x + _attention(h, subtree(w, _ATTN), cos, sin, mask, q_scale, rope=rope, qk_norm=qk_norm, eps=eps, dt=dt)
    h = rms_norm(x, w[_POST], eps, dt)
    if not moe:
        return (x + swiglu(h, w[_WI0], w[_WI1], w[_WO]),)
    h = h.reshape(-1, h.shape[-1])
    weights, ids = route_topk_sigmoid(h @ w[_GATE], top_k)
    return x, h, ids, weights, swiglu(h, w[_SWI0], w[_SWI1], w[_SWO])


def _layer_weights(layer: dict[str, np.ndarray], cfg: Llama4Config, i: int) -> dict[str, np.ndarray]:
    e, n, k, d = cfg.hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {_PRE: (e,), _POST: (e,)} | attention_shapes(e, n, k, d, prefix=_ATTN)
    if i in cfg.moe_layers:
        m = layer[_SWI0].shape[-1] if _SWI0 in layer else -1
        shapes |= moe_shapes(e, cfg.num_experts, m, prefix=_ROUTED) | mlp_shapes(e, m, prefix=_SHARED)
    else:
        shapes |= mlp_shapes(e, layer[_WI0].shape[-1] if _WI0 in layer else -1)
    return select_leaves(layer, shapes, i)


def llama4_logits(params: ParamSource, cfg: Llama4Config, tokens: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """tokens int (B, T) -> logits float32 (B, T, V) with MaxText's Llama 4 math, one layer read at a time."""
    tokens = np.asarray(tokens)
    x = embed_tokens(params, cfg, tokens, dtype)
    length = tokens.shape[1]
    cos, sin = rope_tables(inv_freq(cfg), length)
    # RoPE layers: chunked attention, no temperature; no-RoPE layers: full causal attention, temperature tuned.
    masks = {True: jnp.asarray(attention_mask(length, chunk=cfg.chunk)), False: jnp.asarray(attention_mask(length))}
    scales = {True: jnp.ones(length, jnp.float32), False: jnp.asarray(temperature_scales(cfg, length))}
    for i in range(cfg.num_layers):
        layer = _layer_weights(params.layer(i), cfg, i)
        rope, moe = cfg.rope_layers[i], i in cfg.moe_layers
        weights = to_device(layer, skip=tuple(_ROUTED + name for name in _EXPERTS))
        out = _layer_body(x, weights, cos, sin, masks[rope], scales[rope], rope=rope, qk_norm=cfg.qk_norm, moe=moe,
                          top_k=cfg.experts_per_tok, eps=cfg.rms_eps, dtype=dtype)
        if moe:
            x, h, ids, gate_w, shared = out
            experts = {name: layer[_ROUTED + name] for name in _EXPERTS}
            mlp = routed_experts(shared, h, np.asarray(ids), np.asarray(gate_w), experts, dtype, scale_input=True)
            x = x + mlp.reshape(x.shape)
        else:
            (x,) = out
        x = x.block_until_ready()
        release(weights)
        del layer
    head, transposed = lm_head(params, False)
    logits = final_logits(x, params.top(FINAL_NORM), head, eps=cfg.rms_eps, transposed=transposed, dtype=dtype)
    return np.asarray(logits)[..., : cfg.vocab]
