"""A built-in tiny model, made with numpy alone: the demo's source and a quick smoke test.

Its tensor names and shapes come from the family's own plan (every source the plan reads), with
random weights from a fixed seed. Tests do not use this: they build their models with transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from ckpt_cli.families import family_named
from ckpt_cli.io.safetensors import save_file
from ckpt_cli.plan import build_to_maxtext

TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 256,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
    "attention_bias": False, "max_position_embeddings": 512, "torch_dtype": "bfloat16",
}


def write_tiny_model(folder: Path, config: dict | None = None, seed: int = 0) -> Path:
    """Write config.json + model.safetensors (bf16, random) for a tiny model; returns the folder."""
    cfg = dict(config or TINY_QWEN3)
    family = family_named({"qwen3": "qwen3", "llama": "llama3.1"}[cfg["model_type"]])
    plan = build_to_maxtext(family, cfg, True, np.dtype(np.float32))
    rng = np.random.default_rng(seed)
    tensors = {}
    for t in plan.tensors:
        for task in t.tasks:
            scale = 1.0 if len(t.source_shape) == 1 else 0.02
            base = 1.0 if len(t.source_shape) == 1 else 0.0
            arr = base + scale * rng.standard_normal(t.source_shape, dtype=np.float32)
            tensors[task.source.name] = arr.astype(ml_dtypes.bfloat16)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(folder / "model.safetensors", tensors, {"format": "pt"})
    return folder
