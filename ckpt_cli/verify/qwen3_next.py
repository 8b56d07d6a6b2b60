"""MaxText's Qwen3-Next forward (models/qwen3.py, decoder_block qwen3_next) in JAX over a MaxText tree, layer by layer.

Also Qwen3.5's (decoder_block qwen3_5: models/qwen3_5.py subclasses these layers; its tree differs only in where the
layers sit, which `params.layer(i)` reads from the family's blocks; the router always renormalises, see verify/run.py).

Composed from the blocks of `verify/blocks.py` (RMSNorm with `offset`, partial rotate-half RoPE, GQA attention, the
causal mask, L2 norm, softmax top-k routing, streamed routed experts, SwiGLU, final logits); what is Qwen3-Next's
own:

* the layer norms, the final norm and q/k norms are Qwen3NextRMSNorm: RMSNorm times `1 + w` (MaxText's
  `scale_offset=1`, `rms_norm(offset=1.0)`; the checkpoint stores w as HF does);
* gated DeltaNet layers (`attention/in_proj_qkvz` ...): the fused projection read per key head as
  [q (Dk), k (Dk), v (V·Dv), z (V·Dv)] (V = value heads per key head), [b (V), a (V)] likewise; a causal
  depthwise conv over [q, k, v] then SiLU; q, k L2-normalised, q × Dk^-0.5, key heads repeated to the value
  heads; β = sigmoid(b), g = -exp(A_log)·softplus(a + dt_bias); the delta rule run sequentially in float32,
  per head S ← e^g S, S ← S + k ⊗ β(v − kᵀS), o = qᵀS (MaxText's chunked and step rules compute the same);
  then RMSNorm(o)·w (plain weight) × SiLU(z), and `out_proj`;
* full-attention layers: the query kernel gives each head's query and its output gate; q/k norms, rotate-half
  RoPE on the first `partial_rotary_factor`·D dims only, softmax attention × D^-0.5, output × sigmoid(gate);
* every MLP: softmax router (top-k, renormalised when `norm_topk_prob`) over SwiGLU experts, plus the shared
  expert × sigmoid(h·shared_expert_gate).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ckpt_cli.families import qwen3_next as family
from ckpt_cli.verify.blocks import (
    FINAL_NORM,
    ParamSource,
    apply_rope,
    attention_mask,
    embed_tokens,
    final_logits,
    gqa_attention,
    l2_norm,
    lm_head,
    mlp_shapes,
    moe_shapes,
    release,
    rms_norm,
    rope_inv_freq,
    route_softmax_topk,
    routed_experts,
    select_leaves,
    swiglu,
    to_device,
)
from ckpt_cli.verify.blocks import rope_tables as cos_sin_tables

_IN_NORM, _POST_NORM = "input_layernorm/scale", "post_attention_layernorm/scale"
_ROUTED, _SHARED = "mlp/routed_experts/", "mlp/shared_expert/"
_EXPERTS = ("wi_0", "wi_1", "wo")
_GATE = _ROUTED + "gate/kernel"
_S_WI0, _S_WI1, _S_WO = (f"{_SHARED}{n}/kernel" for n in _EXPERTS)
_S_GATE = "mlp/shared_expert_gate/kernel"
_QKVZ, _BA, _CONV = "attention/in_proj_qkvz/kernel", "attention/in_proj_ba/kernel", "attention/conv1d/kernel"
_A_LOG, _DT_BIAS = "attention/A_log", "attention/dt_bias"
_GDN_NORM, _OUT_PROJ = "attention/norm/rms_norm/scale", "attention/out_proj/kernel"
_FA = "attention/attention/"
_Q, _K, _V, _O = (_FA + f"{n}/kernel" for n in ("query", "key", "value", "out"))
_Q_NORM, _K_NORM = _FA + "query_norm/scale", _FA + "key_norm/scale"


@dataclass(frozen=True)
class Qwen3NextConfig:
    """What the Qwen3-Next forward needs from an HF config."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    full: tuple[bool, ...]        # per layer: full attention (else gated DeltaNet)
    rope_theta: float
    rotary_dim: int               # the leading dims of each head that RoPE rotates
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    conv_width: int
    num_experts: int
    experts_per_tok: int
    moe_dim: int
    shared_dim: int
    norm_topk_prob: bool
    tied: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads or self.value_heads % self.key_heads:
            raise ValueError("need num_key_value_heads | num_attention_heads and linear_num_key_heads | "
                             "linear_num_value_heads")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"partial RoPE over {self.rotary_dim} of {self.head_dim} dims: need an even count")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Qwen3NextConfig:
        d = family.dims(cfg)
        rope = dict(cfg.get("rope_scaling") or {}) | dict(cfg.get("rope_parameters") or {})
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(f"rope_type {kind!r}: the Qwen3-Next forward implements plain (partial) RoPE")
        factor = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25)))
        return cls(
            num_layers=d["L"], hidden=d["E"], num_heads=d["N"], num_kv_heads=d["K"], head_dim=d["D"], vocab=d["V"],
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            full=tuple(family.is_full(i, cfg) for i in range(d["L"])),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rotary_dim=int(d["D"] * factor), key_heads=d["HK"], value_heads=d["HV"], key_dim=d["DK"],
            value_dim=d["DV"], conv_width=d["CK"], num_experts=d["X"],
            experts_per_tok=int(cfg["num_experts_per_tok"]), moe_dim=d["M"], shared_dim=d["S"],
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), tied=bool(cfg.get("tie_word_embeddings")),
        )


