"""Model families, looked up by MaxText family name or by an HF config's model_type."""

from __future__ import annotations

from ckpt_cli.errors import UnknownModelError
from ckpt_cli.families import deepseek, gemma, gemma3, gpt_oss, llama3, mixtral, qwen3, qwen3_moe
from ckpt_cli.families.base import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (qwen3.FAMILY, llama3.FAMILY, deepseek.FAMILY, qwen3_moe.FAMILY,
                                                   mixtral.FAMILY, gemma3.FAMILY, gpt_oss.FAMILY, gemma.FAMILY,
                                                   gemma.FAMILY2)}


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownModelError(f"unknown family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def detect_family(cfg: dict) -> Family:
    """The family of an HF config.json, from its model_type."""
    model_type = cfg.get("model_type")
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    arch = ",".join(cfg.get("architectures") or []) or "?"
    raise UnknownModelError(f"config.json model_type {model_type!r} ({arch}) is not supported; "
                            f"supported families: {', '.join(sorted(FAMILIES))}")
