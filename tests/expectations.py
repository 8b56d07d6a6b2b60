"""Independent expectations of the MaxText tree, written from maxtext-layout.md with explicit index math.

Deliberately NOT using ckpt_cli's transforms: if the converter's transform is wrong, these differ.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np


def _f32(x):
    return np.asarray(x, dtype=np.float32)


GEMMA3_NORMS = {  # §9.3: MaxText leaf <- HF name in the layer, every one stored as f32(w) + 1
    "pre_self_attention_norm/scale": "input_layernorm.weight",
    "post_self_attention_norm/scale": "post_attention_layernorm.weight",
    "pre_ffw_norm/scale": "pre_feedforward_layernorm.weight",
    "post_ffw_norm/scale": "post_feedforward_layernorm.weight",
    "self_attention/query_norm/scale": "self_attn.q_norm.weight",
    "self_attention/key_norm/scale": "self_attn.k_norm.weight",
}


def gemma3_embedding_factor(width: int) -> np.float32:
    """§9.3: s = bf16(sqrt(E)) (4b: 50.5, 12b: 62.0, 27b: 73.5)."""
    return np.float32(ml_dtypes.bfloat16(math.sqrt(width)))


def stored_dtype(path: str, family: str, dtype: str) -> str:
    """The dtype a leaf is stored in: §3.4, Gemma3's norm scales (after +1) are float32 whatever --dtype."""
    return "f32" if family == "gemma3" and path.endswith("norm/scale") else dtype


