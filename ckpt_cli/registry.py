"""MaxText model names: family, default Hugging Face repo and reference hyperparameters.

Reference values follow maxtext-layout.md (§2, §5.1, §6.1, §7.1, §8.1, §9.1, §10.1, §11.1). `reference_config`
turns an entry into an HF-style config.json dict, so `plan`/`inspect` can price and show real models without
any data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ckpt_cli.errors import ConfigMismatchError, UnknownModelError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    repo_id: str
    config: dict = field(hash=False)
    dtype: str | None = None        # "fp8": MaxText's tree for the name keeps fp8 weights (the default --dtype)


def _qwen3(name: str, repo: str, e: int, n: int, f: int, layers: int, tied: bool, theta: float = 1e6) -> ModelSpec:
    return ModelSpec(name, "qwen3", repo, {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": e, "num_attention_heads": n,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": f, "num_hidden_layers": layers,
        "vocab_size": 151936, "tie_word_embeddings": tied, "rms_norm_eps": 1e-6, "rope_theta": theta,
        "hidden_act": "silu", "attention_bias": False, "max_position_embeddings": 40960, "torch_dtype": "bfloat16",
    })


def _qwen3_moe(name: str, repo: str, e: int, n: int, k: int, m: int, layers: int, experts: int, theta: float,
               intermediate: int, max_positions: int) -> ModelSpec:
    return ModelSpec(name, "qwen3_moe", repo, {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": e,
        "num_attention_heads": n, "num_key_value_heads": k, "head_dim": 128, "intermediate_size": intermediate,
        "moe_intermediate_size": m, "num_experts": experts, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": layers, "vocab_size": 151936,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": theta, "rope_scaling": None,
        "hidden_act": "silu", "attention_bias": False, "use_sliding_window": False,
        "max_position_embeddings": max_positions, "torch_dtype": "bfloat16",
    })


def _qwen3_next(name: str, repo: str) -> ModelSpec:
    """Qwen/Qwen3-Next-80B-A3B-Instruct's config.json (MaxText's configs/models/qwen3-next-80b-a3b.yml)."""
    return ModelSpec(name, "qwen3_next", repo, {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "hidden_size": 2048,
        "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "intermediate_size": 5120,
        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts": 512,
        "num_experts_per_tok": 10, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "num_hidden_layers": 48, "full_attention_interval": 4, "linear_num_key_heads": 16,
        "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4, "partial_rotary_factor": 0.25, "vocab_size": 151936,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 1e7, "rope_scaling": None,
        "hidden_act": "silu", "attention_bias": False, "max_position_embeddings": 262144,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    })


def _qwen3_5(name: str, repo: str, e: int, n: int, layers: int, value_heads: int, experts: int, top_k: int,
             m: int) -> ModelSpec:
    """The language model of a Qwen3.5 MoE release (its config.json's text_config, as MaxText's
    configs/models/NAME.yml and checkpoint_conversion/utils/hf_model_configs.py give it); the repos are multimodal."""
    return ModelSpec(name, "qwen3_5", repo, {
        "architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text", "hidden_size": e,
        "num_attention_heads": n, "num_key_value_heads": 2, "head_dim": 256, "moe_intermediate_size": m,
        "shared_expert_intermediate_size": m, "num_experts": experts, "num_experts_per_tok": top_k,
        "mlp_only_layers": [], "num_hidden_layers": layers, "full_attention_interval": 4,
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
        "linear_num_key_heads": 16, "linear_num_value_heads": value_heads, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "vocab_size": 248320, "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6, "attn_output_gate": True, "attention_bias": False, "hidden_act": "silu",
        "max_position_embeddings": 262144, "eos_token_id": 248044, "torch_dtype": "bfloat16",
        "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "rope_type": "default",
                            "rope_theta": 10000000, "partial_rotary_factor": 0.25},
    })


def _fp8(spec: ModelSpec) -> ModelSpec:
    """The fp8 release of a model (MaxText's `-fp8` names: weight_dtype float8_e4m3fn, weight_block_size 128): its
    config with the releases' quantization_config, and fp8 (weights kept, with their block scales) as its dtype."""
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    return ModelSpec(spec.name, spec.family, spec.repo_id, {**spec.config, "quantization_config": quant}, dtype="fp8")


def _mixtral(name: str, repo: str, e: int, n: int, m: int, layers: int, vocab: int, max_positions: int
             ) -> ModelSpec:
    return ModelSpec(name, "mixtral", repo, {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": e, "num_attention_heads": n,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": m, "num_local_experts": 8,
        "num_experts_per_tok": 2, "num_hidden_layers": layers, "vocab_size": vocab, "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None, "hidden_act": "silu",
        "max_position_embeddings": max_positions, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    })


def _gemma3(name: str, repo: str, e: int, n: int, k: int, d: int, f: int, layers: int, query_scalar: int
            ) -> ModelSpec:
    """The text model of a Gemma 3 release (the repos are multimodal; their text_config, defaults filled in).
    Vocabulary 262144 as MaxText's gemma3 configs (the -it files hold 262208 rows)."""
    return ModelSpec(name, "gemma3", repo, {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": e,
        "num_attention_heads": n, "num_key_value_heads": k, "head_dim": d, "intermediate_size": f,
        "num_hidden_layers": layers, "vocab_size": 262144, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": query_scalar, "sliding_window": 1024, "sliding_window_pattern": 6,
        "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False,
        "max_position_embeddings": 131072, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "torch_dtype": "bfloat16",
    })


# --- Gemma and Gemma 2 (issue 12) ---
def _gemma(name: str, repo: str, e: int, n: int, k: int, f: int, layers: int) -> ModelSpec:
    """configs/models/gemma-*.yml (head_dim 256, tied, vocab 256128 = HF's 256000 + 128 padded rows) and the
    released config.json (hidden_act "gelu", which transformers reads as the tanh gelu)."""
    return ModelSpec(name, "gemma", repo, {
        "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_size": e, "num_attention_heads": n,
        "num_key_value_heads": k, "head_dim": 256, "intermediate_size": f, "num_hidden_layers": layers,
        "vocab_size": 256000, "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "hidden_act": "gelu", "attention_bias": False, "max_position_embeddings": 8192, "bos_token_id": 2,
        "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16",
    })


def _gemma2(name: str, repo: str, e: int, n: int, k: int, d: int, f: int, layers: int, query_scalar: int,
            dtype: str) -> ModelSpec:
    """configs/models/gemma2-*.yml (layers: MaxText counts local/global pairs, HF counts both) and
    hf_model_configs.py, but query_pre_attn_scalar 256 for gemma2-9b as its release says (hf_model_configs.py
    writes 224 = E/N). dtype: what the released safetensors hold (2b float32, 9b and 27b bfloat16)."""
    return ModelSpec(name, "gemma2", repo, {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": e, "num_attention_heads": n,
        "num_key_value_heads": k, "head_dim": d, "intermediate_size": f, "num_hidden_layers": layers,
        "vocab_size": 256000, "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "query_pre_attn_scalar": query_scalar, "sliding_window": 4096, "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0, "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
        "attention_bias": False, "max_position_embeddings": 8192, "bos_token_id": 2, "eos_token_id": 1,
        "pad_token_id": 0, "torch_dtype": dtype,
    })
# --- end Gemma and Gemma 2 ---


def _gpt_oss(name: str, repo: str, layers: int, experts: int) -> ModelSpec:
    """§10.1; the rest as the released config.json (hidden 2880, 64 heads of 64, 8 kv heads, YaRN x32)."""
    return ModelSpec(name, "gpt_oss", repo, {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 2880,
        "num_local_experts": experts, "num_experts_per_tok": 4, "num_hidden_layers": layers, "vocab_size": 201088,
        "layer_types": [("sliding_attention", "full_attention")[i % 2] for i in range(layers)],
        "sliding_window": 128, "attention_bias": True, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
        "rope_theta": 150000.0, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                 "beta_slow": 1.0, "original_max_position_embeddings": 4096,
                                                 "truncate": False},
        "max_position_embeddings": 131072, "swiglu_limit": 7.0, "hidden_act": "silu", "router_aux_loss_coef": 0.9,
        "eos_token_id": 200002, "pad_token_id": 199999, "torch_dtype": "bfloat16",
    })