def rope_tables(cfg: Qwen3NextConfig, length: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin (T, R/2) float32 for the R rotated dims: θ^(-2i/R)."""
    return cos_sin_tables(rope_inv_freq(cfg.rotary_dim, cfg.rope_theta), length)


def gated_attention(h: jax.Array, w: dict, cos: jax.Array, sin: jax.Array, mask: jax.Array, eps: float,
                    dt: jnp.dtype) -> jax.Array:
    """Full attention of normed h (B,T,E): query and per-head output gate from one kernel, q/k norms, partial RoPE
    (`apply_rope` rotates only the dims the cos/sin tables cover)."""
    qg = jnp.einsum("bte,enj->btnj", h, w[_Q])
    d = qg.shape[-1] // 2
    q, gate = qg[..., :d], qg[..., d:]
    k = jnp.einsum("bte,ekd->btkd", h, w[_K])
    v = jnp.einsum("bte,ekd->btkd", h, w[_V])
    q, k = rms_norm(q, w[_Q_NORM], eps, dt, offset=1.0), rms_norm(k, w[_K_NORM], eps, dt, offset=1.0)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q = q * jnp.asarray(d**-0.5, dt)
    attn = gqa_attention(q, k, v, mask, dt) * jax.nn.sigmoid(gate)
    b, t, n, _ = attn.shape
    return attn.reshape(b, t, n * d) @ w[_O]


def causal_depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (B,T,C) through a causal depthwise conv, kernel (W, 1, C): out[t] = Σ_j x[t - W + 1 + j]·kernel[j]."""
    width = kernel.shape[0]
    pad = jnp.pad(x, ((0, 0), (width - 1, 0), (0, 0)))
    t = x.shape[1]
    return sum(pad[:, j:j + t, :] * kernel[j, 0] for j in range(width))


def delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array) -> jax.Array:
    """The gated delta rule, sequentially in float32. q, k (B,T,H,Dk) (q already scaled), v (B,T,H,Dv), g and
    beta (B,T,H) -> o (B,T,H,Dv)."""
    b, _, h, dk = k.shape
    state = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)

    def step(s, xs):
        qt, kt, vt, gt, bt = xs
        s = s * jnp.exp(gt)[..., None, None]
        delta = (vt - jnp.einsum("bhk,bhkv->bhv", kt, s, precision="highest")) * bt[..., None]
        s = s + kt[..., :, None] * delta[..., None, :]
        return s, jnp.einsum("bhk,bhkv->bhv", qt, s, precision="highest")

    seq = [a.astype(jnp.float32).swapaxes(0, 1) for a in (q, k, v, g, beta)]
    _, out = jax.lax.scan(step, state, seq)
    return out.swapaxes(0, 1)


def gated_deltanet(h: jax.Array, w: dict, cfg: Qwen3NextConfig, eps: float, dt: jnp.dtype) -> jax.Array:
    """A gated DeltaNet layer's attention on normed h (B,T,E)."""
    b, t, _ = h.shape
    hk, hv, dk, dv = cfg.key_heads, cfg.value_heads, cfg.key_dim, cfg.value_dim
    per = hv // hk
    qkvz = (h @ w[_QKVZ]).reshape(b, t, hk, 2 * dk + 2 * per * dv)
    q, k, v, z = jnp.split(qkvz, [dk, 2 * dk, 2 * dk + per * dv], axis=-1)
    ba = (h @ w[_BA]).reshape(b, t, hk, 2 * per)
    beta = jax.nn.sigmoid(ba[..., :per].reshape(b, t, hv))
    a = ba[..., per:].reshape(b, t, hv)
    g = -jnp.exp(w[_A_LOG]) * jax.nn.softplus(a + w[_DT_BIAS])
    mixed = jnp.concatenate([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], axis=-1)
    mixed = jax.nn.silu(causal_depthwise_conv(mixed, w[_CONV]).astype(jnp.float32)).astype(dt)
    q, k, v = jnp.split(mixed, [hk * dk, 2 * hk * dk], axis=-1)
    q = jnp.repeat(l2_norm(q.reshape(b, t, hk, dk)), per, axis=2) * jnp.asarray(dk**-0.5, dt)
    k = jnp.repeat(l2_norm(k.reshape(b, t, hk, dk)), per, axis=2)
    o = delta_rule(q, k, v.reshape(b, t, hv, dv), g, beta)
    o = rms_norm(o, w[_GDN_NORM], eps, jnp.float32) * jax.nn.silu(z.reshape(b, t, hv, dv).astype(jnp.float32))
    return o.astype(dt).reshape(b, t, hv * dv) @ w[_OUT_PROJ]


