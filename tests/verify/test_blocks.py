"""verify/blocks.py's options that no family forward exercises yet, each against transformers' own module:
the Gemma `+1` RMSNorm, partial rotary RoPE, attention with logit soft-cap and a sliding window (Gemma 2), q/k
RMSNorm over the whole projection (OLMo 3), q/k/v biases (Qwen2), and the final-logit soft-cap; and, in isolation,
the pieces only the Llama 4 and Qwen3-Next forwards use: the chunked mask, the L2 and weightless RMS norms, top-k
sigmoid routing with experts fed the weighted input; the clamped SwiGLU (DeepSeek-V4's `swiglu_limit`, which its
tiny models' activations never reach). Each case also checks that the option changes the result, so a
block that ignored it would fail."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Gemma2Config, Llama4TextConfig, Olmo3Config, Qwen2Config
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, Gemma2RotaryEmbedding
from transformers.models.llama4.modeling_llama4 import Llama4TextL2Norm, Llama4TextMoe
from transformers.models.olmo3.modeling_olmo3 import Olmo3Attention, Olmo3RotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding
from transformers.models.qwen3_next.modeling_qwen3_next import l2norm as qwen3_next_l2norm

from ckpt_cli.verify.blocks import (
    apply_rope,
    attention_mask,
    final_logits,
    l2_norm,
    rms_norm,
    rope_inv_freq,
    rope_tables,
    route_topk_sigmoid,
    routed_experts,
    self_attention,
    swiglu,
    unscaled_rms_norm,
)

E, N, K, D, T, WINDOW = 32, 4, 2, 8, 12, 5
DIMS = dict(hidden_size=E, num_attention_heads=N, num_key_value_heads=K, head_dim=D, rope_theta=10000.0,
            max_position_embeddings=64, attn_implementation="eager")


def _randomize(module: torch.nn.Module, seed: int, spread: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + spread * torch.randn(p.shape, generator=g))


def _attention_tree(module: torch.nn.Module) -> dict[str, jnp.ndarray]:
    """The MaxText Attention subtree (kernels (E,H,D), (H,D,E); biases (H,D); norm scales) of an HF attention."""
    tree = {}
    for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        layer = getattr(module, proj)
        w = layer.weight.detach().numpy()
        tree[f"{name}/kernel"] = w.T.reshape(E, -1, D)
        if layer.bias is not None:
            tree[f"{name}/bias"] = layer.bias.detach().numpy().reshape(-1, D)
    tree["out/kernel"] = module.o_proj.weight.detach().numpy().T.reshape(-1, D, E)
    for name in ("q_norm", "k_norm"):
        if hasattr(module, name):
            tree[f"{'query' if name == 'q_norm' else 'key'}_norm/scale"] = getattr(module, name).weight.detach().numpy()
    return {k: jnp.asarray(v) for k, v in tree.items()}


def _hf_attention(module: torch.nn.Module, rotary: torch.nn.Module, x: np.ndarray, window: int | None,
                  **rope_kw) -> np.ndarray:
    pos = torch.arange(T)[None]
    q, kv = torch.arange(T)[:, None], torch.arange(T)[None, :]
    keep = (kv <= q) & ((q - kv < window) if window else True)
    additive = torch.where(keep, 0.0, float("-inf"))[None, None]
    hidden = torch.from_numpy(x)
    with torch.no_grad():
        out, _ = module(hidden_states=hidden, position_embeddings=rotary(hidden, pos, **rope_kw),
                        attention_mask=additive)
    return out.numpy()


def _ours(module: torch.nn.Module, x: np.ndarray, window: int | None, theta: float = DIMS["rope_theta"],
          **options) -> np.ndarray:
    cos, sin = rope_tables(rope_inv_freq(D, theta), T)
    mask = jnp.asarray(attention_mask(T, window))
    return np.asarray(self_attention(jnp.asarray(x), _attention_tree(module), cos, sin, mask, eps=1e-6,
                                    dtype=jnp.float32, **options))


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, T, E)).astype(np.float32)


def test_soft_capped_sliding_window_attention_matches_gemma2() -> None:
    cfg = Gemma2Config(**DIMS, query_pre_attn_scalar=16, attn_logit_softcapping=2.0, sliding_window=WINDOW,
                       layer_types=["sliding_attention"], num_hidden_layers=1)
    module = Gemma2Attention(cfg, layer_idx=0).eval()
    _randomize(module, seed=1, spread=0.6)
    x = _x(1)
    ref = _hf_attention(module, Gemma2RotaryEmbedding(cfg), x, WINDOW)
    got = _ours(module, x, WINDOW, query_scale=16**-0.5, soft_cap=2.0)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)
    uncapped = _ours(module, x, WINDOW, query_scale=16**-0.5)
    assert np.abs(uncapped - ref).max() > 1e-2
    unwindowed = _ours(module, x, None, query_scale=16**-0.5, soft_cap=2.0)
    assert np.abs(unwindowed - ref).max() > 1e-2


def test_qk_norm_over_the_whole_projection_matches_olmo3() -> None:
    cfg = Olmo3Config(**DIMS, num_hidden_layers=1, sliding_window=WINDOW, layer_types=["sliding_attention"])
    module = Olmo3Attention(cfg, layer_idx=0).eval()
    _randomize(module, seed=2, spread=0.3)
    x = _x(2)
    ref = _hf_attention(module, Olmo3RotaryEmbedding(cfg), x, WINDOW, layer_type="sliding_attention")
    theta = cfg.rope_parameters["sliding_attention"]["rope_theta"]     # transformers' own for local layers
    got = _ours(module, x, WINDOW, theta, query_scale=D**-0.5)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)
    per_head = dict(_attention_tree(module))
    per_head["query_norm/scale"] = per_head["query_norm/scale"][:D]    # a per-head norm is not the same math
    per_head["key_norm/scale"] = per_head["key_norm/scale"][:D]
    cos, sin = rope_tables(rope_inv_freq(D, theta), T)
    wrong = self_attention(jnp.asarray(x), per_head, cos, sin, jnp.asarray(attention_mask(T, WINDOW)), eps=1e-6,
                          dtype=jnp.float32, query_scale=D**-0.5)
    assert np.abs(np.asarray(wrong) - ref).max() > 1e-3


def test_qkv_biases_match_qwen2() -> None:
    cfg = Qwen2Config(**DIMS, num_hidden_layers=1)
    module = Qwen2Attention(cfg, layer_idx=0).eval()
    _randomize(module, seed=3, spread=0.3)
    assert module.q_proj.bias is not None and module.o_proj.bias is None
    x = _x(3)
    ref = _hf_attention(module, Qwen2RotaryEmbedding(cfg), x, None)
    np.testing.assert_allclose(_ours(module, x, None, query_scale=D**-0.5), ref, rtol=0, atol=2e-5)
    unbiased = {k: v for k, v in _attention_tree(module).items() if not k.endswith("/bias")}
    cos, sin = rope_tables(rope_inv_freq(D, DIMS["rope_theta"]), T)
    wrong = self_attention(jnp.asarray(x), unbiased, cos, sin, jnp.asarray(attention_mask(T)), eps=1e-6,
                          dtype=jnp.float32, query_scale=D**-0.5)
    assert np.abs(np.asarray(wrong) - ref).max() > 1e-3


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_rotates_only_the_leading_dims(interleaved: bool) -> None:
    rotary, length = 4, 6
    x = np.random.default_rng(4).normal(size=(1, length, 2, 10)).astype(np.float32)
    cos, sin = rope_tables(rope_inv_freq(rotary, 100.0), length)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin, interleaved))
    np.testing.assert_array_equal(got[..., rotary:], x[..., rotary:])
    if interleaved:   # pairs (2i, 2i+1) are halves after a de-interleave of the rotary dims
        order = np.concatenate([np.arange(0, rotary, 2), np.arange(1, rotary, 2)])
        x = np.concatenate([x[..., order], x[..., rotary:]], axis=-1)
        got = np.concatenate([got[..., order], got[..., rotary:]], axis=-1)
    c, s = (torch.from_numpy(np.concatenate([np.asarray(a)] * 2, axis=-1))[None] for a in (cos, sin))
    ref, _ = apply_rotary_pos_emb(torch.from_numpy(x).transpose(1, 2), torch.from_numpy(x).transpose(1, 2), c, s)
    np.testing.assert_allclose(got, ref.transpose(1, 2).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_offset_is_gemmas_one_plus_w(dtype: str) -> None:
    x = np.random.default_rng(5).normal(size=(3, 16)).astype(np.float32)
    w = np.random.default_rng(6).normal(size=16).astype(np.float32) * 0.5
    norm = GemmaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w))
        ref = norm(torch.from_numpy(x).to(getattr(torch, dtype))).float().numpy()
    got = rms_norm(jnp.asarray(x).astype(dtype), jnp.asarray(w), 1e-6, jnp.dtype(dtype), offset=1.0)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), ref, rtol=0, atol=1e-6 if dtype == "float32" else 0)
    plain = rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6, jnp.float32)
    assert np.abs(np.asarray(plain) - ref).max() > 0.1


def test_final_logits_soft_cap_and_normalization() -> None:
    rng = np.random.default_rng(7)
    x, scale, table = (rng.normal(size=s).astype(np.float32) for s in ((1, 3, 8), (8,), (10, 8)))
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale
    raw = h @ table.T / np.sqrt(8)
    got = final_logits(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(table), eps=1e-6, transposed=True,
                       dtype="float32", normalize=True, soft_cap=1.5)
    np.testing.assert_allclose(np.asarray(got), 1.5 * np.tanh(raw / 1.5), rtol=0, atol=1e-5)
    assert np.abs(raw).max() > 2 and np.asarray(got).max() < 1.5


def test_chunked_mask_keeps_the_causal_part_of_the_query_chunk() -> None:
    length, chunk = 12, 5
    q, kv = np.arange(length)[:, None], np.arange(length)[None, :]
    expected = (kv <= q) & (q // chunk == kv // chunk)
    np.testing.assert_array_equal(attention_mask(length, chunk=chunk), expected)
    assert attention_mask(length, chunk=chunk)[4, 0] and not attention_mask(length, chunk=chunk)[5, 4]
    np.testing.assert_array_equal(attention_mask(length, window=3, chunk=chunk), expected & (q - kv < 3))
    np.testing.assert_array_equal(attention_mask(length, chunk=length), attention_mask(length))


def test_l2_norm_and_weightless_rms_norm_match_transformers() -> None:
    x = np.random.default_rng(7).normal(size=(2, 3, 4, 16)).astype(np.float32)
    ref_l2 = qwen3_next_l2norm(torch.from_numpy(x), eps=1e-6).numpy()
    np.testing.assert_allclose(np.asarray(l2_norm(jnp.asarray(x))), ref_l2, rtol=0, atol=1e-6)
    with torch.no_grad():
        ref_rms = Llama4TextL2Norm(eps=1e-5)(torch.from_numpy(x)).numpy()
    got = unscaled_rms_norm(jnp.asarray(x), 1e-5, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), ref_rms, rtol=0, atol=1e-6)
    assert np.abs(ref_rms - ref_l2).max() > 0.5   # sum vs mean of squares: not the same norm


@pytest.mark.parametrize("top_k", [1, 2])
def test_sigmoid_routed_experts_fed_the_weighted_input_match_llama4_moe(top_k: int) -> None:
    m, x = 24, 4
    cfg = Llama4TextConfig(hidden_size=E, intermediate_size=m, num_local_experts=x, num_experts_per_tok=top_k)
    moe = Llama4TextMoe(cfg).eval()
    _randomize(moe, seed=8, spread=0.3)
    h = np.random.default_rng(9).normal(size=(T, E)).astype(np.float32)
    with torch.no_grad():
        ref, _ = moe(torch.from_numpy(h))
    gate_up, down = moe.experts.gate_up_proj.detach().numpy(), moe.experts.down_proj.detach().numpy()
    experts = {"wi_0": gate_up[..., :m], "wi_1": gate_up[..., m:], "wo": down}
    shared = [jnp.asarray(getattr(moe.shared_expert, n).weight.detach().numpy().T)
              for n in ("gate_proj", "up_proj", "down_proj")]
    hj = jnp.asarray(h)
    weights, ids = route_topk_sigmoid(hj @ jnp.asarray(moe.router.weight.detach().numpy().T), top_k)

    def ours(scale_input: bool) -> np.ndarray:
        return np.asarray(routed_experts(swiglu(hj, *shared), hj, np.asarray(ids), np.asarray(weights), experts,
                                         "float32", scale_input=scale_input))

    np.testing.assert_allclose(ours(True), ref.numpy(), rtol=0, atol=2e-5)
    assert np.abs(ours(False) - ref.numpy()).max() > 1e-3


def test_clamped_swiglu_matches_deepseek_v4_mlp() -> None:
    """`gated_mlp(limit=...)` / `GatedExpert(limit=...)` (DeepSeek-V4's `swiglu_limit`) equal transformers'
    DeepseekV4MLP where the clamp binds (inputs large enough that gate and up exceed the limit); without the limit
    the result differs."""
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4MLP

    from ckpt_cli.verify.blocks import GatedExpert, gated_mlp

    torch.manual_seed(0)
    cfg = DeepseekV4Config(hidden_size=16, moe_intermediate_size=8, swiglu_limit=1.5)
    mlp = DeepseekV4MLP(cfg).float().eval()
    x = 3 * torch.randn(5, 16)
    with torch.no_grad():
        want = mlp(x).numpy()
    wi0, wi1, wo = (jnp.asarray(m.weight.detach().numpy().T) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    h = jnp.asarray(x.numpy())
    got = np.asarray(gated_mlp(h, wi0, wi1, wo, "silu", cfg.swiglu_limit))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    expert = np.asarray(GatedExpert(limit=cfg.swiglu_limit)(h, {"wi_0": wi0, "wi_1": wi1, "wo": wo}))
    np.testing.assert_array_equal(expert, got)
    assert np.abs(np.asarray(gated_mlp(h, wi0, wi1, wo)) - want).max() > 1e-2