def _olmo3(name: str, repo: str, e: int, n: int, k: int, f: int, layers: int, yarn: bool) -> ModelSpec:
    """Dimensions as MaxText 0.2.5's hf_model_configs.py; RoPE as its configs/models/NAME.yml: YaRN x8 from 8192
    positions for olmo3-7b / -32b (the stage-3 and post-trained releases), plain RoPE for olmo3-7b-pt (the
    Olmo-3-1025-7B stage-1/2 revisions). Every fourth layer global, the others a 4096-token sliding window."""
    rope = {"rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
                             "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.2079441541679836},
            "max_position_embeddings": 65536} if yarn else {"rope_scaling": None, "max_position_embeddings": 8192}
    return ModelSpec(name, "olmo3", repo, {
        "architectures": ["Olmo3ForCausalLM"], "model_type": "olmo3", "hidden_size": e, "num_attention_heads": n,
        "num_key_value_heads": k, "head_dim": 128, "intermediate_size": f, "num_hidden_layers": layers,
        "vocab_size": 100278, "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 500000.0, **rope,
        "sliding_window": 4096, "layer_types": [("sliding_attention", "full_attention")[i % 4 == 3]
                                                for i in range(layers)],
        "hidden_act": "silu", "attention_bias": False, "pad_token_id": 100277, "eos_token_id": 100257,
        "torch_dtype": "bfloat16",
    })