@partial(jax.jit, static_argnames=("cfg", "full", "top_k", "norm_topk_prob", "dtype"))
def _attention_and_route(x: jax.Array, w: dict, cos: jax.Array, sin: jax.Array, mask: jax.Array, *,
                         cfg: Qwen3NextConfig, full: bool, top_k: int, norm_topk_prob: bool, dtype: str):
    """x + attention(norm(x)), then the MLP input h (BT,E), the router's expert ids and weights, and the shared
    expert's gated output (BT,E)."""
    dt = jnp.dtype(dtype)
    w = {k: v.astype(dt) for k, v in w.items()}
    eps = float(cfg.rms_eps)
    h = rms_norm(x, w[_IN_NORM], eps, dt, offset=1.0)
    x = x + (gated_attention(h, w, cos, sin, mask, eps, dt) if full else gated_deltanet(h, w, cfg, eps, dt))
    h = rms_norm(x, w[_POST_NORM], eps, dt, offset=1.0).reshape(-1, x.shape[-1])
    weights, ids = route_softmax_topk(h @ w[_GATE], top_k, normalize=norm_topk_prob)
    shared = swiglu(h, w[_S_WI0], w[_S_WI1], w[_S_WO]) * jax.nn.sigmoid(h @ w[_S_GATE])
    return x, h, ids, weights, shared


def _layer_weights(layer: dict[str, np.ndarray], cfg: Qwen3NextConfig, i: int) -> dict[str, np.ndarray]:
    e, x, m, s = cfg.hidden, cfg.num_experts, cfg.moe_dim, cfg.shared_dim
    shapes = ({_IN_NORM: (e,), _POST_NORM: (e,), _S_GATE: (e, 1)} | moe_shapes(e, x, m, prefix=_ROUTED)
              | mlp_shapes(e, s, prefix=_SHARED))
    if cfg.full[i]:
        n, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        shapes |= {_Q: (e, n, 2 * d), _K: (e, k, d), _V: (e, k, d), _O: (n * d, e), _Q_NORM: (d,), _K_NORM: (d,)}
    else:
        hk, hv, dk, dv = cfg.key_heads, cfg.value_heads, cfg.key_dim, cfg.value_dim
        conv = 2 * hk * dk + hv * dv
        shapes |= {_QKVZ: (e, 2 * hk * dk + 2 * hv * dv), _BA: (e, 2 * hv), _CONV: (cfg.conv_width, 1, conv),
                   _A_LOG: (hv,), _DT_BIAS: (hv,), _GDN_NORM: (dv,), _OUT_PROJ: (hv * dv, e)}
    return select_leaves(layer, shapes, i)


def _layer(x: jax.Array, layer: dict[str, np.ndarray], cos: jax.Array, sin: jax.Array, mask: jax.Array,
           cfg: Qwen3NextConfig, i: int, dtype: str) -> jax.Array:
    """One decoder layer: attention, routing and the shared expert in one jit, then each hit routed expert on the
    tokens sent to it (one expert's weights on the device at a time)."""
    weights = to_device(layer, skip=tuple(_ROUTED + name for name in _EXPERTS))
    x, h, ids, gate_w, shared = _attention_and_route(x, weights, cos, sin, mask, cfg=cfg, full=cfg.full[i],
                                                     top_k=cfg.experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
                                                     dtype=dtype)
    experts = {name: layer[_ROUTED + name] for name in _EXPERTS}
    mlp = routed_experts(shared.astype(h.dtype), h, np.asarray(ids), np.asarray(gate_w), experts, dtype)
    x = (x + mlp.reshape(x.shape)).block_until_ready()
    release(weights)
    return x


def qwen3_next_logits(params: ParamSource, cfg: Qwen3NextConfig, tokens: np.ndarray, dtype: str = "float32"
                      ) -> np.ndarray:
    """tokens int (B, T) -> logits float32 (B, T, V) with MaxText's Qwen3-Next math, one layer read at a time."""
    tokens = np.asarray(tokens)
    x = embed_tokens(params, cfg, tokens, dtype)
    cos, sin = rope_tables(cfg, tokens.shape[1])
    mask = jnp.asarray(attention_mask(tokens.shape[1]))
    for i in range(cfg.num_layers):
        x = _layer(x, _layer_weights(params.layer(i), cfg, i), cos, sin, mask, cfg, i, dtype)
    head, transposed = lm_head(params, cfg.tied)
    logits = final_logits(x, params.top(FINAL_NORM), head, eps=float(cfg.rms_eps), transposed=transposed,
                          dtype=dtype, norm_offset=1.0)
    return np.asarray(logits)[..., : cfg.vocab]
