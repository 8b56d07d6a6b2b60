"""The Gemma / Gemma 2 MaxText-math forward (ckpt_cli/verify/gemma3.py, generalised) against transformers, from a
tree written in tests/families/test_gemma.py from 0.2.5's facts; then verify-logits end to end on converted tiny
models (f32, scanned and unscanned, KL < 1e-6) and planted mistakes caught (swapped layers, a transform left out,
a local/global swap, soft caps or the window left out of the forward)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from ckpt_cli.convert import ToMaxTextOptions, hf_to_maxtext
from ckpt_cli.families import gemma
from ckpt_cli.io.orbax import OrbaxCheckpoint
from ckpt_cli.verify.gemma3 import Gemma3Config, gemma3_logits
from tests.conftest import make_hf_model, save_model
from tests.families.test_gemma import expected_layer, expected_tree, sided
from tests.verify.test_forward import DictSource, hf_logits, max_kl, tokens_for
from tests.verify.test_verify_logits import assert_fails, error_line, leaf, verify, verify_json, with_steps


def maxtext_source(model: torch.nn.Module) -> DictSource:
    """The spec-written tree as the forward reads it: per HF layer, Gemma 2's leaves under their _local/_global
    names (what OrbaxParams serves)."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    cfg = model.config.to_dict()
    tree = expected_tree(sd, cfg, scan=False)
    top = {k: tree[k] for k in ("token_embedder/embedding", "decoder/decoder_norm/scale")}
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        layer = expected_layer(sd, cfg, i)
        if cfg["model_type"] == "gemma2":
            side = ("local", "global")[i % 2]
            layer = {sided(k, side): v for k, v in layer.items()}
        layers.append(layer)
    return DictSource(top, layers)


@pytest.mark.parametrize("kind", ["gemma", "gemma2"])
def test_matches_transformers(kind: str) -> None:
    model = make_hf_model(kind)
    cfg = Gemma3Config.from_hf_config(model.config.to_dict())
    if kind == "gemma2":
        assert cfg.global_layers == (False, True) * 3 and cfg.sliding_window == 4 and cfg.query_scale == 1.0
        assert (cfg.attn_softcap, cfg.final_softcap, cfg.post_norms, cfg.qk_norm) == (1.0, 2.0, True, False)
    else:
        assert all(cfg.global_layers) and cfg.sliding_window is None and not cfg.post_norms
    tokens = tokens_for(cfg.vocab)
    ref = hf_logits(model, tokens)
    src = maxtext_source(model)
    got = gemma3_logits(src, cfg, tokens)
    assert got.shape == ref.shape and np.abs(ref).max() > 0.5
    assert np.abs(got - ref).max() < 1e-4
    assert max_kl(ref, got) < 1e-6
    assert src.fetched == list(range(cfg.num_layers))


def test_each_gemma2_feature_matters() -> None:
    """Leaving out either soft cap or the sliding window, or making the even layers global and the odd ones local,
    moves the logits far past the agreement above: the test prompts exercise every feature."""
    model = make_hf_model("gemma2")
    cfg = Gemma3Config.from_hf_config(model.config.to_dict())
    tokens = tokens_for(cfg.vocab)
    ref = hf_logits(model, tokens)
    for wrong in (dataclasses.replace(cfg, attn_softcap=None), dataclasses.replace(cfg, final_softcap=None),
                  dataclasses.replace(cfg, sliding_window=10**6),
                  dataclasses.replace(cfg, global_layers=(True, False) * 3)):
        assert max_kl(ref, gemma3_logits(maxtext_source(model), wrong, tokens)) > 1e-4


def test_forward_refuses_other_activations() -> None:
    cfg = make_hf_model("gemma").config.to_dict()
    with pytest.raises(ValueError, match="activation 'silu'"):
        Gemma3Config.from_hf_config(cfg | {"hidden_act": "silu"})


