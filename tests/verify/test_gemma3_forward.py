"""The Gemma3 MaxText-math forward (ckpt_cli/verify/gemma3.py) against transformers, from a tree written from §9."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from ckpt_cli.verify.blocks import attention_mask
from ckpt_cli.verify.gemma3 import Gemma3Config, gemma3_logits
from tests.conftest import make_hf_model
from tests.expectations import expected_layer, gemma3_embedding_factor
from tests.verify.test_forward import DictSource, hf_logits, max_kl, tokens_for


def maxtext_source(model: torch.nn.Module) -> DictSource:
    """The MaxText tree of a Gemma3ForCausalLM from tests/expectations.py (spec-written, not the converter's)."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    cfg = model.config.to_dict()
    top = {"token_embedder/embedding": sd["model.embed_tokens.weight"] * gemma3_embedding_factor(cfg["hidden_size"]),
           "decoder/decoder_norm/scale": sd["model.norm.weight"] + np.float32(1)}
    return DictSource(top, [expected_layer(sd, cfg, "gemma3", i) for i in range(cfg["num_hidden_layers"])])


@pytest.mark.parametrize("kind", ["gemma3", "gemma3-e48"])
def test_matches_transformers_up_to_the_stored_factor(kind: str) -> None:
    """With transformers' lookup scaled by the stored s = bf16(sqrt(E)) and its logits by s / sqrt(E) (what MaxText
    computes: the table holds x * s, the tied logits are divided by sqrt(E)), the two agree to KL < 1e-6.
    For E = 64 (s = 8 = sqrt(E)) transformers is left as it is."""
    model = make_hf_model(kind)
    src = maxtext_source(model)
    cfg = Gemma3Config.from_hf_config(model.config.to_dict())
    assert cfg.global_layers == tuple(i % 6 == 5 for i in range(14)) and cfg.sliding_window == 4
    assert cfg.query_scale == 24 ** -0.5 and cfg.global_rope == (1e6, 8.0) and cfg.local_rope == (1e4, 1.0)
    e = cfg.hidden
    s = float(gemma3_embedding_factor(e))
    tokens = tokens_for(cfg.vocab)
    if kind == "gemma3-e48":
        assert s == 6.9375 != math.sqrt(e)
        model.model.embed_tokens.embed_scale.fill_(s)
    ref = hf_logits(model, tokens) * np.float32(s / math.sqrt(e))
    got = gemma3_logits(src, cfg, tokens)
    assert got.shape == ref.shape and np.abs(ref).max() > 1.0
    assert np.abs(got - ref).max() < 1e-4
    assert max_kl(ref, got) < 1e-6
    assert src.fetched == list(range(cfg.num_layers))


def test_local_attention_and_rope_matter() -> None:
    """A forward with no sliding window, or with the global RoPE unscaled, differs: the test prompts exercise both."""
    model = make_hf_model("gemma3")
    cfg = Gemma3Config.from_hf_config(model.config.to_dict())
    tokens = tokens_for(cfg.vocab)
    ref = hf_logits(model, tokens)
    for wrong in (dataclasses.replace(cfg, sliding_window=10**6), dataclasses.replace(cfg, global_rope=(1e6, 1.0)),
                  dataclasses.replace(cfg, query_scale=16 ** -0.5)):
        assert max_kl(ref, gemma3_logits(maxtext_source(model), wrong, tokens)) > 1e-5


def test_sliding_window_mask() -> None:
    m = attention_mask(6, 4)
    assert m[5].tolist() == [False, False, True, True, True, True]      # q - kv < 4, causal
    assert not m[0, 1] and attention_mask(6, None)[5].all()


def test_config_spellings_agree() -> None:
    """transformers 5's rope_parameters and the older rope_theta / rope_local_base_freq / rope_scaling spelling
    (the Hub's Gemma 3 configs), sliding_window_pattern instead of layer_types: the same forward config."""
    new = make_hf_model("gemma3").config.to_dict()
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old |= {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "sliding_window_pattern": 6}
    assert Gemma3Config.from_hf_config(old) == Gemma3Config.from_hf_config(new)
    with pytest.raises(ValueError, match="hidden_activation"):
        Gemma3Config.from_hf_config({**new, "hidden_activation": "gelu"})
