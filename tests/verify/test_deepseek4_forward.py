"""verify-logits on DeepSeek-V4: a converted float32 tiny model matches transformers' DeepseekV4ForCausalLM (max KL
< 1e-6), scanned and unscanned, over 24 tokens: sliding-window layers (window 8), a CSA layer whose indexer keeps 4
of up to 6 compressed entries, an HCA layer (ratio 8), hash-routed and bias-routed MoE layers, hyper-connections.
16 indexer heads keep the indexer's scores free of ties (jax and torch break ties differently). A planted mistake
(the hyper-connection's residual mix untransposed) is caught. Streamed on both sides, one routed expert at a time
(`--expert-group 1`: MaxText's `routed_experts`, transformers' own experts module per group), it still passes, and the
memory plan counts each MoE layer's experts (hash-routed and bias-routed layers alike)."""

from __future__ import annotations

import pytest

from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.verify.run import VerifyOptions, verify_logits

TOKENS = [tuple((7 * i + 3) % 64 for i in range(24))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.families.test_deepseek4 import tiny_model

    root = tmp_path_factory.mktemp("ds4v")
    tiny_model(seed=2, index_n_heads=16).save_pretrained(root / "hf")
    return root


def check(tiny, scan: bool, max_kl: float = 1e-6, hf_load: str = "full", expert_group: int | None = None):
    out = tiny / f"mt-{scan}"
    if not out.exists():
        hf_to_maxtext(str(tiny / "hf"), out, ToMaxTextOptions(scan_layers=scan, dtype="f32"))
    return verify_logits(VerifyOptions(maxtext=out, hf=str(tiny / "hf"), max_kl=max_kl, dtype="f32", tokens=TOKENS,
                                       hf_load=hf_load, expert_group=expert_group))


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
def test_converted_deepseek4_matches_transformers(tiny, scan):
    result = check(tiny, scan)
    assert result.family == "deepseek4" and result.scan_layers is scan
    assert result.kl_max < 1e-6, result.verdict()
    assert result.max_abs_dlogit < 1e-4 and result.passed


def test_a_planted_mistake_is_caught(tiny, monkeypatch):
    from ckpt_cli.verify import deepseek4

    def untransposed(x, out, post, comb):
        return post[..., None] * out[:, :, None, :] + deepseek4.jnp.einsum("btkj,btje->btke", comb, x)

    monkeypatch.setattr(deepseek4, "mix_streams", untransposed)
    result = check(tiny, True)
    assert result.kl_max > 1e-6 and not result.passed      # subtle (about 1e-5 here), still over the f32 bar


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
def test_one_expert_at_a_time_on_both_sides_still_matches(tiny, scan):
    """`--expert-group 1 --hf-load stream`: both forwards read one routed expert at a time (the HF side rebuilding the
    compressors' own RoPE modules as each layer loads); KL < 1e-6 in float32. The plan counts all 5 MoE layers'
    4 experts, each expert its wi_0, wi_1, wo (3 x 32 x 16 float32), and the rest (tid2eid, router, shared expert)
    with the layer."""
    result = check(tiny, scan, hf_load="stream", expert_group=1)
    assert result.reference["load"] == "stream" and result.reference["expert_group"] == 1
    plan = result.memory_plan
    assert plan["group"] == 1 and plan["group_forced"] and plan["moe_layers"] == 5 and plan["experts"] == 4
    assert plan["expert_bytes"] == 3 * 32 * 16 * 4
    assert result.kl_max < 1e-6 and result.passed, result.verdict()
