"""DeepSeek-V4 forward with MaxText 0.2.5's deepseek4 math over a MaxText tree, one layer at a time.

The residual is `H = hc_mult` streams `x (B,T,H,E)`, the embedding copied into each. Per layer, twice (attention,
then MoE), a manifold-constrained hyper-connection (`mhc_attention`, `mhc_mlp`):

* `f = RMSNorm(x flattened to H·E) · mhc_norm`; `pre = σ(f·pre_alpha · pre_alpha_scale + pre_beta) + ε`,
  `post = 2σ(f·post_alpha · post_alpha_scale + post_beta)`, `comb = softmax_rows(f·res_alpha (H×H) · res_alpha_scale
  + res_beta) + ε`, then Sinkhorn: columns normalised, and `hc_sinkhorn_iters - 1` times rows then columns
  (`v / (sum + ε)`, ε = hc_eps);
* the block reads `Σ_h pre_h x_h` (RMSNorm'd by its pre-norm), and the new streams are
  `x'_k = post_k · block + Σ_j comb_jk x_j`.

Attention (MaxText's compressed attention): `q = RMSNorm(h·wq_a)·wq_b`, each head RMS-normalised without a scale,
`kv = RMSNorm(h·wkv)` (one head, key = value); interleaved RoPE on the trailing `qk_rope_head_dim` channels of each
head (theta `rope_theta` on sliding layers, `compress_rope_theta` on compressed ones; plain, whatever
`rope_scaling` says); a sliding window of `sliding_window` over the raw tokens, plus, by compress ratio r:

* HCA (r > 4): each closed window of r tokens becomes one entry `RMSNorm(Σ softmax(h·gate_proj + position_bias) ⊙
  h·kv_proj)`, roped at position w·r; query t sees entry w when w < (t+1)/r.
* CSA (r = 4): the same over 2r slots per window (the previous window's first half of the 2D-wide projections and
  this window's second half), and the lightning indexer (the same compressor at index_head_dim on its own weights;
  queries `RMSNorm(h·wq_a)·q_proj` roped at t; score `Σ_heads relu(q·k)·Id^-½ · (h·weights_proj)·Ih^-½`) keeps for
  each query its `index_topk` best causal entries.

Scores × D^-½ with a learned per-head sink; the output's rope channels rotated back (−angle at the query), then
the grouped projection `o_a_proj (G, N·D/G, O)` and `o_b_proj`. MoE: `s = sqrt(softplus(h·gate))`; experts by
`tid2eid[token]` on the hash layers, else top-k of `s + bias`; weights `s_k / (Σ s_k + 1e-20) · routed_scaling_factor`;
experts and the shared expert are SwiGLUs with `min(gate, limit)` and `clip(up, ±limit)` (`GatedExpert`), the routed
ones streamed by `routed_experts` (only the hit experts, read a group at a time). Head: `pre = σ(RMSNorm(x)·
hc_fn · hc_scale + hc_base) + ε`, `Σ_h pre_h x_h`, the final norm and `logits_dense`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ckpt_cli.families import deepseek4 as family
from ckpt_cli.verify.blocks import (
    FINAL_NORM,
    LM_HEAD,
    MASK_VALUE,
    GatedExpert,
    ParamSource,
    apply_rope,
    attention_mask,
    embed_tokens,
    release,
    rms_norm,
    rope_inv_freq,
    rope_tables,
    routed_experts,
    swiglu,
    to_device,
    unscaled_rms_norm,
)

A, MOE = "self_attention/", "mlp/MoeBlock_0/"
_PRE_NORM, _POST_NORM = "pre_self_attention_layer_norm/scale", "post_self_attention_layer_norm/scale"


@dataclass(frozen=True)
class Deepseek4Config:
    """What the DeepSeek-V4 forward needs from an HF config."""

    num_layers: int
    hidden: int
    num_heads: int
    head_dim: int
    rope_dim: int
    vocab: int
    rms_eps: float
    hc_mult: int
    hc_iters: int
    hc_eps: float
    ratios: tuple[int, ...]     # per layer: 0 sliding only, 4 CSA (with the indexer), more HCA
    hash_layers: int
    sliding_window: int
    rope_theta: float
    compress_theta: float
    index_heads: int
    index_dim: int
    index_topk: int
    num_experts: int
    experts_per_tok: int
    routed_scale: float
    swiglu_limit: float
    scoring: str
    notes: tuple[str, ...] = ()

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Deepseek4Config:
        heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["head_dim"])
        rope_dim = cfg.get("qk_rope_head_dim")
        if rope_dim is None:
            rope_dim = int(head_dim * float(cfg.get("partial_rotary_factor") or 64 / 512))
        rope = cfg.get("rope_parameters") or {}
        main, compress = rope.get("main") or {}, rope.get("compress") or {}
        scaling = cfg.get("rope_scaling") or {}
        kinds = {str(p.get("rope_type", p.get("type", "default"))) for p in (main, compress, scaling) if p}
        notes = ()
        if kinds - {"default"}:
            notes = (f"config asks rope {sorted(kinds - {'default'})} for the compressed layers; MaxText 0.2.5's "
                     "deepseek4 runs plain RoPE (theta 10000 / compress_rope_theta): its logits, and these, differ "
                     "from transformers' there",)
        if str(cfg.get("scoring_func", "sqrtsoftplus")) != "sqrtsoftplus":
            raise ValueError(f"scoring_func {cfg.get('scoring_func')!r}: MaxText's deepseek4 routes by sqrtsoftplus")
        return cls(
            num_layers=int(cfg["num_hidden_layers"]), hidden=int(cfg["hidden_size"]), num_heads=heads,
            head_dim=head_dim, rope_dim=int(rope_dim), vocab=int(cfg["vocab_size"]),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), hc_mult=int(cfg.get("hc_mult", 4)),
            hc_iters=int(cfg.get("hc_sinkhorn_iters", 20)), hc_eps=float(cfg.get("hc_eps", 1e-6)),
            ratios=tuple(family.compress_ratios(cfg)), hash_layers=family.hash_layers(cfg),
            sliding_window=int(cfg.get("sliding_window", 128)),
            rope_theta=float(main.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            compress_theta=float(compress.get("rope_theta", cfg.get("compress_rope_theta", 160000.0))),
            index_heads=int(cfg.get("index_n_heads", 64)), index_dim=int(cfg.get("index_head_dim", 128)),
            index_topk=int(cfg.get("index_topk", 512)), num_experts=int(cfg["n_routed_experts"]),
            experts_per_tok=int(cfg["num_experts_per_tok"]),
            routed_scale=float(cfg.get("routed_scaling_factor", 1.0)),
            swiglu_limit=float(cfg.get("swiglu_limit") or 0.0), scoring="sqrtsoftplus", notes=notes)


# ------------------------------------------------------------------------------------------- hyper-connections

@partial(jax.jit, static_argnames=("cfg",))
def hyper_connection(x: jax.Array, w: dict[str, jax.Array], cfg: Deepseek4Config
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(post (B,T,H), comb (B,T,H,H), collapsed input (B,T,E)) of one mhc module, all float32."""
    b, t, h, e = x.shape
    f = rms_norm(x.reshape(b, t, h * e), w["mhc_norm/scale"], cfg.rms_eps, jnp.float32)
    pre = jax.nn.sigmoid(f @ w["pre_alpha"] * w["pre_alpha_scale"][0] + w["pre_beta"]) + cfg.hc_eps
    post = 2 * jax.nn.sigmoid(f @ w["post_alpha"] * w["post_alpha_scale"][0] + w["post_beta"])
    comb = (f @ w["res_alpha"]).reshape(b, t, h, h) * w["res_alpha_scale"][0] + w["res_beta"]
    comb = jax.nn.softmax(comb, axis=-1) + cfg.hc_eps
    comb = comb / (comb.sum(-2, keepdims=True) + cfg.hc_eps)

    def sinkhorn(_, c: jax.Array) -> jax.Array:
        c = c / (c.sum(-1, keepdims=True) + cfg.hc_eps)
        return c / (c.sum(-2, keepdims=True) + cfg.hc_eps)

    comb = jax.lax.fori_loop(0, cfg.hc_iters - 1, sinkhorn, comb)
    return post, comb, jnp.einsum("bth,bthe->bte", pre, x)


