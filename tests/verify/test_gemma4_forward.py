"""verify-logits on Gemma 4 text models: converted float32 tiny models match transformers' gemma4 (max KL < 1e-6),
scanned and unscanned, with sliding-window local layers (window 4 within 24 tokens), proportional RoPE on the global
layers (head dim 16 to the local 8), attention_k_eq_v, routed experts beside the shared MLP (26b-like), per-layer
embeddings and KV sharing with a double-wide MLP (e2b-like), soft-capped logits; a planted mistake is caught."""

from __future__ import annotations

import numpy as np
import pytest

from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.io.orbax import OrbaxCheckpoint
from ckpt_cli.verify.run import VerifyOptions, verify_logits
from tests.families.test_gemma4 import make_model

TOKENS = [tuple(range(3, 27)), (5, 9, 77, 2, 11, 5, 9)]


def _verify(tmp_path, kind: str, scan: bool, name: str = "mt"):
    src = tmp_path / f"hf-{kind}"
    if not src.exists():
        make_model(kind).save_pretrained(src)
    hf_to_maxtext(str(src), tmp_path / name, ToMaxTextOptions(scan_layers=scan, dtype="f32"))
    return src, verify_logits(VerifyOptions(maxtext=tmp_path / name, hf=str(src), max_kl=1e-6, dtype="f32",
                                            tokens=TOKENS, hf_load="full"))


@pytest.mark.parametrize("kind,scan", [("moe", True), ("moe", False), ("dense", True), ("e2b", False),
                                       ("e4b", False)])
def test_converted_gemma4_matches_transformers(tmp_path, kind, scan):
    _, result = _verify(tmp_path, kind, scan)
    assert result.family == "gemma4" and result.scan_layers is scan
    assert result.kl_max < 1e-6, result.verdict()
    assert result.max_abs_dlogit < 1e-4
    assert result.passed


@pytest.mark.parametrize("kind,leaf", [
    ("moe", "decoder/layers_0/mlp/moe_block/MoeBlock_0/wo"),                   # the first layer's routed experts
    ("e2b", "decoder/per_layer_embedder/per_layer_projection_norm/scale"),     # the per-layer embeddings' norm
])
def test_planted_mistake_is_caught(tmp_path, kind, leaf):
    """Scaling one leaf of the converted checkpoint (in place, through tensorstore) fails verify-logits."""
    _, result = _verify(tmp_path, kind, False)
    assert result.passed
    ckpt = OrbaxCheckpoint(tmp_path / "mt")
    arr = ckpt.array(leaf)
    data = arr.read().result()
    arr.write((data * np.float32(3.0)).astype(data.dtype)).result()
    result = verify_logits(VerifyOptions(maxtext=tmp_path / "mt", hf=str(tmp_path / f"hf-{kind}"), max_kl=1e-6,
                                         dtype="f32", tokens=TOKENS, hf_load="full"))
    assert not result.passed and result.kl_max > 1e-5, result.verdict()