_OLMO3 = (   # MaxText's HF_IDS (utils/globals.py)
    _olmo3("olmo3-7b", "allenai/Olmo-3-7B-Instruct", 4096, 32, 32, 11008, 32, True),
    _olmo3("olmo3-7b-pt", "allenai/Olmo-3-1025-7B", 4096, 32, 32, 11008, 32, False),
    _olmo3("olmo3-32b", "allenai/Olmo-3-32B-Think", 5120, 40, 8, 27648, 64, True),
)


_LLAMA_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def _llama(name: str, repo: str, e: int, n: int, f: int, layers: int) -> ModelSpec:
    return ModelSpec(name, "llama3.1", repo, {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": e, "num_attention_heads": n,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": f, "num_hidden_layers": layers,
        "vocab_size": 128256, "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": dict(_LLAMA_ROPE), "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
    })


# Llama 2 / 3 / 3.3, Mistral and Qwen2.5 (issue 12): MaxText's configs/models/NAME.yml, the rest as the released
# config.json of the default repo.
def _llama2(name: str, repo: str, e: int, n: int, k: int, f: int, layers: int, llama3: bool = False,
            scaled: bool = False) -> ModelSpec:
    """Llama 2 (vocab 32000, rope_theta 1e4, 4k context) or, `llama3`, Llama 3 (128256, 5e5, 8k); `scaled`:
    Llama 3.3's llama3 rope scaling and 128k context (MaxText's llama3.3-70b does not apply the scaling)."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": e, "num_attention_heads": n,
           "num_key_value_heads": k, "head_dim": 128, "intermediate_size": f, "num_hidden_layers": layers,
           "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    if llama3:
        cfg |= {"vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": None,
                "max_position_embeddings": 8192, "bos_token_id": 128000, "eos_token_id": 128001,
                "torch_dtype": "bfloat16"}
    else:
        cfg |= {"vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
                "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"}
    if scaled:
        cfg |= {"rope_scaling": dict(_LLAMA_ROPE), "max_position_embeddings": 131072,
                "eos_token_id": [128001, 128008, 128009]}
    return ModelSpec(name, "llama2", repo, cfg)


def _mistral(name: str, repo: str) -> ModelSpec:
    """MaxText's mistral-7b (rope_theta 1e6, vocab 32000, no sliding window) is Mistral-7B v0.2's config; MaxText's
    HF_IDS names v0.1, whose rope_theta 1e4 and 4096-token window MaxText's config does not have."""
    return ModelSpec(name, "mistral", repo, {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
        "num_hidden_layers": 32, "vocab_size": 32000, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "sliding_window": None, "hidden_act": "silu", "max_position_embeddings": 32768,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    })


