"""MaxText's Gemma 4 text forward (decoder_blocks gemma4 and gemma4_small) in JAX over a MaxText tree, one layer at
a time, composed from `verify/blocks.py`.

Per layer (``x`` the residual stream; every RMSNorm multiplies by its stored scale, no ``1 + w``):

* attention: ``x += PostAttnNorm(Attn(PreAttnNorm(x)))``. The query is projected, RMS-normed per head
  (``query_norm``) and rotated; the keys are projected, normed (``key_norm``) and rotated, the values projected (on
  global layers with attention_k_eq_v, the key projection before its norm stands for the value) and RMS-normed
  without a scale. Attention scale 1 (nothing folded, nothing at run time). Local layers: head dim D, K kv heads,
  a causal sliding window, full rotate-half RoPE (θ local); global layers: head dim DG, KG kv heads, causal, Gemma
  4's proportional RoPE (the first ``fraction·DG/2`` frequencies ``θ^(-2i/DG)``, the other pairs unrotated). A
  KV-shared layer (E2B/E4B: the last ``num_kv_shared_layers``) has no key/value projection: it attends over the
  keys and values of the last earlier layer of its kind.
* MLP: ``x += PostFfwNorm(GeGLU(PreFfwNorm(x)))`` (tanh gelu); in a MoE layer (26b) the GeGLU is the shared expert
  and ``PostFfwNorm(PostNorm1(shared) + PostNorm2(routed))`` is added, the routed experts fed ``PreNorm2(x)`` and
  routed on ``RMSNorm(x)·E^-½·pre_forward_scale_2 · gate`` (softmax over all experts, top-k, renormalised, times
  ``per_expert_scale`` of each chosen expert), one expert's weights on the device at a time.
* per-layer embeddings (E2B/E4B): ``x += PostPleNorm((gelu(x·gate) * ple_i)·projection)``, where ``ple_i`` is layer
  i's slice of ``(embed_tokens_per_layer[tokens]·√P + RMSNorm(emb·per_layer_model_projection·E^-½)) / √2``.
* then ``x *= layer_scalar``.

The embedding table carries √E (stored scaled); the tied logits are ``RMSNorm(x)·tableᵀ / √E``, soft-capped at
``final_logit_softcapping``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ckpt_cli.families import gemma4 as family
from ckpt_cli.families.base import eval_shape
from ckpt_cli.verify.blocks import (
    EMBEDDING,
    FINAL_NORM,
    ParamSource,
    attend,
    attention_mask,
    embed_tokens,
    final_logits,
    gated_mlp,
    gather_rows,
    geglu_expert,
    per_layer_inputs,
    project_kv,
    proportional_inv_freq,
    release,
    rms_norm,
    rope_tables,
    route_softmax_topk,
    routed_experts,
    select_leaves,
    subtree,
    to_device,
    unscaled_rms_norm,
)

_ATTN = "self_attention/"
_MOE = family.MOE
_ROUTED = _MOE + "MoeBlock_0/"
_EXPERTS = ("wi_0", "wi_1", "wo")
_PLE = "decoder/per_layer_embedder/"


@dataclass(frozen=True)
class Gemma4Config:
    """What the Gemma 4 forward needs from an HF (text) config."""

    num_layers: int
    hidden: int
    vocab: int
    rms_eps: float
    sliding_window: int | None
    global_layers: tuple[bool, ...]
    head_dims: tuple[int, int]                      # (local, global)
    rope: tuple[tuple[float, float], tuple[float, float]]   # (theta, rotated fraction): (local, global)
    first_shared: int                               # the first KV-shared layer (num_layers: none)
    ple: int                                        # per-layer embedding width P (0: none)
    experts_per_tok: int
    final_softcap: float | None
    config: dict                                    # the text config, for the table's per-layer shapes

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Gemma4Config:
        cfg = family.model_config(cfg)
        d = family.dims(cfg)
        rope = family.rope(cfg)
        cap = cfg.get("final_logit_softcapping")
        return cls(
            num_layers=d["L"], hidden=d["E"], vocab=d["V"], rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            sliding_window=int(cfg["sliding_window"]) if cfg.get("sliding_window") else None,
            global_layers=tuple(t == "full_attention" for t in family.layer_types(cfg)),
            head_dims=(d["D"], d["DG"]), rope=(rope["sliding_attention"], rope["full_attention"]),
            first_shared=family.first_shared(cfg), ple=d.get("P", 0),
            experts_per_tok=int(cfg.get("top_k_experts") or 0), final_softcap=float(cap) if cap else None,
            config=cfg,
        )

    def layer_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        """Layer i's leaves and their shapes, from the conversion's own table."""
        d = family.dims(self.config)
        return {r.maxtext: ((d[r.experts],) if r.experts else ()) + eval_shape(r.maxtext_shape, d)
                for r in family.rules_of(i, self.config)}


@partial(jax.jit, static_argnames=("own_kv", "moe", "top_k", "eps", "dtype"))
def _layer_head(x: jax.Array, w: dict[str, jax.Array], cos: jax.Array, sin: jax.Array, mask: jax.Array,
                k: jax.Array | None, v: jax.Array | None, *, own_kv: bool, moe: bool, top_k: int, eps: float,
                dtype: str):
    """Attention (own keys and values, or the donor's ``k``, ``v``) and the MLP up to the routed experts ->
    (x after attention, k, v, dense MLP output) or, MoE, (x, k, v, PostNorm1(shared) (BT,E), the experts' input
    (BT,E), expert ids and weights (BT,k))."""
    dt = jnp.dtype(dtype)
    w = {n: a.astype(dt) for n, a in w.items()}
    h = rms_norm(x, w["pre_self_attention_norm/scale"], eps, dt)
    a = subtree(w, _ATTN)
    if own_kv:
        k, v = project_kv(h, a, cos, sin, eps=eps, dtype=dt, v_norm=True)
    x = x + rms_norm(attend(h, a, k, v, cos, sin, mask, eps=eps, dtype=dt), w["post_self_attention_norm/scale"],
                     eps, dt)
    h = rms_norm(x, w["pre_ffw_norm/scale"], eps, dt)
    dense = _MOE + "shared_experts/" if moe else "mlp/"
    mlp = gated_mlp(h, *(w[f"{dense}{n}/kernel"] for n in _EXPERTS), "gelu_tanh")
    if not moe:
        return x, k, v, mlp
    flat = x.reshape(-1, x.shape[-1])
    shared = rms_norm(mlp.reshape(flat.shape), w["mlp/post_feedforward_layernorm_1/scale"], eps, dt)
    routed_in = rms_norm(flat, w["mlp/pre_feedforward_layernorm_2/scale"], eps, dt)
    gate_in = unscaled_rms_norm(flat, eps, dt) * jnp.asarray(x.shape[-1] ** -0.5, dt) * w["mlp/pre_forward_scale_2"]
    weights, ids = route_softmax_topk(gate_in @ w[_ROUTED + "gate/kernel"], top_k, normalize=True)
    weights = weights * w[_ROUTED + "per_expert_scale"].astype(jnp.float32)[ids]
    return x, k, v, shared, routed_in, ids, weights


@partial(jax.jit, static_argnames=("moe", "eps", "dtype"))
def _layer_tail(x: jax.Array, w: dict[str, jax.Array], mlp: jax.Array, routed: jax.Array | None,
                ple: jax.Array | None, *, moe: bool, eps: float, dtype: str) -> jax.Array:
    """x + PostFfwNorm(mlp (+ PostNorm2(routed), MoE)), the per-layer-embedding residual, times layer_scalar."""
    dt = jnp.dtype(dtype)
    w = {n: a.astype(dt) for n, a in w.items()}
    if moe:
        mlp = mlp + rms_norm(routed, w["mlp/post_feedforward_layernorm_2/scale"], eps, dt)
    x = x + rms_norm(mlp.reshape(x.shape), w["post_ffw_norm/scale"], eps, dt)
    if ple is not None:
        gate = jax.nn.gelu(x @ w["per_layer_input_gate/kernel"], approximate=True) * ple
        x = x + rms_norm(gate @ w["per_layer_projection/kernel"], w["post_per_layer_input_norm/scale"], eps, dt)
    return x * w["layer_scalar"]


def gemma4_logits(params: ParamSource, cfg: Gemma4Config, tokens: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """tokens int (B, T) -> logits float32 (B, T, V) with MaxText's Gemma 4 math, one layer read at a time (and
    only the per-layer-embedding rows of the tokens)."""
    tokens = np.asarray(tokens)
    x = embed_tokens(params, cfg, tokens, dtype)
    length = tokens.shape[1]
    tables = {glob: rope_tables(proportional_inv_freq(cfg.head_dims[glob], *cfg.rope[glob]), length)
              for glob in (False, True)}
    masks = {False: jnp.asarray(attention_mask(length, cfg.sliding_window)), True: jnp.asarray(attention_mask(length))}
    ple = None
    if cfg.ple:
        identity = jnp.asarray(gather_rows(params, _PLE + "embed_tokens_per_layer", tokens))
        ple = per_layer_inputs(x, identity, jnp.asarray(params.top(_PLE + "per_layer_model_projection/kernel")),
                               jnp.asarray(params.top(_PLE + "per_layer_projection_norm/scale")),
                               layers=cfg.num_layers, eps=cfg.rms_eps, dtype=dtype)
    kv: dict[bool, tuple[jax.Array, jax.Array]] = {}     # the last computed keys/values of each kind of layer
    for i in range(cfg.num_layers):
        layer = select_leaves(params.layer(i), cfg.layer_shapes(i), i)
        glob, own = cfg.global_layers[i], i < cfg.first_shared
        moe = _ROUTED + "gate/kernel" in layer
        weights = to_device(layer, skip=tuple(_ROUTED + n for n in _EXPERTS))
        k, v = (None, None) if own else kv[glob]
        out = _layer_head(x, weights, *tables[glob], masks[glob], k, v, own_kv=own, moe=moe,
                          top_k=cfg.experts_per_tok, eps=cfg.rms_eps, dtype=dtype)
        x, k, v, mlp = out[:4]
        kv[glob] = (k, v)
        routed = None
        if moe:
            routed_in, ids, gate_w = out[4:]
            experts = {n: layer[_ROUTED + n] for n in _EXPERTS}
            routed = routed_experts(jnp.zeros_like(routed_in), routed_in, np.asarray(ids), np.asarray(gate_w),
                                    experts, dtype, ffn=geglu_expert)
        x = _layer_tail(x, weights, mlp, routed, ple[:, :, i] if ple is not None else None, moe=moe,
                        eps=cfg.rms_eps, dtype=dtype).block_until_ready()
        release(weights)
        del layer
    logits = final_logits(x, params.top(FINAL_NORM), params.top(EMBEDDING), eps=cfg.rms_eps, transposed=True,
                          dtype=dtype, normalize=True, soft_cap=cfg.final_softcap)
    return np.asarray(logits)[..., : cfg.vocab]
