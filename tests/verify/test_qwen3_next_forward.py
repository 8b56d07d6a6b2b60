"""The Qwen3-Next MaxText-math forward (ckpt_cli/verify/qwen3_next.py): against transformers from a tree written
from MaxText 0.2.5's mapping (not the converter), each Qwen3-Next feature shown to matter, and verify-logits end to
end on converted checkpoints (scanned and unscanned pass at KL < 1e-6; swapped layers and transform mistakes fail)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.families import qwen3_next
from ckpt_cli.io.orbax import OrbaxCheckpoint
from ckpt_cli.verify.qwen3_next import Qwen3NextConfig, qwen3_next_logits
from tests.conftest import make_hf_model
from tests.families.test_qwen3_next import expected_layer
from tests.verify.test_forward import DictSource, hf_logits, max_kl, tokens_for
from tests.verify.test_verify_logits import assert_fails, verify_json, with_steps


def maxtext_source(model) -> DictSource:
    """The MaxText tree of a Qwen3NextForCausalLM from the element-wise expectations (not the converter)."""
    import json
    import tempfile
    from pathlib import Path

    from safetensors.numpy import load_file

    with tempfile.TemporaryDirectory() as tmp:   # save_pretrained writes the released per-expert names
        model.save_pretrained(tmp)
        sd = load_file(Path(tmp) / "model.safetensors")
        cfg = json.loads((Path(tmp) / "config.json").read_text())
    top = {"token_embedder/embedding": sd["model.embed_tokens.weight"],
           "decoder/decoder_norm/scale": sd["model.norm.weight"],
           "decoder/logits_dense/kernel": np.ascontiguousarray(sd["lm_head.weight"].T)}
    return DictSource(top, [expected_layer(sd, cfg, i) for i in range(cfg["num_hidden_layers"])])


@pytest.fixture(scope="module")
def tiny():
    model = make_hf_model("qwen3-next")
    cfg = Qwen3NextConfig.from_hf_config(model.config.to_dict())
    tokens = tokens_for(cfg.vocab)
    return model, cfg, tokens, hf_logits(model, tokens)


def test_matches_transformers(tiny) -> None:
    model, cfg, tokens, ref = tiny
    assert cfg.full == (False, False, False, True) * 2 and cfg.rotary_dim == 4
    src = maxtext_source(model)
    got = qwen3_next_logits(src, cfg, tokens)
    assert got.shape == ref.shape and np.abs(ref).max() > 1.0
    assert max_kl(ref, got) < 1e-6
    assert src.fetched == list(range(cfg.num_layers))


def test_each_feature_matters(tiny) -> None:
    """Full RoPE instead of partial, no experts per token renormalisation, the pattern shifted: each moves the
    logits far beyond 1e-6."""
    model, cfg, tokens, ref = tiny
    for wrong in (dataclasses.replace(cfg, rotary_dim=cfg.head_dim), dataclasses.replace(cfg, norm_topk_prob=False)):
        assert max_kl(ref, qwen3_next_logits(maxtext_source(model), wrong, tokens)) > 1e-5


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    cache = {}

    def get(scan: bool = True, dtype: str = "f32"):
        if (scan, dtype) not in cache:
            src = hf_models("qwen3-next", "float32")
            out = tmp_path_factory.mktemp("mt") / f"qn-{scan}-{dtype}"
            hf_to_maxtext(str(src), out, ToMaxTextOptions(scan_layers=scan, dtype=dtype))
            cache[scan, dtype] = (src, out)
        return cache[scan, dtype]

    return get


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_converted_f32_models_match_transformers(converted, scan):
    src, out = converted(scan)
    data = verify_json("--maxtext", out, "--hf", src, "--max-kl", "1e-6")
    assert data["passed"] and data["family"] == "qwen3_next" and data["scan_layers"] is scan
    assert data["summary"]["kl_max"] < 1e-6 and data["summary"]["top1_agreement"] == 1.0


def test_hf_model_streams_layer_by_layer(converted):
    """--hf-load stream (transformers' per-expert -> fused conversion at load, one layer at a time) gives the
    whole model's figures."""
    src, out = converted()
    full = verify_json("--maxtext", out, "--hf", src, "--hf-load", "full", "--max-kl", "1e-6")
    stream = verify_json("--maxtext", out, "--hf", src, "--hf-load", "stream", "--max-kl", "1e-6")
    assert stream["passed"] and stream["reference"]["load"] == "stream"
    assert stream["summary"]["kl_max"] == full["summary"]["kl_max"]


def test_swapped_local_layers_fail(converted, tmp_path):
    """Positions 0 and 1 of the first cycle's DeltaNet layers (HF layers 0 and 1) swapped in place."""
    src, good = converted()
    out = tmp_path / "swapped"
    shutil.copytree(good, out)
    ckpt = OrbaxCheckpoint(out)
    for path in (p for p in ckpt.paths if p.startswith("decoder/layers/local_layers/")):
        arr = ckpt.array(path)
        axis = 2 if "/routed_experts/w" in path else 1   # (cycle, position) after the experts' axis
        first = arr[(slice(None),) * axis + (0, 0)].read().result()
        second = arr[(slice(None),) * axis + (0, 1)].read().result()
        arr[(slice(None),) * axis + (0, 0)].write(second).result()
        arr[(slice(None),) * axis + (0, 1)].write(first).result()
    assert_fails(out, src)


MISTAKES = {   # transforms another family needs, wrongly applied here
    "gemma-norm-offset": ("input_layernorm/scale", "offset+1"),
    "llama-query-scale": ("attention/attention/query/kernel", "transpose,query-scale"),
    "gdn-norm-offset": ("attention/norm/rms_norm/scale", "offset+1"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_planted_transform_mistakes_fail(hf_models, tmp_path, monkeypatch, mistake):
    leaf_path, steps = MISTAKES[mistake]
    src = hf_models("qwen3-next", "float32")
    with monkeypatch.context() as m:
        for name in ("LOCAL_LAYER", "GLOBAL_LAYER"):
            table = getattr(qwen3_next, name)
            if any(r.maxtext == leaf_path for r in table):
                m.setattr(qwen3_next, name, with_steps(table, leaf_path, steps))
        hf_to_maxtext(str(src), tmp_path / "mt", ToMaxTextOptions(dtype="f32"))
    assert_fails(tmp_path / "mt", src)