def _qwen2(name: str, repo: str, e: int, n: int, k: int, f: int, layers: int, vocab: int, tied: bool
           ) -> ModelSpec:
    """As MaxText's checkpoint_conversion/utils/hf_model_configs.py (the -Instruct repos: 32k context)."""
    return ModelSpec(name, "qwen2", repo, {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": e, "num_attention_heads": n,
        "num_key_value_heads": k, "intermediate_size": f, "num_hidden_layers": layers, "vocab_size": vocab,
        "tie_word_embeddings": tied, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
        "hidden_act": "silu", "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": layers,
        "max_position_embeddings": 32768, "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    })


def _deepseek(name: str, repo: str, model_type: str, v3: bool) -> ModelSpec:
    if not v3:
        cfg = {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 16, "num_hidden_layers": 27,
               "vocab_size": 102400, "intermediate_size": 10944, "moe_intermediate_size": 1408,
               "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
               "q_lora_rank": None, "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False,
               "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "bos_token_id": 100000,
               "eos_token_id": 100001}
        mscale = 0.707
    else:
        cfg = {"hidden_size": 7168, "num_attention_heads": 128, "num_key_value_heads": 128, "num_hidden_layers": 61,
               "vocab_size": 129280, "intermediate_size": 18432, "moe_intermediate_size": 2048,
               "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
               "q_lora_rank": 1536, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
               "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4, "num_nextn_predict_layers": 1,
               "bos_token_id": 0, "eos_token_id": 1,
               "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": [128, 128]}}
        mscale = 1.0
    arch = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
            "deepseek_v32": "DeepseekV32ForCausalLM"}[model_type]
    cfg |= {"architectures": [arch], "model_type": model_type, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                             "beta_fast": 32.0, "beta_slow": 1.0, "mscale": mscale, "mscale_all_dim": mscale},
            "max_position_embeddings": 163840, "tie_word_embeddings": False, "hidden_act": "silu",
            "attention_bias": False, "torch_dtype": "bfloat16"}
    if model_type == "deepseek_v32":
        cfg |= {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}
    return ModelSpec(name, "deepseek", repo, cfg)


