"""Model families, looked up by MaxText family name or by an HF config's model_type."""

from __future__ import annotations

from ckpt_cli.errors import UnknownModelError
from ckpt_cli.families import deepseek, gemma3, gpt_oss, llama3, llama4, mixtral, olmo3, qwen3, qwen3_moe
from ckpt_cli.families.base import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (qwen3.FAMILY, llama3.FAMILY, deepseek.FAMILY, qwen3_moe.FAMILY,
                                                   mixtral.FAMILY, gemma3.FAMILY, gpt_oss.FAMILY,
                                                   llama3.LLAMA2, llama3.MISTRAL, qwen3.QWEN2, olmo3.FAMILY,
                                                   llama4.FAMILY)}


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownModelError(f"unknown family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def detect_family(cfg: dict, model: str | None = None) -> Family:
    """The family of an HF config.json: a registered model name's own family when `model` is given and the
    config is of a type it reads (say Llama 3.3 under llama3.3-70b, whose config alone reads as Llama 3.1),
    else the first family that claims the config's model_type."""
    model_type = cfg.get("model_type")
    if model is not None:
        from ckpt_cli import registry

        named = family_named(registry.lookup(model).family)
        if model_type in named.model_types:
            return named
    for fam in FAMILIES.values():
        if model_type in fam.model_types and fam.claims(cfg):
            return fam
    arch = ",".join(cfg.get("architectures") or []) or "?"
    raise UnknownModelError(f"config.json model_type {model_type!r} ({arch}) is not supported; "
                            f"supported families: {', '.join(sorted(FAMILIES))}")
