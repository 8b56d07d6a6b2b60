"""verify-logits on DeepSeek-V4: a converted float32 tiny model matches transformers' DeepseekV4ForCausalLM (max KL
< 1e-6), scanned and unscanned, over 24 tokens: sliding-window layers (window 8), a CSA layer whose indexer keeps 4
of up to 6 compressed entries, an HCA layer (ratio 8), hash-routed and bias-routed MoE layers, hyper-connections.
16 indexer heads keep the indexer's scores free of ties (jax and torch break ties differently). A planted mistake
(the hyper-connection's residual mix untransposed) is caught."""

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


def check(tiny, scan: bool, max_kl: float = 1e-6):
    out = tiny / f"mt-{scan}"
    if not out.exists():
        hf_to_maxtext(str(tiny / "hf"), out, ToMaxTextOptions(scan_layers=scan, dtype="f32"))
    return verify_logits(VerifyOptions(maxtext=out, hf=str(tiny / "hf"), max_kl=max_kl, dtype="f32", tokens=TOKENS,
                                       hf_load="full"))


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
