"""Tiny Llama 2 / Mistral / Qwen2.5 models built with transformers at test time, and the checks every one of
these dense families gets (tests/families/test_llama.py, test_qwen2.py): the element-wise tree, the round trip,
verify-logits, planted mistakes.

kinds: llama2 (MHA: 4 kv heads of 4, rope_theta 1e4), mistral (GQA, head_dim 24 != hidden/heads, so the folded
1/sqrt(24) is not a power of two; rope_theta 1e6, no sliding window), qwen2 (GQA, q/k/v biases, untied),
qwen2-tied. Every parameter distinct: norms 1 + 0.1 N(0, 1), biases 0.1 N(0, 1), matrices 0.05 N(0, 1), fixed seed.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np

from ckpt_cli.convert import ToHFOptions, ToMaxTextOptions, hf_to_maxtext, maxtext_to_hf
from ckpt_cli.io.orbax import OrbaxCheckpoint
from tests.conftest import TINY, read_config
from tests.expectations import assert_bits_equal, cast, expected_tree, flatten
from tests.test_convert_to_hf import bits, load_hf
from tests.test_convert_to_maxtext import restore

FAMILY = {"llama2": "llama2", "mistral": "mistral", "qwen2": "qwen2", "qwen2-tied": "qwen2"}
SRC_DTYPE = {"bf16": "bfloat16", "f32": "float32"}


def make_model(kind: str, dtype: str = "float32", sharp: bool = False, seed: int = 0):
    """A tiny transformers model of `kind`; `sharp` multiplies q/k by 4 (attention peaked as in trained models,
    so RoPE and query-scale mistakes move the logits)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama2":
        cfg = tf.LlamaConfig(**TINY | {"num_key_value_heads": 4}, rope_theta=10000.0, rms_norm_eps=1e-5,
                             tie_word_embeddings=False)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = tf.MistralConfig(**TINY | {"head_dim": 24}, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
                               tie_word_embeddings=False)
        model = tf.MistralForCausalLM(cfg)
    elif kind in ("qwen2", "qwen2-tied"):
        cfg = tf.Qwen2Config(**TINY, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=kind == "qwen2-tied")
        model = tf.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p) * (4.0 if sharp and ("q_proj" in name or "k_proj" in name) else 1))
    return model.to(getattr(torch, dtype)).eval()


class Models:
    """(kind, dtype[, sharp]) -> saved HF folder; (kind, scan, dtype) -> converted MaxText checkpoint; each built
    once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[tuple, Path] = {}

    def hf(self, kind: str, dtype: str = "float32", sharp: bool = False) -> Path:
        key = ("hf", kind, dtype, sharp)
        if key not in self.cache:
            folder = self.root / f"hf-{kind}-{dtype}{'-sharp' if sharp else ''}"
            make_model(kind, dtype, sharp).save_pretrained(folder)
            self.cache[key] = folder
        return self.cache[key]

    def maxtext(self, kind: str, scan: bool = True, dtype: str = "f32", sharp: bool = False) -> Path:
        key = ("mt", kind, scan, dtype, sharp)
        if key not in self.cache:
            out = self.root / f"mt-{kind}-{'scan' if scan else 'noscan'}-{dtype}{'-sharp' if sharp else ''}"
            hf_to_maxtext(str(self.hf(kind, SRC_DTYPE[dtype], sharp)), out,
                          ToMaxTextOptions(scan_layers=scan, dtype=dtype))
            self.cache[key] = out
        return self.cache[key]


def check_tree(models: Models, kind: str, scan: bool, dtype: str) -> None:
    """Every leaf of the converted checkpoint, bit for bit, against tests/expectations.py (written from 0.2.5's
    conversion facts with explicit index math), f32 source converted to `dtype`; nothing missing or extra."""
    src = models.hf(kind, "float32")
    out = models.root / f"tree-{kind}-{scan}-{dtype}"
    hf_to_maxtext(str(src), out, ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    got = flatten(restore(out)["params"]["params"])
    want = expected_tree(load_hf(src), read_config(src), FAMILY[kind], scan)
    assert sorted(got) == sorted(want)
    for path, arr in want.items():
        assert_bits_equal(np.asarray(got[path]), cast(arr, dtype), path)


def check_round_trip(models: Models, kind: str, scan: bool, dtype: str) -> None:
    """HF -> MaxText -> HF in one dtype: every tensor and name bit-identical, except (llama2, mistral) q_proj,
    whose folded 1/sqrt(D) is undone: its bits equal out(f32(out(f32(x) * s)) / s) with s = f32(1/sqrt(D)) and
    out() the rounding to the stored dtype, so at most one ulp from the original (D = 16: s = 1/4, bit-identical;
    mistral's D = 24: some elements move by one ulp in bf16). Qwen2.5 folds nothing: all bit-identical."""
    src = models.hf(kind, SRC_DTYPE[dtype])
    mt = models.root / f"rt-{kind}-{scan}-{dtype}"
    hf_to_maxtext(str(src), mt, ToMaxTextOptions(scan_layers=scan, dtype=dtype))
    out = models.root / f"rt-{kind}-{scan}-{dtype}-hf"
    result = maxtext_to_hf(str(mt), out, ToHFOptions(dtype=dtype))
    want, got = load_hf(src), load_hf(out)
    assert sorted(got) == sorted(want) and result.plan.scan_layers is scan
    cfg = read_config(src)
    store = ml_dtypes.bfloat16 if dtype == "bf16" else np.float32
    moved = 0
    for name, x in want.items():
        if FAMILY[kind] in ("llama2", "mistral") and name.endswith("q_proj.weight"):
            s = np.float32(1 / math.sqrt(cfg["head_dim"]))
            down = (x.astype(np.float32) * s).astype(store)
            assert_bits_equal(got[name], (down.astype(np.float32) / s).astype(store), name)
            assert np.abs(bits(got[name]) - bits(x)).max() <= 1, name
            moved += int(np.count_nonzero(bits(got[name]) != bits(x)))
        else:
            assert_bits_equal(got[name], x, name)
    if kind == "llama2":
        assert moved == 0     # D = 16: a power-of-two scale, exact both ways
    if kind == "mistral" and dtype == "bf16":
        assert moved > 0      # the one-ulp allowance above is needed, so the check is not vacuous
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == cfg["model_type"] and config["architectures"] == cfg["architectures"]


def swap_layers(good: Path, out: Path) -> Path:
    """A copy of a scanned checkpoint with layers 0 and 1 exchanged in every stacked array."""
    shutil.copytree(good, out)
    ckpt = OrbaxCheckpoint(out)
    for path in [p for p in ckpt.paths if p.startswith("decoder/layers/")]:
        arr = ckpt.array(path)
        first, second = arr[:, 0].read().result(), arr[:, 1].read().result()
        arr[:, 0].write(second).result()
        arr[:, 1].write(first).result()
    return out
