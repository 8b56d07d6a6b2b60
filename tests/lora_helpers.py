"""Tiny random PEFT LoRA adapters written at test time in PEFT's own format (no peft needed to build them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def make_adapter(base: Path, folder: Path, modules=ATTENTION + MLP, r: int = 4, alpha: float = 8.0,
                 rslora: bool = False, seed: int = 1, dtype: str = "float32", extra: dict | None = None,
                 skip: str = r"\.experts\.\d+\.") -> Path:
    """A PEFT LoRA adapter for the tiny model in `base`: lora_A (r, in) and lora_B (out, r) for every Linear
    weight whose module name is one of `modules` (but those whose name `skip` finds: routed experts), every value
    distinct and random (B non-zero)."""
    import torch
    from safetensors.torch import save_file

    from ckpt_cli.io.safetensors import SafetensorsFolder

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, info in sorted(SafetensorsFolder(base).tensors.items()):
        m = re.fullmatch(r"(.*\.(\w+))\.weight", name)
        if not m or m.group(2) not in modules or len(info.shape) != 2 or (skip and re.search(skip, name)):
            continue
        out, inp = info.shape
        stem = "base_model.model." + m.group(1)
        tensors[stem + ".lora_A.weight"] = torch.tensor(0.2 * rng.standard_normal((r, inp)), dtype=torch.float32)
        tensors[stem + ".lora_B.weight"] = torch.tensor(0.2 * rng.standard_normal((out, r)), dtype=torch.float32)
    tensors = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": r,
           "lora_alpha": alpha, "use_rslora": rslora, "target_modules": sorted(modules), "lora_dropout": 0.0,
           "bias": "none", "fan_in_fan_out": False, "inference_mode": True, **(extra or {})}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def reference_merge(base_w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """W + scale·B·A in float64 (the exact value every merge rounds)."""
    return base_w.astype(np.float64) + scale * (b.astype(np.float64) @ a.astype(np.float64))