MODELS: dict[str, ModelSpec] = {m.name: m for m in (
    _qwen3("qwen3-0.6b", "Qwen/Qwen3-0.6B", 1024, 16, 3072, 28, True),
    _qwen3("qwen3-1.7b", "Qwen/Qwen3-1.7B", 2048, 16, 6144, 28, True),
    _qwen3("qwen3-4b", "Qwen/Qwen3-4B", 2560, 32, 9728, 36, True),
    _qwen3("qwen3-4b-thinking-2507", "Qwen/Qwen3-4B-Thinking-2507", 2560, 32, 9728, 36, True, 5e6),
    _qwen3("qwen3-8b", "Qwen/Qwen3-8B", 4096, 32, 12288, 36, False),
    _qwen3("qwen3-14b", "Qwen/Qwen3-14B", 5120, 40, 17408, 40, False),
    _qwen3("qwen3-32b", "Qwen/Qwen3-32B", 5120, 64, 25600, 64, False),
    _qwen3_moe("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B-Thinking-2507", 2048, 32, 4, 768, 48, 128, 1e7, 6144, 262144),
    _qwen3_moe("qwen3-30b-a3b-base", "Qwen/Qwen3-30B-A3B-Base", 2048, 32, 4, 768, 48, 128, 1e6, 6144, 32768),
    _qwen3_moe("qwen3-235b-a22b", "Qwen/Qwen3-235B-A22B-Thinking-2507", 4096, 64, 4, 1536, 94, 128, 5e6, 12288,
               262144),
    _qwen3_moe("qwen3-480b-a35b", "Qwen/Qwen3-Coder-480B-A35B-Instruct", 6144, 96, 8, 2560, 62, 160, 1e7, 8192,
               262144),
    _llama("llama3.1-8b", "meta-llama/Llama-3.1-8B", 4096, 32, 14336, 32),
    _llama("llama3.1-8b-Instruct", "meta-llama/Llama-3.1-8B-Instruct", 4096, 32, 14336, 32),
    _llama("llama3.1-70b", "meta-llama/Llama-3.1-70B", 8192, 64, 28672, 80),
    _llama("llama3.1-70b-Instruct", "meta-llama/Llama-3.1-70B-Instruct", 8192, 64, 28672, 80),
    _llama("llama3.1-405b", "meta-llama/Llama-3.1-405B", 16384, 128, 53248, 126),
    _mixtral("mixtral-8x7b", "mistralai/Mixtral-8x7B-Instruct-v0.1", 4096, 32, 14336, 32, 32000, 32768),
    _mixtral("mixtral-8x22b", "mistralai/Mixtral-8x22B-Instruct-v0.1", 6144, 48, 16384, 56, 32768, 65536),
    _gemma3("gemma3-4b", "google/gemma-3-4b-it", 2560, 8, 4, 256, 10240, 34, 256),
    _gemma3("gemma3-12b", "google/gemma-3-12b-it", 3840, 16, 8, 256, 15360, 48, 256),
    _gemma3("gemma3-27b", "google/gemma-3-27b-it", 5376, 32, 16, 128, 21504, 62, 168),
    _gemma("gemma-2b", "google/gemma-2b", 2048, 8, 1, 16384, 18),
    _gemma("gemma-7b", "google/gemma-7b", 3072, 16, 16, 24576, 28),
    _gemma2("gemma2-2b", "google/gemma-2-2b", 2304, 8, 4, 256, 9216, 26, 256, "float32"),
    _gemma2("gemma2-9b", "google/gemma-2-9b", 3584, 16, 8, 256, 14336, 42, 256, "bfloat16"),
    _gemma2("gemma2-27b", "google/gemma-2-27b", 4608, 32, 16, 128, 36864, 46, 144, "bfloat16"),
    _gpt_oss("gpt-oss-20b", "unsloth/gpt-oss-20b-BF16", 24, 32),
    _gpt_oss("gpt-oss-120b", "unsloth/gpt-oss-120b-BF16", 36, 128),
    _llama2("llama2-7b", "meta-llama/Llama-2-7b-hf", 4096, 32, 32, 11008, 32),
    _llama2("llama2-13b", "meta-llama/Llama-2-13b-hf", 5120, 40, 40, 13824, 40),
    _llama2("llama2-70b", "meta-llama/Llama-2-70b-hf", 8192, 64, 8, 28672, 80),
    _llama2("llama3-8b", "meta-llama/Meta-Llama-3-8B", 4096, 32, 8, 14336, 32, llama3=True),
    _llama2("llama3-70b", "meta-llama/Meta-Llama-3-70B", 8192, 64, 8, 28672, 80, llama3=True),
    _llama2("llama3.3-70b", "meta-llama/Llama-3.3-70B-Instruct", 8192, 64, 8, 28672, 80, llama3=True, scaled=True),
    _mistral("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.2"),
    _qwen2("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", 1536, 12, 2, 8960, 28, 151936, True),
    _qwen2("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", 3584, 28, 4, 18944, 28, 152064, False),
    _qwen2("qwen2.5-14b", "Qwen/Qwen2.5-14B-Instruct", 5120, 40, 8, 13824, 48, 152064, False),
    _deepseek("deepseek2-16b", "deepseek-ai/DeepSeek-V2-Lite", "deepseek_v2", False),
    _deepseek("deepseek3-671b", "deepseek-ai/DeepSeek-V3", "deepseek_v3", True),
    _deepseek("deepseek3.2-671b", "deepseek-ai/DeepSeek-V3.2", "deepseek_v32", True),
    *_OLMO3,
    _qwen3_next("qwen3-next-80b-a3b", "Qwen/Qwen3-Next-80B-A3B-Instruct"),
    _qwen3_5("qwen3.5-35b-a3b", "Qwen/Qwen3.5-35B-A3B", 2048, 16, 40, 32, 256, 8, 512),
    _qwen3_5("qwen3.5-397b-a17b", "Qwen/Qwen3.5-397B-A17B", 4096, 32, 60, 64, 512, 10, 1024),
    _fp8(_qwen3_5("qwen3.5-35b-a3b-fp8", "Qwen/Qwen3.5-35B-A3B-FP8", 2048, 16, 40, 32, 256, 8, 512)),
    _fp8(_qwen3_5("qwen3.5-397b-a17b-fp8", "Qwen/Qwen3.5-397B-A17B-FP8", 4096, 32, 60, 64, 512, 10, 1024)),
)}


