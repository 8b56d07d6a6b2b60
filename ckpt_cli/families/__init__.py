"""Model families, looked up by MaxText family name or by an HF config's model_type."""

from __future__ import annotations

from ckpt_cli.errors import SourceError, UnknownModelError
from ckpt_cli.families import (
    deepseek,
    gemma,
    gemma3,
    gpt_oss,
    llama3,
    llama4,
    mixtral,
    olmo3,
    qwen3,
    qwen3_5,
    qwen3_moe,
    qwen3_next,
)
from ckpt_cli.families.base import Family, config_int

FAMILIES: dict[str, Family] = {f.name: f for f in (qwen3.FAMILY, llama3.FAMILY, deepseek.FAMILY, qwen3_moe.FAMILY,
                                                   mixtral.FAMILY, gemma3.FAMILY, gpt_oss.FAMILY,
                                                   llama3.LLAMA2, llama3.MISTRAL, qwen3.QWEN2, olmo3.FAMILY,
                                                   gemma.FAMILY, gemma.FAMILY2, qwen3_next.FAMILY, llama4.FAMILY,
                                                   qwen3_5.FAMILY)}


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownModelError(f"unknown family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


# Dimensions that, when a config gives them, must be positive JSON integers (checked before any family reads them).
POSITIVE_DIMS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                 "num_hidden_layers", "vocab_size", "moe_intermediate_size", "num_experts", "num_local_experts",
                 "n_routed_experts", "num_experts_per_tok", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
                 "qk_rope_head_dim", "v_head_dim")


def check_config_values(cfg: object) -> None:
    """Refuse, in one line, a config that is not an object or whose dimensions are not positive integers
    (its `text_config` too): strings, floats, 0 or negative values never reach a family or an output."""
    if not isinstance(cfg, dict):
        raise SourceError(f"config.json is not a config object (found a JSON {type(cfg).__name__})")
    for part in (cfg, cfg.get("text_config")):
        if isinstance(part, dict):
            for key in POSITIVE_DIMS:
                if part.get(key) is not None:
                    config_int(part, key)


def detect_family(cfg: dict, model: str | None = None) -> Family:
    """The family of an HF config.json: a registered model name's own family when `model` is given and the
    config is of a type it reads (say Llama 3.3 under llama3.3-70b, whose config alone reads as Llama 3.1),
    else the first family that claims the config's model_type."""
    check_config_values(cfg)
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