def expected_layer(hf: dict, cfg: dict, family: str, i: int) -> dict[str, np.ndarray]:
    """Per-layer MaxText leaves for HF layer i, as float32 (before the output cast)."""
    if family == "gpt_oss":
        return expected_gpt_oss_layer(hf, cfg, i)
    E, N, K = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or E // N
    p = f"model.layers.{i}."
    q = _f32(hf[p + "self_attn.q_proj.weight"])          # (N*D, E)
    k = _f32(hf[p + "self_attn.k_proj.weight"])          # (K*D, E)
    v = _f32(hf[p + "self_attn.v_proj.weight"])
    o = _f32(hf[p + "self_attn.o_proj.weight"])          # (E, N*D)
    # q_mt[e, h, d] = q_hf[h*D + d, e]
    q_mt = np.einsum("hde->ehd", q.reshape(N, D, E))
    k_mt = np.einsum("hde->ehd", k.reshape(K, D, E))
    v_mt = np.einsum("hde->ehd", v.reshape(K, D, E))
    # out_mt[h, d, e] = o_hf[e, h*D + d]
    o_mt = np.einsum("ehd->hde", o.reshape(E, N, D))
    if family == "gemma3":
        # §9.3: no query scaling, no RoPE permutation; norms + 1 in float32; GeGLU kernels transposed
        out = {leaf: _f32(hf[p + name]) + np.float32(1.0) for leaf, name in GEMMA3_NORMS.items()}
        out |= {"self_attention/query/kernel": q_mt, "self_attention/key/kernel": k_mt,
                "self_attention/value/kernel": v_mt, "self_attention/out/kernel": o_mt,
                "mlp/wi_0/kernel": _f32(hf[p + "mlp.gate_proj.weight"]).T,
                "mlp/wi_1/kernel": _f32(hf[p + "mlp.up_proj.weight"]).T,
                "mlp/wo/kernel": _f32(hf[p + "mlp.down_proj.weight"]).T}
        return out
    out = {
        "pre_self_attention_layer_norm/scale": _f32(hf[p + "input_layernorm.weight"]),
        "post_self_attention_layer_norm/scale": _f32(hf[p + "post_attention_layernorm.weight"]),
        "self_attention/value/kernel": v_mt, "self_attention/out/kernel": o_mt,
    }
    if family == "qwen3_moe":
        # §8.2: router (X,E) -> (E,X); expert x's gate/up (M,E) -> (E,M) and down (E,M) -> (M,E), stacked on axis 0
        X = cfg.get("num_experts") or cfg["num_local_experts"]
        out["moe_block/gate/kernel"] = _f32(hf[p + "mlp.gate.weight"]).T
        for leaf, name in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
            out[f"moe_block/{leaf}"] = np.stack([_f32(hf[p + f"mlp.experts.{x}.{name}.weight"]).T for x in range(X)])
    elif family == "mixtral":
        # §11.2: router block_sparse_moe.gate (X,E) -> MoeBlock_0/gate/kernel (E,X); expert x's w1 (gate) and w3
        # (up) (M,E) -> wi_0[x], wi_1[x] (E,M); w2 (E,M) -> wo[x] (M,E); experts stacked on axis 0
        X, moe = cfg["num_local_experts"], p + "block_sparse_moe."
        out["MoeBlock_0/gate/kernel"] = _f32(hf[moe + "gate.weight"]).T
        for leaf, name in (("wi_0", "w1"), ("wi_1", "w3"), ("wo", "w2")):
            out[f"MoeBlock_0/{leaf}"] = np.stack([_f32(hf[moe + f"experts.{x}.{name}.weight"]).T for x in range(X)])
    else:
        out["mlp/wi_0/kernel"] = _f32(hf[p + "mlp.gate_proj.weight"]).T
        out["mlp/wi_1/kernel"] = _f32(hf[p + "mlp.up_proj.weight"]).T
        out["mlp/wo/kernel"] = _f32(hf[p + "mlp.down_proj.weight"]).T
    if family == "llama":
        # new[..., 2j] = old[..., j]; new[..., 2j+1] = old[..., D/2 + j]
        perm = np.array([j // 2 if j % 2 == 0 else D // 2 + j // 2 for j in range(D)])
        out["self_attention/query/kernel"] = q_mt[..., perm] * np.float32(1 / math.sqrt(D))
        out["self_attention/key/kernel"] = k_mt[..., perm]
    elif family in ("mixtral", "llama2", "mistral"):
        # §11.2 (and MaxText's llama_or_mistral_ckpt.py for HF Llama 2/3/3.3 and Mistral): rotate-half RoPE on both
        # sides (no permutation); q_mt[e, h, d] = q_hf[h*D + d, e] / sqrt(D)
        out["self_attention/query/kernel"] = q_mt * np.float32(1 / math.sqrt(D))
        out["self_attention/key/kernel"] = k_mt
    elif family == "qwen2":
        # Qwen2.5 (QWEN_MAXTEXT_TO_HF hooks): no scale, no permutation, no q/k norm; bias_mt[h, d] = bias_hf[h*D + d]
        out["self_attention/query/kernel"] = q_mt
        out["self_attention/key/kernel"] = k_mt
        for leaf, name, heads in (("query", "q_proj", N), ("key", "k_proj", K), ("value", "v_proj", K)):
            bias = _f32(hf[p + f"self_attn.{name}.bias"])
            out[f"self_attention/{leaf}/bias"] = np.array([[bias[h * D + d] for d in range(D)] for h in range(heads)],
                                                          dtype=np.float32)
    else:
        out["self_attention/query/kernel"] = q_mt
        out["self_attention/key/kernel"] = k_mt
        out["self_attention/query_norm/scale"] = _f32(hf[p + "self_attn.q_norm.weight"])
        out["self_attention/key_norm/scale"] = _f32(hf[p + "self_attn.k_norm.weight"])
    return out


def expected_gpt_oss_layer(hf: dict, cfg: dict, i: int) -> dict[str, np.ndarray]:
    """§10.3, element by element: q_mt[e, h, d] = q_hf[h*D + d, e]; bias_mt[h, d] = bias_hf[h*D + d];
    wi_0[x, e, m] = gate_up[x, e, 2m], wi_1[x, e, m] = gate_up[x, e, 2m + 1] (no transpose), same for the
    biases; router kernel[e, x] = router[x, e]; down_proj, its bias, sinks, router bias and o bias copied."""
    E, N, K, D = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    X, M = cfg["num_local_experts"], cfg["intermediate_size"]
    p = f"model.layers.{i}."
    out = {"pre_self_attention_layer_norm/scale": _f32(hf[p + "input_layernorm.weight"]),
           "post_self_attention_layer_norm/scale": _f32(hf[p + "post_attention_layernorm.weight"])}
    for leaf, name, heads in (("query", "q_proj", N), ("key", "k_proj", K), ("value", "v_proj", K)):
        w, bias = _f32(hf[p + f"self_attn.{name}.weight"]), _f32(hf[p + f"self_attn.{name}.bias"])
        kernel = np.empty((E, heads, D), np.float32)
        bias_mt = np.empty((heads, D), np.float32)
        for h in range(heads):
            for d in range(D):
                kernel[:, h, d] = w[h * D + d, :]
                bias_mt[h, d] = bias[h * D + d]
        out[f"GptOssAttention/{leaf}/kernel"], out[f"GptOssAttention/{leaf}/bias"] = kernel, bias_mt
    o = _f32(hf[p + "self_attn.o_proj.weight"])
    out["GptOssAttention/out/kernel"] = np.stack([np.stack([o[:, h * D + d] for d in range(D)]) for h in range(N)])
    out["GptOssAttention/out/bias"] = _f32(hf[p + "self_attn.o_proj.bias"])
    out["GptOssAttention/sinks"] = _f32(hf[p + "self_attn.sinks"])
    out["GptOssMlp/gate/kernel"] = np.ascontiguousarray(_f32(hf[p + "mlp.router.weight"]).T)
    out["GptOssMlp/gate/bias"] = _f32(hf[p + "mlp.router.bias"])
    gate_up, gate_up_bias = _f32(hf[p + "mlp.experts.gate_up_proj"]), _f32(hf[p + "mlp.experts.gate_up_proj_bias"])
    assert gate_up.shape == (X, E, 2 * M) and gate_up_bias.shape == (X, 2 * M)
    for leaf, parity in (("wi_0", 0), ("wi_1", 1)):
        kernel = np.empty((X, E, M), np.float32)
        bias_mt = np.empty((X, M), np.float32)
        for m in range(M):
            kernel[:, :, m] = gate_up[:, :, 2 * m + parity]
            bias_mt[:, m] = gate_up_bias[:, 2 * m + parity]
        out[f"GptOssMlp/{leaf}"], out[f"GptOssMlp/{leaf}_bias"] = kernel, bias_mt
    out["GptOssMlp/wo"] = _f32(hf[p + "mlp.experts.down_proj"])
    out["GptOssMlp/wo_bias"] = _f32(hf[p + "mlp.experts.down_proj_bias"])
    return out


def expected_tree(hf: dict, cfg: dict, family: str, scan: bool) -> dict[str, np.ndarray]:
    """Every MaxText leaf path (under params/params, '/'-joined) -> expected float32 array.

    Scanned: the layer axis is inserted at index 1 of every per-layer leaf (experts keep axis 0).
    """
    if family == "gemma3":
        return _gemma3_tree(hf, cfg, scan)
    tree = {"token_embedder/embedding": _f32(hf["model.embed_tokens.weight"]),
            "decoder/decoder_norm/scale": _f32(hf["model.norm.weight"])}
    if not cfg.get("tie_word_embeddings"):
        tree["decoder/logits_dense/kernel"] = _f32(hf["lm_head.weight"]).T
    layers = [expected_layer(hf, cfg, family, i) for i in range(cfg["num_hidden_layers"])]
    for leaf in layers[0]:
        if scan and family == "gpt_oss":
            # §1.3: blocks of 2 layers, decoder/layers/layers_<b>, scan index s holds HF layer 2s + b
            for b in range(2):
                tree[f"decoder/layers/layers_{b}/{leaf}"] = np.stack([lay[leaf] for lay in layers[b::2]], axis=1)
        elif scan:
            tree[f"decoder/layers/{leaf}"] = np.stack([lay[leaf] for lay in layers], axis=1)
        else:
            for i, lay in enumerate(layers):
                tree[f"decoder/layers_{i}/{leaf}"] = lay[leaf]
    return tree


def _gemma3_tree(hf: dict, cfg: dict, scan: bool) -> dict[str, np.ndarray]:
    """§9.2/§9.3: embedding x bf16(sqrt(E)) (f32 product), final norm + 1, tied (no logits_dense).

    Unscanned `decoder/layers_<i>`; scanned `decoder/layers/layers_<b>` stacks HF layers 6s + b on axis 1 and
    `decoder/layers_remainder/layers_<r>` holds HF layer 6*floor(L/6) + r unstacked.
    """
    E, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    tree = {"token_embedder/embedding": _f32(hf["model.embed_tokens.weight"]) * gemma3_embedding_factor(E),
            "decoder/decoder_norm/scale": _f32(hf["model.norm.weight"]) + np.float32(1.0)}
    layers = [expected_layer(hf, cfg, "gemma3", i) for i in range(L)]
    for leaf in layers[0]:
        if not scan:
            for i, lay in enumerate(layers):
                tree[f"decoder/layers_{i}/{leaf}"] = lay[leaf]
            continue
        reps = L // 6
        for b in range(6 if reps else 0):
            tree[f"decoder/layers/layers_{b}/{leaf}"] = np.stack([layers[6 * s + b][leaf] for s in range(reps)], axis=1)
        for r in range(L - 6 * reps):
            tree[f"decoder/layers_remainder/layers_{r}/{leaf}"] = layers[6 * reps + r][leaf]
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def cast(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.astype(ml_dtypes.bfloat16 if dtype == "bf16" else np.float32)


def assert_bits_equal(got: np.ndarray, want: np.ndarray, msg: str = "") -> None:
    """Bit-for-bit equality (NaN-safe, -0.0 distinct), with a readable failure."""
    assert got.dtype == want.dtype and got.shape == want.shape, (
        f"{msg}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}")
    g = np.ascontiguousarray(got).view(np.uint8)
    w = np.ascontiguousarray(want).view(np.uint8)
    if not np.array_equal(g, w):
        bad = np.argwhere(np.ascontiguousarray(got).astype(np.float32) != np.ascontiguousarray(want).astype(np.float32))
        raise AssertionError(f"{msg}: {len(bad)} elements differ, first at {tuple(bad[0]) if len(bad) else '?'}")