# ---------------------------------------------------------------------------------------------------------------
# verify-logits end to end


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """kind -> a saved tiny model with q/k x4 (sharp attention, as trained models have, so scale mistakes move the
    logits) and, for gemma2, attention cap 50 and final cap 30 as released (cap 1 would flatten the scores)."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            model = make_hf_model(kind)
            if kind == "gemma2":
                model.config.attn_logit_softcapping, model.config.final_logit_softcapping = 50.0, 30.0
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "q_proj" in name or "k_proj" in name:
                        p.mul_(4.0)
            cache[kind] = save_model(model, tmp_path_factory.mktemp(f"sharp-{kind}"), False)
        return cache[kind]

    return get


def convert(src, out, scan=True, dtype="f32"):
    hf_to_maxtext(str(src), out, ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    return out


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("kind", ["gemma", "gemma2"])
def test_converted_f32_models_pass(hf_models, sharp, tmp_path, kind, scan):
    for src in (hf_models(kind, "float32"), sharp(kind)):
        out = convert(src, tmp_path / f"mt-{src.name}", scan)
        data = verify_json("--maxtext", out, "--hf", src, "--dtype", "f32")
        assert data["passed"] and data["summary"]["kl_max"] < 1e-6, data["summary"]
        assert data["family"] == kind and data["scan_layers"] is scan


@pytest.mark.parametrize("kind", ["gemma", "gemma2"])
def test_swapped_layers_fail(sharp, tmp_path, kind):
    """Scan indices 0 and 1 swapped in every stacked array (gemma2: pairs (0, 1) and (2, 3) of HF layers)."""
    src = sharp(kind)
    out = convert(src, tmp_path / "mt")
    ckpt = OrbaxCheckpoint(out)
    for path in (p for p in ckpt.paths if p.startswith("decoder/layers/")):
        arr = ckpt.array(path)
        first, second = arr[:, 0].read().result(), arr[:, 1].read().result()
        arr[:, 0].write(second).result()
        arr[:, 1].write(first).result()
    assert_fails(out, src)


MISTAKES = {
    # a transform left out: no query scale; no +1 on a norm (gemma's pre-FFW norm is HF's post_attention_layernorm)
    ("gemma", "query-scale-left-out"): ("GEMMA_LAYER", "self_attention/query/kernel", "transpose"),
    ("gemma", "norm-offset-left-out"): ("GEMMA_LAYER", "pre_ffw_norm/scale", ""),
    ("gemma2", "query-scale-left-out"): ("GLOBAL", "self_attention_global/query/kernel", "transpose"),
    ("gemma2", "head-dim-instead-of-query-pre-attn-scalar"): (
        "LOCAL", "self_attention_local/query/kernel", "transpose,query-scale"),
    ("gemma2", "post-norm-offset-left-out"): ("LOCAL", "post_ffw_norm_local/scale", ""),
}


@pytest.mark.parametrize("kind,mistake", list(MISTAKES))
def test_transform_mistakes_fail(sharp, tmp_path, monkeypatch, kind, mistake):
    table_name, leaf_path, steps = MISTAKES[kind, mistake]
    table = with_steps(getattr(gemma, table_name), leaf_path, steps) if steps else tuple(
        dataclasses.replace(r, steps=()) if r.maxtext == leaf_path else r for r in getattr(gemma, table_name))
    src = sharp(kind)
    good = convert(src, tmp_path / "good")
    with monkeypatch.context() as m:
        m.setattr(gemma, table_name, table)
        bad = convert(src, tmp_path / "bad")
    path = f"decoder/layers/{leaf_path}"
    assert not np.array_equal(leaf(bad, path), leaf(good, path))   # the monkeypatch really changed the conversion
    assert_fails(bad, src)


def test_local_and_global_rows_swapped_fail(sharp, tmp_path, monkeypatch):
    """HF's even layers written as the global leaves and odd ones as the local leaves."""
    src = sharp("gemma2")
    local, glob = gemma.LOCAL, gemma.GLOBAL
    with monkeypatch.context() as m:
        m.setattr(gemma, "LOCAL", glob)
        m.setattr(gemma, "GLOBAL", local)
        bad = convert(src, tmp_path / "bad")
    good = convert(src, tmp_path / "good")
    q = "decoder/layers/self_attention_local/query/kernel"
    assert not np.array_equal(leaf(bad, q), leaf(good, q))
    assert_fails(bad, src)


def test_bf16_conversion_passes_the_default_threshold(hf_models, tmp_path):
    src = hf_models("gemma2", "float32")
    out = convert(src, tmp_path / "mt", dtype="bf16")
    data = verify_json("--maxtext", out, "--hf", src)
    assert data["passed"] and data["summary"]["kl_max"] < 0.015


def test_checkpoint_of_another_config_is_refused_in_one_line(hf_models, tmp_path):
    """A gemma2 checkpoint checked against a gemma2 model with more layers: one line, exit 2."""
    src = hf_models("gemma2", "float32")
    out = convert(src, tmp_path / "mt", scan=False)
    other = tmp_path / "other"
    shutil.copytree(src, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"], cfg["layer_types"] = 8, ["sliding_attention", "full_attention"] * 4
    (other / "config.json").write_text(json.dumps(cfg))
    r = verify("--maxtext", out, "--hf", other)
    assert r.exit_code == 2, r.output
    assert "num_hidden_layers = 8 in" in error_line(r) and "= 6" in error_line(r)


@pytest.mark.parametrize("kind", ["gemma", "gemma2"])
def test_hf_reference_streams_layer_by_layer(hf_models, tmp_path, monkeypatch, kind):
    """When the whole HF model does not fit, the reference streams it (Gemma's embedding scale is a buffer rebuilt
    as from_pretrained does), with the whole model's figures."""
    from ckpt_cli.verify import reference
    from ckpt_cli.verify.prompts import Prompt
    from tests.conftest import read_config

    src = hf_models(kind, "float32")
    out = convert(src, tmp_path / "mt")
    full = verify_json("--maxtext", out, "--hf", src, "--hf-load", "full", "--dtype", "f32", "--max-kl", "1e-6")
    est = reference.estimate_memory(src, read_config(src), [Prompt((1,) * 40)] * 3, "f32")
    assert est.stream < est.full
    monkeypatch.setattr(reference, "available_memory",
                        lambda: int((est.stream + est.full) / 2 / reference.FIT_FRACTION))
    streamed = verify_json("--maxtext", out, "--hf", src, "--dtype", "f32", "--max-kl", "1e-6")
    assert full["reference"]["load"] == "full" and streamed["reference"]["load"] == "stream"
    assert streamed["passed"] and streamed["prompts"] == full["prompts"]