@jax.jit
def mix_streams(x: jax.Array, out: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """`x'_k = post_k · out + Σ_j comb_jk x_j`."""
    return post[..., None] * out[:, :, None, :] + jnp.einsum("btjk,btje->btke", comb, x)


# ------------------------------------------------------------------------------------------------------ attention

def rope_trailing(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Interleaved RoPE on the last 2·cos.shape[-1] channels of x (B,T,H,D); the others pass ([nope | rope])."""
    r = 2 * cos.shape[-1]
    return jnp.concatenate([x[..., :-r], apply_rope(x[..., -r:], cos, sin, interleaved=True)], axis=-1)


def compress(h: jax.Array, w: dict[str, jax.Array], ratio: int, overlap: bool, eps: float, cos: jax.Array,
             sin: jax.Array) -> jax.Array:
    """One KV compressor over the closed windows of `ratio` tokens -> entries (B, W, d), roped at w·ratio."""
    b, t, _ = h.shape
    n = t // ratio
    kv = (h[:, : n * ratio] @ w["kv_proj/kernel"]).reshape(b, n, ratio, -1)
    gate = (h[:, : n * ratio] @ w["gate_proj/kernel"]).reshape(b, n, ratio, -1) + w["position_bias"]
    if overlap:        # 2d wide: the previous window's first half, then this window's second half
        d = kv.shape[-1] // 2
        prev_kv = jnp.concatenate([jnp.zeros_like(kv[:, :1, :, :d]), kv[:, :-1, :, :d]], axis=1)
        prev_gate = jnp.concatenate([jnp.full_like(gate[:, :1, :, :d], -jnp.inf), gate[:, :-1, :, :d]], axis=1)
        kv = jnp.concatenate([prev_kv, kv[..., d:]], axis=2)
        gate = jnp.concatenate([prev_gate, gate[..., d:]], axis=2)
    entries = (kv * jax.nn.softmax(gate, axis=2)).sum(axis=2)
    entries = rms_norm(entries, w["kv_norm/scale"], eps, jnp.float32)
    positions = np.arange(n) * ratio
    return rope_trailing(entries[:, :, None, :], cos[positions], sin[positions])[:, :, 0, :]


def index_keep(h: jax.Array, q_latent: jax.Array, w: dict[str, jax.Array], cfg: Deepseek4Config, ratio: int,
               cos: jax.Array, sin: jax.Array) -> jax.Array:
    """The lightning indexer's choice: (B, T, W) bool, the `index_topk` best causal entries of each query."""
    b, t, _ = h.shape
    keys = compress(h, w, ratio, True, cfg.rms_eps, cos, sin)                        # (B, W, Id)
    q = (q_latent @ w["q_proj/kernel"]).reshape(b, t, cfg.index_heads, cfg.index_dim)
    q = rope_trailing(q, cos[:t], sin[:t])
    scores = jax.nn.relu(jnp.einsum("bthd,bwd->bthw", q, keys)) * cfg.index_dim**-0.5
    weights = (h @ w["weights_proj/kernel"]) * cfg.index_heads**-0.5
    scores = jnp.einsum("bthw,bth->btw", scores, weights)
    causal = block_causal(t, keys.shape[1], ratio)
    scores = jnp.where(causal, scores, -jnp.inf)
    k = min(cfg.index_topk, keys.shape[1])
    _, top = jax.lax.top_k(scores, k)
    chosen = jax.nn.one_hot(top, keys.shape[1], dtype=jnp.bool_).any(axis=-2)
    return chosen & causal


def block_causal(t: int, entries: int, ratio: int) -> np.ndarray:
    """(T, W) keep: query t sees compressed entry w once its window is closed (w < (t + 1) // ratio)."""
    return np.arange(entries)[None, :] < ((np.arange(t) + 1) // ratio)[:, None]


@partial(jax.jit, static_argnames=("cfg", "ratio"))
def attention(h: jax.Array, w: dict[str, jax.Array], cfg: Deepseek4Config, ratio: int, cos: jax.Array,
              sin: jax.Array) -> jax.Array:
    """The compressed attention of one layer on its normalised input h (B,T,E); cos/sin of its RoPE theta."""
    b, t, _ = h.shape
    q_latent = rms_norm(h @ w["wq_a/kernel"], w["q_norm/scale"], cfg.rms_eps, jnp.float32)
    q = unscaled_rms_norm(jnp.einsum("btq,qnd->btnd", q_latent, w["wq_b/kernel"]), cfg.rms_eps, jnp.float32)
    q = rope_trailing(q, cos[:t], sin[:t])
    kv = rms_norm(jnp.einsum("bte,ekd->btkd", h, w["wkv/kernel"]), w["kv_norm/scale"], cfg.rms_eps, jnp.float32)
    kv = rope_trailing(kv, cos[:t], sin[:t])[:, :, 0, :]                           # (B, T, D)
    keep = jnp.broadcast_to(jnp.asarray(attention_mask(t, cfg.sliding_window)), (b, t, t))
    if ratio == 4:
        comp = {k.removeprefix("csa_compressor/"): v for k, v in w.items() if k.startswith("csa_compressor/")}
        index = {k.removeprefix("indexer/"): v for k, v in comp.items() if k.startswith("indexer/")}
        entries = compress(h, comp, ratio, True, cfg.rms_eps, cos, sin)
        keep = jnp.concatenate([keep, index_keep(h, q_latent, index, cfg, ratio, cos, sin)], axis=-1)
        kv = jnp.concatenate([kv, entries], axis=1)
    elif ratio:
        comp = {k.removeprefix("hca_compressor/"): v for k, v in w.items() if k.startswith("hca_compressor/")}
        entries = compress(h, comp, ratio, False, cfg.rms_eps, cos, sin)
        causal = jnp.broadcast_to(jnp.asarray(block_causal(t, entries.shape[1], ratio)), (b, t, entries.shape[1]))
        keep = jnp.concatenate([keep, causal], axis=-1)
        kv = jnp.concatenate([kv, entries], axis=1)
    scores = jnp.einsum("btnd,bsd->bnts", q, kv) * cfg.head_dim**-0.5
    scores = jnp.where(keep[:, None], scores, MASK_VALUE)
    sink = jnp.broadcast_to(w["sinks"][None, :, None, None], (*scores.shape[:-1], 1))
    probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
    out = jnp.einsum("bnts,bsd->btnd", probs, kv)
    out = rope_trailing(out, cos[:t], -sin[:t])                                    # the values' rotation undone
    groups, width, _ = w["o_a_proj/kernel"].shape
    grouped = jnp.einsum("btgw,gwo->btgo", out.reshape(b, t, groups, width), w["o_a_proj/kernel"])
    return grouped.reshape(b, t, -1) @ w["o_b_proj/kernel"]


# ------------------------------------------------------------------------------------------------------------ MoE

EXPERTS = ("wi_0", "wi_1", "wo")
_SHARED = "mlp/shared_experts/"


@partial(jax.jit, static_argnames=("cfg",))
def route(h: jax.Array, gate: jax.Array, bias: jax.Array | None, hash_ids: jax.Array | None, cfg: Deepseek4Config
          ) -> tuple[jax.Array, jax.Array]:
    """(weights, ids) (BT,k) in float32: `s = sqrt(softplus(h·gate))`; ids `hash_ids` (a hash layer's
    `tid2eid[token]`) or else the top-k of `s + bias` (ties to the lower index); weights `s_k / (Σ s_k + 1e-20) ·
    routed_scaling_factor`."""
    scores = jnp.sqrt(jax.nn.softplus(h @ gate))
    ids = hash_ids if hash_ids is not None else jax.lax.top_k(scores + bias, cfg.experts_per_tok)[1]
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    return weights / (weights.sum(-1, keepdims=True) + 1e-20) * cfg.routed_scale, ids


@partial(jax.jit, static_argnames=("limit",))
def _shared_expert(routed: jax.Array, h: jax.Array, w: dict[str, jax.Array], *, limit: float) -> jax.Array:
    return routed + swiglu(h, *(w[f"{_SHARED}{n}/kernel"] for n in EXPERTS), limit=limit)


def moe(h: jax.Array, layer: dict[str, np.ndarray], w: dict[str, jax.Array], tokens: np.ndarray,
        cfg: Deepseek4Config, hashed: bool) -> jax.Array:
    """The MoE block on its normalised input h (B,T,E), float32: routed experts streamed by the shared block
    (`routed_experts`: only the hit experts, read from `layer` a group at a time), then the shared expert (`w`: the
    layer's other leaves, on the device)."""
    b, t, e = h.shape
    flat = h.reshape(-1, e)
    if hashed:   # tid2eid is float32 in MaxText (exact below 2^24)
        hash_ids, bias = jnp.asarray(np.asarray(layer[MOE + "tid2eid"])[tokens.reshape(-1)].astype(np.int32)), None
    else:
        hash_ids, bias = None, w[MOE + "gate/bias"]
    weights, ids = route(flat, w[MOE + "gate/kernel"], bias, hash_ids, cfg)
    experts = {n: layer[MOE + n] for n in EXPERTS}
    routed = routed_experts(jnp.zeros_like(flat), flat, np.asarray(ids), np.asarray(weights), experts, "float32",
                            GatedExpert(limit=cfg.swiglu_limit or None))
    return _shared_expert(routed, flat, w, limit=cfg.swiglu_limit or None).reshape(b, t, e)


# -------------------------------------------------------------------------------------------------------- forward

@partial(jax.jit, static_argnames=("eps",))
def _norm(x: jax.Array, scale: jax.Array, *, eps: float) -> jax.Array:
    return rms_norm(x, scale, eps, jnp.float32)


def rope_cos_sin(cfg: Deepseek4Config, length: int) -> dict:
    return {kind: rope_tables(rope_inv_freq(cfg.rope_dim, theta), length)
            for kind, theta in (("main", cfg.rope_theta), ("compress", cfg.compress_theta))}


def deepseek4_logits(params: ParamSource, cfg: Deepseek4Config, tokens: np.ndarray, dtype: str = "float32"
                     ) -> tuple[np.ndarray, list[str]]:
    """tokens int (B,T) -> (logits float32 (B,T,V), notes), with MaxText's deepseek4 math in float32, one layer
    read at a time (its routed experts a group at a time: `routed_experts`)."""
    tokens = np.asarray(tokens)
    x = embed_tokens(params, cfg, tokens, "float32")
    x = jnp.broadcast_to(x[:, :, None, :], (*x.shape[:2], cfg.hc_mult, x.shape[-1]))
    tables = rope_cos_sin(cfg, tokens.shape[1])
    for i in range(cfg.num_layers):
        layer = params.layer(i)
        dense = to_device(layer, skip=tuple(MOE + n for n in (*EXPERTS, "tid2eid")))   # experts: streamed
        w = {k: v.astype(jnp.float32) for k, v in dense.items()}
        post, comb, h = hyper_connection(x, {k.removeprefix("mhc_attention/"): v for k, v in w.items()}, cfg)
        attn = attention(_norm(h, w[_PRE_NORM], eps=cfg.rms_eps),
                         {k.removeprefix(A): v for k, v in w.items() if k.startswith(A)}, cfg, cfg.ratios[i],
                         *tables["compress" if cfg.ratios[i] else "main"])
        x = mix_streams(x, attn, post, comb)
        post, comb, h = hyper_connection(x, {k.removeprefix("mhc_mlp/"): v for k, v in w.items()}, cfg)
        y = moe(_norm(h, w[_POST_NORM], eps=cfg.rms_eps), layer, w, tokens, cfg, i < cfg.hash_layers)
        x = mix_streams(x, y, post, comb).block_until_ready()
        release(dense)
        del layer, w
    head = {k: jnp.asarray(params.top(f"decoder/hc_head/{k}"), jnp.float32) for k in ("hc_fn", "hc_scale", "hc_base")}
    logits = _head(x, head, jnp.asarray(params.top(FINAL_NORM)), jnp.asarray(params.top(LM_HEAD)), cfg=cfg)
    return np.asarray(logits, np.float32)[..., : cfg.vocab], list(cfg.notes)


@partial(jax.jit, static_argnames=("cfg",))
def _head(x: jax.Array, head: dict[str, jax.Array], norm: jax.Array, kernel: jax.Array, *, cfg: Deepseek4Config
          ) -> jax.Array:
    """The streams collapsed by `hc_head` (`σ(RMSNorm(x)·hc_fn·hc_scale + hc_base) + ε`), the final norm, the head."""
    b, t, hc, e = x.shape
    f = rms_norm(x.reshape(b, t, hc * e), jnp.ones((hc * e,), jnp.float32), cfg.rms_eps, jnp.float32)
    pre = jax.nn.sigmoid(f @ head["hc_fn"] * head["hc_scale"][0] + head["hc_base"]) + cfg.hc_eps
    h = rms_norm(jnp.einsum("bth,bthe->bte", pre, x), norm, cfg.rms_eps, jnp.float32)
    return h @ kernel.astype(jnp.float32)
