"""verify-logits on Llama 4 text models: converted float32 tiny models match transformers (max KL < 1e-6), with
chunked local attention (chunks of 8 within 40 tokens), the no-RoPE layers, q/k L2 norm, temperature tuning
(floor_scale 4, so it changes the queries), Llama 3 RoPE scaling, interleaved MoE and dense layers."""

from __future__ import annotations

import pytest

from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.verify.run import VerifyOptions, verify_logits

CASES = [
    ("scout", True, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    ("maverick", False, {"num_experts_per_tok": 2}),
]


@pytest.mark.parametrize("kind,scan,overrides", CASES)
def test_converted_llama4_matches_transformers(tmp_path, kind, scan, overrides):
    import torch
    import transformers as tf

    from tests.families.test_llama4 import KINDS, TINY

    torch.manual_seed(0)
    cfg = tf.Llama4TextConfig(**(TINY | {"floor_scale": 4, "attn_scale": 0.5} | overrides),
                              interleave_moe_layer_step=KINDS[kind], use_qk_norm=kind == "scout")
    model = tf.Llama4ForCausalLM(cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_((1.0 if p.ndim == 1 else 0.0) + 0.1 * torch.randn_like(p))
    model.eval().save_pretrained(tmp_path / "hf")
    hf_to_maxtext(str(tmp_path / "hf"), tmp_path / "mt", ToMaxTextOptions(scan_layers=scan, dtype="f32"))
    result = verify_logits(VerifyOptions(maxtext=tmp_path / "mt", hf=str(tmp_path / "hf"), max_kl=1e-6, dtype="f32",
                                         tokens=[tuple(range(3, 43)), (5, 9, 77, 2, 11)], hf_load="full"))
    assert result.family == "llama4" and result.scan_layers is scan
    assert result.kl_max < 1e-6, result.verdict()
    assert result.max_abs_dlogit < 1e-4
    assert result.passed