# MaxText 0.2.5 names for more released models of the families above: the Qwen3 -Base repos (the architecture of
# the post-trained ones, with the 32K context of their released configs) and DeepSeek-V2 (236B: the V2-Lite
# layout with q_lora_rank 1536, 160 experts and group-limited greedy routing, as its released config.json).
def _qwen3_base(name: str, repo: str, e: int, n: int, f: int, layers: int, tied: bool) -> ModelSpec:
    spec = _qwen3(name, repo, e, n, f, layers, tied)
    return ModelSpec(name, spec.family, repo, spec.config | {"max_position_embeddings": 32768})


def _deepseek2_236b() -> ModelSpec:
    lite = _deepseek("deepseek2-236b", "deepseek-ai/DeepSeek-V2", "deepseek_v2", False)
    return ModelSpec(lite.name, lite.family, lite.repo_id, lite.config | {
        "hidden_size": 5120, "num_attention_heads": 128, "num_key_value_heads": 128, "num_hidden_layers": 60,
        "intermediate_size": 12288, "moe_intermediate_size": 1536, "n_routed_experts": 160, "q_lora_rank": 1536,
        "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3, "routed_scaling_factor": 16.0})


def _kimi_k2() -> ModelSpec:
    """Kimi K2 (MaxText 0.2.5's kimi-k2-1t.yml; the rest as moonshotai/Kimi-K2-Instruct's config.json): the
    DeepSeek-V3 architecture at 1T parameters, 64 heads, 384 routed experts, one dense layer, vocab 163840,
    YaRN x32 over rope_theta 50000 with beta_fast = beta_slow = 1, no MTP layer. Its model_type is `kimi_k2`
    (the repo's own code, a DeepseekV3ForCausalLM)."""
    v3 = _deepseek("kimi-k2-1t", "moonshotai/Kimi-K2-Instruct", "deepseek_v3", True)
    return ModelSpec(v3.name, v3.family, v3.repo_id, v3.config | {
        "model_type": "kimi_k2", "num_attention_heads": 64, "num_key_value_heads": 64, "vocab_size": 163840,
        "n_routed_experts": 384, "first_k_dense_replace": 1, "routed_scaling_factor": 2.827, "n_group": 1,
        "topk_group": 1, "num_nextn_predict_layers": 0, "rope_theta": 50000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        "bos_token_id": 163584, "eos_token_id": 163585})


def _llama4(name: str, repo: str, experts: int, step: int, qk_norm: bool, scaled: bool) -> ModelSpec:
    """Llama 4 text model (MaxText 0.2.5's configs/models/NAME.yml; the rest as the released text_config): E 5120,
    40 heads of 128 (8 KV), 48 layers, vocab 202048, experts of 8192 and dense layers of 16384, one routed expert a
    token plus the shared one; MoE every `step`-th layer, no RoPE every fourth, 8192-token attention chunks.
    Scout (16 experts, every layer MoE) L2-normalizes q/k and scales RoPE llama3-style x16; Maverick (128, every
    other layer) does neither. The repos hold the multimodal model; its text part is converted."""
    layers = 48
    rope = ({"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
             "original_max_position_embeddings": 8192} if scaled else None)
    return ModelSpec(name, "llama4", repo, {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "hidden_size": 5120,
        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": layers,
        "vocab_size": 202048, "intermediate_size": 8192, "intermediate_size_mlp": 16384, "num_local_experts": experts,
        "num_experts_per_tok": 1, "interleave_moe_layer_step": step, "moe_layers": list(range(step - 1, layers, step)),
        "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(layers)], "use_qk_norm": qk_norm,
        "attention_chunk_size": 8192, "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
        "rope_theta": 500000.0, "rope_scaling": rope, "max_position_embeddings": 10485760 if scaled else 1048576,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
        "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008], "pad_token_id": 200018,
        "torch_dtype": "bfloat16",
    })


def _deepseek4() -> ModelSpec:
    """deepseek-ai/DeepSeek-V4-Flash's config.json as MaxText 0.2.5 records it (checkpoint_conversion/utils/
    hf_model_configs.py; configs/models/deepseek4-284b.yml): 43 layers, 3 hash-routed, compress ratios 0, 0, then
    4 / 128 alternating; fp8 block-scaled weights (ue8m0 scales) with fp4 routed experts."""
    return ModelSpec("deepseek4-284b", "deepseek4", "deepseek-ai/DeepSeek-V4-Flash", {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "hidden_size": 4096,
        "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64,
        "num_hidden_layers": 43, "vocab_size": 129280, "moe_intermediate_size": 2048, "n_routed_experts": 256,
        "n_shared_experts": 1, "num_experts_per_tok": 6, "num_hash_layers": 3, "q_lora_rank": 1024, "o_groups": 8,
        "o_lora_rank": 1024, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "index_n_heads": 64,
        "index_head_dim": 128, "index_topk": 512, "sliding_window": 128, "swiglu_limit": 10.0,
        "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
        "routed_scaling_factor": 1.5, "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "compress_rope_theta": 160000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                         "beta_slow": 1},
        "compress_ratios": [0, 0] + [4, 128] * 20 + [4], "max_position_embeddings": 1048576,
        "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "bos_token_id": 0,
        "eos_token_id": 1, "expert_dtype": "fp4", "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    })


MODELS.update({m.name: m for m in (
    _deepseek4(),
    _kimi_k2(),
    _llama4("llama4-17b-16e", "meta-llama/Llama-4-Scout-17B-16E", 16, 1, True, True),
    _llama4("llama4-17b-128e", "meta-llama/Llama-4-Maverick-17B-128E", 128, 2, False, False),
    _qwen3_base("qwen3-1.7b-base", "Qwen/Qwen3-1.7B-Base", 2048, 16, 6144, 28, True),
    _qwen3_base("qwen3-4b-base", "Qwen/Qwen3-4B-Base", 2560, 32, 9728, 36, True),
    _qwen3_base("qwen3-8b-base", "Qwen/Qwen3-8B-Base", 4096, 32, 12288, 36, False),
    _qwen3_base("qwen3-14b-base", "Qwen/Qwen3-14B-Base", 5120, 40, 17408, 40, False),
    _deepseek2_236b(),
)})

# --- Gemma 4 (issue 14) ---
def _gemma4(name: str, repo: str, e: int, n: int, k: int, f: int, layers: int, period: int, *, kg: int | None = None,
            experts: int | None = None, ple: int = 0, shared: int = 0, wide: bool = False, window: int = 1024
            ) -> ModelSpec:
    """The text model of a Gemma 4 release (MaxText 0.2.5's configs/models/NAME.yml and the text_config of its
    checkpoint_conversion/utils/hf_model_configs.py): head_dim 256 (local) and 512 (global), vocab 262144, tied,
    final logits soft-capped at 30; every `period`-th layer global; `kg` global kv heads with attention_k_eq_v
    (26b, 31b); `experts` routed experts of 704 (26b, top 8); per-layer embeddings of `ple` and `shared` KV-shared
    layers (e2b, e4b; `wide`: double-wide MLP on the shared layers)."""
    return ModelSpec(name, "gemma4", repo, {
        "architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", "hidden_size": e,
        "num_attention_heads": n, "num_key_value_heads": k, "head_dim": 256, "global_head_dim": 512,
        "num_global_key_value_heads": kg, "attention_k_eq_v": kg is not None, "intermediate_size": f,
        "num_hidden_layers": layers, "vocab_size": 262144, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
        "layer_types": ["full_attention" if i % period == period - 1 else "sliding_attention" for i in range(layers)],
        "sliding_window": window, "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"}},
        "enable_moe_block": experts is not None, "num_experts": experts, "top_k_experts": 8 if experts else None,
        "moe_intermediate_size": 704 if experts else None, "hidden_size_per_layer_input": ple,
        "vocab_size_per_layer_input": 262144, "num_kv_shared_layers": shared, "use_double_wide_mlp": wide,
        "attention_bias": False, "use_bidirectional_attention": None,
        "max_position_embeddings": 262144 if kg else 131072,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16",
    })


MODELS.update({m.name: m for m in (
    _gemma4("gemma4-26b", "google/gemma-4-26b-a4b-it", 2816, 16, 8, 2112, 30, 6, kg=2, experts=128),
    _gemma4("gemma4-31b", "google/gemma-4-31b-it", 5376, 32, 16, 21504, 60, 6, kg=4),
    _gemma4("gemma4-e2b", "google/gemma-4-E2B-it", 1536, 8, 1, 6144, 35, 5, ple=256, shared=20, wide=True, window=512),
    _gemma4("gemma4-e4b", "google/gemma-4-E4B-it", 2560, 8, 2, 10240, 42, 6, ple=256, shared=18, window=512),
)})
# --- end Gemma 4 ---


def lookup(name: str) -> ModelSpec:
    """A registered MaxText model name (case-insensitive), or an UnknownModelError naming the closest ones."""
    for key, spec in MODELS.items():
        if key.lower() == name.lower():
            return spec
    raise UnknownModelError(f"unknown model {name!r}{did_you_mean(name)}")


def did_you_mean(name: str) -> str:
    """'; did you mean qwen3-8b or qwen3-4b?' (the closest registered names), else where to find them all."""
    import difflib

    names = {m.lower(): m for m in MODELS}
    close = [names[m] for m in difflib.get_close_matches(name.lower(), list(names), n=3, cutoff=0.6)]
    return f"; did you mean {' or '.join(close)}?" if close else " (`ckpt models` lists the model names)"


def is_model_name(text: str) -> bool:
    return any(k.lower() == text.lower() for k in MODELS)


def reference_config(name: str) -> dict:
    """An HF-style config.json dict for a registered model (a copy)."""
    return dict(lookup(name).config)


def check_against(spec: ModelSpec, cfg: dict, keys: tuple[str, ...]) -> None:
    """Raise ConfigMismatchError on the first reference hyperparameter the config disagrees with."""
    for key in keys:
        want = spec.config.get(key)
        got = cfg.get(key)
        if key == "head_dim" and got is None and cfg.get("hidden_size") and cfg.get("num_attention_heads"):
            got = cfg["hidden_size"] // cfg["num_attention_heads"]
        if key == "num_experts" and got is None:
            got = cfg.get("num_local_experts")   # transformers 5 writes Qwen3-MoE's num_experts under this name
        if key == "full_attention_interval" and got is None:   # transformers 5 writes layer_types instead
            from ckpt_cli.families.qwen3_next import interval

            got = interval(cfg)
        if key == "rope_theta" and got is None:   # transformers 5 nests it; absent means transformers' default
            got = float((cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        if key == "rope_scaling":   # compared by kind: Llama 3's unscaled RoPE is not Llama 3.1's llama3 scaling
            from ckpt_cli.families.llama3 import rope_kind

            want, got = rope_kind(spec.config) or "default", rope_kind(cfg) or "default"
        if key == "tie_word_embeddings":
            want, got = bool(want), bool(got)
        if want is not None and got != want:
            raise ConfigMismatchError(f"config.json {key} = {got}, but {spec.name} has {want}")
