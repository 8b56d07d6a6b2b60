"""verify-logits on DeepSeek V2 / V3 / V3.2 and Kimi K2: converted f32 tiny models match transformers (KL < 1e-6)."""

from __future__ import annotations

import pytest

from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.verify.run import VerifyOptions, verify_logits
from tests.families.test_deepseek import as_kimi, make_model


@pytest.fixture(scope="module")
def deepseek_sources(tmp_path_factory):
    cache = {}

    def get(kind: str, **overrides):
        key = (kind, repr(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"vds-{kind}")
            make_model("v3" if kind == "kimi" else kind, "float32", **overrides).save_pretrained(folder)
            if kind == "kimi":
                as_kimi(folder)
            cache[key] = folder
        return cache[key]

    return get


CASES = [
    ("v2", True, {}),
    ("v2", False, {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}}),
    ("v3", True, {}),
    ("v3", False, {"n_routed_experts": 8, "n_group": 2, "topk_group": 1}),
    ("v32", True, {"index_n_heads": 8, "index_topk": 16}),
    # Kimi K2 (model_type kimi_k2): the V3 forward; transformers builds the reference as deepseek_v3
    ("kimi", True, {"rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 16,
                                     "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
                    "rope_theta": 50000.0, "routed_scaling_factor": 2.827}),
]


@pytest.mark.parametrize("kind,scan,overrides", CASES)
def test_converted_deepseek_matches_transformers(deepseek_sources, tmp_path, kind, scan, overrides):
    src = deepseek_sources(kind, **overrides)
    out = tmp_path / "mt"
    hf_to_maxtext(str(src), out, ToMaxTextOptions(scan_layers=scan, dtype="f32"))
    result = verify_logits(VerifyOptions(maxtext=out, hf=str(src), tokens=[tuple(range(3, 43)), (5, 9, 77, 2, 11)],
                                         max_kl=1e-6, dtype="f32", hf_load="full"))
    assert result.family == "deepseek" and result.scan_layers is scan
    assert result.kl_max < 1e-6, result.verdict()
    assert result.max_abs_dlogit < 1e-4
    assert result.passed
    if kind == "v32":
        assert not any("selects every key" in n for n in result.notes)   # top-k 16 < 40 tokens: real selection


def test_deepseek_layer_swap_is_caught(deepseek_sources, tmp_path):
    """Swapping two MoE layers of the converted checkpoint must fail verification."""
    import numpy as np

    src = deepseek_sources("v3")
    out = tmp_path / "mt"
    hf_to_maxtext(str(src), out, ToMaxTextOptions(scan_layers=True, dtype="f32"))
    from ckpt_cli.io.orbax import OrbaxCheckpoint

    ckpt = OrbaxCheckpoint(out)
    for path in ckpt.paths:
        if path.startswith("decoder/moe_layers/"):
            arr = ckpt.array(path)
            first, second = (arr[0], arr[1]) if path.endswith("gate/bias") else (arr[:, 0], arr[:, 1])  # bias (Lm, X)
            a, b = first.read().result(), second.read().result()
            first.write(b).result()
            second.write(a).result()
            assert not np.array_equal(a, b)
    result = verify_logits(VerifyOptions(maxtext=out, hf=str(src), tokens=[tuple(range(3, 30))], max_kl=1e-6,
                                         dtype="f32", hf_load="full"))
    assert not result.passed and result.kl_max > 1e-4


@pytest.mark.parametrize("layout", ["old", "nnx_training", "linen_collection"])
def test_router_bias_read_in_every_layout(deepseek_sources, tmp_path, layout):
    """The scanned V3 router bias in the (X, Lm) layout earlier ckpt versions wrote (with a note), or where MaxText
    0.2.5 itself saves it (nnx_aux/model/..., params/MoEBiasVar/...): the forward reads it and matches."""
    from tests.families import test_deepseek_router_bias as bias

    src = deepseek_sources("v3")
    hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(scan_layers=True, dtype="f32"))
    change = {"old": bias.old_layout, "nnx_training": bias.nnx_training,
              "linen_collection": bias.linen_collection}[layout]
    saved = bias.resave(tmp_path / "mt", tmp_path / "saved", change)
    result = verify_logits(VerifyOptions(maxtext=saved, hf=str(src), tokens=[tuple(range(3, 30))], max_kl=1e-6,
                                         dtype="f32", hf_load="full"))
    assert result.passed and result.kl_max < 1e-6, result.verdict()
    assert any("earlier ckpt versions" in n for n in result.notes) is (layout == "old")
